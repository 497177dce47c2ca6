//! User functions ([`furnace_train::hooks`]) in fit mode: `trainer.formatting` rewrites the
//! rows before encoding, `trainer.compute_metrics` scores greedy eval completions, and the
//! spec keys that name them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::testdata;
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_model::lora::LoraConfig;
use furnace_model::{LoadedModel, WeightDType};
use furnace_text::{ChatTemplate, Tokenizer};
use furnace_train::data::{format_rows, stats, FORMAT_BATCH};
use furnace_train::policy::{self, Policy};
use furnace_train::{hooks, load_dataset, DataKind, DataOptions, Error, LoraInit, Spec, TrainableLora};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

fn text() -> (Tokenizer, ChatTemplate) {
    let dir = testdata().join("tiny-llama");
    (Tokenizer::from_hf_dir(&dir).unwrap(), ChatTemplate::from_hf_dir(&dir).unwrap().expect("template"))
}

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Registers `name` as a function that maps `{"q", "a"}` rows to prompt/completion rows,
/// logging each call's row count.
fn register_qa(name: &str) -> Arc<Mutex<Vec<usize>>> {
    let calls: Arc<Mutex<Vec<usize>>> = Arc::default();
    let log = calls.clone();
    hooks::register(
        name,
        Arc::new(move |arg: Value| {
            let rows = arg["rows"].as_array().ok_or("no rows")?;
            log.lock().unwrap().push(rows.len());
            let out: Vec<Value> =
                rows.iter().map(|r| json!({"prompt": r["q"], "completion": format!("A: {}", r["a"].as_str().unwrap_or(""))})).collect();
            Ok(json!({ "rows": out }))
        }),
    );
    calls
}

#[test]
fn formatting_rewrites_every_row_in_batches_before_encoding() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let n = FORMAT_BATCH + 44;
    let raw: String = (0..n).map(|i| format!("{}\n", json!({"q": format!("question {i}?"), "a": format!("answer {i}")}))).collect();
    let plain: String =
        (0..n).map(|i| format!("{}\n", json!({"prompt": format!("question {i}?"), "completion": format!("A: answer {i}")}))).collect();
    let (raw, plain) = (write(&dir, "raw.jsonl", &raw), write(&dir, "plain.jsonl", &plain));
    let calls = register_qa("test:fmt_qa");
    let opts = DataOptions { formatting: Some("test:fmt_qa".into()), ..DataOptions::default() };
    let got = load_dataset(&raw, &tok, &tpl, &opts).unwrap();
    // Batches of at most 256 rows, in file order; the examples are those of the rows the
    // function returned.
    assert_eq!(*calls.lock().unwrap(), vec![FORMAT_BATCH, 44]);
    let want = load_dataset(&plain, &tok, &tpl, &DataOptions::default()).unwrap();
    assert_eq!(got.examples.len(), n);
    assert_eq!(got.examples, want.examples);
    // Without the function the raw rows are not a form furnace reads.
    assert!(matches!(load_dataset(&raw, &tok, &tpl, &DataOptions::default()), Err(Error::DataRow { line: 1, .. })));
    // `furnace data stats` sees the formatted rows too.
    let s = stats(&raw, &tok, &tpl, &opts).unwrap();
    assert_eq!((s.rows, s.forms.get("prompt_completion").copied(), s.bad.len()), (n, Some(n), 0));
    hooks::unregister("test:fmt_qa");
}

#[test]
fn formatting_keeps_bad_json_lines_as_bad_rows_and_feeds_grpo_rows() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "rows.jsonl", "{\"q\": \"2+3?\", \"a\": \"5\"}\nnot json\n{\"q\": \"1+1?\", \"a\": \"2\"}\n");
    let calls = register_qa("test:fmt_skip");
    let opts = DataOptions { formatting: Some("test:fmt_skip".into()), skip_bad_rows: true, ..DataOptions::default() };
    let d = load_dataset(&p, &tok, &tpl, &opts).unwrap();
    assert_eq!((d.examples.len(), d.skipped), (2, 1));
    assert_eq!(*calls.lock().unwrap(), vec![2], "only the JSON rows go to the function");
    let e = load_dataset(&p, &tok, &tpl, &DataOptions { skip_bad_rows: false, ..opts.clone() }).unwrap_err();
    assert!(matches!(e, Error::DataRow { line: 2, .. }), "{e:?}");
    // A GRPO example keeps the formatted row (what the rewards read).
    let g = load_dataset(&p, &tok, &tpl, &DataOptions { kind: DataKind::Prompt, ..opts }).unwrap();
    assert_eq!(**g.examples[0].row.as_ref().unwrap(), json!({"prompt": "2+3?", "completion": "A: 5"}));
    hooks::unregister("test:fmt_skip");
}

/// A formatting function as a plain function.
type Formatter = fn(Value) -> Result<Value, String>;

#[test]
fn a_formatting_function_that_fails_or_returns_another_shape_is_an_error_naming_it() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "rows.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"c\", \"completion\": \"d\"}\n");
    let load = |name: &str| {
        let opts = DataOptions { formatting: Some(name.into()), ..DataOptions::default() };
        let e = load_dataset(&p, &tok, &tpl, &opts).unwrap_err();
        assert!(matches!(e, Error::Hook { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains("trainer.formatting"), "{msg}");
        msg
    };
    let cases: [(&str, Formatter, &str); 5] = [
        ("test:fmt_drops_a_row", |a| Ok(json!({"rows": [a["rows"][0]]})), "returned 1 rows for the 2 rows"),
        ("test:fmt_not_objects", |_| Ok(json!({"rows": ["a", "b"]})), "row 1 of its result is a string, not an object"),
        ("test:fmt_a_list", |a| Ok(a["rows"].clone()), "must return {\"rows\": [row, ...]}, not a list"),
        ("test:fmt_no_rows", |_| Ok(json!({"data": []})), "no list 'rows'"),
        (
            "test:fmt_raises",
            |_| Err("Traceback (most recent call last):\n  File \"fmt.py\", line 3\nKeyError: 'text'".into()),
            "KeyError: 'text'",
        ),
    ];
    for (name, f, want) in cases {
        hooks::register(name, Arc::new(f));
        let msg = load(name);
        assert!(msg.contains(want), "{name}: {msg}");
        hooks::unregister(name);
    }
    // Not registered: require()'s message.
    let msg = load("test:fmt_never_registered");
    assert!(msg.contains("not registered"), "{msg}");
    // The batch helper alone.
    hooks::register("test:fmt_identity", Arc::new(Ok));
    let rows: Vec<Value> = (0..600).map(|i| json!({"i": i})).collect();
    assert_eq!(format_rows("test:fmt_identity", rows.clone()).unwrap(), rows);
    hooks::unregister("test:fmt_identity");
}

const SPEC: &str = r#"
[experiment]
name = "h"
[data]
train = "t.jsonl"
eval = "e.jsonl"
[model]
base = "m"
[lora]
r = 2
alpha = 4
[trainer]
"#;

fn parse(trainer: &str) -> furnace_train::Result<Spec> {
    Spec::parse(&format!("{SPEC}{trainer}\n"), std::path::Path::new("spec.toml"))
}

fn spec_err(trainer: &str) -> (String, String) {
    match parse(trainer) {
        Err(Error::Spec { key, msg }) => (key, msg),
        other => panic!("{trainer}: {other:?}"),
    }
}

#[test]
fn spec_keys_name_user_functions_and_compute_metrics_is_for_sft_with_eval_data() {
    let s = parse("formatting = \"python:fmt\"\ncompute_metrics = \"python:metrics\"\nmax_completion_length = 16").unwrap();
    assert_eq!(s.data_options().formatting.as_deref(), Some("python:fmt"));
    assert_eq!(s.metric_completion_length(), 16);
    assert_eq!(parse("compute_metrics = \"python:m\"").unwrap().metric_completion_length(), 64);
    // Kept in the stored config (JSON) and read back; absent when not given.
    let back: Spec = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!((back.trainer.formatting, back.trainer.compute_metrics), (s.trainer.formatting.clone(), s.trainer.compute_metrics.clone()));
    assert!(serde_json::to_value(parse("").unwrap()).unwrap()["trainer"].get("formatting").is_none());
    // Formatting is for every kind.
    parse("kind = \"dpo\"\nformatting = \"python:fmt\"").unwrap();
    let cases = [
        ("formatting = \"fmt\"", "trainer.formatting", "not a user function name"),
        ("compute_metrics = \"python:\"", "trainer.compute_metrics", "not a user function name"),
        ("kind = \"dpo\"\ncompute_metrics = \"python:m\"", "trainer.compute_metrics", "for kind = \"sft\""),
        ("max_completion_length = 16", "trainer.max_completion_length", "only with trainer.compute_metrics"),
        ("compute_metrics = \"python:m\"\nmax_completion_length = 0", "trainer.max_completion_length", "> 0"),
    ];
    for (body, key, msg) in cases {
        let (k, m) = spec_err(body);
        assert_eq!(k, key, "{body}");
        assert!(m.contains(msg), "{body}: {m}");
    }
    let no_eval = SPEC.replace("eval = \"e.jsonl\"\n", "");
    match Spec::parse(&format!("{no_eval}compute_metrics = \"python:m\"\n"), std::path::Path::new("spec.toml")) {
        Err(Error::Spec { key, msg }) => assert!(key == "trainer.compute_metrics" && msg.contains("eval"), "{key}: {msg}"),
        other => panic!("{other:?}"),
    }
    // A GRPO function reward is checked like the other kinds.
    let grpo = "kind = \"grpo\"\n[[reward]]\nkind = \"function\"\nfunction = \"python:score\"";
    assert_eq!(parse(grpo).unwrap().rewards[0].function.as_deref(), Some("python:score"));
    let (k, m) = spec_err(&grpo.replace("python:score", "score"));
    assert!(k == "reward[0].function" && m.contains("not a user function name"), "{k}: {m}");
}

/// An SFT eval set of the extraction task, loaded for tiny-llama.
fn eval_set(m: &LoadedModel, n: usize) -> Vec<furnace_train::Example> {
    let text = std::fs::read_to_string(furnace_testutil::repo_root().join("data/extract/eval.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "eval.jsonl", &text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>());
    let tpl = m.chat_template.clone().unwrap();
    load_dataset(&p, &m.tokenizer, &tpl, &DataOptions { max_seq_len: 96, ..DataOptions::default() }).unwrap().examples
}

#[test]
fn compute_metrics_scores_the_greedy_completions_of_the_eval_prompts() {
    let mut m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).unwrap();
    let examples = eval_set(&m, 3);
    let rows: Vec<Value> = std::fs::read_to_string(furnace_testutil::repo_root().join("data/extract/eval.jsonl"))
        .unwrap()
        .lines()
        .take(3)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lc: LoraConfig = serde_json::from_value(json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})).unwrap();
    // A new adapter adds nothing (B = 0): its greedy completions are the base model's.
    let lora = TrainableLora::new(&m.model, lc, LoraInit::KaimingUniform, 1).unwrap();
    let want: Vec<String> = {
        let mut engine = Engine::new(&m.model, &m.tokenizer, EngineOptions::default());
        for e in &examples {
            engine
                .add(Request { prompt: e.prompt_ids().to_vec(), params: SamplingParams::greedy(12), adapter: None, constraint: None })
                .unwrap();
        }
        engine.run(&mut |_| {}).unwrap().into_iter().map(|o| o.text).collect()
    };
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = seen.clone();
    hooks::register(
        "test:metrics_counts",
        Arc::new(move |arg: Value| {
            log.lock().unwrap().push(arg.clone());
            let n = arg["predictions"].as_array().map_or(0, Vec::len);
            Ok(json!({"count": n, "first_label_chars": arg["labels"][0].as_str().unwrap_or("").chars().count()}))
        }),
    );
    let mut policy = Policy { model: &mut m.model, tokenizer: &m.tokenizer, max_batch: 8 };
    let values = policy::compute_metrics(&mut policy, &lora, &examples, 12, "test:metrics_counts").unwrap();
    let first_label = rows[0]["completion"].as_str().unwrap();
    assert_eq!(values, vec![("eval_count".to_string(), 3.0), ("eval_first_label_chars".to_string(), first_label.chars().count() as f64)]);
    let arg = seen.lock().unwrap().pop().unwrap();
    let strings = |k: &str| -> Vec<String> { arg[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect() };
    assert_eq!(strings("predictions"), want);
    assert!(want.iter().all(|w| !w.is_empty()), "{want:?}");
    // The labels are the reference completions; the prompts end with the generation prompt.
    assert_eq!(strings("labels"), rows.iter().map(|r| r["completion"].as_str().unwrap().to_string()).collect::<Vec<_>>());
    for (p, r) in strings("prompts").iter().zip(&rows) {
        assert!(p.contains(r["prompt"].as_str().unwrap()) && p.ends_with("<|im_start|>assistant\n"), "{p:?}");
    }
    // Shapes other than {name: number} are errors naming the function.
    for (name, out, want) in [
        ("test:metrics_list", json!([1.0]), "must return a dict"),
        ("test:metrics_text", json!({"acc": "high"}), "metric \"acc\" is \"high\", not a number"),
        ("test:metrics_loss", json!({"loss": 1.0}), "eval_loss is furnace's own"),
    ] {
        hooks::register(name, Arc::new(move |_| Ok(out.clone())));
        let e = policy::compute_metrics(&mut policy, &lora, &examples, 4, name).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{e}");
        hooks::unregister(name);
    }
    let e = policy::compute_metrics(&mut policy, &lora, &examples, 4, "test:metrics_missing").unwrap_err().to_string();
    assert!(e.contains("not registered") && e.contains("trainer.compute_metrics"), "{e}");
    hooks::unregister("test:metrics_counts");
}
