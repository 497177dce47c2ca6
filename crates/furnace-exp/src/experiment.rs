//! Experiments from specs: expanding knobs and config groups into runs, unique names, and
//! finding an interrupted experiment to continue.

use crate::error::{Error, Result};
use crate::events::{Event, EventSender};
use crate::fit::{FitOptions, FitSummary};
use crate::store::{ExperimentRow, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_train::knobs::{expand, Leaf};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The spec file's text and its leaf configs, every one validated.
pub fn read_spec(spec_path: &Path) -> Result<(String, Vec<Leaf>)> {
    let text = std::fs::read_to_string(spec_path).map_err(Error::io("reading", spec_path))?;
    let leaves = leaves_of(&text, spec_path)?;
    Ok((text, leaves))
}

/// The leaf configs of spec text, every one validated, as `furnace run` checks a spec
/// file at `anchor` (relative data paths are relative to its folder; the file itself
/// need not exist).
pub fn leaves_of(text: &str, anchor: &Path) -> Result<Vec<Leaf>> {
    let mut leaves = expand(text, anchor)?;
    if leaves.is_empty() {
        return Err(Error::Invalid(format!("{}: the spec expands to no runs", anchor.display())));
    }
    for leaf in &mut leaves {
        let d = &mut leaf.spec.data;
        d.train = absolute(&d.train);
        d.eval = d.eval.as_deref().map(absolute);
    }
    Ok(leaves)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Creates an experiment from a spec: a unique name (the spec's, with `_1`, `_2`, ...
/// when taken), its folder next to the store, and one `new` run per leaf config.
pub fn create(store: &Store, spec_path: &Path) -> Result<ExperimentRow> {
    let (text, leaves) = read_spec(spec_path)?;
    create_from_leaves(store, &text, spec_path, &leaves)
}

/// Creates an experiment from spec text (the dashboard's form), checked as [`create`]
/// checks a file at `anchor`.
pub fn create_from_text(store: &Store, text: &str, anchor: &Path) -> Result<ExperimentRow> {
    let leaves = leaves_of(text, anchor)?;
    create_from_leaves(store, text, anchor, &leaves)
}

fn create_from_leaves(store: &Store, text: &str, spec_path: &Path, leaves: &[Leaf]) -> Result<ExperimentRow> {
    let e = &leaves[0].spec.experiment;
    let mut runs = Vec::new();
    for leaf in leaves {
        let config = serde_json::to_value(&leaf.spec).map_err(|source| Error::Encode { what: "a run's config", source })?;
        let knobs: serde_json::Map<String, serde_json::Value> = leaf.knobs.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect();
        runs.push((config, serde_json::Value::Object(knobs), leaf.group as i64));
    }
    // The experiment and its runs: one transaction (a kill never leaves it short of runs).
    let exp = store.create_experiment_with_runs(&e.name, &e.mode, &absolute(spec_path), text, &runs)?;
    std::fs::create_dir_all(&exp.dir).map_err(Error::io("creating", &exp.dir))?;
    Ok(exp)
}

/// The experiment this spec was last started as, if it never finished (a crash, a kill,
/// Ctrl-C) and the spec is unchanged: `furnace run` continues it instead of starting anew.
pub fn interrupted(store: &Store, spec_path: &Path) -> Result<Option<ExperimentRow>> {
    let (text, leaves) = read_spec(spec_path)?;
    let name = &leaves[0].spec.experiment.name;
    Ok(store.latest_of(name)?.filter(|e| e.status == "running" && e.spec == text))
}

/// An experiment by name, or the newest when `name` is `None`.
pub fn find(store: &Store, name: Option<&str>) -> Result<ExperimentRow> {
    match name {
        Some(n) => store.experiment(n),
        None => store.experiments()?.pop().ok_or(Error::NoExperiments),
    }
}

/// An experiment and its store: the library face of what `furnace run`, `runs`,
/// `results` and `ops` do (RapidFire's `Experiment`, `run_fit`, `get_runs_info`,
/// `get_results`, and its control ops).
pub struct Experiment {
    store: crate::Store,
    row: ExperimentRow,
}

impl Experiment {
    /// A new experiment from a spec, its store and folder under `runs_dir`.
    pub fn create(runs_dir: &Path, spec_path: &Path) -> Result<Self> {
        let store = crate::Store::open_in(runs_dir)?;
        let row = create(&store, spec_path)?;
        Ok(Self { store, row })
    }

    /// An existing experiment by name.
    pub fn open(runs_dir: &Path, name: &str) -> Result<Self> {
        let store = crate::Store::open_in(runs_dir)?;
        let row = store.experiment(name)?;
        Ok(Self { store, row })
    }

    /// Its store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Its record as it was when opened (see [`Experiment::info`] for the current one).
    pub fn row(&self) -> &ExperimentRow {
        &self.row
    }

    /// The folder of one of its runs (checkpoints, adapter).
    pub fn run_dir(&self, run_id: i64) -> PathBuf {
        crate::fit::run_dir(&self.row, run_id)
    }

    /// Lets a run train further under a changed spec (more steps, another schedule): its
    /// stored config becomes `spec` and a completed or stopped run becomes ongoing; it
    /// continues from its last checkpoint when the experiment is started again.
    pub fn continue_run(&self, run_id: i64, spec: &furnace_train::Spec) -> Result<()> {
        let run = self.store.run(run_id)?;
        if run.experiment_id != self.row.id {
            return Err(Error::RunNotInExperiment { run: run_id, experiment: self.row.name.clone() });
        }
        let config = serde_json::to_value(spec).map_err(|source| Error::Encode { what: "a run's config", source })?;
        // Config, status and the experiment's status: one transaction.
        self.store.continue_run(run_id, &config)
    }

    /// Its record (name, mode, folder, status).
    pub fn info(&self) -> Result<ExperimentRow> {
        self.store.experiment_by_id(self.row.id)
    }

    /// Its runs (deleted ones too): config, knobs, status, progress, lineage.
    pub fn runs(&self) -> Result<Vec<crate::RunRow>> {
        self.store.runs(self.row.id)
    }

    /// Every metric of every run at every step.
    pub fn results(&self) -> Result<Vec<crate::MetricRow>> {
        self.store.experiment_metrics(self.row.id)
    }

    /// Starts training the unfinished runs on a thread of their own (see
    /// [`crate::run_fit`]); live events arrive on the returned [`Running`].
    pub fn start(&self, opts: StartOptions) -> Result<Running> {
        let StartOptions { mut fit, mut loader, events } = opts;
        let events = events.unwrap_or_else(crate::events::channel);
        let cancel = fit.cancel.get_or_insert_with(|| Arc::new(AtomicBool::new(false))).clone();
        // Subscribed before the thread starts, so no event is missed.
        let rx = events.subscribe();
        let store = self.store.reopen()?;
        let row = self.row.clone();
        let sender = events.clone();
        let join = std::thread::Builder::new()
            .name("furnace-train".into())
            .spawn(move || crate::run_fit(&store, &row, &mut *loader, &fit, &sender))
            .map_err(Error::Thread)?;
        Ok(Running { events: rx, join, sender: events, cancel })
    }

    /// Trains the unfinished runs on this thread (see [`crate::run_fit`]).
    pub fn run_fit(
        &self,
        loader: &mut crate::Loader<'_>,
        opts: &crate::FitOptions,
        events: &crate::EventSender,
    ) -> Result<crate::FitSummary> {
        crate::run_fit(&self.store, &self.row, loader, opts, events)
    }

    /// Records an op for one of its runs (checked now, applied at the run's next
    /// optimizer step); returns the op id.
    pub fn op(&self, run_id: i64, op: &crate::OpKind) -> Result<i64> {
        let run = self.store.run(run_id)?;
        if run.experiment_id != self.row.id {
            return Err(Error::RunNotInExperiment { run: run_id, experiment: self.row.name.clone() });
        }
        crate::ops::submit(&self.store, run_id, op, "library")
    }

    /// The ops recorded so far.
    pub fn ops(&self) -> Result<Vec<crate::OpRow>> {
        self.store.ops(self.row.id)
    }
}

/// A loader the training thread can own: a base model by name with the given weights.
pub type SendLoader = Box<dyn FnMut(&str, WeightDType) -> Result<LoadedModel> + Send>;

/// How [`Experiment::start`] trains.
pub struct StartOptions {
    /// Memory budget, cancellation, hooks.
    pub fit: FitOptions,
    /// Loads the runs' bases.
    pub loader: SendLoader,
    /// Where events go (share it with a server to stream them); a new channel if `None`.
    pub events: Option<EventSender>,
}

/// An experiment training on its own thread.
pub struct Running {
    /// Its live events (subscribed before training started).
    pub events: tokio::sync::broadcast::Receiver<Event>,
    /// The training thread; its result is the fit's.
    pub join: JoinHandle<Result<FitSummary>>,
    sender: EventSender,
    cancel: Arc<AtomicBool>,
}

impl Running {
    /// The next event; blocks until one comes, and is `None` once training has ended and
    /// every event it sent has been taken. Events a slow reader missed are skipped.
    pub fn next_event(&mut self) -> Option<Event> {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            match self.events.try_recv() {
                Ok(ev) => return Some(ev),
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) if self.join.is_finished() => {
                    // Anything sent just before the end.
                    return self.events.try_recv().ok();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The event channel, to subscribe more readers (a server's live stream).
    pub fn sender(&self) -> &EventSender {
        &self.sender
    }

    /// Asks training to stop after the current optimizer step; unfinished runs resume
    /// from their checkpoints when the experiment is started again.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for training to end.
    pub fn wait(self) -> Result<FitSummary> {
        self.join.join().map_err(|_| Error::Panicked)?
    }
}
