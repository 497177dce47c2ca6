//! `furnace data generate` end to end: SmolLM2 locally (batched, schema-constrained) and
//! through `furnace serve`'s OpenAI API, rows read back as `furnace train` reads them
//! (`furnace data stats`); and `furnace eval`'s LLM judge against `furnace serve`.

use crate::serve::Server;
use furnace_testutil::{smollm2_gguf, testdata};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn furnace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().expect("run furnace")
}

fn ok(out: &Output) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "furnace failed:\n{o}\n{e}");
    o.into_owned()
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).expect("output").lines().map(|l| serde_json::from_str(l).expect("a JSON row")).collect()
}

/// `furnace data stats --json` of a file: every row read as `furnace train` reads it.
fn stats(dir: &Path, file: &str) -> Value {
    let gguf = smollm2_gguf();
    serde_json::from_str(&ok(&furnace(dir, &["data", "stats", file, "--model", gguf.to_str().unwrap(), "--json"]))).expect("stats JSON")
}

#[test]
fn smollm2_generates_distinct_qa_rows_that_train_reads_and_the_seed_repeats_them() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = smollm2_gguf();
    let args = |out: &'static str| {
        vec![
            "data",
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--topic",
            "the solar system",
            "--count",
            "4",
            "--format",
            "qa",
            "--max-tokens",
            "64",
            "--batch",
            "4",
            "--seed",
            "7",
            "--out",
            out,
            "--json",
        ]
    };
    let summary: Value = serde_json::from_str(&ok(&furnace(dir.path(), &args("a.jsonl")))).unwrap();
    assert_eq!(summary["written"], 4, "{summary:#}");
    assert_eq!(summary["requested"], 4);
    assert!(summary["examples_per_sec"].as_f64().unwrap() > 0.0);
    // Constrained decoding: every answer is JSON under the schema, or cut at --max-tokens
    // (counted apart: the JSON never closed).
    assert_eq!((summary["invalid_json"].as_u64(), summary["schema_failures"].as_u64()), (Some(0), Some(0)), "{summary:#}");
    let c = |k: &str| summary[k].as_u64().unwrap_or_else(|| panic!("{k} in {summary:#}"));
    assert!(c("truncated") + c("kept") + c("duplicates") + c("near_duplicates") <= c("generated"), "{summary:#}");
    let a = rows(&dir.path().join("a.jsonl"));
    assert_eq!(a.len(), 4);
    let prompts: std::collections::HashSet<&str> = a.iter().map(|r| r["prompt"].as_str().unwrap()).collect();
    assert_eq!(prompts.len(), 4, "distinct questions: {a:#?}");
    assert!(a.iter().all(|r| !r["completion"].as_str().unwrap().is_empty()));
    let s = stats(dir.path(), "a.jsonl");
    assert_eq!((s["rows"].as_u64(), s["forms"]["prompt_completion"].as_u64()), (Some(4), Some(4)), "{s:#}");
    assert_eq!(s["bad"], serde_json::json!([]));
    // The same seed and batch: the same rows.
    ok(&furnace(dir.path(), &args("b.jsonl")));
    assert_eq!(a, rows(&dir.path().join("b.jsonl")));
}

#[test]
fn furnace_serve_generates_document_grounded_rows_and_judges_an_eval() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(
        docs.join("rivers.md"),
        "# Rivers\n\nThe Rhine rises in the Swiss Alps and flows through six countries to the North Sea near Rotterdam.\n",
    )
    .unwrap();
    std::fs::write(
        docs.join("rocks.txt"),
        "Basalt is a fine-grained volcanic rock formed from the rapid cooling of lava. It makes up most of the ocean floor.\n",
    )
    .unwrap();
    let runs = dir.path().join("runs");
    let server = Server::start(&runs, &[]);

    // Synthetic instruction rows from the API, each naming the chunk it is grounded in.
    let out = furnace(
        dir.path(),
        &[
            "data",
            "generate",
            "--openai-url",
            &server.url,
            "--openai-model",
            "smollm2-135m-instruct",
            "--docs",
            "docs",
            "--count",
            "3",
            "--format",
            "instruction",
            "--max-tokens",
            "96",
            "--batch",
            "3",
            "--concurrency",
            "3",
            "--near-dup",
            "2",
            "--out",
            "inst.jsonl",
            "--json",
        ],
    );
    let summary: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(summary["written"], 3, "{summary:#}");
    let got = rows(&dir.path().join("inst.jsonl"));
    for r in &got {
        let src = r["source"].as_str().unwrap();
        assert!(src == "rivers.md#0" || src == "rocks.txt#0", "{r}");
        assert!(!r["instruction"].as_str().unwrap().is_empty() && !r["output"].as_str().unwrap().is_empty(), "{r}");
        assert!(r["input"].is_string(), "{r}");
    }
    let s = stats(dir.path(), "inst.jsonl");
    assert_eq!((s["rows"].as_u64(), s["forms"]["instruction"].as_u64()), (Some(3), Some(3)), "{s:#}");

    // furnace eval with the judge: a 1-5 score per answer, their mean in metrics.json.
    let gguf = smollm2_gguf();
    let data = testdata().join("ppl_eval.jsonl");
    let out = furnace(
        dir.path(),
        &[
            "eval",
            "--model",
            gguf.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--metrics",
            "ppl",
            "--limit",
            "3",
            "--max-tokens",
            "16",
            "--judge-url",
            &server.url,
            "--judge-model",
            "smollm2-135m-instruct",
            "--out",
            "ev",
        ],
    );
    ok(&out);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("ev/eval/metrics.json")).unwrap()).unwrap();
    let judge = m["metrics"]["judge"].as_f64().expect("a judge metric");
    assert!((1.0..=5.0).contains(&judge), "{m:#}");
    assert_eq!(m["metrics"]["judge_unreadable"], 0.0, "structured output gives a score every time: {m:#}");
    assert_eq!(m["judge"]["model"], "smollm2-135m-instruct");
    let preds = rows(&dir.path().join("ev/eval/predictions.jsonl"));
    assert_eq!(preds.len(), 3);
    let mean = preds.iter().map(|p| p["judge"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((mean - judge).abs() < 1e-9);
    assert!(preds.iter().all(|p| p["judge"].as_f64().unwrap().fract() == 0.0 && p["judgement"].as_str().unwrap().contains("score")));

    // Flags that cannot work are refused before any work.
    let out = furnace(dir.path(), &["eval", "--data", data.to_str().unwrap(), "--judge-url", "localhost:1/v1", "--judge-model", "m"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--judge-url") && e.contains("base_url"), "{e}");
    let (status, rest) = server.stop();
    assert!(status.success(), "{rest}");
}

#[test]
fn bad_settings_are_named_by_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = furnace_testutil::testdata().join("tiny-llama");
    let tiny = tiny.to_str().unwrap();
    for (args, needle) in [
        (vec!["--count", "0"], "--count: is 0"),
        (vec!["--near-dup=-1"], "--near-dup: is -1"),
        (vec!["--max-attempts", "0"], "--max-attempts: is 0"),
    ] {
        let mut all = vec!["data", "generate", "--topic", "t", "--model", tiny, "--out", "x.jsonl"];
        all.extend(args);
        let o = furnace(dir.path(), &all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{all:?}: {err}");
    }
    // --openai-model means nothing without --openai-url.
    let o = furnace(dir.path(), &["data", "generate", "--topic", "t", "--openai-model", "m", "--out", "x.jsonl"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--openai-url"), "{err}");
    assert!(!dir.path().join("x.jsonl").exists());
}
