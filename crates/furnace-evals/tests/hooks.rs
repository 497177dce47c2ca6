//! User functions in evals mode (`prompt.preprocess`, `generator.postprocess`, function
//! metrics with and without `accumulate`), registered as Rust closures, on pipelines whose
//! generator is a tiny OpenAI-compatible server in the test that answers each request
//! with its last message, so what the generator saw is what was scored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_evals::{run_evals, EvalOptions};
use furnace_exp::Store;
use furnace_train::hooks::{self, HookFn};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// A server answering each chat request with its last message's content; returns the
/// base URL and the message lists it got.
fn echo_server() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let messages = body["messages"].clone();
                    let text = messages.as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_string();
                    log.lock().unwrap().push(messages);
                    let reply = json!({
                        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                    })
                    .to_string();
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", reply.len());
                    if stream.write_all(format!("{head}{reply}").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

fn register(name: &str, f: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static) {
    let f: HookFn = Arc::new(f);
    hooks::register(name, f);
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect()
}

/// Whether each generated text equals its row's answer.
fn hits(batch: &Value) -> Vec<bool> {
    let rows = batch["rows"].as_array().unwrap();
    strings(&batch["generated_text"]).iter().zip(rows).map(|(t, r)| r["answer"].as_str() == Some(t.as_str())).collect()
}

#[test]
fn user_functions_shape_prompts_answers_and_metrics_and_a_failing_one_fails_only_its_pipeline() {
    // Preprocess: the prompt is the row's answer (so the echo is right), with a column.
    register("test:pre_answer_7f3", |arg| {
        let rows = arg["rows"].as_array().unwrap();
        assert_eq!(arg["questions"].as_array().unwrap().len(), rows.len());
        assert!(arg["contexts"].as_array().unwrap().iter().all(Value::is_null), "no [rag]: null contexts");
        assert_eq!(arg["instructions"], json!("Be brief."));
        // The messages furnace would send: the system message and the rendered question.
        assert_eq!(arg["messages"][0][0]["content"], json!("Be brief."));
        let prompts: Vec<Value> = rows.iter().map(|r| r["answer"].clone()).collect();
        let tags: Vec<Value> = rows.iter().map(|r| json!(format!("tag-{}", r["id"].as_str().unwrap()))).collect();
        Ok(json!({"prompts": prompts, "tag": tags}))
    });
    // Postprocess: the scored answers are the row's answers, whatever was generated; it
    // checks it got the preprocess column (in the pipeline that has both).
    register("test:post_rewrite_7f3", |arg| {
        let mut out = arg.clone();
        let rows = arg["rows"].as_array().unwrap();
        out["generated_text"] = rows.iter().map(|r| r["answer"].clone()).collect();
        out["post_seen"] = json!(arg.get("tag").is_some());
        Ok(out)
    });
    register("test:pre_fails_7f3", |_| Err("Traceback (most recent call last):\nValueError: bad prompt row".into()));
    // Metrics without accumulate: the batch size, and the share of hits.
    register("test:fn_plain_7f3", |b| {
        let h = hits(&b);
        let n = h.len() as f64;
        Ok(json!({"rows_in_batch": {"value": n}, "hit_share": {"value": h.iter().filter(|x| **x).count() as f64 / n}}))
    });
    // Metrics with accumulate: hits and the batch size per shard, combined as a ratio of
    // sums; a second metric marks whether postprocess saw the preprocess column.
    register("test:fn_hits_7f3", |b| {
        let h = hits(&b);
        let saw = b.get("post_seen").and_then(Value::as_bool).unwrap_or(false);
        Ok(json!({
            "hit_rate_fn": {"value": h.iter().filter(|x| **x).count() as f64, "n": h.len()},
            "saw_column": {"value": if saw { h.len() as f64 } else { 0.0 }, "n": h.len()},
        }))
    });
    let calls = Arc::new(Mutex::new(Vec::<Value>::new()));
    let c = calls.clone();
    register("test:fn_acc_7f3", move |arg| {
        c.lock().unwrap().push(arg.clone());
        let mut out = serde_json::Map::new();
        for (name, batches) in arg.as_object().unwrap() {
            let b = batches.as_array().unwrap();
            let hits: f64 = b.iter().map(|d| d["value"].as_f64().unwrap()).sum();
            let n: f64 = b.iter().map(|d| d["n"].as_f64().unwrap()).sum();
            out.insert(name.clone(), json!({"value": hits / n, "is_algebraic": true, "value_range": [0.0, 1.0]}));
        }
        Ok(Value::Object(out))
    });

    let dir = tempfile::tempdir().unwrap();
    let rows: String =
        (0..5).map(|i| format!("{}\n", json!({"id": format!("q{i}"), "question": format!("Q{i}?"), "answer": format!("A{i}")}))).collect();
    std::fs::write(dir.path().join("qa.jsonl"), rows).unwrap();
    let (url, seen) = echo_server();
    let spec = format!(
        r#"[experiment]
name = "hooks"
mode = "evals"
interval = "normal"

[data]
path = "qa.jsonl"
num_shards = 2

[prompt]
system = "Be brief."
template = "Question: {{{{ question }}}}"

[generator]
kind = "openai"
base_url = "{url}"
model = "m"
max_retries = 0

[[group]]
[group.generator]
max_tokens = 8

[[group]]
[group.prompt]
preprocess = "python:pre_answer_7f3"

[[group]]
[group.prompt]
preprocess = "test:pre_answer_7f3"
[group.generator]
postprocess = "test:post_rewrite_7f3"

[[group]]
[group.generator]
postprocess = "test:post_rewrite_7f3"

[[group]]
[group.prompt]
preprocess = "test:pre_fails_7f3"

[[metric]]
kind = "exact_match"

[[metric]]
kind = "function"
compute = "test:fn_plain_7f3"

[[metric]]
kind = "function"
compute = "test:fn_hits_7f3"
accumulate = "test:fn_acc_7f3"
"#
    );
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let mut loader = |name: &str, _| -> furnace_exp::Result<furnace_model::LoadedModel> {
        Err(furnace_exp::Error::Load { model: name.into(), message: "no local model in this test".into() })
    };
    let summary = run_evals(&store, &exp, &mut loader, &EvalOptions::default(), &furnace_exp::events::channel()).unwrap();
    let runs = summary.runs;
    assert_eq!(runs.len(), 5);
    let latest = |id: i64| -> BTreeMap<String, f64> { store.metrics(id).unwrap().into_iter().map(|m| (m.name, m.value)).collect() };
    let bounds = |id: i64, name: &str| store.bound_series(id, name).unwrap();

    // 0: no user function: the echo is the rendered question, never the answer.
    let (plain, unregistered, both, post, fails) = (&runs[0], &runs[1], &runs[2], &runs[3], &runs[4]);
    assert_eq!((plain.status.as_str(), plain.steps_done), ("completed", 2), "{plain:?}");
    let m = latest(plain.id);
    assert_eq!(m["exact_match"], 0.0);
    assert_eq!(m["hit_share"], 0.0);
    assert_eq!(m["hit_rate_fn"], 0.0);
    // The batch size, weighted by batch size over shards of 3 and 2: (3·3 + 2·2)/5.
    assert!((m["rows_in_batch"] - 2.6).abs() < 1e-12, "{m:?}");
    assert!(bounds(plain.id, "rows_in_batch").is_empty(), "without accumulate: no interval");
    let b = bounds(plain.id, "hit_rate_fn");
    assert_eq!(b.len(), 2, "an algebraic metric with a value_range has an interval at each shard");
    let ex = store.eval_examples(plain.id).unwrap();
    assert!(ex.iter().all(|e| e.prediction.starts_with("Question: Q")), "{ex:?}");

    // 1: a name no process registered fails its pipeline with require()'s message.
    assert_eq!(unregistered.status.as_str(), "failed");
    let why = unregistered.error.clone().unwrap_or_default();
    assert!(why.contains("python:pre_answer_7f3") && why.contains("not registered"), "{why}");

    // 2: preprocess made the prompt the answer; the generator saw only that message.
    assert_eq!((both.status.as_str(), both.steps_done), ("completed", 2), "{both:?}");
    let m = latest(both.id);
    assert_eq!((m["exact_match"], m["hit_share"], m["hit_rate_fn"]), (1.0, 1.0, 1.0), "{m:?}");
    assert_eq!(m["saw_column"], 1.0, "postprocess and compute got the preprocess column");
    let seen = seen.lock().unwrap().clone();
    for i in 0..5 {
        assert!(seen.contains(&json!([{"role": "user", "content": format!("A{i}")}])), "A{i} not asked alone: {seen:?}");
    }
    assert!(seen.iter().any(|m| m[0]["content"] == json!("Be brief.")), "the other pipelines kept the system message");
    let (lo, hi) = bounds(both.id, "hit_rate_fn").last().map(|b| (b.1, b.2)).unwrap();
    assert!(lo <= 1.0 && hi >= 1.0, "{lo} {hi}");

    // 3: postprocess alone: the echo was the question, the scored answer is the reference.
    assert_eq!((post.status.as_str(), post.steps_done), ("completed", 2), "{post:?}");
    let m = latest(post.id);
    assert_eq!((m["exact_match"], m["hit_rate_fn"]), (1.0, 1.0), "{m:?}");
    assert_eq!(m["saw_column"], 0.0, "no preprocess: no column");
    let ex = store.eval_examples(post.id).unwrap();
    assert!(ex.iter().all(|e| e.prediction == format!("A{}", &e.example_id[1..])), "{ex:?}");

    // 4: a failing preprocess fails its pipeline with the traceback; the rest went on.
    assert_eq!(fails.status.as_str(), "failed");
    let why = fails.error.clone().unwrap_or_default();
    assert!(why.contains("ValueError: bad prompt row") && why.contains("test:pre_fails_7f3"), "{why}");

    // accumulate got every shard's dict so far (value and numeric fields).
    let calls = calls.lock().unwrap();
    let last = calls.iter().rev().find(|c| c["hit_rate_fn"].as_array().is_some_and(|a| a.len() == 2)).unwrap();
    let ns: Vec<f64> = last["hit_rate_fn"].as_array().unwrap().iter().map(|d| d["n"].as_f64().unwrap()).collect();
    assert_eq!(ns, [3.0, 2.0]);
}

#[test]
fn a_failing_compute_fails_only_the_pipeline_it_failed_on() {
    register("test:pre_answer_c41", |arg| {
        let prompts: Vec<Value> = arg["rows"].as_array().unwrap().iter().map(|r| r["answer"].clone()).collect();
        Ok(json!({"prompts": prompts}))
    });
    register("test:fn_picky_c41", |b| {
        if strings(&b["generated_text"]).iter().any(|t| t.starts_with('A')) {
            return Err("Traceback (most recent call last):\nKeyError: 'A'".into());
        }
        Ok(json!({"fine": {"value": 1.0}}))
    });
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..3).map(|i| format!("{}\n", json!({"question": format!("Q{i}?"), "answer": format!("A{i}")}))).collect();
    std::fs::write(dir.path().join("qa.jsonl"), rows).unwrap();
    let (url, _) = echo_server();
    let spec = format!(
        "[experiment]\nname = \"picky\"\nmode = \"evals\"\n\n[data]\npath = \"qa.jsonl\"\nnum_shards = 1\n\n\
         [generator]\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"m\"\nmax_retries = 0\n\n\
         [[group]]\n[group.generator]\nmax_tokens = 8\n\n[[group]]\n[group.prompt]\npreprocess = \"test:pre_answer_c41\"\n\n\
         [[metric]]\nkind = \"function\"\ncompute = \"test:fn_picky_c41\"\n"
    );
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let mut loader = |name: &str, _| -> furnace_exp::Result<furnace_model::LoadedModel> {
        Err(furnace_exp::Error::Load { model: name.into(), message: "no local model in this test".into() })
    };
    let runs = run_evals(&store, &exp, &mut loader, &EvalOptions::default(), &furnace_exp::events::channel()).unwrap().runs;
    assert_eq!(runs[0].status.as_str(), "completed", "{:?}", runs[0]);
    assert_eq!(store.metric_series(runs[0].id, "fine").unwrap(), [(1, 1.0)]);
    assert_eq!(runs[1].status.as_str(), "failed");
    let why = runs[1].error.clone().unwrap_or_default();
    assert!(why.contains("KeyError: 'A'") && why.contains("test:fn_picky_c41"), "{why}");
    assert!(store.eval_examples(runs[1].id).unwrap().is_empty(), "the failed shard is not recorded");
}

#[test]
fn function_metric_settings_are_checked() {
    let base = "[experiment]\nname = \"x\"\nmode = \"evals\"\n\n[data]\npath = \"d.jsonl\"\n\n";
    let parse = |extra: &str| furnace_evals::EvalSpec::parse(&format!("{base}{extra}"), std::path::Path::new("s.toml"));
    let ok = parse("[[metric]]\nkind = \"function\"\ncompute = \"python:f\"\naccumulate = \"python:g\"\n").unwrap();
    assert_eq!(ok.metric_names(), ["python:f"]);
    for (extra, key) in [
        ("[[metric]]\nkind = \"function\"\n", "metric[0].compute"),
        ("[[metric]]\nkind = \"function\"\ncompute = \"f\"\n", "metric[0].compute"),
        ("[[metric]]\nkind = \"function\"\ncompute = \"python:f\"\naccumulate = \"g\"\n", "metric[0].accumulate"),
        ("[[metric]]\nkind = \"function\"\ncompute = \"python:f\"\nrange = [0, 2]\n", "metric[0].range"),
        ("[[metric]]\nkind = \"contains\"\ncompute = \"python:f\"\n", "metric[0].compute"),
        ("[prompt]\npreprocess = \"nope\"\n[[metric]]\nkind = \"contains\"\n", "prompt.preprocess"),
        ("[generator]\npostprocess = \"nope\"\n[[metric]]\nkind = \"contains\"\n", "generator.postprocess"),
    ] {
        let e = parse(extra).unwrap_err().to_string();
        assert!(e.starts_with(key), "{extra}: {e}");
    }
    // A primary metric may be a name a function metric returns.
    let p = parse("[[metric]]\nkind = \"function\"\ncompute = \"python:f\"\nhigher_is_better = false\n")
        .map(|mut s| {
            s.experiment.primary = Some("acc".into());
            s
        })
        .unwrap();
    p.validate().unwrap();
    assert_eq!(p.primary(), Some(("acc".to_string(), false)));
}
