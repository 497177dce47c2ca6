//! The playground in-process, on tiny-llama: what can be chatted with, a streamed answer
//! from a base model and from a completed run's adapter, and the requests it refuses.

use crate::{call, error_of, options, ADDR};
use axum::http::StatusCode;
use furnace_exp::{FitOptions, RunStatus, Store};
use furnace_model::LoadedModel;
use std::path::Path;

/// A store with one experiment on tiny-llama whose one run trained 2 steps and completed.
fn trained() -> (tempfile::TempDir, std::path::PathBuf, String, i64) {
    let d = tempfile::tempdir().unwrap();
    let rows = std::fs::read_to_string(furnace_testutil::repo_root().join("data/extract/train.jsonl")).unwrap();
    std::fs::write(d.path().join("train.jsonl"), rows.lines().take(8).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let base = furnace_testutil::testdata().join("tiny-llama").display().to_string().replace('\\', "/");
    let spec = format!(
        "[experiment]\nname = \"play\"\n\n[data]\ntrain = \"train.jsonl\"\n\n[model]\nbase = \"{base}\"\n\n[lora]\nr = 2\nalpha = 16\n\
         targets = [\"q_proj\", \"v_proj\"]\n\n[trainer]\nlearning_rate = 1e-2\nbatch_size = 2\nmax_seq_len = 96\nmax_steps = 2\n"
    );
    std::fs::write(d.path().join("spec.toml"), spec).unwrap();
    let store = Store::open_in(&d.path().join("runs")).unwrap();
    let exp = furnace_exp::experiment::create(&store, &d.path().join("spec.toml")).unwrap();
    let mut load = |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?);
    let runs = furnace_exp::run_fit(&store, &exp, &mut load, &FitOptions::default(), &furnace_exp::events::channel()).unwrap().runs;
    assert_eq!(runs[0].status, RunStatus::Completed);
    (d, store.path().to_path_buf(), base, runs[0].id)
}

/// A chat request's answer: status and the (event, data) pairs of its stream.
async fn chat(app: &axum::Router, body: &str) -> (StatusCode, Vec<(String, serde_json::Value)>) {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/api/playground/chat")
        .header("host", ADDR)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let sse = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").starts_with("text/event-stream");
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if !sse {
        return (status, vec![("json".into(), serde_json::from_str(&text).unwrap())]);
    }
    let events = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event:")).map(|s| s.trim().to_string())?;
            let data: String = block.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            Some((name, serde_json::from_str(&data).unwrap()))
        })
        .collect();
    (status, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_streams_answers_from_a_base_and_from_a_run_adapter() {
    let (_d, db, base, run) = trained();
    let app = furnace_server::app(db, furnace_exp::events::channel(), options(None));
    let (s, v) = call(&app, "GET", "/api/playground/targets", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["bases"][0]["model"], base.as_str());
    assert_eq!(v["runs"][0]["run"].as_i64(), Some(run));

    let msg = r#""messages": [{"role": "user", "content": "Extract the name: Ada Lovelace wrote the first program."}]"#;
    let mut texts = Vec::new();
    for target in [format!(r#""model": {}"#, serde_json::to_string(&base).unwrap()), format!(r#""run": {run}"#)] {
        let (s, events) = chat(&app, &format!("{{{target}, {msg}, \"max_tokens\": 6}}")).await;
        assert_eq!(s, StatusCode::OK, "{events:?}");
        let (last, body) = events.last().unwrap();
        assert_eq!(last, "done", "{events:?}");
        let pieces: Vec<&str> = events.iter().filter(|(n, _)| n == "text").map(|(_, d)| d["text"].as_str().unwrap()).collect();
        assert_eq!(body["tokens"].as_u64(), Some(pieces.len() as u64), "one text event per token: {events:?}");
        assert!((1..=6).contains(&pieces.len()), "{events:?}");
        assert!(["length", "eos", "stop"].contains(&body["finish_reason"].as_str().unwrap()), "{body}");
        texts.push(pieces.concat() + body["text"].as_str().unwrap());
    }

    for (body, status, needle) in [
        (r#"{"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}"#.to_string(), StatusCode::FORBIDDEN, "not the base"),
        (
            format!(r#"{{"run": {run}, "model": "x", "messages": [{{"role": "user", "content": "x"}}]}}"#),
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
        (format!(r#"{{"run": {run}, "messages": []}}"#), StatusCode::BAD_REQUEST, "messages"),
        (
            format!(r#"{{"run": {run}, "messages": [{{"role": "user", "content": "x"}}], "max_tokens": 0}}"#),
            StatusCode::BAD_REQUEST,
            "max_tokens",
        ),
        (
            format!(r#"{{"run": {run}, "messages": [{{"role": "user", "content": "x"}}], "max_tokens": 99999}}"#),
            StatusCode::BAD_REQUEST,
            "max_tokens",
        ),
        (format!(r#"{{"run": {run}, "messages": [{{"role": "user", "content": "x"}}], "top_k": 3}}"#), StatusCode::BAD_REQUEST, "top_k"),
        (r#"{"run": 999, "messages": [{"role": "user", "content": "x"}]}"#.to_string(), StatusCode::NOT_FOUND, "999"),
    ] {
        let (s, events) = chat(&app, &body).await;
        assert_eq!(s, status, "{body}: {events:?}");
        assert!(error_of(&events[0].1).contains(needle), "{body}: {events:?}");
    }
}
