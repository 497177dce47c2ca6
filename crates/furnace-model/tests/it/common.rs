//! Helpers of the model tests that need candle (the rest come from `furnace-testutil`).

/// Largest absolute difference between two logits matrices.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).expect("sub").abs().expect("abs").flatten_all().expect("flatten").max(0).expect("max").to_scalar::<f32>().expect("scalar")
}

/// Pseudo-random values in [-0.5, 0.5), from a seed (xorshift).
pub fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 10_000) as f32 / 10_000.0 - 0.5
        })
        .collect()
}

/// A LoRA adapter for `model` with seeded pseudo-random factors of rank `r` on `targets`
/// (PEFT names or `all-linear`), scale 2.
pub fn synthetic_adapter(model: &furnace_model::Llama, r: usize, targets: &[&str], seed: u64) -> furnace_model::PeftAdapter {
    use candle_core::{Device, Tensor};
    let config: furnace_model::LoraConfig =
        serde_json::from_value(serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": targets})).expect("config");
    let mut tensors = std::collections::HashMap::new();
    let mut k = seed;
    for (li, block) in model.layers.iter().enumerate() {
        for t in config.targets() {
            let lin = block.projection(&t).expect("target");
            k += 1;
            let a = Tensor::from_vec(pseudo(r * lin.in_features, k), (r, lin.in_features), &Device::Cpu).expect("A");
            k += 1;
            let b = Tensor::from_vec(pseudo(lin.out_features * r, k), (lin.out_features, r), &Device::Cpu).expect("B");
            tensors.insert(furnace_model::lora::peft_key(li, &t, "A"), a);
            tensors.insert(furnace_model::lora::peft_key(li, &t, "B"), b);
        }
    }
    furnace_model::PeftAdapter { config, tensors }
}
