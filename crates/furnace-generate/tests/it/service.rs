//! The engine service: requests from many threads, streaming sinks, aborts, adapters by
//! name with a budget of resident adapters, and how the engine thread ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{greedy_cases, smollm2, smollm2_owned, tiny, write_adapter};
use furnace_generate::{
    generate, Engine, EngineHandle, EngineOptions, Error, Event, FinishReason, Request, SamplingParams, ServiceOptions, Sink,
};
use furnace_testutil::testdata;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

/// What one request streamed.
#[derive(Debug, PartialEq)]
struct Streamed {
    ids: Vec<u32>,
    text: String,
    reason: FinishReason,
}

/// A sink that forwards events to a channel.
fn channel_sink() -> (Sink, Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let sink: Sink = Box::new(move |e| {
        let _ = tx.send(e);
    });
    (sink, rx)
}

/// Reads a request's events until its sink is dropped: exactly one `Finished`, the last.
fn collect(rx: Receiver<Event>) -> Streamed {
    let (mut ids, mut text, mut reason) = (Vec::new(), String::new(), None);
    for e in rx {
        assert!(reason.is_none(), "an event after Finished: {e:?}");
        match e {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Finished { text: t, reason: r, .. } => {
                text.push_str(&t);
                reason = Some(r);
            }
        }
    }
    Streamed { ids, text, reason: reason.expect("a Finished event") }
}

fn run(h: &EngineHandle, req: Request) -> Streamed {
    let (sink, rx) = channel_sink();
    h.submit(req, sink).expect("submit");
    collect(rx)
}

fn greedy(prompt: Vec<u32>, max_tokens: usize, adapter: Option<&str>) -> Request {
    Request {
        prompt,
        params: SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(max_tokens) },
        adapter: adapter.map(str::to_string),
        constraint: None,
    }
}

/// Holds the engine thread inside the sink of a request, at each of its tokens, until the
/// test lets the step finish: commands sent meanwhile are taken when it does.
struct Gate(Sender<()>);

/// A sink that forwards events, then holds the engine at every token until [`Gate::tick`].
fn gated_sink() -> (Sink, Receiver<Event>, Gate) {
    let (events, rx) = mpsc::channel();
    let (gate, held) = mpsc::channel::<()>();
    let sink: Sink = Box::new(move |e| {
        let token = matches!(e, Event::Token { .. });
        let _ = events.send(e);
        if token {
            let _ = held.recv();
        }
    });
    (sink, rx, Gate(gate))
}

impl Gate {
    /// Lets the held step finish.
    fn tick(&self) {
        let _ = self.0.send(());
    }

    /// Runs a handle call that waits for the engine on another thread, letting the engine
    /// step until the call returns.
    fn during<T: Send>(&self, call: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let t = s.spawn(call);
            while !t.is_finished() {
                self.tick();
                std::thread::sleep(Duration::from_millis(20));
            }
            t.join().expect("the call")
        })
    }
}

#[test]
fn requests_from_many_threads_get_the_borrowed_engines_greedy_tokens() -> anyhow::Result<()> {
    let m = smollm2();
    let cases = greedy_cases();
    let mut reqs: Vec<Request> = cases
        .iter()
        .map(|(prompt, new_ids, _)| Request {
            prompt: prompt.clone(),
            params: SamplingParams::greedy(new_ids.len()),
            adapter: None,
            constraint: None,
        })
        .collect();
    for other in ["Hi", "Tell me a long story about a dragon and a knight.", "1+1="] {
        reqs.push(Request {
            prompt: m.tokenizer.encode(other, false)?,
            params: SamplingParams::greedy(12),
            adapter: None,
            constraint: None,
        });
    }
    let borrowed = generate(&m.model, &m.tokenizer, reqs.clone(), EngineOptions::default())?;
    let owned = smollm2_owned();
    let opts = ServiceOptions { engine: EngineOptions { max_batch: 3, prefill_chunk: 16, ..Default::default() }, ..Default::default() };
    let h = EngineHandle::spawn(owned.model, &owned.tokenizer, opts)?;
    let got: Vec<Streamed> = std::thread::scope(|s| {
        let threads: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (h, r) = (h.clone(), r.clone());
                s.spawn(move || run(&h, r))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("thread")).collect()
    });
    for (i, (g, b)) in got.iter().zip(&borrowed).enumerate() {
        assert_eq!(g.ids, b.new_ids, "request {i}");
        assert_eq!(g.text, b.text, "request {i}");
        assert_eq!(g.reason, b.finish_reason, "request {i}");
    }
    for (g, (_, new_ids, _)) in got.iter().zip(&cases) {
        assert_eq!(&g.ids, new_ids, "the reference generation");
    }
    Ok(())
}

#[test]
fn per_request_adapters_give_the_borrowed_engines_tokens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut m = tiny();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    write_adapter(&dir_a, &m.model, 4, &["all-linear"], 1);
    write_adapter(&dir_b, &m.model, 2, &["q_proj", "v_proj", "down_proj"], 2);
    let prompts: Vec<Vec<u32>> = vec![vec![1604, 3987, 46477], vec![504, 3575, 282, 4649, 314], vec![6403], vec![42, 43, 44, 45]];
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for adapter in [None, Some("a"), Some("b")] {
            reqs.push(greedy(p.clone(), 10 + i, adapter));
        }
    }
    let sampled = SamplingParams { temperature: 1.0, top_k: 40, seed: Some(5), max_tokens: 12, stop_at_eos: false, ..Default::default() };
    reqs.push(Request { prompt: prompts[1].clone(), params: sampled, adapter: Some("b".into()), constraint: None });

    // The borrowed engine: adapters registered in the model, named in the engine.
    let a = m.model.add_adapter(&furnace_model::load_adapter(&dir_a)?)?;
    let b = m.model.add_adapter(&furnace_model::load_adapter(&dir_b)?)?;
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    engine.name_adapter("a", a)?;
    engine.name_adapter("b", b)?;
    for r in &reqs {
        engine.add(r.clone())?;
    }
    let borrowed = engine.run(&mut |_| {})?;
    // The adapters change what is generated, so the comparison below can fail.
    let differs = |k: usize| (0..prompts.len()).any(|p| borrowed[3 * p].new_ids != borrowed[3 * p + k].new_ids);
    assert!(differs(1) && differs(2));

    let fresh = tiny();
    let opts = ServiceOptions { engine: EngineOptions { max_batch: 4, prefill_chunk: 2, ..Default::default() }, max_adapters: 2 };
    let h = EngineHandle::spawn(fresh.model, &fresh.tokenizer, opts)?;
    h.load_adapter("a", &dir_a)?;
    h.load_adapter("b", &dir_b)?;
    let got: Vec<Streamed> = std::thread::scope(|s| {
        let threads: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (h, r) = (h.clone(), r.clone());
                s.spawn(move || run(&h, r))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("thread")).collect()
    });
    for (i, (g, b)) in got.iter().zip(&borrowed).enumerate() {
        assert_eq!(g.ids, b.new_ids, "request {i} ({:?})", reqs[i].adapter);
        assert_eq!(g.text, b.text, "request {i}");
    }
    Ok(())
}

#[test]
fn rejected_requests_are_errors_of_submit() -> anyhow::Result<()> {
    let m = tiny();
    let max = m.model.config.max_position_embeddings;
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions::default())?;
    let submit = |req| {
        let (sink, rx) = channel_sink();
        let r = h.submit(req, sink);
        assert!(rx.recv().is_err(), "a rejected request's sink is dropped unused");
        r
    };
    assert!(matches!(submit(greedy(vec![5], 4, Some("nope"))), Err(Error::UnknownAdapter(n)) if n == "nope"));
    assert!(matches!(submit(greedy(vec![], 4, None)), Err(Error::EmptyPrompt)));
    assert!(matches!(submit(greedy(vec![5; max + 1], 4, None)), Err(Error::PromptTooLong { .. })));
    let bad = Request { prompt: vec![5], params: SamplingParams { top_p: 0.0, ..Default::default() }, adapter: None, constraint: None };
    assert!(matches!(submit(bad), Err(Error::InvalidParams(_))));
    // Adapters that cannot be read, or do not fit the model.
    let empty = tempfile::tempdir()?;
    let e = h.load_adapter("x", empty.path()).expect_err("no adapter there").to_string();
    assert!(e.contains("loading adapter") && e.contains("adapter_config.json"), "{e}");
    let e = h.load_adapter("x", &testdata().join("lora_adapter")).expect_err("another model's adapter").to_string();
    assert!(e.contains("do not fit"), "{e}");
    assert!(matches!(h.unload_adapter("x"), Err(Error::UnknownAdapter(_))));
    assert!(h.adapters()?.is_empty());
    // The engine still serves.
    let out = run(&h, greedy(vec![5, 6], 3, None));
    assert_eq!((out.ids.len(), out.reason), (3, FinishReason::Length));
    Ok(())
}

#[test]
fn abort_ends_a_request_before_the_next_step() -> anyhow::Result<()> {
    let m = tiny();
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions::default())?;
    let (other_sink, other_rx) = channel_sink();
    h.submit(greedy(vec![504, 3575], 5, None), other_sink)?;
    let (sink, rx, gate) = gated_sink();
    let id = h.submit(greedy(vec![1604, 3987], 400, None), sink)?;
    // The engine is now held inside the step that sampled the first token.
    assert!(matches!(rx.recv()?, Event::Token { .. }));
    h.abort(id)?;
    h.abort(123_456)?; // ids that are not running are ignored
    gate.tick();
    let rest = collect(rx);
    assert_eq!(rest.reason, FinishReason::Abort);
    assert!(rest.ids.is_empty(), "no token after the abort: {:?}", rest.ids);
    // The other request goes on.
    let other = collect(other_rx);
    assert_eq!((other.ids.len(), other.reason), (5, FinishReason::Length));
    Ok(())
}

#[test]
fn adapters_load_unload_and_evict_the_least_recently_used() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        write_adapter(&dir.path().join(name), &m.model, 4, &["all-linear"], 10 + i as u64);
    }
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions { max_adapters: 2, ..Default::default() })?;
    let resident = || -> Vec<(String, bool)> { h.adapters().expect("list").into_iter().map(|a| (a.name, a.resident)).collect() };
    let expect = |v: [(&str, bool); 3]| v.map(|(n, r)| (n.to_string(), r)).to_vec();
    let prompt = vec![1604, 3987, 46477];
    h.load_adapter("a", &dir.path().join("a"))?;
    h.load_adapter("b", &dir.path().join("b"))?;
    let with_a = run(&h, greedy(prompt.clone(), 8, Some("a")));
    let with_b = run(&h, greedy(prompt.clone(), 8, Some("b")));
    assert_ne!(with_a.ids, with_b.ids, "different adapters, different tokens");
    // A third adapter evicts the least recently used one: a.
    h.load_adapter("c", &dir.path().join("c"))?;
    assert_eq!(resident(), expect([("a", false), ("b", true), ("c", true)]));
    // A request for a reads it again (evicting b) and gets the same tokens as before.
    assert_eq!(run(&h, greedy(prompt.clone(), 8, Some("a"))), with_a);
    assert_eq!(resident(), expect([("a", true), ("b", false), ("c", true)]));
    let info = h.adapters()?;
    assert_eq!(info[0].dir, dir.path().join("a"));
    assert!(info.iter().all(|i| i.requests == 0));
    // Unloading forgets the name.
    h.unload_adapter("c")?;
    assert!(matches!(h.submit(greedy(prompt.clone(), 2, Some("c")), channel_sink().0), Err(Error::UnknownAdapter(_))));
    assert_eq!(h.adapters()?.len(), 2);

    // Adapters of queued or running requests are never evicted or unloaded.
    let (sink, held_rx, gate) = gated_sink();
    let held = h.submit(greedy(prompt.clone(), 400, Some("a")), sink)?;
    assert!(matches!(held_rx.recv()?, Event::Token { .. }));
    let (sink_b, rx_b) = channel_sink();
    let running_b = gate.during(|| h.submit(greedy(prompt.clone(), 400, Some("b")), sink_b))?;
    let e = gate.during(|| h.load_adapter("c", &dir.path().join("c"))).expect_err("budget");
    assert!(matches!(e, Error::AdapterBudget { budget: 2 }), "{e}");
    let e = gate.during(|| h.unload_adapter("a")).expect_err("in use");
    assert!(matches!(e, Error::AdapterInUse { requests: 1, .. }), "{e}");
    let info = gate.during(|| h.adapters())?;
    assert!(info.iter().all(|i| i.resident && i.requests == 1), "{info:?}");
    h.abort(held)?;
    h.abort(running_b)?;
    gate.tick();
    assert_eq!(collect(held_rx).reason, FinishReason::Abort);
    assert_eq!(collect(rx_b).reason, FinishReason::Abort);
    // Free again: c evicts a, the least recently used.
    h.load_adapter("c", &dir.path().join("c"))?;
    assert_eq!(resident(), expect([("a", false), ("b", true), ("c", true)]));
    h.shutdown()?;
    Ok(())
}

#[test]
fn dropping_every_handle_stops_the_engine_and_finishes_pending_requests() -> anyhow::Result<()> {
    let m = tiny();
    let opts = ServiceOptions { engine: EngineOptions { max_batch: 1, ..Default::default() }, ..Default::default() };
    let h = EngineHandle::spawn(m.model, &m.tokenizer, opts)?;
    let h2 = h.clone();
    let (sink, rx, gate) = gated_sink();
    h.submit(greedy(vec![1604, 3987], 400, None), sink)?;
    assert!(matches!(rx.recv()?, Event::Token { .. }));
    // Queued behind the running one (one sequence per step).
    let (queued_sink, queued_rx) = channel_sink();
    let h2_ref = &h2;
    gate.during(move || h2_ref.submit(greedy(vec![504], 5, None), queued_sink))?;
    drop(h);
    drop(h2);
    gate.tick();
    // Both get Finished, and their sinks are dropped: the engine has let go of everything.
    let running = collect(rx);
    assert_eq!(running.reason, FinishReason::Abort);
    assert!(!running.ids.is_empty() && running.ids.len() < 400);
    let queued = collect(queued_rx);
    assert_eq!((queued.ids.len(), queued.reason), (0, FinishReason::Abort));
    Ok(())
}

#[test]
fn shutdown_finishes_pending_requests_and_stops_every_handle() -> anyhow::Result<()> {
    let m = tiny();
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions::default())?;
    let other = h.clone();
    let (sink, rx, gate) = gated_sink();
    h.submit(greedy(vec![1604, 3987], 400, None), sink)?;
    assert!(matches!(rx.recv()?, Event::Token { .. }));
    gate.during(|| h.shutdown())?;
    assert_eq!(collect(rx).reason, FinishReason::Abort);
    assert!(matches!(other.submit(greedy(vec![5], 2, None), channel_sink().0), Err(Error::Stopped)));
    assert!(matches!(other.adapters(), Err(Error::Stopped)));
    assert!(matches!(other.abort(0), Err(Error::Stopped)));
    other.shutdown()?;
    Ok(())
}

#[test]
fn a_panicking_sink_aborts_only_its_request() -> anyhow::Result<()> {
    let m = tiny();
    let h = EngineHandle::spawn(m.model, &m.tokenizer, ServiceOptions::default())?;
    h.submit(greedy(vec![5, 6], 50, None), Box::new(|_| panic!("a sink that fails (the test expects this panic)")))?;
    let out = run(&h, greedy(vec![7, 8], 4, None));
    assert_eq!((out.ids.len(), out.reason), (4, FinishReason::Length));
    h.shutdown()?;
    Ok(())
}

#[test]
fn the_borrowed_engine_names_adapters_and_aborts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut m = tiny();
    write_adapter(dir.path(), &m.model, 2, &["o_proj"], 3);
    let gone = m.model.add_adapter(&furnace_model::load_adapter(dir.path())?)?;
    assert!(m.model.remove_adapter(gone));
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    assert!(engine.name_adapter("gone", gone).is_err(), "an id the model does not have");
    assert!(matches!(engine.add(greedy(vec![5], 2, Some("gone"))), Err(Error::UnknownAdapter(_))));
    let keep = engine.add(greedy(vec![5, 6], 3, None))?;
    let drop_it = engine.add(greedy(vec![7], 30, None))?;
    let mut finished = Vec::new();
    assert!(engine.abort(drop_it, &mut |e| finished.push(e)));
    assert!(!engine.abort(drop_it, &mut |_| {}), "only once");
    assert!(matches!(&finished[..], [Event::Finished { seq, reason: FinishReason::Abort, .. }] if *seq == drop_it));
    let out = engine.run(&mut |_| {})?;
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].new_ids.len(), &out[0].finish_reason), (3, &FinishReason::Length));
    assert_eq!((out[1].new_ids.len(), &out[1].finish_reason), (0, &FinishReason::Abort));
    assert!(keep < drop_it);
    Ok(())
}
