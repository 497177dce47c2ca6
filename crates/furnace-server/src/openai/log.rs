//! Conversations become training data: each finished chat completion is logged in the
//! store (`furnace_exp::conversations`) unless `furnace serve --no-log`
//! ([`ServeLimits::log`](super::ServeLimits::log)), and clients rate them with
//! `POST /v1/feedback`. `furnace conversations list` / `export` read them back, the export
//! in the chat form `furnace train` takes.
//!
//! What is stored, one row per completion id (`chatcmpl-...`): when (Unix seconds), the
//! `model` as requested and the adapter that answered (none for the base), the request's
//! messages as normalized for the chat template (`content` a string), every choice's text
//! (and its tool calls, when it made any), the retrieval sources when the prompt had any,
//! prompt and completion tokens, the latency in milliseconds, and the latest feedback: a
//! rating from 1 (worst) to 5 (best), an optional comment and when it was given. Nothing
//! else of the request (sampling parameters, headers, the client's address) is kept.
//!
//! Writes go through [`AppState::with_store`] (the blocking pool, one store connection),
//! never the engine thread; each is one `BEGIN IMMEDIATE` transaction.
//!
//! `POST /v1/feedback` takes `{"id": "chatcmpl-...", "rating": N, "comment": "..."}`
//! (`comment` optional; any other field is a 400), answers
//! `{"object": "feedback", "id", "rating", "comment"}`; a rating outside 1..=5 is a 400
//! naming `rating`, an id never logged a 404 (code `conversation_not_found`).

use super::{json_body, refuse_unknown, string_field, OpenAiError};
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use furnace_exp::{ConversationRecord, RATING_MAX, RATING_MIN};
use serde_json::{json, Value};

/// A store failure in OpenAI's shape, with the status the store's error maps to.
fn store_error(ApiError(status, message): ApiError) -> OpenAiError {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    OpenAiError::new(status, message, kind)
}

/// Logs a finished chat completion in the store, unless this server was started with
/// `--no-log` (then it does nothing). Runs on the blocking pool; a failure is returned for
/// the caller to report (the answer has gone out already, so it should not fail the
/// request).
#[allow(dead_code)] // Called by the chat completions once they log (see the module docs).
pub(crate) async fn log_completion(st: &AppState, record: ConversationRecord) -> Result<(), OpenAiError> {
    if st.serving().is_some_and(|s| !s.limits.log) {
        return Ok(());
    }
    st.with_store(move |store| store.log_conversation(&record)).await.map_err(store_error)
}

/// `POST /v1/feedback`.
pub(super) async fn feedback(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, OpenAiError> {
    let body = json_body(body)?;
    refuse_unknown(&body, &["id", "rating", "comment"])?;
    let id = string_field(&body, "id")?;
    let range = format!("rating must be an integer from {RATING_MIN} (worst) to {RATING_MAX} (best)");
    let rating = match body.get("rating") {
        Some(Value::Number(n)) => n.as_i64().filter(|r| (RATING_MIN..=RATING_MAX).contains(r)),
        _ => None,
    }
    .ok_or_else(|| OpenAiError::bad_param("rating", range))?;
    let comment = match body.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(_) => return Err(OpenAiError::bad_param("comment", "comment must be a string")),
    };
    let (i, c) = (id.clone(), comment.clone());
    st.with_store(move |store| store.add_feedback(&i, rating, c.as_deref())).await.map_err(|e| {
        if e.0 == StatusCode::NOT_FOUND {
            store_error(e).param("id").code("conversation_not_found")
        } else {
            store_error(e)
        }
    })?;
    Ok(Json(json!({"object": "feedback", "id": id, "rating": rating, "comment": comment})))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use furnace_exp::{ChoiceRecord, ConversationFilter, Store};

    #[tokio::test]
    async fn a_logged_completion_is_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("furnace.db");
        let opts = crate::ServerOptions { addr: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let st = AppState::new(db.clone(), furnace_exp::events::channel(), opts, shutdown);
        let record = ConversationRecord {
            id: "chatcmpl-1".into(),
            created: 1_700_000_000,
            model: "base".into(),
            adapter: None,
            messages: json!([{"role": "user", "content": "hi"}]),
            response: vec![ChoiceRecord { text: "hello".into(), tool_calls: None }],
            rag_sources: None,
            prompt_tokens: 3,
            completion_tokens: 2,
            latency_ms: 10,
        };
        log_completion(&st, record.clone()).await.unwrap();
        log_completion(&st, record.clone()).await.unwrap();
        let rows = Store::open(&db).unwrap().conversations(&ConversationFilter::default()).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].record, record);
    }
}
