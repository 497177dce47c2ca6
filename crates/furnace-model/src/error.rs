//! The one error type of the model runtime.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed, truncated or uses something we do not read.
    #[error("{path}: not a usable GGUF file: {msg}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// The model's architecture is not one furnace runs.
    #[error("unknown architecture '{0}': furnace runs the llama family (llama, mistral, qwen2)")]
    UnknownArchitecture(String),
    /// A configuration value is missing or invalid.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A weight the architecture needs is not in the file.
    #[error("weight '{0}' is missing from the model files")]
    MissingWeight(String),
    /// A weight has an unexpected shape.
    #[error("weight '{name}' has shape {got:?}, expected {expected:?}")]
    WeightShape {
        /// The weight.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// The path is neither a GGUF file nor an HF model directory.
    #[error("{0}: not a model: expected a .gguf file or a directory with config.json and *.safetensors")]
    NotAModel(PathBuf),
    /// A sequence would exceed the model's context window.
    #[error("sequence of {len} tokens exceeds the model's context of {max} tokens")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        len: usize,
        /// The context length.
        max: usize,
    },
    /// Tokens cannot be copied between two caches ([`crate::SeqCache::extend_from`]): too
    /// few tokens in the source, or caches of different shapes.
    #[error("KV cache copy: {0}")]
    Cache(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A LoRA adapter that cannot be used, with the reason.
    #[error("LoRA adapter: {0}")]
    Adapter(String),
    /// Loading the model at `path` failed; the message names the file, then the cause.
    #[error("loading {}: {error}", path.display())]
    LoadModel {
        /// The model file or directory.
        path: PathBuf,
        /// What went wrong.
        error: Box<Error>,
    },
    /// Loading the adapter directory at `path` failed.
    #[error("loading adapter {}: {error}", path.display())]
    LoadAdapter {
        /// The adapter directory.
        path: PathBuf,
        /// What went wrong.
        error: Box<Error>,
    },
    /// Finding a model by name failed (unknown alias, not cached, pull failed, ...); boxed,
    /// as the hub's errors are large.
    #[error(transparent)]
    Hub(Box<furnace_hub::Error>),
    /// Tokenizer or chat-template failure.
    #[error(transparent)]
    Text(#[from] furnace_text::Error),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Malformed JSON in a config file.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

impl From<furnace_hub::Error> for Error {
    fn from(e: furnace_hub::Error) -> Self {
        Error::Hub(Box::new(e))
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
