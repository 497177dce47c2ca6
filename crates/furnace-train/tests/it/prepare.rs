//! `furnace data prepare` as a library: MinHash against the exact Jaccard similarity computed
//! in Python, deduplication, the seeded split, form conversions and their round trips, the
//! three output formats read back by the training reader, bad rows naming file:line, and the
//! token-length filter against Hugging Face's token counts (scripts/make_prepare_fixtures.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::testdata;
use furnace_text::{ChatMessage, ChatTemplate, Tokenizer};
use furnace_train::data::minhash::{estimated_jaccard, jaccard, normalize, shingle_hashes, MinHasher};
use furnace_train::data::prepare::{
    convert, prepare, preview, val_size, Dedup, OutputFormat, PrepareOptions, RowForm, TextModel, ValSplit,
};
use furnace_train::data::{read_rows, row_messages};
use furnace_train::{load_dataset, Columns, DataOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    testdata().join("prepare").join(name)
}

fn text() -> (Tokenizer, ChatTemplate) {
    let dir = testdata().join("tiny-llama");
    (Tokenizer::from_hf_dir(&dir).unwrap(), ChatTemplate::from_hf_dir(&dir).unwrap().expect("template"))
}

fn rows_of(path: &Path) -> Vec<Value> {
    read_rows(path).unwrap().into_iter().map(|(_, r)| r.unwrap()).collect()
}

/// The rows of a file as sorted JSON texts (splits are shuffled).
fn sorted_rows(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = rows_of(path).iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

/// The conversation of an SFT row, the answer included.
fn conversation(row: &Value, c: &Columns) -> Vec<ChatMessage> {
    let (mut msgs, completion) = row_messages(row, c).unwrap();
    msgs.push(ChatMessage::new("assistant", completion));
    msgs
}

/// The training examples of a file as sorted (ids, labels).
fn examples(path: &Path) -> Vec<(Vec<u32>, Vec<i64>)> {
    let (tok, tpl) = text();
    let ds = load_dataset(path, &tok, &tpl, &DataOptions { max_seq_len: 4096, ..DataOptions::default() }).unwrap();
    let mut v: Vec<(Vec<u32>, Vec<i64>)> = ds.examples.into_iter().map(|e| (e.ids, e.labels)).collect();
    v.sort();
    v
}

fn no_val() -> PrepareOptions {
    PrepareOptions { val: ValSplit::Fraction(0.0), ..PrepareOptions::default() }
}

#[test]
fn minhash_estimates_the_exact_jaccard_of_the_python_reference() {
    let rows = rows_of(&fixture("near_dups.jsonl"));
    let pairs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixture("near_pairs.json")).unwrap()).unwrap();
    let content = |r: &Value| {
        conversation(r, &Columns::default()).iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
    };
    let hasher = MinHasher::new(128, 5, 7);
    let sigs: Vec<Vec<u64>> = rows.iter().map(|r| hasher.signature(&content(r))).collect();
    let shingles: Vec<Vec<u64>> = rows.iter().map(|r| shingle_hashes(&normalize(&content(r)), 5)).collect();
    let mut worst: f64 = 0.0;
    for p in &pairs {
        let (a, b) = (p["a"].as_u64().unwrap() as usize - 1, p["b"].as_u64().unwrap() as usize - 1);
        let want = p["jaccard"].as_f64().unwrap();
        // The same shingles as Python's: the exact similarity matches.
        assert!((jaccard(&shingles[a], &shingles[b]) - want).abs() < 1e-9, "pair {a} {b}");
        let est = estimated_jaccard(&sigs[a], &sigs[b]);
        worst = worst.max((est - want).abs());
    }
    // 128 functions: the estimate's standard deviation is at most 0.044.
    assert!(worst < 0.15, "largest MinHash error {worst}");
    // The same seed gives the same signature; another seed another.
    assert_eq!(MinHasher::new(128, 5, 7).signature("some text here"), hasher.signature("Some  TEXT here"));
    assert_ne!(MinHasher::new(128, 5, 8).signature("some text here"), hasher.signature("some text here"));
}

#[test]
fn dedup_removes_exact_and_one_word_near_duplicates_and_keeps_distinct_rows() {
    let input = fixture("near_dups.jsonl");
    let rows = rows_of(&input);
    let dir = tempfile::tempdir().unwrap();
    let near = prepare(std::slice::from_ref(&input), dir.path(), &PrepareOptions { dedup: Dedup::Near, ..no_val() }, None, &()).unwrap();
    assert_eq!((near.rows_read, near.exact_duplicates, near.near_duplicates, near.train, near.val), (9, 1, 2, 6, 0));
    let at = |line: usize| format!("{}:{line}", input.display());
    assert_eq!(near.exact_pairs.iter().map(|p| (p.kept.clone(), p.removed.clone())).collect::<Vec<_>>(), [(at(2), at(8))]);
    let near_pairs: Vec<(String, String)> = near.near_pairs.iter().map(|p| (p.kept.clone(), p.removed.clone())).collect();
    assert_eq!(near_pairs, [(at(1), at(7)), (at(4), at(9))]);
    assert!(near.near_pairs.iter().all(|p| p.jaccard.unwrap() >= 0.85));
    // The first occurrences stay: the six distinct rows, tea and coffee both.
    let mut want: Vec<String> = rows[..6].iter().map(|r| r.to_string()).collect();
    want.sort();
    assert_eq!(sorted_rows(&dir.path().join("train.jsonl")), want);
    assert!(!dir.path().join("val.jsonl").exists());
    // Exact only: the spacing/case duplicate goes, the one-word changes stay.
    let exact = prepare(std::slice::from_ref(&input), dir.path(), &no_val(), None, &()).unwrap();
    assert_eq!((exact.exact_duplicates, exact.near_duplicates, exact.train), (1, 0, 8));
    let none = prepare(std::slice::from_ref(&input), dir.path(), &PrepareOptions { dedup: Dedup::None, ..no_val() }, None, &()).unwrap();
    assert_eq!(none.train, 9);
    // A strict threshold keeps the one-word changes (their similarity is ~0.92).
    let strict =
        prepare(&[input], dir.path(), &PrepareOptions { dedup: Dedup::Near, near_threshold: 0.99, ..no_val() }, None, &()).unwrap();
    assert_eq!((strict.exact_duplicates, strict.near_duplicates), (1, 0));
    // Across inputs and formats: a CSV row repeating a JSONL row is a duplicate, named by its
    // own file and line; a nested Parquet chat dataset is read by the same reader.
    let csv = dir.path().join("more.csv");
    std::fs::write(&csv, "prompt,completion\nA new question?,A new answer.\nWhat does a compiler do?,\"A compiler reads the source code of a program and translates it into machine code or another lower level form that a computer can run directly.\"\n").unwrap();
    let chat_pq = testdata().join("parquet").join("chat.parquet");
    let inputs = [fixture("near_dups.jsonl"), csv.clone(), chat_pq];
    let r = prepare(&inputs, dir.path(), &PrepareOptions { dedup: Dedup::Near, ..no_val() }, None, &()).unwrap();
    assert_eq!((r.rows_read, r.exact_duplicates, r.near_duplicates, r.train), (12, 2, 2, 8));
    assert_eq!(r.exact_pairs[1].removed, format!("{}:3", csv.display()));
    assert_eq!(r.forms.get("chat"), Some(&1));
    // Near dedup leaves system messages out: a long shared system prompt does not make
    // distinct rows duplicates, and the same exchange under another system prompt is one.
    let sys = "You are a careful assistant. Answer in full sentences, cite no sources, and keep a friendly tone. ".repeat(4);
    let row = |system: &str, p: &str, c: &str| json!({"system": system, "prompt": p, "completion": c}).to_string() + "\n";
    let body =
        [row(&sys, "Name a colour.", "Blue."), row(&sys, "Name a fruit.", "A pear."), row("Be terse.", "Name a colour.", "Blue.")].concat();
    let sys_file = dir.path().join("sys.jsonl");
    std::fs::write(&sys_file, body).unwrap();
    let r = prepare(std::slice::from_ref(&sys_file), dir.path(), &PrepareOptions { dedup: Dedup::Near, ..no_val() }, None, &()).unwrap();
    assert_eq!((r.exact_duplicates, r.near_duplicates, r.train), (0, 1, 2));
    assert_eq!(r.near_pairs[0].removed, format!("{}:3", sys_file.display()));
}

#[test]
fn the_split_is_seeded_disjoint_and_sized() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let body: String = (0..100).map(|i| format!("{{\"prompt\": \"What is {i} times 3?\", \"completion\": \"{}\"}}\n", 3 * i)).collect();
    std::fs::write(&input, body).unwrap();
    let all = sorted_rows(&input);
    let run = |name: &str, opts: PrepareOptions| {
        let out = dir.path().join(name);
        let r = prepare(std::slice::from_ref(&input), &out, &opts, None, &()).unwrap();
        let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
        (r, read("train.jsonl"), read("val.jsonl"))
    };
    let (r, train, val) = run("a", PrepareOptions::default());
    assert_eq!((r.train, r.val), (90, 10));
    assert_eq!((train.lines().count(), val.lines().count()), (90, 10));
    let mut union: Vec<String> = train.lines().chain(val.lines()).map(|l| serde_json::from_str::<Value>(l).unwrap().to_string()).collect();
    union.sort();
    assert_eq!(union, all, "every row once, in train or val");
    // The same seed: the same files; another seed: another split.
    let (_, train2, val2) = run("b", PrepareOptions::default());
    assert_eq!((&train, &val), (&train2, &val2));
    let (_, _, val3) = run("c", PrepareOptions { seed: 7, ..PrepareOptions::default() });
    assert_ne!(val, val3);
    // Fractions round up; counts are exact.
    assert_eq!(run("d", PrepareOptions { val: ValSplit::Fraction(0.015), ..PrepareOptions::default() }).0.val, 2);
    assert_eq!(run("e", PrepareOptions { val: ValSplit::Count(7), ..PrepareOptions::default() }).0.val, 7);
    assert_eq!(
        (val_size(30, ValSplit::Fraction(0.1)), val_size(31, ValSplit::Fraction(0.1)), val_size(5, ValSplit::Fraction(0.0))),
        (3, 4, 0)
    );
    // No validation rows: no val file (a stale one is removed).
    let (r, _, val0) = run("a", no_val());
    assert_eq!((r.train, r.val, val0.as_str()), (100, 0, ""));
    assert!(!dir.path().join("a/val.jsonl").exists());
    let err = prepare(
        std::slice::from_ref(&input),
        dir.path(),
        &PrepareOptions { val: ValSplit::Count(100), ..PrepareOptions::default() },
        None,
        &(),
    );
    assert!(err.unwrap_err().to_string().contains("leaving none to train on"));
    let err = prepare(&[input], dir.path(), &PrepareOptions { val: ValSplit::Fraction(1.5), ..PrepareOptions::default() }, None, &());
    assert!(err.unwrap_err().to_string().contains("--val-fraction 1.5"));
}

#[test]
fn form_conversions_and_their_round_trips() {
    let c = Columns::default();
    let sys = ChatMessage::new("system", "Be terse.");
    let (user, answer) = (ChatMessage::new("user", "Name a prime."), ChatMessage::new("assistant", "7"));
    let single = vec![sys.clone(), user.clone(), answer.clone()];
    let orig = json!({"id": 3, "prompt": "x", "completion": "y"});
    assert_eq!(
        convert(&single, RowForm::Chat, &orig, &c).unwrap(),
        json!({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}], "id": 3})
    );
    assert_eq!(
        convert(&single, RowForm::PromptCompletion, &orig, &c).unwrap(),
        json!({"system": "Be terse.", "prompt": "Name a prime.", "completion": "7", "id": 3})
    );
    assert_eq!(
        convert(&single, RowForm::Instruction, &orig, &c).unwrap(),
        json!({"system": "Be terse.", "instruction": "Name a prime.", "input": "", "output": "7", "id": 3})
    );
    // Multi-turn: everything before the last assistant turn is the prompt, as messages.
    let multi = vec![user.clone(), ChatMessage::new("assistant", "2"), ChatMessage::new("user", "Larger."), answer.clone()];
    let pc = convert(&multi, RowForm::PromptCompletion, &json!({}), &c).unwrap();
    assert_eq!(pc["prompt"].as_array().unwrap().len(), 3);
    assert_eq!(pc["completion"], "7");
    assert_eq!(conversation(&pc, &c), multi, "read back as the same conversation");
    let err = convert(&multi, RowForm::Instruction, &json!({}), &c).unwrap_err();
    assert!(err.contains("no instruction form") && err.contains("--to chat"), "{err}");

    // Whole files: every conversion reads back as the same training examples.
    let input = fixture("token_counts.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let want = examples(&input);
    let to = |form: RowForm, from: &Path, out: &str, skip_bad: bool| {
        let out = dir.path().join(out);
        prepare(&[from.to_path_buf()], &out, &PrepareOptions { to: Some(form), skip_bad, ..no_val() }, None, &())
            .map(|r| (r, out.join("train.jsonl")))
    };
    let (_, chat) = to(RowForm::Chat, &input, "chat", false).unwrap();
    assert!(rows_of(&chat).iter().all(|r| r["messages"].is_array() && r["n_tokens"].is_number()));
    assert_eq!(examples(&chat), want);
    let (_, pc) = to(RowForm::PromptCompletion, &input, "pc", false).unwrap();
    assert!(rows_of(&pc).iter().all(|r| r.get("messages").is_none() && r["completion"].is_string()));
    assert_eq!(examples(&pc), want);
    // Round trips: chat → prompt_completion → chat and back give the same rows.
    let (_, chat2) = to(RowForm::Chat, &pc, "chat2", false).unwrap();
    assert_eq!(sorted_rows(&chat2), sorted_rows(&chat));
    let (_, pc2) = to(RowForm::PromptCompletion, &chat2, "pc2", false).unwrap();
    assert_eq!(sorted_rows(&pc2), sorted_rows(&pc));
    // Instruction: the multi-turn row (line 8) has no such form: an error naming it, or skipped.
    let err = to(RowForm::Instruction, &input, "ins", false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:8: ", input.display())) && err.contains("no instruction form"), "{err}");
    let (r, ins) = to(RowForm::Instruction, &input, "ins", true).unwrap();
    assert_eq!((r.bad_rows, r.train), (1, 7));
    let want_single: Vec<_> = {
        let single = dir.path().join("single.jsonl");
        let body = std::fs::read_to_string(&input).unwrap();
        let lines: Vec<&str> = body.lines().take(7).collect();
        std::fs::write(&single, lines.join("\n")).unwrap();
        examples(&single)
    };
    assert_eq!(examples(&ins), want_single);
    let (_, chat3) = to(RowForm::Chat, &ins, "chat3", false).unwrap();
    assert_eq!(examples(&chat3), want_single);
}

#[test]
fn csv_parquet_and_jsonl_outputs_read_back_as_the_same_rows() {
    let input = fixture("token_counts.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let want = examples(&input);
    for form in [RowForm::Chat, RowForm::PromptCompletion] {
        for format in [OutputFormat::Jsonl, OutputFormat::Csv, OutputFormat::Parquet] {
            let out = dir.path().join(format!("{}-{}", form.name(), format.ext()));
            let opts = PrepareOptions { to: Some(form), format, val: ValSplit::Count(3), ..PrepareOptions::default() };
            let r = prepare(std::slice::from_ref(&input), &out, &opts, None, &()).unwrap();
            assert_eq!((r.train, r.val), (5, 3));
            let (train, val) = (out.join(format!("train.{}", format.ext())), out.join(format!("val.{}", format.ext())));
            let mut got = examples(&train);
            got.extend(examples(&val));
            got.sort();
            assert_eq!(got, want, "{} {}", form.name(), format.ext());
            // The same conversations, row by row, whatever the format.
            let jsonl = dir.path().join(format!("{}-jsonl", form.name())).join("train.jsonl");
            let convs = |p: &Path| rows_of(p).iter().map(|r| conversation(r, &Columns::default())).collect::<Vec<_>>();
            assert_eq!(convs(&train), convs(&jsonl), "{} {}", form.name(), format.ext());
        }
    }
    // Several forms in one CSV: refused without --to.
    let err = prepare(&[input], dir.path(), &PrepareOptions { format: OutputFormat::Csv, ..no_val() }, None, &()).unwrap_err();
    assert!(err.to_string().contains("several forms") && err.to_string().contains("--to"), "{err}");
    // One form kept as read, in CSV: the row's own columns.
    let single = dir.path().join("ins.jsonl");
    std::fs::write(&single, "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi.\", \"id\": 1}\n{\"instruction\": \"Add.\", \"input\": \"2+2\", \"output\": \"4\", \"id\": 2}\n").unwrap();
    prepare(std::slice::from_ref(&single), &dir.path().join("keep"), &PrepareOptions { format: OutputFormat::Csv, ..no_val() }, None, &())
        .unwrap();
    let csv = std::fs::read_to_string(dir.path().join("keep/train.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), "instruction,input,output,id");
    assert_eq!(examples(&dir.path().join("keep/train.csv")), examples(&single));
}

#[test]
fn malformed_rows_name_their_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "{\"prompt\": \"a\", \"completion\": \"b\"}";
    let cases = [
        ("json.jsonl", "{\"prompt\": \"a\", \"completion\"", "invalid JSON"),
        ("missing.jsonl", "{\"prompt\": \"a\"}", "missing columns"),
        ("type.jsonl", "{\"messages\": 5}", "'messages' must be a list"),
        ("content.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": 3}]}", "a message lacks string 'content'"),
        ("last.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "the last message must be the assistant's"),
        ("text.jsonl", "{\"messages\": \"not a list\"}", "it is a text that is not JSON"),
    ];
    for (name, bad, why) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{good}\n\n{bad}\n{good}\n")).unwrap();
        let err = prepare(std::slice::from_ref(&p), &dir.path().join("out"), &no_val(), None, &()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:3: ", p.display())) && err.contains(why), "{name}: {err}");
    }
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, "prompt,completion\na,b\n\"c,d\n").unwrap();
    let err = prepare(std::slice::from_ref(&csv), &dir.path().join("out"), &no_val(), None, &()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:3: ", csv.display())), "{err}");
    let csv2 = dir.path().join("cols.csv");
    std::fs::write(&csv2, "prompt,answer\na,b\n").unwrap();
    let err = prepare(std::slice::from_ref(&csv2), &dir.path().join("out"), &no_val(), None, &()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2: missing columns", csv2.display())), "{err}");

    let pq = testdata().join("parquet").join("missing.parquet");
    let err = prepare(std::slice::from_ref(&pq), &dir.path().join("out"), &no_val(), None, &()).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2: missing columns", pq.display())), "{err}");

    // --skip-bad: every bad row counted and listed with its line, the good ones written.
    let all = dir.path().join("all.jsonl");
    let body: String =
        std::iter::once(good).chain(cases.iter().map(|c| c.1)).chain([good.replace('b', "c").as_str()]).map(|l| format!("{l}\n")).collect();
    std::fs::write(&all, body).unwrap();
    let r =
        prepare(std::slice::from_ref(&all), &dir.path().join("skip"), &PrepareOptions { skip_bad: true, ..no_val() }, None, &()).unwrap();
    assert_eq!((r.rows_read, r.bad_rows, r.train), (8, 6, 2));
    assert_eq!(r.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [2, 3, 4, 5, 6, 7]);
    assert!(r.bad.iter().zip(&cases).all(|(b, c)| b.msg.contains(c.2)));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("skip/prepare.json")).unwrap()).unwrap();
    assert_eq!(report["bad_rows"], 6);
    assert_eq!(report["bad"][0]["line"], 2);
    assert_eq!(report["inputs"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(report["options"]["skip_bad"], true);
}

#[test]
fn token_filters_count_tokens_as_the_reference_tokenizer_does() {
    let (tok, tpl) = text();
    let t = TextModel { tokenizer: &tok, template: &tpl };
    let input = fixture("token_counts.jsonl");
    let rows = rows_of(&input);
    // Every row's length is Hugging Face's count of the formatted row.
    for (i, row) in rows.iter().enumerate() {
        let p = preview(std::slice::from_ref(&input), i + 1, &PrepareOptions::default(), t).unwrap();
        assert_eq!(p.prompt_tokens + p.completion_tokens, row["n_tokens"].as_u64().unwrap() as usize, "row {}", i + 1);
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = PrepareOptions { min_tokens: Some(40), max_tokens: Some(70), ..no_val() };
    let r = prepare(std::slice::from_ref(&input), dir.path(), &opts, Some(t), &()).unwrap();
    let n = |r: &Value| r["n_tokens"].as_u64().unwrap();
    let short = rows.iter().filter(|r| n(r) < 40).count();
    let long = rows.iter().filter(|r| n(r) > 70).count();
    assert_eq!((r.too_short, r.too_long, r.train), (short, long, rows.len() - short - long));
    assert!(short > 0 && long > 0);
    assert!(rows_of(&dir.path().join("train.jsonl")).iter().all(|r| (40..=70).contains(&n(r))));
    // Token filters need the tokenizer; characters do not.
    let err = prepare(std::slice::from_ref(&input), dir.path(), &opts, None, &()).unwrap_err().to_string();
    assert!(err.contains("give --model") && err.contains("--max-chars"), "{err}");
    let r = prepare(std::slice::from_ref(&input), dir.path(), &PrepareOptions { max_chars: Some(25), ..no_val() }, None, &()).unwrap();
    assert_eq!((r.train, r.too_long), (2, 6), "Hi/Hello. and the prime");

    // The preview splits where the loss starts: the prompt ends with the generation prompt.
    let p = preview(std::slice::from_ref(&input), 8, &PrepareOptions::default(), t).unwrap();
    assert_eq!(p.at, format!("{}:8", input.display()));
    assert!(p.prompt.ends_with("Another one, larger.<|im_end|>\n<|im_start|>assistant\n"), "{}", p.prompt);
    assert_eq!(p.completion, "Forty-two.<|im_end|>\n");
    let err = preview(&[input], 9, &PrepareOptions::default(), t).unwrap_err().to_string();
    assert!(err.contains("the inputs have 8 rows"), "{err}");
}
