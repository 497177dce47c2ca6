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
    /// Per shard that has the metric (in order): the shard's index, its dict and its size.
    pub batches: Vec<(usize, Value, usize)>,
}

/// The size-weighted mean of a metric's shard values: its estimate without `accumulate`.
fn weighted_mean(m: &Shards<'_>) -> Estimate {
    let n: usize = m.batches.iter().map(|b| b.2).sum();
    let sum: f64 = m.batches.iter().map(|(_, d, size)| shard_value(d) * *size as f64).sum();
    Estimate { name: m.metric.to_string(), value: if n > 0 { sum / n as f64 } else { f64::NAN }, bounds: None }
}

fn shard_value(d: &Value) -> f64 {
    d.get("value").and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Calls `accumulate` with `{metric: [the dicts of the shards `pick` keeps]}` (each
/// metric that has such a shard); its answer must be an object of `{name: {"value": ...}}`.
fn accumulate_over(acc: &str, metrics: &[Shards<'_>], pick: impl Fn(usize) -> bool) -> Result<Map<String, Value>> {
    let arg: Map<String, Value> = metrics
        .iter()
        .filter_map(|m| {
            let picked: Vec<Value> = m.batches.iter().filter(|b| pick(b.0)).map(|b| b.1.clone()).collect();
            (!picked.is_empty()).then(|| (m.metric.to_string(), Value::Array(picked)))
        })
        .collect();
    match call(acc, "metric accumulate", Value::Object(arg))? {
        Value::Object(o) => Ok(o),
        other => Err(bad(acc, format!("the accumulate function must return a dict {{name: {{\"value\": ...}}}}, not {other}"))),
    }
}

fn accumulated_value(acc: &str, name: &str, r: &Value) -> Result<f64> {
    r.get("value")
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
        .ok_or_else(|| bad(acc, format!("metric {name}: the accumulate function must return {{\"value\": a finite number, ...}}, not {r}")))
}

/// The estimates of one function metric's names (`accumulate` given or not).
///
/// Without accumulate each name `compute` returned has the size-weighted mean of its shard
/// values. With it, every name accumulate returns is estimated by accumulate's value (it
/// may return names compute does not, e.g. `Accuracy` from `Correct` and `Total`); a name
/// of compute's it leaves out keeps the weighted mean. A name accumulate marks
/// `is_algebraic` with a `value_range` gets an interval: each shard's value counts as one
/// draw (the shards are random, equal-sized blocks of the shuffled eval set, so their values
/// are a sample without replacement of the `shards` block values) for the configured
/// method, widened to hold the estimate. A shard's value is compute's for that name, or, for
/// a name only accumulate returns, accumulate's over that shard alone (one call per shard).
/// Any other function metric has an estimate only. A name accumulate adds must not be one
/// of `taken` (the built-in metrics' and other function metrics' names).
pub fn estimates(
    accumulate: Option<&str>,
    metrics: &[Shards<'_>],
    taken: &[String],
    total_shards: usize,
    opts: &IntervalOptions,
) -> Result<Vec<Estimate>> {
    let Some(acc) = accumulate else {
        return Ok(metrics.iter().map(weighted_mean).collect());
    };
    let out = accumulate_over(acc, metrics, |_| true)?;
    let mut shard_ids: Vec<usize> = metrics.iter().flat_map(|m| m.batches.iter().map(|b| b.0)).collect();
    shard_ids.sort_unstable();
    shard_ids.dedup();
    // Accumulate's answer over each shard alone, asked for only when an interval needs it.
    let mut per_shard: Option<Vec<Map<String, Value>>> = None;
    let computed = |name: &str| metrics.iter().find(|m| m.metric == name);
    let mut names: Vec<&str> = metrics.iter().map(|m| m.metric).collect();
    for k in out.keys().map(String::as_str).filter(|k| computed(k).is_none()) {
        if k.is_empty() || k.contains('/') || taken.iter().any(|t| t == k) {
            return Err(bad(acc, format!("'{k}' cannot be a metric's name here (empty, with '/', or taken by another metric)")));
        }
        names.push(k);
    }
    let mut est = Vec::new();
    for name in names {
        let Some(r) = out.get(name) else {
            if let Some(m) = computed(name) {
                est.push(weighted_mean(m));
            }
            continue;
        };
        let value = accumulated_value(acc, name, r)?;
        let algebraic = r.get("is_algebraic").and_then(Value::as_bool).unwrap_or(false);
        let range = r.get("value_range").and_then(Value::as_array).and_then(|a| match a.as_slice() {
            [lo, hi] => Some((lo.as_f64()?, hi.as_f64()?)),
            _ => None,
        });
        let bounds = match range {
            Some((lo, hi)) if algebraic && lo.is_finite() && hi.is_finite() && lo < hi => {
                let raw: Vec<f64> = match computed(name) {
                    Some(m) => m.batches.iter().map(|(_, d, _)| shard_value(d)).collect(),
                    None => {
                        if per_shard.is_none() {
                            per_shard = Some(shard_ids.iter().map(|&i| accumulate_over(acc, metrics, |s| s == i)).collect::<Result<_>>()?);
                        }
                        let shards = per_shard.as_deref().unwrap_or_default();
                        shards
                            .iter()
                            .map(|o| o.get(name).map_or(Ok(f64::NAN), |r| accumulated_value(acc, name, r)))
                            .collect::<Result<_>>()?
                    }
                };
                let values: Vec<f64> = raw.into_iter().filter(|v| v.is_finite()).map(|v| v.clamp(lo, hi)).collect();
                if values.is_empty() {
                    None
                } else {
                    let shard_opts = IntervalOptions { population: Some(total_shards.max(values.len())), ..opts.clone() };
                    let i = mean_interval(&values, (lo, hi), &shard_opts)
                        .map_err(|e| Error::Metric { metric: name.to_string(), msg: e.to_string() })?;
                    Some((i.lower.min(value), i.upper.max(value)))
                }
            }
            _ => None,
        };
        est.push(Estimate { name: name.to_string(), value, bounds });
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
        let s = Shards { metric: "m", batches: vec![(0, json!({"value": 1.0}), 3), (1, json!({"value": 0.0}), 1)] };
        let e = estimates(None, &[s], &[], 4, &IntervalOptions::default()).unwrap();
        assert_eq!((e[0].name.as_str(), e[0].value, e[0].bounds), ("m", 0.75, None));
    }

    /// RapidFire's shape: compute returns counts, accumulate derives the accuracy from them.
    #[test]
    fn accumulate_may_return_names_compute_does_not() {
        let name = "python:userfn_test_acc_ratio";
        hooks::register(
            name,
            std::sync::Arc::new(|v: Value| {
                let sum = |k: &str| v[k].as_array().map_or(0.0, |a| a.iter().filter_map(|d| d["value"].as_f64()).sum::<f64>());
                let (c, t) = (sum("Correct"), sum("Total"));
                Ok(json!({"Accuracy": {"value": c / t, "is_algebraic": true, "value_range": [0, 1]}, "Total": {"value": t}}))
            }),
        );
        let shards = |vals: &[f64]| vals.iter().enumerate().map(|(i, v)| (i, json!({"value": v}), 4)).collect::<Vec<_>>();
        let correct = || Shards { metric: "Correct", batches: shards(&[4.0, 0.0, 2.0, 2.0]) };
        let total = || Shards { metric: "Total", batches: shards(&[4.0, 4.0, 4.0, 4.0]) };
        // A name of a built-in metric cannot be taken over.
        let e = estimates(Some(name), &[correct(), total()], &["Accuracy".to_string()], 8, &IntervalOptions::default()).unwrap_err();
        assert!(e.to_string().contains("'Accuracy' cannot be a metric's name"), "{e}");
        let e = estimates(Some(name), &[correct(), total()], &[], 8, &IntervalOptions::default()).unwrap();
        hooks::unregister(name);
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["Correct", "Total", "Accuracy"]);
        // Correct: left out by accumulate, the size-weighted mean of its shard values.
        assert_eq!((e[0].value, e[0].bounds), (2.0, None));
        assert_eq!((e[1].value, e[1].bounds), (16.0, None));
        let acc = &e[2];
        assert!((acc.value - 0.5).abs() < 1e-12);
        // Its shard values (1, 0, .5, .5) come from accumulate over each shard alone; they
        // spread, so the interval is proper and holds the estimate.
        let (lo, hi) = acc.bounds.expect("an algebraic metric with a range has an interval");
        assert!((0.0..0.5).contains(&lo) && 0.5 < hi && hi <= 1.0, "{lo} {hi}");
    }
}
