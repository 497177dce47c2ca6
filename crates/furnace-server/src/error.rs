//! Errors: the crate's [`Error`] (starting a server), and [`ApiError`], the JSON answer
//! every failed request gets: a status and `{"error": "..."}`.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad options: no token off loopback, an empty token.
    #[error("{0}")]
    Invalid(String),
    /// The token file cannot be read.
    #[error("--token-file {}: {source}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The address cannot be bound (taken, not ours, not allowed).
    #[error("cannot listen on {addr}: {source} (is another furnace server running there? pick another port with --port)")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The bound socket could not be set up for serving.
    #[error("listening on {addr}: {source}")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server's runtime or thread could not start.
    #[error("starting the server {what}: {source}")]
    Start {
        /// `runtime` or `thread`.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
}

/// The status of a failed store call: something that does not exist (404), the client's
/// mistake (400), something it may not do (403), or ours (500).
impl From<furnace_exp::Error> for ApiError {
    fn from(e: furnace_exp::Error) -> Self {
        use furnace_exp::Error as E;
        let status = match &e {
            E::ExperimentNotFound { .. }
            | E::ExperimentIdNotFound { .. }
            | E::NoExperiments
            | E::RunNotFound { .. }
            | E::RunNotInExperiment { .. }
            | E::OpNotFound { .. }
            | E::ConversationNotFound { .. } => StatusCode::NOT_FOUND,
            E::Forbidden(_) => StatusCode::FORBIDDEN,
            E::Invalid(_) | E::Spec(_) | E::NoRuns { .. } | E::Busy { .. } | E::Load { .. } | E::NoChatTemplate { .. } | E::Data(_) => {
                StatusCode::BAD_REQUEST
            }
            E::Sqlite(_)
            | E::StoredConfig { .. }
            | E::StoredOp { .. }
            | E::StoredStatus { .. }
            | E::Encode { .. }
            | E::Io { .. }
            | E::Thread(_)
            | E::Panicked
            | E::Internal(_)
            | E::Train(_)
            | E::Model(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// What handlers return.
pub(crate) type ApiResult<T> = std::result::Result<T, ApiError>;

/// The answer to a path no router has.
pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no route {} {} (the API is under /api)", req.method(), req.uri().path()))
}

/// The answer to a known path with a method it does not take.
pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", req.method(), req.uri().path()))
}
