//! One module per command. Each holds the command's clap arguments and a `run` that turns
//! them into library options and calls the library; `main.rs` only parses and dispatches.
//! A new command is a new file here plus one variant in `main.rs`'s `Command`.

pub mod adapters;
pub mod bench;
pub mod bench_datagen;
pub mod bench_embed;
pub mod bench_evals;
pub mod bench_gemm;
pub mod bench_index;
pub mod bench_prefs;
pub mod bench_search;
pub mod bench_serve;
pub mod chaos;
pub mod chat;
pub mod conversations;
pub mod data;
pub mod data_generate;
pub mod data_prepare;
pub mod doctor;
pub mod embed;
pub mod eval;
pub mod generate;
pub mod index;
pub mod launch;
pub mod merge;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod results;
pub mod run;
pub mod runs;
pub mod serve;
pub mod tokenize;
pub mod train;
pub mod ui;
