//! furnace's generation engine: many prompts at once, each with its own sampling parameters
//! and stop conditions, over one [`furnace_model::Llama`] with continuous batching.
#![deny(missing_docs)]

pub mod engine;
pub mod error;
pub mod sampling;

pub use engine::{generate, Engine, EngineOptions, Event, FinishReason, Output, Request, SeqId};
pub use error::{Error, Result};
pub use sampling::{Rng, SamplingParams};
