//! The dashboard's web app: one page and its script, styles and plotting code, embedded
//! in the binary (no Node, no CDN, nothing fetched at run time). The page draws from the
//! JSON routes (`experiments`, `dashboard`) and the live event stream.
//!
//! Every file is answered with a Content-Security-Policy that allows only this server's
//! own scripts, styles and connections (no inline script, no framing).

use crate::state::AppState;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The files of the app: (name under `/ui/`, content type, bytes).
const FILES: [(&str, &str, &str); 3] = [
    ("app.js", "text/javascript; charset=utf-8", include_str!("../ui/app.js")),
    ("plot.js", "text/javascript; charset=utf-8", include_str!("../ui/plot.js")),
    ("app.css", "text/css; charset=utf-8", include_str!("../ui/app.css")),
];

const INDEX: &str = include_str!("../ui/index.html");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes of this module.
pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/ui/{file}", get(file))
}

fn answer(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    resp
}

async fn index() -> Response {
    answer("text/html; charset=utf-8", INDEX)
}

async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, body)) => answer(ct, body),
        None => crate::error::ApiError(StatusCode::NOT_FOUND, format!("no dashboard file /ui/{name}")).into_response(),
    }
}
