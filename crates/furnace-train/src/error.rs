//! The one error type of the training crate.

use std::path::PathBuf;

/// What can go wrong while reading a spec or data, or training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid input (empty sequence, mismatched labels, nothing to learn from).
    #[error("{0}")]
    Input(String),
    /// A spec value is out of range or not allowed; the key names it exactly.
    #[error("{key}: {msg}")]
    Spec {
        /// The key, e.g. `lora.r` (`group[1].lora.r` in a `[[group]]`).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A spec file cannot be read or is not valid TOML for a spec.
    #[error("{path}: {msg}")]
    SpecParse {
        /// The spec file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A data file cannot be read or parsed as a whole (or holds no examples).
    #[error("{path}: {msg}")]
    DataFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// One row of a data file is bad.
    #[error("{path}:{line}: {msg}")]
    DataRow {
        /// The file.
        path: PathBuf,
        /// 1-based line (JSONL, CSV) or row index + 1 (JSON).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The model failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A user function (see [`crate::hooks`]) is missing or failed; `msg` holds its
    /// traceback.
    #[error("user function '{name}': {msg}")]
    Hook {
        /// The function's registered name (`python:fmt`).
        name: String,
        /// What went wrong (a Python traceback).
        msg: String,
    },
    /// Sampling completions (GRPO) failed.
    #[error("sampling completions: {0}")]
    Generate(#[from] furnace_generate::Error),
}

impl Error {
    /// Whether the spec is at fault ([`Error::Spec`], [`Error::SpecParse`]): the user's
    /// input, not the training.
    pub fn is_spec(&self) -> bool {
        matches!(self, Self::Spec { .. } | Self::SpecParse { .. })
    }

    /// Whether a data file is at fault ([`Error::DataFile`], [`Error::DataRow`]).
    pub fn is_data(&self) -> bool {
        matches!(self, Self::DataFile { .. } | Self::DataRow { .. })
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
