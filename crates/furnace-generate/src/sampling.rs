//! Per-sequence sampling: repetition penalty, temperature, top-k, top-p, with a seeded RNG
//! of our own so that a seed gives the same tokens on every run and in every batch.

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
        if self.stop.iter().any(String::is_empty) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}

pub use furnace_model::rng::Rng;

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

/// Picks the next token from `logits` (modified in place).
pub fn sample(logits: &mut [f32], p: &SamplingParams, seen: &[u32], rng: &mut Rng) -> u32 {
    apply_repetition_penalty(logits, seen, p.repetition_penalty);
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
    cand[probs.len() - 1].0
}
