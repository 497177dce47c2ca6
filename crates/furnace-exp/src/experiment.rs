//! Experiments from specs: expanding knobs and config groups into runs, unique names, and
//! finding an interrupted experiment to continue.

use crate::error::{Error, Result};
use crate::store::{ExperimentRow, Store};
use furnace_train::knobs::{expand, Leaf};
use std::path::{Path, PathBuf};

/// The spec file's text and its leaf configs, every one validated.
pub fn read_spec(spec_path: &Path) -> Result<(String, Vec<Leaf>)> {
    let text = std::fs::read_to_string(spec_path).map_err(|e| Error::Io(format!("reading {}: {e}", spec_path.display())))?;
    let mut leaves = expand(&text, spec_path)?;
    if leaves.is_empty() {
        return Err(Error::Invalid(format!("{}: the spec expands to no runs", spec_path.display())));
    }
    for leaf in &mut leaves {
        let d = &mut leaf.spec.data;
        d.train = absolute(&d.train);
        d.eval = d.eval.as_deref().map(absolute);
    }
    Ok((text, leaves))
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
    let e = &leaves[0].spec.experiment;
    let exp = store.create_experiment(&e.name, &e.mode, &absolute(spec_path), &text)?;
    std::fs::create_dir_all(&exp.dir).map_err(|err| Error::Io(format!("creating {}: {err}", exp.dir.display())))?;
    for leaf in &leaves {
        let config = serde_json::to_value(&leaf.spec).map_err(|err| Error::Store(err.to_string()))?;
        let knobs: serde_json::Map<String, serde_json::Value> = leaf.knobs.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect();
        store.add_run(exp.id, &config, &serde_json::Value::Object(knobs), leaf.group as i64, 0, 0, None)?;
    }
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
        None => store.experiments()?.pop().ok_or_else(|| Error::NotFound("no experiments yet: start one with `furnace run spec.toml`".into())),
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

    /// Trains the unfinished runs (see [`crate::run_fit`]).
    pub fn run_fit(&self, loader: &mut crate::Loader<'_>, opts: &crate::FitOptions, events: &crate::EventSender) -> Result<crate::FitSummary> {
        crate::run_fit(&self.store, &self.row, loader, opts, events)
    }

    /// Records an op for one of its runs (checked now, applied at the run's next
    /// optimizer step); returns the op id.
    pub fn op(&self, run_id: i64, op: &crate::OpKind) -> Result<i64> {
        let run = self.store.run(run_id)?;
        if run.experiment_id != self.row.id {
            return Err(Error::NotFound(format!("run {run_id} is not in experiment {}", self.row.name)));
        }
        crate::ops::submit(&self.store, run_id, op, "library")
    }

    /// The ops recorded so far.
    pub fn ops(&self) -> Result<Vec<crate::OpRow>> {
        self.store.ops(self.row.id)
    }
}
