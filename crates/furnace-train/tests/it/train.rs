//! Optimizer, schedules, clipping, LoRA init/save, finite-difference gradients of the whole
//! training pass, and a loss that falls when training the real model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
use furnace_model::lora::LoraConfig;
use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
use furnace_train::*;

use common::*;

fn tiny() -> LoadedModel {
    LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).expect("tiny-llama")
}

fn config(r: usize) -> LoraConfig {
    serde_json::from_value(serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": ["all-linear"]})).expect("config")
}

#[test]
fn adamw_first_step_matches_the_closed_form() -> anyhow::Result<()> {
    let mut p = vec![1.0f32, -2.0, 0.5];
    let g = [3.0f32, -0.5, 0.0];
    let mut opt = AdamW::new(&[3], AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() });
    opt.step(&mut [&mut p], &[&g], 0.1)?;
    // After one step, m_hat = g and v_hat = g^2, so the update is sign(g) (0 where g = 0).
    let want = [1.0 * (1.0 - 0.1 * 0.01) - 0.1, -2.0 * (1.0 - 0.001) + 0.1, 0.5 * (1.0 - 0.001)];
    for (a, w) in p.iter().zip(want) {
        assert!((a - w).abs() < 1e-5, "{p:?} vs {want:?}");
    }
    assert_eq!(opt.step, 1);
    assert!(opt.step(&mut [&mut p], &[&g, &g], 0.1).is_err(), "mismatched gradients are refused");
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
fn clipping_scales_to_the_max_norm() {
    let mut a = vec![3.0f32];
    let mut b = vec![4.0f32];
    let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
    assert!((norm - 5.0).abs() < 1e-6);
    assert!((a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5, "{a:?} {b:?}");
    let norm = clip_grad_norm(&mut [&mut a, &mut b], 10.0);
    assert!((norm - 1.0).abs() < 1e-5 && (a[0] - 0.6).abs() < 1e-5, "below the max nothing changes");
}

#[test]
fn new_adapter_starts_at_the_base_model_with_peft_init() -> anyhow::Result<()> {
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let ids = [1604u32, 3987, 46477, 24];
    let plain = engine::logits(&base, None, &ids)?;
    let lora = TrainableLora::new(&m.model, config(4), LoraInit::KaimingUniform, 7)?;
    let named = lora.named();
    assert_eq!(named.len(), 2 * 7 * m.model.layers.len());
    assert_eq!(engine::logits(&base, Some(&lora), &ids)?, plain, "B = 0 leaves the model unchanged");
    let (key, shape, a) = &named[0];
    assert!(key.ends_with("layers.0.self_attn.q_proj.lora_A.weight"), "{key}");
    let bound = 1.0 / (shape[1] as f32).sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound / 2.0));
    // Same seed, same factors; another seed, others.
    assert_eq!(TrainableLora::new(&m.model, config(4), LoraInit::KaimingUniform, 7)?, lora);
    assert_ne!(TrainableLora::new(&m.model, config(4), LoraInit::KaimingUniform, 8)?, lora);
    // Bad configurations are refused.
    assert!(TrainableLora::new(&m.model, config(0), LoraInit::KaimingUniform, 7).is_err());
    let bad: LoraConfig = serde_json::from_value(serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}))?;
    assert!(TrainableLora::new(&m.model, bad, LoraInit::KaimingUniform, 7).unwrap_err().to_string().contains("c_attn"));
    Ok(())
}

/// A trained-looking adapter: B non-zero so gradients reach A and every layer.
fn nonzero_lora(m: &LoadedModel, cfg: LoraConfig) -> TrainableLora {
    let mut lora = TrainableLora::new(&m.model, cfg, LoraInit::Gaussian, 3).unwrap();
    let mut rng = furnace_model::rng::Rng::new(11);
    for p in lora.layers.iter_mut().flatten().flatten() {
        p.b.iter_mut().for_each(|v| *v = (rng.normal() * 0.05) as f32);
    }
    lora
}

fn check_fd(base: &FrozenBase, lora: &TrainableLora, ids: &[u32], labels: &[i64]) -> anyhow::Result<()> {
    let (_, grads) = sft(base, lora, ids, labels)?;
    let gnamed = grads.named();
    // Small enough for the curvature of B factors (1e-2 is off by 2% there), large enough
    // for f32 losses.
    let eps = 3e-3f32;
    let n_tensors = lora.named().len();
    for idx in [0usize, 5, 13, n_tensors - 2, n_tensors - 1] {
        let (key, _, g) = &gnamed[idx];
        for pos in [0usize, 1, g.len() - 1] {
            let eval = |delta: f32| -> anyhow::Result<f64> {
                let mut l = lora.clone();
                l.tensors_mut()[idx][pos] += delta;
                Ok(sft(base, &l, ids, labels)?.0)
            };
            let fd = (eval(eps)? - eval(-eps)?) / (2.0 * eps as f64);
            let an = g[pos] as f64;
            assert!((fd - an).abs() <= 2e-3 + 2e-2 * an.abs(), "{key}[{pos}]: finite difference {fd} vs backward {an}");
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> anyhow::Result<()> {
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let labels = [-100i64, -100, 46477, 24, 94, 727];
    check_fd(&base, &nonzero_lora(&m, config(2)), &ids, &labels)?;
    // rsLoRA scaling and a subset of modules.
    let rs: LoraConfig = serde_json::from_value(
        serde_json::json!({"r": 3, "lora_alpha": 5, "use_rslora": true, "target_modules": ["k_proj", "o_proj", "up_proj", "down_proj"]}),
    )?;
    check_fd(&base, &nonzero_lora(&m, rs), &ids, &labels)?;
    // Grouped-query attention with biases (qwen2).
    let q = LoadedModel::load(&testdata().join("tiny-qwen2"), WeightDType::F32)?;
    let qbase = FrozenBase::new(&q.model)?;
    check_fd(&qbase, &nonzero_lora(&q, config(2)), &ids, &labels)?;
    Ok(())
}

#[test]
fn sequences_in_one_batch_do_not_see_each_other() -> anyhow::Result<()> {
    // Two sequences in one ragged pass give the same losses and the summed gradients of two
    // separate passes: no attention across sequences, positions restart per sequence.
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let lora = nonzero_lora(&m, config(2));
    let a = (vec![1604u32, 3987, 46477, 24, 94], vec![-100i64, 3987, 46477, 24, 94]);
    let b = (vec![727u32, 472, 1003], vec![-100i64, -100, 1003]);
    let one = |s: &[(&[u32], &[i64])]| {
        let seqs: Vec<SeqRef> = s.iter().map(|(ids, labels)| SeqRef { ids, labels, adapter: 0, loss_weight: 0.5 }).collect();
        train_pass(&base, &[AdapterRef { lora: &lora, dropout_seed: 0 }], &seqs).unwrap()
    };
    let both = one(&[(&a.0, &a.1), (&b.0, &b.1)]);
    let ra = one(&[(&a.0, &a.1)]);
    let rb = one(&[(&b.0, &b.1)]);
    assert_eq!(both.tokens[0], 5);
    assert!((both.loss_sum[0] - ra.loss_sum[0] - rb.loss_sum[0]).abs() < 1e-4);
    let mut sum = ra.grads[0].clone();
    sum.add(&rb.grads[0]);
    for ((k, _, g), (_, _, w)) in both.grads[0].named().iter().zip(sum.named()) {
        assert!(max_diff(g, w) < 1e-5, "{k}");
    }
    Ok(())
}

#[test]
fn dropout_masks_inputs_of_the_adapter_only_when_training() -> anyhow::Result<()> {
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let cfg: LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 2, "lora_alpha": 4, "lora_dropout": 0.3, "target_modules": ["all-linear"]}))?;
    let lora = nonzero_lora(&m, cfg);
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let labels = [-100i64, -100, 46477, 24, 94, 727];
    let run = |seed: u64| {
        let seqs = [SeqRef { ids: &ids, labels: &labels, adapter: 0, loss_weight: 0.25 }];
        train_pass(&base, &[AdapterRef { lora: &lora, dropout_seed: seed }], &seqs).unwrap()
    };
    let (a, a2, b) = (run(1), run(1), run(2));
    assert_eq!(a.loss_sum, a2.loss_sum, "the same seed gives the same masks");
    assert_ne!(a.loss_sum, b.loss_sum, "another seed gives other masks");
    // Evaluation never drops.
    let seqs = [SeqRef { ids: &ids, labels: &labels, adapter: 0, loss_weight: 0.0 }];
    let e1 = engine::eval_pass(&base, &[AdapterRef { lora: &lora, dropout_seed: 1 }], &seqs)?;
    let e2 = engine::eval_pass(&base, &[AdapterRef { lora: &lora, dropout_seed: 2 }], &seqs)?;
    assert_eq!(e1.loss_sum, e2.loss_sum);
    // With a fixed mask the pass is differentiable: finite differences of the dropped loss.
    let g = &a.grads[0].named()[1];
    let eps = 1e-2f32;
    let eval = |d: f32| {
        let mut l = lora.clone();
        l.tensors_mut()[1][0] += d;
        let seqs = [SeqRef { ids: &ids, labels: &labels, adapter: 0, loss_weight: 0.25 }];
        train_pass(&base, &[AdapterRef { lora: &l, dropout_seed: 1 }], &seqs).unwrap().loss_sum[0] * 0.25
    };
    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps as f64);
    assert!((fd - g.2[0] as f64).abs() < 2e-3 + 2e-2 * fd.abs(), "{fd} vs {}", g.2[0]);
    Ok(())
}

#[test]
fn loss_falls_when_training_the_real_model() -> anyhow::Result<()> {
    let (ids, labels, _) = sft_case();
    let m = LoadedModel::load(&smollm2(), WeightDType::Quantized)?;
    let base = FrozenBase::new(&m.model)?;
    let mut lora = TrainableLora::new(&m.model, config(8), LoraInit::KaimingUniform, 1)?;
    let sizes: Vec<usize> = lora.named().iter().map(|t| t.2.len()).collect();
    let mut opt = AdamW::new(&sizes, AdamWConfig { lr: 2e-3, ..Default::default() });
    let mut losses = Vec::new();
    for _ in 0..8 {
        let (loss, mut grads) = sft(&base, &lora, &ids, &labels)?;
        losses.push(loss);
        let mut g = grads.tensors_mut();
        clip_grad_norm(&mut g, 1.0);
        let g: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
        opt.step(&mut lora.tensors_mut(), &g, 2e-3)?;
    }
    assert!(losses[7] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    Ok(())
}

#[test]
fn saved_adapter_reloads_identically() -> anyhow::Result<()> {
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let mut lora = TrainableLora::new(&m.model, config(8), LoraInit::KaimingUniform, 1)?;
    let sizes: Vec<usize> = lora.named().iter().map(|t| t.2.len()).collect();
    let mut opt = AdamW::new(&sizes, AdamWConfig { lr: 1e-2, ..Default::default() });
    let ids = [1604u32, 3987, 46477, 24, 94, 727, 472, 1003, 1792];
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i < 3 { -100 } else { t as i64 }).collect();
    for _ in 0..3 {
        let (_, grads) = sft(&base, &lora, &ids, &labels)?;
        let g: Vec<&[f32]> = grads.named().into_iter().map(|t| t.2).collect();
        opt.step(&mut lora.tensors_mut(), &g, 1e-2)?;
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
    let trained = engine::logits(&base, Some(&lora), &ids)?;
    let adapter = PeftAdapter::load(&out)?;
    assert!(adapter.tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let reloaded = TrainableLora::from_adapter(&m.model, &adapter)?;
    assert_eq!(reloaded.layers, lora.layers);
    assert_eq!(reloaded.scale, lora.scale);
    assert_eq!(engine::logits(&base, Some(&reloaded), &ids)?, trained);
    // The runtime with the adapter attached gives the same logits.
    let mut fresh = tiny();
    let before = fresh.model.logits_all(&ids)?.flatten_all()?.to_vec1::<f32>()?;
    let id = fresh.model.add_adapter(&adapter)?;
    let after = fresh.model.logits_all_with(&ids, Some(id))?.flatten_all()?.to_vec1::<f32>()?;
    assert!(max_diff(&after, &before) > 0.0, "training changed the adapter");
    assert!(max_diff(&after, &trained) < 1e-4);
    // Saving again replaces the directory as a whole and leaves no temp dirs behind.
    lora.save_peft(&out, "tiny-llama")?;
    let names: Vec<String> = std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["adapter"]);
    Ok(())
}
