//! furnace-evals integration tests that share one binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod synth;
