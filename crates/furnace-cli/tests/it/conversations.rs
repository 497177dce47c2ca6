//! `furnace conversations list|export`: conversations logged in a store (as `furnace serve`
//! logs them) are listed and exported with filters, and `furnace train` takes the export as
//! it is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_exp::{ChoiceRecord, ConversationRecord, Store};
use furnace_testutil::testdata;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

fn furnace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Day 2023-11-14 00:00 UTC.
const DAY: i64 = 1_699_920_000;

fn log(store: &Store, i: i64, model: &str, created: i64, answer: &str, rating: Option<i64>) {
    store
        .log_conversation(&ConversationRecord {
            id: format!("chatcmpl-{i:04}"),
            created,
            model: model.into(),
            adapter: (model != "base").then(|| model.into()),
            messages: json!([
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": format!("What is {i} plus {i}?")}
            ]),
            response: vec![ChoiceRecord { text: answer.into(), tool_calls: None }],
            rag_sources: None,
            prompt_tokens: 20,
            completion_tokens: 2,
            latency_ms: 40,
        })
        .unwrap();
    if let Some(r) = rating {
        store.add_feedback(&format!("chatcmpl-{i:04}"), r, Some("rated")).unwrap();
    }
}

#[test]
fn conversations_export_with_filters_and_the_export_trains_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = Store::open_in(&d.join("runs")).unwrap();
    // Good answers rated 4-5 on the base after the day; the rest is filtered out: a low
    // rating, no rating, the day before, another model, a tool call with no text.
    for i in 0..6 {
        log(&store, i, "base", DAY + 100 + i, &(2 * i).to_string(), Some(4 + i % 2));
    }
    log(&store, 10, "base", DAY + 200, "wrong", Some(1));
    log(&store, 11, "base", DAY + 300, "unrated", None);
    log(&store, 12, "base", DAY - 10, "too early", Some(5));
    log(&store, 13, "tuned", DAY + 400, "other model", Some(5));
    store
        .log_conversation(&ConversationRecord {
            id: "chatcmpl-tool".into(),
            created: DAY + 500,
            model: "base".into(),
            adapter: None,
            messages: json!([{"role": "user", "content": "call it"}]),
            response: vec![ChoiceRecord { text: String::new(), tool_calls: Some(json!([{"id": "call_1", "type": "function"}])) }],
            rag_sources: None,
            prompt_tokens: 5,
            completion_tokens: 3,
            latency_ms: 10,
        })
        .unwrap();
    store.add_feedback("chatcmpl-tool", 5, None).unwrap();

    // list: a table, and everything as JSON.
    let table = ok(&furnace(d, &["conversations", "list", "--min-rating", "4", "--since", "2023-11-14", "--model", "base"]));
    assert!(table.contains("chatcmpl-0005") && table.contains("What is 5 plus 5?") && table.contains("2023-11-14 00:01"), "{table}");
    assert!(!table.contains("chatcmpl-0010") && !table.contains("chatcmpl-0012") && !table.contains("chatcmpl-0013"), "{table}");
    let listed: Value = serde_json::from_str(&ok(&furnace(d, &["conversations", "list", "--json", "--limit", "2"]))).unwrap();
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["chatcmpl-tool", "chatcmpl-0013"], "newest first");
    assert_eq!(listed[1]["rating"], 5);
    assert_eq!(listed[1]["comment"], "rated");
    assert_eq!(listed[1]["adapter"], "tuned");

    // export: the six good ones, oldest first, in the chat form; the tool call is left out.
    let out = d.join("data/good.jsonl");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, "old content\n").unwrap();
    let o = furnace(
        d,
        &[
            "conversations",
            "export",
            "--format",
            "chat-jsonl",
            "--out",
            "data/good.jsonl",
            "--min-rating",
            "4",
            "--since",
            "2023-11-14",
            "--model",
            "base",
        ],
    );
    ok(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("wrote 6 conversations") && stderr.contains("left out 1") && stderr.contains("chatcmpl-tool"), "{stderr}");
    let text = std::fs::read_to_string(&out).unwrap();
    let rows: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6, "{text}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            *row,
            json!({"messages": [
                {"role": "system", "content": "Answer with a number."},
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": (2 * i).to_string()}
            ]})
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["good.jsonl"], "no temporary file left");
    // --limit takes the newest (the tool call among them, left out).
    ok(&furnace(d, &["conversations", "export", "--out", "two.jsonl", "--min-rating", "4", "--model", "base", "--limit", "3"]));
    let two = std::fs::read_to_string(d.join("two.jsonl")).unwrap();
    assert!(two.lines().count() == 2 && two.contains("What is 4 plus 4?") && two.contains("What is 5 plus 5?"), "{two}");
    // Bad arguments are refused before anything is written.
    for bad in [&["--since", "2023-02-30"][..], &["--min-rating", "9"], &["--format", "csv"]] {
        let mut args = vec!["conversations", "export", "--out", "bad.jsonl"];
        args.extend_from_slice(bad);
        let o = furnace(d, &args);
        assert!(!o.status.success(), "{bad:?}");
        assert!(!d.join("bad.jsonl").exists(), "{bad:?}");
    }

    // furnace train takes the export as it is.
    let spec = format!(
        "[experiment]\nname = \"from-conversations\"\n[data]\ntrain = \"data/good.jsonl\"\n[model]\nbase = \"{}\"\n[lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\"]\n[trainer]\nlearning_rate = 1e-2\nmax_steps = 2\nbatch_size = 2\nmax_seq_len = 96\n",
        testdata().join("tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(d.join("spec.toml"), spec).unwrap();
    let o = furnace(d, &["train", "spec.toml"]);
    ok(&o);
    let exp = d.join("runs/from-conversations");
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    assert!(run.join("adapter/adapter_model.safetensors").exists(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 2, "{metrics}");
}

#[test]
fn conversations_on_a_runs_folder_without_a_store_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = furnace(dir.path(), &["conversations", "list"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no experiments in"), "{}", String::from_utf8_lossy(&o.stderr));
}
