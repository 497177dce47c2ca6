//! The state every handler shares: the store (one connection, used on the blocking pool),
//! the live event channel, the token, the hosts the server answers to, and the server's
//! stop signal.

use crate::auth::Token;
use crate::error::{ApiError, ApiResult};
use crate::guard::Hosts;
use crate::{Launcher, ServerOptions};
use axum::http::StatusCode;
use furnace_exp::{EventSender, Store};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The shared state of the handlers (cheap to clone).
#[derive(Clone)]
pub(crate) struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store file.
    db: PathBuf,
    /// One connection, opened on first use (dropped after a store error, to reopen).
    store: Mutex<Option<Store>>,
    events: EventSender,
    token: Option<Token>,
    hosts: Hosts,
    /// Clones may change `model.base` to a path (`ServerOptions::allow_model_paths`).
    allow_model_paths: bool,
    /// Starts experiments the dashboard creates.
    launcher: Option<Arc<dyn Launcher>>,
    /// The dashboard's login sessions (random ids given as an HttpOnly cookie).
    sessions: Mutex<HashSet<String>>,
    /// The playground's engines (loaded on first use).
    playground: Arc<crate::playground::Playground>,
    /// Turns true when the server stops (ends the event streams).
    shutdown: watch::Receiver<bool>,
    /// What `furnace serve` serves on `/v1/...`.
    serving: Option<Arc<crate::openai::Serving>>,
}

impl AppState {
    /// State over the store at `db` (opened on first use), for a server bound to
    /// `opts.addr`.
    pub fn new(db: PathBuf, events: EventSender, opts: ServerOptions, shutdown: watch::Receiver<bool>) -> Self {
        let hosts = Hosts::new(opts.addr, opts.token.is_some()).with_cors(opts.cors_origins.clone());
        let token = opts.token.map(Token::new);
        let (allow_model_paths, launcher, serving) = (opts.allow_model_paths, opts.launcher, opts.serving);
        let sessions = Mutex::new(HashSet::new());
        let playground = Arc::default();
        Self {
            inner: Arc::new(Inner {
                db,
                store: Mutex::new(None),
                events,
                token,
                hosts,
                allow_model_paths,
                launcher,
                sessions,
                playground,
                shutdown,
                serving,
            }),
        }
    }

    /// The playground's engines.
    pub fn playground(&self) -> Arc<crate::playground::Playground> {
        self.inner.playground.clone()
    }

    /// What `furnace serve` serves, if anything.
    pub fn serving(&self) -> Option<Arc<crate::openai::Serving>> {
        self.inner.serving.clone()
    }

    /// What starts experiments the dashboard creates, if anything.
    pub fn launcher(&self) -> Option<Arc<dyn Launcher>> {
        self.inner.launcher.clone()
    }

    /// Remembers a login session.
    pub fn add_session(&self, id: String) {
        self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }

    /// Forgets a login session.
    pub fn remove_session(&self, id: &str) {
        self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Whether `id` is a live login session (compared in constant time with each).
    pub fn has_session(&self, id: &str) -> bool {
        let sessions = self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.iter().fold(false, |found, s| found | crate::auth::Token::new(s.clone()).matches(id))
    }

    /// Whether clones may change `model.base` to a path.
    pub fn allow_model_paths(&self) -> bool {
        self.inner.allow_model_paths
    }

    /// The token requests must carry, if any.
    pub fn token(&self) -> Option<&Token> {
        self.inner.token.as_ref()
    }

    /// The hosts the server answers to.
    pub fn hosts(&self) -> &Hosts {
        &self.inner.hosts
    }

    /// The live events.
    pub fn events(&self) -> &EventSender {
        &self.inner.events
    }

    /// Turns true when the server stops.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// Runs `f` on the store on the blocking pool. An SQLite error drops the connection,
    /// so the next request opens a fresh one.
    pub async fn with_store<T, F>(&self, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> furnace_exp::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut guard = inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let store = match guard.take() {
                Some(s) => s,
                None => Store::open(&inner.db)?,
            };
            let r = f(&store);
            if !matches!(r, Err(furnace_exp::Error::Sqlite(_))) {
                *guard = Some(store);
            }
            r
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("request failed: {e}")))?;
        Ok(r?)
    }
}
