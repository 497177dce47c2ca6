//! The one error type of the training crate.

/// What can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid input (empty sequence, mismatched labels, nothing to learn from).
    #[error("{0}")]
    Input(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
