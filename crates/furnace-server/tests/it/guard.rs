//! The guard around the whole app: what a web page the user visits can send to a server
//! on loopback (a `text/plain` POST, a foreign `Host` by DNS rebinding, a foreign
//! `Origin`) is refused and changes nothing; huge values and bodies are 4xx; every answer
//! carries the security headers. In-process and over real sockets.

use crate::loopback::{exchange, http, loopback};
use crate::{call, call_with, error_of, fixture, ADDR};
use axum::http::{HeaderMap, StatusCode};
use furnace_exp::events;
use furnace_server::BODY_LIMIT;

const SECURITY_HEADERS: [(&str, &str); 4] =
    [("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer"), ("cache-control", "no-store")];

fn assert_secure(h: &HeaderMap, what: &str) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(h.get(name).and_then(|v| v.to_str().ok()), Some(value), "{name} on {what}: {h:?}");
    }
}

/// The same check on a raw (lowercased) response head.
fn assert_secure_head(head: &str, what: &str) {
    for (name, value) in SECURITY_HEADERS {
        assert!(head.contains(&format!("{name}: {}", value.to_ascii_lowercase())), "{name} on {what}: {head}");
    }
}

fn h(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

#[tokio::test]
async fn posts_must_be_json() {
    let f = fixture();
    let app = f.router(None);
    let delete = format!(r#"{{"run": {}, "op": "delete"}}"#, f.runs[0]);

    for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data; boundary=x"), None] {
        let mut headers = h(&[("host", ADDR)]);
        if let Some(ct) = ct {
            headers.push(("content-type", ct.into()));
        }
        let (s, head, v) = call_with(&app, "POST", "/api/ops", &headers, Some(delete.clone().into_bytes())).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}: {v}");
        assert!(error_of(&v).contains("Content-Type: application/json"), "{v}");
        assert_secure(&head, "a 415");
    }
    // Unknown routes too: the guard is around the whole app.
    let (s, _, _) = call_with(&app, "POST", "/api/nothing", &h(&[("host", ADDR), ("content-type", "text/plain")]), None).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(f.store().ops(f.exp.id).unwrap().is_empty(), "a refused op is not recorded");
    assert_eq!(f.store().run(f.runs[0]).unwrap().status, furnace_exp::RunStatus::New);

    // JSON with parameters, in any case, is JSON.
    for (ct, run) in [("application/json; charset=utf-8", f.runs[0]), ("Application/JSON", f.runs[1])] {
        let body = format!(r#"{{"run": {run}, "op": "stop"}}"#).into_bytes();
        let (s, _, v) = call_with(&app, "POST", "/api/ops", &h(&[("host", ADDR), ("content-type", ct)]), Some(body)).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{ct}: {v}");
    }
    assert_eq!(f.store().ops(f.exp.id).unwrap().len(), 2);
}

#[tokio::test]
async fn a_foreign_host_is_misdirected() {
    let f = fixture();
    let app = f.router(None);
    let stop = format!(r#"{{"run": {}, "op": "stop"}}"#, f.runs[0]);

    for host in ["evil.example:8851", "evil.example", "localhost:9999", "127.0.0.1", "localhost.evil.example:8851", "10.0.0.1:8851"] {
        let (s, head, v) = call_with(&app, "GET", "/api/experiments", &h(&[("host", host)]), None).await;
        assert_eq!(s, StatusCode::MISDIRECTED_REQUEST, "GET with Host {host}: {v}");
        assert!(error_of(&v).contains("localhost, 127.0.0.1, [::1] on port 8851"), "{v}");
        assert_secure(&head, "a 421");
        let (s, _, v) = call_with(
            &app,
            "POST",
            "/api/ops",
            &h(&[("host", host), ("content-type", "application/json")]),
            Some(stop.clone().into_bytes()),
        )
        .await;
        assert_eq!(s, StatusCode::MISDIRECTED_REQUEST, "POST with Host {host}: {v}");
    }
    // An absolute request target names the host too.
    let (s, _, _) = call_with(&app, "GET", "http://evil.example:8851/api/experiments", &h(&[("host", ADDR)]), None).await;
    assert_eq!(s, StatusCode::MISDIRECTED_REQUEST);
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());

    let (s, _, v) = call_with(&app, "GET", "/api/experiments", &[], None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "no Host: {v}");
    assert!(error_of(&v).contains("Host"), "{v}");

    for host in ["localhost:8851", "LOCALHOST:8851", "127.0.0.1:8851", "[::1]:8851"] {
        let (s, _, v) = call_with(&app, "GET", "/api/experiments", &h(&[("host", host)]), None).await;
        assert_eq!(s, StatusCode::OK, "{host}: {v}");
    }
}

#[tokio::test]
async fn a_foreign_origin_is_forbidden() {
    let f = fixture();
    let app = f.router(None);
    let stop = format!(r#"{{"run": {}, "op": "stop"}}"#, f.runs[0]);
    let post = |origin: &str| h(&[("host", ADDR), ("content-type", "application/json"), ("origin", origin)]);

    for origin in [
        "http://evil.example",
        "http://evil.example:8851",
        "https://127.0.0.1:8851",
        "http://127.0.0.1:9999",
        "null",
        "http://127.0.0.1:8851/x",
    ] {
        let (s, head, v) = call_with(&app, "POST", "/api/ops", &post(origin), Some(stop.clone().into_bytes())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{origin}: {v}");
        assert!(error_of(&v).contains("cross-origin"), "{v}");
        assert_secure(&head, "a 403");
        let (s, _, _) = call_with(&app, "GET", "/api/experiments", &h(&[("host", ADDR), ("origin", origin)]), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "GET from {origin}");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty(), "a cross-origin op is not recorded");

    // The server's own origin, under any of its names, is accepted.
    let (s, _, v) = call_with(&app, "POST", "/api/ops", &post("http://127.0.0.1:8851"), Some(stop.clone().into_bytes())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for origin in ["http://localhost:8851", "http://[::1]:8851"] {
        let (s, _, v) = call_with(&app, "GET", "/api/experiments", &h(&[("host", ADDR), ("origin", origin)]), None).await;
        assert_eq!(s, StatusCode::OK, "{origin}: {v}");
    }
    assert_eq!(f.store().ops(f.exp.id).unwrap().len(), 1);
}

#[tokio::test]
async fn huge_values_are_4xx() {
    let f = fixture();
    let app = f.router(None);
    for body in [
        r#"{"run": 1e30, "op": "stop"}"#.to_string(),
        r#"{"run": 100000000000000000000000000000, "op": "stop"}"#.to_string(),
        r#"{"run": -1e308, "op": "stop"}"#.to_string(),
        format!(r#"{{"run": 1, "op": "clone", "set": ["{}"]}}"#, "x".repeat(BODY_LIMIT / 2)),
    ] {
        let (s, v) = call(&app, "POST", "/api/ops", None, Some(&body)).await;
        assert!(s.is_client_error(), "{}: {s} {v}", body.chars().take(40).collect::<String>());
        error_of(&v);
    }
    for uri in ["/api/runs/1000000000000000000000000000000", "/api/runs/1e30/metrics", "/api/runs/-9223372036854775809"] {
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {v}");
    }

    // A body over the limit (1 MiB; 10 MB, and just over the limit) is a 413.
    assert_eq!(BODY_LIMIT, 1 << 20);
    for size in [10 << 20, BODY_LIMIT + 1] {
        let mut big = format!(r#"{{"run": {}, "op": "clone", "set": [""#, f.runs[0]).into_bytes();
        big.resize(size - 3, b'x');
        big.extend_from_slice(br#""]}"#);
        let (s, head, v) =
            call_with(&app, "POST", "/api/ops", &h(&[("host", ADDR), ("content-type", "application/json")]), Some(big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{size} bytes: {v}");
        error_of(&v);
        assert_secure(&head, "a 413");
    }
    assert!(f.store().ops(f.exp.id).unwrap().is_empty());
    // Still serving.
    let (s, _) = call(&app, "GET", "/api/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn security_headers_on_every_answer() {
    let f = fixture();
    let app = f.router(Some("tok"));
    let auth = |t: &str| h(&[("host", ADDR), ("authorization", &format!("Bearer {t}"))]);
    for (uri, headers, want) in [
        ("/api/experiments", auth("tok"), StatusCode::OK),
        ("/api/nothing", auth("tok"), StatusCode::NOT_FOUND),
        ("/api/runs/abc", auth("tok"), StatusCode::BAD_REQUEST),
        ("/api/experiments", auth("wrong"), StatusCode::UNAUTHORIZED),
    ] {
        let (s, head, v) = call_with(&app, "GET", uri, &headers, None).await;
        assert_eq!(s, want, "{uri}: {v}");
        assert_secure(&head, &format!("a {s} for {uri}"));
    }
    let (s, head, _) = call_with(&app, "POST", "/api/ops", &auth("tok"), Some(b"{}".to_vec())).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_secure(&head, "a 415");
    let (s, head, _) = call_with(&app, "GET", "/api/ops", &auth("tok"), None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_secure(&head, "a 405");
}

#[test]
fn over_loopback_web_page_requests_are_refused() {
    let f = fixture();
    let h = furnace_server::start(f.db.clone(), loopback(), events::channel()).unwrap();
    let addr = h.addr;
    let host = format!("Host: {addr}\r\n");
    let delete = format!(r#"{{"run": {}, "op": "delete"}}"#, f.runs[0]);

    // What a form or fetch() without a preflight sends.
    let (s, head, v) = exchange(addr, "POST", "/api/ops", &format!("{host}Content-Type: text/plain;charset=UTF-8\r\n"), &delete);
    assert_eq!(s, 415, "{v}");
    assert!(error_of(&v).contains("application/json"), "{v}");
    assert_secure_head(&head, "a 415");

    // DNS rebinding: the page's own host name, resolving to 127.0.0.1.
    let rebound = format!("Host: evil.example:{}\r\n", addr.port());
    let (s, _, v) = exchange(addr, "GET", "/api/experiments", &rebound, "");
    assert_eq!(s, 421, "{v}");
    let (s, _, _) = exchange(addr, "GET", "/api/events", &rebound, "");
    assert_eq!(s, 421);
    let (s, _, v) = exchange(addr, "POST", "/api/ops", &format!("{rebound}Content-Type: application/json\r\n"), &delete);
    assert_eq!(s, 421, "{v}");

    // A page elsewhere that got through the content type (it cannot without CORS, but
    // the Origin is refused on its own).
    let json = format!("{host}Content-Type: application/json\r\n");
    let (s, _, v) = exchange(addr, "POST", "/api/ops", &format!("{json}Origin: http://evil.example\r\n"), &delete);
    assert_eq!(s, 403, "{v}");
    assert!(f.store().ops(f.exp.id).unwrap().is_empty(), "no refused op is recorded");

    // The server's own pages and plain clients go through.
    let (s, _, v) = exchange(addr, "POST", "/api/ops", &format!("{json}Origin: http://{addr}\r\n"), &delete);
    assert_eq!(s, 202, "{v}");
    let (s, _, v) = exchange(addr, "GET", "/api/experiments", &format!("Host: localhost:{}\r\n", addr.port()), "");
    assert_eq!(s, 200, "{v}");
    assert_eq!(f.store().ops(f.exp.id).unwrap().len(), 1);

    // An unknown field names itself; a huge run id is a 400.
    let (s, v) = http(addr, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {}, "op": "clone", "sets": ["lora.r=8"]}}"#, f.runs[1])));
    assert_eq!(s, 400);
    assert!(error_of(&v).contains("sets"), "{v}");
    let (s, _) = http(addr, "POST", "/api/ops", None, Some(r#"{"run": 1e30, "op": "stop"}"#));
    assert_eq!(s, 400);
    assert_eq!(f.store().ops(f.exp.id).unwrap().len(), 1);

    // Security headers on a 200 and a 404.
    let (s, head, _) = exchange(addr, "GET", "/api/experiments", &host, "");
    assert_eq!(s, 200);
    assert_secure_head(&head, "a 200");
    let (s, head, _) = exchange(addr, "GET", "/api/nothing", &host, "");
    assert_eq!(s, 404);
    assert_secure_head(&head, "a 404");
    h.shutdown();
}
