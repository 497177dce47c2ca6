//! furnace-rag's integration tests (one binary, a module per area).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod collection;
mod encoder;
