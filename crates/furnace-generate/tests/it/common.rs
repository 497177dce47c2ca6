//! Helpers of the generation tests that need the model runtime (fixture paths, JSONL and the
//! real model's location come from `furnace-testutil`).

use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};
use std::sync::OnceLock;

/// The real model (f32), loaded once for the whole test binary.
pub fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(smollm2_owned)
}

/// A copy of the real model (f32) of one's own (for the service, which owns its model).
pub fn smollm2_owned() -> LoadedModel {
    LoadedModel::load(&smollm2_gguf(), WeightDType::F32).expect("load smollm2")
}

/// The tiny random llama of `testdata/` (f32).
pub fn tiny() -> LoadedModel {
    LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).expect("tiny-llama")
}

/// The reference greedy generations: (prompt ids, new ids, text).
pub fn greedy_cases() -> Vec<(Vec<u32>, Vec<u32>, String)> {
    jsonl("greedy_cases.jsonl")
        .iter()
        .map(|v| (ids(v, "prompt_ids"), ids(v, "new_ids"), v["text"].as_str().expect("text").to_string()))
        .collect()
}

