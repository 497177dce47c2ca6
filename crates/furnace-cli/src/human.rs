//! Output for people: sizes, counts, run labels and the runs table.

use anyhow::Result;
use furnace_exp::{RunRow, RunStatus, Store};
use std::collections::BTreeMap;
use std::io::Write;

/// Bytes as kB, MB or GB.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// A count as k, M or B.
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.0}k", n / 1e3)
    }
}

/// A short label of a run: its knob values.
pub fn label(run: &RunRow) -> String {
    match run.knobs.as_object() {
        Some(m) if !m.is_empty() => {
            m.iter().map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k))).collect::<Vec<_>>().join(" ")
        }
        _ => String::from("-"),
    }
}

/// The last value of each metric per run.
fn last_metrics(store: &Store, run: i64) -> Result<BTreeMap<String, f64>> {
    Ok(store.metrics(run)?.into_iter().map(|m| (m.name, m.value)).collect())
}

/// The runs table of `furnace runs` and the end of `furnace run`.
pub fn print_runs(store: &Store, runs: &[RunRow], all: bool) -> Result<()> {
    if runs.first().is_some_and(|r| furnace_exp::ops::is_evals(&r.config)) {
        return print_pipelines(store, runs, all);
    }
    let mut out = std::io::stdout().lock();
    // DPO and GRPO runs add their headline metrics (TRL's names, shortened).
    let kind = |r: &RunRow| r.config.get("trainer").and_then(|t| t.get("kind")).and_then(|k| k.as_str()).unwrap_or("sft").to_string();
    let mut extra: Vec<(&str, &str)> = Vec::new();
    if runs.iter().any(|r| kind(r) == "dpo") {
        extra.extend([("rewards/accuracies", "acc"), ("eval_rewards/accuracies", "eval_acc")]);
    }
    if runs.iter().any(|r| kind(r) == "grpo") {
        extra.extend([("reward", "reward"), ("eval_reward", "eval_reward")]);
    }
    let heads: String = extra.iter().map(|(_, h)| format!("  {h:>11}")).collect();
    writeln!(
        out,
        "{:>4}  {:<9}  {:>11}  {:>8}  {:>9}  {:>9}{heads}  {:>6}  config",
        "run", "status", "steps", "chunks", "loss", "eval_loss", "parent"
    )?;
    for r in runs.iter().filter(|r| all || r.status != RunStatus::Deleted) {
        let m = last_metrics(store, r.id)?;
        let f = |k: &str| m.get(k).map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let parent = r.parent_id.map(|p| format!("{p}{}", if r.warm { "w" } else { "" })).unwrap_or_else(|| "-".into());
        let cells: String = extra.iter().map(|(k, _)| format!("  {:>11}", f(k))).collect();
        writeln!(
            out,
            "{:>4}  {:<9}  {:>11}  {:>8}  {:>9}  {:>9}{cells}  {:>6}  {}",
            r.id,
            r.status.as_str(),
            format!("{}/{}", r.steps_done, r.total_steps),
            format!("{}/{}", r.chunks_done, r.total_chunks),
            f("loss"),
            f("eval_loss"),
            parent,
            label(r)
        )?;
    }
    Ok(())
}

/// The runs table of an evals experiment: shards done and the primary metric with its
/// interval after the last shard.
fn print_pipelines(store: &Store, runs: &[RunRow], all: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let primary = runs
        .first()
        .and_then(|r| serde_json::from_value::<furnace_evals::EvalSpec>(r.config.clone()).ok())
        .and_then(|s| s.primary())
        .map(|p| p.0)
        .unwrap_or_default();
    writeln!(out, "{:>4}  {:<9}  {:>7}  {:<34}  {:>6}  config", "run", "status", "shards", primary, "parent")?;
    for r in runs.iter().filter(|r| all || r.status != RunStatus::Deleted) {
        let value = store.metric_series(r.id, &primary)?.last().copied();
        let bounds = store.bound_series(r.id, &primary)?.last().copied();
        let shown = match (value, bounds) {
            (Some((s, v)), Some((bs, lo, hi))) if s == bs => crate::commands::results::interval_text(v, lo, hi),
            (Some((_, v)), _) => format!("{v:.3}"),
            _ => "-".into(),
        };
        let parent = r.parent_id.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:>4}  {:<9}  {:>7}  {:<34}  {:>6}  {}",
            r.id,
            r.status.as_str(),
            format!("{}/{}", r.steps_done, r.total_steps),
            shown,
            parent,
            label(r)
        )?;
    }
    Ok(())
}
