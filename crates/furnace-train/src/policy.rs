//! DPO and GRPO steps and evaluations over the fused training pass.
//!
//! Both run through [`engine::objective_pass`]: the forward gives every answer token's
//! log-probability, the objective (dpo, grpo) turns them into a loss and its gradient per
//! token, the backward gives each adapter's factor gradients. As for SFT, the runs of one
//! call share the frozen passes (their micro-batches stacked into passes of at most
//! [`FUSED_MAX_ROWS`] rows) and each takes exactly the step it would take alone.
//!
//! - DPO: a micro-batch of pairs is `2 × pairs` sequences (chosen, rejected). The
//!   reference's log-probabilities (the frozen base, or a given reference adapter) are
//!   computed once per example and kept in it ([`Example::reference`]), so every run and
//!   epoch of the same data reuses them.
//! - GRPO: a step draws `batch_size × grad_accum` prompts, samples `num_generations`
//!   completions of each from the run's current adapter (every run's requests in one
//!   continuous batch of the generation engine, the adapters registered in the runtime
//!   model for the step), scores them with the run's rewards, and trains on the
//!   group-normalised advantages for `num_iterations` steps (the batch is kept in the
//!   trainer, and in its checkpoints, in between).

use crate::data::Example;
use crate::dpo::{self, PairLogps};
use crate::engine::{self, mix, AdapterRef, FrozenBase, SeqLogps, SeqRef, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::grpo::{self, GrpoConfig, TokenStats, TokenTerms};
use crate::lora::TrainableLora;
use crate::rewards::{Rewards, Scored};
use crate::trainer::{Objective, StepMetrics, StepPlan, Trainer, FUSED_MAX_ROWS};
use furnace_generate::{Engine, EngineOptions, FinishReason, Output, Request, SamplingParams};
use furnace_model::Llama;
use furnace_text::Tokenizer;

/// What GRPO samples with: the runtime model the frozen base was made from, and its
/// tokenizer. Adapters are registered in the model for the time of one sampling call.
pub struct Policy<'a> {
    /// The model.
    pub model: &'a mut Llama,
    /// Its tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Most sequences the generation engine runs at once.
    pub max_batch: usize,
}

/// One sampled completion of a GRPO batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sampled {
    /// The prompt's example.
    pub example: usize,
    /// Prompt + completion tokens.
    pub ids: Vec<u32>,
    /// Its prompt's length.
    pub prompt_len: usize,
    /// Its advantage.
    pub advantage: f64,
}

impl Sampled {
    fn labels(&self) -> Vec<i64> {
        self.ids.iter().enumerate().map(|(i, &t)| if i < self.prompt_len { IGNORE_INDEX } else { i64::from(t) }).collect()
    }
}

/// A sampled GRPO batch and what training on it needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// Completions, micro-batch by micro-batch.
    pub batches: Vec<Vec<Sampled>>,
    /// Per micro-batch and completion: its tokens' log-probabilities when sampled, kept
    /// from the first iteration when `num_iterations > 1`.
    pub old: Option<Vec<Vec<Vec<f32>>>>,
    /// Per micro-batch and completion: the reference's log-probabilities (when `beta > 0`).
    pub reference: Option<Vec<Vec<Vec<f32>>>>,
    /// Optimizer steps still to take on it.
    pub iterations_left: usize,
    /// The batch's reward metrics (logged with every step taken on it).
    pub metrics: Vec<(String, f64)>,
}

fn pair_rows(e: &Example) -> usize {
    e.ids.len() + e.rejected.as_ref().map_or(0, |r| r.ids.len())
}

fn rejected_of(e: &Example) -> Result<&crate::data::Sequence> {
    e.rejected.as_deref().ok_or_else(|| Error::Input("a DPO example has no rejected answer (load the data as preference pairs)".into()))
}

fn dpo_config(t: &Trainer) -> Result<&dpo::DpoConfig> {
    match &t.config.objective {
        Objective::Dpo(c) => Ok(c),
        _ => Err(Error::Input("internal: not a DPO trainer".into())),
    }
}

fn grpo_config(t: &Trainer) -> Result<&GrpoConfig> {
    match &t.config.objective {
        Objective::Grpo(c) => Ok(c),
        _ => Err(Error::Input("internal: not a GRPO trainer".into())),
    }
}

/// Cuts items of `rows` each into consecutive groups of at most [`FUSED_MAX_ROWS`] rows
/// (an item is never split).
fn row_groups(rows: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, &n) in rows.iter().enumerate() {
        if used > 0 && used + n > FUSED_MAX_ROWS {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += n;
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

/// Computes and keeps the reference log-probabilities of the examples `idx` that lack them.
pub fn ensure_reference(base: &FrozenBase, reference: Option<&TrainableLora>, examples: &[Example], idx: &[usize]) -> Result<()> {
    let mut missing: Vec<usize> = idx.iter().copied().filter(|&i| examples[i].reference.get().is_none()).collect();
    missing.sort_unstable();
    missing.dedup();
    let adapters: Vec<AdapterRef> = reference.map(|lora| AdapterRef { lora, dropout_seed: 0 }).into_iter().collect();
    let rows: Vec<usize> = missing.iter().map(|&i| pair_rows(&examples[i])).collect();
    for range in row_groups(&rows) {
        let mut seqs = Vec::new();
        for &i in &missing[range.clone()] {
            let e = &examples[i];
            let r = rejected_of(e)?;
            seqs.push(SeqRef { ids: &e.ids, labels: &e.labels, adapter: 0, loss_weight: 0.0 });
            seqs.push(SeqRef { ids: &r.ids, labels: &r.labels, adapter: 0, loss_weight: 0.0 });
        }
        let logps = engine::token_logps(base, &adapters, &seqs)?;
        for (k, &i) in missing[range].iter().enumerate() {
            let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
            // Another thread may have set it meanwhile: the values are the same.
            let _ = examples[i].reference.set((sum(&logps[2 * k]), sum(&logps[2 * k + 1])));
        }
    }
    Ok(())
}

fn pair_logps(e: &Example, chosen: &[f32], rejected: &[f32]) -> Result<PairLogps> {
    let (ref_chosen, ref_rejected) = *e.reference.get().ok_or_else(|| Error::Input("internal: no reference log-probabilities".into()))?;
    let sum = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    Ok(PairLogps {
        chosen: sum(chosen),
        rejected: sum(rejected),
        ref_chosen,
        ref_rejected,
        n_chosen: chosen.len(),
        n_rejected: rejected.len(),
    })
}

/// One run's part of a DPO pass: its adapter, settings, pairs (example indices) and the
/// micro-batches of its step.
struct DpoPart<'a> {
    adapter: AdapterRef<'a>,
    cfg: &'a dpo::DpoConfig,
    batch: &'a [usize],
    micro_batches: usize,
}

/// What one run's part of a pass gave: loss, metrics, factor gradients.
type PartResult = (f64, Vec<(String, f64)>, TrainableLora);

/// One fused pass over several runs' pairs (their references already computed).
fn dpo_pass(base: &FrozenBase, parts: &[DpoPart], examples: &[Example]) -> Result<Vec<PartResult>> {
    let adapters: Vec<AdapterRef> = parts.iter().map(|p| p.adapter).collect();
    let mut seqs = Vec::new();
    let mut starts = Vec::new();
    for (a, p) in parts.iter().enumerate() {
        starts.push(seqs.len());
        for &i in p.batch {
            let e = &examples[i];
            let r = rejected_of(e)?;
            seqs.push(SeqRef { ids: &e.ids, labels: &e.labels, adapter: a, loss_weight: 0.0 });
            seqs.push(SeqRef { ids: &r.ids, labels: &r.labels, adapter: a, loss_weight: 0.0 });
        }
    }
    let mut results: Vec<(f64, Vec<(String, f64)>)> = Vec::new();
    let grads = engine::objective_pass(base, &adapters, &seqs, &mut |logps: &SeqLogps| {
        let mut out: SeqLogps = logps.iter().map(|l| vec![0.0; l.len()]).collect();
        results.clear();
        for (p, &start) in parts.iter().zip(&starts) {
            let pairs = p
                .batch
                .iter()
                .enumerate()
                .map(|(k, &i)| pair_logps(&examples[i], &logps[start + 2 * k], &logps[start + 2 * k + 1]))
                .collect::<Result<Vec<_>>>()?;
            let bl = p.cfg.batch_loss(&pairs);
            let scale = 1.0 / p.micro_batches.max(1) as f64;
            for k in 0..pairs.len() {
                out[start + 2 * k].iter_mut().for_each(|v| *v = (bl.d_chosen[k] * scale) as f32);
                out[start + 2 * k + 1].iter_mut().for_each(|v| *v = (bl.d_rejected[k] * scale) as f32);
            }
            results.push((bl.loss * scale, dpo::metrics(p.cfg.beta, &pairs)));
        }
        Ok(out)
    })?;
    Ok(results.into_iter().zip(grads).map(|((l, m), g)| (l, m, g)).collect())
}

/// The DPO loss, TRL's metrics and the factor gradients of `lora` on one batch of pairs
/// (`examples`, all of them), as one micro-batch of a step: what a step's gradient is
/// made of, for checks against a reference implementation.
pub fn dpo_batch(
    base: &FrozenBase,
    lora: &TrainableLora,
    reference: Option<&TrainableLora>,
    cfg: &dpo::DpoConfig,
    examples: &[Example],
) -> Result<PartResult> {
    let idx: Vec<usize> = (0..examples.len()).collect();
    ensure_reference(base, reference, examples, &idx)?;
    let part = DpoPart { adapter: AdapterRef { lora, dropout_seed: 0 }, cfg, batch: &idx, micro_batches: 1 };
    dpo_pass(base, &[part], examples)?.pop().ok_or(Error::Input("internal: no result".into()))
}

/// One DPO optimizer step of each trainer (see the module docs).
pub(crate) fn dpo_step(base: &FrozenBase, trainers: &mut [&mut Trainer], examples: &[Example]) -> Result<Vec<StepMetrics>> {
    let mut plans = trainers.iter_mut().map(|t| t.plan_step(examples)).collect::<Result<Vec<StepPlan>>>()?;
    for (t, p) in trainers.iter().zip(&plans) {
        let idx: Vec<usize> = p.batches.iter().flatten().copied().collect();
        ensure_reference(base, t.reference.as_deref(), examples, &idx)?;
    }
    let configs: Vec<dpo::DpoConfig> = trainers.iter().map(|t| dpo_config(t).cloned()).collect::<Result<_>>()?;
    let passes = plans.iter().map(|p| p.batches.len()).max().unwrap_or(0);
    let mut pairs_seen = vec![0usize; trainers.len()];
    for mb in 0..passes {
        let members: Vec<usize> = (0..trainers.len()).filter(|&ti| plans[ti].batches.get(mb).is_some()).collect();
        let rows: Vec<usize> = members.iter().map(|&ti| plans[ti].batches[mb].iter().map(|&i| pair_rows(&examples[i])).sum()).collect();
        for range in row_groups(&rows) {
            let group = &members[range];
            let parts: Vec<DpoPart> = group
                .iter()
                .map(|&ti| DpoPart {
                    adapter: AdapterRef { lora: &trainers[ti].lora, dropout_seed: trainers[ti].dropout_seed(mb) },
                    cfg: &configs[ti],
                    batch: &plans[ti].batches[mb],
                    micro_batches: plans[ti].batches.len(),
                })
                .collect();
            let results = dpo_pass(base, &parts, examples)?;
            drop(parts);
            for (&ti, (loss, metrics, g)) in group.iter().zip(results) {
                let plan = &mut plans[ti];
                let n = plan.batches[mb].len();
                plan.loss_sum += loss;
                plan.grads.add(&g);
                plan.add_metrics(&metrics, n as f64);
                plan.tokens += plan.batches[mb].iter().map(|&i| pair_rows(&examples[i])).sum::<usize>();
                pairs_seen[ti] += n;
            }
        }
    }
    for (plan, n) in plans.iter_mut().zip(pairs_seen) {
        // The loss is the step's already (each micro-batch's share is in it).
        plan.loss_div = 1.0;
        plan.extra_div = n.max(1) as f64;
    }
    trainers.iter_mut().zip(plans).map(|(t, p)| t.apply_step(p)).collect()
}

/// The DPO loss and metrics of `lora` over `examples` (pairs), with `eval_` names:
/// `eval_loss`, `eval_rewards/accuracies`, ...
pub fn dpo_eval(
    base: &FrozenBase,
    lora: &TrainableLora,
    reference: Option<&TrainableLora>,
    cfg: &dpo::DpoConfig,
    examples: &[Example],
) -> Result<Vec<(String, f64)>> {
    if examples.is_empty() {
        return Err(Error::Input("no preference pairs to evaluate".into()));
    }
    let idx: Vec<usize> = (0..examples.len()).collect();
    ensure_reference(base, reference, examples, &idx)?;
    let adapters = [AdapterRef { lora, dropout_seed: 0 }];
    let rows: Vec<usize> = examples.iter().map(pair_rows).collect();
    let mut pairs = Vec::with_capacity(examples.len());
    for range in row_groups(&rows) {
        let mut seqs = Vec::new();
        for e in &examples[range.clone()] {
            let r = rejected_of(e)?;
            seqs.push(SeqRef { ids: &e.ids, labels: &e.labels, adapter: 0, loss_weight: 0.0 });
            seqs.push(SeqRef { ids: &r.ids, labels: &r.labels, adapter: 0, loss_weight: 0.0 });
        }
        let logps = engine::token_logps(base, &adapters, &seqs)?;
        for (k, e) in examples[range].iter().enumerate() {
            pairs.push(pair_logps(e, &logps[2 * k], &logps[2 * k + 1])?);
        }
    }
    let mut out = vec![("eval_loss".to_string(), cfg.batch_loss(&pairs).loss)];
    out.extend(dpo::metrics(cfg.beta, &pairs).into_iter().map(|(n, v)| (format!("eval_{n}"), v)));
    Ok(out)
}

/// Sampling requests of one run.
struct RunRequests<'a> {
    lora: &'a TrainableLora,
    prompts: Vec<(usize, SamplingParams)>,
}

/// Samples each run's requests, in request order. Every run gets its own engine batch: the
/// engine's products round differently at different batch sizes, so sampling runs together
/// would make a run's completions (and so its training) depend on which runs it is fused
/// with; alone or fused, a run samples the same completions.
fn sample(policy: &mut Policy, examples: &[Example], runs: &[RunRequests]) -> Result<Vec<Vec<Output>>> {
    let mut out = Vec::with_capacity(runs.len());
    for r in runs {
        out.push(sample_batch(policy, examples, std::slice::from_ref(r))?.pop().unwrap_or_default());
    }
    Ok(out)
}

/// Samples the requests of `runs` in one engine batch, each run's adapter registered in the
/// model for the call; outputs per run, in request order.
fn sample_batch(policy: &mut Policy, examples: &[Example], runs: &[RunRequests]) -> Result<Vec<Vec<Output>>> {
    let mut ids = Vec::new();
    let mut registered = Ok(());
    for r in runs {
        match r.lora.to_adapter().and_then(|a| Ok(policy.model.add_adapter(&a)?)) {
            Ok(id) => ids.push(id),
            Err(e) => {
                registered = Err(e);
                break;
            }
        }
    }
    let result = registered.and_then(|()| {
        let mut engine =
            Engine::new(&*policy.model, policy.tokenizer, EngineOptions { max_batch: policy.max_batch.max(1), ..EngineOptions::default() });
        for (k, &id) in ids.iter().enumerate() {
            engine.name_adapter(format!("run{k}"), id)?;
        }
        for (k, r) in runs.iter().enumerate() {
            for (i, params) in &r.prompts {
                engine.add(Request {
                    prompt: examples[*i].ids.clone(),
                    params: params.clone(),
                    adapter: Some(format!("run{k}")),
                    constraint: None,
                })?;
            }
        }
        Ok(engine.run(&mut |_| {})?)
    });
    for id in ids {
        policy.model.remove_adapter(id);
    }
    let mut outputs = result?.into_iter();
    Ok(runs.iter().map(|r| outputs.by_ref().take(r.prompts.len()).collect()).collect())
}

/// Sampling parameters of completion `g` of prompt `example` at step `step` of a run
/// seeded `seed` (so a resumed run samples what it would have).
fn sampling(cfg: &GrpoConfig, seed: u64, step: usize, example: usize, g: usize) -> SamplingParams {
    SamplingParams {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        top_k: cfg.top_k,
        max_tokens: cfg.max_completion_length,
        seed: Some(mix(seed ^ mix((step as u64) << 32 ^ mix((example as u64) << 8 ^ g as u64)))),
        ..SamplingParams::default()
    }
}

/// Scores sampled outputs (of optimizer step `step`): per-reward values, weighted rewards,
/// advantages and the batch's reward metrics (TRL's names, `prefix` before each).
#[allow(clippy::too_many_arguments)]
fn score(
    cfg: &GrpoConfig,
    rewards: &Rewards,
    tokenizer: &Tokenizer,
    examples: &[Example],
    prompts: &[usize],
    outputs: &[Output],
    prefix: &str,
    step: usize,
) -> Result<(grpo::Advantages, Vec<(String, f64)>)> {
    // Each prompt's text once (its completions come num_generations at a time).
    let mut texts: std::collections::HashMap<usize, String> = std::collections::HashMap::new();
    for &i in prompts {
        texts.entry(i).or_insert_with(|| tokenizer.decode(&examples[i].ids, false).unwrap_or_default());
    }
    let null = serde_json::Value::Null;
    let items: Vec<Scored> = outputs
        .iter()
        .zip(prompts)
        .map(|(o, &i)| Scored {
            prompt: texts.get(&i).map_or("", String::as_str),
            completion: &o.text,
            row: examples[i].row.as_deref().unwrap_or(&null),
            completion_tokens: o.new_ids.len(),
            completion_ids: &o.new_ids,
        })
        .collect();
    let per_func = rewards.score_at(&items, step)?;
    let weights = cfg.reward_weights.clone().unwrap_or_else(|| rewards.weights());
    if weights.len() != per_func.len() {
        return Err(Error::Spec {
            key: "trainer.reward_weights".into(),
            msg: format!("{} weights for {} rewards", weights.len(), per_func.len()),
        });
    }
    let adv = grpo::advantages(&per_func, &weights, cfg.num_generations, cfg.scale_rewards);
    let n = adv.rewards.len().max(1) as f64;
    let mut m = vec![(format!("{prefix}reward"), adv.rewards.iter().sum::<f64>() / n)];
    let group_std: Vec<f64> = adv.rewards.chunks(cfg.num_generations.max(1)).map(nan_std).collect();
    let gn = group_std.len().max(1) as f64;
    m.push((format!("{prefix}reward_std"), group_std.iter().filter(|x| !x.is_nan()).sum::<f64>() / gn));
    m.push((format!("{prefix}frac_reward_zero_std"), group_std.iter().filter(|&&s| s.abs() < 1e-8).count() as f64 / gn));
    for (name, vals) in rewards.names().iter().zip(&per_func) {
        let ok: Vec<f64> = vals.iter().copied().filter(|v| !v.is_nan()).collect();
        let mean = if ok.is_empty() { f64::NAN } else { ok.iter().sum::<f64>() / ok.len() as f64 };
        if mean.is_finite() {
            m.push((format!("{prefix}rewards/{name}/mean"), mean));
            m.push((format!("{prefix}rewards/{name}/std"), nan_std(vals)));
        }
    }
    let lens: Vec<f64> = outputs.iter().map(|o| o.new_ids.len() as f64).collect();
    m.push((format!("{prefix}completions/mean_length"), lens.iter().sum::<f64>() / n));
    m.push((format!("{prefix}completions/min_length"), lens.iter().copied().fold(f64::INFINITY, f64::min)));
    m.push((format!("{prefix}completions/max_length"), lens.iter().copied().fold(0.0, f64::max)));
    let clipped = outputs.iter().filter(|o| o.finish_reason == FinishReason::Length).count();
    m.push((format!("{prefix}completions/clipped_ratio"), clipped as f64 / n));
    m.retain(|(_, v)| v.is_finite());
    Ok((adv, m))
}

/// Unbiased std ignoring NaN (0 for fewer than two values).
fn nan_std(v: &[f64]) -> f64 {
    let s = grpo::nan_mean_std(v).1;
    if s.is_nan() {
        0.0
    } else {
        s
    }
}

/// Samples and scores a new batch for trainer `t` from `plan`'s prompts.
fn rollouts(
    base: &FrozenBase,
    policy: &mut Policy,
    trainers: &mut [&mut Trainer],
    need: &[(usize, StepPlan)],
    examples: &[Example],
) -> Result<Vec<Rollout>> {
    let mut runs = Vec::new();
    for (ti, plan) in need {
        let t = &trainers[*ti];
        let cfg = grpo_config(t)?;
        let mut prompts = Vec::new();
        for &i in plan.batches.iter().flatten() {
            for g in 0..cfg.num_generations {
                prompts.push((i, sampling(cfg, t.config.seed, t.steps_done(), i, g)));
            }
        }
        runs.push(RunRequests { lora: &t.lora, prompts });
    }
    let outputs = sample(policy, examples, &runs)?;
    drop(runs);
    let mut out = Vec::new();
    for ((ti, plan), outs) in need.iter().zip(outputs) {
        let t = &trainers[*ti];
        let cfg = grpo_config(t)?;
        let rewards = t.rewards.as_deref().ok_or_else(|| Error::Input("a GRPO run has no rewards".into()))?;
        let prompts: Vec<usize> = plan.batches.iter().flatten().flat_map(|&i| std::iter::repeat_n(i, cfg.num_generations)).collect();
        let (adv, metrics) = score(cfg, rewards, policy.tokenizer, examples, &prompts, &outs, "", t.steps_done())?;
        let mut sampled = outs.into_iter().zip(prompts).zip(adv.advantages).map(|((o, i), advantage)| {
            let mut ids = examples[i].ids.clone();
            ids.extend_from_slice(&o.new_ids);
            Sampled { example: i, ids, prompt_len: examples[i].ids.len(), advantage }
        });
        let batches: Vec<Vec<Sampled>> = plan
            .batches
            .iter()
            .map(|b| sampled.by_ref().take(b.len() * cfg.num_generations).filter(|s| s.ids.len() > s.prompt_len).collect())
            .collect();
        let reference =
            if cfg.beta != 0.0 { Some(batches.iter().map(|b| reference_logps(base, b)).collect::<Result<Vec<_>>>()?) } else { None };
        out.push(Rollout { batches, old: None, reference, iterations_left: cfg.num_iterations.max(1), metrics });
    }
    Ok(out)
}

/// The base model's log-probabilities of each completion's tokens (GRPO's reference).
pub fn reference_logps(base: &FrozenBase, batch: &[Sampled]) -> Result<Vec<Vec<f32>>> {
    let labels: Vec<Vec<i64>> = batch.iter().map(Sampled::labels).collect();
    let rows: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
    let mut out = Vec::with_capacity(batch.len());
    for range in row_groups(&rows) {
        let seqs: Vec<SeqRef> = batch[range.clone()]
            .iter()
            .zip(&labels[range])
            .map(|(s, l)| SeqRef { ids: &s.ids, labels: l, adapter: 0, loss_weight: 0.0 })
            .collect();
        out.extend(engine::token_logps(base, &[], &seqs)?);
    }
    Ok(out)
}

/// One run's part of a GRPO pass.
struct GrpoPart<'a> {
    adapter: AdapterRef<'a>,
    cfg: &'a GrpoConfig,
    batch: &'a [Sampled],
    old: Option<&'a [Vec<f32>]>,
    reference: Option<&'a [Vec<f32>]>,
    micro_batches: usize,
    step_tokens: usize,
}

/// What one run's part of a GRPO pass gave.
struct GrpoResult {
    loss: f64,
    stats: TokenStats,
    grads: TrainableLora,
    /// The policy's log-probabilities (kept as the old ones for `num_iterations > 1`).
    logps: Vec<Vec<f32>>,
}

/// One fused pass over several runs' completions.
fn grpo_pass(base: &FrozenBase, parts: &[GrpoPart]) -> Result<Vec<GrpoResult>> {
    let adapters: Vec<AdapterRef> = parts.iter().map(|p| p.adapter).collect();
    let labels: Vec<Vec<Vec<i64>>> = parts.iter().map(|p| p.batch.iter().map(Sampled::labels).collect()).collect();
    let mut seqs = Vec::new();
    let mut starts = Vec::new();
    for (a, p) in parts.iter().enumerate() {
        starts.push(seqs.len());
        for (s, l) in p.batch.iter().zip(&labels[a]) {
            seqs.push(SeqRef { ids: &s.ids, labels: l, adapter: a, loss_weight: 0.0 });
        }
    }
    let mut results = Vec::new();
    let grads = engine::objective_pass(base, &adapters, &seqs, &mut |logps: &SeqLogps| {
        let mut out: SeqLogps = Vec::with_capacity(logps.len());
        results.clear();
        for (p, &start) in parts.iter().zip(&starts) {
            let n = p.batch.len();
            let lens: Vec<usize> = logps[start..start + n].iter().map(Vec::len).collect();
            let scales = grpo::token_scales(p.cfg, &lens, p.micro_batches, p.step_tokens);
            let terms: Vec<TokenTerms> = (0..n)
                .map(|k| TokenTerms {
                    logps: &logps[start + k],
                    old: p.old.map(|o| o[k].as_slice()),
                    reference: p.reference.map(|o| o[k].as_slice()),
                    advantage: p.batch[k].advantage,
                    scale: scales[k],
                })
                .collect();
            let (loss, g, st) = grpo::token_objective(p.cfg, &terms);
            out.extend(g);
            results.push((loss, st, logps[start..start + n].to_vec()));
        }
        Ok(out)
    })?;
    Ok(results.into_iter().zip(grads).map(|((loss, stats, logps), grads)| GrpoResult { loss, stats, grads, logps }).collect())
}

/// The GRPO loss, token statistics, factor gradients and log-probabilities of `lora` on
/// given completions (one micro-batch making a whole step): for checks against a
/// reference implementation. `old` and `reference` are per completion, as in [`Rollout`].
pub fn grpo_batch(
    base: &FrozenBase,
    lora: &TrainableLora,
    cfg: &GrpoConfig,
    batch: &[Sampled],
    old: Option<&[Vec<f32>]>,
    reference: Option<&[Vec<f32>]>,
) -> Result<(f64, TokenStats, TrainableLora, Vec<Vec<f32>>)> {
    let step_tokens = batch.iter().map(|s| s.ids.len() - s.prompt_len).sum();
    let part = GrpoPart { adapter: AdapterRef { lora, dropout_seed: 0 }, cfg, batch, old, reference, micro_batches: 1, step_tokens };
    let r = grpo_pass(base, &[part])?.pop().ok_or(Error::Input("internal: no result".into()))?;
    Ok((r.loss, r.stats, r.grads, r.logps))
}

/// One GRPO optimizer step of each trainer (see the module docs).
pub(crate) fn grpo_step(
    base: &FrozenBase,
    policy: &mut Policy,
    trainers: &mut [&mut Trainer],
    examples: &[Example],
) -> Result<Vec<StepMetrics>> {
    // Runs without a batch in hand draw prompts and sample.
    let mut need = Vec::new();
    for (ti, t) in trainers.iter_mut().enumerate() {
        if t.rollout.is_none() {
            need.push((ti, t.plan_step(examples)?));
        }
    }
    let fresh = rollouts(base, policy, trainers, &need, examples)?;
    for ((ti, _), r) in need.iter().zip(fresh) {
        trainers[*ti].rollout = Some(r);
    }
    let mut rolls: Vec<Rollout> =
        trainers.iter_mut().map(|t| t.rollout.take().ok_or(Error::Input("internal: no GRPO batch".into()))).collect::<Result<_>>()?;
    let configs: Vec<GrpoConfig> = trainers.iter().map(|t| grpo_config(t).cloned()).collect::<Result<_>>()?;
    let mut plans: Vec<StepPlan> = Vec::new();
    for (t, r) in trainers.iter().zip(&rolls) {
        let total: usize = r.batches.iter().flatten().map(|s| s.ids.len() - s.prompt_len).sum();
        plans.push(t.empty_plan(r.batches.iter().map(|b| (0..b.len()).collect()).collect(), total));
    }
    let mut stats = vec![TokenStats::default(); trainers.len()];
    let mut firsts: Vec<Vec<Vec<Vec<f32>>>> = rolls.iter().map(|r| vec![Vec::new(); r.batches.len()]).collect();
    let passes = rolls.iter().map(|r| r.batches.len()).max().unwrap_or(0);
    for mb in 0..passes {
        let members: Vec<usize> = (0..trainers.len()).filter(|&ti| rolls[ti].batches.get(mb).is_some_and(|b| !b.is_empty())).collect();
        let rows: Vec<usize> = members.iter().map(|&ti| rolls[ti].batches[mb].iter().map(|s| s.ids.len()).sum()).collect();
        for range in row_groups(&rows) {
            let group = &members[range];
            let parts: Vec<GrpoPart> = group
                .iter()
                .map(|&ti| {
                    let r = &rolls[ti];
                    GrpoPart {
                        adapter: AdapterRef { lora: &trainers[ti].lora, dropout_seed: trainers[ti].dropout_seed(mb) },
                        cfg: &configs[ti],
                        batch: &r.batches[mb],
                        old: r.old.as_ref().map(|o| o[mb].as_slice()),
                        reference: r.reference.as_ref().map(|o| o[mb].as_slice()),
                        micro_batches: r.batches.len(),
                        step_tokens: plans[ti].total,
                    }
                })
                .collect();
            let results = grpo_pass(base, &parts)?;
            drop(parts);
            for (&ti, r) in group.iter().zip(results) {
                let plan = &mut plans[ti];
                plan.loss_sum += r.loss;
                plan.grads.add(&r.grads);
                plan.tokens += rolls[ti].batches[mb].iter().map(|s| s.ids.len()).sum::<usize>();
                let s = &mut stats[ti];
                s.tokens += r.stats.tokens;
                s.kl += r.stats.kl;
                s.low_clipped += r.stats.low_clipped;
                s.high_clipped += r.stats.high_clipped;
                firsts[ti][mb] = r.logps;
            }
        }
    }
    let mut out = Vec::with_capacity(trainers.len());
    for (ti, (t, mut plan)) in trainers.iter_mut().zip(plans).enumerate() {
        let (cfg, r, s) = (&configs[ti], &mut rolls[ti], stats[ti]);
        // The loss is already the step's (its micro-batch shares are in the scales).
        plan.loss_div = 1.0;
        let n = s.tokens.max(1) as f64;
        let mut m = r.metrics.clone();
        if cfg.beta != 0.0 {
            m.push(("kl".into(), s.kl / n));
        }
        m.push(("clip_ratio/low_mean".into(), s.low_clipped as f64 / n));
        m.push(("clip_ratio/high_mean".into(), s.high_clipped as f64 / n));
        m.push(("clip_ratio/region_mean".into(), (s.low_clipped + s.high_clipped) as f64 / n));
        plan.extra = m;
        plan.extra_div = 1.0;
        if r.old.is_none() && cfg.num_iterations > 1 {
            r.old = Some(std::mem::take(&mut firsts[ti]));
        }
        r.iterations_left = r.iterations_left.saturating_sub(1);
        out.push(t.apply_step(plan)?);
    }
    for (t, r) in trainers.iter_mut().zip(rolls) {
        if r.iterations_left > 0 {
            t.rollout = Some(r);
        }
    }
    Ok(out)
}

/// Samples `num_generations` completions of every prompt of `examples` with `lora` (seeded
/// by `seed`, so evaluations of one run compare) and returns the mean rewards with `eval_`
/// names: `eval_reward`, `eval_rewards/<name>/mean`, `eval_completions/mean_length`, ...
/// `step` is the run's optimizer step (`function` rewards get it).
pub fn grpo_eval(
    policy: &mut Policy,
    lora: &TrainableLora,
    rewards: &Rewards,
    cfg: &GrpoConfig,
    examples: &[Example],
    seed: u64,
    step: usize,
) -> Result<Vec<(String, f64)>> {
    if examples.is_empty() {
        return Err(Error::Input("no prompts to evaluate".into()));
    }
    let mut prompts = Vec::new();
    for i in 0..examples.len() {
        for g in 0..cfg.num_generations {
            prompts.push((i, sampling(cfg, seed, usize::MAX, i, g)));
        }
    }
    let idx: Vec<usize> = prompts.iter().map(|p| p.0).collect();
    let outs = sample(policy, examples, &[RunRequests { lora, prompts }])?.pop().unwrap_or_default();
    let (_, metrics) = score(cfg, rewards, policy.tokenizer, examples, &idx, &outs, "eval_", step)?;
    Ok(metrics)
}

/// What `trainer.compute_metrics` is, in its errors.
const COMPUTE_METRICS: &str = "trainer.compute_metrics";

/// SFT eval texts for `trainer.compute_metrics`: for each example of `examples`, the greedy
/// completion `lora` generates from its prompt ([`Example::prompt_ids`], at most
/// `max_new_tokens` new tokens; the run's requests alone in one engine batch, so the
/// result does not depend on other runs), its reference completion
/// ([`Example::completion_ids`] up to the first end-of-sequence token, special tokens left
/// out) and its prompt, as texts.
pub struct EvalTexts {
    /// The generated completions.
    pub predictions: Vec<String>,
    /// The reference completions.
    pub labels: Vec<String>,
    /// The prompts (rendered with the chat template).
    pub prompts: Vec<String>,
}

/// Generates and decodes the [`EvalTexts`] of `examples` (see there).
pub fn eval_texts(policy: &mut Policy, lora: &TrainableLora, examples: &[Example], max_new_tokens: usize) -> Result<EvalTexts> {
    let prompts: Vec<Example> = examples.iter().map(|e| Example { ids: e.prompt_ids().to_vec(), ..Default::default() }).collect();
    if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
        return Err(Error::Input(format!("eval example {} has no prompt to generate a completion from", i + 1)));
    }
    let params = SamplingParams { temperature: 0.0, max_tokens: max_new_tokens, seed: Some(0), ..SamplingParams::default() };
    let requests = RunRequests { lora, prompts: (0..prompts.len()).map(|i| (i, params.clone())).collect() };
    let outs = sample(policy, &prompts, &[requests])?.pop().unwrap_or_default();
    if outs.len() != examples.len() {
        return Err(Error::Input(format!("internal: {} completions for {} eval prompts", outs.len(), examples.len())));
    }
    let tok = policy.tokenizer;
    let decode = |ids: &[u32], skip: bool| tok.decode(ids, skip).map_err(|e| Error::Input(format!("decoding eval text: {e}")));
    let mut texts = EvalTexts { predictions: Vec::new(), labels: Vec::new(), prompts: Vec::new() };
    for (e, (o, p)) in examples.iter().zip(outs.into_iter().zip(&prompts)) {
        texts.predictions.push(o.text);
        // Up to its end-of-sequence token, as a generated completion ends.
        let reference = e.completion_ids();
        let end = reference.iter().position(|&t| tok.is_eos(t)).unwrap_or(reference.len());
        texts.labels.push(decode(&reference[..end], true)?);
        texts.prompts.push(decode(&p.ids, false)?);
    }
    Ok(texts)
}

/// `trainer.compute_metrics` at one evaluation of an SFT run: the [`EvalTexts`] of
/// `examples` go to the user function `function` ([`crate::hooks`]) as `{"predictions":
/// [...], "labels": [...], "prompts": [...]}`; it returns `{"NAME": number, ...}`, each
/// given back as `eval_NAME`. Its failure, a missing function, or a result of another
/// shape (a value that is not a number) is an error naming the function.
pub fn compute_metrics(
    policy: &mut Policy,
    lora: &TrainableLora,
    examples: &[Example],
    max_new_tokens: usize,
    function: &str,
) -> Result<Vec<(String, f64)>> {
    crate::hooks::require(function, COMPUTE_METRICS)?;
    if examples.is_empty() {
        return Err(Error::Input("no eval examples to compute metrics on".into()));
    }
    let texts = eval_texts(policy, lora, examples, max_new_tokens)?;
    let arg = serde_json::json!({ "predictions": texts.predictions, "labels": texts.labels, "prompts": texts.prompts });
    let result = crate::hooks::call(function, COMPUTE_METRICS, arg)?;
    let shape = |msg: String| Error::Hook { name: function.to_string(), msg: format!("{COMPUTE_METRICS}: {msg}") };
    let serde_json::Value::Object(map) = result else {
        return Err(shape("must return a dict of metric names to numbers ({\"accuracy\": 0.5})".into()));
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(shape(format!("{name:?} is not a metric name (1 to 128 characters, no control characters)")));
        }
        if name == "loss" {
            return Err(shape("returned \"loss\": eval_loss is furnace's own metric; give yours another name".into()));
        }
        let x = v.as_f64().ok_or_else(|| shape(format!("metric {name:?} is {v}, not a number")))?;
        out.push((format!("eval_{name}"), x));
    }
    Ok(out)
}
