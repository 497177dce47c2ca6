//! The `furnace` binary end to end: real model, real processes.
//!
//! One test binary for the crate (fewer binaries to link); one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adapters;
mod api;
mod cli;
mod conversations;
mod crash;
mod dashboard;
mod data_generate;
mod data_prepare;
mod evals;
mod evals_openai;
mod experiment;
mod merge;
mod pipeline;
mod rag;
mod serve;
mod train;
