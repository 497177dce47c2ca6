//! The batched generation engine. Requests wait in a queue; up to `max_batch` of them run
//! together. Each step is one ragged forward pass carrying a prompt chunk of every sequence
//! still in prefill and one token of every sequence in decode; sequences that finish leave
//! and waiting ones join at the next step (continuous batching). Each sequence has its own
//! sampling parameters, RNG and stop conditions, so its tokens do not depend on its
//! neighbours, and may run with its own LoRA adapter (registered in the model, named in the
//! engine): the model applies each adapter to its own rows of the pass. A sequence may also
//! carry a [`Constraint`] (see [`crate::constraint`] for where it acts in a step) and report
//! the log-probability of each token ([`SamplingParams::logprobs`]).
//!
//! Prefix caching: when a sequence finishes its prompt prefill, the engine keeps a copy of
//! the KV of the prompt's block-aligned prefix (blocks of [`crate::prefix::BLOCK`] tokens),
//! keyed by its adapter and the tokens. When a sequence joins the batch, the longest cached
//! block-aligned prefix of its prompt with the same adapter (tokens checked, never the
//! whole prompt) is copied into its cache and only the rest of the prompt is run. Copies
//! are exact, so outputs are those of a full prefill. The snapshots stay within
//! [`EngineOptions::prefix_cache_bytes`] (least recently used evicted first; 0 turns the
//! cache off); [`Engine::prefix_stats`] counts hits, misses and reused tokens. A prefix is
//! reused by sequences that join after the one that computed it has finished its prefill,
//! not by sequences prefilling in the same steps. See [`crate::prefix`].
//!
//! [`Engine`] borrows its model and is driven by its caller, on the caller's thread. The
//! scheduling and sampling state lives in `Batch`, which takes the model as an argument of
//! each call; [`crate::service`] runs the same `Batch` on a thread that owns the model.

use crate::constraint::Constraint;
use crate::error::{Error, Result};
use crate::prefix::{PrefixCache, PrefixStats};
use crate::sampling::{
    apply_presence_frequency_penalties, apply_repetition_penalty, pick, token_logprob, Rng, SamplingParams, TokenLogprob,
};
use furnace_model::{AdapterId, Llama, Logits, SeqCache, SeqInput};
use furnace_text::{IncrementalDecoder, Tokenizer};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Identifies a request inside one engine (its submission index).
pub type SeqId = usize;

/// One generation request.
#[derive(Default)]
pub struct Request {
    /// Prompt token ids (chat template already applied).
    pub prompt: Vec<u32>,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// The LoRA adapter to generate with, by name ([`Engine::name_adapter`], or an adapter
    /// loaded into the service: [`crate::EngineHandle::load_adapter`]); `None` for the base
    /// model.
    pub adapter: Option<String>,
    /// Restricts the tokens the request may generate (constrained decoding); `None` for
    /// none.
    pub constraint: Option<Box<dyn Constraint>>,
}

impl Clone for Request {
    fn clone(&self) -> Self {
        Self {
            prompt: self.prompt.clone(),
            params: self.params.clone(),
            adapter: self.adapter.clone(),
            constraint: self.constraint.as_ref().map(|c| c.box_clone()),
        }
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("prompt", &self.prompt)
            .field("params", &self.params)
            .field("adapter", &self.adapter)
            .field("constraint", &self.constraint.as_ref().map(|_| "<constraint>"))
            .finish()
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// One of the stop strings, or the request's [`Constraint`] is done.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// Aborted by the caller, or by the service shutting down.
    Abort,
    /// The engine or the request's [`Constraint`] failed while the sequence ran (the
    /// message says how); the text generated so far comes with the event.
    Error(String),
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
        /// Its log-probability, when the request asked for them
        /// ([`SamplingParams::logprobs`]).
        logprob: Option<TokenLogprob>,
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
    /// The log-probability of each generated token, when the request asked for them
    /// ([`SamplingParams::logprobs`]); empty otherwise.
    pub logprobs: Vec<TokenLogprob>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most prompt tokens of one sequence per step (long prompts are prefilled in chunks
    /// so that running sequences keep decoding).
    pub prefill_chunk: usize,
    /// Most bytes of KV snapshots the prefix cache keeps (0 turns prefix caching off).
    pub prefix_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { max_batch: 16, prefill_chunk: 512, prefix_cache_bytes: 256 << 20 }
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
    /// How many times each generated token was generated (kept only for the presence and
    /// frequency penalties).
    counts: HashMap<u32, u32>,
    /// Log-probabilities of the generated tokens, when asked for.
    logprobs: Vec<TokenLogprob>,
    constraint: Option<Box<dyn Constraint>>,
    /// A stop string cut `text` (nothing held back is released at the end).
    stop_cut: bool,
    rng: Rng,
    decoder: IncrementalDecoder,
    /// Decoded text of the generated tokens.
    text: String,
    /// Bytes of `text` already emitted.
    emitted: usize,
    finish: Option<FinishReason>,
    /// The adapter the sequence runs with.
    adapter: Option<AdapterId>,
}

impl Seq {
    /// Ends the sequence: releases the text still held back and emits `Finished`.
    fn finish(&mut self, reason: FinishReason, on_event: &mut dyn FnMut(Event)) {
        // A stop string already cut the text; otherwise release what the decoder held back
        // (an incomplete character at the very end). The decoder has decoded these ids
        // before, so this does not fail; if it did, the held-back bytes are lost, never the
        // event.
        if !self.stop_cut {
            if let Ok(tail) = self.decoder.flush() {
                self.text.push_str(&tail);
            }
        }
        let rest = self.text[self.emitted.min(self.text.len())..].to_string();
        self.emitted = self.text.len();
        on_event(Event::Finished { seq: self.id, text: rest, reason: reason.clone() });
        self.finish = Some(reason);
    }

    fn into_output(self) -> Output {
        Output {
            prompt_ids: self.prompt,
            new_ids: self.generated,
            text: self.text,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            logprobs: self.logprobs,
        }
    }
}

/// The queue, the running batch and the finished outputs of one engine: everything but the
/// model, which every call that computes takes as an argument. [`Engine`] pairs it with a
/// borrowed model; the service's thread pairs it with the model it owns.
pub(crate) struct Batch {
    tokenizer: Tokenizer,
    opts: EngineOptions,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    done: BTreeMap<SeqId, Output>,
    next_id: SeqId,
    prefix: PrefixCache,
}

impl Batch {
    pub(crate) fn new(tokenizer: &Tokenizer, opts: EngineOptions) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            opts: EngineOptions { max_batch: opts.max_batch.max(1), prefill_chunk: opts.prefill_chunk.max(1), ..opts },
            waiting: VecDeque::new(),
            running: Vec::new(),
            done: BTreeMap::new(),
            next_id: 0,
            prefix: PrefixCache::new(opts.prefix_cache_bytes),
        }
    }

    pub(crate) fn prefix_stats(&self) -> PrefixStats {
        self.prefix.stats()
    }

    /// Drops cached prefixes computed with adapters no longer in `model`.
    pub(crate) fn forget_adapters(&mut self, model: &Llama) {
        self.prefix.forget_adapters(model);
    }

    /// Checks a request against the model (empty prompt, prompt longer than the context,
    /// bad parameters, ids outside the vocabulary); its adapter is the caller's business.
    pub(crate) fn check(&self, model: &Llama, req: &Request) -> Result<()> {
        req.params.validate().map_err(Error::InvalidParams)?;
        if req.prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let max = model.config.max_position_embeddings;
        if req.prompt.len() >= max {
            return Err(Error::PromptTooLong { len: req.prompt.len(), max });
        }
        let vocab = model.config.vocab_size;
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Model(furnace_model::Error::TokenOutOfRange { id: bad, vocab }));
        }
        Ok(())
    }

    /// Checks and queues a request that runs with `adapter` (registered in `model`).
    pub(crate) fn add(&mut self, model: &Llama, req: Request, adapter: Option<AdapterId>) -> Result<SeqId> {
        self.check(model, &req)?;
        let id = self.next_id;
        self.next_id += 1;
        let seed = req.params.seed.unwrap_or_else(clock_seed);
        self.waiting.push_back(Seq {
            id,
            cache: model.new_cache(),
            prompt: req.prompt,
            rng: Rng::new(seed),
            params: req.params,
            prefilled: 0,
            generated: Vec::new(),
            counts: HashMap::new(),
            logprobs: Vec::new(),
            constraint: req.constraint,
            stop_cut: false,
            decoder: self.tokenizer.incremental_decoder(true),
            text: String::new(),
            emitted: 0,
            finish: None,
            adapter,
        });
        Ok(id)
    }

    pub(crate) fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// Queued and running sequences that run with `adapter`.
    pub(crate) fn adapter_users(&self, adapter: AdapterId) -> usize {
        self.waiting.iter().chain(&self.running).filter(|s| s.adapter == Some(adapter)).count()
    }

    pub(crate) fn step(&mut self, model: &Llama, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        while self.running.len() < self.opts.max_batch {
            match self.waiting.pop_front() {
                Some(mut s) => {
                    if s.prefilled == 0 {
                        s.prefilled = self.prefix.lookup(&s.prompt, s.adapter, &mut s.cache);
                    }
                    self.running.push(s)
                }
                None => break,
            }
        }
        if self.running.is_empty() {
            return Ok(());
        }
        let chunk = self.opts.prefill_chunk;
        let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(self.running.len());
        for s in self.running.iter_mut() {
            let Seq { prompt, prefilled, generated, cache, adapter, .. } = s;
            if *prefilled < prompt.len() {
                let end = (*prefilled + chunk).min(prompt.len());
                inputs.push(SeqInput {
                    tokens: &prompt[*prefilled..end],
                    cache,
                    logits: if end == prompt.len() { Logits::Last } else { Logits::None },
                    adapter: *adapter,
                });
            } else {
                let last = generated.len() - 1;
                inputs.push(SeqInput { tokens: &generated[last..], cache, logits: Logits::Last, adapter: *adapter });
            }
        }
        let logits = model.forward(&mut inputs)?;
        drop(inputs);
        for (s, l) in self.running.iter_mut().zip(logits) {
            if s.prefilled < s.prompt.len() {
                s.prefilled = (s.prefilled + chunk).min(s.prompt.len());
                if s.prefilled == s.prompt.len() {
                    self.prefix.insert(&s.prompt, s.adapter, &s.cache);
                }
            }
            let Some(l) = l else { continue };
            if s.constraint.as_ref().is_some_and(|c| c.is_done()) {
                s.finish(FinishReason::Stop, on_event);
                continue;
            }
            let mut row = l.squeeze(0)?.to_vec1::<f32>()?;
            // Log-probabilities come from the raw logits.
            let raw = s.params.logprobs.map(|_| row.clone());
            if s.params.repetition_penalty != 1.0 {
                let seen: Vec<u32> = s.prompt.iter().chain(&s.generated).copied().collect();
                apply_repetition_penalty(&mut row, &seen, s.params.repetition_penalty);
            }
            apply_presence_frequency_penalties(&mut row, &s.counts, s.params.presence_penalty, s.params.frequency_penalty);
            if let Some(c) = s.constraint.as_mut() {
                let masked = c.mask(&mut row).and_then(|()| {
                    if row.iter().any(|&x| x > f32::NEG_INFINITY) {
                        Ok(())
                    } else {
                        Err("the constraint allows no token".to_string())
                    }
                });
                if let Err(e) = masked {
                    s.finish(FinishReason::Error(e), on_event);
                    continue;
                }
            }
            let id = pick(&mut row, &s.params, &mut s.rng);
            let is_eos = s.params.stop_at_eos && self.tokenizer.is_eos(id);
            if !is_eos {
                if let Some(c) = s.constraint.as_mut() {
                    if let Err(e) = c.commit(id) {
                        s.finish(FinishReason::Error(e), on_event);
                        continue;
                    }
                }
            }
            let logprob = raw.map(|raw| token_logprob(&raw, id, s.params.logprobs.unwrap_or(0)));
            if let Some(lp) = &logprob {
                s.logprobs.push(lp.clone());
            }
            s.generated.push(id);
            if s.params.presence_penalty != 0.0 || s.params.frequency_penalty != 0.0 {
                *s.counts.entry(id).or_insert(0) += 1;
            }
            let mut finish = None;
            if is_eos {
                finish = Some(FinishReason::Eos);
            } else {
                s.text.push_str(&s.decoder.push(id)?);
                if let Some(cut) = find_stop(&s.text, &s.params.stop) {
                    s.text.truncate(cut);
                    s.stop_cut = true;
                    finish = Some(FinishReason::Stop);
                }
            }
            if finish.is_none() && s.constraint.as_ref().is_some_and(|c| c.is_done()) {
                finish = Some(FinishReason::Stop);
            }
            if finish.is_none() && (s.generated.len() >= s.params.max_tokens || s.cache.len() + 1 >= s.cache.max_len()) {
                finish = Some(FinishReason::Length);
            }
            match finish {
                None => {
                    let safe = s.text.len() - stop_prefix_overlap(&s.text, &s.params.stop);
                    let text = s.text[s.emitted..safe.max(s.emitted)].to_string();
                    s.emitted = safe.max(s.emitted);
                    on_event(Event::Token { seq: s.id, id, text, logprob });
                }
                Some(reason) => {
                    on_event(Event::Token { seq: s.id, id, text: String::new(), logprob });
                    s.finish(reason, on_event);
                }
            }
        }
        self.retire_finished();
        Ok(())
    }

    /// Moves finished running sequences to the outputs.
    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finish.is_some() {
                let s = self.running.swap_remove(i);
                self.done.insert(s.id, s.into_output());
            } else {
                i += 1;
            }
        }
        // Keep submission order among running sequences (swap_remove reorders).
        self.running.sort_by_key(|s| s.id);
    }

    /// Ends a queued or running sequence with [`FinishReason::Abort`]; false when no such
    /// sequence is waiting or running.
    pub(crate) fn abort(&mut self, id: SeqId, on_event: &mut dyn FnMut(Event)) -> bool {
        let s = match self.running.iter().position(|s| s.id == id) {
            Some(i) => self.running.remove(i),
            None => match self.waiting.iter().position(|s| s.id == id) {
                Some(i) => match self.waiting.remove(i) {
                    Some(s) => s,
                    None => return false,
                },
                None => return false,
            },
        };
        self.end(s, FinishReason::Abort, on_event);
        true
    }

    /// Ends every running sequence, and every queued one too when `waiting`, with `reason`
    /// (a sequence that already finished keeps its own).
    pub(crate) fn end_all(&mut self, waiting: bool, reason: FinishReason, on_event: &mut dyn FnMut(Event)) {
        let mut ended: Vec<Seq> = self.running.drain(..).collect();
        if waiting {
            ended.extend(self.waiting.drain(..));
        }
        ended.sort_by_key(|s| s.id);
        for s in ended {
            self.end(s, reason.clone(), on_event);
        }
    }

    fn end(&mut self, mut s: Seq, reason: FinishReason, on_event: &mut dyn FnMut(Event)) {
        if s.finish.is_none() {
            s.finish(reason, on_event);
        }
        self.done.insert(s.id, s.into_output());
    }

    pub(crate) fn take_finished(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.done).into_values().collect()
    }
}

/// The generation engine over a borrowed model, driven on the caller's thread.
pub struct Engine<'m> {
    model: &'m Llama,
    batch: Batch,
    /// Adapter names requests may use, with their ids in the model.
    adapters: HashMap<String, AdapterId>,
}

impl<'m> Engine<'m> {
    /// A new engine; the tokenizer decodes text and knows the end-of-sequence ids.
    pub fn new(model: &'m Llama, tokenizer: &Tokenizer, opts: EngineOptions) -> Self {
        Self { model, batch: Batch::new(tokenizer, opts), adapters: HashMap::new() }
    }

    /// Lets requests name an adapter registered in the model ([`Llama::add_adapter`]) as
    /// `name` ([`Request::adapter`]).
    pub fn name_adapter(&mut self, name: impl Into<String>, id: AdapterId) -> Result<()> {
        if !self.model.has_adapter(id) {
            return Err(Error::Model(furnace_model::Error::Adapter(format!("{id} is not registered in the model"))));
        }
        self.adapters.insert(name.into(), id);
        Ok(())
    }

    /// Queues a request; errors (empty prompt, prompt longer than the context, bad
    /// parameters, an adapter name the engine does not know) are reported here, before any
    /// compute.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        let adapter = match &req.adapter {
            Some(name) => Some(*self.adapters.get(name).ok_or_else(|| Error::UnknownAdapter(name.clone()))?),
            None => None,
        };
        self.batch.add(self.model, req, adapter)
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        self.batch.has_work()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.batch.running()
    }

    /// Runs one forward pass over the running batch (admitting waiting requests first) and
    /// reports what happened through `on_event`.
    pub fn step(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        self.batch.step(self.model, on_event)
    }

    /// Ends a waiting or running request now: it reports [`Event::Finished`] with
    /// [`FinishReason::Abort`] and its output so far is kept. False when no such request
    /// is waiting or running.
    pub fn abort(&mut self, id: SeqId, on_event: &mut dyn FnMut(Event)) -> bool {
        self.batch.abort(id, on_event)
    }

    /// Counters of the prefix cache (see the module docs).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.batch.prefix_stats()
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
        self.batch.take_finished()
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
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0x5EED)
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
