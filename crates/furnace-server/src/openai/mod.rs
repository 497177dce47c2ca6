//! The OpenAI-compatible API of `furnace serve`: what the official OpenAI clients (and
//! anything written against them) talk to.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/models` | the served base, each adapter registered with its engine, each embedding model |
//! | `POST /v1/chat/completions` | a chat completion, or with `stream` its chunks as server-sent events |
//! | `POST /v1/completions` | a text completion (streamed the same way) |
//! | `POST /v1/embeddings` | vectors from a served embedding model (`float` or `base64`) |
//! | `POST /v1/feedback` | records a rating (1..=5) and comment for a logged chat completion (module `log`) |
//! | `POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter` | vLLM's routes: add or remove a PEFT adapter at run time (with `--allow-adapter-loading`) |
//! | `/v1/documents...` | document collections for retrieval ([`documents`]) |
//! | `GET /metrics` | Prometheus counters and latency histograms per model ([`metrics`]) |
//!
//! The `model` of a request picks what answers it: the base's name, or an adapter's. Requests
//! for different adapters share the engine's batches (each row of a step runs with its own
//! adapter). Every parameter the API documents is either honoured or refused with a 400 that
//! names it; nothing is ignored silently.
//!
//! Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the
//! status codes the clients map to their exception types: 400 (a bad or unsupported
//! parameter, a prompt over the context window: code `context_length_exceeded`), 404 (an
//! unknown model: code `model_not_found`), 429 with `Retry-After` (the queue is full), 503
//! (the server is stopping), 500 (the engine failed).
//!
//! Generation runs on the engine thread ([`furnace_generate::EngineHandle`]); handlers only
//! hand requests to it (on the blocking pool) and relay its events. A client that goes away
//! aborts its requests, which frees their batch slots at the next step.

mod completions;
mod documents;
mod embeddings;
pub(crate) mod log;
mod metrics;
mod tools;

pub use documents::RagSettings;

use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use furnace_generate::EngineHandle;
use furnace_rag::SentenceEncoder;
use furnace_text::{ChatTemplate, Tokenizer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What `furnace serve` serves: one resident base in one engine, its adapters, and
/// embedding models.
pub struct Serving {
    /// The id of the base in `/v1/models` and in requests.
    pub model_name: String,
    /// The engine that owns the base; adapters are registered with it by name.
    pub engine: EngineHandle,
    /// The base's tokenizer.
    pub tokenizer: Tokenizer,
    /// The base's chat template (chat completions need one).
    pub template: Option<ChatTemplate>,
    /// The base's context window in tokens.
    pub context_len: usize,
    /// Embedding models by the name requests give.
    pub embedders: BTreeMap<String, Arc<SentenceEncoder>>,
    /// Limits and switches.
    pub limits: ServeLimits,
    /// Requests (choices) queued or running.
    in_flight: AtomicUsize,
    /// Set when the server stops: new requests get a 503.
    draining: AtomicBool,
    /// When the server started (seconds since the epoch), the `created` of its models.
    started: u64,
    /// Document collections for retrieval ([`Serving::with_rag`]).
    collections: Option<documents::Collections>,
    /// What `/metrics` reports.
    metrics: metrics::Metrics,
    /// The base's token bytes for constrained decoding, made on first use.
    grammar_tokens: std::sync::OnceLock<furnace_generate::GrammarTokens>,
}

/// The limits of a [`Serving`].
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Most choices queued or running at once; beyond it a request gets a 429.
    pub max_in_flight: usize,
    /// A request still running after this ends as if it reached `max_tokens`.
    pub request_timeout: Duration,
    /// Whether `/v1/load_lora_adapter` may read adapters from paths the request names.
    pub allow_adapter_loading: bool,
    /// Whether finished chat completions are logged in the store as conversations (what
    /// is stored: the module docs of `openai::log`); `furnace serve --no-log` turns it off.
    pub log: bool,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self { max_in_flight: 256, request_timeout: Duration::from_secs(600), allow_adapter_loading: false, log: true }
    }
}

impl Serving {
    /// What to serve: a base (its engine, tokenizer, template and context), named
    /// `model_name`, and embedding models by name.
    pub fn new(
        model_name: String,
        engine: EngineHandle,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        context_len: usize,
        embedders: BTreeMap<String, Arc<SentenceEncoder>>,
        limits: ServeLimits,
    ) -> Self {
        let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self {
            model_name,
            engine,
            tokenizer,
            template,
            context_len,
            embedders,
            limits,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            started,
            collections: None,
            metrics: metrics::Metrics::default(),
            grammar_tokens: std::sync::OnceLock::new(),
        }
    }

    /// Keeps document collections for retrieval (`/v1/documents`, `rag:` models).
    pub fn with_rag(mut self, settings: RagSettings) -> Self {
        self.collections = Some(documents::Collections::new(settings));
        self
    }

    /// From now on new requests get a 503 (the server is stopping).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The token bytes grammars are matched against (built once, a fraction of a second;
    /// blocking).
    fn grammar_tokens(&self) -> Result<furnace_generate::GrammarTokens, String> {
        if let Some(t) = self.grammar_tokens.get() {
            return Ok(t.clone());
        }
        let t = furnace_generate::GrammarTokens::new(&self.tokenizer).map_err(|e| e.to_string())?;
        Ok(self.grammar_tokens.get_or_init(|| t).clone())
    }

    /// Choices queued or running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Admits `n` more choices, or says why not (503 while stopping, 429 when full).
    fn admit(self: &Arc<Self>, n: usize) -> Result<Admitted, OpenAiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(OpenAiError::unavailable("the server is shutting down"));
        }
        let max = self.limits.max_in_flight;
        let mut now = self.in_flight.load(Ordering::SeqCst);
        loop {
            if now + n > max {
                return Err(OpenAiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("the server is full ({now} of {max} requests queued or running); retry in a moment"),
                    "rate_limit_error",
                )
                .code("queue_full"));
            }
            match self.in_flight.compare_exchange(now, now + n, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(Admitted { serving: self.clone(), n }),
                Err(actual) => now = actual,
            }
        }
    }

    /// The adapter a `model` names: `Ok(None)` for the base, `Ok(Some(name))` for an adapter
    /// registered with the engine, else a 404.
    async fn resolve_model(&self, model: &str) -> Result<Option<String>, OpenAiError> {
        if model == self.model_name || (model.starts_with("rag:") && self.collections.is_some()) {
            return Ok(None);
        }
        let names = self.adapter_names().await?;
        if names.iter().any(|n| n == model) {
            return Ok(Some(model.to_string()));
        }
        let mut known = vec![self.model_name.clone()];
        known.extend(names);
        Err(OpenAiError::new(
            StatusCode::NOT_FOUND,
            format!("the model '{model}' does not exist here; served: {}", known.join(", ")),
            "invalid_request_error",
        )
        .param("model")
        .code("model_not_found"))
    }

    async fn adapter_names(&self) -> Result<Vec<String>, OpenAiError> {
        let engine = self.engine.clone();
        let adapters = tokio::task::spawn_blocking(move || engine.adapters())
            .await
            .map_err(|e| OpenAiError::internal(e.to_string()))?
            .map_err(|e| OpenAiError::unavailable(e.to_string()))?;
        Ok(adapters.into_iter().map(|a| a.name).collect())
    }
}

impl Serving {
    /// A 403 unless `--allow-adapter-loading` allows changing adapters at run time.
    fn check_adapter_loading(&self, doing: &str) -> Result<(), OpenAiError> {
        if self.limits.allow_adapter_loading {
            return Ok(());
        }
        Err(OpenAiError::new(
            StatusCode::FORBIDDEN,
            format!("{doing} adapters at run time is off: start furnace serve with --allow-adapter-loading"),
            "permission_error",
        ))
    }
}

/// Choices admitted by [`Serving::admit`]; they leave the count when this is dropped.
struct Admitted {
    serving: Arc<Serving>,
    n: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.serving.in_flight.fetch_sub(self.n, Ordering::SeqCst);
    }
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl OpenAiError {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// A 400 `invalid_request_error`.
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_request_error")
    }

    /// A 400 naming the parameter at fault.
    fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).param(param)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message, "service_unavailable_error")
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message, "server_error")
    }

    fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The serving of this server, or a 404 when it serves no model (`furnace ui`).
fn serving_of(st: &AppState) -> Result<Arc<Serving>, OpenAiError> {
    st.serving().ok_or_else(|| {
        OpenAiError::new(
            StatusCode::NOT_FOUND,
            "this server serves no model: start one with furnace serve --model NAME",
            "invalid_request_error",
        )
        .code("model_not_found")
    })
}

/// A JSON object body, or a 400 saying what is wrong with it.
fn json_body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Map<String, Value>, OpenAiError> {
    let body = body.map_err(|e| OpenAiError::new(e.status(), e.body_text(), "invalid_request_error"))?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(OpenAiError::invalid("the body must be a JSON object")),
        Err(e) => Err(OpenAiError::invalid(format!("the body is not valid JSON: {e}"))),
    }
}

/// Refuses every key of `body` that is not in `known`, naming them.
fn refuse_unknown(body: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), OpenAiError> {
    let unknown: Vec<&str> = body.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
    match unknown.first() {
        None => Ok(()),
        Some(first) => Err(OpenAiError::bad_param(
            first,
            format!(
                "unsupported parameter{}: {} (furnace serve does not implement {})",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", "),
                if unknown.len() > 1 { "them" } else { "it" }
            ),
        )),
    }
}

/// The `model` of a body.
fn model_of(body: &serde_json::Map<String, Value>) -> Result<String, OpenAiError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(_) => Err(OpenAiError::bad_param("model", "model must be a non-empty string")),
        None => Err(OpenAiError::bad_param("model", "model is required (GET /v1/models lists them)")),
    }
}

/// A fresh id with a prefix: `chatcmpl-` and 24 hex digits.
fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..12]);
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The routes of this module.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route(
            "/v1/documents",
            post(documents::upload).layer(axum::extract::DefaultBodyLimit::max(documents::UPLOAD_LIMIT)).get(documents::list),
        )
        .route("/v1/documents/query", post(documents::query))
        .route("/v1/documents/{id}", axum::routing::delete(documents::delete))
        .route("/v1/feedback", post(log::feedback))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
}

async fn models(State(st): State<AppState>) -> Result<Json<Value>, OpenAiError> {
    let s = serving_of(&st)?;
    let model = |id: &str, root: Option<&str>, kind: &str| json!({"id": id, "object": "model", "created": s.started, "owned_by": "furnace", "root": root.unwrap_or(id), "furnace_kind": kind});
    let mut data = vec![model(&s.model_name, None, "base")];
    for name in s.adapter_names().await? {
        data.push(model(&name, Some(&s.model_name), "adapter"));
    }
    for name in s.embedders.keys() {
        data.push(model(name, None, "embedding"));
    }
    if s.collections.is_some() {
        let names = {
            let s = s.clone();
            tokio::task::spawn_blocking(move || s.collections.as_ref().map(|c| c.names()).unwrap_or_default())
                .await
                .map_err(|e| OpenAiError::internal(e.to_string()))?
        };
        for name in names {
            data.push(model(&format!("rag:{name}"), Some(&s.model_name), "rag"));
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// A required string field of a body.
fn string_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<String, OpenAiError> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(OpenAiError::bad_param(key, format!("{key} is required (a non-empty string)"))),
    }
}

async fn load_adapter(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, OpenAiError> {
    let s = serving_of(&st)?;
    let body = json_body(body)?;
    refuse_unknown(&body, &["lora_name", "lora_path"])?;
    s.check_adapter_loading("loading")?;
    let name = string_field(&body, "lora_name")?;
    let path = string_field(&body, "lora_path")?;
    if name == s.model_name || s.embedders.contains_key(&name) {
        return Err(OpenAiError::bad_param("lora_name", format!("'{name}' already names a served model")));
    }
    let engine = s.engine.clone();
    let (n, p) = (name.clone(), std::path::PathBuf::from(&path));
    tokio::task::spawn_blocking(move || engine.load_adapter(&n, &p))
        .await
        .map_err(|e| OpenAiError::internal(e.to_string()))?
        .map_err(|e| OpenAiError::bad_param("lora_path", e.to_string()))?;
    Ok(Json(json!({"object": "lora_adapter", "lora_name": name, "lora_path": path, "status": "loaded"})))
}

async fn unload_adapter(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, OpenAiError> {
    let s = serving_of(&st)?;
    let body = json_body(body)?;
    refuse_unknown(&body, &["lora_name", "lora_int_id"])?;
    s.check_adapter_loading("unloading")?;
    let name = string_field(&body, "lora_name")?;
    if !s.adapter_names().await?.contains(&name) {
        return Err(OpenAiError::new(StatusCode::NOT_FOUND, format!("no adapter named '{name}'"), "invalid_request_error")
            .param("lora_name")
            .code("model_not_found"));
    }
    let engine = s.engine.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || engine.unload_adapter(&n))
        .await
        .map_err(|e| OpenAiError::internal(e.to_string()))?
        .map_err(|e| OpenAiError::bad_param("lora_name", e.to_string()))?;
    Ok(Json(json!({"object": "lora_adapter", "lora_name": name, "status": "unloaded"})))
}
