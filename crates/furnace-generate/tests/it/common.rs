//! Helpers of the generation tests that need the model runtime (fixture paths, JSONL and the
//! real model's location come from `furnace-testutil`).

use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};
use std::path::Path;
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

/// Writes a PEFT LoRA adapter directory for `model` with seeded pseudo-random factors of
/// rank `r` on `targets` (PEFT names or `all-linear`), scale 2.
pub fn write_adapter(dir: &Path, model: &furnace_model::Llama, r: usize, targets: &[&str], seed: u64) {
    use candle_core::{Device, Tensor};
    let config = serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": targets, "peft_type": "LORA"});
    let parsed: furnace_model::LoraConfig = serde_json::from_value(config.clone()).expect("config");
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pseudo = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 10_000) as f32 / 10_000.0 - 0.5
            })
            .collect()
    };
    let mut tensors = std::collections::HashMap::new();
    for (li, block) in model.layers.iter().enumerate() {
        for t in parsed.targets() {
            let lin = block.projection(&t).expect("target");
            let a = Tensor::from_vec(pseudo(r * lin.in_features), (r, lin.in_features), &Device::Cpu).expect("A");
            let b = Tensor::from_vec(pseudo(lin.out_features * r), (lin.out_features, r), &Device::Cpu).expect("B");
            tensors.insert(furnace_model::lora::peft_key(li, &t, "A"), a);
            tensors.insert(furnace_model::lora::peft_key(li, &t, "B"), b);
        }
    }
    std::fs::create_dir_all(dir).expect("adapter dir");
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).expect("config");
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).expect("safetensors");
}
