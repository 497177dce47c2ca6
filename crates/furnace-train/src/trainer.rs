//! The training loop of one configuration: seeded shuffling per epoch, micro-batches with
//! gradient accumulation, clipping, AdamW on a schedule, eval loss, and checkpoints that
//! resume exactly (adapter in PEFT's format + optimizer moments + data position).

use crate::data::Example;
use crate::engine::{self, AdapterRef, FrozenBase, SeqRef, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::lora::TrainableLora;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule, ScheduleKind};
use candle_core::Device;
use furnace_model::rng::Rng;
use furnace_model::{Llama, PeftAdapter};
use std::collections::HashMap;
use std::path::Path;

/// Trainer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// AdamW settings (its `lr` is the schedule's peak).
    pub optimizer: AdamWConfig,
    /// Schedule after warmup.
    pub schedule: ScheduleKind,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Passes over the data (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Optimizer steps to take.
    pub max_steps: Option<usize>,
    /// Seed of the data order.
    pub seed: u64,
    /// Sample packing: a micro-batch takes examples until this many tokens (TRL's
    /// `max_seq_len x batch_size` rows) instead of `batch_size` examples. Examples are
    /// laid end to end without padding and never attend to each other.
    pub packing: Option<usize>,
    /// Sort each window of 50 micro-batches of the shuffled order by length (longest
    /// first), as transformers' `group_by_length` does, so micro-batches hold examples of
    /// similar length.
    pub group_by_length: bool,
    /// Data chunks (RapidFire's `num_chunks`): the examples are split once, by a
    /// permutation seeded with `chunk_seed`, into this many chunks of balanced size; an
    /// epoch passes over the chunks in order, each shuffled with the run's own seed. An
    /// optimizer step never spans two chunks, so every run of an experiment reaches each
    /// chunk boundary after the same data. 1 = the whole dataset is one chunk.
    pub num_chunks: usize,
    /// Seed of the split into chunks (shared by all runs of an experiment).
    pub chunk_seed: u64,
    /// What the steps optimise.
    pub objective: Objective,
}

/// What a trainer optimises.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Objective {
    /// Supervised fine-tuning: the mean cross-entropy of the completion tokens.
    #[default]
    Sft,
    /// DPO over preference pairs.
    Dpo(crate::dpo::DpoConfig),
    /// GRPO over prompts, with completions sampled from the adapter at each step.
    Grpo(crate::grpo::GrpoConfig),
}

impl Objective {
    /// `sft`, `dpo` or `grpo`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Dpo(_) => "dpo",
            Self::Grpo(_) => "grpo",
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig::default(),
            schedule: ScheduleKind::Constant,
            warmup_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            epochs: 1,
            max_steps: None,
            seed: 42,
            packing: None,
            group_by_length: false,
            num_chunks: 1,
            chunk_seed: 0,
            objective: Objective::Sft,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// Mean loss over the step's completion tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// The objective's own metrics (DPO's `rewards/accuracies`, GRPO's `reward`, ...), with
    /// TRL's names.
    pub extra: Vec<(String, f64)>,
}

/// The file of a checkpoint that holds a GRPO batch still to be trained on.
const ROLLOUT_FILE: &str = "rollout.json";

/// Examples per evaluation pass.
const EVAL_BATCH: usize = 8;

/// Mean loss over the completion tokens of `examples` with `lora` (or the base model alone).
pub fn eval_loss(base: &FrozenBase, lora: Option<&TrainableLora>, examples: &[Example]) -> Result<f64> {
    let adapters: Vec<AdapterRef> = lora.map(|lora| AdapterRef { lora, dropout_seed: 0 }).into_iter().collect();
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in examples.chunks(EVAL_BATCH) {
        let seqs: Vec<SeqRef> = chunk.iter().map(|e| SeqRef { ids: &e.ids, labels: &e.labels, adapter: 0, loss_weight: 0.0 }).collect();
        let r = engine::eval_pass(base, &adapters, &seqs)?;
        sum += r.loss_sum.iter().sum::<f64>();
        n += r.tokens.iter().sum::<usize>();
    }
    if n == 0 {
        return Err(Error::Input("no completion tokens to evaluate".into()));
    }
    Ok(sum / n as f64)
}

/// Most rows (tokens) of one fused pass: runs beyond it go into another pass.
pub const FUSED_MAX_ROWS: usize = 1024;

/// The examples and running sums of one run's optimizer step.
pub(crate) struct StepPlan {
    pub(crate) batches: Vec<Vec<usize>>,
    pub(crate) total: usize,
    pub(crate) grads: TrainableLora,
    pub(crate) loss_sum: f64,
    /// What `loss_sum` is divided by (SFT: the step's completion tokens).
    pub(crate) loss_div: f64,
    pub(crate) tokens: usize,
    /// Sums of the objective's metrics, divided by `extra_div` at the end.
    pub(crate) extra: Vec<(String, f64)>,
    pub(crate) extra_div: f64,
}

impl StepPlan {
    /// Adds `weight × value` to each named metric.
    pub(crate) fn add_metrics(&mut self, values: &[(String, f64)], weight: f64) {
        for (name, v) in values {
            match self.extra.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 += weight * v,
                None => self.extra.push((name.clone(), weight * v)),
            }
        }
    }
}

/// One optimizer step for each of `trainers` (runs over the same examples and the same
/// frozen base), trained together: micro-batch `j` of every run that has one goes into the
/// same pass, where the frozen GEMMs run once over all their rows and each adapter updates
/// only its own rows. Runs may differ in everything of their own (adapter shape and
/// targets, optimizer, schedule, batch size, accumulation, seed, dropout); each gets
/// exactly the step it would take alone.
pub fn fused_step(base: &FrozenBase, trainers: &mut [&mut Trainer], examples: &[Example]) -> Result<Vec<StepMetrics>> {
    fused_step_with(base, None, trainers, examples)
}

/// [`fused_step`] for every objective: GRPO samples its completions from `policy` (the
/// runtime model the frozen base was made from, and its tokenizer); SFT and DPO do not need
/// it. Every trainer of one call must have the same kind of objective.
pub fn fused_step_with(
    base: &FrozenBase,
    policy: Option<&mut crate::policy::Policy>,
    trainers: &mut [&mut Trainer],
    examples: &[Example],
) -> Result<Vec<StepMetrics>> {
    let kind = trainers.first().map(|t| t.config.objective.kind()).unwrap_or("sft");
    if trainers.iter().any(|t| t.config.objective.kind() != kind) {
        return Err(Error::Input("internal: one fused step mixes trainers of different kinds".into()));
    }
    match kind {
        "dpo" => crate::policy::dpo_step(base, trainers, examples),
        "grpo" => match policy {
            Some(p) => crate::policy::grpo_step(base, p, trainers, examples),
            None => Err(Error::Input("GRPO samples completions at each step: it needs the runtime model (fused_step_with)".into())),
        },
        _ => sft_step(base, trainers, examples),
    }
}

fn sft_step(base: &FrozenBase, trainers: &mut [&mut Trainer], examples: &[Example]) -> Result<Vec<StepMetrics>> {
    let mut plans = trainers.iter_mut().map(|t| t.plan_step(examples)).collect::<Result<Vec<_>>>()?;
    let passes = plans.iter().map(|p| p.batches.len()).max().unwrap_or(0);
    for mb in 0..passes {
        // The runs with a micro-batch `mb`, cut into passes of at most FUSED_MAX_ROWS rows
        // (a micro-batch is never split), so activation memory stays bounded however many
        // runs train together.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut rows = 0;
        for (ti, plan) in plans.iter().enumerate() {
            let Some(batch) = plan.batches.get(mb) else { continue };
            let n: usize = batch.iter().map(|&i| examples[i].ids.len()).sum();
            if rows > 0 && rows + n > FUSED_MAX_ROWS {
                groups.push(Vec::new());
                rows = 0;
            }
            rows += n;
            if let Some(g) = groups.last_mut() {
                g.push(ti);
            }
        }
        for group in groups.iter().filter(|g| !g.is_empty()) {
            let mut adapters = Vec::new();
            let mut seqs = Vec::new();
            for &ti in group {
                let (t, plan) = (&trainers[ti], &mut plans[ti]);
                let a = adapters.len();
                adapters.push(AdapterRef { lora: &t.lora, dropout_seed: t.dropout_seed(mb) });
                let weight = 1.0 / plan.total as f32;
                for &i in &plan.batches[mb] {
                    plan.tokens += examples[i].ids.len();
                    seqs.push(SeqRef { ids: &examples[i].ids, labels: &examples[i].labels, adapter: a, loss_weight: weight });
                }
            }
            let r = engine::train_pass(base, &adapters, &seqs)?;
            for (a, &ti) in group.iter().enumerate() {
                plans[ti].loss_sum += r.loss_sum[a];
                plans[ti].grads.add(&r.grads[a]);
            }
        }
    }
    trainers.iter_mut().zip(plans).map(|(t, p)| t.apply_step(p)).collect()
}

/// Trains one LoRA configuration over a dataset.
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    /// The trainable adapter (attached to the model passed to [`Trainer::step`]).
    pub lora: TrainableLora,
    /// GRPO: the reward functions (set before the first step).
    pub rewards: Option<std::sync::Arc<crate::rewards::Rewards>>,
    /// DPO: the reference adapter (None: the base model alone).
    pub reference: Option<std::sync::Arc<TrainableLora>>,
    /// GRPO: the sampled batch still to be trained on (`num_iterations > 1`).
    pub(crate) rollout: Option<crate::policy::Rollout>,
    opt: AdamW,
    schedule: Schedule,
    order: Vec<usize>,
    epoch: usize,
    offset: usize,
    lengths: Vec<usize>,
    bounds: Vec<usize>,
}

/// Where a run is in its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Examples of this epoch's order consumed.
    pub offset: usize,
}

/// The end offsets of the chunks of `n` examples in an epoch's order (balanced: sizes
/// differ by at most one example).
fn chunk_bounds(n: usize, chunks: usize) -> Vec<usize> {
    let chunks = chunks.clamp(1, n.max(1));
    (1..=chunks).map(|c| c * n / chunks).collect()
}

fn shuffle(order: &mut [usize], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
}

/// The example order of one epoch: with one chunk a seeded shuffle of everything;
/// with several, the fixed split into chunks (by `chunk_seed`), each chunk shuffled with
/// the run's seed. Optionally grouped by length within windows.
fn epoch_order(config: &TrainConfig, lengths: &[usize], epoch: usize) -> Vec<usize> {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let bounds = chunk_bounds(lengths.len(), config.num_chunks);
    if bounds.len() <= 1 {
        shuffle(&mut order, config.seed ^ (epoch as u64).wrapping_mul(K));
    } else {
        shuffle(&mut order, config.chunk_seed);
        let mut start = 0;
        for (c, &end) in bounds.iter().enumerate() {
            let salt = (epoch as u64).wrapping_mul(K) ^ ((c as u64 + 1) << 32).wrapping_mul(K);
            shuffle(&mut order[start..end], config.seed ^ salt);
            start = end;
        }
    }
    if config.group_by_length {
        let window = (config.batch_size * config.grad_accum * 50).max(1);
        let mut start = 0;
        for &end in &bounds {
            for w in order[start..end].chunks_mut(window) {
                w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            }
            start = end;
        }
    }
    order
}

/// Optimizer steps a run takes in each chunk of one pass over the data (packing makes it
/// depend on lengths; it is counted on epoch 0's order).
fn steps_per_chunk(config: &TrainConfig, lengths: &[usize]) -> Vec<usize> {
    let order = epoch_order(config, lengths, 0);
    let mut start = 0;
    let mut out = Vec::new();
    for end in chunk_bounds(lengths.len(), config.num_chunks) {
        let batches = match config.packing {
            None => (end - start).div_ceil(config.batch_size),
            Some(budget) => {
                let (mut batches, mut used) = (0, 0);
                for &i in &order[start..end] {
                    if used == 0 || used + lengths[i] > budget {
                        batches += 1;
                        used = 0;
                    }
                    used += lengths[i];
                }
                batches
            }
        };
        let per_batch = match &config.objective {
            Objective::Grpo(g) => g.num_iterations.max(1),
            _ => 1,
        };
        out.push(batches.div_ceil(config.grad_accum.max(1)).max(1) * per_batch);
        start = end;
    }
    out
}

impl Trainer {
    /// A trainer over `examples` for `lora`.
    pub fn new(config: TrainConfig, lora: TrainableLora, examples: &[Example]) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::Input("the training set is empty".into()));
        }
        if config.batch_size == 0 || config.grad_accum == 0 || config.packing == Some(0) || config.num_chunks == 0 {
            return Err(Error::Input("batch_size, grad_accum, num_chunks and the packing budget must be > 0".into()));
        }
        if config.num_chunks > examples.len() {
            return Err(Error::Input(format!(
                "num_chunks = {} but the training set has only {} examples: use at most that many chunks",
                config.num_chunks,
                examples.len()
            )));
        }
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        let total_steps =
            config.max_steps.unwrap_or_else(|| steps_per_chunk(&config, &lengths).iter().sum::<usize>() * config.epochs.max(1));
        let schedule = Schedule { kind: config.schedule, lr: config.optimizer.lr, warmup_steps: config.warmup_steps, total_steps };
        let sizes: Vec<usize> = lora.named().iter().map(|(_, _, v)| v.len()).collect();
        let opt = AdamW::new(&sizes, config.optimizer.clone());
        let order = epoch_order(&config, &lengths, 0);
        let bounds = chunk_bounds(lengths.len(), config.num_chunks);
        Ok(Self { config, lora, rewards: None, reference: None, rollout: None, opt, schedule, order, epoch: 0, offset: 0, lengths, bounds })
    }

    /// Optimizer steps one pass over `examples` takes with `config` (packing, chunks and
    /// accumulation included).
    pub fn steps_per_epoch(config: &TrainConfig, examples: &[Example]) -> usize {
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        steps_per_chunk(config, &lengths).iter().sum::<usize>().max(1)
    }

    /// Optimizer steps in each chunk of one pass over `examples` with `config`.
    pub fn steps_per_chunk(config: &TrainConfig, examples: &[Example]) -> Vec<usize> {
        let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        steps_per_chunk(config, &lengths)
    }

    /// Where the run is in its data.
    pub fn position(&self) -> DataPosition {
        DataPosition { epoch: self.epoch, offset: self.offset }
    }

    /// Chunks completed since the start (over all epochs).
    pub fn chunks_done(&self) -> usize {
        let done = self.epoch * self.bounds.len() + self.bounds.iter().filter(|&&b| b <= self.offset).count();
        // A GRPO batch still to be trained on (`num_iterations > 1`) belongs to the chunk its
        // prompts came from (a step never spans two chunks): that chunk is done only after
        // the batch's last iteration, though its prompts are all drawn.
        if self.rollout.is_some() && self.offset > 0 && self.bounds.contains(&self.offset) {
            done - 1
        } else {
            done
        }
    }

    /// Whether the run stands at a chunk boundary (the start of a chunk; not while a GRPO
    /// batch of the chunk before is still to be trained on).
    pub fn at_chunk_boundary(&self) -> bool {
        self.rollout.is_none() && (self.offset == 0 || self.bounds.contains(&self.offset))
    }

    /// The end of the chunk the next example comes from.
    fn chunk_end(&self) -> usize {
        self.bounds.iter().copied().find(|&b| b > self.offset).unwrap_or(self.order.len())
    }

    /// A copy of this run's state under new settings (a warm clone): the adapter factors,
    /// optimizer moments, step count and data position carry over; the schedule is rebuilt
    /// from `config`. `lora` must have the parent's shapes (same rank and targets).
    pub fn fork(&self, config: TrainConfig, lora_config: furnace_model::lora::LoraConfig, examples: &[Example]) -> Result<Self> {
        if config.num_chunks != self.config.num_chunks || config.chunk_seed != self.config.chunk_seed {
            return Err(Error::Input("a warm clone keeps the parent's data chunks (num_chunks and the seed of the split)".into()));
        }
        let mut lora = self.lora.clone();
        lora_config.validate()?;
        if lora_config.r != lora.config.r || lora_config.targets() != lora.config.targets() {
            return Err(Error::Input(format!(
                "a warm clone continues the parent's adapter, whose shape is rank {} on {:?}; rank {} on {:?} would need new factors: clone without warm start to change the rank or the target modules",
                lora.config.r,
                lora.config.targets(),
                lora_config.r,
                lora_config.targets()
            )));
        }
        lora.scale = lora_config.scale() as f32;
        lora.config = lora_config;
        let mut t = Self::new(config, lora, examples)?;
        let (m, v) = self.opt.moments();
        t.opt.restore(m.to_vec(), v.to_vec(), self.opt.step)?;
        t.epoch = self.epoch;
        t.offset = self.offset;
        t.order = self.order.clone();
        t.rewards = self.rewards.clone();
        t.reference = self.reference.clone();
        // A GRPO batch still to be trained on goes on under the same settings; a clone that
        // changes them (reward weights, clipping, ...) samples its own from the next step.
        t.rollout = if t.config.objective == self.config.objective { self.rollout.clone() } else { None };
        Ok(t)
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> usize {
        self.schedule.total_steps
    }

    /// Optimizer steps taken.
    pub fn steps_done(&self) -> usize {
        self.opt.step
    }

    /// Whether the run has taken all its steps.
    pub fn finished(&self) -> bool {
        self.opt.step >= self.schedule.total_steps
    }

    fn peek_index(&mut self) -> usize {
        if self.offset >= self.order.len() {
            self.epoch += 1;
            self.offset = 0;
            self.order = epoch_order(&self.config, &self.lengths, self.epoch);
        }
        self.order[self.offset]
    }

    fn next_index(&mut self) -> usize {
        let i = self.peek_index();
        self.offset += 1;
        i
    }

    /// The next micro-batch: `batch_size` examples (fewer at the end of a chunk), or with
    /// packing as many as fit the token budget (at least one).
    fn next_micro_batch(&mut self) -> Vec<usize> {
        // A micro-batch stops at the end of its chunk, as the step count assumes.
        let end = self.chunk_end();
        match self.config.packing {
            None => {
                let n = self.config.batch_size.min(end - self.offset);
                (0..n).map(|_| self.next_index()).collect()
            }
            Some(budget) => {
                let mut picks = vec![self.next_index()];
                let mut used = self.lengths[picks[0]];
                while self.offset < end {
                    let i = self.peek_index();
                    if used + self.lengths[i] > budget {
                        break;
                    }
                    used += self.lengths[i];
                    picks.push(self.next_index());
                }
                picks
            }
        }
    }

    /// One optimizer step: `grad_accum` micro-batches of `batch_size` examples (fewer at
    /// the end of a chunk), each one
    /// ragged pass through the model; the loss is the mean over all their completion tokens
    /// (as transformers computes it).
    pub fn step(&mut self, base: &FrozenBase, examples: &[Example]) -> Result<StepMetrics> {
        let mut out = fused_step(base, &mut [self], examples)?;
        out.pop().ok_or_else(|| Error::Input("internal: no step metrics".into()))
    }

    /// Draws the examples of the next optimizer step from the run's order.
    pub(crate) fn plan_step(&mut self, examples: &[Example]) -> Result<StepPlan> {
        if examples.len() != self.lengths.len() {
            return Err(Error::Input(format!("trainer built for {} examples, given {}", self.lengths.len(), examples.len())));
        }
        // A step starts in a chunk and ends at its end at the latest.
        self.peek_index();
        let end = self.chunk_end();
        let mut batches: Vec<Vec<usize>> = Vec::new();
        while batches.len() < self.config.grad_accum && (batches.is_empty() || self.offset < end) {
            batches.push(self.next_micro_batch());
        }
        let total: usize =
            batches.iter().flatten().map(|&i| examples[i].labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum();
        if total == 0 && !matches!(self.config.objective, Objective::Grpo(_)) {
            return Err(Error::Input("this step's examples have no completion tokens".into()));
        }
        Ok(self.empty_plan(batches, total))
    }

    /// A step's plan over `batches` (micro-batches of example indices).
    pub(crate) fn empty_plan(&self, batches: Vec<Vec<usize>>, total: usize) -> StepPlan {
        let loss_div = match self.config.objective {
            Objective::Sft => total as f64,
            _ => batches.len().max(1) as f64,
        };
        StepPlan { batches, total, grads: self.lora.zeros_like(), loss_sum: 0.0, loss_div, tokens: 0, extra: Vec::new(), extra_div: 1.0 }
    }

    /// Seed of the dropout masks of micro-batch `mb` of the coming step.
    pub(crate) fn dropout_seed(&self, mb: usize) -> u64 {
        self.config.seed ^ ((self.opt.step as u64) << 20 | mb as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Clips the accumulated gradients and takes the optimizer step.
    pub(crate) fn apply_step(&mut self, mut plan: StepPlan) -> Result<StepMetrics> {
        let mut g = plan.grads.tensors_mut();
        let grad_norm = clip_grad_norm(&mut g, self.config.max_grad_norm.unwrap_or(f64::INFINITY));
        let lr = self.schedule.lr_at(self.opt.step);
        let grefs: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
        self.opt.step(&mut self.lora.tensors_mut(), &grefs, lr)?;
        let extra = plan.extra.into_iter().map(|(n, v)| (n, v / plan.extra_div)).collect();
        Ok(StepMetrics { step: self.opt.step, loss: plan.loss_sum / plan.loss_div, lr, grad_norm, tokens: plan.tokens, extra })
    }

    /// Writes a checkpoint: `adapter/` in PEFT's format plus `trainer_state.json` and
    /// `optimizer.safetensors`, into a new folder `dir`. An existing `dir` is never
    /// overwritten (an error): it is written as `<dir>.partial-<pid>`, synced (files and
    /// folders) and renamed, so `dir` exists only complete.
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        let (m, v) = self.opt.moments();
        let mut tensors = HashMap::new();
        for (k, ((mi, vi), (_, shape, _))) in m.iter().zip(v).zip(self.lora.named()).enumerate() {
            let t = |x: &[f32]| candle_core::Tensor::from_slice(x, (shape[0], shape[1]), &Device::Cpu);
            tensors.insert(format!("m.{k}"), t(mi)?);
            tensors.insert(format!("v.{k}"), t(vi)?);
        }
        let state = serde_json::json!({
            "step": self.opt.step, "epoch": self.epoch, "offset": self.offset,
            "n_examples": self.lengths.len(), "seed": self.config.seed, "params": m.len(),
        });
        crate::lora::write_new_dir(dir, "checkpoint", |tmp| {
            self.lora.write_peft(&tmp.join("adapter"), base_model, true)?;
            candle_core::safetensors::save(&tensors, tmp.join("optimizer.safetensors"))?;
            std::fs::write(tmp.join("trainer_state.json"), state.to_string())
                .map_err(|e| Error::Input(format!("writing checkpoint {}: {e}", dir.display())))?;
            if let Some(r) = &self.rollout {
                let json = serde_json::to_string(r).map_err(|e| Error::Input(format!("writing checkpoint {}: {e}", dir.display())))?;
                std::fs::write(tmp.join(ROLLOUT_FILE), json)
                    .map_err(|e| Error::Input(format!("writing checkpoint {}: {e}", dir.display())))?;
            }
            Ok(())
        })
    }

    /// Reads a checkpoint folder whole without a model (its adapter, optimizer moments and
    /// state, checked against each other) and returns its step: what [`Trainer::resume`]
    /// loads, for audits that have no model at hand.
    pub fn check_checkpoint(dir: &Path) -> Result<usize> {
        let bad = |m: String| Error::Input(format!("checkpoint {}: {m}", dir.display()));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| state.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(format!("no '{k}'")));
        let adapter = PeftAdapter::load(&dir.join("adapter"))?;
        let opt_t = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        let n = get("params")?;
        if adapter.tensors.len() != n || opt_t.len() != 2 * n {
            return Err(bad(format!("{} factors, {} moments, {n} parameters in its state", adapter.tensors.len(), opt_t.len())));
        }
        get("step")
    }

    /// Rebuilds a trainer from a checkpoint: its adapter (checked against `model`), the
    /// optimizer moments, step and data position, so training continues exactly.
    pub fn resume(model: &Llama, dir: &Path, config: TrainConfig, examples: &[Example]) -> Result<Self> {
        let n_examples = examples.len();
        let bad = |m: String| Error::Input(format!("checkpoint {}: {m}", dir.display()));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| state.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(format!("no '{k}'")));
        if get("n_examples")? != n_examples {
            return Err(bad(format!("it was written for {} examples, the data has {n_examples}", get("n_examples")?)));
        }
        let adapter = PeftAdapter::load(&dir.join("adapter"))?;
        let lora = TrainableLora::from_adapter(model, &adapter)?;
        let mut t = Self::new(config, lora, examples)?;
        let opt_t = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        let n = get("params")?;
        let take = |p: &str, k: usize| -> Result<Vec<f32>> {
            let t = opt_t.get(&format!("{p}.{k}")).ok_or_else(|| bad(format!("no optimizer moment {p}.{k}")))?;
            Ok(t.flatten_all()?.to_vec1()?)
        };
        let m = (0..n).map(|k| take("m", k)).collect::<Result<Vec<_>>>()?;
        let v = (0..n).map(|k| take("v", k)).collect::<Result<Vec<_>>>()?;
        t.opt.restore(m, v, get("step")?)?;
        t.epoch = get("epoch")?;
        t.order = epoch_order(&t.config, &t.lengths, t.epoch);
        t.offset = get("offset")?;
        let rollout = dir.join(ROLLOUT_FILE);
        if rollout.is_file() {
            let text = std::fs::read_to_string(&rollout).map_err(|e| bad(e.to_string()))?;
            t.rollout = Some(serde_json::from_str(&text).map_err(|e| bad(format!("{ROLLOUT_FILE}: {e}")))?);
        }
        Ok(t)
    }
}
