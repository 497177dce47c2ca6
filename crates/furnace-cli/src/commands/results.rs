//! `furnace results`: every metric of every run at every step.

use crate::args::{existing_store, RunsDir};
use anyhow::Result;
use clap::{Args, ValueEnum};
use furnace_exp::{experiment, RunStatus};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
pub struct ResultsArgs {
    /// Experiment name (default: the newest).
    experiment: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Include deleted runs.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    dir: RunsDir,
}

pub fn run(a: ResultsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let exp = experiment::find(&store, a.experiment.as_deref())?;
    if exp.mode == "evals" {
        return evals_results(&store, &exp, &a);
    }
    let visible: HashMap<i64, RunStatus> =
        store.runs(exp.id)?.into_iter().filter(|r| a.all || r.status != RunStatus::Deleted).map(|r| (r.id, r.status)).collect();
    // One row per (run, step), one column per metric.
    let mut rows: BTreeMap<(i64, i64), (f64, BTreeMap<String, f64>)> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for m in store.experiment_metrics(exp.id)? {
        if !visible.contains_key(&m.run_id) {
            continue;
        }
        if !names.contains(&m.name) {
            names.push(m.name.clone());
        }
        let e = rows.entry((m.run_id, m.step)).or_insert((m.time, BTreeMap::new()));
        e.0 = e.0.max(m.time);
        e.1.insert(m.name, m.value);
    }
    let order = ["loss", "eval_loss", "lr", "grad_norm", "tokens"];
    names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(order.len()));
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|((run, step), (time, ms))| {
                    let mut o = serde_json::Map::new();
                    o.insert("run_id".into(), (*run).into());
                    o.insert("step".into(), (*step).into());
                    o.insert("time".into(), (*time).into());
                    for (k, v) in ms {
                        o.insert(k.clone(), (*v).into());
                    }
                    serde_json::Value::Object(o)
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        }
        Format::Csv => {
            writeln!(out, "run_id,step,time,{}", names.join(","))?;
            for ((run, step), (time, ms)) in &rows {
                let vals: Vec<String> = names.iter().map(|n| ms.get(n).map(|v| v.to_string()).unwrap_or_default()).collect();
                writeln!(out, "{run},{step},{time:.3},{}", vals.join(","))?;
            }
        }
        Format::Table => {
            write!(out, "{:>4} {:>6}", "run", "step")?;
            for n in &names {
                write!(out, " {n:>12}")?;
            }
            writeln!(out)?;
            for ((run, step), (_, ms)) in &rows {
                write!(out, "{run:>4} {step:>6}")?;
                for n in &names {
                    match ms.get(n) {
                        Some(v) if n == "lr" => write!(out, " {v:>12.3e}")?,
                        Some(v) if n == "tokens" => write!(out, " {v:>12.0}")?,
                        Some(v) => write!(out, " {v:>12.5}")?,
                        None => write!(out, " {:>12}", "-")?,
                    }
                }
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

/// `0.712 ± 0.041 [0.671, 0.753]`: the estimate, the interval's half-width about it (the
/// larger side when it is not symmetric) and the interval.
pub fn interval_text(value: f64, lower: f64, upper: f64) -> String {
    let half = (value - lower).max(upper - value);
    format!("{value:.3} ± {half:.3} [{lower:.3}, {upper:.3}]")
}

/// Results of an evals experiment: per pipeline, each metric after its last shard with its
/// interval (`--format csv|json`: every shard, with `lower` and `upper`).
fn evals_results(store: &furnace_exp::Store, exp: &furnace_exp::ExperimentRow, a: &ResultsArgs) -> Result<()> {
    let runs: Vec<furnace_exp::RunRow> = store.runs(exp.id)?.into_iter().filter(|r| a.all || r.status != RunStatus::Deleted).collect();
    let bounds: HashMap<(i64, i64, String), (f64, f64)> =
        store.experiment_bounds(exp.id)?.into_iter().map(|b| ((b.run_id, b.step, b.name), (b.lower, b.upper))).collect();
    let metrics = store.experiment_metrics(exp.id)?;
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json | Format::Csv => {
            let rows: Vec<serde_json::Value> = metrics
                .iter()
                .filter(|m| runs.iter().any(|r| r.id == m.run_id))
                .map(|m| {
                    let b = bounds.get(&(m.run_id, m.step, m.name.clone()));
                    serde_json::json!({"run_id": m.run_id, "shard": m.step, "metric": m.name, "value": m.value,
                        "lower": b.map(|b| b.0), "upper": b.map(|b| b.1), "time": m.time})
                })
                .collect();
            if matches!(a.format, Format::Json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                writeln!(out, "run_id,shard,metric,value,lower,upper")?;
                for r in &rows {
                    let f = |k: &str| r[k].as_f64().map(|v| v.to_string()).unwrap_or_default();
                    writeln!(
                        out,
                        "{},{},{},{},{},{}",
                        r["run_id"],
                        r["shard"],
                        r["metric"].as_str().unwrap_or(""),
                        f("value"),
                        f("lower"),
                        f("upper")
                    )?;
                }
            }
        }
        Format::Table => {
            for run in &runs {
                let mut last: BTreeMap<String, (i64, f64)> = BTreeMap::new();
                let mut order: Vec<String> = Vec::new();
                for m in metrics.iter().filter(|m| m.run_id == run.id) {
                    if !order.contains(&m.name) {
                        order.push(m.name.clone());
                    }
                    let e = last.entry(m.name.clone()).or_insert((m.step, m.value));
                    if m.step >= e.0 {
                        *e = (m.step, m.value);
                    }
                }
                let reason = run.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
                writeln!(
                    out,
                    "run {} [{}]: {} after shard {}/{}{reason}",
                    run.id,
                    crate::human::label(run),
                    run.status.as_str(),
                    run.steps_done,
                    run.total_steps
                )?;
                for name in &order {
                    let (step, value) = last[name];
                    match bounds.get(&(run.id, step, name.clone())) {
                        Some(&(lo, hi)) => writeln!(out, "  {name:<20} {}", interval_text(value, lo, hi))?,
                        None => writeln!(out, "  {name:<20} {value:.4}")?,
                    }
                }
            }
        }
    }
    Ok(())
}
