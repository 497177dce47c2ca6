//! MLflow through its REST API (`/api/2.0/mlflow/...`): one MLflow run per furnace run in
//! an experiment found or created by name; params are the run's resolved config, metrics
//! go in batches with their step and the store's timestamp (so a batch sent twice is
//! stored once: MLflow keys a value by name, step, timestamp and value), tags carry the
//! lineage and progress, and the status follows the run's.

use crate::error::{Error, Result};
use crate::http::{encode_query, BaseUrl};
use crate::state::{MlflowRun, MlflowState, Persist};
use crate::Snapshot;
use furnace_exp::{RunRow, RunStatus};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// MLflow's limits per `runs/log-batch`: 1000 metrics, 100 params, 100 tags.
const MAX_METRICS: usize = 1000;
const MAX_PARAMS: usize = 100;
const MAX_TAGS: usize = 100;
/// Longest param value sent (MLflow 2.x+ takes 6000 characters).
const MAX_PARAM_VALUE: usize = 6000;
/// Longest tag value sent (MLflow takes 8000).
const MAX_TAG_VALUE: usize = 5000;

pub(crate) struct Mlflow {
    url: BaseUrl,
    raw: String,
    experiment: String,
    key: String,
}

/// The MLflow status of a run; when the tracker finishes (the fit ended or was
/// interrupted), a run that is not completed or failed is `KILLED`.
pub fn status_of(status: RunStatus, finishing: bool) -> &'static str {
    match status {
        RunStatus::Completed => "FINISHED",
        RunStatus::Failed => "FAILED",
        RunStatus::Deleted => "KILLED",
        RunStatus::New | RunStatus::Ongoing | RunStatus::Stopped if finishing => "KILLED",
        RunStatus::New | RunStatus::Ongoing | RunStatus::Stopped => "RUNNING",
    }
}

/// `section.key` -> value of a resolved config (arrays and tables as JSON), without the
/// `tracking` section.
pub fn params_of(config: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(sections) = config.as_object() {
        for (section, v) in sections {
            if section == "tracking" {
                continue;
            }
            match v.as_object() {
                Some(keys) => {
                    for (k, v) in keys {
                        if !v.is_null() {
                            out.insert(format!("{section}.{k}"), param_value(v));
                        }
                    }
                }
                None => {
                    out.insert(section.clone(), param_value(v));
                }
            }
        }
    }
    out
}

fn param_value(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        o => o.to_string(),
    };
    cut(s, MAX_PARAM_VALUE)
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The tags of a run (`furnace.*`, `mlflow.runName`, `mlflow.parentRunId` when its parent
/// is known there).
fn tags_of(run: &RunRow, experiment: &str, parent_mlflow: Option<&str>) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    t.insert("mlflow.runName".into(), format!("run-{}", run.id));
    t.insert("furnace.experiment".into(), experiment.to_string());
    t.insert("furnace.run_id".into(), run.id.to_string());
    t.insert("furnace.status".into(), run.status.as_str().to_string());
    t.insert("furnace.warm".into(), run.warm.to_string());
    t.insert("furnace.chunks_done".into(), run.chunks_done.to_string());
    t.insert("furnace.total_chunks".into(), run.total_chunks.to_string());
    t.insert("furnace.steps_done".into(), run.steps_done.to_string());
    t.insert("furnace.total_steps".into(), run.total_steps.to_string());
    if let Some(p) = run.parent_id {
        t.insert("furnace.parent_run".into(), p.to_string());
    }
    if let Some(p) = parent_mlflow {
        t.insert("mlflow.parentRunId".into(), p.to_string());
    }
    if let Some(e) = &run.error {
        t.insert("furnace.error".into(), cut(e.clone(), MAX_TAG_VALUE));
    }
    t
}

fn ms(t: f64) -> i64 {
    (t * 1000.0).round() as i64
}

impl Mlflow {
    pub(crate) fn new(url: &str, experiment: &str) -> Result<Self> {
        Ok(Self {
            url: BaseUrl::parse(url)?,
            raw: url.trim_end_matches('/').to_string(),
            experiment: experiment.to_string(),
            key: format!("{} {experiment}", url.trim_end_matches('/')),
        })
    }

    pub(crate) fn name(&self) -> String {
        format!("mlflow at {}", self.raw)
    }

    fn call(&self, method: &str, endpoint: &str, body: Option<&Value>, timeout: Duration) -> Result<Value> {
        let path = format!("/api/2.0/mlflow/{endpoint}");
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, answer) = self.url.request(method, &path, bytes.as_deref(), timeout)?;
        let text = String::from_utf8_lossy(&answer);
        let endpoint = endpoint.split('?').next().unwrap_or(endpoint).to_string();
        if !(200..300).contains(&status) {
            return Err(Error::Status { status, endpoint, body: cut(text.into_owned(), 500) });
        }
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).map_err(|e| Error::Protocol { endpoint, msg: e.to_string() })
    }

    fn experiment_id(&self, t: Duration) -> Result<String> {
        let get = |t| -> Result<Option<String>> {
            match self.call("GET", &format!("experiments/get-by-name?experiment_name={}", encode_query(&self.experiment)), None, t) {
                Ok(v) => {
                    let e = &v["experiment"];
                    if e["lifecycle_stage"] == "deleted" {
                        return Err(Error::Protocol {
                            endpoint: "experiments/get-by-name".into(),
                            msg: format!("MLflow experiment {:?} is deleted; restore it or pick another name", self.experiment),
                        });
                    }
                    Ok(e["experiment_id"].as_str().map(str::to_string))
                }
                Err(Error::Status { status: 404, .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        if let Some(id) = get(t)? {
            return Ok(id);
        }
        match self.call("POST", "experiments/create", Some(&json!({ "name": self.experiment })), t) {
            Ok(v) => v["experiment_id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Protocol { endpoint: "experiments/create".into(), msg: "no experiment_id".into() }),
            // Created meanwhile by someone else.
            Err(e) if e.is_rejection() => get(t)?.ok_or(e),
            Err(e) => Err(e),
        }
    }

    /// An MLflow run already made for this furnace run (a state file lost after a crash).
    fn find_run(&self, exp_id: &str, run: &RunRow, t: Duration) -> Result<Option<String>> {
        let filter = format!("tags.`furnace.run_id` = '{}' and tags.`furnace.experiment` = '{}'", run.id, self.experiment_tag_escaped());
        let v = self.call(
            "POST",
            "runs/search",
            Some(&json!({ "experiment_ids": [exp_id], "filter": filter, "max_results": 1, "run_view_type": "ALL" })),
            t,
        )?;
        Ok(v["runs"].get(0).and_then(|r| r["info"]["run_id"].as_str()).map(str::to_string))
    }

    fn experiment_tag_escaped(&self) -> String {
        self.experiment.replace('\\', "\\\\").replace('\'', "\\'")
    }

    fn log_batch(&self, run_id: &str, metrics: Vec<Value>, params: Vec<Value>, tags: Vec<Value>, t: Duration) -> Result<()> {
        self.call("POST", "runs/log-batch", Some(&json!({ "run_id": run_id, "metrics": metrics, "params": params, "tags": tags })), t)?;
        Ok(())
    }

    /// Delivers everything of the snapshot's dirty runs not delivered yet.
    pub(crate) fn sync(&self, snap: &Snapshot<'_>, p: &mut Persist, t: Duration, warn: &mut dyn FnMut(String)) -> Result<()> {
        let mut st = p.state.mlflow.get(&self.key).cloned().unwrap_or_default();
        let exp_id = match &st.experiment_id {
            Some(id) => id.clone(),
            None => {
                let id = self.experiment_id(t)?;
                st.experiment_id = Some(id.clone());
                self.save(p, &st)?;
                id
            }
        };
        let furnace_exp = snap.experiment.name.clone();
        for run in snap.runs.iter().filter(|r| snap.dirty.contains(&r.id)) {
            let mut r = match st.runs.get(&run.id) {
                Some(r) => r.clone(),
                None => {
                    let id = match self.find_run(&exp_id, run, t)? {
                        Some(id) => id,
                        None => {
                            let parent = run.parent_id.and_then(|p| st.runs.get(&p)).map(|r| r.id.clone());
                            let tags: Vec<Value> = tags_of(run, &furnace_exp, parent.as_deref())
                                .into_iter()
                                .map(|(k, v)| json!({ "key": k, "value": v }))
                                .collect();
                            let v = self.call(
                                "POST",
                                "runs/create",
                                Some(&json!({
                                    "experiment_id": exp_id,
                                    "run_name": format!("run-{}", run.id),
                                    "start_time": ms(run.created),
                                    "tags": tags,
                                })),
                                t,
                            )?;
                            v["run"]["info"]["run_id"]
                                .as_str()
                                .map(str::to_string)
                                .ok_or_else(|| Error::Protocol { endpoint: "runs/create".into(), msg: "no run_id".into() })?
                        }
                    };
                    let r = MlflowRun { id, ..Default::default() };
                    st.runs.insert(run.id, r.clone());
                    self.save(p, &st)?;
                    r
                }
            };
            if !r.params {
                let params: Vec<Value> = params_of(&run.config).into_iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
                for chunk in params.chunks(MAX_PARAMS) {
                    match self.log_batch(&r.id, vec![], chunk.to_vec(), vec![], t) {
                        Ok(()) => {}
                        Err(e) if e.is_rejection() => warn(format!("{}: run {}: params refused: {e}", self.name(), run.id)),
                        Err(e) => return Err(e),
                    }
                }
                r.params = true;
                st.runs.insert(run.id, r.clone());
                self.save(p, &st)?;
            }
            let rows = snap.metrics.get(&run.id).map(Vec::as_slice).unwrap_or(&[]);
            let new: Vec<_> = rows.iter().filter(|m| r.metrics.get(&m.name).is_none_or(|&s| m.step > s)).collect();
            for chunk in new.chunks(MAX_METRICS) {
                let metrics: Vec<Value> =
                    chunk.iter().map(|m| json!({ "key": m.name, "value": m.value, "timestamp": ms(m.time), "step": m.step })).collect();
                match self.log_batch(&r.id, metrics, vec![], vec![], t) {
                    Ok(()) => {}
                    Err(e) if e.is_rejection() => {
                        warn(format!("{}: run {}: {} metric values refused: {e}", self.name(), run.id, chunk.len()))
                    }
                    Err(e) => return Err(e),
                }
                for m in chunk {
                    let c = r.metrics.entry(m.name.clone()).or_insert(m.step);
                    *c = (*c).max(m.step);
                }
                st.runs.insert(run.id, r.clone());
                self.save(p, &st)?;
            }
            let parent = run.parent_id.and_then(|p| st.runs.get(&p)).map(|r| r.id.clone());
            let tags = tags_of(run, &furnace_exp, parent.as_deref());
            let changed: Vec<Value> =
                tags.iter().filter(|(k, v)| r.tags.get(*k) != Some(v)).map(|(k, v)| json!({ "key": k, "value": v })).collect();
            for chunk in changed.chunks(MAX_TAGS) {
                self.log_batch(&r.id, vec![], vec![], chunk.to_vec(), t)?;
            }
            if !changed.is_empty() {
                r.tags = tags;
                st.runs.insert(run.id, r.clone());
                self.save(p, &st)?;
            }
            let status = status_of(run.status, snap.finishing);
            if r.status != status {
                let mut body = json!({ "run_id": r.id, "status": status });
                if status != "RUNNING" {
                    let end = rows.iter().map(|m| m.time).fold(run.created, f64::max);
                    body["end_time"] = json!(ms(if snap.finishing { furnace_exp::store::now() } else { end }));
                }
                self.call("POST", "runs/update", Some(&body), t)?;
                r.status = status.to_string();
                st.runs.insert(run.id, r);
                self.save(p, &st)?;
            }
        }
        Ok(())
    }

    /// The highest step delivered of a run (None: nothing yet).
    pub(crate) fn floor(&self, run: i64, p: &Persist) -> Option<i64> {
        p.state.mlflow.get(&self.key)?.runs.get(&run)?.metrics.values().max().copied()
    }

    /// Metric values of the snapshot not delivered yet.
    pub(crate) fn unsent(&self, snap: &Snapshot<'_>, p: &Persist) -> usize {
        let st = p.state.mlflow.get(&self.key);
        count_unsent(snap, |run| st.and_then(|s| s.runs.get(&run)).map(|r| &r.metrics))
    }

    fn save(&self, p: &mut Persist, st: &MlflowState) -> Result<()> {
        p.state.mlflow.insert(self.key.clone(), st.clone());
        p.save()
    }
}

pub(crate) fn count_unsent<'a>(snap: &Snapshot<'_>, cursors: impl Fn(i64) -> Option<&'a crate::state::Cursors>) -> usize {
    snap.metrics
        .iter()
        .map(|(run, rows)| {
            let c = cursors(*run);
            rows.iter().filter(|m| c.and_then(|c| c.get(&m.name)).is_none_or(|&s| m.step > s)).count()
        })
        .sum()
}
