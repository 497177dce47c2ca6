//! After training: a LoRA adapter merged into its base ([`merge`]), several adapters
//! combined into one with PEFT's `add_weighted_adapter` definitions ([`combine`]), and the
//! result written as an HF model directory ([`hf`]) or a GGUF file ([`gguf`]) that
//! transformers, llama.cpp and furnace itself load.
//!
//! Data flow: [`merge::BaseModel::load`] reads a `.gguf` file or an HF directory into f32
//! tensors under HF names (quantized bases dequantized; llama.cpp's q/k row permutation
//! undone), [`merge::BaseModel::merge_adapter`] adds `scale · B A` to each targeted
//! projection, and [`hf::write_hf`] / [`gguf::write_gguf`] write it out.
#![deny(missing_docs)]

pub mod combine;
pub mod error;
pub mod gguf;
mod gguf_tokenizer;
pub mod hf;
pub mod merge;
pub mod svd;
mod tokenizer;

pub use error::{Error, Result};
