//! `furnace data prepare` end to end: the split the stage pipeline relies on (DIR/train.jsonl,
//! DIR/val.jsonl), near dedup, the summary and prepare.json, --preview, bad rows, a Parquet
//! output that `furnace data stats` reads back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_testutil::testdata;
use std::path::Path;
use std::process::{Command, Output};

fn furnace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn prepare_splits_dedups_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = testdata().join("prepare");
    // 9 rows: 1 exact and 2 one-word near duplicates; 20 more distinct rows.
    let mut body = std::fs::read_to_string(fixture.join("near_dups.jsonl")).unwrap();
    body.extend((0..20).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"It is {}.\"}}\n", 2 * i)));
    std::fs::write(dir.path().join("d.jsonl"), body).unwrap();
    let args = ["data", "prepare", "d.jsonl", "--out", "out", "--val-fraction", "0.2", "--seed", "7", "--dedup", "near"];
    let o = furnace(dir.path(), &args);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    assert!(s.contains("read 29 rows from 1 file(s)"), "{s}");
    assert!(s.contains("duplicates removed: 1 exact, 2 near"), "{s}");
    assert!(s.contains("train: 20 rows, val: 6 rows"), "{s}");
    let (train, val) = (lines(&dir.path().join("out/train.jsonl")), lines(&dir.path().join("out/val.jsonl")));
    assert_eq!((train.len(), val.len()), (20, 6));
    assert!(train.iter().all(|r| !val.contains(r)), "disjoint");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/prepare.json")).unwrap()).unwrap();
    assert_eq!((report["train"].as_u64(), report["val"].as_u64(), report["near_duplicates"].as_u64()), (Some(20), Some(6), Some(2)));
    assert_eq!(report["options"]["seed"], 7);
    assert_eq!(report["near_pairs"][0]["kept"], "d.jsonl:1");
    assert_eq!(report["near_pairs"][0]["removed"], "d.jsonl:7");
    // The same command, the same files.
    let before = std::fs::read(dir.path().join("out/val.jsonl")).unwrap();
    assert!(furnace(dir.path(), &args).status.success());
    assert_eq!(std::fs::read(dir.path().join("out/val.jsonl")).unwrap(), before);
    // --verbose lists the pairs.
    let o = furnace(dir.path(), &[&args[..], &["--verbose"]].concat());
    assert!(out(&o).contains("near duplicate d.jsonl:9 of d.jsonl:4"), "{}", out(&o));
}

#[test]
fn prepare_previews_converts_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let input = testdata().join("prepare/token_counts.jsonl");
    let (input, tiny) = (input.to_str().unwrap(), testdata().join("tiny-llama"));
    let tiny = tiny.to_str().unwrap();
    let o = furnace(dir.path(), &["data", "prepare", input, "--model", tiny, "--preview", "8", "--to", "prompt_completion"]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    assert!(s.contains("token_counts.jsonl:8 (chat form)"), "{s}");
    assert!(
        s.contains("──── prompt: 53 tokens, no loss ────") && s.contains("──── completion: 7 tokens, learned ────\nForty-two.<|im_end|>"),
        "{s}"
    );
    assert!(s.contains("\"prompt\":[{\"role\":\"user\""), "the converted row: {s}");
    assert!(!dir.path().join("train.jsonl").exists());
    // Token filters with the tiny model's tokenizer: 40..=70 tokens keeps 4 of 8.
    let o = furnace(
        dir.path(),
        &["data", "prepare", input, "--out", "o", "--model", tiny, "--min-tokens", "40", "--max-tokens", "70", "--val-count", "1"],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("filtered: 2 too short, 2 too long") && out(&o).contains("train: 3 rows, val: 1 rows"), "{}", out(&o));
    // Parquet in chat form, read back by `furnace data stats`.
    let o = furnace(dir.path(), &["data", "prepare", input, "--out", "pq", "--to", "chat", "--format", "parquet", "--val-fraction", "0"]);
    assert!(o.status.success(), "{}", err(&o));
    let o = furnace(dir.path(), &["data", "stats", "pq/train.parquet", "--model", tiny]);
    assert!(out(&o).contains("8 rows, 8 usable as sft, 0 bad") && out(&o).contains("forms: chat 8"), "{}", out(&o));
    // Refusals say what to do.
    let o = furnace(dir.path(), &["data", "prepare", input, "--out", "o", "--max-tokens", "10"]);
    assert!(!o.status.success() && err(&o).contains("give --model"), "{}", err(&o));
    let o = furnace(dir.path(), &["data", "prepare", input, "--out", "o", "--to", "instruction"]);
    assert!(
        !o.status.success() && err(&o).contains("token_counts.jsonl:8: a conversation of 4 messages has no instruction form"),
        "{}",
        err(&o)
    );
    let o = furnace(dir.path(), &["data", "prepare", input, "--out", "o", "--format", "csv"]);
    assert!(!o.status.success() && err(&o).contains("pass --to"), "{}", err(&o));
}

#[test]
fn prepare_names_bad_rows_or_skips_them() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"prompt\": \"a\", \"completion\": \"b\"}";
    std::fs::write(dir.path().join("bad.jsonl"), format!("{good}\n{{\"prompt\": \n{{\"prompt\": \"x\"}}\n{}\n", good.replace('b', "c")))
        .unwrap();
    let o = furnace(dir.path(), &["data", "prepare", "bad.jsonl", "--out", "o"]);
    assert!(!o.status.success() && err(&o).contains("bad.jsonl:2: invalid JSON"), "{}", err(&o));
    let o = furnace(dir.path(), &["data", "prepare", "bad.jsonl", "--out", "o", "--skip-bad", "--verbose", "--val-fraction", "0"]);
    assert!(o.status.success(), "{}", err(&o));
    let s = out(&o);
    assert!(s.contains("bad rows: 2 (skipped)") && s.contains("bad row bad.jsonl:3: missing columns"), "{s}");
    assert_eq!(lines(&dir.path().join("o/train.jsonl")).len(), 2);
    let o = furnace(dir.path(), &["data", "prepare", "nope.jsonl", "--out", "o"]);
    assert!(!o.status.success() && err(&o).contains("nope.jsonl: no such file"));
}
