//! furnace-generate's integration tests, one binary: a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod decoding;
mod generate;
mod grammar;
mod prefix;
mod service;
