//! furnace-model's integration tests, one binary: a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adapters;
mod bad_input;
mod common;
mod kernels;
mod kv_prefix;
mod logits;
mod lora;
