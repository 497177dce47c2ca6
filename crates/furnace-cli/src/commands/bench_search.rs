//! `furnace bench search`: 16 configurations (rank x learning rate x alpha) on the shipped
//! extraction task, searched exhaustively (every configuration to the end, round-robin over
//! chunks: what RapidFire does) and with ASHA (geometric rungs); then TPE and PBT within
//! ASHA's wall time. Wall time and best eval loss of each, and the ratios.

use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::Result;
use clap::Args;
use furnace_exp::{experiment, run_fit, FitOptions, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct SearchBenchArgs {
    /// Model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How the frozen base is held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Training rows.
    #[arg(long, default_value = "data/extract/train.jsonl")]
    train: PathBuf,
    /// Eval rows.
    #[arg(long, default_value = "data/extract/eval.jsonl")]
    eval: PathBuf,
    /// Use only the first N training rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Use only the first N eval rows (every run is evaluated at every chunk's end).
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Data chunks of the epoch (ASHA's resource: rungs at min_chunks x eta^k chunks).
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// ASHA's reduction factor.
    #[arg(long, default_value_t = 4)]
    eta: usize,
    /// ASHA's minimum resource in chunks (the first rung).
    #[arg(long, default_value_t = 1)]
    min_chunks: usize,
    /// Examples per micro-batch of every run.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per example at most.
    #[arg(long, default_value_t = 256)]
    max_seq_len: usize,
    /// Ways to search, comma-separated: exhaustive, asha, tpe, pbt (tpe and pbt run within
    /// ASHA's wall time, or --budget-s).
    #[arg(long, default_value = "exhaustive,asha,tpe,pbt")]
    modes: String,
    /// The wall-time budget of tpe and pbt in seconds (default: ASHA's measured time).
    #[arg(long)]
    budget_s: Option<f64>,
    /// PBT's population (random configurations of the 16 to start from).
    #[arg(long, default_value_t = 4)]
    pbt_population: usize,
    /// TPE's runs training at once.
    #[arg(long, default_value_t = 4)]
    tpe_concurrent: usize,
}

/// The grid: learning rates, ranks (alpha is r or 2r).
const LRS: [f64; 4] = [1e-5, 1e-4, 3e-4, 1e-3];
const RANKS: [usize; 2] = [8, 16];

/// What one way of searching found.
struct Outcome {
    wall: f64,
    /// The best eval loss of a run that finished, with its knobs.
    best_final: Option<(f64, String)>,
    /// The best eval loss any run reached at any chunk's end.
    best_any: f64,
    runs: usize,
    /// Chunk ends reached, summed over runs (the work done, in chunks).
    chunk_evals: usize,
    cancelled: bool,
}

fn abs(p: &Path) -> Result<String> {
    Ok(std::path::absolute(p)?.display().to_string().replace('\\', "/"))
}

/// The spec of one way of searching: `experiment` and `search` lines in place; the knobs
/// are learning rate (list) and alpha (list per rank group).
fn spec(a: &SearchBenchArgs, train: &Path, eval: &Path, name: &str, experiment: &str, search: &str) -> Result<String> {
    let quantize = match a.dtype {
        WeightDType::F32 => "none",
        WeightDType::Bf16 => "bf16",
        WeightDType::Quantized => "q4",
    };
    let lrs = LRS.iter().map(|l| format!("{l:e}")).collect::<Vec<_>>().join(", ");
    let mut s = format!(
        "[experiment]\nname = \"{name}\"\nseed = 42\nnum_chunks = {}\n{experiment}\n\n[search]\n{search}\n\n\
         [data]\ntrain = \"{}\"\neval = \"{}\"\n\n[model]\nbase = \"{}\"\nquantize = \"{quantize}\"\n\n\
         [lora]\nr = 8\nalpha = 16\ntargets = [\"all-linear\"]\n\n\
         [trainer]\nlearning_rate = {{ list = [{lrs}] }}\nepochs = 1\nbatch_size = {}\nmax_seq_len = {}\nschedule = \"constant\"\n",
        a.chunks.max(1),
        abs(train)?,
        abs(eval)?,
        a.model.replace('\\', "/"),
        a.batch,
        a.max_seq_len
    );
    for r in RANKS {
        s.push_str(&format!("\n[[group]]\n[group.lora]\nr = {r}\nalpha = {{ list = [{r}, {}] }}\n", 2 * r));
    }
    Ok(s)
}

/// The first `n` rows of `path` written to `dir/name` (all of them without `n`).
fn first_rows(path: &Path, n: Option<usize>, dir: &Path, name: &str) -> Result<PathBuf> {
    let Some(n) = n else { return Ok(path.to_path_buf()) };
    let rows: Vec<String> =
        furnace_train::data::read_rows(path)?.into_iter().filter_map(|(_, r)| r.ok()).take(n.max(1)).map(|r| r.to_string()).collect();
    let out = dir.join(name);
    std::fs::write(&out, rows.join("\n") + "\n")?;
    Ok(out)
}

/// Runs one experiment of `text` to its end (or until `budget` seconds have passed).
fn run_search(dir: &Path, model: &LoadedModel, name: &str, text: &str, budget: Option<f64>) -> Result<Outcome> {
    let spec_path = dir.join(format!("{name}.toml"));
    std::fs::write(&spec_path, text)?;
    let store = Store::open_in(&dir.join("runs"))?;
    let exp = experiment::create(&store, &spec_path)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut opts = FitOptions { cancel: Some(cancel.clone()), ..Default::default() };
    if let Some(b) = budget {
        let c = cancel.clone();
        opts.on_step = Some(Arc::new(move |_, _| {
            if t0.elapsed().as_secs_f64() >= b {
                c.store(true, Ordering::Relaxed);
            }
        }));
    }
    let m = model.clone();
    let mut loader = move |_: &str, _| Ok(m.clone());
    let events = furnace_exp::events::channel();
    let summary = run_fit(&store, &exp, &mut loader, &opts, &events)?;
    let wall = t0.elapsed().as_secs_f64();
    let (mut best_final, mut best_any, mut chunk_evals) = (None::<(f64, String)>, f64::INFINITY, 0);
    for run in &summary.runs {
        let metrics = store.metrics(run.id)?;
        let evals: Vec<(i64, f64)> = metrics.iter().filter(|m| m.name == "eval_loss").map(|m| (m.step, m.value)).collect();
        chunk_evals += metrics.iter().filter(|m| m.name == "chunk").count();
        for &(_, v) in &evals {
            best_any = best_any.min(v);
        }
        if run.status == RunStatus::Completed {
            if let Some(&(_, v)) = evals.iter().max_by_key(|e| e.0) {
                if best_final.as_ref().is_none_or(|b| v < b.0) {
                    let knobs = ["lora.r", "lora.alpha", "trainer.learning_rate"]
                        .iter()
                        .map(|k| format!("{k}={}", run.config_value(k)))
                        .collect::<Vec<_>>()
                        .join(",");
                    best_final = Some((v, knobs));
                }
            }
        }
    }
    Ok(Outcome { wall, best_final, best_any, runs: summary.runs.len(), chunk_evals, cancelled: summary.cancelled })
}

/// A setting of a run's stored config by `section.key`.
trait ConfigValue {
    fn config_value(&self, key: &str) -> String;
}

impl ConfigValue for furnace_exp::RunRow {
    fn config_value(&self, key: &str) -> String {
        let (section, name) = key.split_once('.').unwrap_or((key, ""));
        self.config.get(section).and_then(|s| s.get(name)).map(|v| v.to_string()).unwrap_or_default()
    }
}

fn report(mode: &str, o: &Outcome, budget: Option<f64>) {
    let (best, config) = match &o.best_final {
        Some((l, c)) => (format!("{l:.4}"), c.clone()),
        None => ("none".into(), "none".into()),
    };
    let budget = budget.map(|b| format!(" budget_s={b:.1}")).unwrap_or_default();
    println!(
        "RESULT search mode={mode} wall_s={:.1}{budget} runs={} chunk_evals={} best_final_eval_loss={best} best_eval_loss={:.4} \
         cancelled={} best_config={config}",
        o.wall, o.runs, o.chunk_evals, o.best_any, o.cancelled
    );
}

pub fn run(a: SearchBenchArgs) -> Result<()> {
    let modes: Vec<&str> = a.modes.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    const ORDER: [&str; 4] = ["exhaustive", "asha", "pbt", "tpe"];
    if let Some(bad) = modes.iter().find(|m| !ORDER.contains(m)) {
        anyhow::bail!("--modes: '{bad}' is not one of exhaustive, asha, tpe, pbt");
    }
    // ASHA runs before PBT and TPE whatever the order given: its wall time is their budget.
    let modes: Vec<&str> = ORDER.into_iter().filter(|m| modes.contains(m)).collect();
    let dir = tempfile::tempdir()?;
    let train = first_rows(&a.train, a.limit, dir.path(), "train.jsonl")?;
    let eval = first_rows(&a.eval, a.eval_limit, dir.path(), "eval.jsonl")?;
    let model = load(&a.model, a.dtype)?;
    let configs = LRS.len() * RANKS.len() * 2;
    let mut results = std::collections::HashMap::new();
    let mut budget = a.budget_s;
    for mode in &modes {
        let (experiment, search, limit) = match *mode {
            "exhaustive" => ("policy = \"none\"".to_string(), "kind = \"grid\"".to_string(), None),
            "asha" => (format!("policy = \"asha\"\neta = {}\nmin_chunks = {}", a.eta, a.min_chunks), "kind = \"grid\"".into(), None),
            "pbt" => (
                format!("policy = \"pbt\"\npbt_fraction = 0.25\nmax_runs = {configs}"),
                // The population: random configurations of the grid, half per rank.
                format!("kind = \"random\"\nnum_runs = {}\nseed = 42", a.pbt_population.div_ceil(2).max(1)),
                budget,
            ),
            _ => (
                "policy = \"none\"".to_string(),
                format!("kind = \"tpe\"\nnum_runs = {configs}\nmax_concurrent = {}\nseed = 42", a.tpe_concurrent.max(1)),
                budget,
            ),
        };
        let text = spec(&a, &train, &eval, &format!("bench-search-{mode}"), &experiment, &search)?;
        eprintln!("search: {mode} ({configs} configurations in the space, {} chunks)", a.chunks);
        let o = run_search(dir.path(), &model, &format!("bench-search-{mode}"), &text, limit)?;
        report(mode, &o, limit);
        if *mode == "asha" && budget.is_none() {
            budget = Some(o.wall);
        }
        results.insert(mode.to_string(), o);
    }
    if let (Some(x), Some(h)) = (results.get("exhaustive"), results.get("asha")) {
        if let (Some((bx, _)), Some((bh, _))) = (&x.best_final, &h.best_final) {
            let gap = 100.0 * (bh - bx) / bx;
            let ratio = h.wall / x.wall;
            println!(
                "RESULT search asha_vs_exhaustive time_ratio={ratio:.3} speedup={:.2}x loss_gap_pct={gap:.2} within_2pct={} \
                 target_met={}",
                x.wall / h.wall,
                gap <= 2.0,
                gap <= 2.0 && ratio <= 0.25
            );
        }
    }
    for mode in ["tpe", "pbt"] {
        if let (Some(x), Some(o)) = (results.get("exhaustive"), results.get(mode)) {
            if let Some((bx, _)) = &x.best_final {
                println!(
                    "RESULT search {mode}_vs_exhaustive loss_gap_pct={:.2} (best eval loss within the budget)",
                    100.0 * (o.best_any - bx) / bx
                );
            }
        }
    }
    Ok(())
}
