//! Per-sequence sampling: repetition, presence and frequency penalties, temperature, top-k,
//! top-p, with a seeded RNG of our own so that a seed gives the same tokens on every run and
//! in every batch; and the log-probabilities a sequence may report for its tokens.

use serde::{Deserialize, Serialize};

/// How one sequence picks its tokens and when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1.0 = off).
    pub top_p: f32,
    /// Keep this many most likely tokens (0 = off).
    pub top_k: usize,
    /// HF-style repetition penalty over prompt and generated tokens (1.0 = off).
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2] (0 = off): subtracted once from the logit of
    /// every token already generated (prompt tokens do not count).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2] (0 = off): subtracted from the logit of every
    /// token as many times as it has been generated (prompt tokens do not count).
    pub frequency_penalty: f32,
    /// Report log-probabilities: `None` = off; `Some(k)` = the chosen token's and the `k`
    /// (at most [`MAX_LOGPROBS`]) most likely tokens', from the model's raw logits (before
    /// penalties, constraint, temperature, top-k and top-p).
    pub logprobs: Option<usize>,
    /// RNG seed; `None` draws one from the clock.
    pub seed: Option<u64>,
    /// Most new tokens.
    pub max_tokens: usize,
    /// Strings that end generation; the text is cut before them.
    pub stop: Vec<String>,
    /// End at an end-of-sequence token.
    pub stop_at_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens`.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { max_tokens, ..Self::default() }
    }

    /// Checks the values, with a message naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_LOGPROBS {
                return Err(format!("logprobs must be at most {MAX_LOGPROBS}, got {k}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

pub use furnace_model::rng::Rng;

/// The most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// The log-probability of one generated token, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Log-probability of the chosen token under the model's raw logits.
    pub logprob: f32,
    /// The `k` most likely tokens with their log-probabilities, most likely first (ties by
    /// id); it holds the chosen token only when it is among them.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` (computed in f64) at `chosen`, with the `k` most likely
/// tokens (descending, ties by id).
pub fn token_logprob(logits: &[f32], chosen: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = k.min(cand.len());
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, by_logit);
    }
    cand.truncate(k);
    cand.sort_unstable_by(by_logit);
    TokenLogprob {
        logprob: logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: cand.into_iter().map(|(i, l)| (i, lp(l))).collect(),
    }
}

/// Applies OpenAI's presence and frequency penalties in place: `logit[t] -= frequency *
/// count[t] + presence` for every token `t` generated `count[t] > 0` times. Costs nothing
/// when both are 0.
pub fn apply_presence_frequency_penalties(logits: &mut [f32], counts: &std::collections::HashMap<u32, u32>, presence: f32, frequency: f32) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    for (&id, &n) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            if n > 0 {
                *l -= frequency * n as f32 + presence;
            }
        }
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies the repetition penalty in place (HF's rule: positive logits are divided by the
/// penalty, negative ones multiplied) to every token seen.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && done.insert(i) {
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

/// Picks the next token from `logits` (modified in place) after the repetition penalty over
/// `seen` ([`pick`] without it).
pub fn sample(logits: &mut [f32], p: &SamplingParams, seen: &[u32], rng: &mut Rng) -> u32 {
    apply_repetition_penalty(logits, seen, p.repetition_penalty);
    pick(logits, p, rng)
}

/// Picks the next token from `logits` (modified in place; penalties already applied) by
/// temperature, top-k and top-p. Tokens at `-inf` (masked) are never picked unless every
/// token is.
pub fn pick(logits: &mut [f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
    // Descending by logit, ties by id, so the order is deterministic.
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.select_nth_unstable_by(p.top_k - 1, by_logit);
        cand.truncate(p.top_k);
    }
    cand.sort_unstable_by(by_logit);
    let max = cand.first().map(|c| c.1).unwrap_or(0.0);
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return cand[i].0;
        }
    }
    // Rounding left `u` past the total: the last token with any probability.
    let last = probs.iter().rposition(|&q| q > 0.0).unwrap_or(0);
    cand[last].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let mut logits = vec![1.0f32, 2.0, 3.0, -1.0];
        let counts: HashMap<u32, u32> = [(1, 3), (3, 1)].into_iter().collect();
        apply_presence_frequency_penalties(&mut logits, &counts, 0.5, 0.25);
        // Token 1: 2 - (0.25 * 3 + 0.5); token 3: -1 - (0.25 + 0.5); others untouched.
        assert_eq!(logits, vec![1.0, 0.75, 3.0, -1.75]);
        let mut neg = vec![0.0f32; 3];
        apply_presence_frequency_penalties(&mut neg, &[(2, 2)].into_iter().collect(), -1.0, -2.0);
        assert_eq!(neg, vec![0.0, 0.0, 5.0], "negative penalties favour repeats");
        let mut off = vec![0.5f32; 3];
        apply_presence_frequency_penalties(&mut off, &[(0, 9), (7, 1)].into_iter().collect(), 0.0, 0.0);
        assert_eq!(off, vec![0.5; 3]);
    }

    #[test]
    fn penalties_change_the_greedy_choice() {
        let p = SamplingParams { frequency_penalty: 1.0, ..SamplingParams::greedy(1) };
        let mut logits = vec![0.0f32, 2.5, 2.0];
        let counts: HashMap<u32, u32> = [(1, 1)].into_iter().collect();
        apply_presence_frequency_penalties(&mut logits, &counts, p.presence_penalty, p.frequency_penalty);
        assert_eq!(pick(&mut logits, &p, &mut Rng::new(0)), 2);
    }

    #[test]
    fn penalty_and_logprob_bounds_are_validated() {
        for (name, p) in [
            ("presence_penalty", SamplingParams { presence_penalty: 2.5, ..Default::default() }),
            ("frequency_penalty", SamplingParams { frequency_penalty: -2.01, ..Default::default() }),
            ("frequency_penalty", SamplingParams { frequency_penalty: f32::NAN, ..Default::default() }),
            ("logprobs", SamplingParams { logprobs: Some(21), ..Default::default() }),
        ] {
            let err = p.validate().expect_err(name);
            assert!(err.contains(name), "{err}");
        }
        let ok = SamplingParams { presence_penalty: -2.0, frequency_penalty: 2.0, logprobs: Some(20), ..Default::default() };
        assert_eq!(ok.validate(), Ok(()));
        let parsed: SamplingParams = serde_json::from_str("{}").expect("defaults");
        assert_eq!((parsed.presence_penalty, parsed.frequency_penalty, parsed.logprobs), (0.0, 0.0, None));
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_top() {
        let logits = vec![1.0f32, 3.0, 3.0, -2.0, 0.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let lp = token_logprob(&logits, 4, 3);
        assert!((lp.logprob as f64 - (0.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0], "descending, ties by id");
        assert!((lp.top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert_eq!(token_logprob(&logits, 1, 0).top, vec![]);
        assert_eq!(token_logprob(&logits, 1, 99).top.len(), 5);
        // Large logits do not overflow.
        let big = token_logprob(&[1000.0, 1000.0], 0, 1);
        assert!((big.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
    }

    #[test]
    fn masked_tokens_are_never_sampled() {
        let p = SamplingParams { temperature: 1.0, top_p: 1.0, ..Default::default() };
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let mut logits = vec![f32::NEG_INFINITY, 0.3, f32::NEG_INFINITY, 0.1, f32::NEG_INFINITY];
            let t = pick(&mut logits, &p, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
    }
}
