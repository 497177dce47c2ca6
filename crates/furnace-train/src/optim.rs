//! AdamW over LoRA factors, learning-rate schedules with warmup, and gradient clipping.
//! Our own implementation (not candle-nn's) so the optimizer state can be saved and
//! restored exactly for resumable training.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

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
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW with its moments, one pair per parameter.
pub struct AdamW {
    /// Hyperparameters.
    pub config: AdamWConfig,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// An optimizer over `params` with zero moments.
    pub fn new(params: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let m = params.iter().map(|p| p.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { config, params, m, v, step: 0 })
    }

    /// One update with learning rate `lr` (the schedule's value for this step), using the
    /// gradients in `grads`; parameters without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for ((p, m), v) in self.params.iter().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
            let Some(g) = grads.get(p.as_tensor()) else { continue };
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&*m / bc1)?;
            let v_hat = (&*v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// The moments, for checkpoints: `(m, v)` per parameter, in parameter order.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores moments and the step count saved by a checkpoint.
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, step: usize) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            return Err(Error::Input(format!(
                "checkpoint has {} moments for {} parameters",
                m.len(),
                self.params.len()
            )));
        }
        for ((p, a), b) in self.params.iter().zip(&m).zip(&v) {
            if a.dims() != p.dims() || b.dims() != p.dims() {
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
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let factor = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = grads.remove(p.as_tensor()) {
                grads.insert(p.as_tensor(), (g * factor)?);
            }
        }
    }
    Ok(norm)
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
