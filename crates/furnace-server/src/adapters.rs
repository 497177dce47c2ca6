//! The adapter registry's router: the adapters of the store (`furnace_exp::registry`), for
//! the dashboard's Adapters page and for clients.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/adapters?base=M&tag=T` | every registered adapter (oldest first), optionally only those of base `M` (the same model name) or with tag `T` |
//! | `GET /api/adapters/{name}` | one adapter by name or by a tag naming one (404 when none); run names have a `/`: `/api/adapters/EXP/run-3` |

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use furnace_exp::registry::{self, AdapterFilter};
use furnace_exp::AdapterRecord;
use serde::Deserialize;

/// The routes of this module.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/adapters", get(list)).route("/api/adapters/{*name}", get(one))
}

#[derive(Deserialize)]
struct ListQuery {
    base: Option<String>,
    tag: Option<String>,
}

async fn list(State(st): State<AppState>, q: Result<Query<ListQuery>, QueryRejection>) -> ApiResult<Json<Vec<AdapterRecord>>> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = AdapterFilter { base: q.base.filter(|b| !b.is_empty()), tag: q.tag.filter(|t| !t.is_empty()) };
    Ok(Json(st.with_store(move |s| registry::list(s, &filter)).await?))
}

async fn one(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<AdapterRecord>> {
    let name = name.trim_start_matches('/').to_string();
    let asked = name.clone();
    // A name, else a tag that names one adapter; anything else is a 404 with the resolver's
    // message (the closest names).
    let found = st
        .with_store(move |s| match registry::get(s, &name)? {
            Some(a) => Ok(Ok(a)),
            None => Ok(registry::resolve(s, &name).map_err(|e| e.to_string())),
        })
        .await?;
    match found {
        Ok(a) => Ok(Json(a)),
        Err(msg) if msg.contains(" names ") => Err(ApiError(StatusCode::CONFLICT, msg)),
        Err(_) => Err(ApiError(StatusCode::NOT_FOUND, format!("no adapter named or tagged '{asked}'"))),
    }
}
