//! Shared helpers of the training tests: fixture paths, the real model, the SFT fixture.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// The SmolLM2 GGUF from the furnace cache; fails loudly when it is missing.
pub fn smollm2() -> PathBuf {
    let cache = furnace_hub::Cache::from_env().expect("cache");
    match cache.cached("smollm2-135m-instruct") {
        Some(l) => l.path().to_path_buf(),
        None => panic!("the real model is not cached in {}: run `cargo run --release --bin furnace -- model pull smollm2-135m-instruct` (the README's test command does this)", cache.root().display()),
    }
}

/// `(input_ids, labels, loss)` of the sft_step fixture.
pub fn sft_case() -> (Vec<u32>, Vec<i64>, f64) {
    let text = std::fs::read_to_string(testdata().join("sft_step.jsonl")).expect("sft_step.jsonl");
    let case: serde_json::Value = serde_json::from_str(text.lines().next().expect("case")).expect("json");
    let ids = case["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    let labels = case["labels"].as_array().expect("labels").iter().map(|v| v.as_i64().expect("label")).collect();
    (ids, labels, case["loss"].as_f64().expect("loss"))
}
