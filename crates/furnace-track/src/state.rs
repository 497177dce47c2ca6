//! What the tracker has delivered, per backend, kept in `<experiment dir>/tracking.json`
//! (written to a temp file, synced, renamed) so a restarted `furnace run` neither sends a
//! value twice nor skips one.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The state file's name in the experiment's folder.
pub const STATE_FILE: &str = "tracking.json";

/// Per metric name, the highest step delivered.
pub type Cursors = BTreeMap<String, i64>;

/// One run at an MLflow server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MlflowRun {
    /// MLflow's run id.
    pub id: String,
    /// Whether its params were logged.
    pub params: bool,
    /// Metrics delivered.
    pub metrics: Cursors,
    /// The last status set (`RUNNING`, `FINISHED`, ...).
    pub status: String,
    /// The tags last set.
    pub tags: BTreeMap<String, String>,
}

/// One MLflow server and experiment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MlflowState {
    /// MLflow's experiment id.
    pub experiment_id: Option<String>,
    /// furnace run id -> its MLflow run.
    pub runs: BTreeMap<i64, MlflowRun>,
}

/// One TensorBoard folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TensorboardState {
    /// furnace run id -> metrics written.
    pub runs: BTreeMap<i64, Cursors>,
}

/// Everything delivered, by backend (keyed by URL and experiment, or folder).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    /// `<url> <experiment>` -> state.
    #[serde(default)]
    pub mlflow: BTreeMap<String, MlflowState>,
    /// folder -> state.
    #[serde(default)]
    pub tensorboard: BTreeMap<String, TensorboardState>,
}

/// The state and the file it lives in.
#[derive(Debug)]
pub struct Persist {
    path: PathBuf,
    /// The state.
    pub state: State,
}

impl Persist {
    /// Reads the state file of an experiment folder (an unreadable one starts over: MLflow
    /// runs are found again by their `furnace.run_id` tag, metric batches are idempotent).
    pub fn load(dir: &Path) -> (Self, Option<String>) {
        let path = dir.join(STATE_FILE);
        let (state, warning) = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => (s, None),
                Err(e) => (State::default(), Some(format!("{} does not read ({e}); starting it over", path.display()))),
            },
            Err(_) => (State::default(), None),
        };
        (Self { path, state }, warning)
    }

    /// Writes the state atomically.
    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension(format!("json.partial-{}", std::process::id()));
        let bytes = serde_json::to_vec(&self.state).map_err(|e| Error::Io { op: "encoding", path: self.path.clone(), source: e.into() })?;
        let mut f = std::fs::File::create(&tmp).map_err(Error::io("creating", &tmp))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(Error::io("writing", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(Error::io("renaming", &tmp))?;
        Ok(())
    }
}
