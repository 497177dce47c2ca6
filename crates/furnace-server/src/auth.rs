//! Bearer-token auth: with a token set (required off loopback, see
//! [`check_options`](crate::check_options)), every request — unknown routes too — must
//! carry `Authorization: Bearer <token>`, compared in constant time. The token itself is
//! never shown: not in a `Debug` output, an error, a log line or an event.
//!
//! [`resolve_token`] picks the token from where a command line can give it.
//!
//! The dashboard logs in instead: `POST /api/login {"token": ...}` exchanges the token
//! for a random session id in an `HttpOnly; SameSite=Strict` cookie (never a token in a
//! URL or in script-readable storage), which then stands for the token;
//! `POST /api/logout` ends the session. The pages and their scripts (`/`, `/ui/...`)
//! hold no data and load without a token. A cross-site page cannot use the cookie: the
//! cookie is not sent cross-site, and every `POST` needs `Content-Type: application/json`
//! and a same-origin `Origin` (the guard).

use crate::error::{ApiError, Error, Result};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::path::Path;
use subtle::ConstantTimeEq;

/// The environment variable [`resolve_token`] reads the token from.
pub const TOKEN_ENV: &str = "FURNACE_TOKEN";

/// The token the server requires: its `Debug` output never shows it.
#[derive(Clone)]
pub(crate) struct Token(String);

impl Token {
    pub fn new(token: String) -> Self {
        Self(token)
    }

    /// Whether `given` is the token; the time taken does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(given.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The token, by precedence: the `--token` value, the contents of the `--token-file`
/// (surrounding whitespace, the trailing newline included, dropped), then the value of
/// [`TOKEN_ENV`] (`env`, as read by the caller). `None` when none is given; an empty token,
/// from wherever, is an [`Error::Invalid`], and a file that cannot be read an
/// [`Error::TokenFile`]. No error shows the token.
pub fn resolve_token(flag: Option<String>, file: Option<&Path>, env: Option<String>) -> Result<Option<String>> {
    if let Some(t) = flag {
        if t.trim().is_empty() {
            return Err(Error::Invalid("--token must not be empty".into()));
        }
        return Ok(Some(t));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| Error::TokenFile { path: path.to_path_buf(), source })?;
        let t = text.trim();
        if t.is_empty() {
            return Err(Error::Invalid(format!("--token-file {}: the file holds no token (it is empty)", path.display())));
        }
        return Ok(Some(t.to_string()));
    }
    match env {
        Some(t) if t.trim().is_empty() => Err(Error::Invalid(format!("{TOKEN_ENV} is set but empty: set it to the token or unset it"))),
        t => Ok(t),
    }
}

/// The cookie that carries a dashboard session.
const SESSION_COOKIE: &str = "furnace_session";

/// The session id a request's cookie names, if any.
fn session_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim())
}

/// Routes anyone may reach: the dashboard's pages and scripts (no data in them) and the
/// login.
fn public(req: &Request) -> bool {
    let path = req.uri().path();
    (req.method() == Method::GET && (path == "/" || path.starts_with("/ui/"))) || (req.method() == Method::POST && path == "/api/login")
}

/// The middleware in front of the whole app: 401 with a JSON error unless the request
/// carries the token, or a dashboard session's cookie (when a token is set), or goes to
/// a public route.
pub(crate) async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = st.token() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let session = session_of(req.headers()).is_some_and(|s| st.has_session(s));
        if !given.is_some_and(|g| token.matches(g)) && !session && !public(&req) {
            return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong token: send Authorization: Bearer <token>, or log in".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// The login routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/login", post(login)).route("/api/logout", post(logout))
}

/// `{"token": "..."}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// A new random session id: 32 bytes from the OS, as hex.
fn new_session() -> std::result::Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("no randomness for a session: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn login(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let body = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
        let req: Login = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad login: {e} (expected {{\"token\": \"...\"}})")))?;
        let Some(token) = st.token() else {
            return Ok(Json(serde_json::json!({ "ok": true, "token_required": false })).into_response());
        };
        if !token.matches(req.token.trim()) {
            return Err(ApiError(StatusCode::UNAUTHORIZED, "wrong token".into()));
        }
        let id = new_session()?;
        st.add_session(id.clone());
        let cookie = format!("{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/");
        let mut resp = Json(serde_json::json!({ "ok": true, "token_required": true })).into_response();
        let value = HeaderValue::from_str(&cookie).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        resp.headers_mut().insert(header::SET_COOKIE, value);
        Ok(resp)
    })();
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(s) = session_of(&headers) {
        st.remove_session(s);
    }
    let mut resp = Json(serde_json::json!({ "ok": true })).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static("furnace_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"));
    resp
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn token_matches_whole_strings_only() {
        let t = Token::new("tok".into());
        assert!(t.matches("tok"));
        assert!(!t.matches("toK"));
        assert!(!t.matches("to"));
        assert!(!t.matches("tokk"));
        assert!(!t.matches(""));
        assert!(Token::new(String::new()).matches(""));
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = Token::new("s3cret-value".into());
        assert_eq!(format!("{t:?}"), "<redacted>");
        assert!(!format!("{:?}", Some(t)).contains("s3cret"));
    }
}
