//! The batched generation engine. Requests wait in a queue; up to `max_batch` of them run
//! together. Each step is one ragged forward pass carrying a prompt chunk of every sequence
//! still in prefill and one token of every sequence in decode; sequences that finish leave
//! and waiting ones join at the next step (continuous batching). Each sequence has its own
//! sampling parameters, RNG and stop conditions, so its tokens do not depend on its
//! neighbours.

use crate::error::{Error, Result};
use crate::sampling::{sample, Rng, SamplingParams};
use furnace_model::{Llama, Logits, SeqCache, SeqInput};
use furnace_text::{IncrementalDecoder, Tokenizer};
use std::collections::VecDeque;

/// Identifies a request inside one engine (its submission index).
pub type SeqId = usize;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (chat template already applied).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// One of the stop strings.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
}

/// What happened to one sequence during a step.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new token, with the text it completes (possibly empty: a partial UTF-8 character
    /// or a possible stop-string prefix is held back until it is resolved).
    Token {
        /// The sequence.
        seq: SeqId,
        /// The token id.
        id: u32,
        /// Newly final text.
        text: String,
    },
    /// The sequence finished; any held-back text comes with it.
    Finished {
        /// The sequence.
        seq: SeqId,
        /// Text released at the end.
        text: String,
        /// Why.
        reason: FinishReason,
    },
}

/// The result of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Output {
    /// The prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated ids (including a final end-of-sequence token, if one ended it).
    pub new_ids: Vec<u32>,
    /// Generated text (without end-of-sequence tokens, cut before a stop string).
    pub text: String,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most prompt tokens of one sequence per step (long prompts are prefilled in chunks
    /// so that running sequences keep decoding).
    pub prefill_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 512,
        }
    }
}

struct Seq {
    id: SeqId,
    prompt: Vec<u32>,
    params: SamplingParams,
    cache: SeqCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: Vec<u32>,
    rng: Rng,
    decoder: IncrementalDecoder,
    /// Decoded text of the generated tokens.
    text: String,
    /// Bytes of `text` already emitted.
    emitted: usize,
    finish: Option<FinishReason>,
}

/// The generation engine over one model.
pub struct Engine<'m> {
    model: &'m Llama,
    tokenizer: Tokenizer,
    opts: EngineOptions,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    done: Vec<Option<Output>>,
    next_id: SeqId,
}

impl<'m> Engine<'m> {
    /// A new engine; the tokenizer decodes text and knows the end-of-sequence ids.
    pub fn new(model: &'m Llama, tokenizer: &Tokenizer, opts: EngineOptions) -> Self {
        Self {
            model,
            tokenizer: tokenizer.clone(),
            opts: EngineOptions {
                max_batch: opts.max_batch.max(1),
                prefill_chunk: opts.prefill_chunk.max(1),
            },
            waiting: VecDeque::new(),
            running: Vec::new(),
            done: Vec::new(),
            next_id: 0,
        }
    }

    /// Queues a request; errors (empty prompt, prompt longer than the context, bad
    /// parameters) are reported here, before any compute.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        req.params.validate().map_err(Error::InvalidParams)?;
        if req.prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let max = self.model.config.max_position_embeddings;
        if req.prompt.len() >= max {
            return Err(Error::PromptTooLong {
                len: req.prompt.len(),
                max,
            });
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Model(furnace_model::Error::TokenOutOfRange { id: bad, vocab }));
        }
        let id = self.next_id;
        self.next_id += 1;
        let seed = req.params.seed.unwrap_or_else(clock_seed);
        self.waiting.push_back(Seq {
            id,
            cache: self.model.new_cache(),
            prompt: req.prompt,
            rng: Rng::new(seed),
            params: req.params,
            prefilled: 0,
            generated: Vec::new(),
            decoder: self.tokenizer.incremental_decoder(true),
            text: String::new(),
            emitted: 0,
            finish: None,
        });
        self.done.push(None);
        Ok(id)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Runs one forward pass over the running batch (admitting waiting requests first) and
    /// reports what happened through `on_event`.
    pub fn step(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        while self.running.len() < self.opts.max_batch {
            match self.waiting.pop_front() {
                Some(s) => self.running.push(s),
                None => break,
            }
        }
        if self.running.is_empty() {
            return Ok(());
        }
        let chunk = self.opts.prefill_chunk;
        let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(self.running.len());
        for s in self.running.iter_mut() {
            let Seq {
                prompt,
                prefilled,
                generated,
                cache,
                ..
            } = s;
            if *prefilled < prompt.len() {
                let end = (*prefilled + chunk).min(prompt.len());
                inputs.push(SeqInput {
                    tokens: &prompt[*prefilled..end],
                    cache,
                    logits: if end == prompt.len() { Logits::Last } else { Logits::None },
                    adapter: None,
                });
            } else {
                let last = generated.len() - 1;
                inputs.push(SeqInput {
                    tokens: &generated[last..],
                    cache,
                    logits: Logits::Last,
                    adapter: None,
                });
            }
        }
        let logits = self.model.forward(&mut inputs)?;
        drop(inputs);
        for (s, l) in self.running.iter_mut().zip(logits) {
            if s.prefilled < s.prompt.len() {
                s.prefilled = (s.prefilled + chunk).min(s.prompt.len());
            }
            let Some(l) = l else { continue };
            let mut row = l.squeeze(0)?.to_vec1::<f32>()?;
            let id = {
                let seen: Vec<u32> = if s.params.repetition_penalty != 1.0 {
                    s.prompt.iter().chain(&s.generated).copied().collect()
                } else {
                    Vec::new()
                };
                sample(&mut row, &s.params, &seen, &mut s.rng)
            };
            s.generated.push(id);
            let is_eos = s.params.stop_at_eos && self.tokenizer.is_eos(id);
            if is_eos {
                s.finish = Some(FinishReason::Eos);
            } else {
                s.text.push_str(&s.decoder.push(id)?);
                if let Some(cut) = find_stop(&s.text, &s.params.stop) {
                    s.text.truncate(cut);
                    s.finish = Some(FinishReason::Stop);
                }
            }
            if s.finish.is_none()
                && (s.generated.len() >= s.params.max_tokens
                    || s.cache.len() + 1 >= s.cache.max_len())
            {
                s.finish = Some(FinishReason::Length);
            }
            if s.finish.is_none() {
                let safe = s.text.len() - stop_prefix_overlap(&s.text, &s.params.stop);
                let text = s.text[s.emitted..safe.max(s.emitted)].to_string();
                s.emitted = safe.max(s.emitted);
                on_event(Event::Token { seq: s.id, id, text });
            } else {
                // A stop string already cut the text; otherwise release what the decoder
                // held back (an incomplete character at the very end).
                if s.finish != Some(FinishReason::Stop) {
                    s.text.push_str(&s.decoder.flush()?);
                }
                on_event(Event::Token { seq: s.id, id, text: String::new() });
                let rest = s.text[s.emitted.min(s.text.len())..].to_string();
                s.emitted = s.text.len();
                on_event(Event::Finished {
                    seq: s.id,
                    text: rest,
                    reason: s.finish.clone().unwrap_or(FinishReason::Length),
                });
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finish.is_some() {
                let s = self.running.swap_remove(i);
                let slot = &mut self.done[s.id];
                *slot = Some(Output {
                    prompt_ids: s.prompt,
                    new_ids: s.generated,
                    text: s.text,
                    finish_reason: s.finish.unwrap_or(FinishReason::Length),
                });
            } else {
                i += 1;
            }
        }
        // Keep submission order among running sequences (swap_remove reorders).
        self.running.sort_by_key(|s| s.id);
        Ok(())
    }

    /// Runs until every queued request has finished; returns outputs in submission order.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<Vec<Output>> {
        while self.has_work() {
            self.step(on_event)?;
        }
        Ok(self.take_finished())
    }

    /// Removes and returns every finished output, in submission order.
    pub fn take_finished(&mut self) -> Vec<Output> {
        self.done.iter_mut().filter_map(Option::take).collect()
    }
}

/// Generates for every request in one batched run.
pub fn generate(model: &Llama, tokenizer: &Tokenizer, requests: Vec<Request>, opts: EngineOptions) -> Result<Vec<Output>> {
    let mut engine = Engine::new(model, tokenizer, opts);
    for r in requests {
        engine.add(r)?;
    }
    engine.run(&mut |_| {})
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5EED)
}

/// Byte offset of the first stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Length of the longest suffix of `text` that is a proper prefix of a stop string: that
/// much text must be held back while streaming, since the next token may complete the stop.
fn stop_prefix_overlap(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_overlap_holds_back_partial_stop() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(stop_prefix_overlap("hello </e", &stops), 3);
        assert_eq!(stop_prefix_overlap("hello", &stops), 0);
        assert_eq!(find_stop("ab</end>cd", &stops), Some(2));
    }
}
