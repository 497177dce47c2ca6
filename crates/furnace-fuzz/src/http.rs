//! The HTTP target's fixture: the whole app (`furnace_server::app`) over a store with one
//! experiment of three runs, called in-process through tower's `oneshot` on a
//! current-thread runtime. The store lives in a folder under `/dev/shm` when there is one
//! (commits do not wait for a disk), removed by [`cleanup`].

use crate::targets::Outcome;
use axum::body::Body;
use axum::http::Request;
use furnace_exp::Store;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use tower::ServiceExt;

const SPEC: &str = "[experiment]\nname = \"fuzz\"\n[data]\ntrain = \"train.jsonl\"\n[model]\nbase = \"x\"\n[lora]\nr = 4\nalpha = 8\n[trainer]\nmax_steps = 10\n";
const ADDR: &str = "127.0.0.1:8851";

struct App {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

static DIR: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);

fn app() -> Result<&'static App, String> {
    static APP: OnceLock<Result<App, String>> = OnceLock::new();
    APP.get_or_init(|| build().map_err(|e| format!("{e:#}"))).as_ref().map_err(String::clone)
}

fn build() -> anyhow::Result<App> {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::Builder::new().prefix("furnace-fuzz-").tempdir_in(shm)? } else { tempfile::tempdir()? };
    let db: PathBuf = dir.path().join("furnace.db");
    let spec_path = dir.path().join("spec.toml");
    let mut store = Store::open(&db)?;
    let exp = store.create_experiment("fuzz", "fit", &spec_path, SPEC)?;
    let spec = furnace_train::Spec::parse(SPEC, &spec_path)?;
    let config = serde_json::to_value(&spec)?;
    for r in [4, 8, 16] {
        let id = store.add_run(exp.id, &config, &json!({ "lora.r": r }), 0, 10, 4, None)?;
        store.record_step(id, 1, 0, &[("loss", 2.5)])?;
    }
    if let Ok(mut d) = DIR.lock() {
        *d = Some(dir);
    }
    let opts = furnace_server::ServerOptions { addr: ADDR.parse()?, ..Default::default() };
    let router = furnace_server::app(db, furnace_exp::events::channel(), opts);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(App { runtime, router })
}

/// Removes the store's folder (call once the HTTP target is done).
pub fn cleanup() {
    if let Ok(mut d) = DIR.lock() {
        d.take();
    }
}

/// One request written as `METHOD PATH\nBODY`: a 2xx answer is `Ok`, a 4xx answer an
/// `Err` with its JSON error, a 5xx answer a `Bug` (a crafted request is the client's
/// fault, never the server's).
pub fn call(input: &[u8]) -> Result<Outcome, String> {
    let app = app()?;
    let (head, body) = match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, path) = head.split_once(' ').unwrap_or(("GET", &head));
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", ADDR)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()));
    let request = match request {
        Ok(r) => r,
        Err(e) => return Ok(Outcome::Err(format!("not a request: {e}"))),
    };
    let answer = app.runtime.block_on(async {
        let response = app.router.clone().oneshot(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            // Not read: an event stream (`/api/events`) never ends.
            return Ok((status, String::new()));
        }
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, String::from_utf8_lossy(&bytes).into_owned()))
    })?;
    let (status, text) = answer;
    Ok(if status.is_success() {
        Outcome::Ok
    } else if status.is_server_error() {
        Outcome::Bug(format!("{status}: {text}"))
    } else {
        let msg =
            serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from));
        Outcome::Err(msg.map_or_else(|| format!("{status}: answer without a JSON error: {text}"), |m| format!("{status}: {m}")))
    })
}
