//! Integration tests of furnace-text: tokenizers and chat templates against the reference
//! fixtures.
//!
//! One test binary for the crate (fewer binaries to link); one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chat_template;
mod common;
mod incremental;
mod sentencepiece;
mod tokenizer;
