//! furnace-server: the experiment API in-process through the app's router, and over
//! loopback with raw HTTP/1.1 on a TcpStream. One test binary; a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod adapters;
mod api;
mod auth;
mod dashboard;
mod events;
mod feedback;
mod guard;
mod loopback;
mod playground;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use furnace_exp::{ExperimentRow, RunStatus, Store};
use furnace_server::ServerOptions;
use serde_json::{json, Value};
use std::path::PathBuf;
use tower::ServiceExt;

pub const SPEC: &str = r#"
[experiment]
name = "exp"

[data]
train = "train.jsonl"

[model]
base = "x"

[lora]
r = 4
alpha = 8

[trainer]
max_steps = 10
"#;

/// Where the in-process app is served (what `call` names in `Host`).
pub const ADDR: &str = "127.0.0.1:8851";

pub fn options(token: Option<&str>) -> ServerOptions {
    ServerOptions {
        addr: ADDR.parse().unwrap(),
        token: token.map(String::from),
        allow_model_paths: false,
        launcher: None,
        serving: None,
        cors_origins: Vec::new(),
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub db: PathBuf,
    pub exp: ExperimentRow,
    /// New, new, deleted.
    pub runs: [i64; 3],
}

impl Fixture {
    pub fn store(&self) -> Store {
        Store::open(&self.db).unwrap()
    }

    /// The app as a server on [`ADDR`] serves it.
    pub fn router(&self, token: Option<&str>) -> Router {
        furnace_server::app(self.db.clone(), furnace_exp::events::channel(), options(token))
    }
}

pub fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("furnace.db");
    let spec_path = dir.path().join("spec.toml");
    let mut store = Store::open(&db).unwrap();
    let exp = store.create_experiment("exp", "fit", &spec_path, SPEC).unwrap();
    let spec = furnace_train::Spec::parse(SPEC, &spec_path).unwrap();
    let config = serde_json::to_value(&spec).unwrap();
    let add = |r: i64| store.add_run(exp.id, &config, &json!({ "lora.r": r }), 0, 10, 4, None).unwrap();
    let runs = [add(4), add(4), add(4)];
    store.set_run_status(runs[2], RunStatus::Deleted, None).unwrap();
    store.record_step(runs[0], 1, 0, &[("loss", 2.5), ("lr", 1e-4)]).unwrap();
    store.record_step(runs[0], 2, 1, &[("loss", 2.0), ("lr", 2e-4)]).unwrap();
    Fixture { _dir: dir, db, exp, runs }
}

/// One request through the router, as a client on loopback sends it (`Host: ADDR`, a JSON
/// body when there is one); the answer must be JSON.
pub async fn call(app: &Router, method: &str, uri: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
    let mut headers = vec![("host", ADDR.to_string())];
    if let Some(t) = token {
        headers.push(("authorization", format!("Bearer {t}")));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json".into()));
    }
    let (status, _, v) = call_with(app, method, uri, &headers, body.map(|b| b.as_bytes().to_vec())).await;
    (status, v)
}

/// One request with exactly these headers: the status, the answer's headers and its JSON.
pub async fn call_with(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let head = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {uri}: answer is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, head, v)
}

pub fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error message in {v}"))
}

pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect()
}
