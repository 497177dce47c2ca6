//! Every target, a bounded number of inputs each (debug build: a few seconds per target).

use crate::on_big_stack;
use furnace_fuzz::{run_target, Kind, Limits, Outcome};
use std::time::Duration;

/// Inputs per target: enough to reach the crafted shapes, small enough for `cargo test`.
const CASES: u64 = 3000;

fn check(name: &'static str) {
    let stats = on_big_stack(move || {
        let target = furnace_fuzz::all().into_iter().find(|t| t.name == name).unwrap();
        // Debug builds are slower than the fuzz program; the limit is generous here.
        let limits = Limits { time: Duration::from_secs(5), ..Limits::default() };
        let stats = run_target(&target, CASES, 0x5eed, &limits, None, |_| {});
        furnace_fuzz::http::cleanup();
        stats
    });
    assert_eq!(stats.runs, CASES);
    let shown: Vec<String> = stats
        .findings
        .iter()
        .map(|f| {
            let kind = match &f.kind {
                Kind::Panic(m) => format!("panic: {m}"),
                other => format!("{other:?}"),
            };
            format!("{kind} on {:?}", String::from_utf8_lossy(&f.input[..f.input.len().min(300)]))
        })
        .collect();
    assert_eq!(stats.finding_count, 0, "{name}: {} findings:\n{}", stats.finding_count, shown.join("\n"));
    // Both outcomes occur: the seeds are accepted and the mutants mostly rejected.
    assert!(stats.oks > 0 && stats.errs > 0, "{name}: {} ok, {} errors", stats.oks, stats.errs);
}

#[test]
fn gguf() {
    check("gguf");
}

#[test]
fn safetensors() {
    check("safetensors");
}

#[test]
fn config_json() {
    check("config-json");
}

#[test]
fn tokenizer_json() {
    check("tokenizer-json");
}

#[test]
fn chat_template() {
    check("chat-template");
}

#[test]
fn spec_toml() {
    check("spec-toml");
}

#[test]
fn dataset_jsonl() {
    check("dataset-jsonl");
}

#[test]
fn dataset_json() {
    check("dataset-json");
}

#[test]
fn dataset_csv() {
    check("dataset-csv");
}

#[test]
fn dataset_parquet() {
    check("dataset-parquet");
}

#[test]
fn http() {
    check("http");
}

#[test]
fn every_seed_is_accepted_or_rejected_cleanly_and_errors_name_the_problem() {
    on_big_stack(|| {
        for t in furnace_fuzz::all() {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{} has no seeds", t.name);
            // The first seed of each target is a valid input.
            let first = furnace_fuzz::run_one(&t, &seeds[0], &Limits::default());
            assert_eq!(first.result, Ok(Outcome::Ok), "{}'s first seed", t.name);
        }
        furnace_fuzz::http::cleanup();
        // Rejections say what is wrong.
        let t = furnace_fuzz::all().into_iter().find(|t| t.name == "config-json").unwrap();
        let r = furnace_fuzz::run_one(&t, br#"{"model_type": "llama", "hidden_size": 64}"#, &Limits::default());
        assert_eq!(r.result, Ok(Outcome::Err("invalid model config: config.json lacks integer 'num_attention_heads'".into())));
    });
}
