//! Integration tests of furnace-track: the file format against known vectors, TensorBoard's
//! own reader on our event files, and a real MLflow tracking server receiving an
//! experiment (also one that is down while it trains).
//!
//! One test binary for the crate; one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod encoding;
mod mlflow;
mod tensorboard;
