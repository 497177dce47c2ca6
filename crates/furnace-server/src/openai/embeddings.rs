//! `POST /v1/embeddings`: vectors from a served sentence encoder, as float lists or (what
//! the official Python client asks for by default) base64 of little-endian f32.

use super::{json_body, model_of, refuse_unknown, serving_of, OpenAiError};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Value};

/// The most texts one request may embed (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

pub(super) async fn embeddings(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, OpenAiError> {
    let s = serving_of(&st)?;
    let body = json_body(body)?;
    refuse_unknown(&body, &["model", "input", "encoding_format", "dimensions", "user"])?;
    let model = model_of(&body)?;
    let Some(encoder) = s.embedders.get(&model).cloned() else {
        let known: Vec<&str> = s.embedders.keys().map(String::as_str).collect();
        let served = if known.is_empty() { "none (start furnace serve with --embedding-model NAME)".to_string() } else { known.join(", ") };
        return Err(OpenAiError::new(
            StatusCode::NOT_FOUND,
            format!("'{model}' is not a served embedding model; served: {served}"),
            "invalid_request_error",
        )
        .param("model")
        .code("model_not_found"));
    };
    let texts: Vec<String> = match body.get("input") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
            items.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(Value::Array(items)) if !items.is_empty() => {
            return Err(OpenAiError::bad_param("input", "give input as text (a string or a list of strings): token ids are not supported"))
        }
        _ => return Err(OpenAiError::bad_param("input", "input is required: a string or a non-empty list of strings")),
    };
    if texts.len() > MAX_INPUTS {
        return Err(OpenAiError::bad_param("input", format!("at most {MAX_INPUTS} inputs per request, got {}", texts.len())));
    }
    if texts.iter().any(String::is_empty) {
        return Err(OpenAiError::bad_param("input", "inputs must not be empty strings"));
    }
    let base64 = match body.get("encoding_format").and_then(|v| if v.is_null() { None } else { Some(v) }) {
        None => false,
        Some(v) if v == "float" => false,
        Some(v) if v == "base64" => true,
        Some(v) => return Err(OpenAiError::bad_param("encoding_format", format!("encoding_format must be float or base64, got {v}"))),
    };
    if let Some(d) = body.get("dimensions").filter(|d| !d.is_null()) {
        if d.as_u64() != Some(encoder.dim() as u64) {
            return Err(OpenAiError::bad_param(
                "dimensions",
                format!("{model} gives {}-dimensional vectors and cannot shorten them (got dimensions {d})", encoder.dim()),
            ));
        }
    }
    let (vectors, tokens) = tokio::task::spawn_blocking(move || -> furnace_rag::Result<(Vec<Vec<f32>>, usize)> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embeddings = encoder.embed(&refs)?;
        let mut tokens = 0;
        for t in &refs {
            tokens += encoder.count_tokens(t)?.min(encoder.max_seq_length());
        }
        Ok((embeddings.vectors, tokens))
    })
    .await
    .map_err(|e| OpenAiError::internal(e.to_string()))?
    .map_err(|e| OpenAiError::internal(format!("embedding failed: {e}")))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})))
}
