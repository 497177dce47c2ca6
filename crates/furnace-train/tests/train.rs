//! Optimizer, schedules, clipping, LoRA init/save, finite-difference gradients, and a loss
//! that falls when training on the tiny checkpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{Device, Tensor, Var};
use furnace_model::lora::LoraConfig;
use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
use furnace_train::*;
mod common;

use common::*;


fn tiny() -> LoadedModel {
    LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).expect("tiny-llama")
}

fn config(r: usize) -> LoraConfig {
    serde_json::from_value(serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": ["all-linear"]})).expect("config")
}

#[test]
fn adamw_first_step_matches_the_closed_form() -> anyhow::Result<()> {
    let p = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?)?;
    let c = Tensor::new(&[3.0f32, -0.5, 0.0], &Device::Cpu)?;
    let grads = (p.as_tensor() * &c)?.sum_all()?.backward()?;
    let mut opt = AdamW::new(vec![p.clone()], AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() })?;
    opt.step(&grads, 0.1)?;
    // After one step, m_hat = g and v_hat = g^2, so the update is sign(g) (0 where g = 0).
    let got = p.as_tensor().to_vec1::<f32>()?;
    let want = [1.0 * (1.0 - 0.1 * 0.01) - 0.1, -2.0 * (1.0 - 0.001) + 0.1, 0.5 * (1.0 - 0.001)];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    assert_eq!(opt.step, 1);
    Ok(())
}

#[test]
fn schedules_warm_up_and_decay() {
    let s = |kind| Schedule { kind, lr: 1.0, warmup_steps: 10, total_steps: 110 };
    for kind in [ScheduleKind::Constant, ScheduleKind::Linear, ScheduleKind::Cosine] {
        assert_eq!(s(kind).lr_at(0), 0.0);
        assert!((s(kind).lr_at(5) - 0.5).abs() < 1e-12);
        assert!((s(kind).lr_at(10) - 1.0).abs() < 1e-12);
    }
    assert_eq!(s(ScheduleKind::Constant).lr_at(100), 1.0);
    assert!((s(ScheduleKind::Linear).lr_at(60) - 0.5).abs() < 1e-12);
    assert!((s(ScheduleKind::Cosine).lr_at(60) - 0.5).abs() < 1e-12);
    assert!(s(ScheduleKind::Cosine).lr_at(110).abs() < 1e-12);
    assert!(s(ScheduleKind::Linear).lr_at(500).abs() < 1e-12);
}

#[test]
fn clipping_scales_to_the_max_norm() -> anyhow::Result<()> {
    let p = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &Device::Cpu)?)?;
    let c = Tensor::new(&[3.0f32, 4.0], &Device::Cpu)?;
    let mut grads = (p.as_tensor() * &c)?.sum_all()?.backward()?;
    let norm = clip_grad_norm(&mut grads, std::slice::from_ref(&p), 1.0)?;
    assert!((norm - 5.0).abs() < 1e-6);
    let g = grads.get(p.as_tensor()).expect("grad").to_vec1::<f32>()?;
    assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    Ok(())
}

#[test]
fn new_adapter_starts_at_the_base_model_with_peft_init() -> anyhow::Result<()> {
    let mut m = tiny();
    let ids = [1604u32, 3987, 46477, 24];
    let base = m.model.logits_all(&ids)?;
    let lora = TrainableLora::new(&mut m.model, config(4), LoraInit::KaimingUniform, 7)?;
    assert_eq!(lora.vars.len(), 2 * 7 * m.model.layers.len());
    let same = (m.model.logits_all(&ids)? - &base)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert_eq!(same, 0.0, "B = 0 leaves the model unchanged");
    let (key, a) = &lora.vars[0];
    assert!(key.ends_with("lora_A.weight"), "{key}");
    let bound = 1.0 / (a.dim(1)? as f32).sqrt();
    let vals = a.as_tensor().flatten_all()?.to_vec1::<f32>()?;
    assert!(vals.iter().all(|v| v.abs() <= bound) && vals.iter().any(|v| v.abs() > bound / 2.0));
    // Same seed, same factors.
    let mut m2 = tiny();
    let again = TrainableLora::new(&mut m2.model, config(4), LoraInit::KaimingUniform, 7)?;
    assert_eq!(again.vars[0].1.as_tensor().to_vec2::<f32>()?, a.as_tensor().to_vec2::<f32>()?);
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> anyhow::Result<()> {
    let mut m = tiny();
    let lora = TrainableLora::new(&mut m.model, config(2), LoraInit::Gaussian, 3)?;
    // Make B non-zero so that gradients reach A too.
    for (k, v) in &lora.vars {
        if k.contains("lora_B") {
            v.set(&(v.as_tensor().ones_like()? * 0.05)?)?;
        }
    }
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let labels = [-100i64, -100, 46477, 24, 94, 727];
    let loss = sft_loss(&m.model, &ids, &labels)?;
    let grads = loss.backward()?;
    let eps = 1e-2f32;
    for idx in [0usize, 5, 14, 27] {
        let (key, var) = &lora.vars[idx];
        let g = grads.get(var.as_tensor()).expect("grad").flatten_all()?.to_vec1::<f32>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let pos = 1usize.min(base.len() - 1);
        let eval = |delta: f32| -> anyhow::Result<f64> {
            let mut w = base.clone();
            w[pos] += delta;
            var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu)?)?;
            Ok(sft_loss(&m.model, &ids, &labels)?.to_scalar::<f32>()? as f64)
        };
        let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps as f64);
        var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu)?)?;
        let an = g[pos] as f64;
        assert!((fd - an).abs() <= 2e-3 + 2e-2 * an.abs(), "{key}[{pos}]: finite difference {fd} vs backward {an}");
    }
    Ok(())
}


#[test]
fn loss_falls_when_training_the_real_model() -> anyhow::Result<()> {
    let (ids, labels, _) = sft_case();
    let mut m = LoadedModel::load(&smollm2(), WeightDType::F32)?;
    let lora = TrainableLora::new(&mut m.model, config(8), LoraInit::KaimingUniform, 1)?;
    let mut opt = AdamW::new(lora.params(), AdamWConfig { lr: 2e-3, ..Default::default() })?;
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = sft_loss(&m.model, &ids, &labels)?;
        losses.push(loss.to_scalar::<f32>()?);
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, &lora.params(), 1.0)?;
        opt.step(&grads, 2e-3)?;
    }
    assert!(losses[7] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    Ok(())
}

#[test]
fn saved_adapter_reloads_identically() -> anyhow::Result<()> {
    let mut m = tiny();
    let lora = TrainableLora::new(&mut m.model, config(8), LoraInit::KaimingUniform, 1)?;
    let mut opt = AdamW::new(lora.params(), AdamWConfig { lr: 1e-2, ..Default::default() })?;
    let ids = [1604u32, 3987, 46477, 24, 94, 727, 472, 1003, 1792];
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i < 3 { -100 } else { t as i64 }).collect();
    for _ in 0..3 {
        let grads = sft_loss(&m.model, &ids, &labels)?.backward()?;
        opt.step(&grads, 1e-2)?;
    }
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("adapter");
    lora.save_peft(&out, "tiny-llama")?;
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // PEFT cannot load `all-linear` from a saved config: the list is written expanded.
    assert_eq!(cfg["target_modules"].as_array().expect("list").len(), 7);
    assert!(!cfg["target_modules"].to_string().contains("all-linear"));
    let trained = m.model.logits_all(&ids)?;
    let mut fresh = tiny();
    let before = fresh.model.logits_all(&ids)?;
    fresh.model.attach_adapter(&PeftAdapter::load(&out)?)?;
    let after = fresh.model.logits_all(&ids)?;
    let moved = (&after - before)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(moved > 0.0, "training changed the adapter");
    let diff = (after - trained)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    // Saving again replaces the directory as a whole and leaves no temp dirs behind.
    lora.save_peft(&out, "tiny-llama")?;
    let names: Vec<String> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["adapter"]);
    Ok(())
}
