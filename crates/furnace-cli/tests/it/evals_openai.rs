//! Evals mode's OpenAI-compatible generator against the real `furnace serve` (SmolLM2 on
//! loopback): answers with usage, latency and cost; and its requests-per-minute limit
//! holding as the server saw it (arrival times from the server's conversation log).

use crate::serve::Server;
use furnace_evals::generator::{GenRequest, Message, Sampling};
use furnace_evals::openai::{OpenAiConfig, OpenAiGenerator};
use std::process::Command;
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m-instruct";

fn ask(question: &str, max_tokens: usize) -> GenRequest {
    GenRequest {
        messages: vec![
            Message { role: "system".into(), content: "Answer in one short sentence.".into() },
            Message { role: "user".into(), content: question.into() },
        ],
        sampling: Sampling { max_tokens, ..Sampling::default() },
    }
}

/// The most of `stamps` (seconds) in any window `[t, t + w)`.
fn most_in_window(stamps: &[i64], w: i64) -> usize {
    stamps.iter().map(|&s| stamps.iter().filter(|&&t| t >= s && t < s + w).count()).max().unwrap_or(0)
}

#[test]
fn the_openai_generator_answers_from_furnace_serve_within_its_requests_per_minute() {
    let runs = tempfile::tempdir().expect("tempdir");
    let server = Server::start(runs.path(), &[]);

    // Six greedy questions, three at a time: text, usage, latency and cost.
    let cfg = OpenAiConfig {
        concurrency: 3,
        input_price_per_million: Some(0.15),
        output_price_per_million: Some(0.60),
        ..OpenAiConfig::new(&server.url, MODEL)
    };
    let g = OpenAiGenerator::new(cfg).expect("generator");
    let questions = [
        "What is the capital of France?",
        "What colour is the sky on a clear day?",
        "How many legs does a spider have?",
        "What is 2 + 2?",
        "Name a planet of the solar system.",
        "What do bees make?",
    ];
    let reqs: Vec<GenRequest> = questions.iter().map(|q| ask(q, 24)).collect();
    let mut done = Vec::new();
    let out = g.generate(&reqs, &mut |i| done.push(i));
    done.sort();
    assert_eq!(done, (0..6).collect::<Vec<_>>());
    for (q, o) in questions.iter().zip(&out) {
        let o = o.as_ref().unwrap_or_else(|e| panic!("{q}: {e}"));
        assert!(!o.text.trim().is_empty(), "{q}: {o:?}");
        assert!(o.prompt_tokens > 0 && o.completion_tokens > 0 && o.completion_tokens <= 24, "{q}: {o:?}");
        assert!(o.latency > 0.0, "{q}: {o:?}");
        assert!(["stop", "length"].contains(&o.finish_reason.as_str()), "{q}: {o:?}");
        let cost = g.cost(o).expect("priced");
        let expected = (o.prompt_tokens as f64 * 0.15 + o.completion_tokens as f64 * 0.60) / 1e6;
        assert!((cost - expected).abs() < 1e-15 && cost > 0.0, "{cost} vs {expected}");
    }
    // rpm = 6, nine requests at once: six go, the other three wait for the window.
    let cfg = OpenAiConfig { rpm: Some(6), concurrency: 9, ..OpenAiConfig::new(&server.url, MODEL) };
    let g = OpenAiGenerator::new(cfg).expect("generator");
    let reqs: Vec<GenRequest> = (0..9).map(|i| ask(&format!("rate-limited request {i}: say hi"), 1)).collect();
    let started = Instant::now();
    let out = g.generate(&reqs, &mut |_| {});
    let took = started.elapsed();
    for o in &out {
        let o = o.as_ref().expect("answered");
        assert_eq!(o.completion_tokens, 1, "{o:?}");
    }
    assert!(took >= Duration::from_secs(60), "9 requests at 6 a minute took {took:?}");
    // One window of waiting, not two: generous, since on a loaded 2-core machine (the other
    // tests running beside this one) each answer alone can take tens of seconds.
    assert!(took < Duration::from_secs(120), "9 requests at 6 a minute waited two windows: {took:?}");
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");

    // When the server started each one (its conversation log, in whole seconds).
    let list = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .args(["conversations", "list", "--json", "--runs-dir"])
        .arg(runs.path())
        .output()
        .expect("furnace conversations list");
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).expect("json");
    let mut created: Vec<i64> = rows
        .iter()
        .filter(|r| r["messages"].to_string().contains("rate-limited request"))
        .map(|r| r["created"].as_i64().expect("created"))
        .collect();
    created.sort();
    assert_eq!(created.len(), 9, "{rows:?}");
    let first = created[0];
    let offsets: Vec<i64> = created.iter().map(|c| c - first).collect();
    let most = most_in_window(&created, 60);
    eprintln!("server-side starts (s after the first): {offsets:?}; most in any 60 s window: {most}; the 9 took {took:?}");
    assert_eq!(most, 6, "{offsets:?}");
    // The seventh waited for the first to leave the window, and so on.
    for i in 0..3 {
        assert!(created[i + 6] - created[i] >= 60, "{offsets:?}");
    }
}
