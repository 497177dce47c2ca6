//! Evals mode: many pipelines (retrieval settings, a prompt, a generator) answer one
//! question set shard by shard; every metric is estimated after each shard with a
//! confidence interval (by default an anytime-valid confidence sequence, so looking after
//! every shard and stopping on what you see stays valid), pipelines are raced and steered
//! by the experiment's ops, and everything durable lives in furnace-exp's store.
#![deny(missing_docs)]

pub mod error;
pub mod generator;
pub mod openai;
pub mod ratelimit;

pub use error::{Error, Result};
