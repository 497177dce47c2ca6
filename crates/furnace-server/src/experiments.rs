//! The experiments router: JSON views of the store (experiments, runs, metrics, ops),
//! `POST /api/ops` to record control ops (checked now, applied by the trainer at the
//! run's next optimizer step), and `GET /api/events`, the live [`Event`]s as server-sent
//! events.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/experiments` | every experiment |
//! | `GET /api/experiments/{name}[?all=true]` | `{"experiment": .., "runs": [..]}` (deleted runs with `all`) |
//! | `GET /api/experiments/{name}/runs[?all=true]` | its runs |
//! | `GET /api/experiments/{name}/ops` | its ops |
//! | `GET /api/runs/{id}` | one run |
//! | `GET /api/runs/{id}/metrics[?name=loss]` | its metrics |
//! | `POST /api/ops` | `202 {"op_id": .., "status": "pending"}` |
//! | `GET /api/events` | `text/event-stream` of [`Event`]s |

use crate::error::{ApiError, ApiResult};
use crate::sse;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use furnace_exp::{ops, Event, OpKind, RunRow, RunStatus};
use serde::Deserialize;
use serde_json::Value;

/// The routes of this module (state supplied by the app).
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/experiments", get(list_experiments))
        .route("/api/experiments/{name}", get(get_experiment))
        .route("/api/experiments/{name}/runs", get(experiment_runs))
        .route("/api/experiments/{name}/ops", get(experiment_ops))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/metrics", get(run_metrics))
        .route("/api/ops", post(post_op))
        .route("/api/events", get(events))
}

fn parse_id(s: &str) -> ApiResult<i64> {
    s.parse().map_err(|_| ApiError::bad_request(format!("'{s}' is not a run id (expected a number)")))
}

/// `?all=true` shows deleted runs too.
#[derive(Debug, Default, Deserialize)]
struct ViewQuery {
    #[serde(default)]
    all: bool,
}

/// `?name=loss` picks one metric.
#[derive(Debug, Default, Deserialize)]
struct MetricQuery {
    name: Option<String>,
}

fn query<T>(q: std::result::Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(q)| q).map_err(|e| ApiError::bad_request(e.body_text()))
}

fn visible(runs: Vec<RunRow>, all: bool) -> Vec<RunRow> {
    runs.into_iter().filter(|r| all || r.status != RunStatus::Deleted).collect()
}

async fn list_experiments(State(st): State<AppState>) -> ApiResult<Response> {
    let rows = st.with_store(|s| s.experiments()).await?;
    Ok(Json(rows).into_response())
}

async fn get_experiment(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: std::result::Result<Query<ViewQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let all = query(q)?.all;
    let (exp, runs) = st
        .with_store(move |s| {
            let e = s.experiment(&name)?;
            let runs = s.runs(e.id)?;
            Ok((e, runs))
        })
        .await?;
    Ok(Json(serde_json::json!({ "experiment": exp, "runs": visible(runs, all) })).into_response())
}

async fn experiment_runs(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: std::result::Result<Query<ViewQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let all = query(q)?.all;
    let runs = st.with_store(move |s| s.runs(s.experiment(&name)?.id)).await?;
    Ok(Json(visible(runs, all)).into_response())
}

async fn experiment_ops(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let ops = st.with_store(move |s| s.ops(s.experiment(&name)?.id)).await?;
    Ok(Json(ops).into_response())
}

async fn get_run(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let run = st.with_store(move |s| s.run(id)).await?;
    Ok(Json(run).into_response())
}

async fn run_metrics(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: std::result::Result<Query<MetricQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let name = query(q)?.name;
    let mut rows = st
        .with_store(move |s| {
            s.run(id)?;
            s.metrics(id)
        })
        .await?;
    if let Some(n) = name {
        rows.retain(|m| m.name == n);
    }
    Ok(Json(rows).into_response())
}

/// The body of `POST /api/ops`: `{"run": 3, "op": "clone", "set": ["lora.r=64"], "warm": false}`.
/// A field the op does not take is an error (`"sets"` must not pass as a clone with no
/// overrides).
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum OpRequest {
    Stop {
        run: i64,
    },
    Resume {
        run: i64,
    },
    Delete {
        run: i64,
    },
    Clone {
        run: i64,
        #[serde(default)]
        set: Vec<String>,
        #[serde(default)]
        warm: bool,
    },
}

impl OpRequest {
    /// The run and what to do with it.
    fn into_op(self) -> (i64, OpKind) {
        match self {
            Self::Stop { run } => (run, OpKind::Stop),
            Self::Resume { run } => (run, OpKind::Resume),
            Self::Delete { run } => (run, OpKind::Delete),
            Self::Clone { run, set, warm } => (run, OpKind::Clone { set, warm }),
        }
    }
}

async fn post_op(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let req: OpRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "bad op request: {e} (expected JSON like {{\"run\": 3, \"op\": \"stop\"}}; op is stop, resume, delete or clone \
             with \"set\": [\"lora.r=64\"] and \"warm\": false)"
        ))
    })?;
    let (run, kind) = req.into_op();
    let allow_paths = st.allow_model_paths();
    let id = st
        .with_store(move |s| {
            if let OpKind::Clone { set, .. } = &kind {
                if !allow_paths {
                    let parent = s.run(run)?;
                    if ops::is_evals(&parent.config) {
                        check_evals_change(&parent, set)?;
                    } else {
                        check_model_change(&parent, set)?;
                    }
                }
            }
            ops::submit(s, run, &kind, "api")
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "op_id": id, "status": "pending" }))).into_response())
}

/// From the API a clone may change `model.base` only to a built-in model alias, or keep
/// its parent's: a path would let any client make the trainer read a file of its choice
/// (`furnace run --allow-model-paths` lifts this).
fn check_model_change(parent: &RunRow, set: &[String]) -> furnace_exp::Result<()> {
    let parent_base = parent.config.get("model").and_then(|m| m.get("base")).and_then(|b| b.as_str());
    for s in set {
        let (section, key, value) = ops::parse_set(s)?;
        if (section.as_str(), key.as_str()) == ("model", "base") {
            check_base(value.as_str().unwrap_or_default(), parent_base, &format!("--set {s}"))?;
        }
    }
    Ok(())
}

/// Settings of an evals pipeline that name a file, a folder, another server or an
/// environment variable: from the API a clone keeps its parent's (`--allow-model-paths`
/// lifts this).
const EVAL_PATH_KEYS: [&str; 8] = [
    "rag.documents",
    "prompt.fewshot",
    "generator.adapter",
    "generator.base_url",
    "generator.api_key_env",
    "judge.adapter",
    "judge.base_url",
    "judge.api_key_env",
];

/// Settings of an evals pipeline that name a local model: from the API a built-in model
/// or the parent's (a generator's or judge's `model` only when it runs locally).
const EVAL_MODEL_KEYS: [&str; 5] =
    ["rag.embedding_model", "rag.reranker", "prompt.fewshot_embedding_model", "generator.model", "judge.model"];

/// [`check_model_change`] for a clone of an evals pipeline: its `rag`, `prompt`,
/// `generator` and `judge` settings may change, but not to read a file of the client's
/// choice or talk to another server.
fn check_evals_change(parent: &RunRow, set: &[String]) -> furnace_exp::Result<()> {
    let mut sets = Vec::new();
    for s in set {
        sets.push((s, ops::parse_set_in(s, &ops::EVAL_SECTIONS)?));
    }
    let old = |section: &str, key: &str| parent.config.get(section).and_then(|v| v.get(key)).cloned().unwrap_or(Value::Null);
    // A generator's (judge's) kind after the overrides: its model is a local one when `local`.
    let kind = |section: &str| -> String {
        let set_kind = sets.iter().rev().find(|(_, (sec, key, _))| sec == section && key == "kind").map(|(_, (_, _, v))| v.clone());
        set_kind.unwrap_or_else(|| old(section, "kind")).as_str().unwrap_or("local").to_string()
    };
    for (s, (section, key, value)) in &sets {
        let name = format!("{section}.{key}");
        if EVAL_PATH_KEYS.contains(&name.as_str()) && *value != old(section, key) {
            return Err(furnace_exp::Error::Forbidden(format!(
                "--set {s}: through the API a clone keeps its parent's {name} (it names a file, a server or an environment variable); \
                 start the server (furnace run / furnace ui) with --allow-model-paths to allow changing it"
            )));
        }
        let local_model = match name.as_str() {
            "generator.model" | "judge.model" => kind(section) == "local",
            n => EVAL_MODEL_KEYS.contains(&n),
        };
        if local_model {
            if let Some(v) = value.as_str() {
                let parents = old(section, key);
                check_base(v, parents.as_str(), &format!("--set {s}"))?;
            }
        }
    }
    Ok(())
}

/// A base model named through the API (`what` says where): a built-in model alias, or
/// `same` (what the parent already uses); anything else is [`furnace_exp::Error::Forbidden`].
pub(crate) fn check_base(name: &str, same: Option<&str>, what: &str) -> furnace_exp::Result<()> {
    if furnace_hub::find_alias(name).is_some() || Some(name) == same {
        return Ok(());
    }
    let known: Vec<&str> = furnace_hub::aliases().iter().map(|a| a.name).collect();
    Err(furnace_exp::Error::Forbidden(format!(
        "{what}: through the API a base model may only be a built-in model ({}){}; \
         start the server (furnace run / furnace ui) with --allow-model-paths to allow paths",
        known.join(", "),
        if same.is_some() { " or the parent's" } else { "" }
    )))
}

async fn events(State(st): State<AppState>) -> Response {
    sse::stream::<Event>(st.events().subscribe(), st.shutdown()).into_response()
}
