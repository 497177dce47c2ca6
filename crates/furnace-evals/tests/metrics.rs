//! The built-in metrics against the reference libraries (fixtures written by
//! `scripts/make_eval_metric_fixtures.py`), and the command metric against small programs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use furnace_evals::metrics::{self, Aggregate, CommandMetric};
use furnace_evals::Error;
use serde_json::{json, Value};

fn strings(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().unwrap_or_else(|| panic!("{key} missing in {v}")).iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

fn score_case(case: &Value) -> f64 {
    let kind = case["metric"].as_str().unwrap();
    let pred = case["pred"].as_str().unwrap_or_default();
    let refs = || strings(case, "refs");
    let ret = || strings(case, "retrieved");
    let rel = || strings(case, "relevant");
    let k = || case["k"].as_u64().unwrap() as usize;
    match kind {
        "exact_match" => metrics::exact_match(pred, &refs(), case["normalize"].as_bool().unwrap()),
        "contains" => metrics::contains(pred, &refs(), case["normalize"].as_bool().unwrap()),
        "token_f1" => metrics::token_f1(pred, &refs()),
        "rouge_l" => metrics::rouge_l(pred, &refs()),
        "bleu" => metrics::bleu(pred, &refs()),
        "regex" => metrics::regex_match(pred, &regex::Regex::new(case["pattern"].as_str().unwrap()).unwrap()),
        "numeric_match" => metrics::numeric_match(pred, &refs(), case["rel_tol"].as_f64().unwrap(), case["abs_tol"].as_f64().unwrap()),
        "json_valid" => metrics::json_valid(pred),
        "json_field" => metrics::json_field_match(pred, &refs(), case["path"].as_str().unwrap()),
        "precision_at_k" => metrics::precision_at_k(&ret(), &rel(), k()),
        "recall_at_k" => metrics::recall_at_k(&ret(), &rel(), k()),
        "hit_rate" => metrics::hit_rate_at_k(&ret(), &rel(), k()),
        "mrr" => metrics::mrr_at_k(&ret(), &rel(), k()),
        "ndcg_at_k" => metrics::ndcg_at_k(&ret(), &rel(), k()),
        other => panic!("unknown metric {other} in the fixture"),
    }
}

#[test]
fn every_metric_matches_the_reference_libraries() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metric_cases.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let case: Value = serde_json::from_str(line).unwrap();
        let kind = case["metric"].as_str().unwrap().to_owned();
        let expected = case["expected"].as_f64().unwrap();
        let got = score_case(&case);
        let tol = if kind == "bleu" { 1e-6 } else { 1e-9 };
        if (got - expected).abs() > tol || !(0.0..=1.0 + 1e-12).contains(&got) {
            failures.push(format!("line {}: {kind} got {got}, expected {expected}: {line}", i + 1));
        }
        *per_kind.entry(kind).or_default() += 1;
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), text.lines().count(), failures.join("\n"));
    for kind in metrics::BUILTIN_KINDS {
        let n = per_kind.get(*kind).copied().unwrap_or(0);
        assert!(n >= 6, "the fixture has {n} cases of {kind}");
    }
}

#[test]
fn fixture_cases_are_not_all_trivial() {
    // A check that the comparison above can fail: the fixture holds fractional scores and
    // both 0 and 1 for the graded metrics.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metric_cases.jsonl");
    let text = std::fs::read_to_string(path).unwrap();
    for kind in ["token_f1", "rouge_l", "bleu", "ndcg_at_k", "precision_at_k", "recall_at_k", "mrr"] {
        let values: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|c| c["metric"] == kind)
            .map(|c| c["expected"].as_f64().unwrap())
            .collect();
        assert!(values.iter().any(|&x| x > 0.0 && x < 1.0), "{kind}: no fractional score");
        assert!(values.contains(&0.0), "{kind}: no zero");
    }
}

#[test]
fn builtin_info_covers_the_kinds() {
    for kind in metrics::BUILTIN_KINDS {
        let info = metrics::builtin_info(kind).unwrap();
        assert_eq!(info.range, (0.0, 1.0));
        assert_eq!(info.aggregate, Aggregate::Mean);
        assert!(info.higher_is_better);
    }
    assert_eq!(metrics::BUILTIN_KINDS.len(), 14);
    assert!(metrics::builtin_info("perplexity").is_none());
}

#[test]
fn retrieval_edge_cases_are_documented_values() {
    let none: Vec<String> = Vec::new();
    let ret: Vec<String> = ["a", "b", "a", "c"].iter().map(|s| s.to_string()).collect();
    let rel: Vec<String> = vec!["a".into(), "c".into()];
    // No relevant id: all 0. Nothing retrieved: all 0.
    for k in [0, 1, 5] {
        for (r, s) in [(&ret, &none), (&none, &rel)] {
            assert_eq!(metrics::precision_at_k(r, s, k), 0.0);
            assert_eq!(metrics::recall_at_k(r, s, k), 0.0);
            assert_eq!(metrics::hit_rate_at_k(r, s, k), 0.0);
            assert_eq!(metrics::mrr_at_k(r, s, k), 0.0);
            assert_eq!(metrics::ndcg_at_k(r, s, k), 0.0);
        }
    }
    // The repeated `a` counts once: unique list a, b, c.
    assert_eq!(metrics::precision_at_k(&ret, &rel, 3), 2.0 / 3.0);
    assert_eq!(metrics::precision_at_k(&ret, &rel, 10), 2.0 / 10.0);
    // k = 0: the whole (unique) list.
    assert_eq!(metrics::precision_at_k(&ret, &rel, 0), 2.0 / 3.0);
    assert_eq!(metrics::recall_at_k(&ret, &rel, 0), 1.0);
    let ideal = 1.0 + 1.0 / 3f64.log2();
    assert!((metrics::ndcg_at_k(&ret, &rel, 0) - (1.0 + 0.5) / ideal).abs() < 1e-12);
    assert_eq!(metrics::mrr_at_k(&["x", "y", "c"], &rel, 2), 0.0);
    assert_eq!(metrics::mrr_at_k(&["x", "y", "c"], &rel, 3), 1.0 / 3.0);
}

#[test]
fn text_edge_cases() {
    let no_refs: [&str; 0] = [];
    assert_eq!(metrics::exact_match("x", &no_refs, true), 0.0);
    assert_eq!(metrics::token_f1("x", &no_refs), 0.0);
    assert_eq!(metrics::rouge_l("x", &no_refs), 0.0);
    assert_eq!(metrics::bleu("x", &no_refs), 0.0);
    assert_eq!(metrics::exact_match(" Paris", &["Paris"], false), 0.0);
    assert_eq!(metrics::contains("the capital is Paris!", &["paris"], false), 0.0);
    assert_eq!(metrics::contains("the capital is Paris!", &["Paris"], false), 1.0);
    assert_eq!(metrics::contains("anything", &["the"], true), 0.0, "an empty normalized reference matches nothing");
    assert_eq!(metrics::text::numbers_in("a -1,234.5 b 3-4 .5 50%"), vec![-1234.5, 3.0, 4.0, 0.5, 50.0]);
    let re = regex::Regex::new(r"^\s*[ABCD]\s*$").unwrap();
    assert_eq!(metrics::regex_match(" C ", &re), 1.0);
    assert_eq!(metrics::regex_match("CD", &re), 0.0);
}

// ---- command metric -----------------------------------------------------------------------

fn script(dir: &Path, name: &str, body: &str) -> CommandMetric {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    CommandMetric { name: name.to_owned(), argv: vec!["sh".into(), path.display().to_string()], timeout: Duration::from_secs(20) }
}

fn items(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"id": i, "prediction": "x".repeat(i % 7), "reference": "yes"})).collect()
}

fn metric_error(r: furnace_evals::Result<Vec<f64>>) -> (String, String) {
    match r {
        Err(Error::Metric { metric, msg }) => (metric, msg),
        other => panic!("expected a metric error, got {other:?}"),
    }
}

#[test]
fn command_scores_a_batch_in_order() {
    let dir = tempfile::tempdir().unwrap();
    // Each score is the length of the item's JSON line; every other one as {"score": x}.
    let m = script(
        dir.path(),
        "len.sh",
        "i=0\nwhile IFS= read -r line; do\n  if [ $((i % 2)) -eq 0 ]; then echo \"${#line}\"; else echo \"{\\\"score\\\": ${#line}}\"; fi\n  i=$((i + 1))\ndone\n",
    );
    let batch = items(25);
    let scores = m.score(&batch).unwrap();
    let expected: Vec<f64> = batch.iter().map(|v| serde_json::to_string(v).unwrap().len() as f64).collect();
    assert_eq!(scores, expected);
    let unbounded = CommandMetric { timeout: Duration::MAX, ..m.clone() };
    assert_eq!(unbounded.score(&batch).unwrap(), expected);
    assert_eq!(m.score(&[]).unwrap(), Vec::<f64>::new());
}

#[test]
fn a_ratio_command_writes_num_and_den_per_item() {
    let dir = tempfile::tempdir().unwrap();
    // num = the line's length, den = 100.
    let m = script(dir.path(), "ratio.sh", "while IFS= read -r line; do echo \"{\\\"num\\\": ${#line}, \\\"den\\\": 100}\"; done\n");
    let batch = items(5);
    let got = m.score_ratio(&batch).unwrap();
    let want: Vec<(f64, f64)> = batch.iter().map(|v| (serde_json::to_string(v).unwrap().len() as f64, 100.0)).collect();
    assert_eq!(got, want);
    // A plain score is not a ratio.
    let plain = script(dir.path(), "plain.sh", "while IFS= read -r line; do echo 1; done\n");
    match plain.score_ratio(&batch) {
        Err(Error::Metric { msg, .. }) => assert!(msg.contains("expected {\"num\": number, \"den\": number}"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn command_that_prints_before_reading_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    // 50 000 output lines (~100 KB) before reading 50 000 input lines: both overflow a pipe.
    let m = script(dir.path(), "eager.sh", "yes 0.5 | head -n 50000\ncat > /dev/null\n");
    let scores = m.score(&items(50_000)).unwrap();
    assert_eq!(scores.len(), 50_000);
    assert!(scores.iter().all(|&x| x == 0.5));
}

#[test]
fn command_with_wrong_line_count_fails() {
    let dir = tempfile::tempdir().unwrap();
    let m = script(dir.path(), "short.sh", "cat > /dev/null\necho 1\necho 0\n");
    let (metric, msg) = metric_error(m.score(&items(3)));
    assert_eq!(metric, "short.sh");
    assert!(msg.contains("printed 2 score lines for 3 items"), "{msg}");
}

#[test]
fn command_with_a_non_number_fails() {
    let dir = tempfile::tempdir().unwrap();
    let m = script(dir.path(), "words.sh", "cat > /dev/null\necho 1\necho '{\"value\": 2}'\n");
    let (_, msg) = metric_error(m.score(&items(2)));
    assert!(msg.contains("output line 2") && msg.contains("{\"value\": 2}"), "{msg}");
}

#[test]
fn command_exiting_non_zero_shows_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let m = script(dir.path(), "fail.sh", "cat > /dev/null\necho 1\necho 'Traceback: no module named judge' >&2\nexit 3\n");
    let (_, msg) = metric_error(m.score(&items(1)));
    assert!(msg.contains("exit status: 3") && msg.contains("no module named judge"), "{msg}");
}

#[test]
fn command_missing_program_fails() {
    let m = CommandMetric { name: "judge".into(), argv: vec!["/nonexistent/furnace-judge".into()], timeout: Duration::from_secs(5) };
    let (metric, msg) = metric_error(m.score(&items(1)));
    assert_eq!(metric, "judge");
    assert!(msg.contains("could not start `/nonexistent/furnace-judge`"), "{msg}");
    let empty = CommandMetric { name: "judge".into(), argv: vec![], timeout: Duration::from_secs(5) };
    assert!(metric_error(empty.score(&items(1))).1.contains("command is empty"));
}

#[test]
fn command_past_its_timeout_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    // `sleep` is a child of the shell and keeps the output pipe open after the shell is killed:
    // the timeout must still return promptly.
    let mut m = script(dir.path(), "slow.sh", "cat > /dev/null\nsleep 30\necho 1\n");
    m.timeout = Duration::from_millis(500);
    let start = Instant::now();
    let (_, msg) = metric_error(m.score(&items(1)));
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(msg.contains("did not finish") && msg.contains("timeout"), "{msg}");
}

/// `furnace eval`'s perplexity against PyTorch + transformers (+ PEFT) on tiny-llama
/// (`scripts/make_ppl_fixtures.py`): the same token ids, every row's NLL and the corpus
/// perplexity, with and without an adapter, over completions and over all tokens.
#[test]
fn model_perplexity_matches_pytorch() {
    use furnace_evals::model_eval::{evaluate_model, ModelEvalOptions};
    use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
    let td = furnace_testutil::testdata();
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(td.join("ppl_cases.json")).unwrap()).unwrap();
    let mut model = LoadedModel::load(&td.join("tiny-llama"), WeightDType::F32).unwrap();
    let adapter = PeftAdapter::load(&td.join("tiny-llama-pref-lora")).unwrap();
    // furnace's rows are PyTorch's ids and labels.
    let template = model.chat_template.clone().unwrap();
    let rows = furnace_train::data::read_rows(&td.join("ppl_eval.jsonl")).unwrap();
    for ((_, row), w) in rows.iter().zip(want["rows"].as_array().unwrap()) {
        let opts = furnace_train::DataOptions { max_seq_len: 2048, ..Default::default() };
        let (e, _) = furnace_train::data::encode_row(row.as_ref().unwrap(), &model.tokenizer, &template, &opts).unwrap();
        assert_eq!(e.ids, furnace_testutil::ids(w, "ids"));
        let labels: Vec<i64> = w["labels"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(e.labels, labels);
    }
    for (which, adapter) in [("base", None), ("adapter", Some(&adapter))] {
        for (mode, all_tokens) in [("completion", false), ("all_tokens", true)] {
            let opts = ModelEvalOptions { all_tokens, ..ModelEvalOptions::default() };
            let got = evaluate_model(&mut model, adapter, &td.join("ppl_eval.jsonl"), &opts, &mut |_, _| {}).unwrap();
            let w = &want[which][mode];
            let (nll, ppl) = (w["mean_nll"].as_f64().unwrap(), w["ppl"].as_f64().unwrap());
            assert!((got.metrics["nll"] - nll).abs() < 1e-4, "{which} {mode}: nll {} vs {nll}", got.metrics["nll"]);
            assert!((got.metrics["ppl"] / ppl - 1.0).abs() < 1e-3, "{which} {mode}: ppl {} vs {ppl}", got.metrics["ppl"]);
            for (p, (s, n)) in got.predictions.iter().zip(w["nll_sum"].as_array().unwrap().iter().zip(w["tokens"].as_array().unwrap())) {
                assert_eq!(p["tokens"].as_u64(), n.as_u64());
                let sum = p["nll"].as_f64().unwrap() * n.as_f64().unwrap();
                assert!((sum / s.as_f64().unwrap() - 1.0).abs() < 1e-4, "{which} {mode}: row nll sum {sum} vs {s}");
            }
        }
    }
}

/// Generation metrics answer each row greedily and score the answer against the row's
/// completion; bad metric names and bad rows are errors that say what to fix.
#[test]
fn model_generation_metrics_and_bad_input() {
    use furnace_evals::model_eval::{evaluate_model, ModelEvalOptions};
    use furnace_model::{LoadedModel, WeightDType};
    let td = furnace_testutil::testdata();
    let mut model = LoadedModel::load(&td.join("tiny-llama"), WeightDType::F32).unwrap();
    let metrics: Vec<String> = ["exact_match", "rouge_l", "json_valid", "length"].iter().map(|s| s.to_string()).collect();
    let opts = ModelEvalOptions { metrics, max_tokens: 6, limit: Some(3), ..ModelEvalOptions::default() };
    let got = evaluate_model(&mut model, None, &td.join("ppl_eval.jsonl"), &opts, &mut |_, _| {}).unwrap();
    assert_eq!(got.predictions.len(), 3);
    assert_eq!(got.metrics["rows"], 3.0);
    for p in &got.predictions {
        let pred = p["prediction"].as_str().unwrap();
        let reference = p["reference"].as_str().unwrap();
        let rouge = furnace_evals::metrics::text::rouge_l(pred, &[reference]);
        assert_eq!(p["rouge_l"].as_f64().unwrap(), rouge);
        assert_eq!(p["length"].as_f64().unwrap(), pred.chars().count() as f64);
    }
    let mean: f64 = got.predictions.iter().map(|p| p["rouge_l"].as_f64().unwrap()).sum::<f64>() / 3.0;
    assert!((got.metrics["rouge_l"] - mean).abs() < 1e-12);
    let bad = ModelEvalOptions { metrics: vec!["perplexity".into()], ..ModelEvalOptions::default() };
    let e = evaluate_model(&mut model, None, &td.join("ppl_eval.jsonl"), &bad, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("'perplexity' is not one of ppl"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.jsonl");
    std::fs::write(&file, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"question\": \"c\"}\n").unwrap();
    let e = evaluate_model(&mut model, None, &file, &ModelEvalOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("d.jsonl:2:") && e.contains("missing columns"), "{e}");
}
