//! The training loop of one configuration: seeded shuffling per epoch, micro-batches with
//! gradient accumulation, clipping, AdamW on a schedule, eval loss, and checkpoints that
//! resume exactly (adapter in PEFT's format + optimizer moments + data position).

use crate::data::Example;
use crate::error::{Error, Result};
use crate::forward::{causal_lm_logits, IGNORE_INDEX};
use crate::lora::TrainableLora;
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule, ScheduleKind};
use candle_core::{Device, Tensor, D};
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
}

/// Sum of token losses and the number of counted tokens of one example.
pub(crate) fn example_loss_sum(model: &Llama, ex: &Example) -> Result<(Tensor, usize)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (pos, &l) in ex.labels.iter().enumerate().skip(1) {
        if l != IGNORE_INDEX {
            rows.push((pos - 1) as u32);
            targets.push(l as u32);
        }
    }
    let n = rows.len();
    if n == 0 {
        return Ok((Tensor::new(0f32, &Device::Cpu)?, 0));
    }
    let logits = causal_lm_logits(model, &ex.ids)?;
    let sel = logits.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&sel, D::Minus1)?;
    let picked = logp.gather(&Tensor::from_vec(targets, (n, 1), &Device::Cpu)?, 1)?;
    Ok((picked.sum_all()?.neg()?, n))
}

/// Mean loss over the completion tokens of `examples` (no gradients kept).
pub fn eval_loss(model: &Llama, examples: &[Example]) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in examples {
        let (s, c) = example_loss_sum(model, ex)?;
        sum += s.detach().to_scalar::<f32>()? as f64;
        n += c;
    }
    if n == 0 {
        return Err(Error::Input("no completion tokens to evaluate".into()));
    }
    Ok(sum / n as f64)
}

/// Trains one LoRA configuration over a dataset.
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    /// The trainable adapter (attached to the model passed to [`Trainer::step`]).
    pub lora: TrainableLora,
    opt: AdamW,
    schedule: Schedule,
    order: Vec<usize>,
    epoch: usize,
    offset: usize,
    n_examples: usize,
}

impl Trainer {
    /// A trainer over `n_examples` examples for `lora` (already attached to the model).
    pub fn new(config: TrainConfig, lora: TrainableLora, n_examples: usize) -> Result<Self> {
        if n_examples == 0 {
            return Err(Error::Input("the training set is empty".into()));
        }
        if config.batch_size == 0 || config.grad_accum == 0 {
            return Err(Error::Input("batch_size and grad_accum must be > 0".into()));
        }
        let per_step = config.batch_size * config.grad_accum;
        let total_steps = config
            .max_steps
            .unwrap_or_else(|| (n_examples * config.epochs.max(1)).div_ceil(per_step));
        let schedule = Schedule {
            kind: config.schedule,
            lr: config.optimizer.lr,
            warmup_steps: config.warmup_steps,
            total_steps,
        };
        let opt = AdamW::new(lora.params(), config.optimizer.clone())?;
        let mut t = Self { config, lora, opt, schedule, order: Vec::new(), epoch: 0, offset: 0, n_examples };
        t.order = t.epoch_order(0);
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

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut rng = Rng::new(self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.n_examples).collect();
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }

    fn next_index(&mut self) -> usize {
        if self.offset >= self.order.len() {
            self.epoch += 1;
            self.offset = 0;
            self.order = self.epoch_order(self.epoch);
        }
        let i = self.order[self.offset];
        self.offset += 1;
        i
    }

    /// One optimizer step: `grad_accum` micro-batches of `batch_size` examples; the loss is
    /// the mean over all their completion tokens (as transformers computes it).
    pub fn step(&mut self, model: &Llama, examples: &[Example]) -> Result<StepMetrics> {
        if examples.len() != self.n_examples {
            return Err(Error::Input(format!("trainer built for {} examples, given {}", self.n_examples, examples.len())));
        }
        let picks: Vec<usize> = (0..self.config.batch_size * self.config.grad_accum).map(|_| self.next_index()).collect();
        let total: usize = picks
            .iter()
            .map(|&i| examples[i].labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum();
        if total == 0 {
            return Err(Error::Input("this step's examples have no completion tokens".into()));
        }
        let params = self.lora.params();
        let mut acc: HashMap<usize, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for chunk in picks.chunks(self.config.batch_size) {
            let mut sum: Option<Tensor> = None;
            for &i in chunk {
                tokens += examples[i].ids.len();
                let (s, n) = example_loss_sum(model, &examples[i])?;
                if n > 0 {
                    sum = Some(match sum {
                        Some(t) => (t + s)?,
                        None => s,
                    });
                }
            }
            let Some(sum) = sum else { continue };
            loss_sum += sum.to_scalar::<f32>()? as f64;
            let grads = (sum / total as f64)?.backward()?;
            for (k, p) in params.iter().enumerate() {
                if let Some(g) = grads.get(p.as_tensor()) {
                    let g = g.clone();
                    let merged = match acc.remove(&k) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    acc.insert(k, merged);
                }
            }
        }
        let mut store = candle_core::backprop::GradStore::default();
        for (k, g) in acc {
            store.insert(params[k].as_tensor(), g);
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut store, &params, max)?,
            None => clip_grad_norm(&mut store, &params, f64::INFINITY)?,
        };
        let lr = self.schedule.lr_at(self.opt.step);
        self.opt.step(&store, lr)?;
        Ok(StepMetrics { step: self.opt.step, loss: loss_sum / total as f64, lr, grad_norm, tokens })
    }

    /// Writes a checkpoint: `adapter/` in PEFT's format plus `trainer_state.json` and
    /// `optimizer.safetensors`; the directory is replaced as a whole.
    pub fn save_checkpoint(&self, dir: &Path, base_model: &str) -> Result<()> {
        let (m, v) = self.opt.moments();
        let mut tensors = HashMap::new();
        for (k, (mi, vi)) in m.iter().zip(v).enumerate() {
            tensors.insert(format!("m.{k}"), mi.clone());
            tensors.insert(format!("v.{k}"), vi.clone());
        }
        let state = serde_json::json!({
            "step": self.opt.step, "epoch": self.epoch, "offset": self.offset,
            "n_examples": self.n_examples, "seed": self.config.seed, "params": m.len(),
        });
        crate::lora::replace_dir(dir, |tmp| {
            self.lora.save_peft(&tmp.join("adapter"), base_model)?;
            candle_core::safetensors::save(&tensors, tmp.join("optimizer.safetensors"))?;
            std::fs::write(tmp.join("trainer_state.json"), state.to_string())
                .map_err(|e| Error::Input(format!("writing checkpoint {}: {e}", dir.display())))?;
            Ok(())
        })
    }

    /// Rebuilds a trainer from a checkpoint: attaches its adapter to `model` and restores the
    /// optimizer moments, step and data position, so training continues exactly.
    pub fn resume(model: &mut Llama, dir: &Path, config: TrainConfig, n_examples: usize) -> Result<Self> {
        let bad = |m: String| Error::Input(format!("checkpoint {}: {m}", dir.display()));
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| bad(e.to_string()))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| state.get(k).and_then(|v| v.as_u64()).map(|v| v as usize).ok_or_else(|| bad(format!("no '{k}'")));
        if get("n_examples")? != n_examples {
            return Err(bad(format!("it was written for {} examples, the data has {n_examples}", get("n_examples")?)));
        }
        let adapter = PeftAdapter::load(&dir.join("adapter"))?;
        let lora = TrainableLora::attach(model, &adapter)?;
        let mut t = Self::new(config, lora, n_examples)?;
        let opt_t = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        let n = get("params")?;
        let take = |p: &str, k: usize| opt_t.get(&format!("{p}.{k}")).cloned().ok_or_else(|| bad(format!("no optimizer moment {p}.{k}")));
        let m = (0..n).map(|k| take("m", k)).collect::<Result<Vec<_>>>()?;
        let v = (0..n).map(|k| take("v", k)).collect::<Result<Vec<_>>>()?;
        t.opt.restore(m, v, get("step")?)?;
        t.epoch = get("epoch")?;
        t.order = t.epoch_order(t.epoch);
        t.offset = get("offset")?;
        Ok(t)
    }
}
