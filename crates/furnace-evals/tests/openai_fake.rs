//! The OpenAI-compatible generator against tiny HTTP/1.1 servers in the test: retries after
//! 429 (honouring Retry-After) and 5xx, an immediate failure on another 4xx with the
//! server's message, a timeout, and answers in request order from concurrent workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_evals::generator::{GenRequest, Message, Sampling};
use furnace_evals::openai::{OpenAiConfig, OpenAiGenerator};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

/// What to answer: status, extra headers, body.
type Reply = (u16, Vec<(&'static str, String)>, String);

/// A server on a free loopback port answering each request with `handler(n, request)`
/// (`n` counts requests from 0), one thread per connection. Returns the base URL and the
/// requests seen.
fn serve<F>(handler: F) -> (String, Arc<Mutex<Vec<Seen>>>)
where
    F: Fn(usize, &Seen) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let count = Arc::new(AtomicUsize::new(0));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (handler, count, log) = (handler.clone(), count.clone(), log.clone());
            std::thread::spawn(move || {
                // Keep-alive: answer requests on this connection until it closes.
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                while let Some(req) = read_request(&mut reader) {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    log.lock().unwrap().push(req.clone());
                    let (status, headers, body) = handler(n, &req);
                    if write_response(&mut stream, status, &headers, &body).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, seen)
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split(' ').nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Seen { path, headers, body: serde_json::from_slice(&body).unwrap_or(Value::Null) })
}

fn write_response(s: &mut TcpStream, status: u16, headers: &[(&str, String)], body: &str) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    s.write_all(format!("{head}\r\n{body}").as_bytes())?;
    s.flush()
}

fn completion(text: &str) -> String {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    })
    .to_string()
}

fn ask(text: &str) -> GenRequest {
    GenRequest {
        messages: vec![Message { role: "user".into(), content: text.into() }],
        sampling: Sampling { max_tokens: 16, temperature: 0.0, top_p: 1.0, seed: Some(7), stop: vec!["\n\n".into()] },
    }
}

fn generator(url: &str, f: impl FnOnce(&mut OpenAiConfig)) -> OpenAiGenerator {
    let mut cfg = OpenAiConfig::new(url, "m");
    f(&mut cfg);
    OpenAiGenerator::new(cfg).unwrap()
}

#[test]
fn a_429_twice_then_200_succeeds_after_waiting_retry_after() {
    let (url, seen) = serve(|n, _| {
        if n < 2 {
            (429, vec![("Retry-After", "1".into())], json!({"error": {"message": "slow down", "type": "rate_limit"}}).to_string())
        } else {
            (200, vec![], completion("Paris."))
        }
    });
    let g = generator(&url, |c| c.max_retries = 3);
    let t = Instant::now();
    let out = g.generate(&[ask("capital of France?")], &mut |_| {});
    let took = t.elapsed();
    let out = out.into_iter().next().unwrap().unwrap();
    assert_eq!(out.text, "Paris.");
    assert_eq!((out.prompt_tokens, out.completion_tokens, out.finish_reason.as_str()), (7, 2, "stop"));
    assert!(out.latency > 0.0 && out.latency < took.as_secs_f64());
    assert_eq!(seen.lock().unwrap().len(), 3);
    // Two Retry-After: 1 waits (not the 0.25-0.75 s of the backoff).
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn a_500_forever_fails_after_max_retries_with_the_message() {
    let (url, seen) = serve(|_, _| (500, vec![], json!({"error": {"message": "the model crashed"}}).to_string()));
    let g = generator(&url, |c| c.max_retries = 2);
    let t = Instant::now();
    let out = g.generate_one(&ask("hi"));
    let e = out.unwrap_err().to_string();
    assert!(e.contains("500: the model crashed") && e.contains("gave up after 2 retries") && e.contains("/v1/chat/completions"), "{e}");
    assert_eq!(seen.lock().unwrap().len(), 3, "one try and two retries");
    // Backoff 0.25-0.5 s then 0.5-1 s.
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(750) && took < Duration::from_secs(4), "{took:?}");
}

#[test]
fn a_400_fails_at_once_with_the_servers_message_and_the_others_go_on() {
    let (url, seen) = serve(|_, req| {
        if req.body["messages"][0]["content"] == "bad" {
            (
                400,
                vec![],
                json!({"error": {"message": "max_tokens is too large: 99999", "type": "invalid_request_error", "param": "max_tokens", "code": null}})
                    .to_string(),
            )
        } else {
            (200, vec![], completion("fine"))
        }
    });
    let g = generator(&url, |c| c.max_retries = 5);
    let t = Instant::now();
    let out = g.generate(&[ask("good"), ask("bad"), ask("good")], &mut |_| {});
    assert!(t.elapsed() < Duration::from_secs(2), "no retry: {:?}", t.elapsed());
    let e = out[1].as_ref().unwrap_err().to_string();
    assert_eq!(e, format!("generator: POST {url}/chat/completions: 400: max_tokens is too large: 99999"));
    assert_eq!(out[0].as_ref().unwrap().text, "fine");
    assert_eq!(out[2].as_ref().unwrap().text, "fine");
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    // Accept, read nothing, answer nothing; keep the connections open.
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    let g = generator(&url, |c| {
        c.timeout_secs = 0.5;
        c.max_retries = 1;
    });
    let t = Instant::now();
    let e = g.generate_one(&ask("hello?")).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("timed out after 0.5 s") && e.contains("gave up after 1 retry"), "{e}");
    // Two attempts of 0.5 s and a backoff of 0.25-0.5 s between them.
    assert!(took >= Duration::from_millis(1200) && took < Duration::from_secs(5), "{took:?}");
    assert_eq!(held.lock().unwrap().len(), 2, "two connections: the try and the retry");
}

#[test]
fn a_refused_connection_is_retried_then_reported() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let g = generator(&format!("http://127.0.0.1:{port}/v1"), |c| c.max_retries = 1);
    let e = g.generate_one(&ask("anyone?")).unwrap_err().to_string();
    assert!(e.contains("connection failed") && e.contains("gave up after 1 retry"), "{e}");
}

#[test]
fn https_urls_go_through_tls() {
    // A plain-HTTP server on an https:// URL: what arrives is a TLS handshake (rustls is
    // built in, the scheme is not refused), and the plain answer fails it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let https = format!("https://{}/v1", listener.local_addr().unwrap());
    let first = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        buf
    });
    let g = generator(&https, |c| {
        c.max_retries = 0;
        c.timeout_secs = 5.0;
    });
    let e = g.generate_one(&ask("hi")).unwrap_err().to_string();
    let record = first.join().unwrap();
    // 0x16: a TLS handshake record; 3.x: its version.
    assert_eq!((record[0], record[1]), (0x16, 3), "{record:?}");
    assert!(e.contains(&format!("POST {https}/chat/completions: connection failed")), "{e}");
}

#[test]
fn answers_come_back_in_request_order_from_four_workers() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let (url, seen) = serve(move |_, req| {
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(now, Ordering::SeqCst);
        // Earlier requests take longer, so they finish out of order.
        let q: usize = req.body["messages"][0]["content"].as_str().unwrap().trim_start_matches('q').parse().unwrap();
        std::thread::sleep(Duration::from_millis(40 * (12 - q as u64 % 12)));
        r.fetch_sub(1, Ordering::SeqCst);
        (200, vec![], completion(&format!("answer to q{q}")))
    });
    let g = generator(&url, |c| {
        c.concurrency = 4;
        // A variable that is always set (tests set none: set_var races other threads).
        c.api_key_env = Some("PATH".into());
    });
    let reqs: Vec<GenRequest> = (0..12).map(|i| ask(&format!("q{i}"))).collect();
    let mut done = Vec::new();
    let out = g.generate(&reqs, &mut |i| done.push(i));
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.as_ref().unwrap().text, format!("answer to q{i}"));
    }
    let mut sorted = done.clone();
    sorted.sort();
    assert_eq!(sorted, (0..12).collect::<Vec<_>>(), "on_done once per request");
    assert_ne!(done, sorted, "finished out of order, answered in order");
    assert_eq!(most.load(Ordering::SeqCst), 4, "four at once, no more");
    // What was sent: the path, the key, the sampling settings.
    let seen = seen.lock().unwrap();
    let first = &seen[0];
    assert_eq!(first.path, "/v1/chat/completions");
    let bearer = format!("Bearer {}", std::env::var("PATH").unwrap().trim());
    assert!(first.headers.contains(&("authorization".into(), bearer)), "{:?}", first.headers);
    let b = &first.body;
    assert_eq!((b["model"].as_str(), b["max_tokens"].as_u64(), b["seed"].as_u64()), (Some("m"), Some(16), Some(7)));
    assert_eq!((b["temperature"].as_f64(), b["top_p"].as_f64()), (Some(0.0), Some(1.0)));
    assert_eq!(b["stop"], json!(["\n\n"]));
    assert_eq!(b["messages"][0]["role"], "user");
}
