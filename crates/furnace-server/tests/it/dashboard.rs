//! The dashboard's routes in-process: the page and its files (public, with a CSP), the
//! JSON it draws from, starting experiments from a spec, and the login that trades the
//! token for an HttpOnly session cookie (useless to a cross-site page).

use crate::{call, call_with, error_of, fixture, options, ADDR};
use axum::http::StatusCode;
use axum::Router;
use furnace_server::{Launcher, ServerOptions};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

/// A launcher that records what it was asked to start.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Launcher for Recorder {
    fn launch(&self, name: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(name.to_string());
        Ok(())
    }
}

fn app_with(f: &crate::Fixture, opts: ServerOptions) -> Router {
    furnace_server::app(f.db.clone(), furnace_exp::events::channel(), opts)
}

/// A GET of a page or file: status, content type, CSP and the body as text.
async fn page(app: &Router, uri: &str) -> (StatusCode, String, String, String) {
    use tower::ServiceExt;
    let req = axum::http::Request::builder().uri(uri).header("host", ADDR).body(axum::body::Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (ct, csp) = (header("content-type"), header("content-security-policy"));
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, ct, csp, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_page_and_its_files_are_embedded_public_and_locked_down() {
    let f = fixture();
    // With a token: the page loads (it holds no data), the data does not.
    let app = f.router(Some("tok"));
    let (s, ct, csp, body) = page(&app, "/").await;
    assert_eq!(s, StatusCode::OK);
    assert!(ct.starts_with("text/html") && body.contains("/ui/app.js") && body.contains("/ui/plot.js"), "{ct}: {body}");
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"), "{csp}");
    for (file, ct_want, needle) in
        [("app.js", "text/javascript", "/api/summary"), ("plot.js", "text/javascript", "FurnacePlot"), ("app.css", "text/css", "--bg")]
    {
        let (s, ct, csp, body) = page(&app, &format!("/ui/{file}")).await;
        assert_eq!(s, StatusCode::OK, "{file}");
        assert!(ct.starts_with(ct_want) && body.contains(needle) && !csp.is_empty(), "{file}: {ct}");
        // Nothing is fetched from elsewhere at run time.
        assert!(!body.contains("http://") && !body.contains("https://"), "{file} names another host");
    }
    let (s, _, _, body) = page(&app, "/ui/missing.js").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    let (s, _) = call(&app, "GET", "/api/summary", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn summary_table_series_and_detail_describe_the_experiment() {
    let f = fixture();
    let [a, b, deleted] = f.runs;
    {
        let mut s = f.store();
        s.record_step(a, 3, 1, &[("loss", 1.5), ("eval_loss", 1.8)]).unwrap();
        s.record_step(b, 1, 0, &[("loss", 3.0), ("eval_loss", 1.2)]).unwrap();
        // A deleted run's better score does not count as the experiment's best.
        s.record_step(deleted, 1, 0, &[("eval_loss", 0.1)]).unwrap();
    }
    let app = f.router(None);
    let (s, v) = call(&app, "GET", "/api/summary", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v[0]["experiment"]["name"], "exp");
    assert_eq!(
        (v[0]["runs"].as_i64(), v[0]["by_status"]["new"].as_i64(), v[0]["by_status"]["deleted"].as_i64()),
        (Some(3), Some(2), Some(1))
    );
    assert_eq!((v[0]["best"]["run_id"].as_i64(), v[0]["best"]["value"].as_f64()), (Some(b), Some(1.2)));

    let (s, v) = call(&app, "GET", "/api/experiments/exp/table", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Every run has lora.r = 4: nothing varies.
    assert_eq!(v["knobs"], serde_json::json!([]));
    let run_a = v["runs"].as_array().unwrap().iter().find(|r| r["id"] == a).unwrap();
    assert!(run_a.get("config").is_none(), "the table leaves configs out");
    assert_eq!((run_a["metrics"]["loss"]["last"].as_f64(), run_a["metrics"]["loss"]["min"].as_f64()), (Some(1.5), Some(1.5)));
    assert_eq!(run_a["metrics"]["loss"]["count"].as_i64(), Some(3));
    assert_eq!(run_a["metrics"]["eval_loss"]["last_step"].as_i64(), Some(3));

    let (s, v) = call(&app, "GET", &format!("/api/experiments/exp/series?names=loss,lr&runs={a}"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let runs = v["runs"].as_object().unwrap();
    assert_eq!(runs.keys().collect::<Vec<_>>(), [&a.to_string()]);
    assert_eq!(runs[&a.to_string()]["loss"]["step"], serde_json::json!([1, 2, 3]));
    assert_eq!(runs[&a.to_string()]["loss"]["value"], serde_json::json!([2.5, 2.0, 1.5]));
    assert_eq!(runs[&a.to_string()]["lr"]["value"], serde_json::json!([1e-4, 2e-4]));
    for (q, needle) in
        [("points=0", "points"), ("points=999999", "points"), ("runs=x", "'x'"), ("names=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q", "names")]
    {
        let (s, v) = call(&app, "GET", &format!("/api/experiments/exp/series?{q}"), None, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
        assert!(error_of(&v).contains(needle), "{q}: {v}");
    }
    let (s, _) = call(&app, "GET", "/api/experiments/nope/table", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = call(&app, "GET", &format!("/api/runs/{a}/detail"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["run"]["id"].as_i64(), Some(a));
    assert_eq!(v["experiment"], "exp");
    assert!(v["paths"]["dir"].as_str().unwrap().ends_with(&format!("run-{a}")), "{v}");
    assert_eq!((v["paths"]["adapter"].clone(), v["lineage"].clone()), (Value::Null, serde_json::json!([])));
}

#[tokio::test]
async fn many_points_come_back_downsampled_with_the_ends_kept() {
    let f = fixture();
    let a = f.runs[1];
    {
        let mut s = f.store();
        for step in 1..=5000 {
            s.record_step(a, step, 0, &[("loss", if step == 2500 { 99.0 } else { 1.0 + (step % 10) as f64 })]).unwrap();
        }
    }
    let (s, v) = call(&f.router(None), "GET", &format!("/api/experiments/exp/series?names=loss&points=500&runs={a}"), None, None).await;
    assert_eq!(s, StatusCode::OK);
    let series = &v["runs"][a.to_string()]["loss"];
    let steps: Vec<i64> = series["step"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    assert!(steps.len() <= 500 && steps.len() > 400, "{}", steps.len());
    assert_eq!((steps[0], *steps.last().unwrap()), (1, 5000));
    assert!(series["value"].as_array().unwrap().iter().any(|x| x.as_f64() == Some(99.0)), "the spike survives");
}

const SPEC: &str = "[experiment]\nname = \"fromui\"\n\n[data]\ntrain = \"train.jsonl\"\n\n[model]\nbase = \"smollm2-135m-instruct\"\n\n\
                    [lora]\nr = { list = [4, 8] }\nalpha = 8\n\n[trainer]\nmax_steps = 10\n";

fn spec_body(spec: &str) -> String {
    serde_json::json!({ "spec": spec }).to_string()
}

#[tokio::test]
async fn a_spec_is_checked_as_furnace_run_checks_it_and_starts_through_the_launcher() {
    let f = fixture();
    let launched = Arc::new(Recorder::default());
    let app = app_with(&f, ServerOptions { launcher: Some(launched.clone()), ..options(None) });

    let (s, v) = call(&app, "POST", "/api/specs/check", None, Some(&spec_body(SPEC))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["runs"].as_i64(), v["name"].as_str()), (Some(2), Some("fromui")));
    for (spec, status, needle) in [
        (SPEC.replace("r = { list = [4, 8] }", "r = 0"), StatusCode::BAD_REQUEST, "lora.r"),
        (SPEC.replace("[trainer]", "[trainer\n"), StatusCode::BAD_REQUEST, "TOML"),
        (SPEC.replace("smollm2-135m-instruct", "/etc/passwd"), StatusCode::FORBIDDEN, "--allow-model-paths"),
        (SPEC.replace("name = \"fromui\"", "name = \"../up\""), StatusCode::BAD_REQUEST, "experiment.name"),
    ] {
        for route in ["/api/specs/check", "/api/experiments"] {
            let (s, v) = call(&app, "POST", route, None, Some(&spec_body(&spec))).await;
            assert_eq!(s, status, "{route}: {v}");
            assert!(error_of(&v).contains(needle) || error_of(&v).to_lowercase().contains(&needle.to_lowercase()), "{route}: {v}");
        }
    }
    let (s, v) = call(&app, "POST", "/api/experiments", None, Some(r#"{"spec": "x", "name": "y"}"#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "unknown fields are refused: {v}");
    assert!(launched.0.lock().unwrap().is_empty(), "nothing bad was launched");
    assert_eq!(f.store().experiments().unwrap().len(), 1, "nothing bad was created");

    let (s, v) = call(&app, "POST", "/api/experiments", None, Some(&spec_body(SPEC))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!((v["experiment"].as_str(), v["runs"].as_i64()), (Some("fromui"), Some(2)));
    assert_eq!(*launched.0.lock().unwrap(), ["fromui"]);
    let e = f.store().experiment("fromui").unwrap();
    assert_eq!(f.store().runs(e.id).unwrap().len(), 2);

    // Without a launcher the server says it cannot start experiments, and creates none.
    let (s, v) = call(&f.router(None), "POST", "/api/experiments", None, Some(&spec_body(&SPEC.replace("fromui", "other")))).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(f.store().experiment("other").is_err());
    // Paths are allowed when the server allows them.
    let open = app_with(&f, ServerOptions { allow_model_paths: true, ..options(None) });
    let (s, v) =
        call(&open, "POST", "/api/specs/check", None, Some(&spec_body(&SPEC.replace("smollm2-135m-instruct", "/models/mine")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn an_evals_spec_is_checked_created_and_launched_from_the_dashboard() {
    let f = fixture();
    let launched = Arc::new(Recorder::default());
    let app = app_with(&f, ServerOptions { launcher: Some(launched.clone()), ..options(None) });
    let data = furnace_testutil::repo_root().join("data/rag_eval");
    let spec = format!(
        "[experiment]\nname = \"evui\"\nmode = \"evals\"\n\n[data]\npath = \"{}\"\n\n[rag]\ndocuments = [\"{}\"]\nk = {{ list = [1, 4] }}\n\n[[metric]]\nkind = \"hit_rate\"\n",
        data.join("questions.jsonl").display(),
        data.join("docs").display()
    );
    let (s, v) = call(&app, "POST", "/api/specs/check", None, Some(&spec_body(&spec))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["runs"].as_i64(), v["name"].as_str()), (Some(2), Some("evui")));
    for (bad, status, needle) in [
        (spec.replace("k = { list = [1, 4] }", "k = 2\ntop_n = 3\nreranker = \"x\""), StatusCode::BAD_REQUEST, "rag.top_n"),
        (spec.replace("[rag]", "[generator]\nmodel = \"/etc/passwd\"\n\n[rag]"), StatusCode::FORBIDDEN, "--allow-model-paths"),
    ] {
        let (s, v) = call(&app, "POST", "/api/experiments", None, Some(&spec_body(&bad))).await;
        assert_eq!(s, status, "{v}");
        assert!(error_of(&v).contains(needle), "{v}");
    }
    let (s, v) = call(&app, "POST", "/api/experiments", None, Some(&spec_body(&spec))).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(*launched.0.lock().unwrap(), ["evui"]);
    let e = f.store().experiment("evui").unwrap();
    assert_eq!(e.mode, "evals");
    assert_eq!(f.store().runs(e.id).unwrap().len(), 2);
}

/// The session cookie a login answer sets (the `name=value` part) and its attributes.
fn cookie_of(h: &axum::http::HeaderMap) -> (String, String) {
    let c = h.get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (pair, attrs) = c.split_once(';').unwrap_or((&c, ""));
    (pair.to_string(), attrs.to_string())
}

#[tokio::test]
async fn login_trades_the_token_for_an_http_only_session_that_cross_site_pages_cannot_use() {
    let f = fixture();
    let app = f.router(Some("s3cret"));
    let json = |extra: &[(&'static str, &str)]| {
        let mut h = vec![("host", ADDR.to_string()), ("content-type", "application/json".to_string())];
        h.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        h
    };
    let (s, head, v) = call_with(&app, "POST", "/api/login", &json(&[]), Some(br#"{"token": "wrong"}"#.to_vec())).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(head.get("set-cookie").is_none());
    let (s, head, v) = call_with(&app, "POST", "/api/login", &json(&[]), Some(br#"{"token": "s3cret"}"#.to_vec())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (pair, attrs) = cookie_of(&head);
    assert!(pair.starts_with("furnace_session=") && pair.len() == "furnace_session=".len() + 64, "{pair}");
    assert!(!pair.contains("s3cret") && !v.to_string().contains("s3cret"), "the token is not the session");
    assert!(attrs.contains("HttpOnly") && attrs.contains("SameSite=Strict") && attrs.contains("Path=/"), "{attrs}");

    // The cookie stands for the token, for reads and for ops.
    let with_cookie = |extra: &[(&'static str, &str)]| {
        let mut h = json(extra);
        h.push(("cookie", pair.clone()));
        h
    };
    let (s, _, v) = call_with(&app, "GET", "/api/summary", &with_cookie(&[]), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let stop = format!(r#"{{"run": {}, "op": "stop"}}"#, f.runs[0]).into_bytes();
    // A page elsewhere that got the browser to send the cookie is refused by its Origin
    // (and a form's content type by the guard), and records nothing.
    let (s, _, v) = call_with(&app, "POST", "/api/ops", &with_cookie(&[("origin", "http://evil.example")]), Some(stop.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let mut form = with_cookie(&[]);
    form.retain(|(k, _)| *k != "content-type");
    form.push(("content-type", "text/plain".into()));
    let (s, _, _) = call_with(&app, "POST", "/api/ops", &form, Some(stop.clone())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());
    let (s, _, v) = call_with(&app, "POST", "/api/ops", &with_cookie(&[("origin", &format!("http://{ADDR}"))]), Some(stop)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");

    // A made-up session is nothing; after logout the real one is nothing either.
    let mut fake = json(&[]);
    fake.push(("cookie", format!("furnace_session={}", "0".repeat(64))));
    let (s, _, _) = call_with(&app, "GET", "/api/summary", &fake, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, head, _) = call_with(&app, "POST", "/api/logout", &with_cookie(&[]), Some(b"{}".to_vec())).await;
    assert_eq!(s, StatusCode::OK);
    assert!(cookie_of(&head).1.contains("Max-Age=0"));
    let (s, _, _) = call_with(&app, "GET", "/api/summary", &with_cookie(&[]), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// A shard's examples with made-up scores.
fn examples(shard: i64, n: usize) -> Vec<furnace_exp::ExampleRecord> {
    (0..n)
        .map(|i| furnace_exp::ExampleRecord {
            example_id: format!("q{shard}-{i}"),
            index: i,
            prediction: "p".into(),
            retrieved: vec![],
            scores: [("em".to_string(), (i % 2) as f64)].into(),
            prompt_tokens: 10,
            completion_tokens: 3,
            latency: 0.1,
            finish_reason: "stop".into(),
        })
        .collect()
}

#[tokio::test]
async fn an_evals_experiment_has_intervals_per_shard_and_its_stop_reason() {
    use furnace_exp::{Estimate, OpKind, RunStatus};
    let f = fixture();
    let (a, b) = {
        let store = f.store();
        let config = |size: i64| json!({ "experiment": { "mode": "evals", "primary": "em" }, "rag": { "chunk_size": size } });
        let e = store.create_experiment_with_runs("ev", "evals", &f.db.with_file_name("ev.toml"), "", &[]).unwrap();
        let a = store.add_run(e.id, &config(256), &json!({ "rag.chunk_size": 256 }), 0, 0, 0, None).unwrap();
        let b = store.add_run(e.id, &config(512), &json!({ "rag.chunk_size": 512 }), 0, 0, 0, None).unwrap();
        for r in [a, b] {
            store.set_totals(r, 4, 4).unwrap();
        }
        // Run a: three shards, its interval narrowing; run b: one shard, then raced out.
        for (k, (v, lo, hi)) in [(0.7, 0.4, 0.95), (0.72, 0.55, 0.86), (0.712, 0.671, 0.753)].into_iter().enumerate() {
            let est = [
                Estimate { name: "em".into(), value: v, bounds: Some((lo, hi)) },
                Estimate { name: "tokens".into(), value: 13.0, bounds: None },
            ];
            store.record_shard(a, k as i64, &examples(k as i64, 4), &est).unwrap();
        }
        store.record_shard(b, 0, &examples(0, 4), &[Estimate { name: "em".into(), value: 0.2, bounds: Some((0.05, 0.35)) }]).unwrap();
        store
            .add_applied_op(
                b,
                &OpKind::Stop,
                "policy",
                1,
                "raced out after shard 1: em upper bound 0.3500 < run 1's lower bound 0.4000",
                RunStatus::Stopped,
            )
            .unwrap();
        (a, b)
    };
    let app = f.router(None);
    let (s, v) = call(&app, "GET", &format!("/api/experiments/ev/series?names=em,tokens&runs={a},{b}"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["mode"], "evals");
    let em = &v["runs"][a.to_string()]["em"];
    assert_eq!(em["step"], json!([1, 2, 3]));
    assert_eq!(em["value"], json!([0.7, 0.72, 0.712]));
    assert_eq!(em["lower"], json!([0.4, 0.55, 0.671]));
    assert_eq!(em["upper"], json!([0.95, 0.86, 0.753]));
    // A metric without intervals has no bounds.
    let tokens = &v["runs"][a.to_string()]["tokens"];
    assert_eq!(tokens["value"], json!([13.0, 13.0, 13.0]));
    assert!(tokens.get("lower").is_none() && tokens.get("upper").is_none(), "{tokens}");
    assert_eq!(v["runs"][b.to_string()]["em"]["lower"], json!([0.05]));

    let (s, v) = call(&app, "GET", "/api/experiments/ev/table", None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["experiment"]["mode"].as_str(), v["primary"].as_str()), (Some("evals"), Some("em")));
    assert_eq!(v["metric_names"], json!(["em", "tokens"]));
    assert_eq!(v["bounded"], json!(["em"]));
    let row = |id: i64| v["runs"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap().clone();
    let (ra, rb) = (row(a), row(b));
    assert_eq!((ra["steps_done"].as_i64(), ra["total_steps"].as_i64(), ra["status"].as_str()), (Some(3), Some(4), Some("ongoing")));
    let m = &ra["metrics"]["em"];
    assert_eq!((m["last"].as_f64(), m["lower"].as_f64(), m["upper"].as_f64()), (Some(0.712), Some(0.671), Some(0.753)));
    assert_eq!(m["last_step"].as_i64(), Some(3));
    assert!(ra["metrics"]["tokens"].get("lower").is_none());
    assert_eq!(ra["reason"], Value::Null);
    assert_eq!(rb["status"], "stopped");
    assert!(rb["reason"].as_str().unwrap().starts_with("raced out after shard 1"), "{rb}");
    assert_eq!((rb["metrics"]["em"]["lower"].as_f64(), rb["metrics"]["em"]["upper"].as_f64()), (Some(0.05), Some(0.35)));

    // A training experiment's table and series carry no intervals.
    let (_, v) = call(&app, "GET", "/api/experiments/exp/table", None, None).await;
    assert_eq!((v["primary"].clone(), v["bounded"].clone()), (Value::Null, json!([])));
    let (_, v) = call(&app, "GET", "/api/experiments/exp/series?names=loss", None, None).await;
    assert_eq!(v["mode"], "fit");
    assert!(v["runs"][f.runs[0].to_string()]["loss"].get("lower").is_none());
}

#[tokio::test]
async fn an_evals_experiment_from_a_spec_names_its_primary_metric_and_best_run() {
    use furnace_exp::Estimate;
    let f = fixture();
    let spec = furnace_testutil::repo_root().join("examples/rag_eval.toml");
    let (name, ids) = {
        let s = f.store();
        let e = furnace_evals::experiment::create_from_text(&s, &std::fs::read_to_string(&spec).unwrap(), &spec).unwrap();
        let ids: Vec<i64> = s.runs(e.id).unwrap().iter().map(|r| r.id).collect();
        for (r, v) in [(ids[0], 0.4), (ids[1], 0.6)] {
            let est = [
                Estimate { name: "token_f1".into(), value: 0.9, bounds: Some((0.8, 1.0)) },
                Estimate { name: "contains".into(), value: v, bounds: Some((v - 0.2, v + 0.2)) },
            ];
            s.record_shard(r, 0, &examples(0, 2), &est).unwrap();
        }
        (e.name, ids)
    };
    let app = f.router(None);
    let (s, v) = call(&app, "GET", &format!("/api/experiments/{name}/table"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The spec's primary metric comes first.
    assert_eq!((v["primary"].as_str(), v["metric_names"].clone()), (Some("contains"), json!(["contains", "token_f1"])));
    assert_eq!(v["runs"].as_array().unwrap().iter().map(|r| r["total_steps"].as_i64().unwrap()).collect::<Vec<_>>(), [8, 8, 8, 8]);
    let (_, v) = call(&app, "GET", "/api/summary", None, None).await;
    let ev = v.as_array().unwrap().iter().find(|x| x["experiment"]["name"] == name.as_str()).unwrap();
    assert_eq!(
        (ev["best"]["metric"].as_str(), ev["best"]["value"].as_f64(), ev["best"]["run_id"].as_i64()),
        (Some("contains"), Some(0.6), Some(ids[1]))
    );

    // Ops on its pipelines: stop, resume, and clones that change rag/prompt/generator
    // settings, cold, but never to read a file or reach a server of the client's choice.
    let op = |body: String| {
        let app = app.clone();
        async move { call(&app, "POST", "/api/ops", None, Some(&body)).await }
    };
    let (s, v) = op(format!(r#"{{"run": {}, "op": "stop"}}"#, ids[2])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, v) = op(format!(
        r#"{{"run": {}, "op": "clone", "set": ["rag.chunk_size=512", "prompt.fewshot_k=1", "generator.max_tokens=8"]}}"#,
        ids[0]
    ))
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let (s, v) = op(format!(r#"{{"run": {}, "op": "clone", "set": ["generator.model=smollm2-135m-instruct"]}}"#, ids[0])).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for (set, status, needle) in [
        (r#"rag.documents=["/etc"]"#, StatusCode::FORBIDDEN, "rag.documents"),
        (r#"prompt.fewshot="/etc/passwd""#, StatusCode::FORBIDDEN, "prompt.fewshot"),
        (r#"generator.model="/tmp/model""#, StatusCode::FORBIDDEN, "built-in model"),
        (r#"generator.api_key_env="HOME""#, StatusCode::FORBIDDEN, "api_key_env"),
        (r#"rag.embedding_model="/tmp/enc""#, StatusCode::FORBIDDEN, "built-in model"),
        ("lora.r=8", StatusCode::BAD_REQUEST, "lora"),
    ] {
        let (s, v) = op(json!({ "run": ids[0], "op": "clone", "set": [set] }).to_string()).await;
        assert_eq!(s, status, "{set}: {v}");
        assert!(error_of(&v).contains(needle), "{set}: {v}");
    }
    let (s, v) = op(format!(r#"{{"run": {}, "op": "clone", "set": [], "warm": true}}"#, ids[0])).await;
    assert!(s.is_client_error() && error_of(&v).contains("warm"), "{s}: {v}");
}

#[tokio::test]
async fn dpo_and_grpo_experiments_name_their_kinds_and_grpo_ranks_by_eval_reward() {
    let f = fixture();
    let store = f.store();
    let config = |kind: &str| json!({ "experiment": { "mode": "fit" }, "trainer": { "kind": kind } });
    let g = store.create_experiment_with_runs("gr", "fit", &f.db.with_file_name("gr.toml"), "", &[]).unwrap();
    let a = store.add_run(g.id, &config("grpo"), &json!({}), 0, 0, 0, None).unwrap();
    let b = store.add_run(g.id, &config("grpo"), &json!({}), 0, 0, 0, None).unwrap();
    let mut s = f.store();
    s.record_step(a, 2, 1, &[("reward", 0.1), ("eval_reward", 0.3)]).unwrap();
    s.record_step(b, 2, 1, &[("reward", 0.4), ("eval_reward", 0.7)]).unwrap();
    let d = store.create_experiment_with_runs("dp", "fit", &f.db.with_file_name("dp.toml"), "", &[]).unwrap();
    let c = store.add_run(d.id, &config("dpo"), &json!({}), 0, 0, 0, None).unwrap();
    s.record_step(c, 1, 1, &[("loss", 0.5), ("eval_loss", 0.6), ("rewards/accuracies", 0.75)]).unwrap();
    let app = f.router(None);
    let (st, v) = call(&app, "GET", "/api/summary", None, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let summary = |name: &str| v.as_array().unwrap().iter().find(|e| e["experiment"]["name"] == name).unwrap().clone();
    // The larger eval reward is GRPO's best; a DPO experiment's best is its eval loss.
    assert_eq!(summary("gr")["best"], json!({ "metric": "eval_reward", "value": 0.7, "run_id": b }));
    assert_eq!(summary("dp")["best"]["metric"], "eval_loss");
    let (_, t) = call(&app, "GET", "/api/experiments/gr/table", None, None).await;
    assert_eq!(t["kinds"], json!(["grpo"]));
    let (_, t) = call(&app, "GET", "/api/experiments/dp/table", None, None).await;
    assert_eq!(t["kinds"], json!(["dpo"]));
    assert_eq!(t["runs"][0]["metrics"]["rewards/accuracies"]["last"].as_f64(), Some(0.75));
    let (_, v) = call(&app, "GET", "/api/experiments/gr/series?names=reward,eval_reward", None, None).await;
    assert_eq!(v["runs"][b.to_string()]["eval_reward"]["value"], json!([0.7]));
}
