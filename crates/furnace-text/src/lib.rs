//! Text handling for furnace: tokenizers and chat templates.
//!
//! * [`Tokenizer`] encodes and decodes text exactly like Hugging Face `tokenizers`,
//!   loaded from a model directory ([`Tokenizer::from_hf_dir`]), a `tokenizer.json`
//!   ([`Tokenizer::from_file`]) or GGUF metadata ([`Tokenizer::from_gguf`] with a
//!   [`GgufTokenizerSpec`]).
//! * [`IncrementalDecoder`] streams generated tokens as text without ever splitting
//!   a UTF-8 character.
//! * [`ChatTemplate`] renders [`ChatMessage`]s with the model's Jinja chat template
//!   the way `transformers`' `apply_chat_template` does.
//!
//! This crate does not depend on candle.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod error;
mod gguf;
mod pyjson;
pub mod sandbox;
mod stream;
mod strftime;
mod template;
mod tokenizer;

pub use error::{Error, Result};
pub use gguf::GgufTokenizerSpec;
pub use stream::IncrementalDecoder;
pub use template::{json_to_value, ChatMessage, ChatTemplate, TEMPLATE_FUEL};
pub use tokenizer::Tokenizer;
