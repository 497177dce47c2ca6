//! User functions in experiments on tiny-llama: a formatting function that fails (or is not
//! registered) fails its run only; `trainer.compute_metrics` records the user's metrics of
//! the run's greedy eval completions at every evaluation.

use furnace_exp::store::MetricRow;
use furnace_exp::{experiment, run_fit, ExperimentRow, FitOptions, RunRow, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use furnace_train::policy::{self, Policy};
use furnace_train::{hooks, load_dataset, DataOptions, Example, TrainableLora};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The first `n` rows of the extraction task's `file`.
fn rows(file: &str, n: usize) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
    text.lines().take(n).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// An experiment over 24 training rows and 6 eval rows (as `write_rows` writes them) on
/// tiny-llama, with `lora` and `trainer` lines added.
fn new_experiment(lora: &str, trainer: &str, write_rows: fn(&Value) -> Value) -> (tempfile::TempDir, Store, ExperimentRow) {
    let dir = tempfile::tempdir().unwrap();
    let train: Vec<Value> = rows("train.jsonl", 24).iter().map(write_rows).collect();
    let eval: Vec<Value> = rows("eval.jsonl", 6).iter().map(write_rows).collect();
    std::fs::write(dir.path().join("train.jsonl"), jsonl(&train)).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), jsonl(&eval)).unwrap();
    let base = testdata().join("tiny-llama").display().to_string().replace('\\', "/");
    let spec = format!(
        "[experiment]\nname = \"hooks\"\nseed = 3\nnum_chunks = 2\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
         [model]\nbase = \"{base}\"\n\n[lora]\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n{lora}\n\n\
         [trainer]\nlearning_rate = 1e-2\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\nschedule = \"constant\"\n{trainer}\n"
    );
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &dir.path().join("spec.toml")).unwrap();
    (dir, store, exp)
}

fn fit(store: &Store, exp: &ExperimentRow, opts: &FitOptions) -> Vec<RunRow> {
    let mut load = |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?);
    run_fit(store, exp, &mut load, opts, &furnace_exp::events::channel()).unwrap().runs
}

/// metric name -> step -> value.
fn series(store: &Store, run: i64) -> BTreeMap<String, BTreeMap<i64, f64>> {
    let mut out: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for MetricRow { step, name, value, .. } in store.metrics(run).unwrap() {
        out.entry(name).or_default().insert(step, value);
    }
    out
}

/// A row of the extraction task with its columns renamed, which furnace cannot read as is.
fn renamed(r: &Value) -> Value {
    json!({"sys": r["system"], "text": r["prompt"], "json": r["completion"]})
}

#[test]
fn a_formatting_function_that_raises_or_is_not_registered_fails_only_its_run() {
    let calls: Arc<Mutex<Vec<usize>>> = Arc::default();
    let log = calls.clone();
    hooks::register(
        "test:exp_fmt_ok",
        Arc::new(move |arg: Value| {
            let rows = arg["rows"].as_array().ok_or("no rows")?;
            log.lock().unwrap().push(rows.len());
            let out: Vec<Value> = rows.iter().map(|r| json!({"system": r["sys"], "prompt": r["text"], "completion": r["json"]})).collect();
            Ok(json!({ "rows": out }))
        }),
    );
    hooks::register(
        "test:exp_fmt_raises",
        Arc::new(|_| Err("Traceback (most recent call last):\n  File \"fmt.py\", line 2, in fmt\nValueError: bad row 3".into())),
    );
    let formatting = "formatting = { list = [\"test:exp_fmt_ok\", \"test:exp_fmt_raises\", \"test:exp_fmt_unregistered\"] }";
    let (_d, store, exp) = new_experiment("r = 2", formatting, renamed);
    let runs = fit(&store, &exp, &FitOptions::default());
    hooks::unregister("test:exp_fmt_ok");
    hooks::unregister("test:exp_fmt_raises");
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    let s = series(&store, runs[0].id);
    assert_eq!(s["loss"].len(), 6);
    assert_eq!(s["eval_loss"].len(), 2);
    // Each file went through the function once (train, then eval), as one batch.
    assert_eq!(*calls.lock().unwrap(), vec![24, 6]);
    assert_eq!(runs[1].status, RunStatus::Failed, "{:?}", runs[1]);
    let e = runs[1].error.as_deref().unwrap();
    assert!(e.contains("test:exp_fmt_raises") && e.contains("ValueError: bad row 3") && e.contains("fmt.py"), "{e}");
    assert_eq!(runs[2].status, RunStatus::Failed, "{:?}", runs[2]);
    let e = runs[2].error.as_deref().unwrap();
    assert!(e.contains("test:exp_fmt_unregistered") && e.contains("not registered") && e.contains("trainer.formatting"), "{e}");
    for r in &runs[1..] {
        assert!(store.metrics(r.id).unwrap().is_empty(), "run {} never trained", r.id);
    }
    assert_eq!(store.experiment("hooks").unwrap().status, "done");
}

/// A number that changes with any character of the texts.
fn fingerprint(texts: &[String]) -> f64 {
    let mut h: u64 = 0;
    for t in texts {
        for b in t.bytes().chain([0xff]) {
            h = (h * 131 + u64::from(b)) % 1_000_000_007;
        }
    }
    h as f64
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

/// Registers `name`: the count of predictions, the mean label length in characters and a
/// fingerprint of the predictions; each call's argument is logged.
fn register_metrics(name: &str) -> Arc<Mutex<Vec<Value>>> {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let log = seen.clone();
    hooks::register(
        name,
        Arc::new(move |arg: Value| {
            log.lock().unwrap().push(arg.clone());
            let (preds, labels) = (strings(&arg["predictions"]), strings(&arg["labels"]));
            let label_chars = labels.iter().map(|l| l.chars().count()).sum::<usize>() as f64 / labels.len() as f64;
            Ok(json!({"count": preds.len(), "label_chars": label_chars, "fingerprint": fingerprint(&preds)}))
        }),
    );
    seen
}

/// The eval examples as the runs see them, and the model.
fn eval_examples() -> (LoadedModel, Vec<Example>) {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("eval.jsonl");
    std::fs::write(&p, jsonl(&rows("eval.jsonl", 6))).unwrap();
    let tpl = m.chat_template.clone().unwrap();
    let ex = load_dataset(&p, &m.tokenizer, &tpl, &DataOptions { max_seq_len: 96, ..DataOptions::default() }).unwrap().examples;
    (m, ex)
}

#[test]
fn compute_metrics_records_the_users_metrics_of_greedy_completions_at_every_eval() {
    let seen = register_metrics("test:exp_metrics");
    let trainer = "compute_metrics = \"test:exp_metrics\"\nmax_completion_length = 8";
    let opts = FitOptions { eval_at_start: true, ..Default::default() };
    let (_d, store, exp) = new_experiment("r = 4", trainer, |r| r.clone());
    let runs = fit(&store, &exp, &opts);
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    let s = series(&store, runs[0].id);
    let labels: Vec<String> = rows("eval.jsonl", 6).iter().map(|r| r["completion"].as_str().unwrap().to_string()).collect();
    let mean_chars = labels.iter().map(|l| l.chars().count()).sum::<usize>() as f64 / 6.0;
    // At every evaluation (the start and each chunk's end), beside eval_loss.
    for name in ["eval_count", "eval_label_chars", "eval_fingerprint", "eval_loss"] {
        assert_eq!(s[name].keys().copied().collect::<Vec<_>>(), vec![0, 3, 6], "{name}");
    }
    assert!(s["eval_count"].values().all(|&v| v == 6.0));
    assert!(s["eval_label_chars"].values().all(|&v| v == mean_chars), "{:?} vs {mean_chars}", s["eval_label_chars"]);
    let calls = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(calls.len(), 3);
    for c in &calls {
        assert_eq!(strings(&c["labels"]), labels);
        assert_eq!(strings(&c["prompts"]).len(), 6);
    }
    // The predictions are the greedy completions of the run's adapter: at step 0 a new
    // adapter's (the base model's), at the end the saved adapter's.
    let (mut m, examples) = eval_examples();
    let adapter = furnace_model::load_adapter(&exp.dir.join(format!("run-{}", runs[0].id)).join("adapter")).unwrap();
    let trained = TrainableLora::from_adapter(&m.model, &adapter).unwrap();
    let fresh = TrainableLora::new(&m.model, trained.config.clone(), furnace_train::LoraInit::KaimingUniform, 9).unwrap();
    let mut policy = Policy { model: &mut m.model, tokenizer: &m.tokenizer, max_batch: 64 };
    let at_start = policy::eval_texts(&mut policy, &fresh, &examples, 8).unwrap();
    let at_end = policy::eval_texts(&mut policy, &trained, &examples, 8).unwrap();
    assert_eq!(strings(&calls[0]["predictions"]), at_start.predictions);
    assert_eq!(strings(&calls[2]["predictions"]), at_end.predictions);
    assert_ne!(at_start.predictions, at_end.predictions, "training changed the completions");
    assert_eq!(s["eval_fingerprint"][&6], fingerprint(&at_end.predictions));
    assert_eq!(at_end.labels, labels);

    // Trained fused with another run, the run computes the same metrics as alone.
    let (_d2, store2, exp2) = new_experiment("r = { list = [2, 4] }", trainer, |r| r.clone());
    let fused = fit(&store2, &exp2, &opts);
    hooks::unregister("test:exp_metrics");
    assert!(fused.iter().all(|r| r.status == RunStatus::Completed), "{fused:?}");
    let f = series(&store2, fused[1].id);
    assert_eq!(f["eval_fingerprint"], s["eval_fingerprint"]);
    assert_eq!(series(&store2, fused[0].id)["eval_count"].len(), 3);
}

#[test]
fn an_unregistered_or_failing_compute_metrics_function_fails_its_run_only() {
    register_metrics("test:exp_metrics_ok");
    hooks::register("test:exp_metrics_raises", Arc::new(|_| Err("Traceback ...\nZeroDivisionError: division by zero".into())));
    let trainer =
        "compute_metrics = { list = [\"test:exp_metrics_ok\", \"test:exp_metrics_unregistered\", \"test:exp_metrics_raises\"] }\nmax_completion_length = 4";
    let (_d, store, exp) = new_experiment("r = 2", trainer, |r| r.clone());
    let runs = fit(&store, &exp, &FitOptions::default());
    hooks::unregister("test:exp_metrics_ok");
    hooks::unregister("test:exp_metrics_raises");
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    assert_eq!(series(&store, runs[0].id)["eval_count"].len(), 2);
    for (run, needles) in [
        (&runs[1], ["test:exp_metrics_unregistered", "not registered", "evaluating at step 3"]),
        (&runs[2], ["test:exp_metrics_raises", "ZeroDivisionError", "evaluating at step 3"]),
    ] {
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        let e = run.error.as_deref().unwrap();
        assert!(needles.iter().all(|n| e.contains(n)), "{e}");
        // The steps before the evaluation stay; the failed evaluation stored nothing.
        let s = series(&store, run.id);
        assert_eq!(s["loss"].len(), 3);
        assert!(!s.contains_key("eval_loss"));
    }
}

/// A GRPO experiment over 4 arithmetic prompts (one a step, 2 completions each; 2 chunks)
/// and 2 eval prompts, rewarded by the function `reward`.
fn grpo_experiment(reward: &str) -> (tempfile::TempDir, Store, ExperimentRow) {
    let dir = tempfile::tempdir().unwrap();
    let read = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/grpo").join(file)).unwrap();
        // Without the system message: short prompts for the tiny model.
        text.lines()
            .take(n)
            .map(|l| {
                let mut row: Value = serde_json::from_str(l).unwrap();
                let msgs = row["prompt"].as_array().unwrap().iter().filter(|m| m["role"] != "system").cloned().collect();
                row["prompt"] = Value::Array(msgs);
                format!("{row}\n")
            })
            .collect()
    };
    std::fs::write(dir.path().join("train.jsonl"), read("train.jsonl", 4)).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), read("eval.jsonl", 2)).unwrap();
    let base = testdata().join("tiny-llama").display().to_string().replace('\\', "/");
    let spec = format!(
        "[experiment]\nname = \"grpo\"\nseed = 5\nnum_chunks = 2\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
         [model]\nbase = \"{base}\"\n\n[lora]\nr = 4\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [trainer]\nkind = \"grpo\"\nlearning_rate = 5e-2\nbatch_size = 1\nmax_seq_len = 64\nschedule = \"constant\"\n\
         max_completion_length = 8\nnum_generations = 2\n\n[[reward]]\nkind = \"function\"\nname = \"chars\"\nfunction = \"{reward}\"\n"
    );
    std::fs::write(dir.path().join("spec.toml"), spec).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &dir.path().join("spec.toml")).unwrap();
    (dir, store, exp)
}

/// A reward function's argument and the rewards it returned.
type Call = (Value, Vec<f64>);

#[test]
fn a_grpo_function_reward_scores_each_batch_of_completions() {
    // (argument, returned rewards) of each call.
    let seen: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = seen.clone();
    hooks::register(
        "test:exp_grpo_chars",
        Arc::new(move |arg: Value| {
            let out: Vec<f64> = strings(&arg["completions"]).iter().map(|c| c.chars().count() as f64).collect();
            log.lock().unwrap().push((arg, out.clone()));
            Ok(json!(out))
        }),
    );
    let (d, store, exp) = grpo_experiment("test:exp_grpo_chars");
    let runs = fit(&store, &exp, &FitOptions::default());
    hooks::unregister("test:exp_grpo_chars");
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    let s = series(&store, runs[0].id);
    let calls = std::mem::take(&mut *seen.lock().unwrap());
    // A training step's batch is 1 prompt x 2 completions, an evaluation's 2 x 2.
    let (train, eval): (Vec<_>, Vec<_>) = calls.iter().partition(|(a, _)| a["completions"].as_array().unwrap().len() == 2);
    assert_eq!(train.iter().map(|(a, _)| a["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(eval.iter().map(|(a, _)| a["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4]);
    let eval_rows = std::fs::read_to_string(d.path().join("eval.jsonl")).unwrap();
    let answers: Vec<Value> = eval_rows.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["answer"].clone()).collect();
    assert_eq!(answers.len(), 2);
    for (arg, out) in &calls {
        let n = out.len();
        let keys: Vec<&String> = arg["columns"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["answer"], "every column but the prompt");
        assert_eq!(arg["columns"]["answer"].as_array().unwrap().len(), n);
        assert_eq!(strings(&arg["prompts"]).len(), n);
        let ids = arg["completion_ids"].as_array().unwrap();
        assert_eq!(ids.len(), n);
        assert!(ids.iter().all(|c| (1..=8).contains(&c.as_array().unwrap().len())), "{ids:?}");
    }
    // The eval calls got the eval rows' answers, each twice (one per completion).
    for (arg, _) in &eval {
        let want: Vec<Value> = answers.iter().flat_map(|a| [a.clone(), a.clone()]).collect();
        assert_eq!(arg["columns"]["answer"].as_array().unwrap(), &want);
    }
    // Step k's reward metric is the mean of what the function returned for its batch.
    for (arg, out) in &train {
        let step = arg["step"].as_i64().unwrap() + 1;
        let mean = out.iter().sum::<f64>() / out.len() as f64;
        assert!((s["rewards/chars/mean"][&step] - mean).abs() < 1e-9, "step {step}");
        assert!((s["reward"][&step] - mean).abs() < 1e-9, "step {step}");
    }
    for (arg, out) in &eval {
        let step = arg["step"].as_i64().unwrap();
        assert!((s["eval_rewards/chars/mean"][&step] - out.iter().sum::<f64>() / out.len() as f64).abs() < 1e-9);
    }
}
