//! The training loop: gradient accumulation equivalence, exact resume from a checkpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use furnace_model::lora::LoraConfig;
use furnace_model::{LoadedModel, WeightDType};
use furnace_train::*;

fn tiny() -> LoadedModel {
    LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).expect("tiny-llama")
}

fn examples() -> Vec<Example> {
    (0..7u32)
        .map(|i| {
            let ids: Vec<u32> = (0..6 + i).map(|j| 100 + 37 * i + 11 * j).collect();
            let labels = ids.iter().enumerate().map(|(j, &t)| if j < 2 { -100 } else { t as i64 }).collect();
            Example { ids, labels, ..Default::default() }
        })
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        optimizer: AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() },
        schedule: ScheduleKind::Cosine,
        warmup_steps: 1,
        batch_size: 2,
        grad_accum: 2,
        max_steps: Some(6),
        ..Default::default()
    }
}

fn new_trainer(m: &LoadedModel, cfg: TrainConfig) -> Trainer {
    let lc: LoraConfig =
        serde_json::from_value(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]})).unwrap();
    let lora = TrainableLora::new(&m.model, lc, LoraInit::KaimingUniform, 5).unwrap();
    Trainer::new(cfg, lora, &examples()).unwrap()
}

#[test]
fn resumed_training_equals_uninterrupted_training() -> anyhow::Result<()> {
    let data = examples();
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let mut straight = new_trainer(&m, config());
    let mut want = Vec::new();
    while !straight.finished() {
        want.push(straight.step(&base, &data)?.loss);
    }
    assert_eq!(want.len(), 6);

    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("checkpoint-3");
    let mut first = new_trainer(&m, config());
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(first.step(&base, &data)?.loss);
    }
    first.save_checkpoint(&ckpt, "tiny-llama")?;
    drop(first);
    let m2 = tiny();
    let base2 = FrozenBase::new(&m2.model)?;
    let mut resumed = Trainer::resume(&m2.model, &ckpt, config(), &data)?;
    assert_eq!(resumed.steps_done(), 3);
    while !resumed.finished() {
        got.push(resumed.step(&base2, &data)?.loss);
    }
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "resumed {got:?} vs straight {want:?}");
    }
    // Final adapters agree too.
    let ids = &data[0].ids;
    let d = max_diff(&engine::logits(&base, Some(&straight.lora), ids)?, &engine::logits(&base2, Some(&resumed.lora), ids)?);
    assert!(d < 1e-5, "{d}");
    Ok(())
}

#[test]
fn gradient_accumulation_matches_a_bigger_batch() -> anyhow::Result<()> {
    let data = examples();
    let run = |batch: usize, accum: usize| -> anyhow::Result<(f64, f32)> {
        let m = tiny();
        let base = FrozenBase::new(&m.model)?;
        let mut t = new_trainer(&m, TrainConfig { batch_size: batch, grad_accum: accum, max_steps: Some(1), ..config() });
        let s = t.step(&base, &data)?;
        let probe: f32 = engine::logits(&base, Some(&t.lora), &data[1].ids)?.iter().sum();
        Ok((s.loss, probe))
    };
    let (l1, p1) = run(4, 1)?;
    let (l2, p2) = run(2, 2)?;
    let (l3, p3) = run(1, 4)?;
    assert!((l1 - l2).abs() < 1e-6 && (l1 - l3).abs() < 1e-6, "{l1} {l2} {l3}");
    assert!((p1 - p2).abs() < 1e-3 && (p1 - p3).abs() < 1e-3, "{p1} {p2} {p3}");
    Ok(())
}

#[test]
fn eval_loss_and_bad_settings() -> anyhow::Result<()> {
    let data = examples();
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let before = eval_loss(&base, None, &data)?;
    assert!(before > 5.0, "{before}");
    let mut t = new_trainer(&m, TrainConfig { max_steps: Some(8), ..config() });
    assert!((eval_loss(&base, Some(&t.lora), &data)? - before).abs() < 1e-9, "a fresh adapter is the base model");
    while !t.finished() {
        t.step(&base, &data)?;
    }
    assert!(eval_loss(&base, Some(&t.lora), &data)? < before);
    let lc: LoraConfig = serde_json::from_value(serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))?;
    let lora = TrainableLora::new(&m.model, lc, LoraInit::KaimingUniform, 1)?;
    assert!(Trainer::new(config(), lora, &[]).is_err());
    Ok(())
}

#[test]
fn packing_fills_micro_batches_to_the_token_budget() -> anyhow::Result<()> {
    // Example lengths 6..=12 (63 tokens); a budget of 20 tokens packs 2 or 3 per micro-batch.
    let data = examples();
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let packed = TrainConfig { packing: Some(20), grad_accum: 1, max_steps: None, epochs: 1, ..config() };
    let steps = Trainer::steps_per_epoch(&packed, &data);
    assert!((3..=5).contains(&steps), "{steps} packed micro-batches for 63 tokens in 20-token budgets");
    let mut t = new_trainer(&m, packed.clone());
    assert_eq!(t.total_steps(), steps);
    let mut seen = 0;
    while !t.finished() {
        let s = t.step(&base, &data)?;
        assert!(s.tokens <= 20, "{} tokens over the budget", s.tokens);
        seen += s.tokens;
    }
    assert_eq!(seen, data.iter().map(|e| e.ids.len()).sum::<usize>(), "one epoch visits every example once");
    // Without packing a micro-batch is batch_size examples.
    assert_eq!(Trainer::steps_per_epoch(&TrainConfig { grad_accum: 1, ..config() }, &data), 4);
    // Grouping by length orders each window longest first, and still visits everything.
    let grouped = TrainConfig { group_by_length: true, batch_size: 1, grad_accum: 1, max_steps: Some(7), ..config() };
    let mut g = new_trainer(&m, grouped);
    let lens: Vec<usize> = (0..7).map(|_| g.step(&base, &data).unwrap().tokens).collect();
    assert_eq!(lens, vec![12, 11, 10, 9, 8, 7, 6]);
    Ok(())
}

#[test]
fn runs_trained_in_one_fused_pass_match_runs_trained_alone() -> anyhow::Result<()> {
    let data = examples();
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    // Three runs that differ in rank, alpha, targets, dropout, learning rate, schedule,
    // batch size, accumulation and seed.
    let make = |k: usize| -> Trainer {
        let (lora, cfg) = match k {
            0 => (serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}), config()),
            1 => (
                serde_json::json!({"r": 8, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["all-linear"]}),
                TrainConfig {
                    batch_size: 3,
                    grad_accum: 1,
                    seed: 9,
                    schedule: ScheduleKind::Linear,
                    optimizer: AdamWConfig { lr: 3e-3, ..Default::default() },
                    ..config()
                },
            ),
            _ => (
                serde_json::json!({"r": 2, "lora_alpha": 16, "use_rslora": true, "target_modules": ["o_proj", "up_proj"]}),
                TrainConfig { batch_size: 1, grad_accum: 3, seed: 3, ..config() },
            ),
        };
        let lc: LoraConfig = serde_json::from_value(lora).unwrap();
        let l = TrainableLora::new(&m.model, lc, LoraInit::KaimingUniform, 10 + k as u64).unwrap();
        Trainer::new(TrainConfig { max_steps: Some(4), ..cfg }, l, &data).unwrap()
    };
    let mut alone = Vec::new();
    for k in 0..3 {
        let mut t = make(k);
        alone.push((0..4).map(|_| t.step(&base, &data).unwrap().loss).collect::<Vec<_>>());
    }
    let mut runs: Vec<Trainer> = (0..3).map(make).collect();
    let mut fused = vec![Vec::new(); 3];
    for _ in 0..4 {
        let mut refs: Vec<&mut Trainer> = runs.iter_mut().collect();
        for (k, s) in fused_step(&base, &mut refs, &data)?.into_iter().enumerate() {
            fused[k].push(s.loss);
        }
    }
    for k in 0..3 {
        for (a, f) in alone[k].iter().zip(&fused[k]) {
            assert!((a - f).abs() <= 1e-4 * a.abs(), "run {k}: alone {:?} vs fused {:?}", alone[k], fused[k]);
        }
    }
    // The runs really differ.
    assert!((alone[0][3] - alone[1][3]).abs() > 1e-3);
    Ok(())
}

#[test]
fn fused_runs_over_the_row_budget_split_into_several_passes_with_the_same_result() -> anyhow::Result<()> {
    // Three runs of one 400-token example per micro-batch: 1200 rows, over the 1024-row
    // budget of one fused pass.
    const { assert!(3 * 400 > FUSED_MAX_ROWS && 2 * 400 <= FUSED_MAX_ROWS) };
    let data: Vec<Example> = (0..3u32)
        .map(|i| {
            let ids: Vec<u32> = (0..400).map(|j| 100 + (37 * i + 11 * j) % 5000).collect();
            let labels = ids.iter().map(|&t| t as i64).collect();
            Example { ids, labels, ..Default::default() }
        })
        .collect();
    let m = tiny();
    let base = FrozenBase::new(&m.model)?;
    let make = |k: u64| {
        let lc: LoraConfig =
            serde_json::from_value(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
                .unwrap();
        let lora = TrainableLora::new(&m.model, lc, LoraInit::KaimingUniform, k).unwrap();
        Trainer::new(TrainConfig { batch_size: 1, grad_accum: 1, max_steps: Some(2), seed: k, ..config() }, lora, &data).unwrap()
    };
    let want: Vec<f64> = (0..3).map(|k| make(k).step(&base, &data).unwrap().loss).collect();
    let mut runs: Vec<Trainer> = (0..3).map(make).collect();
    let mut refs: Vec<&mut Trainer> = runs.iter_mut().collect();
    let got: Vec<f64> = fused_step(&base, &mut refs, &data)?.iter().map(|s| s.loss).collect();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{got:?} vs {want:?}");
    }
    Ok(())
}

#[test]
fn chunks_split_the_data_once_and_steps_never_span_two_chunks() -> anyhow::Result<()> {
    let m = tiny();
    let frozen = FrozenBase::new(&m.model)?;
    let ex = examples();
    let all_tokens: usize = ex.iter().map(|e| e.ids.len()).sum();
    // 7 examples in 3 chunks of 2, 2 and 3; batch 2 x accumulation 2: one step per chunk.
    let cfg = TrainConfig { num_chunks: 3, chunk_seed: 9, max_steps: None, epochs: 2, ..config() };
    assert_eq!(Trainer::steps_per_epoch(&cfg, &ex), 3);
    let mut per_seed = Vec::new();
    for seed in [1u64, 2] {
        let mut t = new_trainer(&m, TrainConfig { seed, ..cfg.clone() });
        assert_eq!(t.total_steps(), 6);
        assert!(t.at_chunk_boundary());
        let mut chunk_tokens = Vec::new();
        while !t.finished() {
            let s = t.step(&frozen, &ex)?;
            assert!(t.at_chunk_boundary(), "step {} ended inside a chunk", s.step);
            assert_eq!(t.chunks_done(), s.step);
            chunk_tokens.push(s.tokens);
        }
        // Each epoch sees every example once, and a chunk holds the same examples in both
        // epochs (the split is fixed; only the order inside a chunk changes).
        assert_eq!(chunk_tokens[..3].iter().sum::<usize>(), all_tokens);
        assert_eq!(chunk_tokens[..3], chunk_tokens[3..]);
        per_seed.push(chunk_tokens);
    }
    // The split depends on the chunk seed only: runs with other seeds share the chunks.
    assert_eq!(per_seed[0], per_seed[1]);
    assert!(Trainer::new(TrainConfig { num_chunks: 8, ..cfg }, new_trainer(&m, config()).lora, &ex).is_err());
    Ok(())
}

#[test]
fn a_warm_fork_continues_exactly_where_its_parent_stands() -> anyhow::Result<()> {
    let m = tiny();
    let frozen = FrozenBase::new(&m.model)?;
    let ex = examples();
    let cfg = TrainConfig { num_chunks: 3, chunk_seed: 4, ..config() };
    let mut parent = new_trainer(&m, cfg.clone());
    for _ in 0..2 {
        parent.step(&frozen, &ex)?;
    }
    let mut fork = parent.fork(cfg.clone(), parent.lora.config.clone(), &ex)?;
    assert_eq!(fork.position(), parent.position());
    assert_eq!(fork.steps_done(), 2);
    for _ in 0..3 {
        let (a, b) = (parent.step(&frozen, &ex)?, fork.step(&frozen, &ex)?);
        assert_eq!(a, b);
    }
    // Another learning rate changes the next steps but not the position.
    let mut hot = parent.fork(
        TrainConfig { optimizer: AdamWConfig { lr: 5e-2, ..cfg.optimizer.clone() }, ..cfg.clone() },
        parent.lora.config.clone(),
        &ex,
    )?;
    let (a, b) = (parent.step(&frozen, &ex)?, hot.step(&frozen, &ex)?);
    assert_eq!((a.step, a.tokens), (b.step, b.tokens));
    assert!(a.lr != b.lr);
    // A different rank cannot continue the parent's factors.
    let mut wider = parent.lora.config.clone();
    wider.r = 8;
    let err = parent.fork(cfg, wider, &ex).err().expect("rank change must fail").to_string();
    assert!(err.contains("rank 4") && err.contains("without warm start"), "{err}");
    Ok(())
}
