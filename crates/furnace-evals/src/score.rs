//! Scoring: each metric of a pipeline on each answered example, and each metric's
//! estimate and interval over the examples scored so far.

use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::interval::{mean_interval, ratio_interval, IntervalOptions};
use crate::metrics as m;
use crate::spec::{EvalSpec, MetricSpec};
use furnace_exp::{Estimate, ExampleRecord};
use std::collections::BTreeMap;
use std::time::Duration;

/// A compiled metric.
pub struct Scorer {
    /// Its name in results.
    pub name: String,
    /// Its spec.
    pub spec: MetricSpec,
    /// The cutoff of a retrieval metric.
    k: usize,
    regex: Option<regex::Regex>,
    command: Option<m::CommandMetric>,
}

impl Scorer {
    /// The metrics of a pipeline.
    pub fn all(spec: &EvalSpec) -> Result<Vec<Scorer>> {
        let rag_k = spec.rag.as_ref().map(|r| r.k);
        spec.metrics
            .iter()
            .map(|ms| {
                let name = ms.display_name(rag_k);
                let regex = match &ms.pattern {
                    Some(p) if ms.kind == "regex" => {
                        Some(regex::Regex::new(p).map_err(|e| Error::Metric { metric: name.clone(), msg: format!("bad pattern: {e}") })?)
                    }
                    _ => None,
                };
                let command = (ms.kind == "command").then(|| m::CommandMetric {
                    name: name.clone(),
                    argv: ms.command.clone(),
                    timeout: Duration::from_secs_f64(ms.timeout_secs.unwrap_or(600.0)),
                });
                Ok(Scorer { name, spec: ms.clone(), k: ms.k.or(rag_k).unwrap_or(1), regex, command })
            })
            .collect()
    }

    /// Whether the score comes from a program or a judge (scored per batch, not here).
    pub fn is_batched(&self) -> bool {
        matches!(self.spec.kind.as_str(), "command" | "judge")
    }

    /// Whether user functions compute it (per shard, by the driver; its estimates come
    /// from `userfn::estimates`, not [`estimates`]).
    pub fn is_function(&self) -> bool {
        self.spec.is_function()
    }

    /// The score of one example by a built-in metric.
    pub fn score(&self, ex: &Example, prediction: &str, retrieved: &[String]) -> f64 {
        let s = &self.spec;
        let refs = &ex.answers;
        match s.kind.as_str() {
            "exact_match" => m::exact_match(prediction, refs, s.normalize),
            "contains" => m::contains(prediction, refs, s.normalize),
            "token_f1" => m::token_f1(prediction, refs),
            "rouge_l" => m::rouge_l(prediction, refs),
            "bleu" => m::bleu(prediction, refs),
            "regex" => self.regex.as_ref().map(|r| m::regex_match(prediction, r)).unwrap_or(0.0),
            "numeric_match" => m::numeric_match(prediction, refs, s.rel_tol.unwrap_or(1e-9), s.abs_tol.unwrap_or(0.0)),
            "json_valid" => m::json_valid(prediction),
            "json_field" => m::json_field_match(prediction, refs, s.field.as_deref().unwrap_or("")),
            "precision_at_k" => m::precision_at_k(retrieved, &ex.relevant, self.k),
            "recall_at_k" => m::recall_at_k(retrieved, &ex.relevant, self.k),
            "hit_rate" => m::hit_rate_at_k(retrieved, &ex.relevant, self.k),
            "mrr" => m::mrr_at_k(retrieved, &ex.relevant, self.k),
            "ndcg_at_k" => m::ndcg_at_k(retrieved, &ex.relevant, self.k),
            _ => f64::NAN,
        }
    }

    /// Scores a batch with the external program: one JSON line per example in, one score
    /// out.
    pub fn score_command(&self, items: &[serde_json::Value]) -> Result<Vec<f64>> {
        match &self.command {
            Some(c) => c.score(items),
            None => Err(Error::Metric { metric: self.name.clone(), msg: "not a command metric".into() }),
        }
    }

    /// [`Scorer::score_command`] for a ratio metric: `(num, den)` per example.
    pub fn score_command_ratio(&self, items: &[serde_json::Value]) -> Result<Vec<(f64, f64)>> {
        match &self.command {
            Some(c) => c.score_ratio(items),
            None => Err(Error::Metric { metric: self.name.clone(), msg: "not a command metric".into() }),
        }
    }

    /// The range of its values.
    pub fn range(&self) -> (f64, f64) {
        let (lo, hi, _, _) = self.spec.info();
        (lo, hi)
    }
}

/// The always-recorded figures: tokens, latency, throughput, cost.
pub const USAGE_METRICS: [&str; 5] = ["prompt_tokens", "completion_tokens", "latency", "throughput", "cost"];

/// Every metric's estimate (and interval) over the examples scored so far, in order, then
/// the usage figures; `population` is the eval set's size, `wall` the seconds the
/// pipeline's shards took. Function metrics are left out (the driver adds theirs after
/// the others, before the usage figures).
pub fn estimates(
    scorers: &[Scorer],
    examples: &[ExampleRecord],
    opts: &IntervalOptions,
    wall: f64,
    cost: Option<f64>,
) -> Result<Vec<Estimate>> {
    let mut out = Vec::new();
    for s in scorers.iter().filter(|s| !s.is_function()) {
        let (lo, hi, ratio, _) = s.spec.info();
        let interval = if ratio {
            let nums: Vec<f64> = examples.iter().map(|e| e.scores.get(&format!("{}/num", s.name)).copied().unwrap_or(0.0)).collect();
            let dens: Vec<f64> = examples.iter().map(|e| e.scores.get(&format!("{}/den", s.name)).copied().unwrap_or(0.0)).collect();
            ratio_interval(&nums, &dens, opts)
        } else {
            let values: Vec<f64> = examples.iter().map(|e| e.scores.get(&s.name).copied().unwrap_or(lo).clamp(lo, hi)).collect();
            mean_interval(&values, (lo, hi), opts)
        }
        .map_err(|e| Error::Metric { metric: s.name.clone(), msg: e.to_string() })?;
        out.push(Estimate { name: s.name.clone(), value: interval.estimate, bounds: Some((interval.lower, interval.upper)) });
    }
    let n = examples.len().max(1) as f64;
    let mean = |f: &dyn Fn(&ExampleRecord) -> f64| examples.iter().map(f).sum::<f64>() / n;
    out.push(Estimate { name: "prompt_tokens".into(), value: mean(&|e| e.prompt_tokens as f64), bounds: None });
    out.push(Estimate { name: "completion_tokens".into(), value: mean(&|e| e.completion_tokens as f64), bounds: None });
    out.push(Estimate { name: "latency".into(), value: mean(&|e| e.latency), bounds: None });
    if wall > 0.0 {
        out.push(Estimate { name: "throughput".into(), value: examples.len() as f64 / wall, bounds: None });
    }
    if let Some(c) = cost {
        out.push(Estimate { name: "cost".into(), value: c, bounds: None });
    }
    Ok(out)
}

/// A judge's answer read as a score: the first number in it, which must lie in `range`.
pub fn parse_judge_score(text: &str, range: (f64, f64)) -> Option<f64> {
    let v = *m::text::numbers_in(text).first()?;
    (v >= range.0 && v <= range.1).then_some(v)
}

/// Scores of one example, by metric name.
pub type Scores = BTreeMap<String, f64>;

#[cfg(test)]
mod tests {
    use super::parse_judge_score;

    #[test]
    fn a_judge_score_is_the_first_number_in_range() {
        assert_eq!(parse_judge_score("4", (0.0, 5.0)), Some(4.0));
        assert_eq!(parse_judge_score("Score: 3.5/5", (0.0, 5.0)), Some(3.5));
        assert_eq!(parse_judge_score("7", (0.0, 5.0)), None);
        assert_eq!(parse_judge_score("good", (0.0, 5.0)), None);
    }
}
