//! The experiment HTTP API: in-process through the router, and over loopback with raw
//! HTTP/1.1 on a TcpStream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use furnace_exp::events::{self, Event};
use furnace_exp::server::{self, ServerOptions};
use furnace_exp::{Error, ExperimentRow, OpKind, RunStatus, Store};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tower::ServiceExt;

const SPEC: &str = r#"
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

struct Fixture {
    _dir: tempfile::TempDir,
    db: PathBuf,
    exp: ExperimentRow,
    /// New, new, deleted.
    runs: [i64; 3],
}

impl Fixture {
    fn store(&self) -> Store {
        Store::open(&self.db).unwrap()
    }

    fn router(&self, token: Option<&str>) -> Router {
        server::router(self.db.clone(), events::channel(), token.map(String::from))
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("furnace.db");
    let spec_path = dir.path().join("spec.toml");
    let mut store = Store::open(&db).unwrap();
    let exp = store
        .create_experiment("exp", "fit", &spec_path, SPEC)
        .unwrap();
    let spec = furnace_train::Spec::parse(SPEC, &spec_path).unwrap();
    let config = serde_json::to_value(&spec).unwrap();
    let add = |r: i64| {
        store
            .add_run(exp.id, &config, &json!({ "lora.r": r }), 0, 10, 4, None)
            .unwrap()
    };
    let runs = [add(4), add(4), add(4)];
    store
        .set_run_status(runs[2], RunStatus::Deleted, None)
        .unwrap();
    store
        .record_step(runs[0], 1, 0, &[("loss", 2.5), ("lr", 1e-4)])
        .unwrap();
    store
        .record_step(runs[0], 2, 1, &[("loss", 2.0), ("lr", 2e-4)])
        .unwrap();
    Fixture {
        _dir: dir,
        db,
        exp,
        runs,
    }
}

/// One request through the router; the answer must be JSON.
async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_string()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {uri}: answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, v)
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn api_lists_experiments_runs_and_metrics() {
    let f = fixture();
    let app = f.router(None);
    let [a, b, deleted] = f.runs;

    let (s, v) = call(&app, "GET", "/api/health", None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({ "ok": true })));

    let (s, v) = call(&app, "GET", "/api/experiments", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "exp");
    assert_eq!(v[0]["id"], f.exp.id);

    let (s, v) = call(&app, "GET", "/api/experiments/exp", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["experiment"]["name"], "exp");
    assert_eq!(v["experiment"]["spec"], SPEC);
    assert_eq!(ids(&v["runs"]), vec![a, b], "deleted runs are hidden");
    let (_, v) = call(&app, "GET", "/api/experiments/exp?all=true", None, None).await;
    assert_eq!(ids(&v["runs"]), vec![a, b, deleted]);
    assert_eq!(v["runs"][2]["status"], "deleted");

    let (s, v) = call(&app, "GET", "/api/experiments/exp/runs", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&v), vec![a, b]);
    let (_, v) = call(
        &app,
        "GET",
        "/api/experiments/exp/runs?all=true",
        None,
        None,
    )
    .await;
    assert_eq!(ids(&v), vec![a, b, deleted]);

    let (s, v) = call(&app, "GET", &format!("/api/runs/{a}"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["id"], a);
    assert_eq!(v["status"], "new");
    assert_eq!(v["steps_done"], 2);
    assert_eq!(v["chunks_done"], 1);
    assert_eq!(v["config"]["lora"]["r"], 4);
    assert_eq!(v["knobs"], json!({ "lora.r": 4 }));

    let (s, v) = call(&app, "GET", &format!("/api/runs/{a}/metrics"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    let got: Vec<(i64, String, f64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["step"].as_i64().unwrap(),
                m["name"].as_str().unwrap().to_string(),
                m["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "loss".into(), 2.5),
            (1, "lr".into(), 1e-4),
            (2, "loss".into(), 2.0),
            (2, "lr".into(), 2e-4)
        ]
    );
    let (_, v) = call(
        &app,
        "GET",
        &format!("/api/runs/{a}/metrics?name=loss"),
        None,
        None,
    )
    .await;
    let losses: Vec<f64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_f64().unwrap())
        .collect();
    assert_eq!(losses, vec![2.5, 2.0]);
    let (s, v) = call(&app, "GET", &format!("/api/runs/{b}/metrics"), None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));

    let (s, v) = call(&app, "GET", "/api/experiments/exp/ops", None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn bad_ids_unknown_things_and_wrong_methods_are_json_errors() {
    let f = fixture();
    let app = f.router(None);

    let (s, v) = call(&app, "GET", "/api/runs/abc", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("abc"), "{v}");
    let (s, v) = call(&app, "GET", "/api/runs/abc/metrics", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    let (s, v) = call(&app, "GET", "/api/runs/999", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("999"), "{v}");
    let (s, _) = call(&app, "GET", "/api/runs/999/metrics", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    for uri in [
        "/api/experiments/nope",
        "/api/experiments/nope/runs",
        "/api/experiments/nope/ops",
    ] {
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        assert!(error_of(&v).contains("nope"), "{v}");
    }

    let (s, v) = call(&app, "GET", "/api/experiments/exp?all=maybe", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    error_of(&v);

    let (s, v) = call(&app, "GET", "/api/nothing/here", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("/api/nothing/here"), "{v}");
    let (s, v) = call(&app, "GET", "/", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&v);

    let (s, v) = call(&app, "GET", "/api/ops", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&v);
    let (s, v) = call(&app, "DELETE", "/api/runs/1", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&v);
}

#[tokio::test]
async fn post_stop_op_is_recorded_pending() {
    let f = fixture();
    let app = f.router(None);
    let [a, b, _] = f.runs;

    let (s, v) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {a}, "op": "stop"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["status"], "pending");
    let op_id = v["op_id"].as_i64().unwrap();

    let pending = f.store().pending_ops(f.exp.id).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, op_id);
    assert_eq!(pending[0].run_id, a);
    assert_eq!(pending[0].kind, OpKind::Stop);
    assert_eq!(pending[0].source, "api");

    let (s, _) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {b}, "op": "delete"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, v) = call(&app, "GET", "/api/experiments/exp/ops", None, None).await;
    let kinds: Vec<(i64, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["run_id"].as_i64().unwrap(),
                o["kind"]["op"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(kinds, vec![(a, "stop"), (b, "delete")]);
    // Ops are only recorded: the runs themselves are untouched until the trainer applies them.
    assert_eq!(f.store().run(a).unwrap().status, RunStatus::New);
}

#[tokio::test]
async fn post_malformed_op_bodies_are_400_json() {
    let f = fixture();
    let app = f.router(None);
    let a = f.runs[0];
    let bodies = [
        "".to_string(),
        "{not json".to_string(),
        "[1, 2]".to_string(),
        r#"{"op": "stop"}"#.to_string(),
        format!(r#"{{"run": {a}}}"#),
        r#"{"run": "one", "op": "stop"}"#.to_string(),
        format!(r#"{{"run": {a}, "op": "explode"}}"#),
        format!(r#"{{"run": {a}, "op": "clone", "set": "lora.r=8"}}"#),
        format!(r#"{{"run": {a}, "op": "clone", "warm": "yes"}}"#),
    ];
    for body in &bodies {
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains("bad op request"), "{body}: {v}");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());
}

#[tokio::test]
async fn post_op_checks_the_run() {
    let f = fixture();
    let app = f.router(None);
    let [a, _, deleted] = f.runs;

    let (s, v) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(r#"{"run": 999, "op": "stop"}"#),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("999"), "{v}");

    let (s, v) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {a}, "op": "resume"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&v).contains("only a stopped run can resume"),
        "{v}"
    );

    let (s, v) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {deleted}, "op": "delete"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("already deleted"), "{v}");

    f.store()
        .set_run_status(a, RunStatus::Stopped, None)
        .unwrap();
    let (s, _) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {a}, "op": "resume"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let ops = f.store().ops(f.exp.id).unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].kind, OpKind::Resume);
}

#[tokio::test]
async fn post_clone_checks_the_overrides() {
    let f = fixture();
    let app = f.router(None);
    let a = f.runs[0];
    let clone = |set: &str, warm: bool| {
        format!(r#"{{"run": {a}, "op": "clone", "set": [{set}], "warm": {warm}}}"#)
    };

    for (set, warm, needle) in [
        (r#""lora.r=0""#, false, "lora.r"),
        (r#""nosection""#, false, "nosection"),
        (r#""data.train=other.jsonl""#, false, "cannot be changed"),
        (r#""lora.nokey=1""#, false, "not a setting"),
        (r#""lora.r=8""#, true, "warm"),
    ] {
        let body = clone(set, warm);
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(needle), "{body}: {v}");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());

    let (s, v) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&clone(r#""lora.r=8", "trainer.learning_rate=1e-3""#, false)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, _) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&clone(r#""lora.alpha=16""#, true)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // `set` and `warm` may be left out.
    let (s, _) = call(
        &app,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {a}, "op": "clone"}}"#)),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);

    let kinds: Vec<OpKind> = f
        .store()
        .pending_ops(f.exp.id)
        .unwrap()
        .into_iter()
        .map(|o| o.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            OpKind::Clone {
                set: vec!["lora.r=8".into(), "trainer.learning_rate=1e-3".into()],
                warm: false
            },
            OpKind::Clone {
                set: vec!["lora.alpha=16".into()],
                warm: true
            },
            OpKind::Clone {
                set: vec![],
                warm: false
            },
        ]
    );
}

#[tokio::test]
async fn token_guards_every_request() {
    let f = fixture();
    let app = f.router(Some("s3cret"));
    let a = f.runs[0];

    for uri in ["/api/health", "/api/experiments", "/api/nothing"] {
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(
            error_of(&v),
            "missing or wrong token: send Authorization: Bearer <token>"
        );
        for wrong in ["s3cre", "s3cret!", "S3CRET", ""] {
            let (s, _) = call(&app, "GET", uri, Some(wrong), None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri} with {wrong:?}");
        }
    }
    let stop = format!(r#"{{"run": {a}, "op": "stop"}}"#);
    let (s, _) = call(&app, "POST", "/api/ops", Some("nope"), Some(&stop)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        f.store().ops(f.exp.id).unwrap().is_empty(),
        "an unauthorized op is not recorded"
    );

    let (s, v) = call(&app, "GET", "/api/experiments", Some("s3cret"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["name"], "exp");
    let (s, _) = call(&app, "POST", "/api/ops", Some("s3cret"), Some(&stop)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _) = call(&app, "GET", "/api/nothing", Some("s3cret"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Without a token nothing is asked.
    let (s, _) = call(&f.router(None), "GET", "/api/experiments", None, None).await;
    assert_eq!(s, StatusCode::OK);
}

fn metric(step: i64) -> Event {
    Event::Metric {
        experiment: "exp".into(),
        run_id: 1,
        step,
        name: "loss".into(),
        value: step as f64 / 2.0,
    }
}

/// Reads the event stream until `want` arrives (text up to and including it).
async fn read_until(
    stream: &mut (impl tokio_stream::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin),
    want: &str,
) -> String {
    let mut text = String::new();
    let read = async {
        while !text.contains(want) {
            let chunk = stream.next().await.expect("stream ended").unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} in {text:?}"));
    text
}

#[tokio::test]
async fn event_stream_skips_what_a_slow_client_missed_and_goes_on() {
    let f = fixture();
    let tx = tokio::sync::broadcast::channel(2).0;
    let app = server::router(f.db.clone(), tx.clone(), None);
    let resp = app
        .oneshot(Request::get("/api/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(tx.receiver_count(), 1);
    for step in 1..=5 {
        tx.send(metric(step)).unwrap();
    }
    let mut body = resp.into_body().into_data_stream();
    let text = read_until(&mut body, r#""step":5"#).await;
    assert!(text.contains("skipped 3 events"), "{text}");
    assert!(
        !text.contains(r#""step":1"#) && text.contains(r#""step":4"#),
        "{text}"
    );
    assert!(text.contains("event: metric\n"), "{text}");

    tx.send(Event::Status {
        experiment: "exp".into(),
        run_id: 2,
        status: RunStatus::Stopped,
        message: Some("asha".into()),
    })
    .unwrap();
    let text = read_until(&mut body, "asha").await;
    assert!(text.contains("event: status\n"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        v,
        json!({ "type": "status", "experiment": "exp", "run_id": 2, "status": "stopped", "message": "asha" })
    );
}

// ---- over loopback ----

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("bad chunk");
        let n = usize::from_str_radix(size.trim(), 16).expect("bad chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// One raw HTTP/1.1 exchange: the status and the body as JSON.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = connect(addr);
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad response {resp:?}"));
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
    (status, v)
}

fn loopback() -> ServerOptions {
    ServerOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        token: None,
    }
}

#[test]
fn loopback_serves_json_and_records_ops() {
    let f = fixture();
    let h = server::start(f.db.clone(), loopback(), events::channel()).unwrap();
    assert!(h.addr.ip().is_loopback());
    assert_ne!(h.addr.port(), 0, "the real port is reported");

    let (s, v) = http(h.addr, "GET", "/api/experiments", None, None);
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "exp");
    let (s, v) = http(h.addr, "GET", "/api/experiments/exp/runs", None, None);
    assert_eq!(s, 200);
    assert_eq!(ids(&v), f.runs[..2].to_vec());

    let (s, v) = http(
        h.addr,
        "POST",
        "/api/ops",
        None,
        Some(&format!(r#"{{"run": {}, "op": "stop"}}"#, f.runs[1])),
    );
    assert_eq!(s, 202, "{v}");
    let op = f.store().op(v["op_id"].as_i64().unwrap()).unwrap();
    assert_eq!(
        (op.run_id, op.kind, op.status.as_str()),
        (f.runs[1], OpKind::Stop, "pending")
    );

    let (s, v) = http(h.addr, "POST", "/api/ops", None, Some("{"));
    assert_eq!(s, 400);
    error_of(&v);
    let (s, v) = http(h.addr, "GET", "/api/runs/abc", None, None);
    assert_eq!(s, 400);
    error_of(&v);

    let addr = h.addr;
    h.shutdown();
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "stopped server still accepts"
    );
}

#[test]
fn loopback_with_token_refuses_requests_without_it() {
    let f = fixture();
    let opts = ServerOptions {
        token: Some("tok".into()),
        ..loopback()
    };
    let h = server::start(f.db.clone(), opts, events::channel()).unwrap();
    let (s, v) = http(h.addr, "GET", "/api/experiments", None, None);
    assert_eq!(s, 401);
    assert!(error_of(&v).contains("Authorization: Bearer"), "{v}");
    let (s, _) = http(h.addr, "GET", "/api/experiments", Some("wrong"), None);
    assert_eq!(s, 401);
    let (s, v) = http(h.addr, "GET", "/api/experiments", Some("tok"), None);
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "exp");
    h.shutdown();
}

#[test]
fn loopback_streams_events_and_shutdown_ends_the_stream() {
    let f = fixture();
    let tx = events::channel();
    let h = server::start(f.db.clone(), loopback(), tx.clone()).unwrap();
    let mut s = connect(h.addr);
    write!(
        s,
        "GET /api/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        h.addr
    )
    .unwrap();

    // Wait for the response head: the stream is subscribed by then.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut read_more = |got: &mut Vec<u8>| {
        assert!(
            Instant::now() < deadline,
            "timed out; got {:?}",
            String::from_utf8_lossy(got)
        );
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read: {e}; got {:?}", String::from_utf8_lossy(got)));
        got.extend_from_slice(&buf[..n]);
        n
    };
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        assert!(read_more(&mut got) > 0, "closed early");
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    assert_eq!(tx.receiver_count(), 1);

    let ev = Event::Op {
        experiment: "exp".into(),
        op_id: 7,
        run_id: 1,
        op: "clone".into(),
        status: "applied".into(),
        message: None,
        new_run_id: Some(4),
    };
    tx.send(ev.clone()).unwrap();
    let want = serde_json::to_string(&ev).unwrap();
    while !String::from_utf8_lossy(&got).contains(&want) {
        assert!(read_more(&mut got) > 0, "closed early");
    }
    assert!(String::from_utf8_lossy(&got).contains("event: op\n"));

    // Shutdown ends the open stream promptly rather than waiting on it.
    let t = Instant::now();
    h.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "shutdown took {:?}",
        t.elapsed()
    );
    while read_more(&mut got) > 0 {}
    assert_eq!(tx.receiver_count(), 0);
}

#[test]
fn check_options_needs_a_token_off_loopback() {
    let open = ServerOptions {
        addr: "0.0.0.0:8851".parse().unwrap(),
        token: None,
    };
    match server::check_options(&open) {
        Err(Error::Invalid(m)) => {
            assert!(m.contains("0.0.0.0:8851") && m.contains("--token"), "{m}")
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(
        server::start(PathBuf::from("unused.db"), open.clone(), events::channel()),
        Err(Error::Invalid(_))
    ));
    server::check_options(&ServerOptions {
        token: Some("t".into()),
        ..open.clone()
    })
    .unwrap();
    assert!(server::check_options(&ServerOptions {
        token: Some(" ".into()),
        ..open
    })
    .is_err());
    server::check_options(&ServerOptions {
        addr: "127.0.0.1:8851".parse().unwrap(),
        token: None,
    })
    .unwrap();
    server::check_options(&ServerOptions {
        addr: "[::1]:8851".parse().unwrap(),
        token: None,
    })
    .unwrap();
    assert_eq!(server::DEFAULT_PORT, 8851);
}

#[test]
fn start_on_a_taken_port_is_an_io_error_naming_it() {
    let f = fixture();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    match server::start(
        f.db.clone(),
        ServerOptions { addr, token: None },
        events::channel(),
    ) {
        Err(Error::Io(m)) => assert!(m.contains(&addr.to_string()) && m.contains("--port"), "{m}"),
        o => panic!("{o:?}"),
    }
}
