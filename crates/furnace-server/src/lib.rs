//! Everything HTTP in furnace: one axum app built from routers, served on its own thread
//! with its own tokio runtime.
//!
//! Today the app has one router, `experiments`: JSON views of the
//! experiment store (experiments, runs, metrics, ops), `POST /api/ops` to record control
//! ops, and `GET /api/events`, a server-sent-event stream of the live
//! [`furnace_exp::Event`]s. The dashboard and an OpenAI-compatible API plug in later as
//! further routers next to it in [`app`].
//!
//! What every router shares lives in one module each: the handlers' state (`state`),
//! the guard around the whole app (`guard`: the `Host` must name this server, else 421;
//! an `Origin` must be the server's own, else 403; a `POST` must be
//! `Content-Type: application/json`, else 415; security headers on every answer), bearer-token
//! auth (`auth`; required off loopback, see [`check_options`]; the token from a flag, a
//! file or `FURNACE_TOKEN`, see [`resolve_token`]), JSON error answers (`error`; every
//! error is `{"error": "..."}`) and server-sent events (`sse`). Request bodies are limited
//! to [`BODY_LIMIT`] bytes (413 beyond).
//!
//! The server never trains and never blocks training: handlers read the store or record
//! ops (which the trainer applies), on tokio's blocking pool, so a bad request cannot
//! disturb training.
#![deny(missing_docs)]

mod adapters;
mod auth;
mod dashboard;
mod error;
mod experiments;
mod guard;
pub mod openai;
mod playground;
mod sse;
mod state;
mod ui;

pub use auth::{resolve_token, TOKEN_ENV};
pub use error::{Error, Result};

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::{Json, Router};
use furnace_exp::EventSender;
use state::AppState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// The port the server listens on by default.
pub const DEFAULT_PORT: u16 = 8851;

/// The largest request body the server reads, in bytes (1 MiB); a larger one is a 413.
pub const BODY_LIMIT: usize = 1 << 20;

/// How long a stopping server waits for open requests before it closes them.
const GRACE: Duration = Duration::from_secs(5);

/// Where and how the server listens. Its `Debug` output does not show the token.
#[derive(Clone)]
pub struct ServerOptions {
    /// The address to bind (port 0: any free port).
    pub addr: SocketAddr,
    /// The bearer token every request must carry (required off loopback).
    pub token: Option<String>,
    /// Let clones from the API change `model.base` to any path; by default only to a
    /// built-in model alias (or the parent's own base), so a request cannot make the
    /// trainer read an arbitrary file.
    pub allow_model_paths: bool,
    /// Starts experiments created from the dashboard (`POST /api/experiments`); without
    /// one that route answers 409.
    pub launcher: Option<std::sync::Arc<dyn Launcher>>,
    /// The model `furnace serve` serves through the OpenAI-compatible routes (`/v1/...`);
    /// without one they answer 404.
    pub serving: Option<std::sync::Arc<openai::Serving>>,
    /// Origins (`https://app.example.com`) allowed to call the server from a browser: they
    /// get CORS headers. None by default.
    pub cors_origins: Vec<String>,
}

/// What trains an experiment the dashboard created: `furnace run` and `furnace ui` queue
/// it behind what they are training.
pub trait Launcher: Send + Sync {
    /// Trains experiment `name` (already in the store) as soon as it can; returns at once.
    fn launch(&self, name: &str) -> std::result::Result<(), String>;
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allow_model_paths", &self.allow_model_paths)
            .field("launcher", &self.launcher.is_some())
            .field("serving", &self.serving.as_ref().map(|s| s.model_name.clone()))
            .field("cors_origins", &self.cors_origins)
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            token: None,
            allow_model_paths: false,
            launcher: None,
            serving: None,
            cors_origins: Vec::new(),
        }
    }
}

/// Checks the options: an address other than loopback needs a (non-empty) token, since
/// anyone who can reach the server could otherwise stop or delete runs.
pub fn check_options(o: &ServerOptions) -> Result<()> {
    for origin in &o.cors_origins {
        let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        if !rest.is_some_and(|r| !r.is_empty() && !r.trim_end_matches('/').contains('/')) {
            return Err(Error::Invalid(format!("--cors-origin takes an origin such as https://app.example.com, got {origin:?}")));
        }
    }
    if o.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(Error::Invalid("--token must not be empty".into()));
    }
    if !o.addr.ip().is_loopback() && o.token.is_none() {
        return Err(Error::Invalid(format!(
            "binding {} needs --token <secret>: off loopback anyone who can reach the server could stop or delete runs \
             (or bind 127.0.0.1 and tunnel to it)",
            o.addr
        )));
    }
    Ok(())
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

/// The whole app over one state: every router, the JSON fallbacks, auth in front of all
/// of it (unknown routes included, so they reveal nothing without the token), the body
/// limit, and the guard around everything (so its checks and headers cover auth's
/// answers and every router merged here).
fn build(state: AppState) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .merge(experiments::router())
        .merge(dashboard::router())
        .merge(adapters::router())
        .merge(playground::router())
        .merge(openai::router())
        .merge(auth::router())
        .merge(ui::router())
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::guard))
        .with_state(state)
}

/// The app as a router over the store at `db` (opened on first use), streaming `events`,
/// as a server bound to `opts.addr` serves it: requests must name that port in `Host`
/// (see the crate docs for the rest), and with `opts.token`, carry
/// `Authorization: Bearer <token>`. Event streams of this router end when their client
/// goes (a server from [`start`] also ends them when it stops).
pub fn app(db: PathBuf, events: EventSender, opts: ServerOptions) -> Router {
    // No shutdown signal: nothing ever sends on it.
    let (_, rx) = watch::channel(false);
    build(AppState::new(db, events, opts, rx))
}

/// A running server; dropping it stops it too.
pub struct ServerHandle {
    /// The address it listens on (the real port when asked for port 0).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops the server: no new connections, open requests get a few seconds to finish,
    /// event streams end; returns when its thread is done.
    pub fn shutdown(self) {
        drop(self);
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Starts the server on its own thread with its own runtime, serving [`app`] over the
/// store at `db`. It binds before returning, so a taken port is an [`Error::Listen`]
/// here.
pub fn start(db: PathBuf, opts: ServerOptions, events: EventSender) -> Result<ServerHandle> {
    check_options(&opts)?;
    let addr = opts.addr;
    let listener = std::net::TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    let socket = |source| Error::Socket { addr, source };
    let bound = listener.local_addr().map_err(socket)?;
    listener.set_nonblocking(true).map_err(socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("furnace-server")
        .enable_all()
        .build()
        .map_err(|source| Error::Start { what: "runtime", source })?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener).map_err(socket)?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = build(AppState::new(db, events, ServerOptions { addr: bound, ..opts }, stop_rx.clone()));
    let thread = std::thread::Builder::new()
        .name("furnace-server".into())
        .spawn(move || {
            let stopped = |mut rx: watch::Receiver<bool>| async move {
                // An error means the handle is gone: stop as well.
                let _ = rx.wait_for(|down| *down).await;
            };
            let serve = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
            let res = rt.block_on(async {
                tokio::select! {
                    r = serve => r,
                    _ = async { stopped(stop_rx).await; tokio::time::sleep(GRACE).await } => Ok(()),
                }
            });
            if let Err(e) = res {
                eprintln!("furnace server on {bound}: {e}");
            }
            rt.shutdown_timeout(Duration::from_secs(2));
        })
        .map_err(|source| Error::Start { what: "thread", source })?;
    Ok(ServerHandle { addr: bound, stop: stop_tx, thread: Some(thread) })
}
