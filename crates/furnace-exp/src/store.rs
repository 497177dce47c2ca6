//! The embedded store: one SQLite database (WAL, so the trainer, the server and other
//! `furnace` processes read and write it at once) holding experiments, runs (config,
//! status, progress, lineage), metrics and control ops, the conversations
//! `furnace serve` logged ([`crate::conversations`]) and the adapter registry
//! ([`crate::registry`]).
//!
//! A [`Store`] wraps one connection; every thread opens its own.

use crate::error::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Created, not trained yet.
    New,
    /// Training (or waiting for its turn).
    Ongoing,
    /// Stopped by an op or the policy; its state is kept and it can resume.
    Stopped,
    /// Took all its steps.
    Completed,
    /// Failed with an error.
    Failed,
    /// Deleted: gone from views and scheduling, its files kept.
    Deleted,
}

impl RunStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Ongoing => "ongoing",
            Self::Stopped => "stopped",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Deleted => "deleted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "new" => Self::New,
            "ongoing" => Self::Ongoing,
            "stopped" => Self::Stopped,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "deleted" => Self::Deleted,
            o => return Err(Error::StoredStatus { status: o.to_string() }),
        })
    }

    /// Whether the scheduler trains a run in this status.
    pub fn is_active(self) -> bool {
        matches!(self, Self::New | Self::Ongoing)
    }
}

/// An experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentRow {
    /// Id.
    pub id: i64,
    /// Unique name (the spec's name, with a suffix when it was taken).
    pub name: String,
    /// `fit`.
    pub mode: String,
    /// Its folder (run checkpoints and adapters).
    pub dir: PathBuf,
    /// The spec file it was made from.
    pub spec_path: PathBuf,
    /// The spec text.
    pub spec: String,
    /// `running` while `furnace run` drives it (or after a crash), `done` after.
    pub status: String,
    /// Created (Unix seconds).
    pub created: f64,
}

/// A run: one leaf configuration of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    /// Id (unique over the store).
    pub id: i64,
    /// Its experiment.
    pub experiment_id: i64,
    /// The leaf spec (JSON).
    pub config: serde_json::Value,
    /// The knob values it took, `{"lora.r": 16, ...}`.
    pub knobs: serde_json::Value,
    /// Config group index.
    pub group: i64,
    /// Status.
    pub status: RunStatus,
    /// Optimizer steps taken.
    pub steps_done: i64,
    /// Optimizer steps in all.
    pub total_steps: i64,
    /// Data chunks completed.
    pub chunks_done: i64,
    /// Chunks in all (epochs x chunks per epoch).
    pub total_chunks: i64,
    /// Step of the last checkpoint (None: none yet).
    pub checkpoint_step: Option<i64>,
    /// The run it was cloned from.
    pub parent_id: Option<i64>,
    /// Whether the clone started warm.
    pub warm: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Created (Unix seconds).
    pub created: f64,
}

/// One metric of one run, summed up ([`Store::metric_summary`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricSummary {
    /// Run.
    pub run_id: i64,
    /// Metric name.
    pub name: String,
    /// How many values.
    pub count: i64,
    /// The highest step with a value.
    pub last_step: i64,
    /// The value at that step.
    pub last: f64,
    /// The smallest value.
    pub min: f64,
}

/// One metric value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    /// Run.
    pub run_id: i64,
    /// Optimizer step.
    pub step: i64,
    /// `loss`, `lr`, `grad_norm`, `eval_loss`, ...
    pub name: String,
    /// Value.
    pub value: f64,
    /// When (Unix seconds).
    pub time: f64,
}

/// What an op does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum OpKind {
    /// Take the run out of the active set, keeping its state.
    Stop,
    /// Put a stopped run back.
    Resume,
    /// Remove the run from views and scheduling (files kept).
    Delete,
    /// A new run with changed knobs.
    Clone {
        /// `section.key=value` overrides.
        #[serde(default)]
        set: Vec<String>,
        /// Start from the parent's adapter, optimizer and data position.
        #[serde(default)]
        warm: bool,
    },
}

impl OpKind {
    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Resume => "resume",
            Self::Delete => "delete",
            Self::Clone { .. } => "clone",
        }
    }
}

/// A recorded op.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpRow {
    /// Id.
    pub id: i64,
    /// Experiment.
    pub experiment_id: i64,
    /// The run it targets.
    pub run_id: i64,
    /// What it does.
    pub kind: OpKind,
    /// Who asked: `cli`, `api`, `policy`.
    pub source: String,
    /// `pending`, `applied` or `rejected`.
    pub status: String,
    /// What happened (why it was rejected).
    pub message: Option<String>,
    /// The run a clone created.
    pub new_run_id: Option<i64>,
    /// The optimizer step of the target run when it took effect.
    pub applied_step: Option<i64>,
    /// Asked at (Unix seconds).
    pub created: f64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS experiments(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, base_name TEXT NOT NULL, mode TEXT NOT NULL,
    dir TEXT NOT NULL, spec_path TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    config TEXT NOT NULL, knobs TEXT NOT NULL, grp INTEGER NOT NULL, status TEXT NOT NULL,
    steps_done INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL DEFAULT 0,
    chunks_done INTEGER NOT NULL DEFAULT 0, total_chunks INTEGER NOT NULL DEFAULT 0,
    checkpoint_step INTEGER, checkpoint_chunks INTEGER NOT NULL DEFAULT 0, parent_id INTEGER REFERENCES runs(id), warm INTEGER NOT NULL DEFAULT 0,
    error TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics(
    run_id INTEGER NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, name TEXT NOT NULL,
    value REAL NOT NULL, time REAL NOT NULL, PRIMARY KEY(run_id, step, name));
CREATE TABLE IF NOT EXISTS ops(
    id INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    run_id INTEGER NOT NULL REFERENCES runs(id), kind TEXT NOT NULL, source TEXT NOT NULL,
    status TEXT NOT NULL, message TEXT, new_run_id INTEGER, applied_step INTEGER,
    created REAL NOT NULL);
";

/// The store file inside a runs folder.
pub const DB_FILE: &str = "furnace.db";

/// One connection to the store.
pub struct Store {
    pub(crate) conn: Connection,
    path: PathBuf,
}

fn json(s: String) -> serde_json::Value {
    serde_json::from_str(&s).unwrap_or(serde_json::Value::Null)
}

fn experiment_row(r: &Row) -> rusqlite::Result<ExperimentRow> {
    Ok(ExperimentRow {
        id: r.get(0)?,
        name: r.get(1)?,
        mode: r.get(2)?,
        dir: PathBuf::from(r.get::<_, String>(3)?),
        spec_path: PathBuf::from(r.get::<_, String>(4)?),
        spec: r.get(5)?,
        status: r.get(6)?,
        created: r.get(7)?,
    })
}
const EXPERIMENT_COLS: &str = "id, name, mode, dir, spec_path, spec, status, created";

const RUN_COLS: &str = "id, experiment_id, config, knobs, grp, status, steps_done, total_steps, chunks_done, \
     total_chunks, checkpoint_step, parent_id, warm, error, created";

fn run_row(r: &Row) -> rusqlite::Result<(RunRow, String)> {
    Ok((
        RunRow {
            id: r.get(0)?,
            experiment_id: r.get(1)?,
            config: json(r.get(2)?),
            knobs: json(r.get(3)?),
            group: r.get(4)?,
            status: RunStatus::New,
            steps_done: r.get(6)?,
            total_steps: r.get(7)?,
            chunks_done: r.get(8)?,
            total_chunks: r.get(9)?,
            checkpoint_step: r.get(10)?,
            parent_id: r.get(11)?,
            warm: r.get::<_, i64>(12)? != 0,
            error: r.get(13)?,
            created: r.get(14)?,
        },
        r.get(5)?,
    ))
}

const OP_COLS: &str = "id, experiment_id, run_id, kind, source, status, message, new_run_id, applied_step, created";

fn op_row(r: &Row) -> rusqlite::Result<(OpRow, String)> {
    Ok((
        OpRow {
            id: r.get(0)?,
            experiment_id: r.get(1)?,
            run_id: r.get(2)?,
            kind: OpKind::Stop,
            source: r.get(4)?,
            status: r.get(5)?,
            message: r.get(6)?,
            new_run_id: r.get(7)?,
            applied_step: r.get(8)?,
            created: r.get(9)?,
        },
        r.get(3)?,
    ))
}

fn finish_run((mut row, status): (RunRow, String)) -> Result<RunRow> {
    row.status = RunStatus::parse(&status)?;
    Ok(row)
}

fn finish_op((mut row, kind): (OpRow, String)) -> Result<OpRow> {
    row.kind = serde_json::from_str(&kind).map_err(|source| Error::StoredOp { op: row.id, source })?;
    Ok(row)
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        // Added after the first stores were made: created here on open, so an older store
        // gains it (`IF NOT EXISTS`) and keeps everything it holds.
        conn.execute_batch(crate::conversations::SCHEMA)?;
        conn.execute_batch(crate::shards::SCHEMA)?;
        conn.execute_batch(crate::registry::SCHEMA)?;
        Ok(Self { conn, path: path.to_path_buf() })
    }

    /// Opens the store of a runs folder (`<runs>/furnace.db`).
    pub fn open_in(runs_dir: &Path) -> Result<Self> {
        Self::open(&runs_dir.join(DB_FILE))
    }

    /// Another connection to the same database (for another thread).
    pub fn reopen(&self) -> Result<Self> {
        Self::open(&self.path)
    }

    /// A write transaction, begun IMMEDIATE: it takes the write lock first, so a commit
    /// of another connection between its reads and its writes cannot fail it
    /// (`SQLITE_BUSY_SNAPSHOT`); a busy lock is waited for (the busy timeout).
    pub(crate) fn write_tx(&self) -> Result<Transaction<'_>> {
        Ok(Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?)
    }

    /// One statement outside a transaction (SQLite commits it on its own), between the
    /// crash-injection points `store.<what>.before_commit` and `.after_commit`.
    fn autocommit<T>(&self, what: &str, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        point(what, "before_commit");
        let v = f(&self.conn)?;
        point(what, "after_commit");
        Ok(v)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder of experiment `name`: next to the database, so the runs folder can move.
    fn experiment_dir(&self, name: &str) -> PathBuf {
        self.path.parent().unwrap_or(Path::new(".")).join(name)
    }

    fn located(&self, mut e: ExperimentRow) -> ExperimentRow {
        e.dir = self.experiment_dir(&e.name);
        e
    }

    /// Creates an experiment named `name`, or `name_1`, `name_2`, ... when taken; its
    /// folder is `<folder of the database>/<unique name>`. A name that is not a plain
    /// folder name ([`furnace_train::spec::check_name`]) is an error naming
    /// `experiment.name`.
    pub fn create_experiment(&self, name: &str, mode: &str, spec_path: &Path, spec: &str) -> Result<ExperimentRow> {
        self.create_experiment_with_runs(name, mode, spec_path, spec, &[])
    }

    /// [`Store::create_experiment`] with its runs (`new`, each a (config, knobs, group)),
    /// in one transaction: a crash leaves the experiment with all its runs or nothing.
    pub fn create_experiment_with_runs(
        &self,
        name: &str,
        mode: &str,
        spec_path: &Path,
        spec: &str,
        runs: &[(serde_json::Value, serde_json::Value, i64)],
    ) -> Result<ExperimentRow> {
        // The name becomes a folder: never `..`, a path or a hidden folder.
        furnace_train::spec::check_name(name)?;
        let root = self.path.parent().unwrap_or(Path::new(".")).to_path_buf();
        // Read (is the name taken?) then write: one immediate transaction, so two
        // processes never take the same name.
        let tx = self.write_tx()?;
        let taken = |n: &str| -> Result<bool> {
            Ok(tx.query_row("SELECT 1 FROM experiments WHERE name = ?1", [n], |_| Ok(())).optional()?.is_some())
        };
        let mut unique = name.to_string();
        let mut k = 0;
        while taken(&unique)? || root.join(&unique).exists() {
            k += 1;
            unique = format!("{name}_{k}");
        }
        let dir = root.join(&unique);
        tx.execute(
            "INSERT INTO experiments(name, base_name, mode, dir, spec_path, spec, status, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7)",
            params![unique, name, mode, dir.to_string_lossy(), spec_path.to_string_lossy(), spec, now()],
        )?;
        let id = tx.last_insert_rowid();
        for (config, knobs, group) in runs {
            tx.execute(
                "INSERT INTO runs(experiment_id, config, knobs, grp, status, created) VALUES (?1, ?2, ?3, ?4, 'new', ?5)",
                params![id, config.to_string(), knobs.to_string(), group, now()],
            )?;
        }
        commit(tx, "create_experiment")?;
        self.experiment(&unique)
    }

    /// The experiment called `name`.
    pub fn experiment(&self, name: &str) -> Result<ExperimentRow> {
        self.conn
            .query_row(&format!("SELECT {EXPERIMENT_COLS} FROM experiments WHERE name = ?1"), [name], experiment_row)
            .optional()?
            .map(|e| self.located(e))
            .ok_or_else(|| Error::ExperimentNotFound { name: name.to_string() })
    }

    /// The experiment with this id.
    pub fn experiment_by_id(&self, id: i64) -> Result<ExperimentRow> {
        self.conn
            .query_row(&format!("SELECT {EXPERIMENT_COLS} FROM experiments WHERE id = ?1"), [id], experiment_row)
            .optional()?
            .map(|e| self.located(e))
            .ok_or(Error::ExperimentIdNotFound { id })
    }

    /// All experiments, oldest first.
    pub fn experiments(&self) -> Result<Vec<ExperimentRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {EXPERIMENT_COLS} FROM experiments ORDER BY id"))?;
        let rows = st.query_map([], experiment_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows.into_iter().map(|e| self.located(e)).collect())
    }

    /// The newest experiment made from a spec named `base_name` (whatever its suffix).
    pub fn latest_of(&self, base_name: &str) -> Result<Option<ExperimentRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {EXPERIMENT_COLS} FROM experiments WHERE base_name = ?1 ORDER BY id DESC LIMIT 1"),
                [base_name],
                experiment_row,
            )
            .optional()?
            .map(|e| self.located(e)))
    }

    /// Sets an experiment's status (`running`, `done`).
    pub fn set_experiment_status(&self, id: i64, status: &str) -> Result<()> {
        self.autocommit("set_experiment_status", |c| c.execute("UPDATE experiments SET status = ?2 WHERE id = ?1", params![id, status]))?;
        Ok(())
    }

    /// Adds a run; returns its id.
    #[allow(clippy::too_many_arguments)]
    pub fn add_run(
        &self,
        experiment_id: i64,
        config: &serde_json::Value,
        knobs: &serde_json::Value,
        group: i64,
        total_steps: i64,
        total_chunks: i64,
        parent: Option<(i64, bool)>,
    ) -> Result<i64> {
        self.autocommit("add_run", |c| {
            c.execute(
                "INSERT INTO runs(experiment_id, config, knobs, grp, status, total_steps, total_chunks, parent_id, warm, created) \
             VALUES (?1, ?2, ?3, ?4, 'new', ?5, ?6, ?7, ?8, ?9)",
                params![
                    experiment_id,
                    config.to_string(),
                    knobs.to_string(),
                    group,
                    total_steps,
                    total_chunks,
                    parent.map(|p| p.0),
                    parent.is_some_and(|p| p.1) as i64,
                    now()
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// A run by id.
    pub fn run(&self, id: i64) -> Result<RunRow> {
        let r = self
            .conn
            .query_row(&format!("SELECT {RUN_COLS} FROM runs WHERE id = ?1"), [id], run_row)
            .optional()?
            .ok_or(Error::RunNotFound { run: id })?;
        finish_run(r)
    }

    /// The runs of an experiment (deleted ones too), by id.
    pub fn runs(&self, experiment_id: i64) -> Result<Vec<RunRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {RUN_COLS} FROM runs WHERE experiment_id = ?1 ORDER BY id"))?;
        let rows = st.query_map([experiment_id], run_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(finish_run).collect()
    }

    /// Sets a run's status (and error message, for `failed`).
    pub fn set_run_status(&self, id: i64, status: RunStatus, error: Option<&str>) -> Result<()> {
        self.autocommit("set_run_status", |c| {
            c.execute("UPDATE runs SET status = ?2, error = ?3 WHERE id = ?1", params![id, status.as_str(), error])
        })?;
        Ok(())
    }

    /// Records a run's progress and its metrics of one step, in one transaction.
    pub fn record_step(&mut self, id: i64, steps_done: i64, chunks_done: i64, metrics: &[(&str, f64)]) -> Result<()> {
        let tx = self.write_tx()?;
        tx.execute("UPDATE runs SET steps_done = ?2, chunks_done = ?3 WHERE id = ?1", params![id, steps_done, chunks_done])?;
        let t = now();
        for (name, value) in metrics {
            tx.execute(
                "INSERT OR REPLACE INTO metrics(run_id, step, name, value, time) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, steps_done, name, value, t],
            )?;
        }
        commit(tx, "record_step")?;
        Ok(())
    }

    /// Takes away a warm clone that a crash cut short before its checkpoint (a store
    /// written by an older furnace, which made the run, its checkpoint and the op's
    /// applied mark one after another): an op that names it as its new run goes back to
    /// pending, so the clone is made again from that op, once. The row is removed when no
    /// op targets it; otherwise it stays, `deleted` with the reason, and the ops that
    /// target it are rejected when applied. Returns whether the row was removed. A run
    /// with a checkpoint or not `new` is left alone.
    pub fn remove_unstarted_run(&mut self, id: i64) -> Result<bool> {
        let tx = self.write_tx()?;
        let status: Option<String> =
            tx.query_row("SELECT status FROM runs WHERE id = ?1 AND checkpoint_step IS NULL", [id], |r| r.get(0)).optional()?;
        if status.as_deref() != Some(RunStatus::New.as_str()) {
            return Ok(false);
        }
        tx.execute(
            "UPDATE ops SET status = 'pending', message = NULL, new_run_id = NULL, applied_step = NULL WHERE new_run_id = ?1",
            [id],
        )?;
        tx.execute("DELETE FROM metrics WHERE run_id = ?1", [id])?;
        let removed =
            tx.execute("DELETE FROM runs WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM ops WHERE run_id = ?1 OR new_run_id = ?1)", [id])? > 0;
        if !removed {
            tx.execute(
                "UPDATE runs SET status = 'deleted', error = ?2 WHERE id = ?1",
                params![id, "a warm clone cut short by a crash before its checkpoint; its op makes it again"],
            )?;
        }
        commit(tx, "remove_unstarted_run")?;
        Ok(removed)
    }

    /// Replaces a run's stored config (the leaf spec as JSON).
    pub fn set_run_config(&self, id: i64, config: &serde_json::Value) -> Result<()> {
        self.autocommit("set_run_config", |c| c.execute("UPDATE runs SET config = ?2 WHERE id = ?1", params![id, config.to_string()]))?;
        Ok(())
    }

    /// Lets a run train further under `config`: its stored config becomes `config`, a
    /// completed, stopped or failed run becomes ongoing and its experiment running, in one
    /// transaction. A deleted run is an error.
    pub fn continue_run(&self, id: i64, config: &serde_json::Value) -> Result<()> {
        let tx = self.write_tx()?;
        let status: String =
            tx.query_row("SELECT status FROM runs WHERE id = ?1", [id], |r| r.get(0)).optional()?.ok_or(Error::RunNotFound { run: id })?;
        let status = RunStatus::parse(&status)?;
        if status == RunStatus::Deleted {
            return Err(Error::Invalid(format!("run {id} is deleted")));
        }
        tx.execute("UPDATE runs SET config = ?2 WHERE id = ?1", params![id, config.to_string()])?;
        if matches!(status, RunStatus::Completed | RunStatus::Stopped | RunStatus::Failed) {
            set_status(&tx, id, RunStatus::Ongoing, None)?;
        }
        tx.execute("UPDATE experiments SET status = 'running' WHERE id = (SELECT experiment_id FROM runs WHERE id = ?1)", [id])?;
        commit(tx, "continue_run")?;
        Ok(())
    }

    /// Records a run's step and chunk totals (known once its data is loaded).
    pub fn set_totals(&self, id: i64, total_steps: i64, total_chunks: i64) -> Result<()> {
        self.autocommit("set_totals", |c| {
            c.execute("UPDATE runs SET total_steps = ?2, total_chunks = ?3 WHERE id = ?1", params![id, total_steps, total_chunks])
        })?;
        Ok(())
    }

    /// Records that a checkpoint of `step` (after `chunks` chunks) is written: the run
    /// resumes from it after a crash.
    pub fn set_checkpoint(&self, id: i64, step: i64, chunks: i64) -> Result<()> {
        self.autocommit("set_checkpoint", |c| {
            c.execute("UPDATE runs SET checkpoint_step = ?2, checkpoint_chunks = ?3 WHERE id = ?1", params![id, step, chunks])
        })?;
        Ok(())
    }

    /// Rolls a run back to its last checkpoint (or to the start): drops the metrics of
    /// later steps, which the resumed run computes again, so none is lost or doubled.
    pub fn rewind(&mut self, id: i64) -> Result<()> {
        let tx = self.write_tx()?;
        let (step, chunks): (Option<i64>, i64) =
            tx.query_row("SELECT checkpoint_step, checkpoint_chunks FROM runs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        #[cfg(test)]
        tests::between_read_and_write();
        let s = step.unwrap_or(0);
        tx.execute("DELETE FROM metrics WHERE run_id = ?1 AND step > ?2", params![id, s])?;
        tx.execute("UPDATE runs SET steps_done = ?2, chunks_done = ?3 WHERE id = ?1", params![id, s, chunks])?;
        commit(tx, "rewind")?;
        Ok(())
    }

    /// A run's metrics, by step then name.
    pub fn metrics(&self, run_id: i64) -> Result<Vec<MetricRow>> {
        self.metrics_where("run_id = ?1", run_id)
    }

    /// The metrics of every run of an experiment, by run, step, name.
    pub fn experiment_metrics(&self, experiment_id: i64) -> Result<Vec<MetricRow>> {
        self.metrics_where("run_id IN (SELECT id FROM runs WHERE experiment_id = ?1)", experiment_id)
    }

    /// For each (run, metric) of an experiment: how many values, the latest (at the
    /// highest step) and the smallest, computed in SQL (the dashboard's runs table).
    pub fn metric_summary(&self, experiment_id: i64) -> Result<Vec<MetricSummary>> {
        let mut st = self.conn.prepare(
            "SELECT m.run_id, m.name, COUNT(*), MAX(m.step), MIN(m.value),
                    (SELECT l.value FROM metrics l WHERE l.run_id = m.run_id AND l.name = m.name ORDER BY l.step DESC LIMIT 1)
             FROM metrics m WHERE m.run_id IN (SELECT id FROM runs WHERE experiment_id = ?1)
             GROUP BY m.run_id, m.name ORDER BY m.run_id, m.name",
        )?;
        let rows = st
            .query_map([experiment_id], |r| {
                Ok(MetricSummary {
                    run_id: r.get(0)?,
                    name: r.get(1)?,
                    count: r.get(2)?,
                    last_step: r.get(3)?,
                    min: r.get(4)?,
                    last: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The values of metric `name` of a run, by step.
    pub fn metric_series(&self, run_id: i64, name: &str) -> Result<Vec<(i64, f64)>> {
        let mut st = self.conn.prepare("SELECT step, value FROM metrics WHERE run_id = ?1 AND name = ?2 ORDER BY step")?;
        let rows = st.query_map(params![run_id, name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn metrics_where(&self, cond: &str, id: i64) -> Result<Vec<MetricRow>> {
        let mut st =
            self.conn.prepare(&format!("SELECT run_id, step, name, value, time FROM metrics WHERE {cond} ORDER BY run_id, step, name"))?;
        let rows = st
            .query_map([id], |r| Ok(MetricRow { run_id: r.get(0)?, step: r.get(1)?, name: r.get(2)?, value: r.get(3)?, time: r.get(4)? }))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Records an op, pending until the trainer applies it; returns its id. The run must
    /// exist.
    pub fn add_op(&self, run_id: i64, kind: &OpKind, source: &str) -> Result<i64> {
        let tx = self.write_tx()?;
        let id = insert_op(&tx, run_id, kind, source)?;
        commit(tx, "add_op")?;
        Ok(id)
    }

    /// Records an op that already took effect (the policy's), and the run status it set,
    /// in one transaction: a crash leaves both or neither.
    pub fn add_applied_op(&self, run_id: i64, kind: &OpKind, source: &str, step: i64, message: &str, status: RunStatus) -> Result<i64> {
        let tx = self.write_tx()?;
        let id = insert_op(&tx, run_id, kind, source)?;
        mark_op(&tx, id, true, Some(message), None, Some(step))?;
        set_status(&tx, run_id, status, Some(message))?;
        commit(tx, "add_applied_op")?;
        Ok(id)
    }

    /// Marks a pending op applied and sets the status it gives its run, in one
    /// transaction (stop, resume, delete): a crash leaves both or neither.
    pub fn apply_status_op(&self, op: i64, run_id: i64, status: RunStatus, message: &str, step: Option<i64>) -> Result<()> {
        let tx = self.write_tx()?;
        mark_op(&tx, op, true, Some(message), None, step)?;
        set_status(&tx, run_id, status, Some(message))?;
        commit(tx, "apply_status_op")?;
        Ok(())
    }

    /// Applies a clone op: adds its run and marks the op applied (naming the run) in one
    /// transaction, so a crash leaves both or neither and the op never makes a second
    /// run. A warm clone comes with the progress it starts from and its checkpoint:
    /// `write_checkpoint(new run id)` writes that checkpoint (complete) inside the
    /// transaction, before the store names it; when it fails, nothing is recorded.
    /// Returns the new run's id.
    pub fn apply_clone_op(&self, op: &OpRow, clone: &NewClone<'_>, write_checkpoint: &mut dyn FnMut(i64) -> Result<()>) -> Result<i64> {
        let tx = self.write_tx()?;
        let status: Option<String> = tx.query_row("SELECT status FROM ops WHERE id = ?1", [op.id], |r| r.get(0)).optional()?;
        if status.as_deref() != Some("pending") {
            return Err(Error::Invalid(format!("op {} is not pending", op.id)));
        }
        let (steps, chunks, ckpt, run_status) = match clone.warm {
            Some((s, c)) => (s, c, Some(s), RunStatus::Ongoing),
            None => (0, 0, None, RunStatus::New),
        };
        tx.execute(
            "INSERT INTO runs(experiment_id, config, knobs, grp, status, steps_done, chunks_done, checkpoint_step, checkpoint_chunks, \
             parent_id, warm, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                op.experiment_id,
                clone.config.to_string(),
                clone.knobs.to_string(),
                clone.group,
                run_status.as_str(),
                steps,
                chunks,
                ckpt,
                chunks,
                op.run_id,
                clone.warm.is_some() as i64,
                now()
            ],
        )?;
        let new = tx.last_insert_rowid();
        if clone.warm.is_some() {
            write_checkpoint(new)?;
        }
        let message = clone.message.replace("{run}", &new.to_string());
        mark_op(&tx, op.id, true, Some(&message), Some(new), clone.step)?;
        commit(tx, "apply_clone_op")?;
        Ok(new)
    }

    /// An experiment's ops still to apply, oldest first.
    pub fn pending_ops(&self, experiment_id: i64) -> Result<Vec<OpRow>> {
        self.ops_where("experiment_id = ?1 AND status = 'pending'", experiment_id)
    }

    /// All ops of an experiment, oldest first.
    pub fn ops(&self, experiment_id: i64) -> Result<Vec<OpRow>> {
        self.ops_where("experiment_id = ?1", experiment_id)
    }

    /// One op.
    pub fn op(&self, id: i64) -> Result<OpRow> {
        self.ops_where("id = ?1", id)?.pop().ok_or(Error::OpNotFound { op: id })
    }

    fn ops_where(&self, cond: &str, id: i64) -> Result<Vec<OpRow>> {
        let mut st = self.conn.prepare(&format!("SELECT {OP_COLS} FROM ops WHERE {cond} ORDER BY id"))?;
        let rows = st.query_map([id], op_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(finish_op).collect()
    }

    /// Marks an op applied or rejected.
    pub fn finish_op(&self, id: i64, applied: bool, message: Option<&str>, new_run: Option<i64>, step: Option<i64>) -> Result<()> {
        point("finish_op", "before_commit");
        mark_op(&self.conn, id, applied, message, new_run, step)?;
        point("finish_op", "after_commit");
        Ok(())
    }
}

/// The run a clone op adds (see [`Store::apply_clone_op`]).
#[derive(Debug, Clone)]
pub struct NewClone<'a> {
    /// Its leaf config (JSON).
    pub config: &'a serde_json::Value,
    /// Its knobs.
    pub knobs: &'a serde_json::Value,
    /// Config group index.
    pub group: i64,
    /// A warm clone's starting point: (steps done, chunks done), which its checkpoint
    /// holds; `None` for a cold clone (a `new` run).
    pub warm: Option<(i64, i64)>,
    /// The op's message; `{run}` becomes the new run's id.
    pub message: &'a str,
    /// The parent's optimizer step when the op took effect.
    pub step: Option<i64>,
}

/// The crash-injection point `store.<what>.<when>` ([`furnace_hub::failpoint`]).
fn point(what: &str, when: &str) {
    if furnace_hub::failpoint::active() {
        furnace_hub::failpoint::hit(&format!("store.{what}.{when}"));
    }
}

/// Commits a write transaction of the store method `what`, between the crash-injection
/// points `store.<what>.before_commit` (everything written, nothing committed) and
/// `store.<what>.after_commit`.
pub(crate) fn commit(tx: Transaction<'_>, what: &str) -> Result<()> {
    point(what, "before_commit");
    tx.commit()?;
    point(what, "after_commit");
    Ok(())
}

fn insert_op(conn: &Connection, run_id: i64, kind: &OpKind, source: &str) -> Result<i64> {
    let experiment_id: i64 = conn
        .query_row("SELECT experiment_id FROM runs WHERE id = ?1", [run_id], |r| r.get(0))
        .optional()?
        .ok_or(Error::RunNotFound { run: run_id })?;
    let k = serde_json::to_string(kind).map_err(|source| Error::Encode { what: "an op", source })?;
    conn.execute(
        "INSERT INTO ops(experiment_id, run_id, kind, source, status, created) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
        params![experiment_id, run_id, k, source, now()],
    )?;
    Ok(conn.last_insert_rowid())
}

fn mark_op(conn: &Connection, id: i64, applied: bool, message: Option<&str>, new_run: Option<i64>, step: Option<i64>) -> Result<()> {
    conn.execute(
        "UPDATE ops SET status = ?2, message = ?3, new_run_id = ?4, applied_step = ?5 WHERE id = ?1",
        params![id, if applied { "applied" } else { "rejected" }, message, new_run, step],
    )?;
    Ok(())
}

/// Sets a run's status; the message is kept as its error for `failed` only.
fn set_status(conn: &Connection, id: i64, status: RunStatus, message: Option<&str>) -> Result<()> {
    let error = if status == RunStatus::Failed { message } else { None };
    conn.execute("UPDATE runs SET status = ?2, error = ?3 WHERE id = ?1", params![id, status.as_str(), error])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        static BETWEEN: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    /// Runs the hook a test set for the moment between a transaction's read and its write.
    pub(super) fn between_read_and_write() {
        if let Some(hook) = BETWEEN.with(|h| h.borrow_mut().take()) {
            hook();
        }
    }

    #[test]
    fn a_commit_of_another_connection_during_rewind_does_not_fail_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).unwrap();
        let spec = dir.path().join("spec.toml");
        let exp = store.create_experiment("e", "fit", &spec, "").unwrap();
        let a = store.add_run(exp.id, &serde_json::json!({}), &serde_json::json!({}), 0, 4, 2, None).unwrap();
        let b = store.add_run(exp.id, &serde_json::json!({}), &serde_json::json!({}), 0, 4, 2, None).unwrap();
        let mut rewinder = store.reopen().unwrap();
        rewinder.record_step(a, 3, 1, &[("loss", 1.0)]).unwrap();
        rewinder.set_checkpoint(a, 2, 1).unwrap();
        // The server records an op from its own connection while the rewind has read.
        let other = store.reopen().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        BETWEEN.with(|h| {
            *h.borrow_mut() = Some(Box::new(move || {
                std::thread::spawn(move || tx.send(other.add_op(b, &OpKind::Stop, "api").map(|_| ())).unwrap());
                // Long enough for a commit that nothing holds back.
                std::thread::sleep(Duration::from_millis(300));
            }))
        });
        rewinder.rewind(a).unwrap();
        rx.recv().unwrap().unwrap();
        assert_eq!(store.run(a).unwrap().steps_done, 2);
        assert!(store.metrics(a).unwrap().is_empty());
        assert_eq!(store.pending_ops(exp.id).unwrap().len(), 1);
    }
}
