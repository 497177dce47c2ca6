//! One SFT step against the PEFT reference: logits, loss and LoRA gradients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
use furnace_train::{engine, FrozenBase, TrainableLora};

use common::*;

fn reference_grads() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(testdata().join("sft_step_grads.safetensors"), &candle_core::Device::Cpu).expect("grads fixture")
}

#[test]
fn training_forward_matches_the_runtime() -> anyhow::Result<()> {
    for name in ["tiny-qwen2", "tiny-llama"] {
        let m = LoadedModel::load(&testdata().join(name), WeightDType::F32)?;
        let base = FrozenBase::new(&m.model)?;
        let ids = [1604u32, 3987, 46477, 24, 94, 727];
        let got = engine::logits(&base, None, &ids)?;
        let want = m.model.logits_all(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "{name}: {d}");
    }
    Ok(())
}

#[test]
fn lora_logits_match_the_fixture() -> anyhow::Result<()> {
    let m = LoadedModel::load(&smollm2(), WeightDType::F32)?;
    let base = FrozenBase::new(&m.model)?;
    let lora = TrainableLora::from_adapter(&m.model, &PeftAdapter::load(&testdata().join("lora_adapter"))?)?;
    let text = std::fs::read_to_string(testdata().join("lora_cases.jsonl"))?;
    let case: serde_json::Value = serde_json::from_str(text.lines().next().expect("case"))?;
    let ids: Vec<u32> = case["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    let want = candle_core::safetensors::load(testdata().join("lora_logits.safetensors"), &candle_core::Device::Cpu)?;
    let w = want["logits"].flatten_all()?.to_vec1::<f32>()?;
    let got = engine::logits(&base, Some(&lora), &ids)?;
    let d = max_diff(&got, &w);
    assert!(d < 1e-3, "max |diff| {d}");
    Ok(())
}

#[test]
fn sft_step_loss_and_lora_gradients_match_peft() -> anyhow::Result<()> {
    let (ids, labels, want_loss) = sft_case();
    let m = LoadedModel::load(&smollm2(), WeightDType::F32)?;
    let base = FrozenBase::new(&m.model)?;
    assert!(!base.is_bf16());
    let lora = TrainableLora::from_adapter(&m.model, &PeftAdapter::load(&testdata().join("lora_adapter"))?)?;
    let (loss, grads) = sft(&base, &lora, &ids, &labels)?;
    assert!((loss - want_loss).abs() < 1e-4, "loss {loss} vs {want_loss}");
    let reference = reference_grads();
    assert_eq!(reference.len(), 6);
    let named = grads.named();
    for (key, want) in &reference {
        let key = key.replace(".default.weight", ".weight");
        let got = named.iter().find(|(k, ..)| *k == key).unwrap_or_else(|| panic!("no gradient for {key}"));
        let want = want.flatten_all()?.to_vec1::<f32>()?;
        let err = rel_l2(got.2, &want);
        assert!(err < 1e-3, "{key}: relative L2 error {err}");
    }
    Ok(())
}

#[test]
fn bad_training_input_is_an_error() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let base = FrozenBase::new(&m.model)?;
    let lc = serde_json::from_value(serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))?;
    let lora = TrainableLora::new(&m.model, lc, furnace_train::LoraInit::KaimingUniform, 1)?;
    let pass = |ids: &[u32], labels: &[i64]| {
        let seqs = [furnace_train::SeqRef { ids, labels, adapter: 0, loss_weight: 1.0 }];
        furnace_train::train_pass(&base, &[furnace_train::AdapterRef { lora: &lora, dropout_seed: 0 }], &seqs)
    };
    assert!(pass(&[1, 2, 3], &[1, 2]).unwrap_err().to_string().contains("labels"));
    assert!(pass(&[], &[]).unwrap_err().to_string().contains("empty"));
    assert!(pass(&[1, 2, 3], &[-100, 5, 999_999]).unwrap_err().to_string().contains("outside the vocabulary"));
    assert!(pass(&[1, 2, 999_999], &[-100, 5, 6]).unwrap_err().to_string().contains("outside the vocabulary"));
    // An adapter that does not fit the model is refused, naming what is wrong.
    let seqs = [furnace_train::SeqRef { ids: &[1, 2], labels: &[1, 2], adapter: 0, loss_weight: 1.0 }];
    let mut short = lora.clone();
    short.layers.pop();
    let e = furnace_train::train_pass(&base, &[furnace_train::AdapterRef { lora: &short, dropout_seed: 0 }], &seqs).unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    let mut wide = lora.clone();
    let p = wide.layers[0][0].as_mut().unwrap();
    p.inp += 1;
    p.a.extend(vec![0.0; p.r]);
    let e = furnace_train::train_pass(&base, &[furnace_train::AdapterRef { lora: &wide, dropout_seed: 0 }], &seqs).unwrap_err();
    assert!(e.to_string().contains("layer 0 q_proj"), "{e}");
    Ok(())
}

#[test]
fn sft_step_on_a_bf16_or_quantized_base_stays_close_to_peft() -> anyhow::Result<()> {
    let (ids, labels, want_loss) = sft_case();
    let reference = reference_grads();
    for dt in [WeightDType::Bf16, WeightDType::Quantized] {
        let m = LoadedModel::load(&smollm2(), dt)?;
        let base = FrozenBase::new(&m.model)?;
        let lora = TrainableLora::from_adapter(&m.model, &PeftAdapter::load(&testdata().join("lora_adapter"))?)?;
        let (loss, grads) = sft(&base, &lora, &ids, &labels)?;
        // Documented tolerance for a non-f32 base: the frozen GEMMs run in bf16 with f32
        // accumulation (weights and activations rounded to bf16), forward and backward:
        // loss within 2e-2, gradients within 5% relative L2.
        assert!((loss - want_loss).abs() < 2e-2, "{dt:?}: loss {loss} vs {want_loss}");
        let named = grads.named();
        for (key, want) in &reference {
            let key = key.replace(".default.weight", ".weight");
            let got = named.iter().find(|(k, ..)| *k == key).expect("grad");
            let err = rel_l2(got.2, &want.flatten_all()?.to_vec1::<f32>()?);
            eprintln!("{dt:?} {key}: relative L2 {err}");
            assert!(err < 0.05, "{dt:?} {key}: relative L2 error {err}");
        }
    }
    Ok(())
}
