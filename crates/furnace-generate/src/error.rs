//! The one error type of the generation engine.

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt leaves no room in the context window.
    #[error("the prompt has {len} tokens but the model's context holds {max}: shorten the prompt")]
    PromptTooLong {
        /// Prompt tokens.
        len: usize,
        /// Context length.
        max: usize,
    },
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(String),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] furnace_model::Error),
    /// Decoding failed.
    #[error(transparent)]
    Text(#[from] furnace_text::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
