//! The generation engine against the reference greedy generations, and its batching
//! guarantees: a sequence gets the same tokens in a batch as alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{greedy_cases, smollm2, tiny};
use furnace_generate::{generate, Engine, EngineOptions, Error, Event, FinishReason, Request, SamplingParams};

#[test]
fn greedy_generation_reproduces_reference_alone_and_in_a_batch() -> anyhow::Result<()> {
    let m = smollm2();
    let cases = greedy_cases();
    // Prompt ids are the chat template + tokenizer output.
    for (prompt, _, _) in &cases {
        let text = m.tokenizer.decode(prompt, false)?;
        assert_eq!(&m.tokenizer.encode(&text, false)?, prompt);
    }
    // Alone.
    for (prompt, new_ids, text) in &cases {
        let out = generate(
            &m.model,
            &m.tokenizer,
            vec![Request { prompt: prompt.clone(), params: SamplingParams::greedy(new_ids.len()), adapter: None, constraint: None }],
            EngineOptions::default(),
        )?;
        assert_eq!(&out[0].new_ids, new_ids);
        assert_eq!(&out[0].text, &text.trim_end_matches("<|im_end|>").to_string());
    }
    // In one batch with other prompts of different lengths, with a batch smaller than the
    // number of requests so that sequences leave and join (continuous batching).
    let mut reqs = Vec::new();
    let others = ["Hi", "Tell me a long story about a dragon and a knight who became friends.", "1+1="];
    for (i, (prompt, new_ids, _)) in cases.iter().enumerate() {
        let other = m.tokenizer.encode(others[i % others.len()], false)?;
        reqs.push(Request { prompt: other, params: SamplingParams::greedy(5 + 7 * i), adapter: None, constraint: None });
        reqs.push(Request { prompt: prompt.clone(), params: SamplingParams::greedy(new_ids.len()), adapter: None, constraint: None });
    }
    reqs.push(Request {
        prompt: m.tokenizer.encode(others[2], false)?,
        params: SamplingParams { temperature: 0.8, seed: Some(3), max_tokens: 9, ..Default::default() },
        adapter: None,
        constraint: None,
    });
    let out = generate(&m.model, &m.tokenizer, reqs, EngineOptions { max_batch: 3, prefill_chunk: 16, ..Default::default() })?;
    for (i, (_, new_ids, _)) in cases.iter().enumerate() {
        assert_eq!(&out[2 * i + 1].new_ids, new_ids, "case {i} in a batch");
    }
    Ok(())
}

#[test]
fn seeded_sampling_is_reproducible_and_batch_independent() -> anyhow::Result<()> {
    let m = tiny();
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
        seed: Some(seed),
        max_tokens: 12,
        stop_at_eos: false,
        ..Default::default()
    };
    let prompts: Vec<Vec<u32>> = vec![vec![1604, 3987, 46477], vec![504, 3575, 282, 4649, 314], vec![6403]];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            generate(
                &m.model,
                &m.tokenizer,
                vec![Request { prompt: p.clone(), params: params(i as u64), adapter: None, constraint: None }],
                EngineOptions::default(),
            )
            .expect("gen")[0]
                .new_ids
                .clone()
        })
        .collect();
    let again = generate(
        &m.model,
        &m.tokenizer,
        vec![Request { prompt: prompts[0].clone(), params: params(0), adapter: None, constraint: None }],
        EngineOptions::default(),
    )?;
    assert_eq!(again[0].new_ids, alone[0], "same seed, same tokens");
    let other_seed = generate(
        &m.model,
        &m.tokenizer,
        vec![Request { prompt: prompts[0].clone(), params: params(99), adapter: None, constraint: None }],
        EngineOptions::default(),
    )?;
    assert_ne!(other_seed[0].new_ids, alone[0], "another seed, other tokens");
    let batch = generate(
        &m.model,
        &m.tokenizer,
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Request { prompt: p.clone(), params: params(i as u64), adapter: None, constraint: None })
            .collect(),
        EngineOptions { max_batch: 2, prefill_chunk: 2, ..Default::default() },
    )?;
    for i in 0..prompts.len() {
        assert_eq!(batch[i].new_ids, alone[i], "sequence {i} in a batch");
        assert_eq!(batch[i].new_ids.len(), 12);
        assert_eq!(batch[i].finish_reason, FinishReason::Length);
    }
    Ok(())
}

#[test]
fn stop_strings_cut_the_text_and_streaming_matches_the_output() -> anyhow::Result<()> {
    let m = smollm2();
    let (prompt, _, text) = greedy_cases().remove(0);
    // The reference answer is "The capital of France is Paris." — stop at " is".
    assert!(text.starts_with("The capital of France is"));
    let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    engine.add(Request {
        prompt,
        params: SamplingParams { stop: vec![" is".into()], ..SamplingParams::greedy(24) },
        adapter: None,
        constraint: None,
    })?;
    let mut streamed = String::new();
    let mut finished = None;
    let out = engine.run(&mut |ev| match ev {
        Event::Token { text, .. } => streamed.push_str(&text),
        Event::Finished { text, reason, .. } => {
            streamed.push_str(&text);
            finished = Some(reason);
        }
    })?;
    assert_eq!(out[0].text, "The capital of France");
    assert_eq!(streamed, out[0].text);
    assert_eq!(finished, Some(FinishReason::Stop));
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    Ok(())
}

#[test]
fn bad_requests_are_clear_errors() {
    let m = tiny();
    let mut e = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
    assert!(matches!(
        e.add(Request { prompt: vec![], params: SamplingParams::default(), adapter: None, constraint: None }),
        Err(Error::EmptyPrompt)
    ));
    let max = m.model.config.max_position_embeddings;
    match e.add(Request { prompt: vec![5; max + 10], params: SamplingParams::default(), adapter: None, constraint: None }) {
        Err(err @ Error::PromptTooLong { .. }) => assert!(err.to_string().contains(&max.to_string())),
        other => panic!("unexpected {:?}", other.err()),
    }
    assert!(matches!(
        e.add(Request { prompt: vec![5], params: SamplingParams { top_p: 0.0, ..Default::default() }, adapter: None, constraint: None }),
        Err(Error::InvalidParams(_))
    ));
    assert!(!e.has_work(), "rejected requests are not queued");
}

#[test]
fn generation_stops_when_the_context_is_full() -> anyhow::Result<()> {
    let m = tiny();
    let max = m.model.config.max_position_embeddings;
    let out = generate(
        &m.model,
        &m.tokenizer,
        vec![Request {
            prompt: vec![5; max - 3],
            params: SamplingParams { max_tokens: 100, stop_at_eos: false, ..Default::default() },
            adapter: None,
            constraint: None,
        }],
        EngineOptions::default(),
    )?;
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    assert!(out[0].new_ids.len() <= 3);
    Ok(())
}
