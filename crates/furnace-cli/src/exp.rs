//! Experiments from the command line: `furnace run` (train every config of a spec together,
//! with the API server), `furnace runs`, `furnace results`, `furnace ops`.

use crate::commands::load;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use furnace_exp::server::{self, ServerOptions};
use furnace_exp::{experiment, ops, run_fit, Event, FitOptions, OpKind, RunRow, RunStatus, Store};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where the store and experiment folders live.
#[derive(Args, Clone)]
pub struct RunsDir {
    /// Folder holding the store (furnace.db) and one folder per experiment.
    #[arg(long, default_value = "runs", global = true)]
    runs_dir: PathBuf,
}

#[derive(Args)]
pub struct RunArgs {
    /// The spec (TOML); knobs and [[group]]s expand into the runs.
    spec: Option<PathBuf>,
    /// Continue this existing experiment (its unfinished runs and pending ops) instead.
    #[arg(long, conflicts_with = "spec")]
    experiment: Option<String>,
    /// Start a new experiment even when the last one from this spec was interrupted
    /// (by default `furnace run` continues it from its checkpoints).
    #[arg(long)]
    fresh: bool,
    /// Memory the runs' own state may take at once (e.g. 8G, 512M); runs beyond it wait
    /// their turn. Default: 70% of the memory available after loading the base.
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// Address of the API server.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port of the API server (0: any free port).
    #[arg(long, default_value_t = server::DEFAULT_PORT)]
    port: u16,
    /// Bearer token the API requires (needed to bind anything but loopback).
    #[arg(long)]
    token: Option<String>,
    /// Do not start the API server.
    #[arg(long)]
    no_server: bool,
    #[command(flatten)]
    dir: RunsDir,
}

#[derive(Args)]
pub struct RunsArgs {
    /// Experiment name (default: the newest).
    experiment: Option<String>,
    /// Include deleted runs.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    dir: RunsDir,
}

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

#[derive(Subcommand)]
pub enum OpsCmd {
    /// Take a run out of training (its state is kept; resume brings it back).
    Stop { run: i64 },
    /// Put a stopped run back into training.
    Resume { run: i64 },
    /// Remove a run from views and scheduling (its files are kept).
    Delete { run: i64 },
    /// A new run from RUN's config with changed settings.
    Clone {
        run: i64,
        /// A changed setting, section.key=value (repeatable): --set lora.r=64
        /// --set trainer.learning_rate=1e-4
        #[arg(long = "set")]
        set: Vec<String>,
        /// Start from the parent's adapter, optimizer state and data position (same rank
        /// and targets); without it the clone starts from scratch.
        #[arg(long)]
        warm: bool,
    },
    /// List the ops of an experiment (default: the newest).
    List { experiment: Option<String> },
}

#[derive(Args)]
pub struct OpsArgs {
    #[command(subcommand)]
    cmd: OpsCmd,
    #[command(flatten)]
    dir: RunsDir,
}

fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = match t.trim_end_matches('B').chars().last() {
        Some('K') => (&t[..t.trim_end_matches('B').len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 20),
        Some('G') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 30),
        Some('T') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 40),
        _ => (t.trim_end_matches('B'), 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size like 8G, 512M or 1000000"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("'{s}' must be > 0"));
    }
    Ok((v * mult as f64) as u64)
}

fn open_store(dir: &RunsDir) -> Result<Store> {
    Store::open_in(&dir.runs_dir).with_context(|| format!("opening the store in {}", dir.runs_dir.display()))
}

/// The store of an existing runs folder (the views and ops never create one).
fn existing_store(dir: &RunsDir) -> Result<Store> {
    let db = dir.runs_dir.join(furnace_exp::store::DB_FILE);
    if !db.exists() {
        bail!("no experiments in {} (no {}): start one with `furnace run spec.toml`, or point --runs-dir at its folder", dir.runs_dir.display(), db.display());
    }
    open_store(dir)
}

/// A short label of a run: its knob values.
fn label(run: &RunRow) -> String {
    match run.knobs.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k))).collect::<Vec<_>>().join(" "),
        _ => String::from("-"),
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let store = open_store(&a.dir)?;
    let exp = match (&a.experiment, &a.spec) {
        (Some(name), _) => store.experiment(name)?,
        (None, Some(spec)) => match experiment::interrupted(&store, spec)? {
            Some(e) if !a.fresh => {
                eprintln!("continuing experiment {} (interrupted; --fresh starts a new one)", e.name);
                e
            }
            _ => {
                let e = experiment::create(&store, spec)?;
                eprintln!("experiment {} ({} runs) in {}", e.name, store.runs(e.id)?.len(), e.dir.display());
                e
            }
        },
        (None, None) => bail!("give a spec (furnace run spec.toml) or --experiment NAME to continue one"),
    };
    let events = furnace_exp::events::channel();
    let server = if a.no_server {
        None
    } else {
        let opts = ServerOptions { addr: SocketAddr::new(a.host, a.port), token: a.token.clone() };
        let h = server::start(store.path().to_path_buf(), opts, events.clone())?;
        eprintln!("API on http://{}/api (live events: /api/events)", h.addr);
        Some(h)
    };
    let mut rx = events.subscribe();
    let fit_opts = FitOptions { memory_budget: a.memory_budget, ..Default::default() };
    let worker = {
        let store = store.reopen()?;
        let exp = exp.clone();
        let events = events.clone();
        std::thread::Builder::new().name("furnace-train".into()).spawn(move || {
            let mut loader = |name: &str, dtype| load(name, dtype).map_err(|e| furnace_exp::Error::Invalid(format!("{e:#}")));
            run_fit(&store, &exp, &mut loader, &fit_opts, &events)
        })?
    };
    let mut display = Display::new(&store, exp.id)?;
    loop {
        match rx.try_recv() {
            Ok(ev) => display.show(&store, ev)?,
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) if worker.is_finished() => break,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let summary = worker.join().map_err(|_| anyhow::anyhow!("the training thread panicked"))??;
    display.finish();
    if let Some(h) = server {
        h.shutdown();
    }
    print_runs(&store, &summary.runs, false)?;
    Ok(())
}

/// One progress line per run.
struct Display {
    multi: MultiProgress,
    bars: HashMap<i64, ProgressBar>,
    last: HashMap<i64, (Option<f64>, Option<f64>)>,
    tty: bool,
}

impl Display {
    fn new(store: &Store, exp: i64) -> Result<Self> {
        let mut d = Self { multi: MultiProgress::new(), bars: HashMap::new(), last: HashMap::new(), tty: std::io::stderr().is_terminal() };
        for r in store.runs(exp)? {
            if r.status != RunStatus::Deleted {
                d.bar(&r);
            }
        }
        Ok(d)
    }

    fn bar(&mut self, run: &RunRow) -> &ProgressBar {
        let multi = &self.multi;
        self.bars.entry(run.id).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(run.total_steps.max(1) as u64));
            let style = ProgressStyle::with_template("run {prefix:>3} {bar:24} {pos:>4}/{len:4} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
            b.set_style(style);
            b.set_prefix(run.id.to_string());
            b.set_position(run.steps_done as u64);
            b.set_message(format!("{} [{}]", run.status.as_str(), label(run)));
            b
        })
    }

    fn line(&self, s: String) {
        if self.tty {
            self.multi.suspend(|| eprintln!("{s}"));
        } else {
            eprintln!("{s}");
        }
    }

    fn show(&mut self, store: &Store, ev: Event) -> Result<()> {
        match ev {
            Event::Progress { run_id, steps_done, total_steps, chunks_done, .. } => {
                let run = store.run(run_id)?;
                let (loss, eval) = self.last.get(&run_id).copied().unwrap_or((None, None));
                let b = self.bar(&run).clone();
                b.set_length(total_steps.max(1) as u64);
                b.set_position(steps_done as u64);
                let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                b.set_message(format!("chunk {chunks_done}/{}  loss {}  eval {}  [{}]", run.total_chunks, f(loss), f(eval), label(&run)));
            }
            Event::Metric { run_id, name, value, step, .. } => {
                let e = self.last.entry(run_id).or_default();
                match name.as_str() {
                    "loss" => e.0 = Some(value),
                    "eval_loss" => {
                        e.1 = Some(value);
                        if !self.tty {
                            self.line(format!("run {run_id} step {step}: eval_loss {value:.4}"));
                        }
                    }
                    _ => {}
                }
            }
            Event::Status { run_id, status, message, .. } => {
                let run = store.run(run_id)?;
                let b = self.bar(&run).clone();
                if matches!(status, RunStatus::Completed | RunStatus::Deleted | RunStatus::Failed) {
                    b.finish_with_message(format!("{} [{}]", status.as_str(), label(&run)));
                }
                self.line(format!("run {run_id}: {}{}", status.as_str(), message.map(|m| format!(" ({m})")).unwrap_or_default()));
            }
            Event::Op { .. } => {}
            Event::Log { message, .. } => self.line(message),
        }
        Ok(())
    }

    fn finish(&self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

/// The last value of each metric per run.
fn last_metrics(store: &Store, run: i64) -> Result<BTreeMap<String, f64>> {
    Ok(store.metrics(run)?.into_iter().map(|m| (m.name, m.value)).collect())
}

fn print_runs(store: &Store, runs: &[RunRow], all: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:>4}  {:<9}  {:>11}  {:>8}  {:>9}  {:>9}  {:>6}  config", "run", "status", "steps", "chunks", "loss", "eval_loss", "parent")?;
    for r in runs.iter().filter(|r| all || r.status != RunStatus::Deleted) {
        let m = last_metrics(store, r.id)?;
        let f = |k: &str| m.get(k).map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        let parent = r.parent_id.map(|p| format!("{p}{}", if r.warm { "w" } else { "" })).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:>4}  {:<9}  {:>11}  {:>8}  {:>9}  {:>9}  {:>6}  {}",
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

pub fn runs(a: RunsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let exp = experiment::find(&store, a.experiment.as_deref())?;
    println!("experiment {} ({}, {})", exp.name, exp.mode, exp.status);
    print_runs(&store, &store.runs(exp.id)?, a.all)
}

pub fn results(a: ResultsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let exp = experiment::find(&store, a.experiment.as_deref())?;
    let visible: HashMap<i64, RunStatus> = store.runs(exp.id)?.into_iter().filter(|r| a.all || r.status != RunStatus::Deleted).map(|r| (r.id, r.status)).collect();
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

pub fn ops_cmd(a: OpsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let (run, kind) = match a.cmd {
        OpsCmd::Stop { run } => (run, OpKind::Stop),
        OpsCmd::Resume { run } => (run, OpKind::Resume),
        OpsCmd::Delete { run } => (run, OpKind::Delete),
        OpsCmd::Clone { run, set, warm } => (run, OpKind::Clone { set, warm }),
        OpsCmd::List { experiment } => {
            let exp = experiment::find(&store, experiment.as_deref())?;
            println!("{:>4}  {:>4}  {:<7}  {:<6}  {:<8}  {:>5}  message", "op", "run", "op", "source", "status", "step");
            for o in store.ops(exp.id)? {
                let extra = match &o.kind {
                    OpKind::Clone { set, warm } => format!("  [--set {}{}]", set.join(" --set "), if *warm { " --warm" } else { "" }),
                    _ => String::new(),
                };
                println!(
                    "{:>4}  {:>4}  {:<7}  {:<6}  {:<8}  {:>5}  {}{extra}",
                    o.id,
                    o.run_id,
                    o.kind.name(),
                    o.source,
                    o.status,
                    o.applied_step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    o.message.unwrap_or_default()
                );
            }
            return Ok(());
        }
    };
    let id = ops::submit(&store, run, &kind, "cli")?;
    let exp = store.experiment_by_id(store.run(run)?.experiment_id)?;
    let when = if exp.status == "running" {
        "it takes effect at the run's next optimizer step"
    } else {
        "the experiment is not running; it takes effect when `furnace run --experiment` continues it"
    };
    println!("op {id} ({} run {run}) recorded: {when}", kind.name());
    Ok(())
}
