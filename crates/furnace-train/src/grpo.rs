//! Group Relative Policy Optimization: TRL's `GRPOTrainer` advantages and loss.
//!
//! Each prompt gets `num_generations` completions (a group), sampled from the current
//! adapter. Every reward function scores every completion; the reward is their weighted
//! sum (a reward that does not apply, NaN, counts as 0 there) and the advantage is
//! `A = r − mean(group)`, divided by `std + 1e-4` with `scale_rewards = "group"` (the
//! group's unbiased std, the default) or `"batch"` (the whole batch's), not divided with
//! `"none"`.
//!
//! Per completion token `t` with policy log-probability `lp`, the log-probability when it
//! was sampled `old` (equal to `lp` unless a batch is reused, `num_iterations > 1`) and the
//! reference's `ref` (the base without the adapter): `ρ = exp(lp − old)`,
//! `ℓ_t = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) + β ρ (exp(ref − lp) − (ref − lp) − 1)`
//! (the KL term times `ρ` with `use_bias_correction_kl`, TRL's default: `ρ` is 1 on-policy
//! but its gradient is not 0).
//! The loss of a micro-batch of `S` completions with `n_s` tokens each, in a step of `M`
//! micro-batches and `T` completion tokens:
//!
//! | loss_type | loss |
//! |---|---|
//! | `grpo` | `(1/M) mean_s (Σ_t ℓ_t / n_s)` |
//! | `bnpo` | `(1/M) Σ ℓ / Σ_s n_s` |
//! | `dr_grpo` | `(1/M) Σ ℓ / (S · max_completion_length)` |
//! | `dapo` | `Σ ℓ / T` |

use crate::error::{Error, Result};

/// How token losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLoss {
    /// Per-sequence means, averaged.
    Grpo,
    /// Mean over the micro-batch's tokens.
    Bnpo,
    /// Sum over a fixed `completions × max_completion_length`.
    DrGrpo,
    /// Mean over the step's tokens.
    Dapo,
}

impl GrpoLoss {
    /// Names as written in a spec.
    pub const NAMES: [&'static str; 4] = ["grpo", "bnpo", "dr_grpo", "dapo"];

    /// The loss named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "dapo" => Self::Dapo,
            _ => return None,
        })
    }
}

/// How advantages are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// By each group's std.
    Group,
    /// By the batch's std.
    Batch,
    /// Not scaled.
    None,
}

impl ScaleRewards {
    /// Names as written in a spec.
    pub const NAMES: [&'static str; 3] = ["group", "batch", "none"];

    /// The scaling named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "group" | "true" => Self::Group,
            "batch" => Self::Batch,
            "none" | "false" => Self::None,
            _ => return None,
        })
    }
}

/// GRPO settings (TRL's names).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// Completions per prompt.
    pub num_generations: usize,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling.
    pub top_p: f32,
    /// Top-k sampling (0 = off).
    pub top_k: usize,
    /// Longest completion in tokens.
    pub max_completion_length: usize,
    /// KL coefficient (0: no reference pass).
    pub beta: f64,
    /// Lower clipping bound of the importance ratio.
    pub epsilon_low: f64,
    /// Upper clipping bound.
    pub epsilon_high: f64,
    /// How token losses are averaged.
    pub loss_type: GrpoLoss,
    /// How advantages are scaled.
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps per sampled batch.
    pub num_iterations: usize,
    /// Weights of the reward functions (None: the `[[reward]]` tables' own).
    pub reward_weights: Option<Vec<f64>>,
    /// Multiply the KL term by the importance ratio (TRL's default), which makes its
    /// gradient the unbiased reverse-KL gradient even on-policy.
    pub use_bias_correction_kl: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_completion_length: 256,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            loss_type: GrpoLoss::Dapo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            reward_weights: None,
            use_bias_correction_kl: true,
        }
    }
}

impl GrpoConfig {
    /// Checks the settings; errors name `trainer.<key>`.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Spec { key: format!("trainer.{key}"), msg });
        if self.num_generations < 2 {
            return bad(
                "num_generations",
                format!("must be at least 2 (advantages compare completions of one prompt), not {}", self.num_generations),
            );
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", format!("must be > 0 (GRPO samples), not {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], not {}", self.top_p));
        }
        if self.max_completion_length == 0 {
            return bad("max_completion_length", "must be > 0".into());
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be >= 0, not {}", self.beta));
        }
        if !(self.epsilon_low.is_finite() && (0.0..1.0).contains(&self.epsilon_low)) {
            return bad("epsilon", format!("must be in [0, 1), not {}", self.epsilon_low));
        }
        if !(self.epsilon_high.is_finite() && self.epsilon_high >= 0.0) {
            return bad("epsilon_high", format!("must be >= 0, not {}", self.epsilon_high));
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be > 0".into());
        }
        if let Some(w) = &self.reward_weights {
            if w.iter().any(|w| !w.is_finite()) {
                return bad("reward_weights", "must be finite numbers".into());
            }
        }
        Ok(())
    }
}

/// Mean and unbiased std ignoring NaN (torch's `nanmean`, TRL's `nanstd`).
pub(crate) fn nan_mean_std(v: &[f64]) -> (f64, f64) {
    let xs: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// What a batch's rewards give.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// The weighted reward of each completion.
    pub rewards: Vec<f64>,
    /// Its advantage.
    pub advantages: Vec<f64>,
    /// The std each advantage was scaled by (the group's or the batch's).
    pub std: Vec<f64>,
}

/// Rewards → advantages: `per_func[f][i]` is reward `f` of completion `i`; completions
/// `g·G .. (g+1)·G` are prompt `g`'s group.
pub fn advantages(per_func: &[Vec<f64>], weights: &[f64], num_generations: usize, scale: ScaleRewards) -> Advantages {
    let n = per_func.first().map_or(0, Vec::len);
    let rewards: Vec<f64> =
        (0..n).map(|i| per_func.iter().zip(weights).map(|(r, w)| r[i] * w).filter(|x| !x.is_nan()).sum::<f64>()).collect();
    let g = num_generations.max(1);
    let batch_std = nan_mean_std(&rewards).1;
    let mut advantages = Vec::with_capacity(n);
    let mut std = Vec::with_capacity(n);
    for group in rewards.chunks(g) {
        let (mean, gstd) = nan_mean_std(group);
        let s = match scale {
            ScaleRewards::Batch => batch_std,
            _ => gstd,
        };
        for &r in group {
            let a = r - mean;
            let a = if scale == ScaleRewards::None { a } else { a / (s + 1e-4) };
            advantages.push(if a.is_nan() { 0.0 } else { a });
            std.push(s);
        }
    }
    Advantages { rewards, advantages, std }
}

/// One completion's terms in the loss.
#[derive(Debug, Clone, Copy)]
pub struct TokenTerms<'a> {
    /// The policy's log-probabilities of its tokens.
    pub logps: &'a [f32],
    /// When sampled (None: the policy's, detached).
    pub old: Option<&'a [f32]>,
    /// The reference's (needed when `beta > 0`).
    pub reference: Option<&'a [f32]>,
    /// Its advantage.
    pub advantage: f64,
    /// The weight of its token losses in the objective (see the module docs).
    pub scale: f64,
}

/// Sums over the tokens of a batch, for the logged metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenStats {
    /// Tokens.
    pub tokens: usize,
    /// Sum of the per-token KL.
    pub kl: f64,
    /// Tokens whose ratio fell below `1 − ε_low` with a negative advantage.
    pub low_clipped: usize,
    /// Tokens whose ratio rose above `1 + ε_high` with a positive advantage.
    pub high_clipped: usize,
}

/// The loss `Σ_s scale_s Σ_t ℓ_t` of a batch and `dL/dlp` of every token.
pub fn token_objective(cfg: &GrpoConfig, seqs: &[TokenTerms]) -> (f64, Vec<Vec<f32>>, TokenStats) {
    let mut loss = 0.0;
    let mut stats = TokenStats::default();
    let (lo, hi) = (1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high);
    let grads = seqs
        .iter()
        .map(|s| {
            let a = s.advantage;
            s.logps
                .iter()
                .enumerate()
                .map(|(t, &lp)| {
                    let lp = f64::from(lp);
                    let old = s.old.map_or(lp, |o| f64::from(o[t]));
                    let rho = (lp - old).exp();
                    let clipped = rho.clamp(lo, hi);
                    let (l1, l2) = (rho * a, clipped * a);
                    // −min(l1, l2); the clipped branch has no gradient outside [lo, hi].
                    let (mut l, mut d) = if l1 <= l2 || (lo..=hi).contains(&rho) { (-l1, -a * rho) } else { (-l2, 0.0) };
                    stats.tokens += 1;
                    stats.low_clipped += usize::from(rho < lo && a < 0.0);
                    stats.high_clipped += usize::from(rho > hi && a > 0.0);
                    if cfg.beta != 0.0 {
                        let r = s.reference.map_or(lp, |r| f64::from(r[t]));
                        let e = (r - lp).exp();
                        let kl = e - (r - lp) - 1.0;
                        let (kl, dkl) = if cfg.use_bias_correction_kl { (kl * rho, rho * (1.0 - e) + kl * rho) } else { (kl, 1.0 - e) };
                        stats.kl += kl;
                        l += cfg.beta * kl;
                        d += cfg.beta * dkl;
                    }
                    loss += s.scale * l;
                    (s.scale * d) as f32
                })
                .collect()
        })
        .collect();
    (loss, grads, stats)
}

/// The weight of each completion's token losses in a micro-batch of `lens` completions
/// (tokens each), in a step of `micro_batches` micro-batches and `step_tokens` tokens.
pub fn token_scales(cfg: &GrpoConfig, lens: &[usize], micro_batches: usize, step_tokens: usize) -> Vec<f64> {
    let m = micro_batches.max(1) as f64;
    let s = lens.len().max(1) as f64;
    let tokens: usize = lens.iter().sum();
    lens.iter()
        .map(|&n| match cfg.loss_type {
            GrpoLoss::Grpo => 1.0 / (n.max(1) as f64 * s * m),
            GrpoLoss::Bnpo => 1.0 / (tokens.max(1) as f64 * m),
            GrpoLoss::DrGrpo => 1.0 / (s * cfg.max_completion_length as f64 * m),
            GrpoLoss::Dapo => 1.0 / step_tokens.max(1) as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_gradients_match_finite_differences() {
        let logps = [-1.2f32, -0.3, -2.5, -0.9];
        let old = [-1.0f32, -0.9, -2.0, -0.95];
        let reference = [-1.5f32, -0.2, -2.2, -1.1];
        for (beta, bias) in [(0.0, true), (0.04, true), (0.04, false)] {
            for a in [1.3, -0.7] {
                let cfg = GrpoConfig { beta, epsilon_low: 0.2, epsilon_high: 0.28, use_bias_correction_kl: bias, ..GrpoConfig::default() };
                let loss_at = |lp: &[f32]| {
                    let s = TokenTerms { logps: lp, old: Some(&old), reference: Some(&reference), advantage: a, scale: 0.25 };
                    token_objective(&cfg, &[s]).0
                };
                let s = TokenTerms { logps: &logps, old: Some(&old), reference: Some(&reference), advantage: a, scale: 0.25 };
                let (_, g, _) = token_objective(&cfg, &[s]);
                for t in 0..logps.len() {
                    let h = 1e-3f32;
                    let mut p = logps;
                    p[t] += h;
                    let mut m = logps;
                    m[t] -= h;
                    let num = (loss_at(&p) - loss_at(&m)) / (2.0 * f64::from(h));
                    assert!((num - f64::from(g[0][t])).abs() < 1e-4, "beta {beta} a {a} t {t}: {num} vs {}", g[0][t]);
                }
            }
        }
    }

    #[test]
    fn advantages_are_group_normalised() {
        let per_func = vec![vec![1.0, 0.0, 1.0, 2.0, 2.0, 2.0], vec![0.5, 0.5, f64::NAN, 0.0, 1.0, 0.0]];
        let a = advantages(&per_func, &[1.0, 2.0], 3, ScaleRewards::Group);
        assert_eq!(a.rewards, vec![2.0, 1.0, 1.0, 2.0, 4.0, 2.0]);
        let (m, s) = (4.0 / 3.0, (1.0f64 / 3.0).sqrt());
        assert!((a.advantages[0] - (2.0 - m) / (s + 1e-4)).abs() < 1e-12);
        let none = advantages(&per_func, &[1.0, 2.0], 3, ScaleRewards::None);
        assert!((none.advantages[4] - (4.0 - 8.0 / 3.0)).abs() < 1e-12);
        // A group whose rewards are all equal has zero advantages.
        let flat = advantages(&[vec![1.0; 3]], &[1.0], 3, ScaleRewards::Group);
        assert_eq!(flat.advantages, vec![0.0; 3]);
    }
}
