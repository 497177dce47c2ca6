//! The built-in metrics: pure functions scoring one answer (text metrics against one or
//! more references, retrieval metrics against a set of relevant ids), plus
//! [`CommandMetric`], the escape hatch that scores a batch with a user's program.
//!
//! Every built-in score lies in `[0, 1]`, higher is better, and a run's score is the mean of
//! its items' scores ([`builtin_info`]). Each function follows the reference library that
//! defines it (SQuAD's evaluation script, Google's `rouge-score`, sacrebleu, ranx); the
//! fixtures in `tests/fixtures/metric_cases.jsonl` are computed with those libraries by
//! `scripts/make_eval_metric_fixtures.py`.

pub mod command;
pub mod retrieval;
pub mod text;

pub use command::CommandMetric;
pub use retrieval::{hit_rate_at_k, mrr_at_k, ndcg_at_k, precision_at_k, recall_at_k};
pub use text::{bleu, contains, exact_match, json_field_match, json_valid, numeric_match, regex_match, rouge_l, token_f1};

/// How the per-item scores of a metric are combined into one number for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// The mean of the item scores.
    Mean,
    /// The sum of the items' numerators over the sum of their denominators (a corpus-level
    /// ratio, such as tokens matched over tokens generated).
    RatioOfSums,
}

/// What is known about a metric before it is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricInfo {
    /// The smallest and largest score an item can get.
    pub range: (f64, f64),
    /// How item scores are combined.
    pub aggregate: Aggregate,
    /// Whether a larger score is better.
    pub higher_is_better: bool,
}

/// The kinds of built-in metrics, as a spec names them.
pub const BUILTIN_KINDS: &[&str] = &[
    "exact_match",
    "contains",
    "token_f1",
    "rouge_l",
    "bleu",
    "regex",
    "numeric_match",
    "json_valid",
    "json_field",
    "precision_at_k",
    "recall_at_k",
    "hit_rate",
    "mrr",
    "ndcg_at_k",
];

/// What is known about the built-in metric `kind` (one of [`BUILTIN_KINDS`]); `None` for
/// any other name.
pub fn builtin_info(kind: &str) -> Option<MetricInfo> {
    if BUILTIN_KINDS.contains(&kind) {
        Some(MetricInfo { range: (0.0, 1.0), aggregate: Aggregate::Mean, higher_is_better: true })
    } else {
        None
    }
}
