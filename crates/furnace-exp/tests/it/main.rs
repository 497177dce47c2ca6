//! furnace-exp's integration tests: one test binary, a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod conversations;
mod fit;
mod hooks;
mod ops;
mod prefs;
mod registry;
mod search;
