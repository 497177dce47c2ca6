//! The JSON views and `POST /api/ops`, in-process: listings, errors, op checks.

use crate::{call, error_of, fixture, ids, options, SPEC};
use axum::http::StatusCode;
use furnace_exp::{OpKind, RunStatus};
use furnace_server::ServerOptions;
use serde_json::json;

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
    let (_, v) = call(&app, "GET", "/api/experiments/exp/runs?all=true", None, None).await;
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
        .map(|m| (m["step"].as_i64().unwrap(), m["name"].as_str().unwrap().to_string(), m["value"].as_f64().unwrap()))
        .collect();
    assert_eq!(got, vec![(1, "loss".into(), 2.5), (1, "lr".into(), 1e-4), (2, "loss".into(), 2.0), (2, "lr".into(), 2e-4)]);
    let (_, v) = call(&app, "GET", &format!("/api/runs/{a}/metrics?name=loss"), None, None).await;
    let losses: Vec<f64> = v.as_array().unwrap().iter().map(|m| m["value"].as_f64().unwrap()).collect();
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

    for uri in ["/api/experiments/nope", "/api/experiments/nope/runs", "/api/experiments/nope/ops"] {
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
    let (s, v) = call(&app, "GET", "/nothing", None, None).await;
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

    let (s, v) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {a}, "op": "stop"}}"#))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["status"], "pending");
    let op_id = v["op_id"].as_i64().unwrap();

    let pending = f.store().pending_ops(f.exp.id).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, op_id);
    assert_eq!(pending[0].run_id, a);
    assert_eq!(pending[0].kind, OpKind::Stop);
    assert_eq!(pending[0].source, "api");

    let (s, _) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {b}, "op": "delete"}}"#))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, v) = call(&app, "GET", "/api/experiments/exp/ops", None, None).await;
    let kinds: Vec<(i64, &str)> =
        v.as_array().unwrap().iter().map(|o| (o["run_id"].as_i64().unwrap(), o["kind"]["op"].as_str().unwrap())).collect();
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

    let (s, v) = call(&app, "POST", "/api/ops", None, Some(r#"{"run": 999, "op": "stop"}"#)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("999"), "{v}");

    let (s, v) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {a}, "op": "resume"}}"#))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("only a stopped run can resume"), "{v}");

    let (s, v) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {deleted}, "op": "delete"}}"#))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("already deleted"), "{v}");

    f.store().set_run_status(a, RunStatus::Stopped, None).unwrap();
    let (s, _) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {a}, "op": "resume"}}"#))).await;
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
    let clone = |set: &str, warm: bool| format!(r#"{{"run": {a}, "op": "clone", "set": [{set}], "warm": {warm}}}"#);

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

    let (s, v) = call(&app, "POST", "/api/ops", None, Some(&clone(r#""lora.r=8", "trainer.learning_rate=1e-3""#, false))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, _) = call(&app, "POST", "/api/ops", None, Some(&clone(r#""lora.alpha=16""#, true))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    // `set` and `warm` may be left out.
    let (s, _) = call(&app, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {a}, "op": "clone"}}"#))).await;
    assert_eq!(s, StatusCode::ACCEPTED);

    let kinds: Vec<OpKind> = f.store().pending_ops(f.exp.id).unwrap().into_iter().map(|o| o.kind).collect();
    assert_eq!(
        kinds,
        vec![
            OpKind::Clone { set: vec!["lora.r=8".into(), "trainer.learning_rate=1e-3".into()], warm: false },
            OpKind::Clone { set: vec!["lora.alpha=16".into()], warm: true },
            OpKind::Clone { set: vec![], warm: false },
        ]
    );
}

#[tokio::test]
async fn clones_from_the_api_change_the_base_only_to_a_built_in_model_unless_paths_are_allowed() {
    let f = fixture();
    let a = f.runs[0];
    let clone = |base: &str| format!(r#"{{"run": {a}, "op": "clone", "set": ["model.base={base}"]}}"#);
    let app = f.router(None);
    for path in ["/etc/passwd", "../other/model.gguf", "\\\"/tmp/x\\\""] {
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(&clone(path))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
        let e = error_of(&v);
        assert!(e.contains("model.base") && e.contains("--allow-model-paths") && e.contains("smollm2-135m-instruct"), "{e}");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());
    // A built-in alias, and the parent's own base, are fine.
    for base in ["smollm2-135m-instruct", "x"] {
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(&clone(base))).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{base}: {v}");
    }
    // `furnace run --allow-model-paths`.
    let open =
        furnace_server::app(f.db.clone(), furnace_exp::events::channel(), ServerOptions { allow_model_paths: true, ..options(None) });
    let (s, v) = call(&open, "POST", "/api/ops", None, Some(&clone("/models/mine"))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(f.store().pending_ops(f.exp.id).unwrap().len(), 3);
}

#[tokio::test]
async fn op_bodies_reject_unknown_fields() {
    let f = fixture();
    let app = f.router(None);
    let a = f.runs[0];
    for (body, field) in [
        (format!(r#"{{"run": {a}, "op": "clone", "sets": ["lora.r=8"]}}"#), "sets"),
        (format!(r#"{{"run": {a}, "op": "clone", "set": ["lora.r=8"], "hot": true}}"#), "hot"),
        (format!(r#"{{"run": {a}, "op": "stop", "force": true}}"#), "force"),
        (format!(r#"{{"run": {a}, "op": "delete", "set": []}}"#), "set"),
        (format!(r#"{{"run": {a}, "run_id": 2, "op": "resume"}}"#), "run_id"),
    ] {
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(&format!("unknown field `{field}`")), "{body}: {v}");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty(), "no op from a body with unknown fields");
}
