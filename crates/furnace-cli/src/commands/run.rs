//! `furnace run`: every config of a spec trains together, with live progress and the API
//! server; continues an interrupted experiment.

use super::launch::{dashboard_host, queue, train_experiment, TrackFlags};
use crate::args::{open_store, parse_bytes, RunsDir, ServerArgs};
use crate::human::{label, print_runs};
use anyhow::{bail, Result};
use clap::Args;
use furnace_exp::{experiment, Event, RunRow, RunStatus, Store};
use furnace_server::ServerOptions;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    /// their turn, and a run that alone needs more fails. Default: 70% of the memory
    /// available, measured as each base loads.
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    server: ServerArgs,
    /// Do not start the API server.
    #[arg(long)]
    no_server: bool,
    /// Log every run to this MLflow tracking server (http://host:port), overriding the
    /// spec's [tracking] mlflow.
    #[arg(long, value_name = "URL")]
    mlflow: Option<String>,
    /// Write TensorBoard event files under DIR/<experiment>/run-<id>/, overriding the
    /// spec's [tracking] tensorboard.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    #[command(flatten)]
    dir: RunsDir,
}

/// The server's options, checked before anything is created (`None` with --no-server).
fn server_options(a: &RunArgs) -> Result<Option<ServerOptions>> {
    if a.no_server {
        return Ok(None);
    }
    let opts = a.server.options()?;
    Ok(Some(opts))
}

pub fn run(a: RunArgs) -> Result<()> {
    let server_opts = server_options(&a)?;
    if let Some(url) = &a.mlflow {
        furnace_track::check_url(url).map_err(|e| anyhow::anyhow!("--mlflow: {e}"))?;
    }
    let store = open_store(&a.dir)?;
    let exp = match (&a.experiment, &a.spec) {
        (Some(name), _) => store.experiment(name)?,
        (None, Some(spec)) => {
            let text = std::fs::read_to_string(spec).map_err(|e| anyhow::anyhow!("reading {}: {e}", spec.display()))?;
            let evals = furnace_evals::mode_of(&text).as_deref() == Some("evals");
            let interrupted =
                if evals { furnace_evals::experiment::interrupted(&store, spec)? } else { experiment::interrupted(&store, spec)? };
            match interrupted {
                Some(e) if !a.fresh => {
                    eprintln!("continuing experiment {} (interrupted; --fresh starts a new one)", e.name);
                    e
                }
                _ if evals => {
                    let e = furnace_evals::experiment::create(&store, spec)?;
                    let runs = store.runs(e.id)?;
                    let shards = runs.first().map(|r| r.total_steps).unwrap_or(0);
                    eprintln!("evals experiment {} ({} pipelines, {shards} shards) in {}", e.name, runs.len(), e.dir.display());
                    e
                }
                _ => {
                    let e = experiment::create(&store, spec)?;
                    eprintln!("experiment {} ({} runs) in {}", e.name, store.runs(e.id)?.len(), e.dir.display());
                    e
                }
            }
        }
        (None, None) => bail!("give a spec (furnace run spec.toml) or --experiment NAME to continue one"),
    };
    let events = furnace_exp::events::channel();
    let (launcher, rx) = queue();
    let (server, queued) = if let Some(opts) = server_opts {
        let h = furnace_server::start(store.path().to_path_buf(), ServerOptions { launcher: Some(launcher), ..opts }, events.clone())?;
        eprintln!("API on http://{}/api (live events: /api/events); dashboard on http://{}/", h.addr, dashboard_host(h.addr));
        (Some(h), Some(rx))
    } else {
        (None, None)
    };
    let cancel = crate::interrupt::install()?;
    let flags = TrackFlags { mlflow: a.mlflow.clone(), tensorboard: a.tensorboard.clone() };
    let train = |name: &str| train_experiment(&store, &a.dir.runs_dir, name, a.memory_budget, cancel.clone(), &events, &flags);
    let mut current = exp.name.clone();
    let mut summary = train(&current)?;
    // Experiments started from the dashboard meanwhile train next, one after another.
    while !summary.cancelled {
        let Some(next) = queued.as_ref().and_then(|rx| rx.try_recv().ok()) else { break };
        print_runs(&store, &summary.runs, false)?;
        eprintln!("training experiment {next} (started from the dashboard)");
        summary = train(&next)?;
        current = next;
    }
    if let Some(h) = server {
        h.shutdown();
    }
    print_runs(&store, &summary.runs, false)?;
    if summary.cancelled {
        let mut resume = format!("furnace run --experiment {current}");
        if a.dir.runs_dir != Path::new("runs") {
            resume.push_str(&format!(" --runs-dir {}", a.dir.runs_dir.display()));
        }
        return Err(crate::interrupt::Interrupted { resume }.into());
    }
    Ok(())
}

/// One progress line per run.
pub(crate) struct Display {
    multi: MultiProgress,
    bars: HashMap<i64, ProgressBar>,
    last: HashMap<i64, (Option<f64>, Option<f64>)>,
    /// Evals: each pipeline's primary metric after its last shard.
    primary: HashMap<i64, (String, f64, f64, f64)>,
    tty: bool,
}

impl Display {
    pub(crate) fn new(store: &Store, exp: i64) -> Result<Self> {
        let mut d = Self {
            multi: MultiProgress::new(),
            bars: HashMap::new(),
            last: HashMap::new(),
            primary: HashMap::new(),
            tty: std::io::stderr().is_terminal(),
        };
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
            let style = ProgressStyle::with_template("run {prefix:>3} {bar:24} {pos:>4}/{len:4} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
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

    pub(crate) fn show(&mut self, store: &Store, ev: Event) -> Result<()> {
        match ev {
            Event::Progress { run_id, steps_done, total_steps, chunks_done, .. } => {
                let run = store.run(run_id)?;
                let (loss, eval) = self.last.get(&run_id).copied().unwrap_or((None, None));
                let b = self.bar(&run).clone();
                b.set_length(total_steps.max(1) as u64);
                b.set_position(steps_done as u64);
                let f = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
                if let Some((name, value, lo, hi)) = self.primary.get(&run_id) {
                    let line = format!("shard {chunks_done}/{}  {name} {value:.3} [{lo:.3}, {hi:.3}]  [{}]", run.total_chunks, label(&run));
                    if !self.tty {
                        self.line(format!("run {run_id} {line}"));
                    }
                    b.set_message(line);
                } else {
                    b.set_message(format!(
                        "chunk {chunks_done}/{}  loss {}  eval {}  [{}]",
                        run.total_chunks,
                        f(loss),
                        f(eval),
                        label(&run)
                    ));
                }
            }
            Event::Metric { run_id, name, value, step, .. } => {
                let e = self.last.entry(run_id).or_default();
                match name.as_str() {
                    "loss" => e.0 = Some(value),
                    "eval_loss" | "eval_reward" => {
                        e.1 = Some(value);
                        if !self.tty {
                            self.line(format!("run {run_id} step {step}: {name} {value:.4}"));
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
            Event::Interval { run_id, name, value, lower, upper, primary: true, .. } => {
                self.primary.insert(run_id, (name, value, lower, upper));
            }
            Event::Op { .. } | Event::Interval { .. } => {}
            Event::Log { message, .. } => self.line(message),
        }
        Ok(())
    }

    pub(crate) fn finish(&self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}
