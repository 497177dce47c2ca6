//! Direct Preference Optimization: the losses of TRL's `DPOTrainer` over a batch of
//! preference pairs, as functions of the pairs' summed log-probabilities.
//!
//! For a pair with policy log-probabilities `πc`, `πr` (summed over the chosen and the
//! rejected answer's tokens) and the reference's `rc`, `rr`:
//! `Δ = (πc − rc) − (πr − rr)`, and with `β = beta`, `ε = label_smoothing`:
//!
//! | loss type | per-pair loss |
//! |---|---|
//! | `sigmoid` | `−log σ(βΔ)` |
//! | `hinge` | `max(0, 1 − βΔ)` |
//! | `ipo` | `(Δ̄ − 1/(2β))²`, `Δ̄` with each log-ratio divided by its answer's token count |
//! | `robust` | `(−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)` |
//! | `sigmoid_norm` | `−log σ(βΔ̄)` |
//! | `sft` | `−mean log p` over every chosen token of the batch |
//!
//! The batch loss is `Σ_k w_k · mean over pairs of loss_k` (`loss_weights`, 1 each by
//! default). Rewards are `β(πc − rc)` and `β(πr − rr)`; accuracy counts `chosen > rejected`.
//! Every loss is a function of per-answer sums (or means) of token log-probabilities, so its
//! gradient with respect to each token's log-probability is one number per answer:
//! [`batch_loss`] returns those.

use crate::error::{Error, Result};

/// One DPO loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// The original DPO loss.
    Sigmoid,
    /// SLiC's hinge loss.
    Hinge,
    /// IPO (squared, length-normalised log-ratios).
    Ipo,
    /// Robust DPO (label noise `label_smoothing`).
    Robust,
    /// The sigmoid loss over length-normalised log-ratios.
    SigmoidNorm,
    /// Negative log-likelihood of the chosen answers (mean over their tokens).
    Sft,
}

impl DpoLoss {
    /// Every loss type's name, as written in a spec.
    pub const NAMES: [&'static str; 6] = ["sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "sft"];

    /// The loss named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "sigmoid" => Self::Sigmoid,
            "hinge" => Self::Hinge,
            "ipo" => Self::Ipo,
            "robust" => Self::Robust,
            "sigmoid_norm" => Self::SigmoidNorm,
            "sft" => Self::Sft,
            _ => return None,
        })
    }
}

/// DPO settings (TRL's names).
#[derive(Debug, Clone, PartialEq)]
pub struct DpoConfig {
    /// Temperature of the implicit reward (`beta`).
    pub beta: f64,
    /// The losses and their weights (`loss_type`, `loss_weights`).
    pub losses: Vec<(DpoLoss, f64)>,
    /// Label noise of the robust loss, in `[0, 0.5)`.
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, losses: vec![(DpoLoss::Sigmoid, 1.0)], label_smoothing: 0.0 }
    }
}

/// The log-probabilities of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    /// Policy, chosen answer (sum over its tokens).
    pub chosen: f64,
    /// Policy, rejected answer.
    pub rejected: f64,
    /// Reference, chosen answer.
    pub ref_chosen: f64,
    /// Reference, rejected answer.
    pub ref_rejected: f64,
    /// Tokens of the chosen answer.
    pub n_chosen: usize,
    /// Tokens of the rejected answer.
    pub n_rejected: usize,
}

/// A batch's loss and its gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// The loss.
    pub loss: f64,
    /// Per pair: `dL/dlogp` of each token of the chosen answer.
    pub d_chosen: Vec<f64>,
    /// Per pair: `dL/dlogp` of each token of the rejected answer.
    pub d_rejected: Vec<f64>,
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl DpoConfig {
    /// Checks the settings; errors name `trainer.<key>`.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Spec { key: format!("trainer.{key}"), msg });
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return bad("beta", format!("must be a number > 0, not {}", self.beta));
        }
        if self.losses.is_empty() {
            return bad("loss_type", "needs at least one loss".into());
        }
        if let Some((_, w)) = self.losses.iter().find(|(_, w)| !w.is_finite()) {
            return bad("loss_weights", format!("must be finite numbers, not {w}"));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad("label_smoothing", format!("must be in [0, 0.5), not {}", self.label_smoothing));
        }
        Ok(())
    }

    /// The loss of a batch of pairs and `dL/dlogp` per answer token.
    pub fn batch_loss(&self, pairs: &[PairLogps]) -> BatchLoss {
        let n = pairs.len().max(1) as f64;
        let (beta, ls) = (self.beta, self.label_smoothing);
        let mut loss = 0.0;
        let mut d_chosen = vec![0.0; pairs.len()];
        let mut d_rejected = vec![0.0; pairs.len()];
        let chosen_tokens: usize = pairs.iter().map(|p| p.n_chosen).sum();
        for &(kind, w) in &self.losses {
            if kind == DpoLoss::Sft {
                // −(Σ chosen logps) / (chosen tokens of the batch).
                let total = chosen_tokens.max(1) as f64;
                loss += w * -pairs.iter().map(|p| p.chosen).sum::<f64>() / total;
                d_chosen.iter_mut().for_each(|d| *d -= w / total);
                continue;
            }
            for (i, p) in pairs.iter().enumerate() {
                let (nc, nr) = (p.n_chosen.max(1) as f64, p.n_rejected.max(1) as f64);
                let (cr, rr) = (p.chosen - p.ref_chosen, p.rejected - p.ref_rejected);
                // (value, dvalue/dΔ, dΔ/dchosen-sum, dΔ/drejected-sum)
                let (l, dl, dc, dr) = match kind {
                    DpoLoss::Sigmoid => {
                        let z = beta * (cr - rr);
                        (-log_sigmoid(z), -beta * sigmoid(-z), 1.0, -1.0)
                    }
                    DpoLoss::Hinge => {
                        let z = 1.0 - beta * (cr - rr);
                        (z.max(0.0), if z > 0.0 { -beta } else { 0.0 }, 1.0, -1.0)
                    }
                    DpoLoss::Ipo => {
                        let e = cr / nc - rr / nr - 1.0 / (2.0 * beta);
                        (e * e, 2.0 * e, 1.0 / nc, -1.0 / nr)
                    }
                    DpoLoss::Robust => {
                        let z = beta * (cr - rr);
                        let l = (-(1.0 - ls) * log_sigmoid(z) + ls * log_sigmoid(-z)) / (1.0 - 2.0 * ls);
                        let dl = -beta * ((1.0 - ls) * sigmoid(-z) + ls * sigmoid(z)) / (1.0 - 2.0 * ls);
                        (l, dl, 1.0, -1.0)
                    }
                    DpoLoss::SigmoidNorm => {
                        let z = beta * (cr / nc - rr / nr);
                        (-log_sigmoid(z), -beta * sigmoid(-z), 1.0 / nc, -1.0 / nr)
                    }
                    DpoLoss::Sft => continue,
                };
                loss += w * l / n;
                d_chosen[i] += w * dl * dc / n;
                d_rejected[i] += w * dl * dr / n;
            }
        }
        BatchLoss { loss, d_chosen, d_rejected }
    }
}

/// TRL's logged DPO metrics of a batch, means over its pairs: `rewards/chosen`,
/// `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`,
/// `logps/rejected`.
pub fn metrics(beta: f64, pairs: &[PairLogps]) -> Vec<(String, f64)> {
    let n = pairs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&PairLogps) -> f64| pairs.iter().map(f).sum::<f64>() / n;
    let rc = |p: &PairLogps| beta * (p.chosen - p.ref_chosen);
    let rr = |p: &PairLogps| beta * (p.rejected - p.ref_rejected);
    vec![
        ("rewards/chosen".into(), mean(&rc)),
        ("rewards/rejected".into(), mean(&rr)),
        ("rewards/accuracies".into(), mean(&|p| f64::from(u8::from(rc(p) > rr(p))))),
        ("rewards/margins".into(), mean(&|p| rc(p) - rr(p))),
        ("logps/chosen".into(), mean(&|p| p.chosen)),
        ("logps/rejected".into(), mean(&|p| p.rejected)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<PairLogps> {
        vec![
            PairLogps { chosen: -12.0, rejected: -15.0, ref_chosen: -13.0, ref_rejected: -14.5, n_chosen: 4, n_rejected: 6 },
            PairLogps { chosen: -8.0, rejected: -7.0, ref_chosen: -8.5, ref_rejected: -6.0, n_chosen: 3, n_rejected: 2 },
        ]
    }

    /// The analytic gradient against central differences of the loss, per answer sum.
    #[test]
    fn gradients_match_finite_differences() {
        for (kind, ls) in [
            (DpoLoss::Sigmoid, 0.0),
            (DpoLoss::Hinge, 0.0),
            (DpoLoss::Ipo, 0.0),
            (DpoLoss::Robust, 0.2),
            (DpoLoss::SigmoidNorm, 0.0),
            (DpoLoss::Sft, 0.0),
        ] {
            let cfg = DpoConfig { beta: 0.3, losses: vec![(kind, 0.7), (DpoLoss::Sigmoid, 0.2)], label_smoothing: ls };
            let ps = pairs();
            let g = cfg.batch_loss(&ps);
            let h = 1e-5;
            for i in 0..ps.len() {
                for side in 0..2 {
                    let f = |d: f64| {
                        let mut q = ps.clone();
                        // A change of one token's logp moves the answer's sum by the same.
                        if side == 0 {
                            q[i].chosen += d;
                        } else {
                            q[i].rejected += d;
                        }
                        cfg.batch_loss(&q).loss
                    };
                    let num = (f(h) - f(-h)) / (2.0 * h);
                    let ana = if side == 0 { g.d_chosen[i] } else { g.d_rejected[i] };
                    assert!((num - ana).abs() < 1e-6, "{kind:?} pair {i} side {side}: {num} vs {ana}");
                }
            }
        }
    }

    #[test]
    fn the_sigmoid_loss_at_equal_policy_and_reference_is_log_2() {
        let p = PairLogps { chosen: -3.0, rejected: -4.0, ref_chosen: -3.0, ref_rejected: -4.0, n_chosen: 2, n_rejected: 2 };
        let l = DpoConfig::default().batch_loss(&[p]).loss;
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12);
        let m = metrics(0.1, &[p]);
        assert_eq!(m[2], ("rewards/accuracies".to_string(), 0.0), "a tie is not a win");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let e = DpoConfig { beta: 0.0, ..DpoConfig::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("trainer.beta"), "{e}");
        let e = DpoConfig { label_smoothing: 0.5, ..DpoConfig::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("trainer.label_smoothing"), "{e}");
    }
}
