//! What a generator is asked and what it answers, whether it is the local engine or an
//! OpenAI-compatible API.

use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling (1 = off).
    pub top_p: f64,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_tokens: 128, temperature: 0.0, top_p: 1.0, seed: None, stop: Vec::new() }
    }
}

/// One request to a generator.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The conversation to answer.
    pub messages: Vec<Message>,
    /// How to sample.
    pub sampling: Sampling,
}

/// A generator's answer to one request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenOutput {
    /// The answer text.
    pub text: String,
    /// Tokens of the prompt (as the generator counted them).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Seconds from sending the request to the whole answer.
    pub latency: f64,
    /// Why it stopped (`stop`, `length`, ...).
    pub finish_reason: String,
}
