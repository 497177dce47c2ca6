//! AdamW over LoRA factors, learning-rate schedules with warmup, and gradient clipping.
//! Our own implementation (not candle-nn's) so the optimizer state can be saved and
//! restored exactly for resumable training.

use crate::error::{Error, Result};

/// AdamW hyperparameters (PyTorch's defaults except the learning rate).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW with its moments, one pair per parameter tensor.
pub struct AdamW {
    /// Hyperparameters.
    pub config: AdamWConfig,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// An optimizer for parameter tensors of these sizes, with zero moments.
    pub fn new(sizes: &[usize], config: AdamWConfig) -> Self {
        let m: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0f32; n]).collect();
        Self { config, v: m.clone(), m, step: 0 }
    }

    /// One update of `params` with learning rate `lr` (the schedule's value for this step)
    /// from `grads` (same order and sizes).
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::Input(format!(
                "optimizer built for {} tensors, given {} parameters and {} gradients",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            if p.len() != m.len() || g.len() != m.len() {
                return Err(Error::Input("a parameter changed size under the optimizer".into()));
            }
            for i in 0..m.len() {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let m_hat = m[i] as f64 / bc1;
                let v_hat = v[i] as f64 / bc2;
                let update = m_hat / (v_hat.sqrt() + c.eps);
                p[i] = p[i] * decay - (lr * update) as f32;
            }
        }
        Ok(())
    }

    /// The moments, for checkpoints: `(m, v)` per parameter, in parameter order.
    pub fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count saved by a checkpoint.
    pub fn restore(&mut self, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>, step: usize) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.m.len() {
            return Err(Error::Input(format!("checkpoint has {} moments for {} parameters", m.len(), self.m.len())));
        }
        for ((a, b), own) in m.iter().zip(&v).zip(&self.m) {
            if a.len() != own.len() || b.len() != own.len() {
                return Err(Error::Input("checkpoint moments do not match the adapter's shapes".into()));
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Vec<f32>], max_norm: f64) -> f64 {
    let total: f64 = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum();
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let factor = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().for_each(|g| g.iter_mut().for_each(|x| *x *= factor));
    }
    norm
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Constant.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Half-cosine decay to zero at the last step.
    Cosine,
}

/// A learning-rate schedule with linear warmup (as transformers' `get_*_schedule_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Total optimizer steps.
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr * (1.0 - progress).max(0.0),
            ScheduleKind::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}
