//! Logits of our model against the transformers reference fixtures, at every position.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::max_abs_diff;
use furnace_model::{LoadedModel, Logits, SeqInput, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};

#[test]
fn smollm2_gguf_dequantized_logits_match_reference() -> anyhow::Result<()> {
    let m = LoadedModel::load(&smollm2_gguf(), WeightDType::F32)?;
    let reference = candle_core::safetensors::load(testdata().join("logits_cases.safetensors"), &candle_core::Device::Cpu)?;
    for case in jsonl("logits_cases.jsonl") {
        let name = case["name"].as_str().expect("name");
        let ids = ids(&case, "ids");
        // The tokenizer agrees with the reference ids.
        assert_eq!(m.tokenizer.encode(case["text"].as_str().expect("text"), false)?, ids);
        let got = m.model.logits_all(&ids)?;
        let diff = max_abs_diff(&got, &reference[name]);
        assert!(diff < 1e-3, "{name}: max |diff| = {diff}");
        // top-5 of the last position.
        let last: Vec<f32> = got.get(ids.len() - 1)?.to_vec1()?;
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(top5, ids_of(&case["top5_last"]));
    }
    Ok(())
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("u64") as u32).collect()
}

fn check_tiny(dir: &str) -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join(dir), WeightDType::F32)?;
    let reference = candle_core::safetensors::load(testdata().join(format!("{dir}_logits.safetensors")), &candle_core::Device::Cpu)?;
    for case in jsonl(&format!("{dir}_cases.jsonl")) {
        let ids = ids(&case, "ids");
        let got = m.model.logits_all(&ids)?;
        let diff = max_abs_diff(&got, &reference["logits"]);
        assert!(diff < 1e-3, "{dir}: max |diff| = {diff}");
        // The KV-cached incremental forward gives the same logits, token by token.
        let mut cache = m.model.new_cache();
        for (i, &id) in ids.iter().enumerate() {
            let out = m.model.forward(&mut [SeqInput { tokens: &[id], cache: &mut cache, logits: Logits::Last, adapter: None }])?;
            let row = out[0].clone().expect("logits");
            let diff = max_abs_diff(&row, &got.narrow(0, i, 1)?);
            assert!(diff < 1e-4, "{dir}: incremental position {i} differs by {diff}");
        }
    }
    Ok(())
}

#[test]
fn tiny_llama_hf_dir_logits_match_reference() -> anyhow::Result<()> {
    check_tiny("tiny-llama")
}

#[test]
fn tiny_qwen2_hf_dir_with_bias_and_tied_head_matches_reference() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-qwen2"), WeightDType::F32)?;
    assert!(m.model.config.attention_bias && m.model.config.tie_word_embeddings);
    check_tiny("tiny-qwen2")
}

#[test]
fn ragged_batch_equals_sequences_alone() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let a: Vec<u32> = vec![1604, 3987, 46477, 24, 94, 727];
    let b: Vec<u32> = vec![504, 3575, 282];
    let alone_a = m.model.logits_all(&a)?;
    let alone_b = m.model.logits_all(&b)?;
    let (mut ca, mut cb) = (m.model.new_cache(), m.model.new_cache());
    let out = m.model.forward(&mut [
        SeqInput { tokens: &a, cache: &mut ca, logits: Logits::All, adapter: None },
        SeqInput { tokens: &b, cache: &mut cb, logits: Logits::Last, adapter: None },
    ])?;
    let oa = out[0].clone().expect("a");
    let ob = out[1].clone().expect("b");
    assert!(max_abs_diff(&oa, &alone_a) < 1e-4);
    assert!(max_abs_diff(&ob, &alone_b.narrow(0, 2, 1)?) < 1e-4);
    Ok(())
}

#[test]
fn quantized_and_bf16_weights_stay_close_to_f32() -> anyhow::Result<()> {
    let dir = testdata().join("tiny-llama");
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let exact = LoadedModel::load(&dir, WeightDType::F32)?.model.logits_all(&ids)?;
    for dt in [WeightDType::Bf16, WeightDType::Quantized] {
        let got = LoadedModel::load(&dir, dt)?.model.logits_all(&ids)?;
        let diff = max_abs_diff(&got, &exact);
        assert!(diff < 0.05, "{dt:?}: max |diff| = {diff}");
        assert!(diff > 0.0, "{dt:?}: suspiciously exact, the dtype was not applied");
    }
    Ok(())
}
