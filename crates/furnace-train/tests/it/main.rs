//! Integration tests of furnace-train: data, knobs, every op's gradient, the SFT step against
//! PEFT's fixtures, the trainer and training end to end.
//!
//! One test binary for the crate (fewer binaries to link); one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod data;
mod hooks;
mod knobs;
mod ops_grad;
mod prefs;
mod prepare;
mod sft_step;
mod tracking;
mod train;
mod trainer;
