//! The error type of furnace-evals.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec setting is wrong: `key` names it (`rag.top_n`), `msg` says what to fix.
    #[error("{key}: {msg}")]
    Spec {
        /// The setting (`section.key`, `metric[2].k`).
        key: String,
        /// What is wrong and what to do.
        msg: String,
    },
    /// A metric could not be computed (a bad pattern, a command that failed).
    #[error("metric {metric}: {msg}")]
    Metric {
        /// The metric's name.
        metric: String,
        /// What failed.
        msg: String,
    },
    /// A user function (`prompt.preprocess`, `generator.postprocess`, a function metric)
    /// is not registered, failed (`msg` holds its traceback) or returned the wrong shape.
    #[error("user function {name}: {msg}")]
    Hook {
        /// Its name (`python:NAME`).
        name: String,
        /// What failed.
        msg: String,
    },
    /// A generator failed (an API that kept failing, a model that did not load).
    #[error("generator: {0}")]
    Generator(String),
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// `reading`, `writing`, `running`.
        op: &'static str,
        /// The path or program.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed (or an experiment, run or op was not found).
    #[error(transparent)]
    Store(#[from] furnace_exp::Error),
    /// Anything else that is wrong with the input.
    #[error("{0}")]
    Invalid(String),
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<furnace_train::Error> for Error {
    fn from(e: furnace_train::Error) -> Self {
        match e {
            furnace_train::Error::Hook { name, msg } => Error::Hook { name, msg },
            other => Error::Invalid(other.to_string()),
        }
    }
}

impl Error {
    /// A closure turning an I/O error on `path` into an [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<std::path::PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
