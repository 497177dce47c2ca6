//! PEFT LoRA adapters: loading, registering, logits against the PEFT reference.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::max_abs_diff;
use furnace_model::{Error, LoadedModel, PeftAdapter, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};

#[test]
fn peft_adapter_logits_match_reference() -> anyhow::Result<()> {
    let mut m = LoadedModel::load(&smollm2_gguf(), WeightDType::F32)?;
    let case = &jsonl("lora_cases.jsonl")[0];
    let ids = ids(case, "ids");
    let base = m.model.logits_all(&ids)?;
    let adapter = PeftAdapter::load(&testdata().join(case["adapter_dir"].as_str().expect("dir")))?;
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.config.scale(), 2.0);
    let id = m.model.add_adapter(&adapter)?;
    let got = m.model.logits_all_with(&ids, Some(id))?;
    let reference = candle_core::safetensors::load(testdata().join("lora_logits.safetensors"), &candle_core::Device::Cpu)?;
    let diff = max_abs_diff(&got, &reference["logits"]);
    assert!(diff < 1e-3, "max |diff| = {diff}");
    assert!(max_abs_diff(&got, &base) > 0.1, "the adapter changes the logits");
    // Sequences without the adapter get the base model exactly, and so does the model once
    // the adapter is removed.
    assert_eq!(max_abs_diff(&m.model.logits_all(&ids)?, &base), 0.0);
    assert!(m.model.remove_adapter(id));
    assert_eq!(max_abs_diff(&m.model.logits_all(&ids)?, &base), 0.0);
    Ok(())
}

#[test]
fn adapter_applies_in_every_weight_storage() -> anyhow::Result<()> {
    let case = &jsonl("lora_cases.jsonl")[0];
    let ids = ids(case, "ids");
    let adapter = PeftAdapter::load(&testdata().join("lora_adapter"))?;
    let reference = candle_core::safetensors::load(testdata().join("lora_logits.safetensors"), &candle_core::Device::Cpu)?;
    for dt in [WeightDType::Bf16, WeightDType::Quantized] {
        let mut m = LoadedModel::load(&smollm2_gguf(), dt)?;
        let adapter_id = m.model.add_adapter(&adapter)?;
        // Prefill (many rows) and the KV-cached single-row path both carry the adapter.
        let all = m.model.logits_all_with(&ids, Some(adapter_id))?;
        let diff = max_abs_diff(&all, &reference["logits"]);
        // bf16 activations and Q8_0 weights move logits by up to ~1 on a 49k vocabulary;
        // the answer ("Paris" after "The capital of France is") must still be the reference's.
        assert!(diff < 1.5, "{dt:?}: max |diff| = {diff}");
        let last = ids.len() - 1;
        assert_eq!(all.get(last)?.argmax(0)?.to_scalar::<u32>()?, reference["logits"].get(last)?.argmax(0)?.to_scalar::<u32>()?, "{dt:?}");
        let mut cache = m.model.new_cache();
        let mut last = None;
        for &id in &ids {
            last = m
                .model
                .forward(&mut [furnace_model::SeqInput {
                    tokens: &[id],
                    cache: &mut cache,
                    logits: furnace_model::Logits::Last,
                    adapter: Some(adapter_id),
                }])?
                .pop()
                .flatten();
        }
        let d = max_abs_diff(&last.expect("logits"), &reference["logits"].narrow(0, ids.len() - 1, 1)?);
        assert!(d < 1.5, "{dt:?} incremental: {d}");
    }
    Ok(())
}

#[test]
fn bad_adapters_are_clear_errors_and_leave_the_model_alone() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let e = PeftAdapter::load(dir.path()).err().expect("an error");
    assert!(e.to_string().contains("adapter_config.json"), "{e}");

    let src = testdata().join("lora_adapter");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json"))?)?;
    let write = |cfg: &serde_json::Value| -> anyhow::Result<()> {
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string())?;
        std::fs::copy(src.join("adapter_model.safetensors"), dir.path().join("adapter_model.safetensors"))?;
        Ok(())
    };
    let mut c = cfg.clone();
    c["r"] = 0.into();
    write(&c)?;
    assert!(matches!(PeftAdapter::load(dir.path()), Err(Error::Adapter(ref m)) if m.contains("r must be")));
    let mut c = cfg.clone();
    c["target_modules"] = serde_json::json!(["q_proj", "c_attn"]);
    write(&c)?;
    assert!(matches!(PeftAdapter::load(dir.path()), Err(Error::Adapter(ref m)) if m.contains("c_attn")));
    // A rank that does not match the stored factors: rejected, and the model keeps its
    // previous state.
    let mut c = cfg.clone();
    c["r"] = 4.into();
    write(&c)?;
    let adapter = PeftAdapter::load(dir.path())?;
    let mut m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let e = m.model.add_adapter(&adapter).expect_err("shape error");
    assert!(e.to_string().contains("do not fit"), "{e}");
    assert!(m.model.layers[0].self_attn.q_proj.lora.is_empty());
    assert!(m.model.adapters().is_empty());
    Ok(())
}
