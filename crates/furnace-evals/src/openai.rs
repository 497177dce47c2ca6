//! A generator that is an OpenAI-compatible chat API (OpenAI itself, vLLM, llama.cpp's
//! server, `furnace serve`, ...): `POST {base_url}/chat/completions`, blocking, from a pool
//! of worker threads, within the API's request and token limits per minute, retrying what
//! is worth retrying.
//!
//! - Requests and tokens per minute (`rpm`, `tpm`) are kept by a [`SlidingWindow`] shared by
//!   the workers: before each attempt one request and an estimate of its tokens (prompt
//!   characters / 4 + `max_tokens`) are reserved, sleeping until the last 60 s allow it;
//!   after the answer the estimate is replaced by the real usage.
//! - Connection errors, timeouts, 429 and 5xx are retried up to `max_retries` times, after
//!   the server's `Retry-After` (seconds, at most 600) when it sends one, otherwise after an
//!   exponential backoff with jitter (0.5 s, 1 s, 2 s, ... at most 30 s, each drawn between
//!   half and all of that). Any other 4xx fails at once with the server's message. One
//!   request's failure never stops the others.
//! - When the answer has no `usage`, tokens are estimated as characters / 4 (prompt: the
//!   messages' text; completion: the answer's text).
//! - `latency` is that of the attempt that answered: from sending it to the whole answer
//!   read (waits for the limit and earlier failed attempts are not in it).
//! - TLS (for `https://` base URLs) is rustls with the ring provider and Mozilla's root
//!   certificates (webpki-roots); plain `http://` works as well.

use crate::generator::{GenOutput, GenRequest};
use crate::ratelimit::SlidingWindow;
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most worker threads one generator may use.
pub const MAX_CONCURRENCY: usize = 256;

/// The longest `Retry-After` honoured (a longer one is waited this long).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The first backoff and the longest one.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The `[generator]` table of an evals spec when `kind = "openai"`: where the API is and how
/// to treat it. Sampling settings are not here: they come with each request.
///
/// ```toml
/// [generator]
/// kind = "openai"
/// base_url = "http://127.0.0.1:8000/v1"
/// model = "smollm2-135m-instruct"
/// api_key_env = "OPENAI_API_KEY"
/// rpm = 500
/// tpm = 200000
/// input_price_per_million = 0.15
/// output_price_per_million = 0.60
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Accepted so that the whole `[generator]` table deserializes as it is; when given it
    /// must be `"openai"`. Nothing else reads it.
    #[serde(default)]
    pub kind: Option<String>,
    /// The API's root, up to and including its version (`http://127.0.0.1:8000/v1`,
    /// `https://api.openai.com/v1`); `/chat/completions` is appended.
    pub base_url: String,
    /// The `model` sent with every request.
    pub model: String,
    /// The name of the environment variable that holds the API key (sent as
    /// `Authorization: Bearer ...`); none: no key is sent. The key itself is never in a
    /// spec, a log or any `Debug` output.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// At most this many requests per minute (every attempt counts); none: no limit.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// At most this many tokens (prompt + completion) per minute; none: no limit.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Retries of a request after a connection error, a timeout, a 429 or a 5xx.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Seconds one attempt may take, from connecting to the whole answer.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Requests in flight at once (worker threads), 1 to 256.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Price of a million prompt tokens (for [`OpenAiGenerator::cost`]).
    #[serde(default)]
    pub input_price_per_million: Option<f64>,
    /// Price of a million completion tokens.
    #[serde(default)]
    pub output_price_per_million: Option<f64>,
}

fn default_max_retries() -> u32 {
    5
}
fn default_timeout_secs() -> f64 {
    60.0
}
fn default_concurrency() -> usize {
    8
}

impl OpenAiConfig {
    /// The API at `base_url` serving `model`, everything else at its default (no key, no
    /// limits, 5 retries, 60 s timeout, 8 at once, no prices).
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        OpenAiConfig {
            kind: None,
            base_url: base_url.into(),
            model: model.into(),
            api_key_env: None,
            rpm: None,
            tpm: None,
            max_retries: default_max_retries(),
            timeout_secs: default_timeout_secs(),
            concurrency: default_concurrency(),
            input_price_per_million: None,
            output_price_per_million: None,
        }
    }

    /// Checks every setting; the error names the first wrong one (`generator.rpm`) and says
    /// what to fix. The API key's variable is looked up by [`OpenAiGenerator::new`].
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::Spec { key: format!("generator.{key}"), msg });
        if let Some(kind) = &self.kind {
            if kind != "openai" {
                return bad("kind", format!("is {kind:?}, but these settings are for kind = \"openai\""));
            }
        }
        let url = self.base_url.trim();
        let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        match rest {
            None => {
                return bad(
                    "base_url",
                    format!("{url:?} is not an http:// or https:// URL; write the API's root, e.g. \"http://127.0.0.1:8000/v1\""),
                )
            }
            Some(r) if r.trim_matches('/').is_empty() => return bad("base_url", format!("{url:?} has no host")),
            Some(_) => {}
        }
        if url.ends_with("/chat/completions") {
            return bad(
                "base_url",
                format!("{url:?} already ends with /chat/completions; give the root (e.g. \".../v1\"), the path is appended"),
            );
        }
        if self.model.trim().is_empty() {
            return bad("model", "is empty; name the model the API serves".into());
        }
        if let Some(env) = &self.api_key_env {
            if env.is_empty() || env.contains('=') || env.contains('\0') {
                return bad("api_key_env", format!("{env:?} is not an environment variable's name; name the variable that holds the key (e.g. \"OPENAI_API_KEY\"), not the key"));
            }
        }
        if self.rpm == Some(0) {
            return bad("rpm", "is 0: no request could be sent; set at least 1, or leave it out for no limit".into());
        }
        if self.tpm == Some(0) {
            return bad("tpm", "is 0: no request could be sent; set at least 1, or leave it out for no limit".into());
        }
        if self.max_retries > 100 {
            return bad("max_retries", format!("is {}; at most 100 (5 is usual)", self.max_retries));
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0 && self.timeout_secs <= 86_400.0) {
            return bad("timeout_secs", format!("is {}; give seconds above 0 (at most a day), e.g. 60", self.timeout_secs));
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return bad("concurrency", format!("is {}; give 1 to {MAX_CONCURRENCY}", self.concurrency));
        }
        for (key, price) in
            [("input_price_per_million", self.input_price_per_million), ("output_price_per_million", self.output_price_per_million)]
        {
            if let Some(p) = price {
                if !(p.is_finite() && p >= 0.0) {
                    return bad(key, format!("is {p}; give a price of 0 or more per million tokens"));
                }
            }
        }
        Ok(())
    }
}

/// An OpenAI-compatible chat API as a generator. Cheap to share between threads
/// (`&OpenAiGenerator`); [`generate`](Self::generate) runs its own worker threads.
pub struct OpenAiGenerator {
    cfg: OpenAiConfig,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    limiter: SlidingWindow,
    response_format: Option<Value>,
}

impl std::fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiGenerator")
            .field("url", &self.url)
            .field("model", &self.cfg.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<hidden>"))
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
enum Attempt {
    /// The answer.
    Done(GenOutput),
    /// Worth another try (after `Retry-After` when the server said). `answered`: the
    /// server answered (429, 5xx), so nothing was generated.
    Retry { msg: String, retry_after: Option<Duration>, answered: bool },
    /// Not worth another try.
    Fail(String),
}

impl OpenAiGenerator {
    /// A generator for `cfg` (validated here). Reads the API key from the variable
    /// `api_key_env` names: an unset variable is an error naming it.
    pub fn new(cfg: OpenAiConfig) -> Result<Self> {
        cfg.validate()?;
        let api_key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                Ok(_) => {
                    return Err(Error::Spec { key: "generator.api_key_env".into(), msg: format!("the environment variable {var} is empty; set it to the API key") })
                }
                Err(_) => {
                    return Err(Error::Spec {
                        key: "generator.api_key_env".into(),
                        msg: format!("the environment variable {var} is not set (or not UTF-8); set it to the API key, or leave api_key_env out for an API without keys"),
                    })
                }
            },
        };
        let url = format!("{}/chat/completions", cfg.base_url.trim().trim_end_matches('/'));
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_secs)))
            // 4xx and 5xx are answers to read (the server's message), not transport errors.
            .http_status_as_error(false)
            .max_idle_connections(cfg.concurrency.max(3))
            .max_idle_connections_per_host(cfg.concurrency.max(3))
            .user_agent(concat!("furnace-evals/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let limiter = SlidingWindow::new(cfg.rpm, cfg.tpm, Duration::from_secs(60));
        Ok(OpenAiGenerator { cfg, url, api_key, agent, limiter, response_format: None })
    }

    /// The same generator sending `format` as every request's `response_format` (e.g.
    /// `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`).
    pub fn with_response_format(mut self, format: Value) -> Self {
        self.response_format = Some(format);
        self
    }

    /// The settings it runs with.
    pub fn config(&self) -> &OpenAiConfig {
        &self.cfg
    }

    /// The URL requests go to (`{base_url}/chat/completions`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Answers every request, `concurrency` at a time: the answers in the order of `reqs`.
    /// `on_done(i)` is called (on the calling thread) as request `i` finishes, answered or
    /// failed, for a progress bar. A request's error is its own entry; the others go on.
    pub fn generate(&self, reqs: &[GenRequest], on_done: &mut dyn FnMut(usize)) -> Vec<Result<GenOutput>> {
        let n = reqs.len();
        let mut out: Vec<Option<Result<GenOutput>>> = (0..n).map(|_| None).collect();
        if n == 0 {
            return Vec::new();
        }
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::channel::<(usize, Result<GenOutput>)>();
        std::thread::scope(|s| {
            for _ in 0..self.cfg.concurrency.clamp(1, n) {
                let tx = tx.clone();
                let next = &next;
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = reqs.get(i) else { break };
                    if tx.send((i, self.generate_one(req))).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (i, r) in rx {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(r);
                }
                on_done(i);
            }
        });
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(Error::Generator("a worker thread stopped before answering".into())))).collect()
    }

    /// Answers one request on this thread (within the limits, with retries).
    pub fn generate_one(&self, req: &GenRequest) -> Result<GenOutput> {
        let body = self.body(req);
        let prompt_chars: usize = req.messages.iter().map(|m| m.content.chars().count()).sum();
        let estimate = (prompt_chars / 4) as u64 + req.sampling.max_tokens as u64;
        let mut attempt = 0u32;
        loop {
            let permit = self.limiter.acquire(estimate)?;
            match self.attempt(&body, prompt_chars) {
                Attempt::Done(out) => {
                    permit.finish(Some((out.prompt_tokens + out.completion_tokens) as u64));
                    return Ok(out);
                }
                Attempt::Fail(msg) => {
                    permit.finish(Some(0));
                    return Err(Error::Generator(format!("POST {}: {msg}", self.url)));
                }
                Attempt::Retry { msg, retry_after, answered } => {
                    // An error answer used no tokens; a transport error keeps the estimate
                    // (the server may have worked on it).
                    permit.finish(if answered { Some(0) } else { None });
                    if attempt >= self.cfg.max_retries {
                        let gave_up = match self.cfg.max_retries {
                            0 => String::new(),
                            1 => " (gave up after 1 retry)".into(),
                            n => format!(" (gave up after {n} retries)"),
                        };
                        return Err(Error::Generator(format!("POST {}: {msg}{gave_up}", self.url)));
                    }
                    std::thread::sleep(retry_after.map(|d| d.min(MAX_RETRY_AFTER)).unwrap_or_else(|| backoff(attempt)));
                    attempt += 1;
                }
            }
        }
    }

    /// What an answer costs at the configured prices (a missing price counts as 0); `None`
    /// when no price is set.
    pub fn cost(&self, out: &GenOutput) -> Option<f64> {
        let (i, o) = (self.cfg.input_price_per_million, self.cfg.output_price_per_million);
        if i.is_none() && o.is_none() {
            return None;
        }
        Some((out.prompt_tokens as f64 * i.unwrap_or(0.0) + out.completion_tokens as f64 * o.unwrap_or(0.0)) / 1e6)
    }

    /// The JSON body of a request.
    fn body(&self, req: &GenRequest) -> Value {
        let s = &req.sampling;
        let mut body = json!({
            "model": self.cfg.model,
            "messages": req.messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        });
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        if let Some(f) = &self.response_format {
            body["response_format"] = f.clone();
        }
        body
    }

    /// One POST.
    fn attempt(&self, body: &Value, prompt_chars: usize) -> Attempt {
        let mut post = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            post = post.header("Authorization", format!("Bearer {key}"));
        }
        let started = Instant::now();
        let mut resp = match post.send(body.to_string()) {
            Ok(r) => r,
            Err(e) => return transport_error(e, self.cfg.timeout_secs),
        };
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return transport_error(e, self.cfg.timeout_secs),
        };
        let latency = started.elapsed().as_secs_f64();
        if status == 429 || (500..600).contains(&status) {
            return Attempt::Retry { msg: format!("{status}: {}", server_message(&text)), retry_after, answered: true };
        }
        if !(200..300).contains(&status) {
            return Attempt::Fail(format!("{status}: {}", server_message(&text)));
        }
        match parse_answer(&text, prompt_chars, latency) {
            Ok(out) => Attempt::Done(out),
            Err(msg) => Attempt::Fail(msg),
        }
    }
}

/// A failed connection, send or read: retried.
fn transport_error(e: ureq::Error, timeout_secs: f64) -> Attempt {
    let msg = match &e {
        ureq::Error::Timeout(_) => format!("timed out after {timeout_secs} s"),
        ureq::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
            format!("timed out after {timeout_secs} s")
        }
        _ => format!("connection failed: {e}"),
    };
    Attempt::Retry { msg, retry_after: None, answered: false }
}

/// `Retry-After` in seconds (the HTTP-date form is not read: the backoff applies then).
fn parse_retry_after(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The wait before retry `attempt + 1`: 0.5 s doubled per attempt, at most 30 s, drawn
/// between half and all of that.
fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_START.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
    full.mul_f64(0.5 + 0.5 * jitter())
}

/// A number in [0, 1), different every call (std's randomly keyed hasher; no generator
/// dependency for this).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The server's error message: OpenAI's `{"error": {"message": ...}}`, a plain
/// `{"message": ...}` or `{"detail": ...}`, else the body (shortened).
fn server_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let found = [&v["error"]["message"], &v["error"], &v["message"], &v["detail"]].into_iter().find_map(|m| m.as_str());
        if let Some(m) = found {
            return m.to_string();
        }
    }
    let t = text.trim();
    if t.is_empty() {
        return "(empty body)".into();
    }
    shorten(t, 500)
}

fn shorten(t: &str, max: usize) -> String {
    match t.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// The shape of a chat completion, as much as is read.
#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<usize>,
    #[serde(default)]
    completion_tokens: Option<usize>,
}

/// A 2xx body as a [`GenOutput`] (token counts estimated where `usage` is missing).
fn parse_answer(text: &str, prompt_chars: usize, latency: f64) -> std::result::Result<GenOutput, String> {
    let c: Completion =
        serde_json::from_str(text).map_err(|e| format!("the answer is not a chat completion ({e}): {}", shorten(text.trim(), 300)))?;
    let Some(choice) = c.choices.into_iter().next() else {
        return Err(format!("the answer has no choices: {}", shorten(text.trim(), 300)));
    };
    let text = choice.message.content.unwrap_or_default();
    let usage = c.usage.unwrap_or(Usage { prompt_tokens: None, completion_tokens: None });
    let prompt_tokens = usage.prompt_tokens.unwrap_or(prompt_chars.div_ceil(4));
    let completion_tokens = usage.completion_tokens.unwrap_or(text.chars().count().div_ceil(4));
    Ok(GenOutput { text, prompt_tokens, completion_tokens, latency, finish_reason: choice.finish_reason.unwrap_or_default() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_config_deserializes_with_defaults_and_refuses_unknown_keys() {
        let cfg: OpenAiConfig = toml_like(r#"{"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m"}"#).unwrap();
        assert_eq!(cfg.max_retries, 5);
        assert_eq!(cfg.timeout_secs, 60.0);
        assert_eq!(cfg.concurrency, 8);
        assert_eq!(cfg, OpenAiConfig { kind: Some("openai".into()), ..OpenAiConfig::new("http://127.0.0.1:8000/v1", "m") });
        cfg.validate().unwrap();
        let e = toml_like(r#"{"base_url": "http://x/v1", "model": "m", "temperature": 0.5}"#).unwrap_err();
        assert!(e.contains("temperature"), "{e}");
    }

    fn toml_like(json: &str) -> std::result::Result<OpenAiConfig, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn validation_names_the_setting_and_says_what_to_fix() {
        let ok = OpenAiConfig::new("https://api.example.com/v1/", "m");
        ok.validate().unwrap();
        let cases: Vec<(OpenAiConfig, &str)> = vec![
            (OpenAiConfig { rpm: Some(0), ..ok.clone() }, "generator.rpm"),
            (OpenAiConfig { tpm: Some(0), ..ok.clone() }, "generator.tpm"),
            (OpenAiConfig { concurrency: 0, ..ok.clone() }, "generator.concurrency"),
            (OpenAiConfig { concurrency: 257, ..ok.clone() }, "generator.concurrency"),
            (OpenAiConfig { timeout_secs: 0.0, ..ok.clone() }, "generator.timeout_secs"),
            (OpenAiConfig { base_url: "127.0.0.1:8000/v1".into(), ..ok.clone() }, "generator.base_url"),
            (OpenAiConfig { base_url: "http://x/v1/chat/completions".into(), ..ok.clone() }, "generator.base_url"),
            (OpenAiConfig { model: " ".into(), ..ok.clone() }, "generator.model"),
            (OpenAiConfig { api_key_env: Some("sk-abc=1".into()), ..ok.clone() }, "generator.api_key_env"),
            (OpenAiConfig { input_price_per_million: Some(-1.0), ..ok.clone() }, "generator.input_price_per_million"),
            (OpenAiConfig { kind: Some("local".into()), ..ok.clone() }, "generator.kind"),
        ];
        for (cfg, key) in cases {
            match cfg.validate() {
                Err(Error::Spec { key: k, msg }) => {
                    assert_eq!(k, key);
                    assert!(!msg.is_empty());
                }
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_key_variable_is_named_and_a_key_is_never_shown() {
        let var = "FURNACE_EVALS_TEST_KEY_UNSET_7f3a";
        let cfg = OpenAiConfig { api_key_env: Some(var.into()), ..OpenAiConfig::new("http://127.0.0.1:9/v1", "m") };
        let e = OpenAiGenerator::new(cfg.clone()).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains("generator.api_key_env"), "{e}");
        // A variable that is always set stands for the key (set_var would race other tests).
        let key = std::env::var("PATH").unwrap();
        let g = OpenAiGenerator::new(OpenAiConfig { api_key_env: Some("PATH".into()), ..cfg }).unwrap();
        let shown = format!("{g:?}");
        assert!(!shown.contains(key.trim()) && shown.contains("<hidden>"), "{shown}");
        assert_eq!(g.url(), "http://127.0.0.1:9/v1/chat/completions");
    }

    #[test]
    fn answers_parse_and_missing_usage_is_estimated() {
        let full = r#"{"choices":[{"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let out = parse_answer(full, 40, 0.5).unwrap();
        assert_eq!((out.text.as_str(), out.prompt_tokens, out.completion_tokens, out.finish_reason.as_str()), ("Paris.", 12, 3, "stop"));
        let bare = r#"{"choices":[{"message":{"content":"abcdefghi"},"finish_reason":"length"}]}"#;
        let out = parse_answer(bare, 40, 0.5).unwrap();
        assert_eq!((out.prompt_tokens, out.completion_tokens), (10, 3));
        assert!(parse_answer(r#"{"choices":[]}"#, 1, 0.0).unwrap_err().contains("no choices"));
        assert!(parse_answer("<html>", 1, 0.0).unwrap_err().contains("not a chat completion"));
    }

    #[test]
    fn server_messages_retry_after_and_backoff() {
        assert_eq!(server_message(r#"{"error":{"message":"bad model","type":"invalid_request_error"}}"#), "bad model");
        assert_eq!(server_message(r#"{"detail":"nope"}"#), "nope");
        assert_eq!(server_message("  "), "(empty body)");
        assert_eq!(parse_retry_after("1"), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER));
        for a in 0..12 {
            let d = backoff(a);
            let full = (0.5 * 2f64.powi(a as i32)).min(30.0);
            assert!(d.as_secs_f64() >= full / 2.0 - 1e-9 && d.as_secs_f64() <= full + 1e-9, "{a}: {d:?}");
        }
        // Jitter: not the same wait twice in a row (20 draws).
        let waits: std::collections::HashSet<_> = (0..20).map(|_| backoff(3)).collect();
        assert!(waits.len() > 10);
    }

    #[test]
    fn cost_from_the_prices() {
        let out = GenOutput { prompt_tokens: 1_000_000, completion_tokens: 500_000, ..GenOutput::default() };
        let g = OpenAiGenerator::new(OpenAiConfig::new("http://127.0.0.1:9/v1", "m")).unwrap();
        assert_eq!(g.cost(&out), None);
        let priced = OpenAiConfig {
            input_price_per_million: Some(0.15),
            output_price_per_million: Some(0.6),
            ..OpenAiConfig::new("http://127.0.0.1:9/v1", "m")
        };
        let g = OpenAiGenerator::new(priced).unwrap();
        assert!((g.cost(&out).unwrap() - 0.45).abs() < 1e-12);
    }
}
