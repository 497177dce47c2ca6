//! Evals mode: many pipelines (retrieval settings, a prompt, a generator) answer one
//! question set shard by shard; every metric is estimated after each shard with a
//! confidence interval (by default an anytime-valid confidence sequence, so looking after
//! every shard and stopping on what you see stays valid), pipelines are raced and steered
//! by the experiment's ops, and everything durable lives in furnace-exp's store.
#![deny(missing_docs)]

pub mod dataset;
pub mod driver;
pub mod error;
pub mod experiment;
pub mod generator;
pub mod interval;
pub mod metrics;
pub mod model_eval;
pub mod openai;
pub mod prompt;
pub mod ratelimit;
pub mod score;
pub mod spec;
pub mod synth;
pub mod userfn;

pub use driver::{run_evals, EvalOptions, EvalSummary};
pub use error::{Error, Result};
pub use spec::{mode_of, EvalSpec};
