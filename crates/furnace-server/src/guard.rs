//! The guard in front of the whole app (every router, the fallbacks, auth): it keeps web
//! pages the user visits away from a server on loopback, which has no token by default.
//!
//! - **Host** (DNS rebinding): the `Host` header, and the authority of an absolute request
//!   target, must name this server: `localhost`, `127.0.0.1`, `[::1]` or the bound address
//!   itself (`127.0.0.2`, or `10.0.0.5` off loopback, which needs a token), each with the
//!   bound port (no port means 80). Bound to an unspecified address (`0.0.0.0`, `::`,
//!   with a token, the only guard there) any host with that port is accepted. Otherwise
//!   421 Misdirected Request; no `Host` at all is a 400. (An IP literal cannot be
//!   rebound: a page whose host is the server's own address is served by the server.)
//! - **Origin** (cross-site requests): a request that carries `Origin` must come from the
//!   server's own origin, `http://` and an authority the Host rule accepts, or be one of the
//!   origins given with `--cors-origin` (which get CORS headers, and their preflights a
//!   204); otherwise 403 (`Origin: null` included). No CORS headers otherwise.
//! - **Content-Type** (requests a page can send without a CORS preflight): every `POST`,
//!   `PUT` and `PATCH` must say `Content-Type: application/json` (parameters such as
//!   `charset` allowed); otherwise 415. The one exception: `POST /v1/documents` (document
//!   uploads of `furnace serve`) may be `multipart/form-data`; the Origin rule still holds.
//!
//! Every answer, errors included, carries `X-Content-Type-Options: nosniff`,
//! `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer` and `Cache-Control: no-store`.
//! The errors are JSON like every other (`{"error": "..."}`).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};

/// The loopback names every server answers to.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// Which authorities (`host[:port]`) name this server, in `Host` and `Origin`.
#[derive(Debug, Clone)]
pub(crate) struct Hosts {
    port: u16,
    /// The bound address as a host (`10.0.0.5`, `[fe80::1]`), accepted next to the
    /// loopback names (`None` when it is one of them, or unspecified).
    own: Option<String>,
    /// Bound to an unspecified address with a token: any host name (the port still counts).
    any: bool,
    /// Other origins allowed to call the server from a browser (`--cors-origin`), exact.
    cors: Vec<String>,
}

impl Hosts {
    /// The hosts of a server bound to `addr` (its real port), with or without a token.
    pub fn new(addr: SocketAddr, token: bool) -> Self {
        let ip = addr.ip();
        let host = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let own = (!ip.is_unspecified() && !LOOPBACK_NAMES.contains(&host.as_str())).then_some(host);
        Self { port: addr.port(), own, any: token && ip.is_unspecified(), cors: Vec::new() }
    }

    /// Also allows these origins (`https://app.example.com`), with CORS headers.
    pub fn with_cors(mut self, origins: Vec<String>) -> Self {
        self.cors = origins.into_iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect();
        self
    }

    /// Whether `origin` is one of the `--cors-origin`s.
    fn cors_allows(&self, origin: &str) -> bool {
        let o = origin.trim_end_matches('/').to_ascii_lowercase();
        self.cors.contains(&o)
    }

    /// Whether `authority` names this server.
    fn allows(&self, authority: &str) -> bool {
        let Ok(a) = authority.parse::<Authority>() else {
            return false;
        };
        if a.as_str().contains('@') || a.as_str().ends_with(':') || a.port_u16().unwrap_or(80) != self.port {
            return false;
        }
        let host = a.host();
        self.any
            || LOOPBACK_NAMES.iter().any(|n| host.eq_ignore_ascii_case(n))
            || self.own.as_deref().is_some_and(|o| host.eq_ignore_ascii_case(o))
    }

    /// What the 421 says this server answers to.
    fn describe(&self) -> String {
        let mut names: Vec<&str> = LOOPBACK_NAMES.to_vec();
        if let Some(o) = &self.own {
            names.push(o);
        }
        format!("{} on port {}", names.join(", "), self.port)
    }
}

/// A header's value as text (`None` when absent; not text is a 400).
fn text(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, ApiError> {
    headers.get(&name).map(|v| v.to_str().map_err(|_| ApiError::bad_request(format!("the {name} header is not text")))).transpose()
}

/// Why `req` may not reach the app, if it may not.
fn check(hosts: &Hosts, req: &Request) -> Result<(), ApiError> {
    let headers = req.headers();
    let misdirected = |given: &str| {
        ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server answers to {} (the request named {given:?}; open it as http://localhost:{})",
                hosts.describe(),
                hosts.port
            ),
        )
    };
    let Some(host) = text(headers, header::HOST)? else {
        return Err(ApiError::bad_request("the request has no Host header"));
    };
    if !hosts.allows(host) {
        return Err(misdirected(host));
    }
    if let Some(a) = req.uri().authority() {
        if !hosts.allows(a.as_str()) {
            return Err(misdirected(a.as_str()));
        }
    }
    if let Some(origin) = text(headers, header::ORIGIN)? {
        if !origin.strip_prefix("http://").is_some_and(|a| hosts.allows(a)) && !hosts.cors_allows(origin) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("cross-origin request refused: Origin {origin:?} is not this server (http://{host})"),
            ));
        }
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        let ct = text(headers, header::CONTENT_TYPE)?;
        let media = ct.and_then(|c| c.split(';').next()).map(str::trim);
        let json = media.is_some_and(|m| m.eq_ignore_ascii_case("application/json"));
        // Document uploads (`furnace serve`) may be forms; a page elsewhere cannot send one
        // here without an `Origin`, which the rule above refuses.
        let upload = *req.method() == Method::POST
            && req.uri().path() == "/v1/documents"
            && media.is_some_and(|m| m.eq_ignore_ascii_case("multipart/form-data"));
        if !json && !upload {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{} {} needs Content-Type: application/json (got {})",
                    req.method(),
                    req.uri().path(),
                    ct.map(|c| format!("{c:?}")).unwrap_or_else(|| "none".into())
                ),
            ));
        }
    }
    Ok(())
}

/// The security headers every answer carries.
fn secure(headers: &mut HeaderMap) {
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

/// The middleware around the whole app: the Host, Origin and Content-Type checks, then
/// the security headers on whatever the answer is.
pub(crate) async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // An origin allowed by `--cors-origin` gets CORS headers, and its preflights an answer
    // here (they carry no token).
    let cors = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| st.hosts().cors_allows(o))
        .and_then(|o| HeaderValue::from_str(o).ok());
    let preflight = cors.is_some() && *req.method() == Method::OPTIONS;
    let mut resp = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        r
    } else {
        match check(st.hosts(), &req) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        }
    };
    if let Some(origin) = cors {
        resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    secure(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::Hosts;

    #[test]
    fn loopback_hosts_with_the_port_only() {
        let h = Hosts::new("127.0.0.1:8851".parse().unwrap(), false);
        for ok in ["localhost:8851", "LocalHost:8851", "127.0.0.1:8851", "[::1]:8851"] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:8851",
            "localhost:8852",
            "localhost",
            "localhost:",
            "127.0.0.2:8851",
            "user@localhost:8851",
            "localhost.evil.example:8851",
            "localhost:8851/x",
            "",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        // No port means 80.
        assert!(Hosts::new("127.0.0.1:80".parse().unwrap(), false).allows("localhost"));
    }

    #[test]
    fn its_own_address_too() {
        let h = Hosts::new("10.1.2.3:8851".parse().unwrap(), true);
        assert!(h.allows("10.1.2.3:8851") && h.allows("localhost:8851"));
        assert!(!h.allows("10.1.2.4:8851") && !h.allows("10.1.2.3:1") && !h.allows("evil.example:8851"));
        assert_eq!(h.describe(), "localhost, 127.0.0.1, [::1], 10.1.2.3 on port 8851");
        let h = Hosts::new("[fe80::1]:8851".parse().unwrap(), true);
        assert!(h.allows("[fe80::1]:8851") && !h.allows("[fe80::2]:8851"));
        let h = Hosts::new("127.0.0.2:8851".parse().unwrap(), false);
        assert!(h.allows("127.0.0.2:8851") && h.allows("localhost:8851") && !h.allows("127.0.0.3:8851"));
        assert_eq!(Hosts::new("[::1]:8851".parse().unwrap(), false).describe(), "localhost, 127.0.0.1, [::1] on port 8851");
        // Unspecified: the token is the guard, any host on the port; without one (only an
        // in-process app can be), the loopback names.
        let h = Hosts::new("0.0.0.0:8851".parse().unwrap(), true);
        assert!(h.allows("myhost.lan:8851") && !h.allows("myhost.lan:9000"));
        let h = Hosts::new("[::]:8851".parse().unwrap(), false);
        assert!(h.allows("localhost:8851") && !h.allows("myhost.lan:8851") && !h.allows("[::]:8851"));
    }
}
