//! The synthetic-data loop (`furnace_evals::synth`) with fake generators: invalid JSON and
//! schema failures counted, exact and near duplicates removed, the count and the attempts
//! bound respected, the same seed giving the same rows, document chunks as sources, and the
//! rows of every format read back by furnace-train's data reader.

use furnace_evals::generator::{GenOutput, GenRequest};
use furnace_evals::synth::{jaccard, synthesize, validate, DocChunk, Format, Source, SynthCounts, SynthGenerator, SynthOptions};
use furnace_train::data::{row_messages, Columns};
use serde_json::{json, Value};

/// Answers with the texts of a script, in order, then repeats the last.
struct Scripted {
    answers: Vec<String>,
    next: usize,
    seen: Vec<GenRequest>,
}

impl Scripted {
    fn new(answers: &[&str]) -> Self {
        Scripted { answers: answers.iter().map(|s| s.to_string()).collect(), next: 0, seen: Vec::new() }
    }
}

impl SynthGenerator for Scripted {
    fn generate(&mut self, reqs: &[GenRequest]) -> Vec<Result<GenOutput, String>> {
        self.seen.extend(reqs.iter().cloned());
        reqs.iter()
            .map(|_| {
                let i = self.next.min(self.answers.len() - 1);
                self.next += 1;
                let text = self.answers[i].clone();
                if text == "FAIL" {
                    return Err("boom".into());
                }
                // "CUT:" marks an answer stopped at the token limit.
                if let Some(t) = text.strip_prefix("CUT:") {
                    return Ok(GenOutput {
                        completion_tokens: t.len() / 4,
                        text: t.into(),
                        finish_reason: "length".into(),
                        ..GenOutput::default()
                    });
                }
                Ok(GenOutput { completion_tokens: text.len() / 4, text, finish_reason: "stop".into(), ..GenOutput::default() })
            })
            .collect()
    }
}

/// Answers every request with a QA pair made from a hash of its prompt and sampling seed:
/// what a seeded sampler does.
struct Hashing;

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november",
    "oscar", "papa",
];

impl SynthGenerator for Hashing {
    fn generate(&mut self, reqs: &[GenRequest]) -> Vec<Result<GenOutput, String>> {
        reqs.iter()
            .map(|r| {
                let prompt: String = r.messages.iter().map(|m| m.content.as_str()).collect();
                let mut h = hash(&prompt) ^ r.sampling.seed.unwrap_or(0);
                let q: Vec<&str> = (0..6)
                    .map(|_| {
                        h = h.rotate_left(7).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        WORDS[(h >> 60) as usize]
                    })
                    .collect();
                Ok(GenOutput { text: json!({"question": q.join(" "), "answer": "yes"}).to_string(), ..GenOutput::default() })
            })
            .collect()
    }
}

fn qa(q: &str, a: &str) -> String {
    json!({"question": q, "answer": a}).to_string()
}

fn opts(format: Format, count: usize) -> SynthOptions {
    SynthOptions { format, count, batch: 4, ..SynthOptions::default() }
}

fn run(gen: &mut dyn SynthGenerator, o: &SynthOptions, source: &Source) -> (Vec<Value>, SynthCounts, bool) {
    let schema = o.effective_schema(false);
    let mut last = SynthCounts::default();
    let r = synthesize(gen, source, &schema, o, &mut |c| last = *c).unwrap();
    assert_eq!(last, r.counts, "the last progress report is the final count");
    (r.rows, r.counts, r.hit_attempts_bound)
}

fn topic() -> Source {
    Source::Topic("physics".into())
}

#[test]
fn invalid_json_schema_failures_and_duplicates_are_counted_and_dropped() {
    let mut gen = Scripted::new(&[
        &qa("What is the speed of light in vacuum?", "About 3e8 m/s."),
        "Sure! Here is a question about physics.",
        r#"{"question": "What is mass?"}"#,
        r#"{"question": "   ", "answer": "blank question"}"#,
        &qa("what is the speed of light in vacuum", "Different answer, same question."),
        &qa("What is the speed of light in a vacuum?", "Near duplicate: one word more."),
        "FAIL",
        // A code fence around the JSON is fine.
        &format!("```json\n{}\n```", qa("Why is the sky blue?", "Rayleigh scattering.")),
        // Stopped at the token limit before the JSON closed: truncated, not invalid.
        r#"CUT:{"question": "What is a photon?", "answer": "A quantum of"#,
        &qa("What does Newton's second law state?", "F = m a."),
    ]);
    let o = SynthOptions { near_dup: 0.5, ..opts(Format::Qa, 3) };
    let (rows, c, bound) = run(&mut gen, &o, &topic());
    assert_eq!(
        rows,
        vec![
            json!({"prompt": "What is the speed of light in vacuum?", "completion": "About 3e8 m/s."}),
            json!({"prompt": "Why is the sky blue?", "completion": "Rayleigh scattering."}),
            json!({"prompt": "What does Newton's second law state?", "completion": "F = m a."}),
        ]
    );
    assert!(!bound);
    // Rounds of 3 (all that is missing), then 4 and 4 (the batch: most answers were
    // rejected); the last round's answer after the third row repeats the last script line,
    // so it is a duplicate too.
    assert_eq!(
        (c.attempts, c.generated, c.failed, c.truncated, c.invalid_json, c.schema_failures, c.duplicates, c.near_duplicates, c.kept),
        (11, 10, 1, 1, 1, 2, 2, 1, 3),
        "{c:?}"
    );
    assert!(jaccard("What is the speed of light in vacuum?", "What is the speed of light in a vacuum?") >= 0.5);
}

#[test]
fn it_stops_at_the_count_and_at_the_attempts_bound() {
    // Always new: exactly `count` requests (rounds ask for what is missing).
    let mut gen = Hashing;
    let (rows, c, bound) = run(&mut gen, &opts(Format::Qa, 5), &topic());
    assert_eq!((rows.len(), c.attempts, bound), (5, 5, false), "{c:?}");

    // Always the same answer: one row, then duplicates until the bound.
    let mut same = Scripted::new(&[&qa("What is energy?", "The capacity to do work.")]);
    let o = SynthOptions { max_attempts: Some(10), ..opts(Format::Qa, 3) };
    let (rows, c, bound) = run(&mut same, &o, &topic());
    assert_eq!((rows.len(), c.attempts, c.duplicates, bound), (1, 10, 9, true), "{c:?}");
    // Rounds never exceed the batch.
    assert_eq!(same.seen.len(), 10);

    // A generator that only fails is an error naming the cause.
    let mut broken = Scripted::new(&["FAIL"]);
    let schema = opts(Format::Qa, 3).effective_schema(false);
    let e = synthesize(&mut broken, &topic(), &schema, &opts(Format::Qa, 3), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("every request failed") && e.contains("boom"), "{e}");
}

#[test]
fn the_same_seed_gives_the_same_rows_and_prompts_vary() {
    let o = opts(Format::Qa, 12);
    let (a, ..) = run(&mut Hashing, &o, &topic());
    let (b, ..) = run(&mut Hashing, &o, &topic());
    assert_eq!(a, b);
    let (c, ..) = run(&mut Hashing, &SynthOptions { seed: 1, ..o.clone() }, &topic());
    assert_ne!(a, c);

    // The prompts ask for different facets and show earlier examples to avoid.
    let mut gen = Scripted::new(&[
        &qa("q one about atoms", "a"),
        &qa("q two about waves", "a"),
        &qa("q three about heat", "a"),
        &qa("q four about light", "a"),
        &qa("q five about force", "a"),
    ]);
    run(&mut gen, &SynthOptions { batch: 2, show_previous: 3, ..opts(Format::Qa, 5) }, &topic());
    let users: Vec<&str> = gen.seen.iter().map(|r| r.messages[1].content.as_str()).collect();
    assert!(users.iter().all(|u| u.contains("Topic: physics")));
    let distinct: std::collections::HashSet<&str> = users.iter().map(|u| u.lines().nth(1).unwrap()).collect();
    assert!(distinct.len() >= 3, "{users:#?}");
    assert!(users[2].contains("different from these earlier ones") && users[2].contains("q "), "{}", users[2]);
    assert!(gen.seen[0].messages[0].content.contains("\"question\""), "the system prompt carries the schema");
    let seeds: std::collections::HashSet<_> = gen.seen.iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds.len(), gen.seen.len());
}

#[test]
fn document_chunks_ground_the_prompts_and_name_the_source() {
    let chunks = vec![
        DocChunk { source: "a.md#0".into(), text: "The Rhine flows through six countries.".into() },
        DocChunk { source: "b.md#0".into(), text: "Basalt is an igneous rock.".into() },
    ];
    let mut gen =
        Scripted::new(&[&qa("How many countries does the Rhine cross?", "Six."), &qa("What kind of rock is basalt?", "Igneous.")]);
    let (rows, ..) = run(&mut gen, &opts(Format::Qa, 2), &Source::Docs(chunks.clone()));
    for (row, req) in rows.iter().zip(&gen.seen) {
        let src = row["source"].as_str().unwrap();
        let chunk = chunks.iter().find(|c| c.source == src).unwrap();
        assert!(req.messages[1].content.contains(&chunk.text), "the prompt of {src} holds its chunk");
    }
    let sources: std::collections::HashSet<_> = rows.iter().map(|r| r["source"].as_str().unwrap().to_string()).collect();
    assert_eq!(sources.len(), 2, "both chunks are used: {rows:?}");
}

#[test]
fn every_format_writes_rows_furnace_train_reads() {
    let cases: Vec<(Format, String)> = vec![
        (Format::Instruction, json!({"instruction": "Translate to French.", "input": "cat", "output": "chat"}).to_string()),
        (Format::Qa, qa("What is 2 + 2?", "4")),
        (
            Format::Chat,
            json!({"messages": [
                {"role": "user", "content": "Hi, what is a prime?"},
                {"role": "assistant", "content": "A number with exactly two divisors."},
                {"role": "user", "content": "Is 1 prime?"},
            ]})
            .to_string(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (format, answer) in cases {
        let o = opts(format, 1);
        // The bounded schema (local decoding) accepts what the format asks for.
        let v: Value = serde_json::from_str(&answer).unwrap();
        validate(&v, &o.effective_schema(true)).unwrap();
        let (rows, c, _) = run(&mut Scripted::new(&[&answer]), &o, &topic());
        assert_eq!(c.kept, 1, "{format:?}: {c:?}");
        let path = dir.path().join(format!("{}.jsonl", format.name()));
        furnace_evals::synth::write_jsonl(&path, &rows).unwrap();
        let read = furnace_train::data::read_rows(&path).unwrap();
        let (_, row) = &read[0];
        let (msgs, completion) = row_messages(row.as_ref().unwrap(), &Columns::default()).unwrap();
        assert_eq!(msgs.last().unwrap().role, "user", "{format:?}");
        match format {
            Format::Instruction => assert_eq!((msgs[0].content.as_str(), completion.as_str()), ("Translate to French.\n\ncat", "chat")),
            Format::Qa => assert_eq!((msgs[0].content.as_str(), completion.as_str()), ("What is 2 + 2?", "4")),
            // The unanswered last question is dropped.
            Format::Chat => assert_eq!((msgs.len(), completion.as_str()), (1, "A number with exactly two divisors.")),
        }
    }
}

#[test]
fn a_custom_schema_writes_rows_as_produced() {
    let schema = json!({
        "type": "object",
        "properties": {"word": {"type": "string"}, "level": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["word", "level"],
    });
    let o = SynthOptions { schema: Some(schema), ..opts(Format::Qa, 2) };
    let mut gen =
        Scripted::new(&[r#"{"word": "photon", "level": 2}"#, r#"{"word": "quark", "level": 9}"#, r#"{"word": "boson", "level": 1}"#]);
    let (rows, c, _) = run(&mut gen, &o, &topic());
    assert_eq!(rows, vec![json!({"word": "photon", "level": 2}), json!({"word": "boson", "level": 1})]);
    assert_eq!(c.schema_failures, 1);
}
