//! furnace's generation engine: many prompts at once, each with its own sampling parameters,
//! stop conditions and LoRA adapter, over one [`furnace_model::Llama`] with continuous
//! batching.
//!
//! [`Engine`] borrows a model and runs on the caller's thread; [`EngineHandle`]
//! ([`service`]) runs the same engine on a thread that owns the model, for servers and
//! interactive front ends: requests from any thread, streamed events, aborts, and adapters
//! loaded and unloaded by name.
//!
//! Besides temperature, top-k and top-p, a request may ask for OpenAI's presence and
//! frequency penalties and for log-probabilities ([`SamplingParams`]), and may constrain its
//! tokens with a [`Constraint`] (constrained decoding): [`grammar`] builds them from JSON
//! schemas, Lark grammars and tool definitions with llguidance.
//!
//! The KV of shared prompt prefixes (a system prompt, earlier turns of a conversation) is
//! computed once and reused by later requests, within a memory budget ([`prefix`]).
#![deny(missing_docs)]

pub mod constraint;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod prefix;
pub mod sampling;
pub mod service;

pub use constraint::Constraint;
pub use engine::{generate, Engine, EngineOptions, Event, FinishReason, Output, Request, SeqId};
pub use error::{Error, Result};
pub use grammar::{constraint, parse_tool_calls, tool_call_grammar, Grammar, GrammarTokens, ToolCallStyle};
pub use prefix::PrefixStats;
pub use sampling::{Rng, SamplingParams, TokenLogprob};
pub use service::{AdapterInfo, EngineHandle, RequestId, ServiceOptions, Sink};
