//! The crate's error type and `Result` alias.

use std::path::PathBuf;

/// Everything that can go wrong while embedding, ingesting, splitting, indexing or
/// searching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is malformed.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The offending file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// Loading a model failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),

    /// Loading a tokenizer failed.
    #[error(transparent)]
    Text(#[from] furnace_text::Error),

    /// Tokenising a text failed.
    #[error("tokenizing failed: {0}")]
    Tokenizer(String),

    /// A tensor operation failed (a shape the model did not expect).
    #[error("computing failed: {0}")]
    Compute(#[from] candle_core::Error),
    /// A document file (or a row of it) cannot be loaded; with `strict` loading this
    /// stops ingestion, otherwise the file is skipped and reported.
    #[error("cannot load {}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why, e.g. "binary file (NUL byte at offset 12)".
        reason: String,
    },

    /// A setting or argument is out of range or inconsistent; the message says what to fix.
    #[error("{0}")]
    Invalid(String),

    /// A vector's length differs from the index's dimension.
    #[error("vector has {got} components but the index holds {expected}-dimensional vectors")]
    DimensionMismatch {
        /// The index's dimension.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },

    /// A vector holds NaN or an infinity, or (for cosine) has zero length.
    #[error("{what}")]
    BadVector {
        /// What is wrong with it.
        what: String,
    },

    /// A search asked for zero results.
    #[error("k must be at least 1")]
    ZeroK,

    /// A search ran on an index that holds no live entries.
    #[error("the index is empty: add entries before searching")]
    EmptyIndex,

    /// An id names no live entry (never added, or deleted).
    #[error("no live entry with id {0}")]
    UnknownId(u32),

    /// A metadata filter is malformed; the message says what to fix.
    #[error("invalid metadata filter: {0}")]
    Filter(String),

    /// A saved index file is truncated, corrupted or of another format or version.
    #[error("{} is not a valid index file: {reason}", path.display())]
    Corrupt {
        /// The offending file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
