//! The dashboard's playground: chat with the base model of an experiment or with a
//! completed run's adapter, tokens streamed as server-sent events.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/playground/targets` | what can be chatted with: each base model of the stored experiments, each completed run with an adapter |
//! | `POST /api/playground/chat` | `text/event-stream`: `text` events `{"text": ...}`, then one `done` `{"finish_reason": ..., "tokens": n}` (or `error`) |
//!
//! `POST /api/playground/chat` takes `{"run": 7}` (that run's adapter on its base) or
//! `{"model": NAME}` (a base model the store's experiments use), and `"messages"`
//! (`[{"role": "user", "content": "..."}]`), optional `"max_tokens"` (at most
//! [`MAX_TOKENS`]) and `"temperature"`. Each base is loaded once, on first use, into its
//! own generation engine (a thread; requests to it are batched together, so two panes
//! asking at once share the steps); a run's adapter is registered with it by name. A
//! client that goes away aborts its request.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use furnace_exp::{RunStatus, Store};
use furnace_generate::{EngineHandle, Event, FinishReason, Request, SamplingParams, ServiceOptions};
use furnace_text::{ChatMessage, ChatTemplate, Tokenizer};
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The most new tokens one playground request may ask for.
pub const MAX_TOKENS: usize = 2048;
/// The most messages one request may carry.
const MAX_MESSAGES: usize = 256;

/// One loaded base and the engine that serves it.
pub(crate) struct Loaded {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Adapters registered with the engine (their names).
    adapters: Mutex<BTreeSet<String>>,
}

/// The playground's engines, by (base model, weight type).
#[derive(Default)]
pub(crate) struct Playground {
    engines: Mutex<HashMap<String, Arc<Loaded>>>,
}

impl Drop for Playground {
    fn drop(&mut self) {
        let engines = self.engines.get_mut().map(std::mem::take).unwrap_or_default();
        for e in engines.values() {
            let _ = e.engine.shutdown();
        }
    }
}

/// The routes of this module.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/playground/targets", get(targets)).route("/api/playground/chat", post(chat))
}

/// A run's base model and weight type from its stored config.
fn base_of(config: &serde_json::Value) -> Option<(String, String)> {
    let m = config.get("model")?;
    Some((m.get("base")?.as_str()?.to_string(), m.get("quantize").and_then(|q| q.as_str()).unwrap_or("none").to_string()))
}

fn adapter_dir(s: &Store, run: &furnace_exp::RunRow) -> furnace_exp::Result<Option<PathBuf>> {
    let e = s.experiment_by_id(run.experiment_id)?;
    let dir = furnace_exp::fit::run_dir(&e, run.id).join("adapter");
    Ok(dir.join("adapter_config.json").is_file().then_some(dir))
}

async fn targets(State(st): State<AppState>) -> ApiResult<Response> {
    let out = st
        .with_store(|s| {
            let mut bases = BTreeSet::new();
            let mut runs = Vec::new();
            for e in s.experiments()? {
                for r in s.runs(e.id)? {
                    let Some((base, quantize)) = base_of(&r.config) else { continue };
                    bases.insert((base.clone(), quantize));
                    if r.status == RunStatus::Completed && adapter_dir(s, &r)?.is_some() {
                        runs.push(json!({ "run": r.id, "experiment": e.name, "base": base, "knobs": r.knobs }));
                    }
                }
            }
            let bases: Vec<_> = bases.into_iter().map(|(b, q)| json!({ "model": b, "quantize": q })).collect();
            Ok(json!({ "bases": bases, "runs": runs }))
        })
        .await?;
    Ok(Json(out).into_response())
}

/// The body of `POST /api/playground/chat`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    run: Option<i64>,
    model: Option<String>,
    messages: Vec<ChatMessage>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
}

/// What a request chats with: (base, quantization, adapter directory and name).
type Target = (String, String, Option<(PathBuf, String)>);

fn resolve(s: &Store, req: &ChatRequest) -> furnace_exp::Result<Target> {
    let invalid = |m: String| furnace_exp::Error::Invalid(m);
    match (req.run, req.model.as_deref()) {
        (Some(id), None) => {
            let run = s.run(id)?;
            let (base, quantize) = base_of(&run.config).ok_or_else(|| invalid(format!("run {id} has no readable model in its config")))?;
            if run.status != RunStatus::Completed {
                return Err(invalid(format!("run {id} is {}: only a completed run has an adapter to chat with", run.status.as_str())));
            }
            let dir = adapter_dir(s, &run)?.ok_or_else(|| invalid(format!("run {id} has no adapter folder (was it moved?)")))?;
            Ok((base, quantize, Some((dir, format!("run-{id}")))))
        }
        (None, Some(model)) => {
            // Only a base the store's experiments use: a request cannot make the server
            // read a file of its choice.
            for e in s.experiments()? {
                for r in s.runs(e.id)? {
                    if let Some((base, quantize)) = base_of(&r.config).filter(|(b, _)| b == model) {
                        return Ok((base, quantize, None));
                    }
                }
            }
            Err(furnace_exp::Error::Forbidden(format!(
                "model {model:?} is not the base of any stored experiment; the playground chats with those"
            )))
        }
        _ => Err(invalid("give exactly one of \"run\" (a completed run's adapter) or \"model\" (a base model)".into())),
    }
}

/// The engine of `base` (loaded now if it is not yet).
fn engine(pg: &Playground, base: &str, quantize: &str) -> std::result::Result<Arc<Loaded>, String> {
    let key = format!("{base}\u{0}{quantize}");
    let mut engines = pg.engines.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = engines.get(&key) {
        return Ok(e.clone());
    }
    let dtype = match quantize {
        "none" => furnace_model::WeightDType::F32,
        "bf16" => furnace_model::WeightDType::Bf16,
        _ => furnace_model::WeightDType::Quantized,
    };
    let loaded = furnace_model::load_by_name(base, dtype, &mut |_| {}).map_err(|e| format!("loading {base}: {e}"))?;
    let engine = EngineHandle::spawn(loaded.model, &loaded.tokenizer, ServiceOptions::default()).map_err(|e| e.to_string())?;
    let l = Arc::new(Loaded { engine, tokenizer: loaded.tokenizer, template: loaded.chat_template, adapters: Mutex::new(BTreeSet::new()) });
    engines.insert(key, l.clone());
    Ok(l)
}

/// Aborts a request when the stream that carries it is dropped (the client went away).
struct AbortOnDrop {
    engine: EngineHandle,
    id: Option<furnace_generate::RequestId>,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let _ = self.engine.abort(id);
        }
    }
}

async fn chat(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let req: ChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "bad chat request: {e} (expected {{\"run\": 7 or \"model\": NAME, \"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]}})"
        ))
    })?;
    let max_tokens = req.max_tokens.unwrap_or(256);
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return Err(ApiError::bad_request(format!("max_tokens must be between 1 and {MAX_TOKENS} (got {max_tokens})")));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(0.0..=5.0).contains(&temperature) {
        return Err(ApiError::bad_request(format!("temperature must be between 0 and 5 (got {temperature})")));
    }
    if req.messages.is_empty() || req.messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(format!("messages: give 1 to {MAX_MESSAGES} messages")));
    }
    let messages = req.messages.clone();
    let (base, quantize, adapter) = st.with_store(move |s| resolve(s, &req)).await?;
    let pg = st.playground();
    let (loaded, adapter_name) = tokio::task::spawn_blocking(move || -> std::result::Result<_, String> {
        let loaded = engine(&pg, &base, &quantize)?;
        let name = match adapter {
            Some((dir, name)) => {
                let mut known = loaded.adapters.lock().unwrap_or_else(|p| p.into_inner());
                if !known.contains(&name) {
                    loaded.engine.load_adapter(&name, &dir).map_err(|e| format!("loading the adapter of {name}: {e}"))?;
                    known.insert(name.clone());
                }
                Some(name)
            }
            None => None,
        };
        Ok((loaded, name))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let template = loaded.template.as_ref().ok_or_else(|| ApiError::bad_request("this model has no chat template to chat with"))?;
    let prompt = template
        .render(&messages, true, loaded.tokenizer.bos_token(), loaded.tokenizer.eos_token())
        .map_err(|e| ApiError::bad_request(format!("the chat template failed: {e}")))?;
    let prompt = loaded.tokenizer.encode(&prompt, false).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let params = SamplingParams { temperature, max_tokens, ..SamplingParams::default() };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let id = loaded
        .engine
        .submit(
            Request { prompt, params, adapter: adapter_name, constraint: None },
            Box::new(move |ev| {
                let _ = tx.send(ev);
            }),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let guard = AbortOnDrop { engine: loaded.engine.clone(), id: Some(id) };
    let stream = futures_stream(rx, guard);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The request's events as SSE events; the stream ends after `done` (the engine drops the
/// sender then), and dropping it early aborts the request.
fn futures_stream(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    guard: AbortOnDrop,
) -> impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>> {
    let mut tokens = 0usize;
    tokio_stream::StreamExt::map(tokio_stream::wrappers::UnboundedReceiverStream::new(rx), move |ev| {
        let _alive = &guard;
        let ev = match ev {
            Event::Token { text, .. } => {
                tokens += 1;
                SseEvent::default().event("text").json_data(json!({ "text": text }))
            }
            Event::Finished { text, reason, .. } => {
                let (name, body) = match reason {
                    FinishReason::Error(e) => ("error", json!({ "error": e, "text": text })),
                    r => ("done", json!({ "text": text, "finish_reason": r, "tokens": tokens })),
                };
                SseEvent::default().event(name).json_data(body)
            }
        };
        Ok(ev.unwrap_or_else(|_| SseEvent::default().comment("an event that did not encode")))
    })
}
