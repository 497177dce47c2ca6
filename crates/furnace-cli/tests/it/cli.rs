//! The `furnace` binary end to end: real model, real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_testutil::testdata;
use std::process::{Command, Output};

fn furnace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).args(args).output().expect("run furnace")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn generate_json_reproduces_the_reference_greedy_case() {
    let case: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(testdata().join("greedy_cases.jsonl")).expect("fixture").lines().next().expect("line"),
    )
    .expect("json");
    let o = furnace(&["generate", "--dtype", "f32", "--json", "--max-tokens", "24", case["question"].as_str().expect("q")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("json output");
    assert_eq!(v["prompt_ids"], case["prompt_ids"]);
    assert_eq!(v["new_ids"], case["new_ids"]);
    assert_eq!(v["text"], "The capital of France is Paris.");
}

#[test]
fn generate_streams_text_with_the_quantized_default() {
    let o = furnace(&["generate", "--max-tokens", "12", "What is the capital of France?"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "got: {}", stdout(&o));
}

#[test]
fn tokenize_prints_reference_ids() {
    let o = furnace(&["tokenize", "--json", "Hello, world!"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "[19556,28,905,17]");
    let o = furnace(&["tokenize", "--model", testdata().join("tiny-llama").to_str().expect("utf8"), "<|im_start|>user\nhi<|im_end|>"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).split_whitespace().collect::<Vec<_>>(), ["1", "4093", "198", "6004", "2"]);
}

#[test]
fn hf_directory_generates_raw() {
    let dir = testdata().join("tiny-qwen2");
    let o = furnace(&["generate", "--model", dir.to_str().expect("utf8"), "--raw", "--json", "--max-tokens", "4", "--ignore-eos", "def"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("json");
    assert_eq!(v["new_ids"].as_array().expect("ids").len(), 4);
}

/// A model whose chat template would abort the process (a namespace stored in itself) or
/// exhaust memory (a string doubled sixty times): furnace renders templates in a worker
/// process, so the command fails with a message saying what happened, and the template can be
/// replaced.
#[test]
fn a_crafted_chat_template_fails_the_command_not_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::serve::copy_dir(&testdata().join("tiny-qwen2"), dir.path());
    let model = dir.path().to_str().expect("utf8");
    for template in [
        "{% set s = namespace(v=1) %}{% set s.v = s %}{{ s.v ~ '' }}",
        "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
    ] {
        std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write");
        let o = furnace(&["generate", "--model", model, "--max-tokens", "2", "hi"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("the chat template crashed its renderer") && err.contains("fix or replace it"), "{err}");
    }
    std::fs::write(dir.path().join("chat_template.jinja"), "{{ messages[0].content }}").expect("write");
    let o = furnace(&["generate", "--model", model, "--max-tokens", "2", "--json", "--ignore-eos", "hi"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_inputs_fail_with_clear_messages() {
    let o = furnace(&["generate", "--model", "/nonexistent/model.gguf", "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/model.gguf"), "{}", stderr(&o));

    let o = furnace(&["generate", "--model", "no-such-alias", "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("smollm2-135m-instruct"), "lists the aliases: {}", stderr(&o));

    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00truncated").expect("write");
    let o = furnace(&["generate", "--model", bad.to_str().expect("utf8"), "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("GGUF"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));

    let long = "word ".repeat(9000);
    let o = furnace(&["generate", "--max-tokens", "1", &long]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("context"), "{}", stderr(&o));

    let o = furnace(&["generate", "--top-p", "0", "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
}

#[test]
fn model_list_and_doctor_report_the_cached_model() {
    let o = furnace(&["model", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("smollm2-135m-instruct") && out.contains("llama") && out.contains("Q4_1"), "{out}");
    let o = furnace(&["doctor"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("threads:"), "{}", stdout(&o));
}

#[test]
fn chat_answers_on_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .args(["chat", "--max-tokens", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"What is the capital of France?\n/exit\n").expect("write");
    let o = child.wait_with_output().expect("wait");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
}
