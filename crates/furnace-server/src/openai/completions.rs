//! `POST /v1/chat/completions` and `POST /v1/completions`: parameters checked and turned into
//! engine requests (one per choice), answers whole or streamed as server-sent events.

use super::{json_body, model_of, new_id, now_secs, refuse_unknown, serving_of, Admitted, OpenAiError, Serving};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use furnace_generate::{EngineHandle, Event, FinishReason, Request, RequestId, SamplingParams, TokenLogprob};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;
/// The most stop strings one request may give.
pub const MAX_STOP: usize = 16;
/// The most messages one chat request may carry.
pub const MAX_MESSAGES: usize = 4096;
/// The most alternatives `top_logprobs` (chat) or `logprobs` (text) may ask for.
pub const MAX_LOGPROBS: usize = 20;
/// `max_tokens` of a text completion that gives none (OpenAI's default).
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// The parameters both routes share.
const COMMON: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "user",
];

/// The chat route's own parameters.
const CHAT: &[&str] =
    &["messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "rag"];

/// The text route's own parameters.
const TEXT: &[&str] = &["prompt", "echo", "best_of", "suffix"];

/// Which route a request came by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A request's checked settings.
struct Settings {
    model: String,
    n: usize,
    stream: bool,
    include_usage: bool,
    params: SamplingParams,
    /// `max_tokens` as given (`None`: the default of the route).
    max_tokens: Option<usize>,
    /// The grammar `response_format` asks for.
    format: Option<furnace_generate::Grammar>,
    /// The request's tools.
    tools: Option<super::tools::Tools>,
}

fn number(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, OpenAiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| OpenAiError::bad_param(key, format!("{key} must be a number"))),
        Some(_) => Err(OpenAiError::bad_param(key, format!("{key} must be a number"))),
    }
}

fn count(body: &Map<String, Value>, key: &str, min: u64, max: u64) -> Result<Option<usize>, OpenAiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n as usize)),
            _ => Err(OpenAiError::bad_param(key, format!("{key} must be an integer from {min} to {max}, got {v}"))),
        },
    }
}

fn flag(body: &Map<String, Value>, key: &str) -> Result<bool, OpenAiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(OpenAiError::bad_param(key, format!("{key} must be true or false"))),
    }
}

/// Checks the parameters both routes share, and refuses what furnace does not do yet.
fn settings(body: &Map<String, Value>, kind: Kind) -> Result<Settings, OpenAiError> {
    let own = if kind == Kind::Chat { CHAT } else { TEXT };
    let known: Vec<&str> = COMMON.iter().chain(own).copied().collect();
    refuse_unknown(body, &known)?;
    let model = model_of(body)?;
    let stream = flag(body, "stream")?;
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) if stream => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return Err(OpenAiError::bad_param("stream_options", format!("unsupported stream option: {k}")));
            }
            flag(o, "include_usage")?
        }
        Some(Value::Object(_)) => return Err(OpenAiError::bad_param("stream_options", "stream_options is only allowed with stream: true")),
        Some(_) => return Err(OpenAiError::bad_param("stream_options", "stream_options must be an object")),
    };
    let temperature = number(body, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OpenAiError::bad_param("temperature", format!("temperature must be from 0 to 2, got {temperature}")));
    }
    let top_p = number(body, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(OpenAiError::bad_param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (Some(i), _) => Some(i as u64),
            (None, Some(u)) => Some(u),
            _ => return Err(OpenAiError::bad_param("seed", "seed must be an integer")),
        },
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let stops: Option<Vec<String>> = items.iter().map(|i| i.as_str().map(str::to_string)).collect();
            stops.ok_or_else(|| OpenAiError::bad_param("stop", "stop must be a string or a list of strings"))?
        }
        Some(_) => return Err(OpenAiError::bad_param("stop", "stop must be a string or a list of strings")),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(OpenAiError::bad_param("stop", format!("give at most {MAX_STOP} non-empty stop strings")));
    }
    let n = count(body, "n", 1, MAX_N as u64)?.unwrap_or(1);
    let max_tokens = match (count(body, "max_tokens", 1, u32::MAX as u64)?, count(body, "max_completion_tokens", 1, u32::MAX as u64)?) {
        (Some(a), Some(b)) if a != b => {
            return Err(OpenAiError::bad_param("max_completion_tokens", "max_tokens and max_completion_tokens differ: give one"))
        }
        (a, b) => a.or(b),
    };
    let mut penalties = [0.0f32; 2];
    for (slot, key) in penalties.iter_mut().zip(["presence_penalty", "frequency_penalty"]) {
        let v = number(body, key)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(OpenAiError::bad_param(key, format!("{key} must be from -2 to 2, got {v}")));
        }
        *slot = v as f32;
    }
    let logprobs = match kind {
        Kind::Chat => {
            let on = flag(body, "logprobs")?;
            let top = count(body, "top_logprobs", 0, MAX_LOGPROBS as u64)?;
            if top.is_some() && !on {
                return Err(OpenAiError::bad_param("top_logprobs", "top_logprobs needs logprobs: true"));
            }
            on.then(|| top.unwrap_or(0))
        }
        Kind::Text => count(body, "logprobs", 0, MAX_LOGPROBS as u64)?,
    };
    let (format, tools) = if kind == Kind::Chat {
        let format = super::tools::format_of(body)?;
        let tools = super::tools::tools_of(body)?;
        if format.is_some() && tools.as_ref().is_some_and(|t| t.grammar(furnace_generate::ToolCallStyle::Qwen2).is_some()) {
            return Err(OpenAiError::bad_param("response_format", "give response_format or a forced tool_choice, not both"));
        }
        (format, tools)
    } else {
        if flag(body, "echo")? {
            return Err(OpenAiError::bad_param("echo", "echo is not supported by furnace serve"));
        }
        if count(body, "best_of", 1, MAX_N as u64)?.is_some_and(|b| b != n) {
            return Err(OpenAiError::bad_param("best_of", "best_of other than n is not supported by furnace serve"));
        }
        if body.get("suffix").is_some_and(|s| !s.is_null()) {
            return Err(OpenAiError::bad_param("suffix", "suffix (insertion) is not supported by furnace serve"));
        }
        (None, None)
    };
    if let Some(user) = body.get("user") {
        if !(user.is_string() || user.is_null()) {
            return Err(OpenAiError::bad_param("user", "user must be a string"));
        }
    }
    let params = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        stop,
        presence_penalty: penalties[0],
        frequency_penalty: penalties[1],
        logprobs,
        ..SamplingParams::default()
    };
    Ok(Settings { model, n, stream, include_usage, params, max_tokens, format, tools })
}

/// The chat messages as the template context takes them: `content` made a string (text
/// parts joined), other keys (`name`, `tool_calls`, `tool_call_id`) kept.
fn messages(body: &Map<String, Value>) -> Result<Vec<Value>, OpenAiError> {
    let Some(Value::Array(items)) = body.get("messages") else {
        return Err(OpenAiError::bad_param("messages", "messages is required: a list of {\"role\", \"content\"}"));
    };
    if items.is_empty() || items.len() > MAX_MESSAGES {
        return Err(OpenAiError::bad_param("messages", format!("give 1 to {MAX_MESSAGES} messages")));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(OpenAiError::bad_param(&param, format!("{param} must be an object with role and content")));
        };
        let role = obj.get("role").and_then(Value::as_str).unwrap_or_default();
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(OpenAiError::bad_param(&param, format!("{param}.role must be system, developer, user, assistant or tool")));
        }
        let content = match obj.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (ty, _) => {
                            return Err(OpenAiError::bad_param(
                                &param,
                                format!("{param}: content parts of type {} are not supported (text only)", ty.unwrap_or("?")),
                            ))
                        }
                    }
                }
                text
            }
            Some(_) => return Err(OpenAiError::bad_param(&param, format!("{param}.content must be a string or a list of parts"))),
        };
        let mut message = obj.clone();
        // `developer` is the newer name of `system`; chat templates know `system`.
        message.insert("role".into(), Value::from(if role == "developer" { "system" } else { role }));
        message.insert("content".into(), Value::from(content));
        out.push(Value::Object(message));
    }
    Ok(out)
}

/// The prompt ids of a text completion: one string, or token ids.
fn text_prompt(s: &Serving, body: &Map<String, Value>) -> Result<Vec<u32>, OpenAiError> {
    let bad = || OpenAiError::bad_param("prompt", "prompt must be a string, a list of one string, or a list of token ids");
    match body.get("prompt") {
        Some(Value::String(p)) => s.tokenizer.encode(p, true).map_err(|e| OpenAiError::bad_param("prompt", e.to_string())),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            let p = items[0].as_str().unwrap_or_default();
            s.tokenizer.encode(p, true).map_err(|e| OpenAiError::bad_param("prompt", e.to_string()))
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let vocab = s.tokenizer.vocab_size() as u64;
            items
                .iter()
                .map(|v| v.as_u64().filter(|&id| id < vocab).map(|id| id as u32))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| OpenAiError::bad_param("prompt", format!("token ids must be below the vocabulary size {vocab}")))
        }
        Some(Value::Array(items)) if items.len() > 1 => {
            Err(OpenAiError::bad_param("prompt", "a list of several prompts is not supported: send one request per prompt"))
        }
        None => Err(OpenAiError::bad_param("prompt", "prompt is required")),
        _ => Err(bad()),
    }
}

/// Aborts a request's choices when dropped (the client went away, or the answer is done:
/// aborting a finished request does nothing).
struct AbortAll {
    engine: EngineHandle,
    ids: Vec<RequestId>,
}

impl Drop for AbortAll {
    fn drop(&mut self) {
        for &id in &self.ids {
            let _ = self.engine.abort(id);
        }
    }
}

/// A request handed to the engine: its choices' events, tagged by choice index.
struct Running {
    events: mpsc::UnboundedReceiver<(usize, Event)>,
    abort: AbortAll,
    _admitted: Admitted,
}

/// Hands one engine request per choice to the engine (on the blocking pool: `submit` waits
/// up to one step for the engine to take it).
async fn start(
    s: &Arc<Serving>,
    prompt: Vec<u32>,
    settings: &Settings,
    adapter: Option<String>,
    max_tokens: usize,
    constraint: Option<Box<dyn furnace_generate::Constraint>>,
) -> Result<Running, OpenAiError> {
    let admitted = s.admit(settings.n)?;
    // Choices differ by seed: the given one plus the choice's index, or a random base.
    let base_seed = match settings.params.seed {
        Some(seed) => seed,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| OpenAiError::internal(format!("no randomness for a seed: {e}")))?;
            u64::from_le_bytes(b)
        }
    };
    let (tx, events) = mpsc::unbounded_channel();
    let engine = s.engine.clone();
    let n = settings.n;
    let params = settings.params.clone();
    let requests: Vec<(Request, furnace_generate::Sink)> = (0..n)
        .map(|i| {
            let tx = tx.clone();
            let params = SamplingParams { seed: Some(base_seed.wrapping_add(i as u64)), max_tokens, ..params.clone() };
            let constraint = constraint.as_ref().map(|c| c.box_clone());
            let request = Request { prompt: prompt.clone(), params, adapter: adapter.clone(), constraint };
            let sink: furnace_generate::Sink = Box::new(move |ev| {
                let _ = tx.send((i, ev));
            });
            (request, sink)
        })
        .collect();
    // All choices join the batch at the same step, so that a seed gives the same choices.
    let ids = tokio::task::spawn_blocking(move || engine.submit_all(requests))
        .await
        .map_err(|e| OpenAiError::internal(e.to_string()))?
        .map_err(|e| match e {
            furnace_generate::Error::Stopped => OpenAiError::unavailable("the engine has stopped"),
            other => OpenAiError::invalid(other.to_string()),
        })?;
    let abort = AbortAll { engine: s.engine.clone(), ids };
    Ok(Running { events, abort, _admitted: admitted })
}

/// OpenAI's name of a finish reason.
fn finish_name(reason: &FinishReason, timed_out: bool) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Abort if timed_out => "length",
        _ => "stop",
    }
}

/// The prompt, checked against the context window, and the `max_tokens` to run with.
fn fit_context(s: &Serving, prompt_len: usize, settings: &Settings, kind: Kind) -> Result<usize, OpenAiError> {
    let param = if kind == Kind::Chat { "messages" } else { "prompt" };
    let context = s.context_len;
    let too_long = |asked: usize| {
        OpenAiError::bad_param(
            param,
            format!(
                "this model's maximum context length is {context} tokens; the request needs {} ({prompt_len} in the {param}, {asked} to generate): shorten the {param} or lower max_tokens",
                prompt_len + asked
            ),
        )
        .code("context_length_exceeded")
    };
    if prompt_len >= context {
        return Err(too_long(settings.max_tokens.unwrap_or(1)));
    }
    let room = context - prompt_len;
    match settings.max_tokens {
        Some(m) if m > room => Err(too_long(m)),
        Some(m) => Ok(m),
        None if kind == Kind::Text => Ok(COMPLETION_DEFAULT_MAX_TOKENS.min(room)),
        None => Ok(room),
    }
}

pub(super) async fn chat(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, Kind::Chat).await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    respond(st, body, Kind::Text).await.unwrap_or_else(IntoResponse::into_response)
}

async fn respond(st: AppState, body: Result<Bytes, BytesRejection>, kind: Kind) -> Result<Response, OpenAiError> {
    let s = serving_of(&st)?;
    let body = json_body(body)?;
    let settings = settings(&body, kind)?;
    let model = settings.model.clone();
    let answer = respond_with(&st, &s, &body, settings, kind).await;
    if answer.is_err() {
        s.metrics.error(&model);
    }
    answer
}

async fn respond_with(
    st: &AppState,
    s: &Arc<Serving>,
    body: &Map<String, Value>,
    settings: Settings,
    kind: Kind,
) -> Result<Response, OpenAiError> {
    let started = std::time::Instant::now();
    let adapter = s.resolve_model(&settings.model).await?;
    let mut sources = None;
    let mut logged_messages = None;
    let mut tool_style = None;
    let mut grammar = settings.format.clone();
    let prompt = match kind {
        Kind::Chat => {
            let mut messages = messages(body)?;
            super::tools::normalize_tool_calls(&mut messages);
            logged_messages = Some(Value::from(messages.clone()));
            if let Some((retrieval, template)) = super::documents::retrieval_of(body, &settings.model)? {
                let Some(last) = messages.iter().rposition(|m| m.get("role").and_then(Value::as_str) == Some("user")) else {
                    return Err(OpenAiError::bad_param("messages", "retrieval needs a user message to search with"));
                };
                let question = messages[last].get("content").and_then(Value::as_str).unwrap_or_default().to_string();
                let s2 = s.clone();
                let q = question.clone();
                let hits = tokio::task::spawn_blocking(move || super::documents::retrieve(&s2, &retrieval, &q))
                    .await
                    .map_err(|e| OpenAiError::internal(e.to_string()))??;
                messages[last]["content"] = Value::from(super::documents::fill_template(&template, &hits, &question));
                sources = Some(Value::from(hits.iter().map(super::documents::source_json).collect::<Vec<_>>()));
            }
            let template = s
                .template
                .clone()
                .ok_or_else(|| OpenAiError::invalid(format!("{} has no chat template: use /v1/completions with a prompt", s.model_name)))?;
            let mut context = Map::new();
            if let Some(tools) = settings.tools.as_ref().filter(|t| t.active()) {
                let style = if super::tools::template_knows_tools(template.source()) {
                    context.insert("tools".into(), Value::from(tools.raw.clone()));
                    super::tools::style_of(template.source())
                } else {
                    // The template cannot show tools: describe them in the `<tool_call>` format.
                    super::tools::inject_tools_prompt(&mut messages, tools);
                    furnace_generate::ToolCallStyle::Qwen2
                };
                tool_style = Some(style);
                if let Some(g) = tools.grammar(style) {
                    grammar = Some(g);
                }
            }
            context.insert("messages".into(), Value::from(messages));
            context.insert("add_generation_prompt".into(), Value::from(true));
            if let Some(bos) = s.tokenizer.bos_token() {
                context.insert("bos_token".into(), Value::from(bos));
            }
            if let Some(eos) = s.tokenizer.eos_token() {
                context.insert("eos_token".into(), Value::from(eos));
            }
            // Templates render in a worker process (furnace_text::sandbox): off the async pool.
            let text = tokio::task::spawn_blocking(move || template.render_value(Value::Object(context)))
                .await
                .map_err(|e| OpenAiError::internal(e.to_string()))?
                .map_err(|e| OpenAiError::bad_param("messages", format!("the chat template failed: {e}")))?;
            s.tokenizer.encode(&text, false).map_err(|e| OpenAiError::bad_param("messages", e.to_string()))?
        }
        Kind::Text => text_prompt(s, body)?,
    };
    let constraint = match grammar {
        None => None,
        Some(g) => {
            let s2 = s.clone();
            let param = if settings.format.is_some() { "response_format" } else { "tools" };
            let built = tokio::task::spawn_blocking(move || -> Result<Box<dyn furnace_generate::Constraint>, String> {
                let tokens = s2.grammar_tokens()?;
                furnace_generate::constraint(&tokens, &g).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| OpenAiError::internal(e.to_string()))?;
            Some(built.map_err(|e| OpenAiError::bad_param(param, e))?)
        }
    };
    let max_tokens = fit_context(s, prompt.len(), &settings, kind)?;
    let prompt_tokens = prompt.len();
    let running = start(s, prompt, &settings, adapter.clone(), max_tokens, constraint).await?;
    s.metrics.request(&settings.model, prompt_tokens);
    let meta = Meta {
        id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_secs(),
        model: settings.model.clone(),
        kind,
        prompt_tokens,
        sources,
        started,
        tool_style,
        log: logged_messages.map(|messages| (st.clone(), messages, adapter)),
    };
    if settings.stream {
        Ok(stream(s.clone(), running, meta, settings.n, settings.include_usage, settings.params.logprobs.is_some()))
    } else {
        whole(s, running, meta, settings.n, settings.params.logprobs.is_some()).await
    }
}

/// What every answer of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    /// The chunks a retrieval chat used (an extra field OpenAI clients ignore).
    sources: Option<Value>,
    /// When the request came in (time to first token counts from here).
    started: std::time::Instant,
    /// How tool calls are written, when the request's tools are active (the text is parsed
    /// for calls).
    tool_style: Option<furnace_generate::ToolCallStyle>,
    /// A chat completion is logged: the state, the messages as normalized, the adapter.
    log: Option<(AppState, Value, Option<String>)>,
}

impl Meta {
    /// Logs the finished chat completion (never fails the answer: a store error is printed).
    async fn log(&self, choices: &[Choice], completion_tokens: usize) {
        let Some((st, messages, adapter)) = &self.log else { return };
        let record = furnace_exp::ConversationRecord {
            id: self.id.clone(),
            created: self.created as i64,
            model: self.model.clone(),
            adapter: adapter.clone(),
            messages: messages.clone(),
            response: choices
                .iter()
                .map(|c| furnace_exp::ChoiceRecord { text: c.text.clone(), tool_calls: c.tool_calls.clone().map(Value::from) })
                .collect(),
            rag_sources: self.sources.clone(),
            prompt_tokens: self.prompt_tokens as i64,
            completion_tokens: completion_tokens as i64,
            latency_ms: self.started.elapsed().as_millis() as i64,
        };
        if let Err(e) = super::log::log_completion(st, record).await {
            eprintln!("furnace serve: could not log {}: {}", self.id, e.message);
        }
    }
}

/// Times the tokens of a request's choices for `/metrics`.
struct Timer {
    first_seen: bool,
    last: Vec<Option<std::time::Instant>>,
}

impl Timer {
    fn new(n: usize) -> Self {
        Self { first_seen: false, last: vec![None; n] }
    }

    fn token(&mut self, s: &Serving, meta: &Meta, i: usize) {
        let now = std::time::Instant::now();
        if !self.first_seen {
            self.first_seen = true;
            s.metrics.first_token(&meta.model, now - meta.started);
        } else if let Some(last) = self.last[i] {
            s.metrics.next_token(&meta.model, now - last);
        }
        self.last[i] = Some(now);
    }
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }
}

/// One choice as it runs.
#[derive(Default, Clone)]
struct Choice {
    text: String,
    tokens: usize,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLog>,
    /// The calls parsed from the text, when the request's tools are active.
    tool_calls: Option<Vec<Value>>,
}

/// One generated token's log-probabilities, with text for the token and its alternatives.
#[derive(Clone)]
struct TokenLog {
    token: String,
    logprob: f32,
    top: Vec<(String, f32)>,
}

impl TokenLog {
    /// The token's entry, unless logprobs were not asked for or it is the end-of-sequence
    /// token (which is not part of the text).
    fn of(s: &Serving, id: u32, logprob: Option<TokenLogprob>) -> Option<TokenLog> {
        let lp = logprob?;
        if s.tokenizer.is_eos(id) {
            return None;
        }
        let text = |id: u32| s.tokenizer.decode(&[id], false).unwrap_or_default();
        Some(TokenLog { token: text(id), logprob: lp.logprob, top: lp.top.iter().map(|&(t, l)| (text(t), l)).collect() })
    }
}

/// The `logprobs` of a choice in the route's format (`null` when not asked for).
fn logprobs_json(kind: Kind, logs: &[TokenLog], asked: bool) -> Value {
    if !asked {
        return Value::Null;
    }
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = logs
                .iter()
                .map(|l| {
                    let mut e = entry(&l.token, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Kind::Text => {
            let mut offset = 0usize;
            let mut offsets = Vec::with_capacity(logs.len());
            for l in logs {
                offsets.push(offset);
                offset += l.token.len();
            }
            let top: Vec<Value> =
                logs.iter().map(|l| Value::Object(l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect())).collect();
            json!({
                "tokens": logs.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": logs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// Waits for every choice and answers with the whole completion.
async fn whole(s: &Serving, mut running: Running, meta: Meta, n: usize, asked_logprobs: bool) -> Result<Response, OpenAiError> {
    let mut choices: Vec<Choice> = vec![Choice::default(); n];
    let deadline = tokio::time::Instant::now() + s.limits.request_timeout;
    let mut timed_out = false;
    let mut timer = Timer::new(n);
    while choices.iter().any(|c| c.finish.is_none()) {
        match tokio::time::timeout_at(deadline, running.events.recv()).await {
            Ok(Some((i, Event::Token { id, text, logprob, .. }))) => {
                timer.token(s, &meta, i);
                choices[i].text.push_str(&text);
                choices[i].tokens += 1;
                choices[i].logprobs.extend(TokenLog::of(s, id, logprob));
            }
            Ok(Some((i, Event::Finished { text, reason, .. }))) => {
                choices[i].text.push_str(&text);
                choices[i].finish = Some(reason);
            }
            Ok(None) => break,
            Err(_) => {
                // Past the request's time: end it as if max_tokens were reached.
                timed_out = true;
                for &id in &running.abort.ids {
                    let _ = running.abort.engine.abort(id);
                }
            }
        }
    }
    if let Some(style) = meta.tool_style {
        for c in &mut choices {
            c.tool_calls = super::tools::calls_of(style, &c.text);
        }
    }
    let mut out = Vec::with_capacity(n);
    for (i, c) in choices.iter().enumerate() {
        let reason = match &c.finish {
            None => return Err(OpenAiError::unavailable("the engine stopped before the answer was complete")),
            Some(FinishReason::Error(e)) => return Err(OpenAiError::internal(format!("generation failed: {e}"))),
            Some(FinishReason::Abort) if !timed_out => return Err(OpenAiError::unavailable("the server is shutting down")),
            Some(r) => finish_name(r, timed_out),
        };
        let logprobs = logprobs_json(meta.kind, &c.logprobs, asked_logprobs);
        out.push(match meta.kind {
            Kind::Chat => match &c.tool_calls {
                Some(calls) => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": null, "tool_calls": calls},
                    "logprobs": logprobs,
                    "finish_reason": "tool_calls",
                }),
                None => {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs, "finish_reason": reason})
                }
            },
            Kind::Text => json!({"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": reason}),
        });
    }
    let completion_tokens = choices.iter().map(|c| c.tokens).sum();
    s.metrics.completion(&meta.model, completion_tokens);
    // Logged before the answer leaves: once a client has its answer, the log has it too.
    meta.log(&choices, completion_tokens).await;
    let mut answer = json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": null,
        "choices": out,
        "usage": meta.usage(completion_tokens),
    });
    if let Some(sources) = meta.sources {
        answer["sources"] = sources;
    }
    Ok(Json(answer).into_response())
}

/// Streams the choices as server-sent events in OpenAI's chunk format, then `[DONE]`.
/// Dropping the stream (the client went away) aborts the request.
fn stream(s: Arc<Serving>, mut running: Running, meta: Meta, n: usize, include_usage: bool, asked_logprobs: bool) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let timeout = s.limits.request_timeout;
    tokio::spawn(async move {
        let chunk = |choices: Value| {
            let mut c = json!({"id": meta.id, "object": meta.object(true), "created": meta.created, "model": meta.model, "system_fingerprint": null, "choices": choices});
            if include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        let delta = |i: usize, text: &str, finish: Option<&str>, first: bool, logs: &[TokenLog]| {
            let logprobs = logprobs_json(meta.kind, logs, asked_logprobs && !first && finish.is_none());
            match meta.kind {
                Kind::Chat => {
                    let d = if first {
                        json!({"role": "assistant", "content": text})
                    } else if finish.is_some() && text.is_empty() {
                        json!({})
                    } else {
                        json!({"content": text})
                    };
                    json!([{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish}])
                }
                Kind::Text => json!([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]),
            }
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() }
        };
        if meta.kind == Kind::Chat {
            for i in 0..n {
                let mut first = chunk(delta(i, "", None, true, &[]));
                if let Some(sources) = &meta.sources {
                    first["sources"] = sources.clone();
                }
                if !send(first).await {
                    return;
                }
            }
        }
        let mut choices = vec![Choice::default(); n];
        let deadline = tokio::time::Instant::now() + timeout;
        let mut timed_out = false;
        let mut timer = Timer::new(n);
        while choices.iter().any(|c| c.finish.is_none()) {
            let next = tokio::select! {
                ev = tokio::time::timeout_at(deadline, running.events.recv()) => ev,
                // The client went away: dropping `running` aborts the request.
                () = tx.closed() => return,
            };
            match next {
                Ok(Some((i, Event::Token { id, text, logprob, .. }))) => {
                    timer.token(&s, &meta, i);
                    choices[i].tokens += 1;
                    choices[i].text.push_str(&text);
                    // With tools the text is held back until it can be parsed for calls.
                    if meta.tool_style.is_some() {
                        continue;
                    }
                    let log: Vec<TokenLog> = TokenLog::of(&s, id, logprob).into_iter().collect();
                    if (!text.is_empty() || !log.is_empty()) && !send(chunk(delta(i, &text, None, false, &log))).await {
                        return;
                    }
                }
                Ok(Some((i, Event::Finished { text, reason, .. }))) => {
                    let error = match &reason {
                        FinishReason::Error(e) => Some(OpenAiError::internal(format!("generation failed: {e}"))),
                        FinishReason::Abort if !timed_out => Some(OpenAiError::unavailable("the server is shutting down")),
                        _ => None,
                    };
                    if let Some(e) = error {
                        s.metrics.error(&meta.model);
                        let body = json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}});
                        let _ = send(body).await;
                        return;
                    }
                    choices[i].text.push_str(&text);
                    let finished = match meta.tool_style {
                        None => chunk(delta(i, &text, Some(finish_name(&reason, timed_out)), false, &[])),
                        Some(style) => {
                            choices[i].tool_calls = super::tools::calls_of(style, &choices[i].text);
                            let held = match &choices[i].tool_calls {
                                Some(calls) => {
                                    let calls: Vec<Value> = calls
                                        .iter()
                                        .enumerate()
                                        .map(|(k, c)| {
                                            let mut c = c.clone();
                                            c["index"] = Value::from(k);
                                            c
                                        })
                                        .collect();
                                    json!([{"index": i, "delta": {"tool_calls": calls}, "logprobs": null, "finish_reason": null}])
                                }
                                None => delta(i, &choices[i].text, None, false, &[]),
                            };
                            if !send(chunk(held)).await {
                                return;
                            }
                            let reason = if choices[i].tool_calls.is_some() { "tool_calls" } else { finish_name(&reason, timed_out) };
                            chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}]))
                        }
                    };
                    if !send(finished).await {
                        return;
                    }
                    choices[i].finish = Some(reason);
                }
                Ok(None) => {
                    let e = OpenAiError::unavailable("the engine stopped before the answer was complete");
                    let _ = send(json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}})).await;
                    return;
                }
                Err(_) => {
                    timed_out = true;
                    for &id in &running.abort.ids {
                        let _ = running.abort.engine.abort(id);
                    }
                }
            }
        }
        let completion_tokens = choices.iter().map(|c| c.tokens).sum();
        s.metrics.completion(&meta.model, completion_tokens);
        // Logged before the stream ends: once a client has `[DONE]`, the log has the answer.
        meta.log(&choices, completion_tokens).await;
        if include_usage {
            let mut last = chunk(json!([]));
            last["usage"] = meta.usage(choices.iter().map(|c| c.tokens).sum());
            if !send(last).await {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        drop(running);
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut response = Sse::new(body).keep_alive(KeepAlive::default()).into_response();
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    response
}
