//! `furnace bench serve`: load on any OpenAI-compatible server (`furnace serve`, or the peer
//! `scripts/peer_llamacpp_server.sh` runs): N streamed `/v1/completions` requests, at most
//! `--concurrency` in flight, each from its own client thread over plain blocking HTTP/1.1
//! (one connection per request). Reports aggregate output tokens/s, time to first token,
//! inter-token latency, request latency, errors and the peak concurrency reached; with
//! `--repeats`, each figure is the median over the repeats.
//!
//! The HTTP response (chunked or not) and its server-sent events are parsed here, by
//! [`ChunkedDecoder`] and [`SseParser`], incrementally: a read may end anywhere, inside a
//! chunk-size line, a chunk or an SSE line.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct ServeBenchArgs {
    /// The server: http://HOST:PORT (with or without a trailing /v1).
    #[arg(long)]
    url: String,
    /// The `model` of each request (default: the first id of the server's /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Most requests in flight at once (one client thread each).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Requests per repeat.
    #[arg(long, default_value_t = 128)]
    requests: usize,
    /// Prompt length, in words of the fixed list (about one token each).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Runs of the whole load; each figure reported is the median over them.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Seed of the prompts (repeat r uses seed + r, so no prompt repeats across runs).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Bearer token, if the server wants one (default: FURNACE_TOKEN, else none).
    #[arg(long)]
    api_key: Option<String>,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// Parsing: HTTP/1.1 chunked transfer coding and server-sent events.

/// Incremental decoder of HTTP/1.1 chunked transfer coding (RFC 9112 §7.1): chunk sizes in
/// hex, chunk extensions (ignored), trailers (ignored). Tolerates bare LF line ends.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk, this many bytes left.
    Data(usize),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

impl ChunkedDecoder {
    /// Decodes `input`, appending the body bytes to `out`. Returns the number of bytes of
    /// `input` consumed (less than all only once the body is complete).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let n = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    self.state = if n == left { ChunkState::DataEnd } else { ChunkState::Data(left - n) };
                }
                ChunkState::DataEnd => {
                    match input[i] {
                        b'\r' => {}
                        b'\n' => self.state = ChunkState::Size,
                        b => bail!("chunked body: expected CRLF after a chunk, got byte {b:#04x}"),
                    }
                    i += 1;
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        if self.line.len() > 8192 {
                            bail!("chunked body: a chunk-size or trailer line over 8 KiB");
                        }
                        self.line.push(b);
                        continue;
                    }
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    let line = std::mem::take(&mut self.line);
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                        continue;
                    }
                    let text = std::str::from_utf8(&line).map_err(|_| anyhow!("chunked body: chunk-size line is not text"))?;
                    let hex = text.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).map_err(|_| anyhow!("chunked body: bad chunk size {text:?}"))?;
                    self.state = if size == 0 { ChunkState::Trailer } else { ChunkState::Data(size) };
                }
            }
        }
        Ok(i)
    }

    /// Whether the last chunk and the trailers have been read.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// Incremental parser of a `text/event-stream` body into the data of its events: `data:`
/// lines (one optional space after the colon; several make one event joined by newlines),
/// events dispatched at an empty line, comment lines (`:` keep-alives) and other fields
/// (`event:`, `id:`, `retry:`) ignored. Lines end with LF or CRLF.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Parses `input`, returning the data of each event it completes.
    pub fn feed(&mut self, input: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in input {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut events);
        }
        events
    }

    /// The end of the stream: a last event not followed by an empty line is given too
    /// (lenient: the standard drops it).
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut events);
        }
        events.extend(self.data.take());
        events
    }

    fn line_done(&mut self, line: &[u8], events: &mut Vec<String>) {
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

/// What one SSE event of a completion stream says.
#[derive(Debug, PartialEq)]
pub enum StreamEvent {
    /// Generated text (non-empty) in a chunk.
    Content,
    /// A chunk with neither text nor usage (a role, a finish reason).
    Empty,
    /// `usage.completion_tokens` (and prompt tokens) of the request.
    Usage { completion: u64, prompt: u64 },
    /// `data: [DONE]`.
    Done,
    /// An `error` object in the stream.
    Error(String),
}

/// Reads one event's data: a text-completion or chat-completion chunk.
pub fn classify(data: &str) -> Result<Vec<StreamEvent>> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(vec![StreamEvent::Done]);
    }
    let v: serde_json::Value = serde_json::from_str(data).with_context(|| format!("event data is not JSON: {}", excerpt(data)))?;
    if let Some(e) = v.get("error") {
        let msg = e.get("message").and_then(|m| m.as_str()).map(str::to_string).unwrap_or_else(|| e.to_string());
        return Ok(vec![StreamEvent::Error(msg)]);
    }
    let mut out = Vec::new();
    let has_text = v.get("choices").and_then(|c| c.as_array()).is_some_and(|cs| {
        cs.iter().any(|c| {
            let text = c.get("text").or_else(|| c.pointer("/delta/content"));
            text.and_then(|t| t.as_str()).is_some_and(|t| !t.is_empty())
        })
    });
    if has_text {
        out.push(StreamEvent::Content);
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        out.push(StreamEvent::Usage { completion: n("completion_tokens"), prompt: n("prompt_tokens") });
    }
    if out.is_empty() {
        out.push(StreamEvent::Empty);
    }
    Ok(out)
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client.

/// `http://host:port[/prefix]` split into the address to connect to, the Host header and
/// the path prefix of the API (ending in `/v1`).
#[derive(Debug, PartialEq)]
pub struct Target {
    pub addr: String,
    pub host: String,
    pub prefix: String,
}

pub fn parse_url(url: &str) -> Result<Target> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("--url must start with http:// (no TLS here): {url}"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if hostport.is_empty() {
        bail!("--url has no host: {url}");
    }
    let addr = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let path = path.trim_end_matches('/');
    let prefix = if path.ends_with("/v1") { path.to_string() } else { format!("{path}/v1") };
    Ok(Target { addr, host: hostport.to_string(), prefix })
}

/// A response's head: status and the headers that say how its body is framed.
struct Head {
    status: u16,
    chunked: bool,
    content_length: Option<usize>,
}

/// Reads the response head; returns it with the body bytes read past it.
fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response head over 64 KiB");
        }
        let n = stream.read(&mut tmp).context("reading the response head")?;
        if n == 0 {
            bail!("connection closed before a response head");
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status =
        status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let (mut chunked, mut content_length) = (false, None);
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                content_length = v.parse().ok();
            }
        }
    }
    Ok((Head { status, chunked, content_length }, buf[end..].to_vec()))
}

/// Reads a response body to its end by its framing, calling `on_bytes` with each piece of
/// body as it arrives (`on_bytes` returns false to stop early).
fn read_body(stream: &mut TcpStream, head: &Head, first: Vec<u8>, on_bytes: &mut dyn FnMut(&[u8]) -> bool) -> Result<()> {
    let mut decoder = head.chunked.then(ChunkedDecoder::default);
    let mut left = if head.chunked { None } else { head.content_length };
    let mut pending = first;
    let mut tmp = vec![0u8; 16 * 1024];
    let mut body = Vec::new();
    loop {
        if !pending.is_empty() {
            body.clear();
            match &mut decoder {
                Some(d) => {
                    d.feed(&pending, &mut body)?;
                }
                None => {
                    let n = left.map_or(pending.len(), |l| l.min(pending.len()));
                    body.extend_from_slice(&pending[..n]);
                    left = left.map(|l| l - n);
                }
            }
            if !body.is_empty() && !on_bytes(&body) {
                return Ok(());
            }
        }
        if decoder.as_ref().is_some_and(|d| d.done()) || left == Some(0) {
            return Ok(());
        }
        let n = stream.read(&mut tmp).context("reading the response body")?;
        if n == 0 {
            if decoder.is_some() || left.is_some() {
                bail!("connection closed before the end of the response body");
            }
            return Ok(());
        }
        pending = tmp[..n].to_vec();
    }
}

fn connect(t: &Target, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect(&t.addr).with_context(|| format!("connecting to {}", t.addr))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn request_head(method: &str, t: &Target, path: &str, key: Option<&str>, body_len: Option<usize>) -> String {
    let mut h = format!("{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", t.prefix, t.host);
    if let Some(k) = key {
        h.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(n) = body_len {
        h.push_str(&format!("Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {n}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// GET {prefix}/models: the first model id.
fn first_model(t: &Target, key: Option<&str>, timeout: Duration) -> Result<String> {
    let mut s = connect(t, timeout)?;
    s.write_all(request_head("GET", t, "/models", key, None).as_bytes())?;
    let (head, first) = read_head(&mut s)?;
    let mut body = Vec::new();
    read_body(&mut s, &head, first, &mut |b| {
        body.extend_from_slice(b);
        true
    })?;
    if head.status != 200 {
        bail!("GET {}/models: HTTP {}: {}", t.prefix, head.status, excerpt(&String::from_utf8_lossy(&body)));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("GET /models: not JSON")?;
    v.pointer("/data/0/id").and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| anyhow!("GET /models lists no model: give --model"))
}

/// What one streamed request measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    /// Seconds from sending the request to the first chunk with text.
    ttft: Option<f64>,
    /// Seconds between consecutive chunks with text.
    gaps: Vec<f64>,
    /// Seconds from sending to the end of the stream.
    latency: f64,
    content_chunks: u64,
    usage: Option<(u64, u64)>,
    saw_done: bool,
}

impl Sample {
    fn output_tokens(&self) -> u64 {
        self.usage.map_or(self.content_chunks, |(c, _)| c)
    }
}

/// Folds a stream's events into a [`Sample`].
struct Tracker {
    start: Instant,
    sample: Sample,
    /// When the last chunk with text came.
    last: Option<Instant>,
    failure: Option<anyhow::Error>,
}

impl Tracker {
    /// Takes the events of one read (arrived at `at`); false once the stream is over.
    fn handle(&mut self, events: Vec<String>, at: Instant) -> bool {
        for data in events {
            let kinds = match classify(&data) {
                Ok(k) => k,
                Err(e) => {
                    self.failure = Some(e);
                    return false;
                }
            };
            for k in kinds {
                match k {
                    StreamEvent::Content => {
                        self.sample.content_chunks += 1;
                        match self.last {
                            None => self.sample.ttft = Some(at.duration_since(self.start).as_secs_f64()),
                            Some(prev) => self.sample.gaps.push(at.duration_since(prev).as_secs_f64()),
                        }
                        self.last = Some(at);
                    }
                    StreamEvent::Usage { completion, prompt } => self.sample.usage = Some((completion, prompt)),
                    StreamEvent::Empty => {}
                    StreamEvent::Done => {
                        self.sample.saw_done = true;
                        return false;
                    }
                    StreamEvent::Error(m) => {
                        self.failure = Some(anyhow!("error in stream: {m}"));
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// Sends one streamed completion and reads its events to `[DONE]` (or the end).
fn stream_one(t: &Target, key: Option<&str>, body: &str, timeout: Duration, in_flight: &AtomicUsize, peak: &AtomicUsize) -> Result<Sample> {
    let mut s = connect(t, timeout)?;
    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    peak.fetch_max(now, Ordering::SeqCst);
    struct Leave<'a>(&'a AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _leave = Leave(in_flight);
    let start = Instant::now();
    let mut req = request_head("POST", t, "/completions", key, Some(body.len())).into_bytes();
    req.extend_from_slice(body.as_bytes());
    s.write_all(&req).context("sending the request")?;
    let (head, first) = read_head(&mut s)?;
    if head.status != 200 {
        let mut text = Vec::new();
        let _ = read_body(&mut s, &head, first, &mut |b| {
            text.extend_from_slice(b);
            text.len() < 4096
        });
        bail!("HTTP {}: {}", head.status, excerpt(&String::from_utf8_lossy(&text)));
    }
    let mut track = Tracker { start, sample: Sample::default(), last: None, failure: None };
    let mut sse = SseParser::default();
    read_body(&mut s, &head, first, &mut |bytes| {
        let at = Instant::now();
        let events = sse.feed(bytes);
        track.handle(events, at)
    })?;
    if !track.sample.saw_done && track.failure.is_none() {
        let events = sse.finish();
        track.handle(events, Instant::now());
    }
    if let Some(e) = track.failure {
        return Err(e);
    }
    let mut sample = track.sample;
    sample.latency = start.elapsed().as_secs_f64();
    if !sample.saw_done {
        bail!("stream ended without data: [DONE]");
    }
    Ok(sample)
}

// ---------------------------------------------------------------------------------------------
// Workload and report.

/// Common short English words, each about one token with its leading space.
const WORDS: &[&str] = &[
    "the", "river", "city", "night", "small", "old", "house", "light", "stone", "road", "green", "water", "king", "horse", "winter",
    "summer", "forest", "dark", "door", "window", "bread", "ship", "sea", "storm", "market", "child", "friend", "letter", "song", "garden",
    "tower", "bridge", "field", "mountain", "fire", "silver", "gold", "iron", "wind", "rain", "cloud", "morning", "evening", "village",
    "farmer", "teacher", "soldier", "doctor", "book", "table", "chair", "cup", "apple", "dog", "cat", "bird", "fish", "wall", "street",
    "train", "station", "island", "lake", "hill", "valley", "voice", "dream", "map", "key", "box", "coat", "hat", "boat", "lamp", "clock",
    "bell", "road", "path", "sky", "star", "moon", "sun", "snow", "leaf", "tree", "root", "seed", "flower",
];

/// The prompt of request `i`: `n` words drawn by a seeded generator (each request differs),
/// then an opening that invites a long continuation.
pub fn prompt(n: usize, seed: u64, i: u64) -> String {
    let mut rng =
        furnace_model::rng::Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut next = || rng.next_u64();
    const TAIL: &str = "\n\nWrite a very long story that uses all of these words, chapter after chapter.\n\nChapter 1\n\nOnce upon a time";
    // The tail is about 25 tokens: the words make up the rest of the prompt.
    let words = n.saturating_sub(25).max(1);
    let mut p = String::from("Words:");
    for _ in 0..words {
        p.push(' ');
        p.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
    }
    p.push_str(TAIL);
    p
}

/// Nearest-rank percentile (q in 0..=1) of unsorted values; 0 when there are none.
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[derive(Serialize, Clone, Debug)]
pub struct RunReport {
    pub requests: usize,
    pub completed: usize,
    pub errors: usize,
    pub error_messages: Vec<String>,
    pub wall_secs: f64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub mean_prompt_tokens: f64,
    pub mean_output_tokens: f64,
    /// Whether every completed request's token count came from the server's usage chunk
    /// (else from counting chunks with text).
    pub usage_reported: bool,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    pub latency_p50_s: f64,
    pub peak_concurrency: usize,
}

#[derive(Serialize)]
struct Report {
    url: String,
    model: String,
    concurrency: usize,
    requests: usize,
    prompt_tokens: usize,
    max_tokens: usize,
    repeats: usize,
    /// The median of each figure over the repeats.
    median: RunReport,
    runs: Vec<RunReport>,
}

fn run_once(a: &ServeBenchArgs, t: &Target, model: &str, key: Option<&str>, seed: u64) -> RunReport {
    let timeout = Duration::from_secs(a.timeout.max(1));
    let bodies: Vec<String> = (0..a.requests as u64)
        .map(|i| {
            serde_json::json!({
                "model": model,
                "prompt": prompt(a.prompt_tokens, seed, i),
                "max_tokens": a.max_tokens,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Result<Sample, String>>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let threads: Vec<_> = (0..a.concurrency.min(a.requests))
        .map(|_| {
            let (bodies, next, in_flight, peak, results) = (bodies.clone(), next.clone(), in_flight.clone(), peak.clone(), results.clone());
            let (t, key) = (Target { addr: t.addr.clone(), host: t.host.clone(), prefix: t.prefix.clone() }, key.map(str::to_string));
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= bodies.len() {
                    return;
                }
                let r = stream_one(&t, key.as_deref(), &bodies[i], timeout, &in_flight, &peak).map_err(|e| format!("{e:#}"));
                results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
            })
        })
        .collect();
    for th in threads {
        let _ = th.join();
    }
    let wall = start.elapsed().as_secs_f64();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    let (mut ok, mut errs) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(s) => ok.push(s),
            Err(e) => errs.push(e),
        }
    }
    let output_tokens: u64 = ok.iter().map(Sample::output_tokens).sum();
    let ttfts: Vec<f64> = ok.iter().filter_map(|s| s.ttft).collect();
    let gaps: Vec<f64> = ok.iter().flat_map(|s| s.gaps.iter().copied()).collect();
    let lat: Vec<f64> = ok.iter().map(|s| s.latency).collect();
    let n = ok.len().max(1) as f64;
    RunReport {
        requests: a.requests,
        completed: ok.len(),
        errors: errs.len(),
        error_messages: errs.iter().take(5).cloned().collect(),
        wall_secs: wall,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / wall.max(1e-9),
        mean_prompt_tokens: ok.iter().map(|s| s.usage.map_or(0, |u| u.1) as f64).sum::<f64>() / n,
        mean_output_tokens: output_tokens as f64 / n,
        usage_reported: !ok.is_empty() && ok.iter().all(|s| s.usage.is_some()),
        ttft_p50_ms: percentile(&ttfts, 0.5) * 1e3,
        ttft_p99_ms: percentile(&ttfts, 0.99) * 1e3,
        itl_p50_ms: percentile(&gaps, 0.5) * 1e3,
        itl_p99_ms: percentile(&gaps, 0.99) * 1e3,
        latency_p50_s: percentile(&lat, 0.5),
        peak_concurrency: peak.load(Ordering::SeqCst),
    }
}

/// The median of each figure over runs (errors summed, messages of all runs).
fn median_report(runs: &[RunReport]) -> RunReport {
    let med = |f: &dyn Fn(&RunReport) -> f64| super::bench::median(runs.iter().map(f).collect());
    let mut msgs: Vec<String> = runs.iter().flat_map(|r| r.error_messages.iter().cloned()).collect();
    msgs.truncate(5);
    RunReport {
        requests: runs[0].requests,
        completed: med(&|r| r.completed as f64) as usize,
        errors: runs.iter().map(|r| r.errors).sum(),
        error_messages: msgs,
        wall_secs: med(&|r| r.wall_secs),
        output_tokens: med(&|r| r.output_tokens as f64) as u64,
        output_tokens_per_s: med(&|r| r.output_tokens_per_s),
        mean_prompt_tokens: med(&|r| r.mean_prompt_tokens),
        mean_output_tokens: med(&|r| r.mean_output_tokens),
        usage_reported: runs.iter().all(|r| r.usage_reported),
        ttft_p50_ms: med(&|r| r.ttft_p50_ms),
        ttft_p99_ms: med(&|r| r.ttft_p99_ms),
        itl_p50_ms: med(&|r| r.itl_p50_ms),
        itl_p99_ms: med(&|r| r.itl_p99_ms),
        latency_p50_s: med(&|r| r.latency_p50_s),
        peak_concurrency: runs.iter().map(|r| r.peak_concurrency).max().unwrap_or(0),
    }
}

pub fn run(a: ServeBenchArgs) -> Result<()> {
    if a.concurrency == 0 || a.requests == 0 || a.repeats == 0 || a.max_tokens == 0 {
        bail!("--concurrency, --requests, --repeats and --max-tokens must be at least 1");
    }
    let t = parse_url(&a.url)?;
    let key = a.api_key.clone().or_else(|| std::env::var(furnace_server::TOKEN_ENV).ok()).filter(|k| !k.is_empty());
    let timeout = Duration::from_secs(a.timeout.max(1));
    let model = match &a.model {
        Some(m) => m.clone(),
        None => first_model(&t, key.as_deref(), timeout)?,
    };
    // One short request first, not measured: the server's first request pays for page
    // faults and lazy set-up.
    let warm = serde_json::json!({"model": model, "prompt": prompt(a.prompt_tokens, a.seed ^ 0xFFFF, 0), "max_tokens": 4,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let (z1, z2) = (AtomicUsize::new(0), AtomicUsize::new(0));
    stream_one(&t, key.as_deref(), &warm, timeout, &z1, &z2).context("the warm-up request")?;
    let mut runs = Vec::new();
    for r in 0..a.repeats {
        let rep = run_once(&a, &t, &model, key.as_deref(), a.seed.wrapping_add(r as u64));
        if !a.json {
            eprintln!(
                "repeat {}: {:.1} output tokens/s, {} of {} completed, {} errors, {:.1} s",
                r + 1,
                rep.output_tokens_per_s,
                rep.completed,
                rep.requests,
                rep.errors,
                rep.wall_secs
            );
        }
        runs.push(rep);
    }
    let median = median_report(&runs);
    let report = Report {
        url: a.url.clone(),
        model,
        concurrency: a.concurrency,
        requests: a.requests,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        repeats: a.repeats,
        median,
        runs,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let m = &report.median;
    println!(
        "{} ({}): {} streamed completions x {} repeat{}, concurrency {}, prompt ~{} words, max_tokens {}",
        report.url,
        report.model,
        report.requests,
        report.repeats,
        if report.repeats == 1 { "" } else { "s" },
        report.concurrency,
        report.prompt_tokens,
        report.max_tokens
    );
    println!("{:<28} {:>12}", "figure (median of repeats)", "value");
    println!("{:<28} {:>12.1}", "output tokens/s", m.output_tokens_per_s);
    println!("{:<28} {:>12.1}", "wall time (s)", m.wall_secs);
    println!("{:<28} {:>12.1}", "output tokens / request", m.mean_output_tokens);
    println!("{:<28} {:>12.1}", "prompt tokens / request", m.mean_prompt_tokens);
    println!("{:<28} {:>12.0}", "TTFT p50 (ms)", m.ttft_p50_ms);
    println!("{:<28} {:>12.0}", "TTFT p99 (ms)", m.ttft_p99_ms);
    println!("{:<28} {:>12.1}", "inter-token p50 (ms)", m.itl_p50_ms);
    println!("{:<28} {:>12.1}", "inter-token p99 (ms)", m.itl_p99_ms);
    println!("{:<28} {:>12.2}", "request latency p50 (s)", m.latency_p50_s);
    println!("{:<28} {:>12}", "peak concurrency", m.peak_concurrency);
    println!("{:<28} {:>12}", "errors (all repeats)", m.errors);
    if !m.usage_reported {
        println!("note: tokens counted as chunks with text (the server sent no usage for some requests)");
    }
    for e in &m.error_messages {
        println!("error: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked-encodes `body` in pieces of the given sizes (cycled), with an extension and
    /// upper-case hex on some chunks, and trailers.
    fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut i, mut k) = (0, 0);
        while i < body.len() {
            let n = sizes[k % sizes.len()].min(body.len() - i);
            if k % 3 == 1 {
                out.extend_from_slice(format!("{n:X};ext=1\r\n").as_bytes());
            } else {
                out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            }
            out.extend_from_slice(&body[i..i + n]);
            out.extend_from_slice(b"\r\n");
            i += n;
            k += 1;
        }
        out.extend_from_slice(b"0\r\nX-Trailer: yes\r\n\r\n");
        out
    }

    /// Feeds `wire` in reads of the given sizes through both parsers.
    fn parse(wire: &[u8], reads: usize) -> (Vec<String>, bool) {
        let (mut dec, mut sse) = (ChunkedDecoder::default(), SseParser::default());
        let mut events = Vec::new();
        for piece in wire.chunks(reads) {
            let mut body = Vec::new();
            let used = dec.feed(piece, &mut body).unwrap();
            assert_eq!(used, piece.len());
            events.extend(sse.feed(&body));
        }
        events.extend(sse.finish());
        (events, dec.done())
    }

    const STREAM: &str = ": keep-alive\n\n\
        data: {\"choices\":[{\"text\":\"Hel\"}]}\n\n\
        :ping\r\n\r\n\
        event: message\r\nid: 7\r\ndata:{\"choices\":[{\"text\":\"lo \\u00e9\"}]}\r\n\r\n\
        data: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"length\"}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn chunk_and_read_boundaries_anywhere() {
        let want = vec![
            "{\"choices\":[{\"text\":\"Hel\"}]}".to_string(),
            "{\"choices\":[{\"text\":\"lo \\u00e9\"}]}".to_string(),
            "{\"choices\":[{\"text\":\"\",\"finish_reason\":\"length\"}]}".to_string(),
            "{\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}".to_string(),
            "[DONE]".to_string(),
        ];
        for sizes in [&[1usize][..], &[2, 7], &[3, 1, 40], &[5], &[1000]] {
            let wire = chunked(STREAM.as_bytes(), sizes);
            for reads in [1, 2, 3, 5, 8, 13, 64, 4096] {
                let (events, done) = parse(&wire, reads);
                assert_eq!(events, want, "chunk sizes {sizes:?}, reads of {reads}");
                assert!(done);
            }
        }
    }

    #[test]
    fn multi_line_data_and_bare_field() {
        let mut p = SseParser::default();
        let mut ev = p.feed(b"data: a\ndata\ndata:  b\nretry: 5\n\n");
        ev.extend(p.feed(b"data: tail-without-blank-line"));
        assert_eq!(ev, vec!["a\n\n b".to_string()]);
        assert_eq!(p.finish(), vec!["tail-without-blank-line".to_string()]);
    }

    #[test]
    fn decoder_stops_at_the_end_and_rejects_junk() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let wire = b"3\nabc\n0\n\nHTTP/1.1 200 OK";
        let used = d.feed(wire, &mut out).unwrap();
        assert_eq!(out, b"abc");
        assert!(d.done());
        assert_eq!(&wire[used..], b"HTTP/1.1 200 OK");
        assert!(ChunkedDecoder::default().feed(b"zz\r\n", &mut Vec::new()).is_err());
        assert!(ChunkedDecoder::default().feed(b"2\r\nabX", &mut Vec::new()).is_err());
    }

    #[test]
    fn events_classified() {
        assert_eq!(classify("[DONE]").unwrap(), vec![StreamEvent::Done]);
        assert_eq!(classify(r#"{"choices":[{"text":"x"}]}"#).unwrap(), vec![StreamEvent::Content]);
        assert_eq!(classify(r#"{"choices":[{"delta":{"content":"x"}}]}"#).unwrap(), vec![StreamEvent::Content]);
        assert_eq!(classify(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#).unwrap(), vec![StreamEvent::Empty]);
        assert_eq!(
            classify(r#"{"choices":[{"text":"y"}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#).unwrap(),
            vec![StreamEvent::Content, StreamEvent::Usage { completion: 4, prompt: 3 }]
        );
        assert_eq!(classify(r#"{"choices":[{"text":"y"}],"usage":null}"#).unwrap(), vec![StreamEvent::Content]);
        assert_eq!(classify(r#"{"error":{"message":"boom"}}"#).unwrap(), vec![StreamEvent::Error("boom".into())]);
        assert!(classify("{not json").is_err());
    }

    #[test]
    fn urls_and_percentiles_and_prompts() {
        let t = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(t, Target { addr: "127.0.0.1:8080".into(), host: "127.0.0.1:8080".into(), prefix: "/v1".into() });
        assert_eq!(parse_url("http://localhost:9/v1/").unwrap().prefix, "/v1");
        assert_eq!(parse_url("http://h:9/api").unwrap().prefix, "/api/v1");
        assert_eq!(parse_url("http://h").unwrap().addr, "h:80");
        assert!(parse_url("https://h:1").is_err());
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_ne!(prompt(128, 42, 0), prompt(128, 42, 1));
        assert_eq!(prompt(128, 42, 3), prompt(128, 42, 3));
        assert_ne!(prompt(128, 42, 0), prompt(128, 43, 0));
        assert_eq!(prompt(128, 42, 0).split_whitespace().count(), 1 + 103 + 20);
    }

    /// A whole exchange against a tiny chunked SSE server on loopback.
    #[test]
    fn streams_from_a_loopback_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
            // The client may hang up once it has read [DONE]: later writes may fail.
            for piece in chunked(STREAM.as_bytes(), &[17, 4]).chunks(11) {
                if s.write_all(piece).and_then(|()| s.flush()).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let t = parse_url(&format!("http://{addr}")).unwrap();
        let (f, p) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let s = stream_one(&t, None, "{}", Duration::from_secs(10), &f, &p).unwrap();
        server.join().unwrap();
        assert_eq!(s.content_chunks, 2);
        assert_eq!(s.output_tokens(), 2);
        assert_eq!(s.usage, Some((2, 9)));
        assert_eq!(s.gaps.len(), 1);
        assert!(s.ttft.is_some() && s.saw_done);
        assert_eq!((f.load(Ordering::SeqCst), p.load(Ordering::SeqCst)), (0, 1));
    }
}
