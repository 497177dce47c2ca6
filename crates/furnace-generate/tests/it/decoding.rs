//! What an OpenAI-compatible server asks of the engine beyond plain sampling: presence and
//! frequency penalties, log-probabilities, and constrained decoding, on the real model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{greedy_cases, smollm2};
use furnace_generate::{generate, Constraint, Engine, EngineOptions, Event, FinishReason, Output, Request, SamplingParams, TokenLogprob};
use std::collections::HashMap;

fn req(prompt: Vec<u32>, params: SamplingParams) -> Request {
    Request { prompt, params, ..Default::default() }
}

/// Log-softmax (f64) of the model's logits for the token after `ids`, from a fresh forward
/// pass over the whole sequence.
fn reference_log_softmax(ids: &[u32]) -> Vec<f64> {
    let m = smollm2();
    let all = m.model.logits_all(ids).expect("logits");
    let row: Vec<f32> = all.get(ids.len() - 1).expect("row").to_vec1().expect("vec");
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&l| l as f64 - lse).collect()
}

fn max_repeats(ids: &[u32]) -> usize {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &t in ids {
        *counts.entry(t).or_default() += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

#[test]
fn frequency_penalty_breaks_greedy_repetition() -> anyhow::Result<()> {
    let m = smollm2();
    let prompt = m.tokenizer.encode("ha ha ha ha ha ha ha ha ha ha", false)?;
    let n = 24;
    let base = SamplingParams { stop_at_eos: false, ..SamplingParams::greedy(n) };
    let pen = SamplingParams { frequency_penalty: 2.0, presence_penalty: 2.0, ..base.clone() };
    let out =
        generate(&m.model, &m.tokenizer, vec![req(prompt.clone(), base), req(prompt.clone(), pen.clone())], EngineOptions::default())?;
    let (plain, penalised) = (&out[0].new_ids, &out[1].new_ids);
    eprintln!("plain {plain:?}\npenalised {penalised:?}");
    assert_eq!(plain.len(), n);
    assert_eq!(penalised.len(), n);
    // Without penalty the model keeps repeating itself.
    assert!(max_repeats(plain) >= n / 2, "the prompt should make greedy decoding repeat: {plain:?}");
    // Prompt tokens do not count: the first token is the same.
    assert_eq!(plain[0], penalised[0]);
    assert_ne!(plain, penalised);
    // Every repeat costs 2 more: no token comes back more than a few times.
    assert!(max_repeats(penalised) <= 3, "{penalised:?}");
    // Each penalised token is the argmax of the model's logits minus OpenAI's penalty over
    // the tokens generated before it (checked against a fresh forward pass; near-ties are
    // allowed to go either way).
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mut ids = prompt.clone();
    for &t in penalised {
        let mut row = reference_log_softmax(&ids);
        for (&id, &c) in &counts {
            row[id as usize] -= 2.0 * c as f64 + 2.0;
        }
        let best = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(row[t as usize] >= best - 1e-3, "token {t} is not the penalised argmax");
        *counts.entry(t).or_default() += 1;
        ids.push(t);
    }
    Ok(())
}

/// The `Token` events of each sequence: (id, logprob).
type Streamed = HashMap<usize, Vec<(u32, Option<TokenLogprob>)>>;

fn run_collecting(engine: &mut Engine<'_>) -> anyhow::Result<(Vec<Output>, Streamed)> {
    let mut events = Streamed::new();
    let out = engine.run(&mut |ev| {
        if let Event::Token { seq, id, logprob, .. } = ev {
            events.entry(seq).or_default().push((id, logprob));
        }
    })?;
    Ok((out, events))
}

#[test]
fn logprobs_are_the_raw_log_softmax_and_batch_independent() -> anyhow::Result<()> {
    let m = smollm2();
    let (prompt, reference, _) = greedy_cases().remove(0);
    let k = 5;
    let params = SamplingParams { logprobs: Some(k), ..SamplingParams::greedy(reference.len()) };
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    engine.add(req(prompt.clone(), params.clone()))?;
    let (out, events) = run_collecting(&mut engine)?;
    let alone = &out[0];
    assert_eq!(alone.new_ids, reference);
    assert_eq!(alone.logprobs.len(), alone.new_ids.len());
    // The stream and the output agree.
    let streamed = &events[&0];
    assert_eq!(streamed.iter().map(|e| e.0).collect::<Vec<_>>(), alone.new_ids);
    assert_eq!(streamed.iter().map(|e| e.1.clone().expect("logprob")).collect::<Vec<_>>(), alone.logprobs);
    let mut ids = prompt.clone();
    for (&t, lp) in alone.new_ids.iter().zip(&alone.logprobs) {
        assert_eq!(lp.top.len(), k);
        assert_eq!(lp.top[0].0, t, "greedy picks the most likely token");
        assert_eq!(lp.logprob, lp.top[0].1);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "top is sorted");
        assert!(lp.top.iter().all(|&(_, l)| l <= 0.0));
        assert!(lp.top.iter().map(|&(_, l)| (l as f64).exp()).sum::<f64>() <= 1.0 + 1e-6);
        let reference = reference_log_softmax(&ids);
        for &(id, l) in &lp.top {
            assert!((l as f64 - reference[id as usize]).abs() < 1e-3, "token {id}: {l} vs {}", reference[id as usize]);
        }
        ids.push(t);
    }

    // In a mixed batch (other prompts, sampling with penalties, a small prefill chunk) the
    // sequence reports the same log-probabilities as alone.
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions { max_batch: 3, prefill_chunk: 7, ..Default::default() });
    let other = m.tokenizer.encode("Tell me a long story about a dragon.", false)?;
    engine.add(req(
        other.clone(),
        SamplingParams { temperature: 0.9, seed: Some(1), logprobs: Some(3), frequency_penalty: 1.0, ..SamplingParams::greedy(20) },
    ))?;
    engine.add(req(m.tokenizer.encode("1+1=", false)?, SamplingParams::greedy(3)))?;
    engine.add(req(prompt, params))?;
    engine.add(req(other, SamplingParams { logprobs: Some(0), ..SamplingParams::greedy(6) }))?;
    let (out, events) = run_collecting(&mut engine)?;
    let batched = &out[2];
    assert_eq!(batched.new_ids, alone.new_ids);
    for (a, b) in alone.logprobs.iter().zip(&batched.logprobs) {
        assert!((a.logprob - b.logprob).abs() < 1e-4);
        for (x, y) in a.top.iter().zip(&b.top) {
            assert_eq!(x.0, y.0);
            assert!((x.1 - y.1).abs() < 1e-4);
        }
    }
    assert!(out[1].logprobs.is_empty(), "no logprobs unless asked");
    assert!(events[&1].iter().all(|e| e.1.is_none()));
    assert_eq!(out[0].logprobs.len(), out[0].new_ids.len());
    assert!(out[3].logprobs.iter().all(|lp| lp.top.is_empty() && lp.logprob <= 0.0));
    Ok(())
}

/// Allows exactly `ids`, one after the other; optionally fails at `fail_at`.
#[derive(Clone)]
struct Fixed {
    ids: Vec<u32>,
    pos: usize,
    fail_at: Option<usize>,
}

impl Constraint for Fixed {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        for (i, l) in logits.iter_mut().enumerate() {
            if self.ids.get(self.pos) != Some(&(i as u32)) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<(), String> {
        if self.fail_at == Some(self.pos) {
            return Err(format!("refused token {token}"));
        }
        if self.ids.get(self.pos) != Some(&token) {
            return Err(format!("token {token} was masked"));
        }
        self.pos += 1;
        Ok(())
    }
    fn is_done(&self) -> bool {
        self.pos >= self.ids.len()
    }
    fn box_clone(&self) -> Box<dyn Constraint> {
        Box::new(self.clone())
    }
}

/// Masks everything; or fails in `mask`.
#[derive(Clone)]
struct Nothing {
    fail: bool,
}

impl Constraint for Nothing {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if self.fail {
            return Err("mask failed".into());
        }
        logits.fill(f32::NEG_INFINITY);
        Ok(())
    }
    fn commit(&mut self, _: u32) -> Result<(), String> {
        Ok(())
    }
    fn is_done(&self) -> bool {
        false
    }
    fn box_clone(&self) -> Box<dyn Constraint> {
        Box::new(self.clone())
    }
}

#[test]
fn a_constraint_forces_its_tokens_and_ends_the_sequence() -> anyhow::Result<()> {
    let m = smollm2();
    let (prompt, reference, _) = greedy_cases().remove(0);
    let yes = m.tokenizer.encode(" yes yes", false)?;
    assert!(!yes.is_empty() && yes.iter().all(|t| !reference.contains(t)), "the forced tokens are not what the model says");
    let fixed = Request {
        prompt: prompt.clone(),
        params: SamplingParams { temperature: 1.0, seed: Some(5), logprobs: Some(1), ..SamplingParams::greedy(30) },
        constraint: Some(Box::new(Fixed { ids: yes.clone(), pos: 0, fail_at: None })),
        ..Default::default()
    };
    assert!(format!("{fixed:?}").contains("<constraint>"));
    let again = fixed.clone();
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    engine.add(fixed)?;
    engine.add(again)?;
    let mut streamed = String::new();
    let out = engine.run(&mut |ev| match ev {
        Event::Token { seq: 0, text, .. } | Event::Finished { seq: 0, text, .. } => streamed.push_str(&text),
        _ => {}
    })?;
    for o in &out {
        assert_eq!(o.new_ids, yes);
        assert_eq!(o.text, " yes yes");
        assert_eq!(o.finish_reason, FinishReason::Stop);
        // Log-probabilities stay the model's: the forced tokens are unlikely.
        assert!(o.logprobs.iter().zip(&yes).all(|(lp, &t)| lp.top[0].0 != t && lp.logprob < lp.top[0].1));
    }
    assert_eq!(streamed, " yes yes");
    // A constraint that allows only an end-of-sequence token ends the sequence normally.
    let eos = (0..m.model.config.vocab_size as u32).find(|&t| m.tokenizer.is_eos(t)).expect("an eos id");
    let out = generate(
        &m.model,
        &m.tokenizer,
        vec![Request {
            prompt,
            params: SamplingParams::greedy(10),
            constraint: Some(Box::new(Fixed { ids: vec![eos, eos], pos: 0, fail_at: None })),
            ..Default::default()
        }],
        EngineOptions::default(),
    )?;
    assert_eq!(out[0].new_ids, vec![eos]);
    assert_eq!(out[0].finish_reason, FinishReason::Eos);
    assert_eq!(out[0].text, "");
    Ok(())
}

#[test]
fn constraint_failures_end_only_their_sequence() -> anyhow::Result<()> {
    let m = smollm2();
    let cases = greedy_cases();
    let (prompt, reference, _) = cases[0].clone();
    let yes = m.tokenizer.encode(" yes yes", false)?;
    let with = |c: Box<dyn Constraint>| Request {
        prompt: prompt.clone(),
        params: SamplingParams::greedy(10),
        constraint: Some(c),
        ..Default::default()
    };
    let reqs = vec![
        with(Box::new(Fixed { ids: yes.clone(), pos: 0, fail_at: Some(1) })),
        req(prompt.clone(), SamplingParams::greedy(reference.len())),
        with(Box::new(Nothing { fail: false })),
        with(Box::new(Nothing { fail: true })),
    ];
    let mut finished = HashMap::new();
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    for r in reqs {
        engine.add(r)?;
    }
    let out = engine.run(&mut |ev| {
        if let Event::Finished { seq, reason, .. } = ev {
            finished.insert(seq, reason);
        }
    })?;
    assert_eq!(out[0].finish_reason, FinishReason::Error(format!("refused token {}", yes[1])));
    assert_eq!(out[0].new_ids, yes[..1].to_vec(), "the refused token is not kept");
    assert_eq!(out[1].new_ids, reference, "the neighbour is unaffected");
    assert!(matches!(out[1].finish_reason, FinishReason::Eos | FinishReason::Length));
    assert_eq!(out[2].finish_reason, FinishReason::Error("the constraint allows no token".into()));
    assert!(out[2].new_ids.is_empty());
    assert_eq!(out[3].finish_reason, FinishReason::Error("mask failed".into()));
    for (i, o) in out.iter().enumerate() {
        assert_eq!(finished[&i], o.finish_reason, "event and output of {i} agree");
    }
    Ok(())
}
