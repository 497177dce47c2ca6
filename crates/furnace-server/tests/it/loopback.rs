//! A real server over loopback: raw HTTP/1.1 exchanges, stopping, a taken port.

use crate::{error_of, fixture, ids};
use furnace_exp::events;
use furnace_exp::OpKind;
use furnace_server::{Error, ServerOptions};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("bad chunk");
        let n = usize::from_str_radix(size.trim(), 16).expect("bad chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
}

/// One raw HTTP/1.1 exchange: the status and the body as JSON.
pub fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut head = format!("Host: {addr}\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("Content-Type: application/json\r\n");
    let (status, _, v) = exchange(addr, method, path, &head, body.unwrap_or(""));
    (status, v)
}

/// One raw HTTP/1.1 exchange with exactly the header lines `head` (each ending in
/// `\r\n`; `Connection` and `Content-Length` are added): the status, the response head
/// (lowercased) and the body as JSON.
pub fn exchange(addr: SocketAddr, method: &str, path: &str, head: &str, body: &str) -> (u16, String, Value) {
    let mut s = connect(addr);
    let req = format!("{method} {path} HTTP/1.1\r\n{head}Connection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("bad response {resp:?}"));
    let head = head.to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
    (status, head, v)
}

pub fn loopback() -> ServerOptions {
    ServerOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        token: None,
        allow_model_paths: false,
        launcher: None,
        serving: None,
        cors_origins: Vec::new(),
    }
}

#[test]
fn loopback_serves_json_and_records_ops() {
    let f = fixture();
    let h = furnace_server::start(f.db.clone(), loopback(), events::channel()).unwrap();
    assert!(h.addr.ip().is_loopback());
    assert_ne!(h.addr.port(), 0, "the real port is reported");

    let (s, v) = http(h.addr, "GET", "/api/experiments", None, None);
    assert_eq!(s, 200);
    assert_eq!(v[0]["name"], "exp");
    let (s, v) = http(h.addr, "GET", "/api/experiments/exp/runs", None, None);
    assert_eq!(s, 200);
    assert_eq!(ids(&v), f.runs[..2].to_vec());

    let (s, v) = http(h.addr, "POST", "/api/ops", None, Some(&format!(r#"{{"run": {}, "op": "stop"}}"#, f.runs[1])));
    assert_eq!(s, 202, "{v}");
    let op = f.store().op(v["op_id"].as_i64().unwrap()).unwrap();
    assert_eq!((op.run_id, op.kind, op.status.as_str()), (f.runs[1], OpKind::Stop, "pending"));

    let (s, v) = http(h.addr, "POST", "/api/ops", None, Some("{"));
    assert_eq!(s, 400);
    error_of(&v);
    let (s, v) = http(h.addr, "GET", "/api/runs/abc", None, None);
    assert_eq!(s, 400);
    error_of(&v);

    let addr = h.addr;
    h.shutdown();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(), "stopped server still accepts");
}

#[test]
fn start_on_a_taken_port_is_an_io_error_naming_it() {
    let f = fixture();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    match furnace_server::start(
        f.db.clone(),
        ServerOptions { addr, token: None, allow_model_paths: false, launcher: None, serving: None, cors_origins: Vec::new() },
        events::channel(),
    ) {
        Err(e @ Error::Listen { .. }) => {
            let m = e.to_string();
            assert!(m.contains(&addr.to_string()) && m.contains("--port"), "{m}")
        }
        o => panic!("{o:?}"),
    }
}

/// `--cors-origin`: that origin's preflight gets a 204 with CORS headers before auth, its
/// requests get `Access-Control-Allow-Origin`; any other foreign origin is still refused and
/// gets no CORS header; without the option no answer carries one.
#[test]
fn cors_headers_only_for_the_origins_given() {
    let f = fixture();
    let raw = |addr: SocketAddr, req: String| {
        let mut s = connect(addr);
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let head = resp.split_once("\r\n\r\n").map(|(h, _)| h.to_ascii_lowercase()).unwrap_or_default();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head)
    };
    let app = "https://app.example.com";
    let opts = ServerOptions { token: Some("secret".into()), cors_origins: vec![app.into()], ..loopback() };
    let h = furnace_server::start(f.db.clone(), opts, events::channel()).unwrap();
    let addr = h.addr;
    let (status, head) = raw(
        addr,
        format!("OPTIONS /api/experiments HTTP/1.1\r\nHost: {addr}\r\nOrigin: {app}\r\nAccess-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: authorization\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-origin: https://app.example.com"), "{head}");
    assert!(head.contains("access-control-allow-headers: authorization, content-type"), "{head}");
    let (status, head) = raw(
        addr,
        format!(
            "GET /api/experiments HTTP/1.1\r\nHost: {addr}\r\nOrigin: {app}\r\nAuthorization: Bearer secret\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("access-control-allow-origin: https://app.example.com") && head.contains("x-frame-options: deny"), "{head}");
    // The token is still required from an allowed origin.
    let (status, _) = raw(addr, format!("GET /api/experiments HTTP/1.1\r\nHost: {addr}\r\nOrigin: {app}\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 401);
    let (status, head) =
        raw(addr, format!("GET /api/experiments HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\nAuthorization: Bearer secret\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 403, "{head}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    drop(h);
    let h = furnace_server::start(f.db.clone(), loopback(), events::channel()).unwrap();
    let addr = h.addr;
    let (status, head) =
        raw(addr, format!("OPTIONS /api/experiments HTTP/1.1\r\nHost: {addr}\r\nOrigin: {app}\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 403, "{head}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    assert!(furnace_server::check_options(&ServerOptions { cors_origins: vec!["app.example.com".into()], ..loopback() }).is_err());
}
