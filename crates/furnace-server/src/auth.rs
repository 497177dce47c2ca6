//! Bearer-token auth: with a token set (required off loopback, see
//! [`check_options`](crate::check_options)), every request — unknown routes too — must
//! carry `Authorization: Bearer <token>`.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Equal in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong token: send Authorization: Bearer <token>".into()).into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn same_compares_whole_strings() {
        assert!(same(b"tok", b"tok"));
        assert!(!same(b"tok", b"toK"));
        assert!(!same(b"tok", b"to"));
        assert!(!same(b"", b"t"));
        assert!(same(b"", b""));
    }
}
