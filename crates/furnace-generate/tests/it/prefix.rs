//! Prefix caching: a request whose prompt shares a prefix with an earlier one starts from
//! the cached KV and gets exactly the tokens it gets without the cache (f32 models), for
//! greedy and seeded sampled requests; adapters never share entries; the budget holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{smollm2, smollm2_owned, tiny, write_adapter};
use furnace_generate::prefix::BLOCK;
use furnace_generate::{Engine, EngineHandle, EngineOptions, Event, Output, PrefixStats, Request, SamplingParams, ServiceOptions};
use furnace_model::LoadedModel;

const SYSTEM: &str = "You are a careful assistant for a small bakery in Lyon. You answer questions about \
opening hours, bread, pastries, cakes to order, allergens and prices. Opening hours: Tuesday to Saturday \
from seven in the morning to seven in the evening, Sunday from seven to one, closed on Mondays. Cakes to \
order need three days' notice. Every product may contain traces of nuts, sesame and milk. Be brief and \
polite, and answer in the language of the question.";

fn chat(m: &LoadedModel, question: &str) -> Vec<u32> {
    let text = format!("<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n");
    m.tokenizer.encode(&text, false).expect("encode")
}

fn greedy(prompt: Vec<u32>, n: usize, adapter: Option<&str>) -> Request {
    Request {
        prompt,
        params: SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(n) },
        adapter: adapter.map(str::to_string),
        constraint: None,
    }
}

fn sampled(prompt: Vec<u32>, n: usize, seed: u64) -> Request {
    Request {
        prompt,
        params: SamplingParams { temperature: 0.8, top_p: 0.95, seed: Some(seed), max_tokens: n, stop_at_eos: false, ..Default::default() },
        adapter: None,
        constraint: None,
    }
}

/// Runs the requests one after the other (each after the previous finished) on one engine.
fn one_by_one(engine: &mut Engine<'_>, reqs: &[Request]) -> Vec<Output> {
    reqs.iter()
        .map(|r| {
            engine.add(r.clone()).expect("add");
            engine.run(&mut |_| {}).expect("run").pop().expect("output")
        })
        .collect()
}

fn opts(prefix_cache_bytes: usize) -> EngineOptions {
    EngineOptions { max_batch: 4, prefill_chunk: 40, prefix_cache_bytes }
}

#[test]
fn shared_prefix_gives_the_same_tokens_with_and_without_the_cache() -> anyhow::Result<()> {
    let m = smollm2();
    let (a, b, c) =
        (chat(m, "When are you open on Sunday?"), chat(m, "Do your croissants contain nuts?"), chat(m, "Can I order a cake for tomorrow?"));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared >= 3 * BLOCK, "the system prompt spans a few blocks ({shared} tokens)");
    let reqs = vec![greedy(a.clone(), 12, None), greedy(b.clone(), 12, None), sampled(c.clone(), 12, 7), greedy(b.clone(), 12, None)];

    let mut off = Engine::new(&m.model, &m.tokenizer, opts(0));
    let want = one_by_one(&mut off, &reqs);
    assert_eq!(off.prefix_stats(), PrefixStats::default(), "a cache of 0 bytes is off");

    let mut on = Engine::new(&m.model, &m.tokenizer, opts(256 << 20));
    let got = one_by_one(&mut on, &reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.new_ids, w.new_ids, "request {i}");
        assert_eq!(g.text, w.text, "request {i}");
    }
    let stats = on.prefix_stats();
    // The first request misses; the others reuse the system prompt's whole blocks; the
    // repeated prompt reuses its own blocks (all but the last token at most).
    assert_eq!((stats.hits, stats.misses), (3, 1), "{stats:?}");
    let blocks = |n: usize| (n / BLOCK * BLOCK) as u64;
    let repeat = ((b.len() - 1) / BLOCK * BLOCK) as u64;
    assert_eq!(stats.tokens_reused, 2 * blocks(shared) + repeat, "{stats:?}");
    assert!(stats.bytes > 0 && stats.bytes <= 256 << 20 && stats.entries >= 1, "{stats:?}");

    // In one batch with a second copy of the prompts (they join after the first ones have
    // prefilled, max_batch 4), the tokens are the same too.
    let mut batch = Engine::new(&m.model, &m.tokenizer, EngineOptions { max_batch: 4, ..opts(256 << 20) });
    for r in reqs.iter().chain(&reqs) {
        batch.add(r.clone())?;
    }
    let out = batch.run(&mut |_| {})?;
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.new_ids, want[i % reqs.len()].new_ids, "request {i} in a batch");
    }
    assert!(batch.prefix_stats().hits >= 4, "{:?}", batch.prefix_stats());
    Ok(())
}

#[test]
fn adapters_never_share_cached_prefixes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut m = smollm2_owned();
    write_adapter(&dir.path().join("a"), &m.model, 4, &["q_proj", "k_proj", "v_proj"], 1);
    write_adapter(&dir.path().join("b"), &m.model, 4, &["k_proj", "v_proj"], 2);
    let a = m.model.add_adapter(&furnace_model::load_adapter(&dir.path().join("a"))?)?;
    let b = m.model.add_adapter(&furnace_model::load_adapter(&dir.path().join("b"))?)?;
    let (p, q) = (chat(&m, "When are you open on Sunday?"), chat(&m, "Do your croissants contain nuts?"));
    let reqs = vec![
        greedy(p.clone(), 10, Some("a")),
        greedy(q.clone(), 10, Some("b")),
        greedy(q.clone(), 10, None),
        greedy(q.clone(), 10, Some("a")),
    ];
    let engine = |bytes| {
        let mut e = Engine::new(&m.model, &m.tokenizer, opts(bytes));
        e.name_adapter("a", a).expect("a");
        e.name_adapter("b", b).expect("b");
        e
    };
    let mut off = engine(0);
    let want = one_by_one(&mut off, &reqs);
    // The adapters change the tokens, so sharing across them would show.
    assert!(want[1].new_ids != want[2].new_ids || want[2].new_ids != want[3].new_ids);
    let mut on = engine(256 << 20);
    let got = one_by_one(&mut on, &reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.new_ids, w.new_ids, "request {i} ({:?})", reqs[i].adapter);
    }
    // Only the last request (adapter a again) finds a prefix: b and the base model miss.
    let stats = on.prefix_stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (1, 3, 3), "{stats:?}");
    Ok(())
}

#[test]
fn the_budget_is_respected_and_evicts_least_recently_used() -> anyhow::Result<()> {
    let m = tiny();
    let c = &m.model.config;
    let per_token = c.num_layers * c.num_kv_heads * c.head_dim * 2 * 4;
    // Room for one snapshot of two blocks.
    let budget = per_token * 2 * BLOCK + per_token;
    let prompts: Vec<Vec<u32>> = (0..4u64).map(|s| (0..70u64).map(|i| ((i * 97 + s * 1013) % 900 + 5) as u32).collect()).collect();
    let mut reqs: Vec<Request> = prompts.iter().map(|p| greedy(p.clone(), 8, None)).collect();
    // The last prompt again: its snapshot is the one left.
    reqs.push(greedy(prompts[3].clone(), 8, None));
    let want = one_by_one(&mut Engine::new(&m.model, &m.tokenizer, opts(0)), &reqs);
    let mut on = Engine::new(&m.model, &m.tokenizer, opts(budget));
    let got = one_by_one(&mut on, &reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.new_ids, w.new_ids, "request {i}");
    }
    let stats = on.prefix_stats();
    assert!(stats.bytes <= budget, "{stats:?}");
    assert_eq!((stats.entries, stats.evictions, stats.hits, stats.misses), (1, 3, 1, 4), "{stats:?}");
    assert_eq!(stats.tokens_reused, 2 * BLOCK as u64);

    // A budget smaller than one block caches nothing.
    let mut small = Engine::new(&m.model, &m.tokenizer, opts(per_token * BLOCK / 2));
    let got = one_by_one(&mut small, &reqs);
    assert_eq!(got.iter().map(|o| &o.new_ids).collect::<Vec<_>>(), want.iter().map(|o| &o.new_ids).collect::<Vec<_>>());
    let stats = small.prefix_stats();
    assert_eq!((stats.entries, stats.bytes, stats.hits), (0, 0, 0), "{stats:?}");
    Ok(())
}

#[test]
fn the_service_reports_prefix_stats() -> anyhow::Result<()> {
    let m = tiny();
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions::default())?;
    let prompt: Vec<u32> = (0..80u32).map(|i| i * 7 % 500 + 3).collect();
    for _ in 0..2 {
        let (tx, rx) = std::sync::mpsc::channel();
        h.submit(greedy(prompt.clone(), 4, None), Box::new(move |e: Event| drop(tx.send(e))))?;
        assert!(rx.iter().any(|e| matches!(e, Event::Finished { .. })));
    }
    let stats = h.prefix_stats()?;
    assert_eq!((stats.hits, stats.misses, stats.tokens_reused), (1, 1, 2 * BLOCK as u64), "{stats:?}");
    assert_eq!(stats.entries, 1);
    // An adapter's prefixes leave with it.
    let dir = tempfile::tempdir()?;
    write_adapter(dir.path(), &tiny().model, 2, &["k_proj", "v_proj"], 3);
    h.load_adapter("a", dir.path())?;
    let mut req = greedy(prompt.clone(), 4, Some("a"));
    req.prompt.push(9);
    let (tx, rx) = std::sync::mpsc::channel();
    h.submit(req, Box::new(move |e: Event| drop(tx.send(e))))?;
    assert!(rx.iter().any(|e| matches!(e, Event::Finished { .. })));
    let stats = h.prefix_stats()?;
    assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 2), "another adapter misses: {stats:?}");
    h.unload_adapter("a")?;
    let left = h.prefix_stats()?;
    assert_eq!(left.entries, 1, "{left:?}");
    assert!(left.bytes < stats.bytes);
    h.shutdown()?;
    Ok(())
}

/// Time to first token of a second request sharing a 1,000-token system prompt, with and
/// without the prefix cache. A measurement, not a check: run it in release with
/// `cargo test --release -p furnace-generate --test it ttft -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement"]
fn ttft_with_a_shared_1000_token_system_prompt() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let m = smollm2();
    let mut system = String::new();
    while m.tokenizer.encode(&system, false)?.len() < 1000 {
        system.push_str(SYSTEM);
        system.push(' ');
    }
    let ids = m.tokenizer.encode(&system, false)?;
    let system = m.tokenizer.decode(&ids[..1000], false)?;
    let prompt = |q: &str| {
        let text = format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
        m.tokenizer.encode(&text, false).expect("encode")
    };
    let (p1, p2) = (prompt("When are you open on Sunday?"), prompt("Do your croissants contain nuts?"));
    // Time from add to the first token event.
    let ttft = |engine: &mut Engine<'_>, p: &[u32]| -> Duration {
        engine.add(greedy(p.to_vec(), 8, None)).expect("add");
        let t0 = Instant::now();
        let mut first = None;
        while engine.has_work() {
            engine
                .step(&mut |e| {
                    if matches!(e, Event::Token { .. }) && first.is_none() {
                        first = Some(t0.elapsed());
                    }
                })
                .expect("step");
        }
        engine.take_finished();
        first.expect("a token")
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("prompts: {} and {} tokens", p1.len(), p2.len());
    for bytes in [0usize, 256 << 20] {
        let opts = EngineOptions { prefix_cache_bytes: bytes, ..EngineOptions::default() };
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut engine = Engine::new(&m.model, &m.tokenizer, opts.clone());
            let first = ttft(&mut engine, &p1);
            let second = ttft(&mut engine, &p2);
            runs.push((ms(first), ms(second), engine.prefix_stats()));
        }
        let median = |f: &dyn Fn(&(f64, f64, PrefixStats)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "prefix cache {:>4} MiB: TTFT first request {:7.1} ms, second request {:7.1} ms (median of 3); stats {:?}",
            bytes >> 20,
            median(&|r| r.0),
            median(&|r| r.1),
            runs[0].2
        );
    }
    Ok(())
}
