//! The error type of furnace-exp: each variant says what failed and on which experiment,
//! run, op or path.

use std::path::PathBuf;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store (SQLite) failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A run's stored config is not a spec (the store was changed outside furnace, or by
    /// an incompatible version).
    #[error("store: run {run}: stored config: {source}")]
    StoredConfig {
        /// The run.
        run: i64,
        /// Why it does not read as a spec.
        source: serde_json::Error,
    },
    /// An op's stored kind cannot be read.
    #[error("store: op {op}: {source}")]
    StoredOp {
        /// The op.
        op: i64,
        /// Why.
        source: serde_json::Error,
    },
    /// A run's stored status is not one furnace knows.
    #[error("store: unknown run status '{status}'")]
    StoredStatus {
        /// The stored text.
        status: String,
    },
    /// A value could not be turned into JSON for the store.
    #[error("store: {what}: {source}")]
    Encode {
        /// What was encoded (`a run's config`, `an op`).
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// No experiment has this name.
    #[error("no experiment named '{name}'")]
    ExperimentNotFound {
        /// The name asked for.
        name: String,
    },
    /// No experiment has this id.
    #[error("no experiment {id}")]
    ExperimentIdNotFound {
        /// The id asked for.
        id: i64,
    },
    /// The store holds no experiment yet.
    #[error("no experiments yet: start one with `furnace run spec.toml`")]
    NoExperiments,
    /// No run has this id.
    #[error("no run {run}")]
    RunNotFound {
        /// The id asked for.
        run: i64,
    },
    /// The run belongs to another experiment.
    #[error("run {run} is not in experiment {experiment}")]
    RunNotInExperiment {
        /// The run.
        run: i64,
        /// The experiment it was looked for in.
        experiment: String,
    },
    /// No op has this id.
    #[error("no op {op}")]
    OpNotFound {
        /// The id asked for.
        op: i64,
    },
    /// No logged conversation has this completion id.
    #[error("no conversation '{id}'")]
    ConversationNotFound {
        /// The id asked for (`chatcmpl-...`).
        id: String,
    },
    /// The experiment has no runs to train.
    #[error("experiment {experiment} has no runs")]
    NoRuns {
        /// The experiment.
        experiment: String,
    },
    /// Another process drives the experiment (holds its lock).
    #[error("experiment {experiment} is being run by another furnace process; steer it with `furnace ops` or wait for it to end")]
    Busy {
        /// The experiment.
        experiment: String,
    },
    /// A bad spec, op or argument (the message says which and why).
    #[error("{0}")]
    Invalid(String),
    /// An op this client may not submit (the message says why and what allows it).
    #[error("{0}")]
    Forbidden(String),
    /// A base model failed to load (the message is the loader's).
    #[error("{message}")]
    Load {
        /// The model as the spec names it.
        model: String,
        /// Why it failed.
        message: String,
    },
    /// The base model has no chat template, which formats the training rows.
    #[error("{model} has no chat template: training rows are formatted with it")]
    NoChatTemplate {
        /// The model as the spec names it.
        model: String,
    },
    /// A dataset failed to load (the file, and the row when one row is bad): a
    /// [`furnace_train::Error`] that [`is_data`](furnace_train::Error::is_data).
    #[error(transparent)]
    Data(furnace_train::Error),
    /// A file or folder could not be read, written, created or locked.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done: `reading`, `creating`, `opening`, `locking`.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The training thread could not start.
    #[error("starting the training thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The training thread panicked.
    #[error("the training thread panicked")]
    Panicked,
    /// The scheduler's own bookkeeping is inconsistent (a bug).
    #[error("internal: {0}")]
    Internal(&'static str),
    /// Training failed.
    #[error(transparent)]
    Train(furnace_train::Error),
    /// A spec is invalid (a [`furnace_train::Error`] that
    /// [`is_spec`](furnace_train::Error::is_spec)).
    #[error(transparent)]
    Spec(furnace_train::Error),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),
}

impl Error {
    /// An [`Error::Io`]: `op` (`reading`, `creating`, ...) on `path` failed.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}

/// A spec problem becomes [`Error::Spec`], a data problem [`Error::Data`], anything else
/// [`Error::Train`].
impl From<furnace_train::Error> for Error {
    fn from(e: furnace_train::Error) -> Self {
        if e.is_spec() {
            Self::Spec(e)
        } else if e.is_data() {
            Self::Data(e)
        } else {
            Self::Train(e)
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
