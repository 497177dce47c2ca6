//! `furnace serve` against the official OpenAI Python client (`openai` from pip, in the
//! tests' virtualenv), over loopback: real server process, real model, real client.

use furnace_testutil::{repo_root, testdata};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The tests' virtualenv python (made by `scripts/py-venv.sh` when missing; fails loudly).
fn python() -> PathBuf {
    let root = repo_root();
    let out = Command::new("bash").arg(root.join("scripts/py-venv.sh")).current_dir(&root).output().expect("bash");
    assert!(
        out.status.success(),
        "scripts/py-venv.sh failed (these tests need the openai client from pip):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    root.join("target/py-venv/bin/python")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A `furnace serve` process, stopped with SIGINT when dropped.
pub(crate) struct Server {
    child: Child,
    /// The API's root, `http://127.0.0.1:PORT/v1`.
    pub(crate) url: String,
    log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `furnace serve` with `args` on a free port and waits until it serves.
    pub(crate) fn start(runs: &std::path::Path, args: &[&str]) -> Server {
        let port = free_port().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_furnace"))
            .args(["serve", "--port", &port, "--runs-dir", runs.to_str().expect("utf8")])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("furnace serve");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        loop {
            match log.recv_timeout(Duration::from_secs(300)) {
                Ok(line) if line.starts_with("serving ") => break,
                Ok(line) => seen.push(line),
                Err(_) => panic!("furnace serve did not start:\n{}", seen.join("\n")),
            }
        }
        Server { child, url: format!("http://127.0.0.1:{port}/v1"), log }
    }

    /// SIGINT, then the exit status and the rest of stderr.
    pub(crate) fn stop(self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
        self.wait_exit()
    }

    /// Waits (30 s at most) for the process to end: its exit status and the rest of stderr.
    pub(crate) fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let rest: Vec<String> = self.log.try_iter().collect();
                return (status, rest.join("\n"));
            }
            assert!(started.elapsed() < Duration::from_secs(30), "furnace serve did not stop within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Server {
    /// One HTTP/1.1 exchange with the server (`path` under its root, e.g. `/v1/models`): the
    /// status and the body.
    pub(crate) fn http(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
        use std::io::{Read, Write};
        let authority = self.url.trim_start_matches("http://").trim_end_matches("/v1");
        let mut s = std::net::TcpStream::connect(authority).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, body.to_string())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the files of a fixture folder (one level) into `to`.
pub(crate) fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Runs a client script with the venv's python; returns what it printed as JSON.
fn client(script: &str, args: &[&str]) -> serde_json::Value {
    let path = repo_root().join("crates/furnace-cli/tests/it").join(script);
    let out = Command::new(python()).arg(&path).args(args).output().expect("python");
    assert!(out.status.success(), "{script} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_official_openai_client_chats_completes_embeds_and_gets_typed_errors() {
    let runs = tempfile::tempdir().expect("tempdir");
    let adapter = testdata().join("lora_adapter");
    let adapter_arg = format!("tuned={}", adapter.display());
    let server = Server::start(
        runs.path(),
        // f32 weights: a greedy request gets the same tokens in a mixed batch as alone. (With
        // quantized weights the kernel depends on how many rows a step carries, which can
        // flip a near-tie token; see docs/serving.md.)
        &["--dtype", "f32", "--adapter", &adapter_arg, "--embedding-model", "all-minilm-l6-v2", "--allow-adapter-loading"],
    );
    let seen =
        client("openai_client.py", &[&server.url, "smollm2-135m-instruct", "tuned", "all-minilm-l6-v2", adapter.to_str().expect("utf8")]);
    assert!(seen["chat"].as_str().expect("chat").contains("Paris"), "{seen}");
    assert_eq!(seen["embedding_dim"], 384);
    assert_eq!(seen["n3"].as_array().expect("n3").len(), 3);
    assert_eq!(seen["runtime_adapters"], "ok");
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
    // Every chat completion was logged; the rated one exports as a training conversation.
    let out = runs.path().join("rated.jsonl");
    let export = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .args(["conversations", "export", "--format", "chat-jsonl", "--min-rating", "5", "--out"])
        .arg(&out)
        .arg("--runs-dir")
        .arg(runs.path())
        .output()
        .expect("furnace conversations export");
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let text = std::fs::read_to_string(&out).expect("export");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    let messages = lines[0]["messages"].as_array().expect("messages");
    assert_eq!(messages[0]["content"], "What is the capital of France?");
    assert_eq!(messages.last().expect("reply")["role"], "assistant");
    assert_eq!(messages.last().expect("reply")["content"], seen["chat"]);
    let list = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .args(["conversations", "list", "--json", "--runs-dir"])
        .arg(runs.path())
        .output()
        .expect("furnace conversations list");
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.matches("chatcmpl-").count() >= 10, "{listed}");
}

/// 64 streaming clients at once, half of them hanging up mid-stream: every other stream
/// completes, the hung-up clients' slots are freed (64 requests right after are all
/// admitted), and a burst past the queue gets 429 with Retry-After while everything
/// admitted completes.
#[test]
fn sixty_four_streams_complete_hang_ups_free_their_slots_and_overflow_gets_429() {
    let runs = tempfile::tempdir().expect("tempdir");
    // At most 16 + 48 = 64 requests queued or running.
    let server = Server::start(runs.path(), &["--max-batch", "16", "--max-queue", "48"]);
    let seen = client("openai_load.py", &[&server.url, "smollm2-135m-instruct", "64", "64"]);
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["completed"], 32, "{seen}");
    assert_eq!(seen["hung_up"], 32, "{seen}");
    assert_eq!(seen["admitted_after_hangups"], 64, "{seen}");
    let limited = seen["rate_limited"].as_u64().expect("count");
    assert!(limited >= 1, "a burst of 80 over a queue of 64 got no 429: {seen}");
    assert_eq!(seen["admitted"].as_u64().expect("count") + limited, 80, "{seen}");
    assert!(seen["retry_after"].as_array().expect("list").iter().all(|r| r == "1"), "{seen}");
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
}

/// Upload → query → RAG chat returns the uploaded passage as a source; delete removes it.
#[test]
fn uploaded_documents_are_queried_and_ground_retrieval_chats() {
    let runs = tempfile::tempdir().expect("tempdir");
    let server = Server::start(runs.path(), &[]);
    let seen = client("openai_rag.py", &[&server.url, "smollm2-135m-instruct"]);
    assert_eq!(seen["query_top"], "secret.txt", "{seen}");
    assert_eq!(seen["after_delete"], 2, "{seen}");
    // The collection is on disk in the runs folder, named.
    assert!(runs.path().join("collections/notes.index").is_file());
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
}

/// On a model with random weights (tiny qwen2), constrained decoding still gives valid tool
/// calls (required, named, streamed) and JSON that validates against the schema.
#[test]
fn forced_tool_calls_and_json_schemas_hold_on_random_weights() {
    let runs = tempfile::tempdir().expect("tempdir");
    let model = testdata().join("tiny-qwen2");
    let server = Server::start(runs.path(), &["--model", model.to_str().expect("utf8"), "--name", "tiny", "--dtype", "f32"]);
    let seen = client("openai_tools.py", &[&server.url, "tiny"]);
    assert!(seen["json_schema"]["age"].is_i64(), "{seen}");
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");

    // The same through a chat template that renders `tools` itself (Qwen2.5's way) and the
    // assistant's earlier calls (arguments as an object).
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&model, dir.path());
    let template = r#"{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;
    std::fs::write(dir.path().join("chat_template.jinja"), template).expect("template");
    let server = Server::start(runs.path(), &["--model", dir.path().to_str().expect("utf8"), "--name", "tiny", "--dtype", "f32"]);
    client("openai_tools.py", &[&server.url, "tiny"]);
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
}

/// SIGINT drains: a request arriving while a stream still runs gets 503 with Retry-After
/// (the client's InternalServerError, retried elsewhere), the running stream finishes with
/// `[DONE]`, and the server exits 0.
#[test]
fn a_stopping_server_answers_503_and_finishes_running_streams() {
    let runs = tempfile::tempdir().expect("tempdir");
    let server = Server::start(runs.path(), &[]);
    let authority = server.url.trim_start_matches("http://").trim_end_matches("/v1").to_string();
    let (tx, rx) = mpsc::channel();
    let streamer = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&authority).expect("connect");
        let body =
            r#"{"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "stream": true}"#;
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut first = [0u8; 512];
        let n = s.read(&mut first).expect("first bytes");
        tx.send(()).expect("signal");
        let mut rest = String::new();
        s.read_to_string(&mut rest).expect("read");
        format!("{}{rest}", String::from_utf8_lossy(&first[..n]))
    });
    rx.recv_timeout(Duration::from_secs(300)).expect("the stream started");
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
    std::thread::sleep(Duration::from_millis(300));
    let body = serde_json::json!({"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 2});
    let (status, answer) = server.http("POST", "/v1/completions", Some(&body));
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("shutting down"), "{answer}");
    let streamed = streamer.join().expect("stream thread");
    assert!(streamed.contains("data: [DONE]"), "the running stream was cut: {streamed}");
    let (status, rest) = server.wait_exit();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
}
