//! `furnace run` as a user drives it: killed with SIGKILL in the middle of a chunk, run
//! again, it continues the experiment from its checkpoints and ends with every metric once;
//! then `runs`, `results` and `ops` on the finished experiment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_exp::{RunStatus, Store};
use furnace_testutil::repo_root as root;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn furnace(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_furnace"));
    c.current_dir(dir).args(args).args(["--threads", "1"]);
    c
}

fn ok(out: Output) -> String {
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "failed: {se}\n{so}");
    format!("{se}{so}")
}

fn setup(dir: &Path) {
    let rows = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(root().join("data/extract").join(file)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 48)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 4)).unwrap();
    let spec = format!(
        r#"[experiment]
name = "demo"
num_chunks = 3

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "{}"

[lora]
r = {{ list = [4, 8] }}
alpha = 16

[trainer]
learning_rate = 1e-2
batch_size = 2
max_seq_len = 96
"#,
        root().join("testdata/tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(dir.join("spec.toml"), spec).unwrap();
}

/// loss by step and eval_loss by step of every run of an experiment, by run id.
type Series = BTreeMap<i64, (BTreeMap<i64, f64>, BTreeMap<i64, f64>)>;

fn series(store: &Store, exp: &str) -> Series {
    let exp = store.experiment(exp).unwrap();
    let mut out = Series::new();
    for run in store.runs(exp.id).unwrap() {
        let e = out.entry(run.id).or_default();
        for m in store.metrics(run.id).unwrap() {
            let slot = match m.name.as_str() {
                "loss" => &mut e.0,
                "eval_loss" => &mut e.1,
                _ => continue,
            };
            assert!(slot.insert(m.step, m.value).is_none(), "run {} {} at step {} twice", run.id, m.name, m.step);
        }
        assert_eq!(run.status, RunStatus::Completed, "run {}", run.id);
        assert_eq!(e.0.keys().copied().collect::<Vec<_>>(), (1..=run.total_steps).collect::<Vec<_>>(), "run {}: steps", run.id);
        assert_eq!(e.1.len() as i64, run.total_chunks, "run {}: one eval per chunk", run.id);
    }
    out
}

#[test]
fn killed_mid_chunk_then_run_again_continues_with_every_metric_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let mut child = furnace(d, &["run", "spec.toml", "--port", "0"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Wait until a run has a checkpoint and has gone on past it, then SIGKILL.
    let deadline = Instant::now() + Duration::from_secs(300);
    let killed_at = loop {
        assert!(Instant::now() < deadline, "no checkpoint within the time limit");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed; make it longer");
        if let Ok(store) = Store::open_in(&d.join("runs")) {
            if let Ok(exp) = store.experiment("demo") {
                let runs = store.runs(exp.id).unwrap();
                if let Some(r) = runs.iter().find(|r| r.checkpoint_step.is_some_and(|c| r.steps_done > c)) {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    break (r.id, r.steps_done, r.checkpoint_step.unwrap());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let store = Store::open_in(&d.join("runs")).unwrap();
    assert_eq!(store.experiment("demo").unwrap().status, "running");
    // Metrics past the checkpoint were written before the kill.
    assert!(store.metrics(killed_at.0).unwrap().iter().any(|m| m.step > killed_at.2));

    let out = ok(furnace(d, &["run", "spec.toml", "--port", "0"]).output().unwrap());
    assert!(out.contains("continuing experiment demo"), "{out}");
    let resumed = series(&store, "demo");

    // The same experiment without a kill gives the same metrics.
    let out = ok(furnace(d, &["run", "spec.toml", "--port", "0", "--fresh"]).output().unwrap());
    assert!(out.contains("experiment demo_1"), "{out}");
    let reference = series(&store, "demo_1");
    assert_eq!(resumed.len(), reference.len());
    for ((_, (loss, eval)), (_, (rloss, reval))) in resumed.iter().zip(&reference) {
        for (a, b) in [(loss, rloss), (eval, reval)] {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
            for (step, v) in a {
                assert!((v - b[step]).abs() <= 1e-4 * v.abs(), "step {step}: {v} vs {}", b[step]);
            }
        }
    }

    // Views of the finished experiment.
    let runs = ok(furnace(d, &["runs", "demo"]).output().unwrap());
    assert_eq!(runs.matches("completed").count(), 2, "{runs}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(furnace(d, &["results", "demo", "--format", "json"]).output().unwrap())).unwrap();
    let rows = json.as_array().unwrap();
    let total: i64 = store.runs(store.experiment("demo").unwrap().id).unwrap().iter().map(|r| r.total_steps).sum();
    assert_eq!(rows.len() as i64, total, "one row per run and step");
    assert!(rows.iter().all(|r| r["loss"].is_f64() && r["lr"].is_f64()));
    let csv = ok(furnace(d, &["results", "demo", "--format", "csv"]).output().unwrap());
    assert!(csv.lines().next().unwrap().starts_with("run_id,step,time,loss,eval_loss"), "{csv}");

    // Ops from the command line: refused with a reason, or recorded and applied when the
    // experiment continues.
    let (first, _) = resumed.iter().next().unwrap();
    let out = furnace(d, &["ops", "stop", &first.to_string()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a new or ongoing run can stop"));
    let out = ok(furnace(d, &["ops", "clone", &first.to_string(), "--set", "trainer.learning_rate=3e-2"]).output().unwrap());
    assert!(out.contains("recorded"), "{out}");
    ok(furnace(d, &["run", "--experiment", "demo", "--no-server"]).output().unwrap());
    let exp = store.experiment("demo").unwrap();
    let clone = store.runs(exp.id).unwrap().into_iter().find(|r| r.parent_id == Some(*first)).expect("the clone");
    assert_eq!(clone.status, RunStatus::Completed);
    assert_eq!(clone.config["trainer"]["learning_rate"], 3e-2);
    let listed = ok(furnace(d, &["ops", "list", "demo"]).output().unwrap());
    assert!(listed.contains("applied") && listed.contains("trainer.learning_rate=3e-2"), "{listed}");
}

#[test]
fn ctrl_c_stops_cleanly_with_130_and_run_experiment_finishes_with_every_metric_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let mut child = furnace(d, &["run", "spec.toml", "--no-server"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until a run has trained some steps, then Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "no progress within the time limit");
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be interrupted; make it longer");
        if let Ok(store) = Store::open_in(&d.join("runs")) {
            if let Ok(exp) = store.experiment("demo") {
                if store.runs(exp.id).unwrap().iter().any(|r| r.steps_done >= 2) {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted; resume with: furnace run --experiment demo"), "{err}");
    let store = Store::open_in(&d.join("runs")).unwrap();
    let exp = store.experiment("demo").unwrap();
    assert_eq!(exp.status, "running");
    assert!(store.runs(exp.id).unwrap().iter().any(|r| r.status != RunStatus::Completed), "interrupted before the end");

    ok(furnace(d, &["run", "--experiment", "demo", "--no-server"]).output().unwrap());
    let done = series(&store, "demo");
    assert_eq!(done.len(), 2);

    // `furnace serve --experiment demo` serves every completed run's adapter on the
    // experiment's base, by the name EXPERIMENT/run-N.
    let server = crate::serve::Server::start(&d.join("runs"), &["--experiment", "demo", "--dtype", "f32", "--max-batch", "4"]);
    let (status, models) = server.http("GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    for id in done.keys() {
        let name = format!("demo/run-{id}");
        assert!(models.contains(&format!("\"{name}\"")), "{name} not in {models}");
        let body = serde_json::json!({"model": name, "prompt": "hello", "max_tokens": 4, "temperature": 0});
        let (status, answer) = server.http("POST", "/v1/completions", Some(&body));
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains("\"text_completion\""), "{answer}");
    }
    // What the server did is on /metrics, per model.
    let (status, metrics) = server.http("GET", "/metrics", None);
    assert_eq!(status, 200);
    let first = done.keys().next().expect("a run");
    assert!(metrics.contains(&format!("furnace_requests_total{{model=\"demo/run-{first}\"}} 1")), "{metrics}");
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");
}
