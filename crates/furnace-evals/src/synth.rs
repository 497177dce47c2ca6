//! Synthetic datasets (`furnace data generate`): a generator (the local engine with
//! JSON-schema constrained decoding, or an OpenAI-compatible API with `response_format`)
//! writes examples about a topic or grounded in chunks of documents; each answer is parsed,
//! checked against the schema, normalized, and kept only when it is neither an exact nor a
//! near duplicate of one kept before, until `count` are kept or `max_attempts` requests have
//! been sent.
//!
//! - Requests go out in rounds of at most `batch` (one engine batch, or that many API
//!   requests `concurrency` at a time); a round asks for about as many as are still
//!   missing, scaled up by the share of answers rejected so far.
//! - Request `j` of a run is varied by the seed: it asks for one facet of the topic (or one
//!   chunk of the documents, in a seeded order), may show a few examples kept so far to
//!   steer away from them (`show_previous`), and samples with seed `mix(seed, j)`, so the same seed, batch and
//!   generator give the same rows.
//! - Exact duplicates: the same normalized key text (lowercase words; the instruction and
//!   input, the question, or the first user message). Near duplicates: word-bigram Jaccard
//!   similarity of the key text at or above `near_dup` with any kept example (found through
//!   an inverted index of bigrams, so the check stays cheap for thousands of rows).
//! - Rows are written in a form `furnace train` reads: instruction → `instruction`, `input`,
//!   `output`; qa → `prompt`, `completion`; chat → `messages`; a custom schema's objects as
//!   produced. Document-grounded rows carry the chunk they came from in `source`.

use crate::error::{Error, Result};
use crate::generator::{GenOutput, GenRequest, Message, Sampling};
use crate::openai::{OpenAiConfig, OpenAiGenerator};
use furnace_generate::{Constraint, Engine, EngineOptions, Grammar, GrammarTokens, Request, SamplingParams};
use furnace_model::rng::Rng;
use furnace_model::LoadedModel;
use furnace_text::ChatMessage;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

/// The row forms `furnace data generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{instruction, input, output}` (instruction form).
    Instruction,
    /// `{question, answer}`, written as `prompt` / `completion`.
    Qa,
    /// `{messages: [{role, content}, ...]}`, user first, assistant last.
    Chat,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "instruction" => Ok(Format::Instruction),
            "qa" => Ok(Format::Qa),
            "chat" => Ok(Format::Chat),
            _ => Err(Error::Spec { key: "format".into(), msg: format!("'{s}' is not a format; use instruction, qa or chat") }),
        }
    }
}

impl Format {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Instruction => "instruction",
            Format::Qa => "qa",
            Format::Chat => "chat",
        }
    }

    /// The JSON schema of one example. With `max_tokens`, strings get a `maxLength` that
    /// lets the whole object fit in that many tokens (for constrained local decoding: an
    /// answer cut by the token limit is not JSON); without, only keywords every
    /// structured-output API accepts are used.
    pub fn schema(self, max_tokens: Option<usize>) -> Value {
        // About three characters per token, less the JSON around the strings.
        let budget = max_tokens.map(|t| (t * 3).saturating_sub(60).max(40));
        let string = |share: f64, min: usize| {
            let mut s = json!({"type": "string"});
            if let Some(b) = budget {
                s["maxLength"] = json!(((b as f64 * share) as usize).max(min.max(8)));
                if min > 0 {
                    s["minLength"] = json!(min);
                }
            }
            s
        };
        match self {
            Format::Instruction => json!({
                "type": "object",
                "properties": {"instruction": string(0.25, 1), "input": string(0.2, 0), "output": string(0.55, 1)},
                "required": ["instruction", "input", "output"],
                "additionalProperties": false,
            }),
            Format::Qa => json!({
                "type": "object",
                "properties": {"question": string(0.35, 1), "answer": string(0.65, 1)},
                "required": ["question", "answer"],
                "additionalProperties": false,
            }),
            Format::Chat => {
                let msg = |role: &str, share: f64| {
                    json!({
                        "type": "object",
                        "properties": {"role": {"type": "string", "enum": [role]}, "content": string(share, 1)},
                        "required": ["role", "content"],
                        "additionalProperties": false,
                    })
                };
                let messages = if budget.is_some() {
                    json!({
                        "type": "array",
                        "prefixItems": [msg("user", 0.15), msg("assistant", 0.3), msg("user", 0.15), msg("assistant", 0.3)],
                        "items": false,
                        "minItems": 2,
                        "maxItems": 4,
                    })
                } else {
                    let any = json!({
                        "type": "object",
                        "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": {"type": "string"}},
                        "required": ["role", "content"],
                        "additionalProperties": false,
                    });
                    json!({"type": "array", "items": any})
                };
                json!({
                    "type": "object",
                    "properties": {"messages": messages},
                    "required": ["messages"],
                    "additionalProperties": false,
                })
            }
        }
    }

    /// What one example is, for the prompt.
    fn what(self) -> &'static str {
        match self {
            Format::Instruction => "one instruction-following example: an instruction a user might give, the input it works on (left empty when the instruction needs none), and a correct, helpful output",
            Format::Qa => "one question and its correct, concise answer",
            Format::Chat => "one short conversation between a user and a helpful assistant: messages alternate user and assistant, starting with the user and ending with the assistant's answer",
        }
    }
}

/// Where the examples' content comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Examples about a topic.
    Topic(String),
    /// Examples each grounded in one chunk of documents (used in a seeded order, round
    /// robin).
    Docs(Vec<DocChunk>),
}

/// One piece of a document an example is grounded in.
#[derive(Debug, Clone, PartialEq)]
pub struct DocChunk {
    /// Where it comes from (`file#chunk`), written in the row's `source`.
    pub source: String,
    /// The text.
    pub text: String,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The row form (ignored for the prompt wording when `schema` is given, except that
    /// rows are then written as produced).
    pub format: Format,
    /// A JSON schema that replaces the format's.
    pub schema: Option<Value>,
    /// Examples wanted.
    pub count: usize,
    /// Most requests in all (default `4 × count + 16`).
    pub max_attempts: Option<usize>,
    /// Most requests per round.
    pub batch: usize,
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus sampling.
    pub top_p: f64,
    /// Seed of the prompts' variation and of sampling.
    pub seed: u64,
    /// Word-bigram Jaccard similarity at or above which an example is a near duplicate of
    /// a kept one (above 1: no near-duplicate filter).
    pub near_dup: f64,
    /// Kept examples shown in each prompt, to steer away from them (0: none; small models
    /// tend to copy what they are shown, so this helps capable models only).
    pub show_previous: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            format: Format::Instruction,
            schema: None,
            count: 100,
            max_attempts: None,
            batch: 16,
            max_tokens: 256,
            temperature: 0.8,
            top_p: 0.95,
            seed: 0,
            near_dup: 0.7,
            show_previous: 0,
        }
    }
}

impl SynthOptions {
    /// The request bound in effect.
    pub fn attempts_bound(&self) -> usize {
        self.max_attempts.unwrap_or(self.count.saturating_mul(4).saturating_add(16))
    }

    /// The schema answers are checked against (`bounded`: with string lengths for
    /// constrained local decoding; see [`Format::schema`]).
    pub fn effective_schema(&self, bounded: bool) -> Value {
        match &self.schema {
            Some(s) => s.clone(),
            None => self.format.schema(bounded.then_some(self.max_tokens)),
        }
    }
}

/// Counters of a run so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SynthCounts {
    /// Examples wanted.
    pub requested: usize,
    /// Requests sent.
    pub attempts: usize,
    /// Answers received.
    pub generated: usize,
    /// Requests the generator failed.
    pub failed: usize,
    /// Answers that were not one JSON value.
    pub invalid_json: usize,
    /// Answers cut at the token limit before their JSON closed (raise `max_tokens`).
    pub truncated: usize,
    /// Answers the schema (or the format's rules) refused.
    pub schema_failures: usize,
    /// Exact duplicates of a kept example.
    pub duplicates: usize,
    /// Near duplicates of a kept example.
    pub near_duplicates: usize,
    /// Examples kept.
    pub kept: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The rows, in the order they were kept.
    pub rows: Vec<Value>,
    /// The counters.
    pub counts: SynthCounts,
    /// Wall seconds of the run.
    pub seconds: f64,
    /// Whether it stopped at the attempts bound before `count` rows.
    pub hit_attempts_bound: bool,
}

impl SynthReport {
    /// Kept examples per second.
    pub fn examples_per_sec(&self) -> f64 {
        self.rows.len() as f64 / self.seconds.max(1e-9)
    }

    /// The summary as JSON (the counters, seconds, examples/s, tokens/s).
    pub fn summary(&self) -> Value {
        let mut v = serde_json::to_value(self.counts).unwrap_or_else(|_| json!({}));
        v["written"] = json!(self.rows.len());
        v["seconds"] = json!(self.seconds);
        v["examples_per_sec"] = json!(self.examples_per_sec());
        v["tokens_per_sec"] = json!(self.counts.completion_tokens as f64 / self.seconds.max(1e-9));
        v["hit_attempts_bound"] = json!(self.hit_attempts_bound);
        v
    }
}

/// Something that answers chat requests; the answers are meant to be JSON under the schema
/// the generator was built with.
pub trait SynthGenerator {
    /// Answers every request, in order; a failed request is its own error.
    fn generate(&mut self, reqs: &[GenRequest]) -> Vec<std::result::Result<GenOutput, String>>;
}

/// Facets a topic request asks about, one drawn per request.
const FACETS: [&str; 20] = [
    "a basic definition or concept",
    "a common misconception",
    "a practical how-to task",
    "a comparison of two related things",
    "a short worked example or calculation",
    "a cause and its effect",
    "a historical fact or development",
    "a troubleshooting problem",
    "an advanced detail an expert would know",
    "a real-world application",
    "a list of steps or items",
    "a pros-and-cons judgement",
    "a short explanation for a beginner",
    "a what-if scenario",
    "a rule of thumb or best practice",
    "a term and its meaning",
    "a summary of a key idea",
    "a question with a precise numeric or factual answer",
    "an everyday analogy",
    "a subtle edge case",
];

/// splitmix64 of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Lowercase alphanumeric words of `text`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Word bigrams of `text` as hashes (one unigram per word when there are fewer than two).
fn shingles(text: &str) -> HashSet<u64> {
    use std::hash::{Hash, Hasher};
    let w = words(text);
    let h = |parts: &[String]| {
        let mut s = std::collections::hash_map::DefaultHasher::new();
        parts.hash(&mut s);
        s.finish()
    };
    if w.len() < 2 {
        return w.chunks(1).map(h).collect();
    }
    w.windows(2).map(h).collect()
}

/// Word-bigram Jaccard similarity of two texts (1 for two texts without words).
pub fn jaccard(a: &str, b: &str) -> f64 {
    let (a, b) = (shingles(a), shingles(b));
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let shared = a.intersection(&b).count();
    shared as f64 / (a.len() + b.len() - shared) as f64
}

/// Exact and near-duplicate filter over kept key texts.
#[derive(Debug, Default)]
struct Dedup {
    exact: HashSet<String>,
    sets: Vec<HashSet<u64>>,
    index: HashMap<u64, Vec<usize>>,
}

/// Whether a text is new, an exact duplicate or a near duplicate.
#[derive(Debug, PartialEq)]
enum Novelty {
    New,
    Exact,
    Near,
}

impl Dedup {
    fn check(&self, key: &str, near: f64) -> Novelty {
        let norm = words(key).join(" ");
        if self.exact.contains(&norm) {
            return Novelty::Exact;
        }
        if near <= 1.0 {
            let s = shingles(key);
            let mut shared: HashMap<usize, usize> = HashMap::new();
            for g in &s {
                for &i in self.index.get(g).map(Vec::as_slice).unwrap_or_default() {
                    *shared.entry(i).or_default() += 1;
                }
            }
            for (i, n) in shared {
                let other = self.sets[i].len();
                if n as f64 / (s.len() + other - n) as f64 >= near {
                    return Novelty::Near;
                }
            }
        }
        Novelty::New
    }

    fn insert(&mut self, key: &str) {
        self.exact.insert(words(key).join(" "));
        let s = shingles(key);
        let i = self.sets.len();
        for g in &s {
            self.index.entry(*g).or_default().push(i);
        }
        self.sets.push(s);
    }
}

/// Checks `value` against the JSON schema keywords `type`, `properties`, `required`,
/// `additionalProperties`, `items`, `prefixItems`, `minItems`, `maxItems`, `enum`, `const`,
/// `minLength`, `maxLength`, `minimum`, `maximum`, `anyOf`, `oneOf`, `allOf` (others are not
/// checked); the error names the path (`$.messages[1].role`).
pub fn validate(value: &Value, schema: &Value) -> std::result::Result<(), String> {
    check(value, schema, "$")
}

fn type_ok(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.as_f64().is_some_and(|f| f.fract() == 0.0) && value.is_number(),
        _ => true,
    }
}

fn check(value: &Value, schema: &Value, path: &str) -> std::result::Result<(), String> {
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{path}: not allowed here")),
        Value::Object(s) => s,
        _ => return Ok(()),
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(value, t) => return Err(format!("{path}: expected {t}")),
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_ok(value, t)) => {
            return Err(format!("{path}: expected one of {}", Value::Array(ts.clone())))
        }
        _ => {}
    }
    if let Some(Value::Array(options)) = s.get("enum") {
        if !options.contains(value) {
            return Err(format!("{path}: {value} is not one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(c) = s.get("const") {
        if c != value {
            return Err(format!("{path}: must be {c}"));
        }
    }
    if let Some(text) = value.as_str() {
        let n = text.chars().count() as u64;
        if s.get("minLength").and_then(Value::as_u64).is_some_and(|m| n < m) {
            return Err(format!("{path}: shorter than {} characters", s["minLength"]));
        }
        if s.get("maxLength").and_then(Value::as_u64).is_some_and(|m| n > m) {
            return Err(format!("{path}: longer than {} characters", s["maxLength"]));
        }
    }
    if let Some(x) = value.as_f64() {
        if s.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m) {
            return Err(format!("{path}: below {}", s["minimum"]));
        }
        if s.get("maximum").and_then(Value::as_f64).is_some_and(|m| x > m) {
            return Err(format!("{path}: above {}", s["maximum"]));
        }
    }
    if let Value::Object(obj) = value {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(req)) = s.get("required") {
            if let Some(k) = req.iter().filter_map(Value::as_str).find(|k| !obj.contains_key(*k)) {
                return Err(format!("{path}: missing \"{k}\""));
            }
        }
        for (k, v) in obj {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(v, ps, &sub)?,
                None => {
                    if let Some(extra) = s.get("additionalProperties") {
                        if extra == &Value::Bool(false) {
                            return Err(format!("{path}: unexpected key \"{k}\""));
                        }
                        check(v, extra, &sub)?;
                    }
                }
            }
        }
    }
    if let Value::Array(items) = value {
        let n = items.len() as u64;
        if s.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m) {
            return Err(format!("{path}: fewer than {} items", s["minItems"]));
        }
        if s.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m) {
            return Err(format!("{path}: more than {} items", s["maxItems"]));
        }
        let prefix = s.get("prefixItems").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            let sub = format!("{path}[{i}]");
            match prefix.get(i) {
                Some(ps) => check(item, ps, &sub)?,
                None => {
                    if let Some(is) = s.get("items") {
                        check(item, is, &sub)?;
                    }
                }
            }
        }
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        for sub in all {
            check(value, sub, path)?;
        }
    }
    if let Some(Value::Array(any)) = s.get("anyOf") {
        if !any.iter().any(|sub| check(value, sub, path).is_ok()) {
            return Err(format!("{path}: matches none of anyOf"));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let n = one.iter().filter(|sub| check(value, sub, path).is_ok()).count();
        if n != 1 {
            return Err(format!("{path}: matches {n} of oneOf, not exactly one"));
        }
    }
    Ok(())
}

/// The first JSON value in `text` (a model may wrap it in a code fence or add words).
fn parse_json(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    let start = t.find(['{', '['])?;
    let mut stream = serde_json::Deserializer::from_str(&t[start..]).into_iter::<Value>();
    stream.next()?.ok()
}

/// Trimmed strings, recursively.
fn trim_strings(v: &mut Value) {
    match v {
        Value::String(s) => {
            let t = s.trim();
            if t.len() != s.len() {
                *s = t.to_string();
            }
        }
        Value::Array(a) => a.iter_mut().for_each(trim_strings),
        Value::Object(o) => o.values_mut().for_each(trim_strings),
        _ => {}
    }
}

/// Every string leaf, joined.
fn string_leaves(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| string_leaves(x, out)),
        Value::Object(o) => o.values().for_each(|x| string_leaves(x, out)),
        _ => {}
    }
}

/// A checked example as a row, and the text duplicates are judged by.
fn normalize(format: Format, custom: bool, mut v: Value) -> std::result::Result<(Value, String), String> {
    trim_strings(&mut v);
    if custom {
        let mut leaves = Vec::new();
        string_leaves(&v, &mut leaves);
        return Ok((v, leaves.join(" ")));
    }
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    match format {
        Format::Instruction => {
            let (ins, inp, out) = (text("instruction"), text("input"), text("output"));
            if ins.is_empty() || out.is_empty() {
                return Err("empty instruction or output".into());
            }
            let key = format!("{ins} {inp}");
            Ok((json!({"instruction": ins, "input": inp, "output": out}), key))
        }
        Format::Qa => {
            let (q, a) = (text("question"), text("answer"));
            if q.is_empty() || a.is_empty() {
                return Err("empty question or answer".into());
            }
            Ok((json!({"prompt": q, "completion": a}), q))
        }
        Format::Chat => {
            let mut msgs: Vec<(String, String)> = v
                .get("messages")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            let f = |k: &str| m.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                            (f("role"), f("content"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            // A last question left unanswered is dropped.
            if msgs.len() > 2 && msgs.last().is_some_and(|m| m.0 == "user") {
                msgs.pop();
            }
            if msgs.len() < 2 {
                return Err("fewer than two messages".into());
            }
            for (i, (role, content)) in msgs.iter().enumerate() {
                let want = if i % 2 == 0 { "user" } else { "assistant" };
                if role != want {
                    return Err(format!("message {i} is from '{role}', expected '{want}' (user and assistant alternate, user first)"));
                }
                if content.is_empty() {
                    return Err(format!("message {i} is empty"));
                }
            }
            if !msgs.len().is_multiple_of(2) {
                return Err("the conversation does not end with the assistant".into());
            }
            let key = msgs[0].1.clone();
            let messages: Vec<Value> = msgs.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect();
            Ok((json!({"messages": messages}), key))
        }
    }
}

/// Shortened to `max` characters.
fn clip(t: &str, max: usize) -> String {
    match t.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// The request of attempt `j`.
fn build_request(
    opts: &SynthOptions,
    source: &Source,
    schema: &Value,
    j: usize,
    order: &[usize],
    kept: &[String],
) -> (GenRequest, Option<String>) {
    let mut rng = Rng::new(mix(opts.seed ^ mix(j as u64)));
    let custom = opts.schema.is_some();
    let what = if custom { "one example" } else { opts.format.what() };
    let system = format!(
        "You write training data for a language model. Reply with a single JSON object that matches this JSON schema, and nothing else:\n{schema}"
    );
    let mut user = String::new();
    let mut src = None;
    match source {
        Source::Topic(topic) => {
            let facet = FACETS[(rng.next_u64() % FACETS.len() as u64) as usize];
            user.push_str(&format!("Topic: {topic}\nWrite {what} about this topic, on {facet}."));
        }
        Source::Docs(chunks) => {
            let i = order.get(j % order.len().max(1)).copied().unwrap_or(0);
            if let Some(c) = chunks.get(i) {
                user.push_str(&format!(
                    "Text:\n\"\"\"\n{}\n\"\"\"\nWrite {what}, grounded only in this text: everything in the answer must be supported by it.",
                    c.text.trim()
                ));
                src = Some(c.source.clone());
            }
        }
    }
    if opts.show_previous > 0 && !kept.is_empty() {
        let mut shown: Vec<usize> = Vec::new();
        for _ in 0..opts.show_previous.min(kept.len()) * 2 {
            let k = (rng.next_u64() % kept.len() as u64) as usize;
            if !shown.contains(&k) && shown.len() < opts.show_previous {
                shown.push(k);
            }
        }
        user.push_str("\nIt must be different from these earlier ones:");
        for k in shown {
            user.push_str(&format!("\n- {}", clip(&kept[k], 120)));
        }
    }
    let sampling = Sampling {
        max_tokens: opts.max_tokens,
        temperature: opts.temperature,
        top_p: opts.top_p,
        seed: Some(mix(opts.seed.wrapping_add(0x5EED) ^ mix(j as u64 + 1))),
        stop: Vec::new(),
    };
    let messages = vec![Message { role: "system".into(), content: system }, Message { role: "user".into(), content: user }];
    (GenRequest { messages, sampling }, src)
}

/// Checks the options; the error names the setting.
fn check_options(opts: &SynthOptions, source: &Source) -> Result<()> {
    let bad = |key: &str, msg: String| Err(Error::Spec { key: key.into(), msg });
    if opts.count == 0 {
        return bad("count", "is 0; ask for at least one example".into());
    }
    if opts.batch == 0 {
        return bad("batch", "is 0; give at least 1 request per round".into());
    }
    if opts.max_tokens == 0 {
        return bad("max_tokens", "is 0; give room for an answer (e.g. 256)".into());
    }
    if opts.attempts_bound() == 0 {
        return bad("max_attempts", "is 0; allow at least one request".into());
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return bad("temperature", format!("is {}; give 0 (greedy) or more", opts.temperature));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return bad("top_p", format!("is {}; give a value in (0, 1]", opts.top_p));
    }
    if !(opts.near_dup.is_finite() && opts.near_dup > 0.0) {
        return bad("near_dup", format!("is {}; give a similarity in (0, 1], or above 1 to turn the filter off", opts.near_dup));
    }
    if let Some(s) = &opts.schema {
        if !s.is_object() {
            return bad("schema", "must be a JSON object (a JSON schema)".into());
        }
    }
    match source {
        Source::Topic(t) if t.trim().is_empty() => bad("topic", "is empty; name what the examples are about".into()),
        Source::Docs(c) if c.is_empty() => bad("docs", "no text found in the documents".into()),
        _ => Ok(()),
    }
}

/// Generates `opts.count` distinct examples (or as many as `max_attempts` requests give)
/// with `gen`; `progress` is called after each round with the counters so far. `schema` is
/// the schema answers must match (the one `gen` was built with).
pub fn synthesize(
    gen: &mut dyn SynthGenerator,
    source: &Source,
    schema: &Value,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(&SynthCounts),
) -> Result<SynthReport> {
    check_options(opts, source)?;
    let started = Instant::now();
    let custom = opts.schema.is_some();
    let bound = opts.attempts_bound();
    let mut counts = SynthCounts { requested: opts.count, ..SynthCounts::default() };
    let mut rows: Vec<Value> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut dedup = Dedup::default();
    // The seeded order the chunks are used in.
    let order: Vec<usize> = match source {
        Source::Docs(chunks) => {
            let mut o: Vec<usize> = (0..chunks.len()).collect();
            let mut rng = Rng::new(mix(opts.seed ^ 0xD0C5));
            for i in (1..o.len()).rev() {
                o.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            o
        }
        Source::Topic(_) => Vec::new(),
    };
    progress(&counts);
    while rows.len() < opts.count && counts.attempts < bound {
        let need = opts.count - rows.len();
        // The share of answers kept so far, to ask for enough at once.
        let rate = if counts.attempts == 0 { 1.0 } else { (counts.kept as f64 / counts.attempts as f64).max(0.1) };
        let round = ((need as f64 / rate).ceil() as usize).clamp(1, opts.batch).min(bound - counts.attempts);
        let built: Vec<(GenRequest, Option<String>)> =
            (0..round).map(|i| build_request(opts, source, schema, counts.attempts + i, &order, &keys)).collect();
        let reqs: Vec<GenRequest> = built.iter().map(|(r, _)| r.clone()).collect();
        let outs = gen.generate(&reqs);
        if outs.len() != reqs.len() {
            return Err(Error::Generator(format!("{} answers to {} requests", outs.len(), reqs.len())));
        }
        counts.attempts += round;
        let mut first_error = None;
        for (out, (_, src)) in outs.into_iter().zip(built) {
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    counts.failed += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            counts.generated += 1;
            counts.completion_tokens += out.completion_tokens;
            let Some(v) = parse_json(&out.text) else {
                if out.finish_reason == "length" {
                    counts.truncated += 1;
                } else {
                    counts.invalid_json += 1;
                }
                continue;
            };
            if validate(&v, schema).is_err() {
                counts.schema_failures += 1;
                continue;
            }
            let (mut row, key) = match normalize(opts.format, custom, v) {
                Ok(x) => x,
                Err(_) => {
                    counts.schema_failures += 1;
                    continue;
                }
            };
            match dedup.check(&key, opts.near_dup) {
                Novelty::Exact => counts.duplicates += 1,
                Novelty::Near => counts.near_duplicates += 1,
                Novelty::New if rows.len() < opts.count => {
                    dedup.insert(&key);
                    if let (Some(s), Some(obj)) = (src, row.as_object_mut()) {
                        obj.insert("source".into(), Value::String(s));
                    }
                    keys.push(key);
                    rows.push(row);
                    counts.kept += 1;
                }
                // Beyond the count: not needed.
                Novelty::New => {}
            }
        }
        if counts.failed == counts.attempts {
            if let Some(e) = first_error {
                return Err(Error::Generator(format!("every request failed so far; the first error: {e}")));
            }
        }
        progress(&counts);
    }
    Ok(SynthReport { hit_attempts_bound: rows.len() < opts.count, rows, counts, seconds: started.elapsed().as_secs_f64() })
}

/// Splits documents into chunks of about `chunk_chars` characters for [`Source::Docs`]
/// (each chunk's source is `document id#index`).
pub fn doc_chunks(docs: &[furnace_rag::docs::Document], chunk_chars: usize) -> Result<Vec<DocChunk>> {
    let splitter = furnace_rag::split::RecursiveCharacterSplitter::new(chunk_chars, chunk_chars / 10)
        .map_err(|e| Error::Spec { key: "chunk_chars".into(), msg: e.to_string() })?;
    let mut out = Vec::new();
    for d in docs {
        for (i, text) in splitter.split_text(&d.text).into_iter().enumerate() {
            if text.split_whitespace().count() >= 5 {
                out.push(DocChunk { source: format!("{}#{i}", d.id), text });
            }
        }
    }
    Ok(out)
}

/// Writes rows as JSON Lines, whole (beside the file first, then renamed into place).
pub fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(Error::io("writing", dir))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(Error::io("writing", path))
}

/// The local engine as a [`SynthGenerator`]: each round is one continuous batch of at most
/// `batch` sequences, each decoded under the schema (llguidance).
pub struct LocalGenerator<'m> {
    model: &'m LoadedModel,
    constraint: Box<dyn Constraint>,
    batch: usize,
}

impl<'m> LocalGenerator<'m> {
    /// A generator over `model` whose answers follow `schema`, `batch` sequences at a time.
    pub fn new(model: &'m LoadedModel, schema: &Value, batch: usize) -> Result<Self> {
        if model.chat_template.is_none() {
            return Err(Error::Invalid("the model has no chat template; use an instruct model (e.g. smollm2-135m-instruct)".into()));
        }
        let tokens = GrammarTokens::new(&model.tokenizer).map_err(|e| Error::Generator(e.to_string()))?;
        let constraint = furnace_generate::constraint(&tokens, &Grammar::JsonSchema(schema.clone()))
            .map_err(|e| Error::Spec { key: "schema".into(), msg: format!("does not compile to a grammar: {e}") })?;
        Ok(LocalGenerator { model, constraint, batch: batch.max(1) })
    }
}

impl SynthGenerator for LocalGenerator<'_> {
    fn generate(&mut self, reqs: &[GenRequest]) -> Vec<std::result::Result<GenOutput, String>> {
        let m = self.model;
        let Some(template) = &m.chat_template else {
            return reqs.iter().map(|_| Err("the model has no chat template".to_string())).collect();
        };
        let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions { max_batch: self.batch, ..EngineOptions::default() });
        let (bos, eos) = (m.tokenizer.bos_token(), m.tokenizer.eos_token());
        let mut results: Vec<Option<std::result::Result<GenOutput, String>>> = Vec::with_capacity(reqs.len());
        let mut queued = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let msgs: Vec<ChatMessage> = r.messages.iter().map(|x| ChatMessage::new(x.role.clone(), x.content.clone())).collect();
            let prompt = template
                .render(&msgs, true, bos, eos)
                .map_err(|e| e.to_string())
                .and_then(|text| m.tokenizer.encode(&text, false).map_err(|e| e.to_string()));
            let added = prompt.and_then(|prompt| {
                let params = SamplingParams {
                    temperature: r.sampling.temperature as f32,
                    top_p: r.sampling.top_p as f32,
                    seed: r.sampling.seed,
                    max_tokens: r.sampling.max_tokens,
                    stop: r.sampling.stop.clone(),
                    ..SamplingParams::default()
                };
                let req = Request { prompt, params, adapter: None, constraint: Some(self.constraint.box_clone()) };
                engine.add(req).map_err(|e| e.to_string())
            });
            match added {
                Ok(_) => {
                    queued.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let started = Instant::now();
        match engine.run(&mut |_| {}) {
            Ok(outs) => {
                let latency = started.elapsed().as_secs_f64();
                for (i, o) in queued.into_iter().zip(outs) {
                    results[i] = Some(Ok(GenOutput {
                        text: o.text,
                        prompt_tokens: o.prompt_ids.len(),
                        completion_tokens: o.new_ids.len(),
                        latency,
                        finish_reason: format!("{:?}", o.finish_reason).to_lowercase(),
                    }));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for i in queued {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err("no answer".to_string()))).collect()
    }
}

/// An OpenAI-compatible API as a [`SynthGenerator`]: each round's requests go
/// `concurrency` at a time, with `response_format` asking for the schema.
#[derive(Debug)]
pub struct OpenAiSynth {
    api: OpenAiGenerator,
}

impl OpenAiSynth {
    /// A generator for the API of `cfg` whose answers are asked to follow `schema` (`strict`
    /// when the schema is one of the built-in ones, which only use keywords strict
    /// structured output accepts).
    pub fn new(cfg: OpenAiConfig, schema: &Value, strict: bool) -> Result<Self> {
        let format = json!({"type": "json_schema", "json_schema": {"name": "example", "schema": schema, "strict": strict}});
        Ok(OpenAiSynth { api: OpenAiGenerator::new(cfg)?.with_response_format(format) })
    }
}

impl SynthGenerator for OpenAiSynth {
    fn generate(&mut self, reqs: &[GenRequest]) -> Vec<std::result::Result<GenOutput, String>> {
        self.api.generate(reqs, &mut |_| {}).into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn jaccard_of_bigrams() {
        assert_eq!(jaccard("the cat sat", "The cat, sat!"), 1.0);
        assert!((jaccard("a b c", "a b d") - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(jaccard("", ""), 1.0);
    }

    #[test]
    fn the_validator_names_the_path() {
        let s = Format::Chat.schema(Some(64));
        let ok = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]});
        validate(&ok, &s).unwrap();
        let bad = json!({"messages": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "x"}]});
        assert!(validate(&bad, &s).unwrap_err().starts_with("$.messages[0].role"));
        let e = validate(&json!({"question": "q"}), &Format::Qa.schema(None)).unwrap_err();
        assert!(e.contains("missing \"answer\""), "{e}");
    }

    #[test]
    fn json_is_found_inside_words_and_fences() {
        assert_eq!(parse_json("```json\n{\"a\": 1}\n```"), Some(json!({"a": 1})));
        assert_eq!(parse_json("nope"), None);
    }
}
