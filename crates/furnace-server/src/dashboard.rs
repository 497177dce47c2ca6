//! The dashboard's router: the JSON the web app (module `ui`) draws from, and launching
//! experiments from a spec.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/summary` | every experiment with its run counts by status and best eval loss (an evals experiment: its best primary metric's estimate) |
//! | `GET /api/experiments/{name}/table` | its runs with latest/best metrics (and, for metrics with confidence intervals, the last step's `lower`/`upper`), the knobs that vary, its ops; an evals experiment's primary metric and metric names |
//! | `GET /api/experiments/{name}/series?names=loss,lr&points=N` | each run's metric series, at most `N` points each (min/max per bucket), with `lower`/`upper` per point for metrics that have intervals |
//! | `GET /api/runs/{id}/detail` | a run with its paths, lineage, samples and the end of its log |
//! | `POST /api/specs/check` `{"spec": TOML}` | `{"runs": n}` or the validation error (400) |
//! | `POST /api/experiments` `{"spec": TOML}` | `201 {"experiment": name, "runs": n}`: created and handed to the launcher |
//!
//! A spec from the dashboard is checked exactly as `furnace run` checks a file (relative
//! data paths are relative to the server's working folder), and like a clone it may name
//! only a built-in model as `model.base` unless the server allows model paths.

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use furnace_exp::{experiment, OpKind, RunRow, RunStatus, Store};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Points per series when the request does not say; at most [`MAX_POINTS`].
const DEFAULT_POINTS: usize = 2000;
/// The most points per series a request may ask for.
const MAX_POINTS: usize = 20_000;
/// The most metric names one series request may ask for.
const MAX_NAMES: usize = 16;
/// Lines of a run's log in its detail.
const LOG_TAIL: usize = 50;

/// The routes of this module.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/summary", get(summary))
        .route("/api/experiments/{name}/table", get(table))
        .route("/api/experiments/{name}/series", get(series))
        .route("/api/runs/{id}/detail", get(detail))
        .route("/api/specs/check", post(check_spec))
        .route("/api/experiments", post(create_experiment))
}

/// Each experiment with its run counts by status and its best eval loss (run, value).
async fn summary(State(st): State<AppState>) -> ApiResult<Response> {
    let out = st
        .with_store(|s| {
            let mut out = Vec::new();
            for e in s.experiments()? {
                let runs = s.runs(e.id)?;
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for r in &runs {
                    *counts.entry(r.status.as_str()).or_default() += 1;
                }
                let best = if e.mode == "evals" { best_primary(s, e.id, &runs)? } else { best_eval(s, e.id, &runs)? };
                out.push(json!({ "experiment": e, "runs": runs.len(), "by_status": counts, "best": best }));
            }
            Ok(out)
        })
        .await?;
    Ok(Json(out).into_response())
}

/// A training run's `trainer.kind` (`sft` when its config does not say).
fn trainer_kind(r: &RunRow) -> String {
    r.config.get("trainer").and_then(|t| t.get("kind")).and_then(Value::as_str).unwrap_or("sft").to_string()
}

/// The best eval score of an experiment's runs that are not deleted: the smallest eval
/// loss, or for GRPO the largest last mean eval reward.
fn best_eval(s: &Store, exp: i64, runs: &[RunRow]) -> furnace_exp::Result<Value> {
    let live: BTreeSet<i64> = runs.iter().filter(|r| r.status != RunStatus::Deleted).map(|r| r.id).collect();
    let summary = s.metric_summary(exp)?;
    if runs.iter().any(|r| trainer_kind(r) == "grpo") {
        let best = summary
            .into_iter()
            .filter(|m| m.name == "eval_reward" && live.contains(&m.run_id))
            .max_by(|a, b| a.last.total_cmp(&b.last))
            .map(|m| json!({ "metric": "eval_reward", "value": m.last, "run_id": m.run_id }));
        return Ok(best.unwrap_or(Value::Null));
    }
    let best = summary
        .into_iter()
        .filter(|m| m.name == "eval_loss" && live.contains(&m.run_id))
        .min_by(|a, b| a.min.total_cmp(&b.min))
        .map(|m| json!({ "metric": "eval_loss", "value": m.min, "run_id": m.run_id }));
    Ok(best.unwrap_or(Value::Null))
}

/// The best estimate of an evals experiment's primary metric (the largest, or the
/// smallest when lower is better) over its runs that are not deleted.
fn best_primary(s: &Store, exp: i64, runs: &[RunRow]) -> furnace_exp::Result<Value> {
    let live = || runs.iter().filter(|r| r.status != RunStatus::Deleted);
    let Some((name, higher)) =
        live().find_map(|r| serde_json::from_value::<furnace_evals::EvalSpec>(r.config.clone()).ok().and_then(|s| s.primary()))
    else {
        return Ok(Value::Null);
    };
    let ids: BTreeSet<i64> = live().map(|r| r.id).collect();
    let best = s
        .metric_summary(exp)?
        .into_iter()
        .filter(|m| m.name == name && ids.contains(&m.run_id))
        .max_by(|a, b| if higher { a.last.total_cmp(&b.last) } else { b.last.total_cmp(&a.last) })
        .map(|m| json!({ "metric": name, "value": m.last, "run_id": m.run_id }));
    Ok(best.unwrap_or(Value::Null))
}

/// The knob names whose values differ between the runs (all of them when there is one
/// run), in name order.
fn varying_knobs(runs: &[RunRow]) -> Vec<String> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in runs {
        if let Some(k) = r.knobs.as_object() {
            for (name, v) in k {
                values.entry(name.clone()).or_default().insert(v.to_string());
            }
        }
    }
    let all = runs.len() <= 1;
    values.into_iter().filter(|(_, v)| all || v.len() > 1).map(|(k, _)| k).collect()
}

/// An evals experiment's primary metric: the one its pipelines' specs name (or their
/// first metric); failing that, a stored config's `experiment.primary`.
fn primary_metric(runs: &[RunRow]) -> Option<String> {
    let live = || runs.iter().filter(|r| r.status != RunStatus::Deleted);
    live()
        .find_map(|r| serde_json::from_value::<furnace_evals::EvalSpec>(r.config.clone()).ok().and_then(|s| s.primary()).map(|p| p.0))
        .or_else(|| live().find_map(|r| r.config.pointer("/experiment/primary").and_then(|p| p.as_str()).map(str::to_string)))
}

/// Why a run stopped or failed: its error, or the message of the last applied stop op
/// (a policy's "raced out after shard 3: ...").
fn stop_reason(r: &RunRow, ops: &[furnace_exp::OpRow]) -> Option<String> {
    match r.status {
        RunStatus::Failed => r.error.clone(),
        RunStatus::Stopped => ops
            .iter()
            .filter(|o| o.run_id == r.id && o.status == "applied" && matches!(o.kind, OpKind::Stop))
            .filter_map(|o| o.message.clone().filter(|m| !m.is_empty()))
            .next_back(),
        _ => None,
    }
}

async fn table(State(st): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let out = st
        .with_store(move |s| {
            let e = s.experiment(&name)?;
            let runs = s.runs(e.id)?;
            // Each (run, metric)'s interval at its last step.
            let mut bounds: BTreeMap<(i64, String), (i64, f64, f64)> = BTreeMap::new();
            for b in s.experiment_bounds(e.id)? {
                bounds.insert((b.run_id, b.name), (b.step, b.lower, b.upper));
            }
            let bounded: BTreeSet<String> = bounds.keys().map(|(_, n)| n.clone()).collect();
            let mut names: BTreeSet<String> = BTreeSet::new();
            let mut latest: BTreeMap<i64, Map<String, Value>> = BTreeMap::new();
            for m in s.metric_summary(e.id)? {
                names.insert(m.name.clone());
                let mut v = json!({ "last": m.last, "min": m.min, "last_step": m.last_step, "count": m.count });
                if let (Some(&(step, lower, upper)), Some(o)) = (bounds.get(&(m.run_id, m.name.clone())), v.as_object_mut()) {
                    if step == m.last_step {
                        o.insert("lower".into(), json!(lower));
                        o.insert("upper".into(), json!(upper));
                    }
                }
                latest.entry(m.run_id).or_default().insert(m.name.clone(), v);
            }
            let knobs = varying_knobs(&runs.iter().filter(|r| r.status != RunStatus::Deleted).cloned().collect::<Vec<_>>());
            let ops = s.ops(e.id)?;
            let rows: Vec<Value> = runs
                .iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                    if let Some(o) = v.as_object_mut() {
                        o.remove("config");
                        o.insert("metrics".into(), Value::Object(latest.remove(&r.id).unwrap_or_default()));
                        o.insert("reason".into(), json!(stop_reason(r, &ops)));
                    }
                    v
                })
                .collect();
            let primary = if e.mode == "evals" { primary_metric(&runs) } else { None };
            // A fit experiment's trainer kinds (sft, dpo, grpo): the web app adds their metrics.
            let kinds: BTreeSet<String> = if e.mode == "evals" { BTreeSet::new() } else { runs.iter().map(trainer_kind).collect() };
            // The metrics to show: the primary first, then those with intervals, then the rest.
            let mut metric_names: Vec<String> = primary.iter().filter(|p| names.contains(*p)).cloned().collect();
            for n in names.iter().filter(|n| bounded.contains(*n)).chain(names.iter().filter(|n| !bounded.contains(*n))) {
                if !metric_names.contains(n) {
                    metric_names.push(n.clone());
                }
            }
            Ok(json!({
                "experiment": e,
                "knobs": knobs,
                "runs": rows,
                "ops": ops,
                "primary": primary,
                "metric_names": metric_names,
                "bounded": bounded,
                "kinds": kinds,
            }))
        })
        .await?;
    Ok(Json(out).into_response())
}

/// `?names=loss,eval_loss&points=2000&runs=3,4`.
#[derive(Debug, Default, Deserialize)]
struct SeriesQuery {
    names: Option<String>,
    points: Option<usize>,
    runs: Option<String>,
}

/// At most `n` points of a series sorted by step: all of them when there are few,
/// otherwise the first and last and, in each of about `n / 2` buckets, the smallest and
/// the largest value (in step order), so spikes survive.
pub(crate) fn downsample(points: &[(i64, f64)], n: usize) -> Vec<(i64, f64)> {
    let n = n.max(4);
    if points.len() <= n {
        return points.to_vec();
    }
    let inner = &points[1..points.len() - 1];
    let buckets = (n - 2) / 2;
    let size = inner.len().div_ceil(buckets);
    let mut out = Vec::with_capacity(n);
    out.push(points[0]);
    for chunk in inner.chunks(size) {
        let lo = chunk.iter().min_by(|a, b| a.1.total_cmp(&b.1));
        let hi = chunk.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some(&lo), Some(&hi)) = (lo, hi) {
            if lo.0 == hi.0 {
                out.push(lo);
            } else if lo.0 < hi.0 {
                out.extend([lo, hi]);
            } else {
                out.extend([hi, lo]);
            }
        }
    }
    out.push(points[points.len() - 1]);
    out
}

async fn series(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: std::result::Result<Query<SeriesQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = q.map(|Query(q)| q).map_err(|e| ApiError::bad_request(e.body_text()))?;
    let names: Vec<String> = q
        .names
        .as_deref()
        .unwrap_or("loss,eval_loss,lr,grad_norm")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if names.len() > MAX_NAMES {
        return Err(ApiError::bad_request(format!("names: at most {MAX_NAMES} metrics per request (got {})", names.len())));
    }
    let points = q.points.unwrap_or(DEFAULT_POINTS);
    if points == 0 || points > MAX_POINTS {
        return Err(ApiError::bad_request(format!("points must be between 1 and {MAX_POINTS} (got {points})")));
    }
    let only: Option<BTreeSet<i64>> = match q.runs.as_deref() {
        None | Some("") => None,
        Some(list) => Some(
            list.split(',')
                .map(|s| s.trim().parse::<i64>().map_err(|_| ApiError::bad_request(format!("runs: '{s}' is not a run id"))))
                .collect::<ApiResult<_>>()?,
        ),
    };
    let out = st
        .with_store(move |s| {
            let e = s.experiment(&name)?;
            let mut runs = Map::new();
            for r in s.runs(e.id)? {
                if only.as_ref().is_some_and(|o| !o.contains(&r.id)) {
                    continue;
                }
                let mut metrics = Map::new();
                for n in &names {
                    let pts = downsample(&s.metric_series(r.id, n)?, points);
                    if pts.is_empty() {
                        continue;
                    }
                    let bounds: BTreeMap<i64, (f64, f64)> = s.bound_series(r.id, n)?.into_iter().map(|(k, lo, hi)| (k, (lo, hi))).collect();
                    let (steps, values): (Vec<i64>, Vec<f64>) = pts.into_iter().unzip();
                    let mut m = json!({ "step": steps, "value": values });
                    if !bounds.is_empty() {
                        // Per point, its interval (null at a step without one).
                        let at = |f: fn(&(f64, f64)) -> f64| -> Vec<Option<f64>> { steps.iter().map(|k| bounds.get(k).map(f)).collect() };
                        if let Some(o) = m.as_object_mut() {
                            o.insert("lower".into(), json!(at(|b| b.0)));
                            o.insert("upper".into(), json!(at(|b| b.1)));
                        }
                    }
                    metrics.insert(n.clone(), m);
                }
                runs.insert(r.id.to_string(), Value::Object(metrics));
            }
            Ok(json!({ "experiment": e.name, "mode": e.mode, "runs": runs }))
        })
        .await?;
    Ok(Json(out).into_response())
}

/// The last `n` lines of a text file, if it reads.
fn tail(path: &std::path::Path, n: usize) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect())
}

async fn detail(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id: i64 = id.parse().map_err(|_| ApiError::bad_request(format!("'{id}' is not a run id (expected a number)")))?;
    let out = st
        .with_store(move |s| {
            let run = s.run(id)?;
            let e = s.experiment_by_id(run.experiment_id)?;
            let dir = furnace_exp::fit::run_dir(&e, id);
            // Ancestors, nearest first (bounded: a store is not trusted to be acyclic).
            let mut lineage = Vec::new();
            let mut at = run.parent_id;
            while let Some(p) = at.filter(|_| lineage.len() < 64) {
                lineage.push(p);
                at = s.run(p).ok().and_then(|r| r.parent_id);
            }
            let runs = s.runs(e.id)?;
            let children: Vec<i64> = runs.iter().filter(|r| r.parent_id == Some(id)).map(|r| r.id).collect();
            let checkpoint = run.checkpoint_step.map(|step| dir.join("checkpoints").join(format!("step-{step}")));
            let adapter = Some(dir.join("adapter")).filter(|a| a.join("adapter_config.json").is_file());
            let samples = std::fs::read_to_string(dir.join("samples.json")).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let log = tail(&dir.join("train.log"), LOG_TAIL);
            let ops: Vec<_> = s.ops(e.id)?.into_iter().filter(|o| o.run_id == id || o.new_run_id == Some(id)).collect();
            Ok(json!({
                "run": run,
                "experiment": e.name,
                "paths": { "dir": dir, "checkpoint": checkpoint, "adapter": adapter },
                "lineage": lineage,
                "children": children,
                "ops": ops,
                "samples": samples,
                "log": log,
            }))
        })
        .await?;
    Ok(Json(out).into_response())
}

/// The body of the spec routes: `{"spec": "<TOML>"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecRequest {
    spec: String,
}

fn spec_request(body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<SpecRequest> {
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("bad spec request: {e} (expected JSON like {{\"spec\": \"[experiment]\\nname = ...\"}})"))
    })
}

/// Where relative data paths of a spec from the dashboard are anchored: a file named
/// after nothing in the server's working folder.
fn anchor() -> std::path::PathBuf {
    std::env::current_dir().unwrap_or_default().join("dashboard-spec.toml")
}

/// The leaves of a spec from the dashboard, checked as `furnace run` checks a file, and
/// with only built-in bases unless model paths are allowed.
fn checked_leaves(text: &str, allow_paths: bool) -> furnace_exp::Result<Vec<furnace_train::knobs::Leaf>> {
    let leaves = experiment::leaves_of(text, &anchor())?;
    if !allow_paths {
        for leaf in &leaves {
            crate::experiments::check_base(&leaf.spec.model.base, None, "model.base")?;
        }
    }
    Ok(leaves)
}

/// An evals error as the store's (a spec problem is a 400).
fn evals_err(e: furnace_evals::Error) -> furnace_exp::Error {
    match e {
        furnace_evals::Error::Store(e) => e,
        other => furnace_exp::Error::Invalid(other.to_string()),
    }
}

/// The pipelines of an evals spec from the dashboard, checked as `furnace run` checks a
/// file (against its eval set too), with only built-in local models unless model paths
/// are allowed.
fn checked_pipelines(text: &str, allow_paths: bool) -> furnace_exp::Result<Vec<furnace_evals::spec::Pipeline>> {
    let pipes = furnace_evals::experiment::pipelines_of(text, &anchor()).map_err(evals_err)?;
    if !allow_paths {
        for p in &pipes {
            let s = &p.spec;
            if s.generator.kind == "local" {
                crate::experiments::check_base(&s.generator.model, None, "generator.model")?;
            }
            if let Some(r) = &s.rag {
                crate::experiments::check_base(&r.embedding_model, None, "rag.embedding_model")?;
                if let Some(rr) = &r.reranker {
                    crate::experiments::check_base(rr, None, "rag.reranker")?;
                }
            }
        }
    }
    Ok(pipes)
}

/// A spec from the dashboard checked as `furnace run` would: its experiment name and how
/// many runs (pipelines, for an evals spec) it makes.
fn checked_spec(text: &str, allow_paths: bool) -> furnace_exp::Result<(String, usize)> {
    if furnace_evals::mode_of(text).as_deref() == Some("evals") {
        let pipes = checked_pipelines(text, allow_paths)?;
        let name = pipes.first().map(|p| p.spec.experiment.name.clone()).unwrap_or_default();
        return Ok((name, pipes.len()));
    }
    let leaves = checked_leaves(text, allow_paths)?;
    let name = leaves.first().map(|l| l.spec.experiment.name.clone()).unwrap_or_default();
    Ok((name, leaves.len()))
}

async fn check_spec(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req = spec_request(body)?;
    let allow = st.allow_model_paths();
    let (name, runs) = st.with_store(move |_| checked_spec(&req.spec, allow)).await?;
    Ok(Json(json!({ "runs": runs, "name": name })).into_response())
}

async fn create_experiment(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let req = spec_request(body)?;
    let Some(launcher) = st.launcher() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this server cannot start experiments (it has no launcher); serve the dashboard with furnace ui or furnace run".into(),
        ));
    };
    let allow = st.allow_model_paths();
    let (exp, runs) = st
        .with_store(move |s| {
            checked_spec(&req.spec, allow)?;
            let e = if furnace_evals::mode_of(&req.spec).as_deref() == Some("evals") {
                furnace_evals::experiment::create_from_text(s, &req.spec, &anchor()).map_err(evals_err)?
            } else {
                experiment::create_from_text(s, &req.spec, &anchor())?
            };
            let n = s.runs(e.id)?.len();
            Ok((e, n))
        })
        .await?;
    launcher
        .launch(&exp.name)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("experiment {} was created but did not start: {e}", exp.name)))?;
    Ok((StatusCode::CREATED, Json(json!({ "experiment": exp.name, "runs": runs }))).into_response())
}

#[cfg(test)]
mod tests {
    use super::downsample;

    #[test]
    fn downsampling_keeps_ends_and_extremes_in_order() {
        let pts: Vec<(i64, f64)> = (0..10_000).map(|i| (i, if i == 5_000 { 100.0 } else { (i % 7) as f64 })).collect();
        let d = downsample(&pts, 200);
        assert!(d.len() <= 200, "{}", d.len());
        assert_eq!(d.first(), Some(&(0, 0.0)));
        assert_eq!(d.last(), pts.last());
        assert!(d.contains(&(5_000, 100.0)), "the spike survives");
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "steps increase");
        assert_eq!(downsample(&pts[..10], 200), pts[..10].to_vec());
    }
}
