//! furnace's model runtime: loads llama-family models from GGUF files and HF directories
//! and runs them on candle, with a ragged, KV-cached forward pass that serves both prompt
//! prefill and batched generation.
//!
//! Data flow: [`LoadedModel::load`] reads a file ([`gguf`] or [`hf`]) into a
//! [`LlamaConfig`] and a [`Llama`] whose projections are [`Linear`] layers (f32, bf16 or
//! block-quantized); [`load_by_name`] does the same for an alias (fetched into the
//! furnace-hub cache when needed) or a path. [`Llama::forward`] takes new tokens of many
//! sequences with their [`SeqCache`]s, each with its own LoRA adapter or none
//! ([`Llama::add_adapter`]), and returns the logits each asked for.
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod load;
pub mod lora;
pub mod rng;
pub mod threads;

pub use config::{LlamaConfig, RopeScaling, RopeStyle};
pub use error::{Error, Result};
pub use kv_cache::SeqCache;
pub use linear::{Linear, LinearWeight, RawWeight, WeightDType};
pub use llama::{Llama, Logits, SeqInput};
pub use load::{inspect, load_adapter, load_by_name, resolve_name, GgufSource, LoadedModel, ModelInfo};
pub use lora::{AdapterId, AdapterRows, LoraConfig, LoraWeights, PeftAdapter};
