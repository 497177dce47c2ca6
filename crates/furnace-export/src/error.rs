//! The one error type of furnace-export.

use std::path::PathBuf;

/// Everything that can go wrong while merging, combining or exporting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading the base model or an adapter failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Bad input: an adapter that does not fit the base, adapters that cannot be combined
    /// with the method asked for, an unknown option value. The message says what to fix.
    #[error("{0}")]
    Invalid(String),
}

/// furnace-export's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an I/O error to [`Error::Io`] naming `path`.
#[allow(dead_code)]
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}
