//! The error type of furnace-exp.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store (SQLite) failed.
    #[error("store: {0}")]
    Store(String),
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A bad spec, op or argument.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
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

/// A spec problem becomes [`Error::Spec`], anything else [`Error::Train`].
impl From<furnace_train::Error> for Error {
    fn from(e: furnace_train::Error) -> Self {
        if e.is_spec() {
            Self::Spec(e)
        } else {
            Self::Train(e)
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(e.to_string())
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
