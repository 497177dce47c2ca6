//! Shared helpers of the training tests: fixture paths, the real model, the SFT fixture.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

pub use furnace_testutil::{smollm2_gguf as smollm2, testdata};

/// `(input_ids, labels, loss)` of the sft_step fixture.
pub fn sft_case() -> (Vec<u32>, Vec<i64>, f64) {
    let text = std::fs::read_to_string(testdata().join("sft_step.jsonl")).expect("sft_step.jsonl");
    let case: serde_json::Value = serde_json::from_str(text.lines().next().expect("case")).expect("json");
    let ids = case["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    let labels = case["labels"].as_array().expect("labels").iter().map(|v| v.as_i64().expect("label")).collect();
    (ids, labels, case["loss"].as_f64().expect("loss"))
}

/// Mean loss over the labelled tokens of one sequence and the adapter's gradients of it.
pub fn sft(
    base: &furnace_train::FrozenBase,
    lora: &furnace_train::TrainableLora,
    ids: &[u32],
    labels: &[i64],
) -> furnace_train::Result<(f64, furnace_train::TrainableLora)> {
    use furnace_train::{AdapterRef, SeqRef, IGNORE_INDEX};
    let n = labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
    let seqs = [SeqRef { ids, labels, adapter: 0, loss_weight: 1.0 / n as f32 }];
    let mut r = furnace_train::train_pass(base, &[AdapterRef { lora, dropout_seed: 0 }], &seqs)?;
    Ok((r.loss_sum[0] / n as f64, r.grads.remove(0)))
}

/// Relative L2 distance of two equal-length slices.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    (err / norm).sqrt()
}

/// Largest absolute difference.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
