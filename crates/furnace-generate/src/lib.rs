//! furnace's generation engine: many prompts at once, each with its own sampling parameters,
//! stop conditions and LoRA adapter, over one [`furnace_model::Llama`] with continuous
//! batching.
//!
//! [`Engine`] borrows a model and runs on the caller's thread; [`EngineHandle`]
//! ([`service`]) runs the same engine on a thread that owns the model, for servers and
//! interactive front ends: requests from any thread, streamed events, aborts, and adapters
//! loaded and unloaded by name.
#![deny(missing_docs)]

pub mod engine;
pub mod error;
pub mod sampling;
pub mod service;

pub use engine::{generate, Engine, EngineOptions, Event, FinishReason, Output, Request, SeqId};
pub use error::{Error, Result};
pub use sampling::{Rng, SamplingParams};
pub use service::{AdapterInfo, EngineHandle, RequestId, ServiceOptions, Sink};
