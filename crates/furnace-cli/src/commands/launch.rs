//! Training one stored experiment the way `furnace run` does (live display, tracking,
//! Ctrl-C), and the experiments the dashboard starts (`POST /api/experiments`): the
//! server's launcher puts their names in a queue, and the command that serves the
//! dashboard trains them one after another (`furnace run` after its own experiment,
//! `furnace ui` for as long as it runs).

use super::run::Display;
use crate::models::load;
use anyhow::Result;
use furnace_exp::{Event, EventSender, Experiment, ExperimentRow, FitOptions, FitSummary, StartOptions, Store};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;

/// The launcher the server holds: it only queues the name.
pub struct LaunchQueue {
    tx: mpsc::Sender<String>,
}

/// A launcher and the receiving end the command trains from.
pub fn queue() -> (Arc<LaunchQueue>, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    (Arc::new(LaunchQueue { tx }), rx)
}

impl furnace_server::Launcher for LaunchQueue {
    fn launch(&self, name: &str) -> std::result::Result<(), String> {
        self.tx.send(name.to_string()).map_err(|_| format!("the trainer has stopped; train it with furnace run --experiment {name}"))
    }
}

/// How people open a server at `addr` in a browser (`localhost` for loopback, which the
/// server's Host check accepts).
pub fn dashboard_host(addr: SocketAddr) -> String {
    if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Tracking backends given on the command line (they override the spec's `[tracking]`).
#[derive(Debug, Clone, Default)]
pub struct TrackFlags {
    /// `--mlflow URL`.
    pub mlflow: Option<String>,
    /// `--tensorboard DIR`.
    pub tensorboard: Option<PathBuf>,
}

/// The tracking backends of an experiment: its spec's `[tracking]`, overridden by the flags.
fn track_options(flags: &TrackFlags, exp: &ExperimentRow) -> Result<furnace_track::TrackOptions> {
    let spec =
        furnace_train::knobs::expand(&exp.spec, &exp.spec_path)?.into_iter().next().and_then(|l| l.spec.tracking).unwrap_or_default();
    let mut opts = furnace_track::TrackOptions {
        mlflow: spec.mlflow,
        mlflow_experiment: spec.mlflow_experiment,
        tensorboard: spec.tensorboard,
        ..Default::default()
    };
    if let Some(url) = &flags.mlflow {
        furnace_train::spec::check_tracking_url(url).map_err(|e| anyhow::anyhow!("--mlflow: {e}"))?;
        opts.mlflow = Some(url.clone());
    }
    if let Some(dir) = &flags.tensorboard {
        let check = furnace_train::spec::TrackingSpec { tensorboard: Some(dir.clone()), ..Default::default() };
        check.validate().map_err(|e| anyhow::anyhow!("--tensorboard: {e}"))?;
        opts.tensorboard = Some(dir.clone());
    }
    if let Some(url) = &opts.mlflow {
        furnace_track::check_url(url).map_err(|e| anyhow::anyhow!("[tracking] mlflow: {e}"))?;
    }
    Ok(opts)
}

/// Trains experiment `name` of the store in `runs_dir` to its end (or until `cancel`),
/// showing a progress line per run and sending its runs to the tracking backends;
/// publishes its events on `events`.
pub fn train_experiment(
    store: &Store,
    runs_dir: &Path,
    name: &str,
    memory_budget: Option<u64>,
    cancel: Arc<AtomicBool>,
    events: &EventSender,
    flags: &TrackFlags,
) -> Result<FitSummary> {
    let exp = store.experiment(name)?;
    if exp.mode == "evals" {
        return evaluate_experiment(store, &exp, cancel, events);
    }
    let experiment = Experiment::open(runs_dir, name)?;
    let track = track_options(flags, &exp)?;
    let tracker = if track.is_empty() {
        None
    } else {
        let sink = events.clone();
        let exp_name = exp.name.clone();
        let log = Box::new(move |message: String| {
            let _ = sink.send(Event::Log { experiment: exp_name.clone(), message });
        });
        if let Some(url) = &track.mlflow {
            eprintln!("tracking runs in MLflow at {url}");
        }
        if let Some(dir) = &track.tensorboard {
            eprintln!("TensorBoard event files in {}", dir.join(&exp.name).display());
        }
        Some(furnace_track::Tracker::start(store.path(), &exp.name, track, log)?)
    };
    let mut running = experiment.start(StartOptions {
        fit: FitOptions { memory_budget, cancel: Some(cancel), ..Default::default() },
        loader: Box::new(|name: &str, dtype| {
            load(name, dtype).map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: format!("{e:#}") })
        }),
        events: Some(events.clone()),
    })?;
    let mut display = Display::new(store, exp.id)?;
    while let Some(ev) = running.next_event() {
        if let (Some(t), Event::Status { .. }) = (&tracker, &ev) {
            t.nudge();
        }
        display.show(store, ev)?;
    }
    let summary = running.wait()?;
    display.finish();
    if let Some(t) = tracker {
        // Bounded: a tracking server that is down costs at most this wait.
        for line in t.finish(std::time::Duration::from_secs(10))?.unsent {
            eprintln!("warning: {line}");
        }
    }
    Ok(summary)
}

/// Runs evals experiment `exp` to its end (or until `cancel`) on its own thread, showing a
/// progress line per pipeline; publishes its events on `events`.
fn evaluate_experiment(store: &Store, exp: &ExperimentRow, cancel: Arc<AtomicBool>, events: &EventSender) -> Result<FitSummary> {
    let mut rx = events.subscribe();
    let thread_store = store.reopen()?;
    let row = exp.clone();
    let sender = events.clone();
    let join = std::thread::Builder::new().name("furnace-evals".into()).spawn(move || {
        let opts = furnace_evals::EvalOptions { cancel: Some(cancel), ..Default::default() };
        let mut loader = |name: &str, dtype| {
            load(name, dtype).map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: format!("{e:#}") })
        };
        furnace_evals::run_evals(&thread_store, &row, &mut loader, &opts, &sender)
    })?;
    let mut display = Display::new(store, exp.id)?;
    loop {
        match rx.try_recv() {
            Ok(ev) if ev.experiment() == exp.name => display.show(store, ev)?,
            Ok(_) => {}
            Err(_) if join.is_finished() => break,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    while let Ok(ev) = rx.try_recv() {
        if ev.experiment() == exp.name {
            display.show(store, ev)?;
        }
    }
    display.finish();
    let summary = join.join().map_err(|_| anyhow::anyhow!("the evals thread panicked"))??;
    Ok(FitSummary { runs: summary.runs, cancelled: summary.cancelled })
}
