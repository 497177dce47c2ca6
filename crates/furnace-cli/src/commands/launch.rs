//! Experiments the dashboard starts (`POST /api/experiments`): the server's launcher puts
//! their names in a queue, and the command that serves the dashboard trains them one after
//! another (`furnace run` after its own experiment, `furnace ui` for as long as it runs),
//! with the same live display, Ctrl-C handling and memory budget as `furnace run`.

use super::run::Display;
use crate::models::load;
use anyhow::Result;
use furnace_exp::{EventSender, Experiment, FitOptions, FitSummary, StartOptions, Store};
use std::path::Path;
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
        self.tx
            .send(name.to_string())
            .map_err(|_| format!("the trainer has stopped; train it with furnace run --experiment {name}"))
    }
}

/// Trains experiment `name` of the store in `runs_dir` to its end (or until `cancel`),
/// showing a progress line per run; publishes its events on `events`.
pub fn train_experiment(
    store: &Store,
    runs_dir: &Path,
    name: &str,
    memory_budget: Option<u64>,
    cancel: Arc<AtomicBool>,
    events: &EventSender,
) -> Result<FitSummary> {
    let experiment = Experiment::open(runs_dir, name)?;
    let exp = store.experiment(name)?;
    let mut running = experiment.start(StartOptions {
        fit: FitOptions { memory_budget, cancel: Some(cancel), ..Default::default() },
        loader: Box::new(|name: &str, dtype| {
            load(name, dtype).map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: format!("{e:#}") })
        }),
        events: Some(events.clone()),
    })?;
    let mut display = Display::new(store, exp.id)?;
    while let Some(ev) = running.next_event() {
        display.show(store, ev)?;
    }
    let summary = running.wait()?;
    display.finish();
    Ok(summary)
}
