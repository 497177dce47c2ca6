//! The crate's one error type.

use std::path::PathBuf;

/// What went wrong while tracking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] furnace_exp::Error),
    /// Reading new metric rows failed.
    #[error("reading the store's metrics: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file or folder operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`writing`, `creating`).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A tracking URL this client cannot use.
    #[error("tracking URL {url:?}: {msg}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        msg: String,
    },
    /// The server could not be reached or did not answer in time.
    #[error("{0}")]
    Transport(String),
    /// The server answered with an error status.
    #[error("HTTP {status} from {endpoint}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The endpoint called.
        endpoint: String,
        /// The body it answered (cut short).
        body: String,
    },
    /// The server answered something that is not what its API says.
    #[error("unexpected answer from {endpoint}: {msg}")]
    Protocol {
        /// The endpoint called.
        endpoint: String,
        /// What was wrong.
        msg: String,
    },
    /// The tracker's thread ended without a report.
    #[error("the tracker thread stopped unexpectedly")]
    ThreadGone,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    /// Whether the server refused the request itself (a 4xx other than 408/429): sending
    /// it again would be refused again.
    pub fn is_rejection(&self) -> bool {
        matches!(self, Self::Status { status, .. } if (400..500).contains(status) && *status != 408 && *status != 429)
    }
}

/// The crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
