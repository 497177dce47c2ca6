//! User functions in evals mode (`furnace_train::hooks`): `[prompt] preprocess`,
//! `[generator] postprocess` and `[[metric]] kind = "function"` (`compute`, `accumulate`).
//!
//! Every call takes one pipeline's shard as one JSON object (the shapes are in
//! `docs/evals.md`); what comes back is checked here, and a wrong shape is an
//! [`Error::Hook`] naming the function, which fails that pipeline only.

use crate::error::{Error, Result};
use crate::generator::Message;
use crate::interval::{mean_interval, IntervalOptions};
use furnace_exp::Estimate;
use furnace_train::hooks;
use serde_json::{json, Map, Value};

/// The keys of a batch furnace fills itself; any other key is a user column.
pub const BATCH_KEYS: [&str; 4] = ["rows", "prompts", "generated_text", "contexts"];

fn bad(name: &str, msg: impl Into<String>) -> Error {
    Error::Hook { name: name.to_string(), msg: msg.into() }
}

/// Calls `name` (for `what`, in errors) with `arg`; a missing function or its failure is
/// an [`Error::Hook`] holding the message (the traceback).
pub fn call(name: &str, what: &str, arg: Value) -> Result<Value> {
    Ok(hooks::call(name, what, arg)?)
}

/// Checks that `name` is registered; `what` says what it is for.
pub fn require(name: &str, what: &str) -> Result<()> {
    hooks::require(name, what)?;
    Ok(())
}

/// One prompt a preprocess function returned: a string is one user message, a list
/// holds `{role, content}` messages.
pub fn prompt_messages(name: &str, i: usize, p: &Value) -> Result<Vec<Message>> {
    match p {
        Value::String(s) => Ok(vec![Message { role: "user".into(), content: s.clone() }]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|m| {
                let get = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
                match (get("role"), get("content")) {
                    (Some(role), Some(content)) => Ok(Message { role, content }),
                    _ => Err(bad(
                        name,
                        format!("prompt.preprocess: prompts[{i}] has a message that is not {{\"role\": str, \"content\": str}}"),
                    )),
                }
            })
            .collect(),
        _ => Err(bad(name, format!("prompt.preprocess: prompts[{i}] is neither a string nor a non-empty list of {{role, content}}"))),
    }
}

/// What a preprocess function returned: each row's prompt (as returned) with its
/// messages, and the extra columns.
pub struct Preprocessed {
    /// Per row: the prompt as the function returned it, and the messages it stands for.
    pub prompts: Vec<(Value, Vec<Message>)>,
    /// The other keys of the result (per-row columns for postprocess and metrics).
    pub columns: Map<String, Value>,
}

/// Calls the preprocess function `name` with `arg` (`{"rows", "questions", "contexts",
/// "messages", "instructions", "examples"}`) for a batch of `n` rows.
pub fn preprocess(name: &str, arg: Value, n: usize) -> Result<Preprocessed> {
    let out = call(name, "prompt.preprocess", arg)?;
    let Value::Object(mut out) = out else {
        return Err(bad(name, "prompt.preprocess must return {\"prompts\": [...]}"));
    };
    let prompts = match out.remove("prompts") {
        Some(Value::Array(p)) if p.len() == n => p,
        Some(Value::Array(p)) => {
            return Err(bad(name, format!("prompt.preprocess returned {} prompts for {n} rows", p.len())));
        }
        _ => return Err(bad(name, "prompt.preprocess must return {\"prompts\": [...]} (one prompt per row)")),
    };
    let prompts = prompts.into_iter().enumerate().map(|(i, p)| prompt_messages(name, i, &p).map(|m| (p, m))).collect::<Result<_>>()?;
    Ok(Preprocessed { prompts, columns: out })
}

/// Calls the postprocess function `name` with `batch` (`{"rows", "prompts",
/// "generated_text", "contexts", ...}`) of `n` rows; returns the batch as the function
/// returned it over the one it got (so it holds the scored `generated_text`) and the
/// scored texts.
pub fn postprocess(name: &str, batch: Map<String, Value>, n: usize) -> Result<(Map<String, Value>, Vec<String>)> {
    let out = call(name, "generator.postprocess", Value::Object(batch.clone()))?;
    let Value::Object(out) = out else {
        return Err(bad(name, "generator.postprocess must return the dict it got, with generated_text"));
    };
    let texts = match out.get("generated_text") {
        Some(Value::Array(t)) if t.len() == n => t
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(name, format!("generator.postprocess: generated_text[{i}] is not a string")))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::Array(t)) => {
            return Err(bad(name, format!("generator.postprocess returned {} generated_text for {n} rows", t.len())));
        }
        _ => return Err(bad(name, "generator.postprocess must return the dict it got, with generated_text (one string per row)")),
    };
    let mut merged = batch;
    merged.extend(out);
    Ok((merged, texts))
}

/// One shard's value of one function metric: `value` and the dict's other numeric
/// fields.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchValue {
    /// The metric's name.
    pub metric: String,
    /// Its value on the shard.
    pub value: f64,
    /// The dict's other fields that are numbers (kept for `accumulate`).
    pub extra: Vec<(String, f64)>,
}

/// Calls the compute function `name` with a shard's batch; its per-metric values, in the
/// order returned. Names in `taken` (built-in metrics, usage figures) are refused.
pub fn compute(name: &str, batch: &Map<String, Value>, taken: &[String]) -> Result<Vec<BatchValue>> {
    let out = call(name, "metric compute", Value::Object(batch.clone()))?;
    let Value::Object(out) = out else {
        return Err(bad(name, "a compute function must return {\"MetricName\": {\"value\": x}, ...}"));
    };
    if out.is_empty() {
        return Err(bad(name, "the compute function returned no metric"));
    }
    out.into_iter()
        .map(|(metric, d)| {
            if metric.is_empty() || metric.contains('/') || taken.contains(&metric) {
                return Err(bad(name, format!("'{metric}' cannot be a metric's name here (empty, with '/', or taken by another metric)")));
            }
            let value = d.get("value").and_then(Value::as_f64).filter(|v| v.is_finite()).ok_or_else(|| {
                bad(name, format!("metric {metric}: the compute function must return {{\"value\": a finite number}}, not {d}"))
            })?;
            let extra = d
                .as_object()
                .map(|o| o.iter().filter(|(k, _)| *k != "value").filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect())
                .unwrap_or_default();
            Ok(BatchValue { metric, value, extra })
        })
        .collect()
}

/// The per-shard value of metric `metric` as stored in one example's scores (`metric`
/// and `metric/field`), back as the dict `accumulate` gets.
pub fn stored_dict(metric: &str, scores: &std::collections::BTreeMap<String, f64>) -> Option<Value> {
    let value = *scores.get(metric)?;
    let mut d = Map::new();
    d.insert("value".into(), json!(value));
    let prefix = format!("{metric}/");
    for (k, v) in scores.range(prefix.clone()..) {
        let Some(field) = k.strip_prefix(&prefix) else { break };
        d.insert(field.to_string(), json!(v));
    }
    Some(Value::Object(d))
}

/// One function metric's shards so far: each shard's dict (as `accumulate` gets it) and
/// its number of examples.
pub struct Shards<'a> {
    /// The metric's name.
    pub metric: &'a str,
    /// Per shard (in order): its dict and its size.
    pub batches: Vec<(Value, usize)>,
}

/// The estimates of one function metric's names (`accumulate` given or not). With
/// accumulate, a metric it marks `is_algebraic` with a `value_range` gets an interval:
/// each shard's value counts as one draw (the shards are random, equal-sized blocks of the
/// shuffled eval set, so their values are a sample without replacement of the `shards`
/// block values) for the configured method, widened to hold the estimate; any other
/// function metric has an estimate only.
pub fn estimates(accumulate: Option<&str>, metrics: &[Shards<'_>], total_shards: usize, opts: &IntervalOptions) -> Result<Vec<Estimate>> {
    let value_of = |d: &Value| d.get("value").and_then(Value::as_f64).unwrap_or(f64::NAN);
    let Some(acc) = accumulate else {
        return Ok(metrics
            .iter()
            .map(|m| {
                let n: usize = m.batches.iter().map(|b| b.1).sum();
                let sum: f64 = m.batches.iter().map(|(d, size)| value_of(d) * *size as f64).sum();
                Estimate { name: m.metric.to_string(), value: if n > 0 { sum / n as f64 } else { f64::NAN }, bounds: None }
            })
            .collect());
    };
    let arg: Map<String, Value> =
        metrics.iter().map(|m| (m.metric.to_string(), Value::Array(m.batches.iter().map(|b| b.0.clone()).collect()))).collect();
    let out = call(acc, "metric accumulate", Value::Object(arg))?;
    let mut est = Vec::new();
    for m in metrics {
        let r = out.get(m.metric).ok_or_else(|| bad(acc, format!("the accumulate function returned nothing for {}", m.metric)))?;
        let value = r.get("value").and_then(Value::as_f64).filter(|v| v.is_finite()).ok_or_else(|| {
            bad(acc, format!("metric {}: the accumulate function must return {{\"value\": a finite number, ...}}, not {r}", m.metric))
        })?;
        let algebraic = r.get("is_algebraic").and_then(Value::as_bool).unwrap_or(false);
        let range = r.get("value_range").and_then(Value::as_array).and_then(|a| match a.as_slice() {
            [lo, hi] => Some((lo.as_f64()?, hi.as_f64()?)),
            _ => None,
        });
        let bounds = match range {
            Some((lo, hi)) if algebraic && lo.is_finite() && hi.is_finite() && lo < hi => {
                let values: Vec<f64> = m.batches.iter().map(|(d, _)| value_of(d).clamp(lo, hi)).collect();
                let shard_opts = IntervalOptions { population: Some(total_shards.max(values.len())), ..opts.clone() };
                let i = mean_interval(&values, (lo, hi), &shard_opts)
                    .map_err(|e| Error::Metric { metric: m.metric.to_string(), msg: e.to_string() })?;
                Some((i.lower.min(value), i.upper.max(value)))
            }
            _ => None,
        };
        est.push(Estimate { name: m.metric.to_string(), value, bounds });
    }
    Ok(est)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_strings_or_message_lists() {
        assert_eq!(prompt_messages("f", 0, &json!("hi")).unwrap(), vec![Message { role: "user".into(), content: "hi".into() }]);
        let m = prompt_messages("f", 0, &json!([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        for bad in [json!(3), json!([]), json!([{"role": "user"}])] {
            let e = prompt_messages("python:f", 2, &bad).unwrap_err().to_string();
            assert!(e.contains("python:f") && e.contains("prompts[2]"), "{e}");
        }
    }

    #[test]
    fn stored_dicts_read_back_the_value_and_its_numeric_fields() {
        let scores: std::collections::BTreeMap<String, f64> =
            [("acc".to_string(), 0.5), ("acc/n".to_string(), 4.0), ("accz".to_string(), 9.0), ("b".to_string(), 1.0)].into();
        assert_eq!(stored_dict("acc", &scores), Some(json!({"value": 0.5, "n": 4.0})));
        assert_eq!(stored_dict("nope", &scores), None);
    }

    #[test]
    fn without_accumulate_the_estimate_is_the_size_weighted_mean() {
        let s = Shards { metric: "m", batches: vec![(json!({"value": 1.0}), 3), (json!({"value": 0.0}), 1)] };
        let e = estimates(None, &[s], 4, &IntervalOptions::default()).unwrap();
        assert_eq!((e[0].name.as_str(), e[0].value, e[0].bounds), ("m", 0.75, None));
    }
}
