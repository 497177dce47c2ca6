//! One SFT step against the PEFT reference: loss and LoRA gradients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
use furnace_train::{causal_lm_logits, sft_loss, TrainableLora};
mod common;

use common::*;



#[test]
fn differentiable_forward_matches_the_runtime() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-qwen2"), WeightDType::F32)?;
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let a = causal_lm_logits(&m.model, &ids)?;
    let b = m.model.logits_all(&ids)?;
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "{diff}");
    Ok(())
}

#[test]
fn sft_step_loss_and_lora_gradients_match_peft() -> anyhow::Result<()> {
    let (ids, labels, want_loss) = sft_case();

    let mut m = LoadedModel::load(&smollm2(), WeightDType::F32)?;
    let adapter = PeftAdapter::load(&testdata().join("lora_adapter"))?;
    let lora = TrainableLora::attach(&mut m.model, &adapter)?;
    let loss = sft_loss(&m.model, &ids, &labels)?;
    let got_loss = loss.to_scalar::<f32>()? as f64;
    assert!((got_loss - want_loss).abs() < 1e-4, "loss {got_loss} vs {want_loss}");

    let grads = loss.backward()?;
    let reference = candle_core::safetensors::load(testdata().join("sft_step_grads.safetensors"), &candle_core::Device::Cpu)?;
    assert_eq!(reference.len(), 6);
    for (key, want) in &reference {
        let key = key.replace(".default.weight", ".weight");
        let var = &lora.vars.iter().find(|(k, _)| *k == key).unwrap_or_else(|| panic!("no var {key}")).1;
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}"));
        let err = (got - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(norm > 0.0);
        assert!(err / norm < 1e-3, "{key}: relative L2 error {}", err / norm);
    }
    Ok(())
}

#[test]
fn bad_training_input_is_an_error() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    assert!(sft_loss(&m.model, &[1, 2, 3], &[-100, -100, -100]).is_err());
    assert!(sft_loss(&m.model, &[1, 2, 3], &[1, 2]).is_err());
    assert!(sft_loss(&m.model, &[], &[]).is_err());
    assert!(sft_loss(&m.model, &[1, 2, 3], &[-100, 5, 999_999]).is_err());
    Ok(())
}

#[test]
fn frozen_linear_backward_matches_finite_differences_and_matmul() -> anyhow::Result<()> {
    use candle_core::{Device, Tensor, Var};
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let lin = &m.model.layers[0].mlp.down_proj; // [64, 128]
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, lin.in_features), &Device::Cpu)?)?;
    let c = Tensor::randn(0f32, 1.0, (3, lin.out_features), &Device::Cpu)?;
    let y = furnace_train::train_linear(lin, x.as_tensor())?;
    let plain = lin.forward(x.as_tensor())?;
    assert_eq!((&y - &plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?, 0.0);
    let grads = (y * &c)?.sum_all()?.backward()?;
    let g = grads.get(x.as_tensor()).expect("input gradient").to_vec2::<f32>()?;
    let base = x.as_tensor().to_vec2::<f32>()?;
    let eps = 1e-2f32;
    for &(i, j) in &[(0usize, 0usize), (1, 17), (2, 127)] {
        let f = |d: f32| -> anyhow::Result<f64> {
            let mut v = base.clone();
            v[i][j] += d;
            let t = Tensor::new(v, &Device::Cpu)?;
            Ok((lin.forward(&t)? * &c)?.sum_all()?.to_scalar::<f32>()? as f64)
        };
        let fd = (f(eps)? - f(-eps)?) / (2.0 * eps as f64);
        assert!((fd - g[i][j] as f64).abs() < 1e-2 * (1.0 + fd.abs()), "({i},{j}): {fd} vs {}", g[i][j]);
    }
    Ok(())
}

#[test]
fn sft_step_on_a_quantized_base_stays_close_to_peft() -> anyhow::Result<()> {
    let (ids, labels, want_loss) = sft_case();
    let reference = candle_core::safetensors::load(testdata().join("sft_step_grads.safetensors"), &candle_core::Device::Cpu)?;
    for dt in [WeightDType::Bf16, WeightDType::Quantized] {
        let mut m = LoadedModel::load(&smollm2(), dt)?;
        let lora = TrainableLora::attach(&mut m.model, &PeftAdapter::load(&testdata().join("lora_adapter"))?)?;
        let loss = sft_loss(&m.model, &ids, &labels)?;
        let got = loss.to_scalar::<f32>()? as f64;
        // Documented tolerance for a non-f32 base: training dequantizes on the fly and
        // multiplies in f32, so only the bf16 rounding of the stored weights differs: loss
        // within 2e-2, gradients within 5% relative L2 (seen: 1-2%).
        assert!((got - want_loss).abs() < 2e-2, "{dt:?}: loss {got} vs {want_loss}");
        let grads = loss.backward()?;
        for (key, want) in &reference {
            let key = key.replace(".default.weight", ".weight");
            let var = &lora.vars.iter().find(|(k, _)| *k == key).expect("var").1;
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dt:?}: no gradient for {key} (cut by the frozen base?)"));
            let err = (g - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            eprintln!("{dt:?} {key}: relative L2 {}", err / norm);
            assert!(err / norm < 0.05, "{dt:?} {key}: relative L2 error {}", err / norm);
        }
    }
    Ok(())
}
