//! A minimal blocking HTTP/1.1 client over `std::net` for JSON APIs: one request per
//! connection (`Connection: close`), bounded by timeouts and an answer size cap. Plain
//! `http://` only (an `https://` server is reached through a local proxy or tunnel).

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest answer read (runs/search and metric histories stay far below).
const MAX_ANSWER: u64 = 64 << 20;

/// A parsed `http://host[:port][/prefix]` URL.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    /// `host:port` as sent in `Host`.
    host: String,
    /// `host:port` to connect to.
    addr: String,
    /// Path prefix without a trailing `/`.
    prefix: String,
}

impl BaseUrl {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let bad = |msg: &str| Error::Url { url: url.to_string(), msg: msg.to_string() };
        if url.starts_with("https://") {
            return Err(bad("https is not built in; use http:// (a local proxy or tunnel can add TLS)"));
        }
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("must start with http://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') || url.contains(['?', '#', ' ']) {
            return Err(bad("needs a host, and no user, query or fragment"));
        }
        let has_port = match authority.rfind(']') {
            Some(close) => authority[close..].contains(':'),
            None => authority.contains(':'),
        };
        let addr = if has_port { authority.to_string() } else { format!("{authority}:80") };
        Ok(Self { host: authority.to_string(), addr, prefix: path.trim_end_matches('/').to_string() })
    }

    /// Sends one request and returns the status and body. `path` starts with `/`.
    pub(crate) fn request(&self, method: &str, path: &str, body: Option<&[u8]>, timeout: Duration) -> Result<(u16, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let target = format!("{}{}", self.prefix, path);
        let fail = |what: &str, e: &dyn std::fmt::Display| Error::Transport(format!("{what} {}: {e}", self.host));
        let addrs: Vec<_> = self.addr.to_socket_addrs().map_err(|e| fail("resolving", &e))?.collect();
        let mut last: Option<std::io::Error> = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(fail("connecting to", &e)),
            (None, None) => return Err(fail("resolving", &"no address")),
        };
        let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        stream.set_write_timeout(Some(left())).map_err(|e| fail("connecting to", &e))?;
        let body = body.unwrap_or(&[]);
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: furnace\r\nAccept: application/json\r\nConnection: close\r\n",
            self.host
        );
        if method != "GET" {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).map_err(|e| fail("sending to", &e))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            if Instant::now() >= deadline {
                return Err(fail("no complete answer in time from", &format!("{timeout:?}")));
            }
            stream.set_read_timeout(Some(left())).map_err(|e| fail("reading from", &e))?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.len() as u64 > MAX_ANSWER {
                        return Err(fail("answer too large from", &format!("over {MAX_ANSWER} bytes")));
                    }
                    if complete(&answer) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(fail("no answer in time from", &format!("waited {timeout:?}")));
                }
                Err(e) => return Err(fail("reading from", &e)),
            }
        }
        parse_answer(&answer).ok_or_else(|| fail("malformed answer from", &"not HTTP/1.x"))
    }
}

fn header_end(a: &[u8]) -> Option<usize> {
    a.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn headers(a: &[u8], end: usize) -> (Option<usize>, bool) {
    let text = String::from_utf8_lossy(&a[..end]).to_ascii_lowercase();
    let mut len = None;
    let mut chunked = false;
    for line in text.lines().skip(1) {
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        }
    }
    (len, chunked)
}

/// Whether a whole answer has arrived (so a server that keeps the connection open does not
/// make us wait for it).
fn complete(a: &[u8]) -> bool {
    let Some(end) = header_end(a) else { return false };
    match headers(a, end) {
        (_, true) => dechunk(&a[end..]).is_some(),
        (Some(n), false) => a.len() >= end + n,
        (None, false) => false,
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn parse_answer(a: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = header_end(a)?;
    let first = std::str::from_utf8(&a[..end]).ok()?.lines().next()?.to_string();
    let mut parts = first.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let body = match headers(a, end) {
        (_, true) => dechunk(&a[end..])?,
        (Some(n), false) => a.get(end..end + n)?.to_vec(),
        (None, false) => a[end..].to_vec(),
    };
    Some((status, body))
}

/// Percent-encodes a query value.
pub(crate) fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_and_answers() {
        let u = BaseUrl::parse("http://127.0.0.1:5000/x/").unwrap();
        assert_eq!((u.addr.as_str(), u.prefix.as_str()), ("127.0.0.1:5000", "/x"));
        assert_eq!(BaseUrl::parse("http://h").unwrap().addr, "h:80");
        assert_eq!(BaseUrl::parse("http://[::1]:9").unwrap().addr, "[::1]:9");
        assert_eq!(BaseUrl::parse("http://[::1]").unwrap().addr, "[::1]:80");
        assert!(BaseUrl::parse("https://h").is_err() && BaseUrl::parse("ftp://h").is_err());
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert!(complete(chunked));
        assert_eq!(parse_answer(chunked).unwrap(), (200, b"abcde".to_vec()));
        let sized = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_answer(sized).unwrap(), (404, b"{}".to_vec()));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"));
        assert_eq!(encode_query("a b/é"), "a%20b%2F%C3%A9");
    }
}
