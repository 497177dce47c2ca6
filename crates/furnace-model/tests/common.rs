//! Shared helpers of the model tests: fixture paths and the real model.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::path::PathBuf;

pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// The SmolLM2 GGUF from the furnace cache. Fails loudly when it is missing: the test
/// command of README.md pulls it first.
pub fn smollm2_gguf() -> PathBuf {
    let cache = furnace_hub::Cache::from_env().expect("open the furnace cache");
    match cache.cached("smollm2-135m-instruct") {
        Some(loc) => loc.path().to_path_buf(),
        None => panic!(
            "the real model is not cached in {}: run `cargo run --release -p furnace-cli -- model pull smollm2-135m-instruct` (the README's test command does this)",
            cache.root().display()
        ),
    }
}

pub fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(testdata().join(name)).expect("fixture file");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("fixture json"))
        .collect()
}

pub fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Largest absolute difference between two logits matrices.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}
