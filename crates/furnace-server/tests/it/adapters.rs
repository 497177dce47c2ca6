//! The adapter registry over HTTP: `GET /api/adapters` (filtered by base and tag) and
//! `GET /api/adapters/{name}` (run names with a `/`, tags, 404), behind the token, and the
//! dashboard's Adapters page drawing from it.

use crate::{call, error_of, fixture};
use axum::http::StatusCode;
use furnace_exp::registry;
use furnace_testutil::testdata;

#[tokio::test]
async fn the_registry_is_served_as_json_and_the_dashboard_draws_it() {
    let f = fixture();
    let store = f.store();
    let smol = testdata().join("lora_adapter");
    registry::register_path(&store, &smol, Some("smol"), Some("smollm2-135m-instruct"), &["prod".to_string()], false).unwrap();
    // A run's adapter, as the trainer registers it: relative to the runs folder.
    let run_dir = f.exp.dir.join(format!("run-{}", f.runs[0])).join("adapter");
    std::fs::create_dir_all(&run_dir).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(testdata().join("tiny-llama-pref-lora").join(file), run_dir.join(file)).unwrap();
    }
    let run = store.run(f.runs[0]).unwrap();
    registry::register_run(&store, &f.exp, &run, &run_dir).unwrap();
    let run_name = format!("exp/run-{}", f.runs[0]);

    let app = f.router(Some("tok"));
    let (s, _) = call(&app, "GET", "/api/adapters", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = call(&app, "GET", "/api/adapters", Some("tok"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let names: Vec<&str> = v.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["smol", run_name.as_str()]);
    let smol_json = &v[0];
    assert_eq!(smol_json["base"], "smollm2-135m-instruct");
    assert_eq!(smol_json["source"], "registered");
    assert_eq!(smol_json["tags"], serde_json::json!(["prod"]));
    assert_eq!(smol_json["peft"]["r"], 8);
    assert_eq!(smol_json["path"], std::fs::canonicalize(&smol).unwrap().to_str().unwrap());
    let run_json = &v[1];
    assert_eq!((run_json["source"].as_str(), run_json["run_id"].as_i64()), (Some("run"), Some(f.runs[0])));
    assert_eq!(run_json["base"], "x");
    // The run's last values (loss 2.0 at step 2).
    assert_eq!(run_json["metrics"]["loss"], 2.0);
    assert_eq!(run_json["spec"]["lora"]["r"], 4);

    let (_, v) = call(&app, "GET", "/api/adapters?tag=prod", Some("tok"), None).await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, v) = call(&app, "GET", "/api/adapters?base=HuggingFaceTB/SmolLM2-135M-Instruct", Some("tok"), None).await;
    assert_eq!(v.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect::<Vec<_>>(), ["smol"]);

    // One by name (with its `/`), by tag; unknown is a 404.
    let (s, v) = call(&app, "GET", &format!("/api/adapters/{run_name}"), Some("tok"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["name"], run_name.as_str());
    let (s, v) = call(&app, "GET", "/api/adapters/prod", Some("tok"), None).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("smol")));
    let (s, v) = call(&app, "GET", "/api/adapters/nope", Some("tok"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("no adapter named or tagged 'nope'"), "{v}");

    // The dashboard has an Adapters page over this route.
    use tower::ServiceExt;
    let req = axum::http::Request::builder().uri("/ui/app.js").header("host", crate::ADDR).body(axum::body::Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let js = String::from_utf8(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(js.contains("/api/adapters") && js.contains("pageAdapters"), "app.js has no Adapters page");
    let req = axum::http::Request::builder().uri("/").header("host", crate::ADDR).body(axum::body::Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let html = String::from_utf8(axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    assert!(html.contains("#/adapters"), "no Adapters link in the page");
}
