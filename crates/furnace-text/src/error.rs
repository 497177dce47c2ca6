//! The crate's error type and `Result` alias.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, encoding/decoding
/// text or rendering a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A Hugging Face model directory has no `tokenizer.json`.
    #[error("no tokenizer.json in {}", .0.display())]
    MissingTokenizer(PathBuf),

    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (tokenizer.json, tokenizer_config.json, ...) is malformed.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The offending file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A `tokenizer.json` file could not be loaded by the `tokenizers` library.
    #[error("cannot load tokenizer {}: {source}", path.display())]
    LoadTokenizer {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// The library's error.
        #[source]
        source: tokenizers::Error,
    },

    /// The `tokenizers` library reported an error (building, encoding or decoding).
    #[error("tokenizer error: {0}")]
    Tokenizer(#[source] tokenizers::Error),

    /// GGUF tokenizer metadata is inconsistent or incomplete.
    #[error("invalid GGUF tokenizer metadata: {0}")]
    InvalidGguf(String),

    /// The GGUF tokenizer model (`tokenizer.ggml.model`) is not supported.
    #[error("unsupported GGUF tokenizer model {0:?} (supported: \"gpt2\", \"llama\")")]
    UnsupportedModel(String),

    /// A chat template failed to compile or to render; holds the template engine's message.
    #[error("chat template error: {0}")]
    Template(String),

    /// A chat template called `raise_exception(message)`; holds the message.
    #[error("chat template raised an exception: {0}")]
    TemplateRaised(String),
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Error::Json { path: path.into(), source }
    }
}
