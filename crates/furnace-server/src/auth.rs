//! Bearer-token auth: with a token set (required off loopback, see
//! [`check_options`](crate::check_options)), every request — unknown routes too — must
//! carry `Authorization: Bearer <token>`, compared in constant time. The token itself is
//! never shown: not in a `Debug` output, an error, a log line or an event.
//!
//! [`resolve_token`] picks the token from where a command line can give it.

use crate::error::{ApiError, Error, Result};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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

/// The middleware in front of the whole app: 401 with a JSON error unless the request
/// carries the token (when one is set).
pub(crate) async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = st.token() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        if !given.is_some_and(|g| token.matches(g)) {
            return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong token: send Authorization: Bearer <token>".into()).into_response();
        }
    }
    next.run(req).await
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
