//! Fuzzing furnace's parsers on stable Rust, without libFuzzer: a seeded PRNG mutates the
//! repository's real small files and hand-built seeds, and structure-aware generators
//! craft counts, lengths, types and offsets; every input runs under `catch_unwind`, a time
//! limit and an allocation cap. `cargo run --release -p furnace-fuzz -- --help` runs it
//! (docs/fuzzing.md); `cargo test -p furnace-fuzz` runs every target for a bounded count.
#![deny(missing_docs)]

pub mod alloc;
pub mod gen;
pub mod http;
pub mod mutate;
pub mod rng;
pub mod runner;
pub mod targets;

pub use runner::{run_one, run_target, Finding, Kind, Limits, Progress, Ran, Stats};
pub use targets::{all, Outcome, Target};
