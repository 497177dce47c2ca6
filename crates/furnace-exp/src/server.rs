//! The experiment HTTP API: JSON views of the store (experiments, runs, metrics, ops),
//! `POST /api/ops` to record control ops, and `GET /api/events`, a server-sent-event
//! stream of the live [`Event`]s.
//!
//! The server runs on its own thread with its own tokio runtime, so it never blocks the
//! training threads; handlers only read the store or record ops (which the trainer
//! applies), so a bad request cannot disturb training. Every error is JSON,
//! `{"error": "..."}`. Bound to a non-loopback address the server needs a token, sent as
//! `Authorization: Bearer <token>` with every request.

use crate::error::{Error, Result};
use crate::events::{Event, EventSender};
use crate::ops;
use crate::store::{OpKind, RunRow, RunStatus, Store};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::{Stream, StreamExt};

/// The port the server listens on by default.
pub const DEFAULT_PORT: u16 = 8851;

/// How long a stopping server waits for open requests before it closes them.
const GRACE: Duration = Duration::from_secs(5);

/// Where and how the server listens.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The address to bind (port 0: any free port).
    pub addr: SocketAddr,
    /// The bearer token every request must carry (required off loopback).
    pub token: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            token: None,
        }
    }
}

/// Checks the options: an address other than loopback needs a (non-empty) token, since
/// anyone who can reach the server could otherwise stop or delete runs.
pub fn check_options(o: &ServerOptions) -> Result<()> {
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

/// The shared state of the handlers.
#[derive(Clone)]
struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store file.
    db: PathBuf,
    /// One connection, opened on first use (dropped after a store error, to reopen).
    store: Mutex<Option<Store>>,
    events: EventSender,
    token: Option<String>,
    /// Turns true when the server stops (ends the event streams).
    shutdown: watch::Receiver<bool>,
}

/// An error answer: a status and `{"error": message}`.
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Invalid(_) | Error::Spec(_) => StatusCode::BAD_REQUEST,
            Error::Store(_) | Error::Io(_) | Error::Train(_) | Error::Model(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// Runs `f` on the store on the blocking pool.
async fn with_store<T, F>(st: &AppState, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T> + Send + 'static,
{
    let inner = st.inner.clone();
    let r = tokio::task::spawn_blocking(move || {
        let mut guard = inner.store.lock().unwrap_or_else(|p| p.into_inner());
        let store = match guard.take() {
            Some(s) => s,
            None => Store::open(&inner.db)?,
        };
        let r = f(&store);
        if !matches!(r, Err(Error::Store(_))) {
            *guard = Some(store);
        }
        r
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        )
    })?;
    Ok(r?)
}

fn parse_id(s: &str) -> ApiResult<i64> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("'{s}' is not a run id (expected a number)")))
}

/// `?all=true` shows deleted runs too.
#[derive(Debug, Default, Deserialize)]
struct ViewQuery {
    #[serde(default)]
    all: bool,
}

/// `?name=loss` picks one metric.
#[derive(Debug, Default, Deserialize)]
struct MetricQuery {
    name: Option<String>,
}

fn query<T>(q: std::result::Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn visible(runs: Vec<RunRow>, all: bool) -> Vec<RunRow> {
    runs.into_iter()
        .filter(|r| all || r.status != RunStatus::Deleted)
        .collect()
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

async fn list_experiments(State(st): State<AppState>) -> ApiResult<Response> {
    let rows = with_store(&st, |s| s.experiments()).await?;
    Ok(Json(rows).into_response())
}

async fn get_experiment(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: std::result::Result<Query<ViewQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let all = query(q)?.all;
    let (exp, runs) = with_store(&st, move |s| {
        let e = s.experiment(&name)?;
        let runs = s.runs(e.id)?;
        Ok((e, runs))
    })
    .await?;
    Ok(Json(serde_json::json!({ "experiment": exp, "runs": visible(runs, all) })).into_response())
}

async fn experiment_runs(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: std::result::Result<Query<ViewQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let all = query(q)?.all;
    let runs = with_store(&st, move |s| s.runs(s.experiment(&name)?.id)).await?;
    Ok(Json(visible(runs, all)).into_response())
}

async fn experiment_ops(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let ops = with_store(&st, move |s| s.ops(s.experiment(&name)?.id)).await?;
    Ok(Json(ops).into_response())
}

async fn get_run(State(st): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let run = with_store(&st, move |s| s.run(id)).await?;
    Ok(Json(run).into_response())
}

async fn run_metrics(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: std::result::Result<Query<MetricQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let name = query(q)?.name;
    let mut rows = with_store(&st, move |s| {
        s.run(id)?;
        s.metrics(id)
    })
    .await?;
    if let Some(n) = name {
        rows.retain(|m| m.name == n);
    }
    Ok(Json(rows).into_response())
}

/// The body of `POST /api/ops`: `{"run": 3, "op": "clone", "set": ["lora.r=64"], "warm": false}`.
#[derive(Debug, Deserialize)]
struct OpRequest {
    run: i64,
    #[serde(flatten)]
    kind: OpKind,
}

async fn post_op(
    State(st): State<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let req: OpRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "bad op request: {e} (expected JSON like {{\"run\": 3, \"op\": \"stop\"}}; op is stop, resume, delete or clone \
             with \"set\": [\"lora.r=64\"] and \"warm\": false)"
        ))
    })?;
    let id = with_store(&st, move |s| ops::submit(s, req.run, &req.kind, "api")).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "op_id": id, "status": "pending" })),
    )
        .into_response())
}

/// One item of an event stream.
enum Item {
    Event(SseEvent),
    Skip,
    End,
}

fn sse_event(ev: &Event) -> Item {
    let Ok(v) = serde_json::to_value(ev) else {
        return Item::Skip;
    };
    let ty = v
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("event")
        .to_string();
    match SseEvent::default().event(ty).json_data(&v) {
        Ok(e) => Item::Event(e),
        Err(_) => Item::Skip,
    }
}

async fn event_stream(
    State(st): State<AppState>,
) -> Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let live = BroadcastStream::new(st.inner.events.subscribe()).map(|r| match r {
        Ok(ev) => sse_event(&ev),
        // A slow client skips what it missed; the stream goes on.
        Err(BroadcastStreamRecvError::Lagged(n)) => {
            Item::Event(SseEvent::default().comment(format!("skipped {n} events")))
        }
    });
    let stop =
        WatchStream::new(st.inner.shutdown.clone())
            .map(|down| if down { Item::End } else { Item::Skip });
    let stream = live
        .merge(stop)
        .take_while(|i| !matches!(i, Item::End))
        .filter_map(|i| match i {
            Item::Event(e) => Some(Ok(e)),
            Item::Skip | Item::End => None,
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn not_found(req: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {} (the API is under /api)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Equal in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.inner.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send Authorization: Bearer <token>".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn build(
    db: PathBuf,
    events: EventSender,
    token: Option<String>,
    shutdown: watch::Receiver<bool>,
) -> Router {
    let state = AppState {
        inner: Arc::new(Inner {
            db,
            store: Mutex::new(None),
            events,
            token,
            shutdown,
        }),
    };
    Router::new()
        .route("/api/health", get(health))
        .route("/api/experiments", get(list_experiments))
        .route("/api/experiments/{name}", get(get_experiment))
        .route("/api/experiments/{name}/runs", get(experiment_runs))
        .route("/api/experiments/{name}/ops", get(experiment_ops))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/metrics", get(run_metrics))
        .route("/api/ops", post(post_op))
        .route("/api/events", get(event_stream))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// The API as a router over the store at `db` (opened on first use), streaming `events`;
/// with a `token`, every request must carry `Authorization: Bearer <token>`.
pub fn router(db: PathBuf, events: EventSender, token: Option<String>) -> Router {
    // No shutdown signal: event streams end when the client goes.
    let (_, rx) = watch::channel(false);
    build(db, events, token, rx)
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
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Starts the server on its own thread with its own runtime. It binds before returning,
/// so a taken port is an [`Error::Io`] here.
pub fn start(db: PathBuf, opts: ServerOptions, events: EventSender) -> Result<ServerHandle> {
    check_options(&opts)?;
    let addr = opts.addr;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        Error::Io(format!(
            "cannot listen on {addr}: {e} (is another furnace server running there? pick another port with --port)"
        ))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Io(format!("listening on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Io(format!("listening on {addr}: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("furnace-server")
        .enable_all()
        .build()
        .map_err(|e| Error::Io(format!("starting the server runtime: {e}")))?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::Io(format!("listening on {addr}: {e}")))?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = build(db, events, opts.token, stop_rx.clone());
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
        .map_err(|e| Error::Io(format!("starting the server thread: {e}")))?;
    Ok(ServerHandle {
        addr: bound,
        stop: stop_tx,
        thread: Some(thread),
    })
}
