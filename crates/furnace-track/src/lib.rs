//! Tracking integrations: every run of an experiment logged to an MLflow tracking server
//! (its REST API) and to TensorBoard event files.
//!
//! A [`Tracker`] runs on its own thread and tails the store, the source of truth: it polls
//! the experiment's runs (about once a second, or when nudged) and sends, per backend,
//! what that backend has not received yet, remembering what was delivered in
//! `<experiment dir>/tracking.json`. Training never waits for it: the trainer only writes
//! the store, as always. A backend that is down or slow is retried with exponential
//! backoff while the values wait in the store (nothing is buffered in memory), its failure
//! reported once and its recovery once; a restarted `furnace run` continues where the
//! last one stopped, neither doubling nor losing a value.
#![deny(missing_docs)]

mod error;
mod http;
pub mod mlflow;
pub mod state;
pub mod tensorboard;
pub mod tfrecord;

pub use error::{Error, Result};

use furnace_exp::store::MetricRow;
use furnace_exp::{ExperimentRow, RunRow, Store};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where and how to track.
#[derive(Debug, Clone)]
pub struct TrackOptions {
    /// An MLflow tracking server (`http://host:port`).
    pub mlflow: Option<String>,
    /// The MLflow experiment's name (default: the furnace experiment's).
    pub mlflow_experiment: Option<String>,
    /// A folder for TensorBoard event files.
    pub tensorboard: Option<PathBuf>,
    /// How often the store is read (default 1 s).
    pub poll: Duration,
    /// Timeout of one HTTP request (default 10 s).
    pub timeout: Duration,
    /// The longest wait between tries of a failing backend (default 30 s; it starts at
    /// 1 s and doubles).
    pub max_backoff: Duration,
}

impl Default for TrackOptions {
    fn default() -> Self {
        Self {
            mlflow: None,
            mlflow_experiment: None,
            tensorboard: None,
            poll: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl TrackOptions {
    /// Whether any backend is configured.
    pub fn is_empty(&self) -> bool {
        self.mlflow.is_none() && self.tensorboard.is_none()
    }
}

/// Checks that this client can use an MLflow tracking URL (`http://host[:port][/prefix]`;
/// `https://` is not built in).
pub fn check_url(url: &str) -> Result<()> {
    http::BaseUrl::parse(url).map(|_| ())
}

/// What a backend sees of one poll.
pub(crate) struct Snapshot<'a> {
    pub(crate) experiment: &'a ExperimentRow,
    pub(crate) runs: &'a [RunRow],
    /// Metrics of the runs that may have something new.
    pub(crate) metrics: &'a BTreeMap<i64, Vec<MetricRow>>,
    /// Those runs.
    pub(crate) dirty: &'a BTreeSet<i64>,
    /// The fit ended: runs not completed or failed are closed as `KILLED`.
    pub(crate) finishing: bool,
}

enum Kind {
    Mlflow(mlflow::Mlflow),
    Tensorboard(tensorboard::Tensorboard),
}

struct Backend {
    kind: Kind,
    dirty: BTreeSet<i64>,
    down: bool,
    backoff: Duration,
    next_try: Instant,
    last_error: Option<String>,
}

impl Backend {
    fn floor(&self, run: i64, p: &state::Persist) -> Option<i64> {
        match &self.kind {
            Kind::Mlflow(m) => m.floor(run, p),
            Kind::Tensorboard(t) => t.floor(run, p),
        }
    }

    fn name(&self) -> String {
        match &self.kind {
            Kind::Mlflow(m) => m.name(),
            Kind::Tensorboard(t) => t.name(),
        }
    }
}

/// What the tracker could not deliver when it finished.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// One line per backend that is behind, saying what it misses and why.
    pub unsent: Vec<String>,
}

impl Report {
    /// Whether everything was delivered.
    pub fn is_complete(&self) -> bool {
        self.unsent.is_empty()
    }
}

enum Msg {
    Nudge,
    Finish(Instant),
}

/// A running tracker (its own thread). [`Tracker::finish`] delivers what is left, with a
/// bounded wait.
pub struct Tracker {
    tx: mpsc::Sender<Msg>,
    done: mpsc::Receiver<Report>,
    thread: Option<JoinHandle<()>>,
}

/// Log lines for people: a backend's failure (once), its recovery, a refused value.
pub type LogSink = Box<dyn FnMut(String) + Send>;

impl Tracker {
    /// Starts tracking experiment `experiment` of the store at `store_path`. Checks the
    /// options (an unusable URL is an error here, not later) and opens its own store
    /// connection.
    pub fn start(store_path: &Path, experiment: &str, opts: TrackOptions, log: LogSink) -> Result<Self> {
        let store = Store::open(store_path)?;
        let exp = store.experiment(experiment)?;
        let db = rusqlite::Connection::open(store_path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        let now = Instant::now();
        let mut backends = Vec::new();
        if let Some(url) = &opts.mlflow {
            let name = opts.mlflow_experiment.clone().unwrap_or_else(|| exp.name.clone());
            backends.push(Kind::Mlflow(mlflow::Mlflow::new(url, &name)?));
        }
        if let Some(dir) = &opts.tensorboard {
            backends.push(Kind::Tensorboard(tensorboard::Tensorboard::new(dir)));
        }
        let backends = backends
            .into_iter()
            .map(|kind| Backend { kind, dirty: BTreeSet::new(), down: false, backoff: Duration::ZERO, next_try: now, last_error: None })
            .collect();
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let mut worker = Worker { store, db, exp, opts, backends, log, fingerprints: BTreeMap::new(), persist: None };
        let thread = std::thread::Builder::new()
            .name("furnace-track".into())
            .spawn(move || {
                let report = worker.run(rx);
                let _ = done_tx.send(report);
            })
            .map_err(|e| Error::Transport(format!("starting the tracker thread: {e}")))?;
        Ok(Self { tx, done, thread: Some(thread) })
    }

    /// Reads the store now rather than at the next poll.
    pub fn nudge(&self) {
        let _ = self.tx.send(Msg::Nudge);
    }

    /// Delivers what is left (runs not completed or failed are closed as `KILLED`), trying
    /// for at most `wait`, and reports what could not be sent.
    pub fn finish(mut self, wait: Duration) -> Result<Report> {
        let deadline = Instant::now() + wait;
        let _ = self.tx.send(Msg::Finish(deadline));
        // The thread bounds its own requests by the deadline; a little slack for the last one.
        let report = self.done.recv_timeout(wait + Duration::from_secs(2)).map_err(|_| Error::ThreadGone)?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(report)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped without finish (an error path): the thread ends after a short last try.
        let _ = self.tx.send(Msg::Finish(Instant::now() + Duration::from_secs(1)));
    }
}

/// What a run's row shows (status, steps, chunks, totals, checkpoint, error): when it
/// changes, the run has something new for the backends.
type Fingerprint = (String, i64, i64, i64, i64, Option<i64>, Option<String>);

struct Worker {
    store: Store,
    /// Reads only the metric rows past what was delivered (`metrics_since`).
    db: rusqlite::Connection,
    exp: ExperimentRow,
    opts: TrackOptions,
    backends: Vec<Backend>,
    log: LogSink,
    fingerprints: BTreeMap<i64, Fingerprint>,
    persist: Option<state::Persist>,
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) -> Report {
        loop {
            match rx.recv_timeout(self.opts.poll) {
                Ok(Msg::Nudge) | Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.poll(false, None) {
                        (self.log)(format!("tracking: reading the store: {e}"));
                    }
                }
                Ok(Msg::Finish(deadline)) => return self.finish(deadline),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.finish(Instant::now() + Duration::from_secs(1)),
            }
        }
    }

    fn finish(&mut self, deadline: Instant) -> Report {
        // A final pass sees every run (statuses change to their closing ones).
        self.fingerprints.clear();
        for b in &mut self.backends {
            b.next_try = Instant::now();
        }
        let mut snapshot_unsent: Vec<usize>;
        loop {
            match self.poll(true, Some(deadline)) {
                Ok(unsent) => snapshot_unsent = unsent,
                Err(e) => {
                    return Report { unsent: vec![format!("tracking: reading the store: {e}")] };
                }
            }
            if self.backends.iter().all(|b| b.dirty.is_empty()) || Instant::now() >= deadline {
                break;
            }
            let pause = Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now()));
            std::thread::sleep(pause);
            for b in &mut self.backends {
                b.next_try = Instant::now();
            }
        }
        let mut report = Report::default();
        for (b, unsent) in self.backends.iter().zip(snapshot_unsent) {
            if !b.dirty.is_empty() {
                report.unsent.push(format!(
                    "{}: {unsent} metric values and the state of {} runs not delivered ({}); they stay in the store and are \
                     sent when the experiment is tracked again (furnace run --experiment {} with the same tracking)",
                    b.name(),
                    b.dirty.len(),
                    b.last_error.as_deref().unwrap_or("no time left"),
                    self.exp.name
                ));
            }
        }
        report
    }

    /// Reads the store and lets each due backend catch up; returns each backend's count of
    /// metric values still not delivered.
    fn poll(&mut self, finishing: bool, deadline: Option<Instant>) -> Result<Vec<usize>> {
        if self.persist.is_none() {
            let (p, warning) = state::Persist::load(&self.exp.dir);
            if let Some(w) = warning {
                (self.log)(format!("tracking: {w}"));
            }
            self.persist = Some(p);
        }
        let runs = self.store.runs(self.exp.id)?;
        for r in &runs {
            let fp = (
                r.status.as_str().to_string(),
                r.steps_done,
                r.chunks_done,
                r.total_steps,
                r.total_chunks,
                r.checkpoint_step,
                r.error.clone(),
            );
            // An active run may log an eval at a step its row already shows: always read it.
            if r.status.is_active() || self.fingerprints.get(&r.id) != Some(&fp) {
                for b in &mut self.backends {
                    b.dirty.insert(r.id);
                }
            }
            self.fingerprints.insert(r.id, fp);
        }
        let now = Instant::now();
        let due: Vec<bool> = self.backends.iter().map(|b| !b.dirty.is_empty() && now >= b.next_try).collect();
        let mut wanted = BTreeSet::new();
        for (b, _) in self.backends.iter().zip(&due).filter(|(_, d)| **d) {
            wanted.extend(b.dirty.iter().copied());
        }
        let mut unsent = Vec::new();
        let Some(persist) = self.persist.as_mut() else { return Ok(unsent) };
        let mut metrics = BTreeMap::new();
        for id in &wanted {
            // Rows from the highest step every due backend has reached (inclusive: an eval
            // lands at the step of the last loss); the final pass reads everything.
            let floors: Vec<Option<i64>> =
                self.backends.iter().zip(&due).filter(|(b, d)| **d && b.dirty.contains(id)).map(|(b, _)| b.floor(*id, persist)).collect();
            let floor = if finishing || floors.iter().any(Option::is_none) { None } else { floors.into_iter().flatten().min() };
            metrics.insert(*id, metrics_since(&self.db, *id, floor)?);
        }
        for (b, due) in self.backends.iter_mut().zip(due) {
            if due {
                let dirty = b.dirty.clone();
                let snap = Snapshot { experiment: &self.exp, runs: &runs, metrics: &metrics, dirty: &dirty, finishing };
                let timeout = match deadline {
                    Some(d) => self.opts.timeout.min(d.saturating_duration_since(Instant::now())).max(Duration::from_millis(200)),
                    None => self.opts.timeout,
                };
                let log = &mut self.log;
                let result = match &mut b.kind {
                    Kind::Mlflow(m) => m.sync(&snap, persist, timeout, &mut |l| log(l)),
                    Kind::Tensorboard(t) => t.sync(&snap, persist),
                };
                match result {
                    Ok(()) => {
                        b.dirty.retain(|id| !dirty.contains(id));
                        if b.down {
                            (self.log)(format!("{} is back: what was kept is delivered", b.name()));
                        }
                        b.down = false;
                        b.backoff = Duration::ZERO;
                        b.last_error = None;
                    }
                    Err(e) => {
                        if !b.down {
                            (self.log)(format!(
                                "{} unreachable: {e}; metrics stay in the store and are sent when it is back (training goes on)",
                                b.name()
                            ));
                        }
                        b.down = true;
                        let cap = self.opts.max_backoff.max(Duration::from_millis(100));
                        b.backoff = (b.backoff * 2).clamp(Duration::from_secs(1).min(cap), cap);
                        b.next_try = Instant::now() + b.backoff;
                        b.last_error = Some(e.to_string());
                    }
                }
                let count = match &b.kind {
                    Kind::Mlflow(m) => m.unsent(&snap, persist),
                    Kind::Tensorboard(t) => t.unsent(&snap, persist),
                };
                unsent.push(count);
            } else {
                unsent.push(0);
            }
        }
        Ok(unsent)
    }
}

/// A run's metric rows at `floor` and after (all of them for `None`), by step then name.
fn metrics_since(db: &rusqlite::Connection, run: i64, floor: Option<i64>) -> Result<Vec<MetricRow>> {
    let mut st =
        db.prepare_cached("SELECT run_id, step, name, value, time FROM metrics WHERE run_id = ?1 AND step >= ?2 ORDER BY step, name")?;
    let rows = st
        .query_map(rusqlite::params![run, floor.unwrap_or(i64::MIN)], |r| {
            Ok(MetricRow { run_id: r.get(0)?, step: r.get(1)?, name: r.get(2)?, value: r.get(3)?, time: r.get(4)? })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}
