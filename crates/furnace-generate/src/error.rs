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
    /// A request names an adapter the engine does not know.
    #[error("no adapter named '{0}' is loaded")]
    UnknownAdapter(String),
    /// An adapter cannot be unloaded or replaced while requests use it.
    #[error("adapter '{name}' is in use by {requests} request(s): abort them or wait for them to finish")]
    AdapterInUse {
        /// The adapter.
        name: String,
        /// Queued and running requests that use it.
        requests: usize,
    },
    /// Making an adapter resident would exceed the budget, and every resident adapter is in
    /// use.
    #[error("all {budget} resident adapters are in use by requests: wait for one to finish, or allow more resident adapters")]
    AdapterBudget {
        /// Most adapters resident at once.
        budget: usize,
    },
    /// The engine thread has stopped (shut down, or every handle was dropped).
    #[error("the engine has stopped")]
    Stopped,
    /// The engine thread, or a step on it, panicked.
    #[error("the engine panicked")]
    Panicked,
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Spawn(std::io::Error),
    /// A JSON schema or grammar for constrained decoding does not compile (llguidance's
    /// message), or the tokenizer cannot be used for it.
    #[error("invalid grammar: {0}")]
    Grammar(String),
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
