//! `furnace train` end to end on the tiny checkpoint: run folder, metrics, resume, bad specs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_testutil::testdata;
use std::path::{Path, PathBuf};
use std::process::Command;

fn spec(dir: &Path, r: usize, max_steps: usize, train: &str) -> PathBuf {
    let p = dir.join(format!("spec-{r}-{max_steps}.toml"));
    let body = format!(
        r#"[experiment]
name = "tiny"
[data]
train = "{train}"
eval = "eval.jsonl"
[model]
base = "{}"
[lora]
r = {r}
alpha = 8
targets = ["q_proj", "v_proj"]
[trainer]
learning_rate = 1e-2
max_steps = {max_steps}
batch_size = 2
max_seq_len = 64
save_every = 2
"#,
        testdata().join("tiny-llama").display()
    );
    std::fs::write(&p, body).unwrap();
    p
}

fn furnace(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().unwrap()
}

#[test]
fn train_writes_a_run_folder_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..6).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(dir.path().join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), &rows).unwrap();
    let s = spec(dir.path(), 4, 4, "train.jsonl");
    let o = furnace(dir.path(), &["train", s.to_str().unwrap(), "--samples", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("eval loss:") && out.contains("before:") && out.contains("after:"), "{out}");
    let exp = dir.path().join("runs/tiny");
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    for f in [
        "spec.toml",
        "resolved.json",
        "metrics.jsonl",
        "train.log",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoints/step-2/trainer_state.json",
        "checkpoints/step-4/optimizer.safetensors",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    // The generations before and after, as printed, for the dashboard's run page.
    let samples: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("samples.json")).unwrap()).unwrap();
    let first = &samples[0];
    for key in ["prompt", "before", "after"] {
        let v = first[key].as_str().unwrap_or_else(|| panic!("samples.json has no {key}: {samples}"));
        assert!(out.contains(v.trim()), "{key} {v:?} is not what was printed: {out}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert_eq!(metrics.lines().filter(|l| l.contains("eval_loss")).count(), 2, "before and after");
    // Resume the finished run with more steps: it continues from step 4.
    let more = spec(dir.path(), 4, 6, "train.jsonl");
    let o = furnace(dir.path(), &["train", more.to_str().unwrap(), "--resume", "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6], "no step lost or repeated");
}

#[test]
fn bad_specs_and_data_fail_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    std::fs::write(dir.path().join("missing.jsonl"), "{\"question\": \"a\"}\n").unwrap();
    let cases = [
        (spec(dir.path(), 0, 2, "eval.jsonl"), "lora.r: must be > 0"),
        (spec(dir.path(), 4, 2, "empty.jsonl"), "empty"),
        (spec(dir.path(), 5, 2, "missing.jsonl"), "missing.jsonl:1: missing columns"),
    ];
    for (s, want) in cases {
        let o = furnace(dir.path(), &["train", s.to_str().unwrap()]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "wanted '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!dir.path().join("runs").exists(), "a failed start wrote a run folder");
    }
}

#[test]
fn resume_drops_the_view_lines_written_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..6).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(dir.path().join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), &rows).unwrap();
    let s = spec(dir.path(), 4, 4, "train.jsonl");
    let o = furnace(dir.path(), &["train", s.to_str().unwrap(), "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let exp = dir.path().join("runs/tiny");
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    // What a kill after step 5 (checkpoint at 4) leaves in the view, and a cut-short line.
    let mut f = std::fs::OpenOptions::new().append(true).open(run.join("metrics.jsonl")).unwrap();
    use std::io::Write;
    writeln!(f, "{{\"step\": 5, \"loss\": 99.0, \"lr\": 0.01, \"grad_norm\": 1.0, \"tokens_per_s\": 1.0}}").unwrap();
    write!(f, "{{\"step\": 6, \"lo").unwrap();
    drop(f);
    let mut log = std::fs::OpenOptions::new().append(true).open(run.join("train.log")).unwrap();
    writeln!(log, "{{\"step\": 5, \"loss\": 99.0, \"lr\": 0.01, \"grad_norm\": 1.0, \"tokens_per_s\": 1.0}}").unwrap();
    drop(log);
    let more = spec(dir.path(), 4, 6, "train.jsonl");
    let o = furnace(dir.path(), &["train", more.to_str().unwrap(), "--resume", "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps = |key: &str| -> Vec<u64> { lines.iter().filter(|v| v.get(key).is_some()).map(|v| v["step"].as_u64().unwrap()).collect() };
    assert_eq!(steps("loss"), [1, 2, 3, 4, 5, 6], "{metrics}");
    assert!(lines.iter().all(|v| v.get("loss").is_none_or(|l| l.as_f64().unwrap() < 99.0)), "{metrics}");
    assert_eq!(steps("eval_loss"), [0, 4, 6], "{metrics}");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(!log.contains("\"loss\": 99.0"), "{log}");
}

#[test]
fn an_experiment_name_that_is_not_a_folder_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), "{\"prompt\": \"a\", \"completion\": \"b\"}\n").unwrap();
    let s = spec(dir.path(), 4, 2, "eval.jsonl");
    std::fs::write(&s, std::fs::read_to_string(&s).unwrap().replace("name = \"tiny\"", "name = \"..\"")).unwrap();
    for cmd in ["train", "run"] {
        let o = furnace(dir.path(), &[cmd, s.to_str().unwrap()]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("experiment.name"), "{cmd}: {err}");
        // `furnace run` opens the store first; no experiment is recorded.
        let store = dir.path().join("runs/furnace.db");
        assert!(cmd == "run" || !store.exists(), "{cmd} wrote a store");
    }
}

#[test]
fn sigterm_stops_train_with_130_and_resume_finishes_with_every_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows: String = (0..6).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(d.join("train.jsonl"), &rows).unwrap();
    std::fs::write(d.join("eval.jsonl"), &rows).unwrap();
    let s = spec(d, 4, 60, "train.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .current_dir(d)
        .args(["train", s.to_str().unwrap(), "--samples", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let steps = |metrics: &str| -> Vec<u64> {
        metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("loss").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    let exp = d.join("runs/tiny");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        assert!(std::time::Instant::now() < deadline, "no progress within the time limit");
        assert!(child.try_wait().unwrap().is_none(), "training finished before it could be interrupted; make it longer");
        let run = std::fs::read_to_string(exp.join("latest")).ok().map(|r| exp.join(r.trim()));
        if let Some(text) = run.and_then(|r| std::fs::read_to_string(r.join("metrics.jsonl")).ok()) {
            if steps(&text).len() >= 3 {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains(&format!("interrupted; resume with: furnace train {} --resume", s.display())), "{err}");
    // It checkpointed at the last step it logged: the resume redoes nothing.
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    let last = *steps(&std::fs::read_to_string(run.join("metrics.jsonl")).unwrap()).last().unwrap();
    assert!(run.join(format!("checkpoints/step-{last}/trainer_state.json")).is_file(), "no checkpoint at step {last}");
    let o = furnace(d, &["train", s.to_str().unwrap(), "--resume", "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    let got = steps(&std::fs::read_to_string(run.join("metrics.jsonl")).unwrap());
    assert_eq!(got, (1..=60).collect::<Vec<u64>>());
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn latest_run(dir: &Path, name: &str) -> PathBuf {
    let exp = dir.join("runs").join(name);
    exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim())
}

#[test]
fn train_runs_dpo_and_writes_trl_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"chosen\": \"{}\", \"rejected\": \"{}\"}}\n", 2 * i, 2 * i + 3))
        .collect();
    std::fs::write(dir.path().join("pairs.jsonl"), &rows).unwrap();
    let body = format!(
        r#"[experiment]
name = "tinydpo"
[data]
train = "pairs.jsonl"
eval = "pairs.jsonl"
[model]
base = "{}"
[lora]
r = 4
alpha = 8
[trainer]
kind = "dpo"
beta = 0.5
loss_type = ["sigmoid", "sft"]
loss_weights = [1.0, 0.1]
learning_rate = 5e-2
max_steps = 6
batch_size = 2
max_seq_len = 64
eval_every = 3
"#,
        testdata().join("tiny-llama").display()
    );
    std::fs::write(dir.path().join("dpo.toml"), body).unwrap();
    let o = furnace(dir.path(), &["train", "dpo.toml", "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("eval DPO loss: ") && out.contains("eval reward accuracy: 0.000 ->"), "{out}");
    let lines = read_lines(&latest_run(dir.path(), "tinydpo").join("metrics.jsonl"));
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("eval_loss").is_some()).collect();
    assert_eq!(evals.iter().map(|l| l["step"].as_i64().unwrap()).collect::<Vec<_>>(), vec![0, 3, 6]);
    // Before training the policy is the reference: every implicit reward is 0 and the
    // sigmoid loss is log 2 (plus the SFT term).
    assert_eq!(evals[0]["eval_rewards/chosen"].as_f64().unwrap(), 0.0);
    assert!(evals[0].get("eval_ppl").is_none(), "a DPO loss has no perplexity");
    let last = evals[2];
    assert!(last["eval_rewards/accuracies"].as_f64().unwrap() > 0.5, "{last}");
    assert!(last["eval_rewards/margins"].as_f64().unwrap() > 0.0, "{last}");
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 6);
    for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(steps.iter().all(|l| l[k].is_f64()), "every loss line has {k}");
    }
    // `furnace runs` shows the reward accuracy.
    let o = furnace(dir.path(), &["runs", "--runs-dir", "runs"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("eval_acc"), "{table}");
}

#[test]
fn train_runs_grpo_with_a_command_reward() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..6).map(|i| format!("{{\"prompt\": \"Count to {i}\", \"target\": {}}}\n", 3 + i)).collect();
    std::fs::write(dir.path().join("prompts.jsonl"), &rows).unwrap();
    // Scores each completion by how close its length in characters is to the row's target.
    std::fs::write(
        dir.path().join("score.py"),
        "import json, sys\nfor line in sys.stdin:\n    d = json.loads(line)\n    print(-abs(len(d['completion']) - d['row']['target']))\n",
    )
    .unwrap();
    let body = format!(
        r#"[experiment]
name = "tinygrpo"
[data]
train = "prompts.jsonl"
eval = "prompts.jsonl"
[model]
base = "{}"
[lora]
r = 4
alpha = 8
[trainer]
kind = "grpo"
learning_rate = 1e-2
max_steps = 4
batch_size = 2
num_generations = 3
max_completion_length = 8
max_seq_len = 64
num_iterations = 2
save_every = 1
[[reward]]
kind = "command"
name = "closeness"
program = ["python3", "./score.py"]
[[reward]]
kind = "length"
max_length = 4
"#,
        testdata().join("tiny-llama").display()
    );
    std::fs::write(dir.path().join("grpo.toml"), body).unwrap();
    let o = furnace(dir.path(), &["train", "grpo.toml", "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("eval mean reward:"), "{out}");
    let run = latest_run(dir.path(), "tinygrpo");
    let lines = read_lines(&run.join("metrics.jsonl"));
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 4);
    for k in ["reward", "reward_std", "rewards/closeness/mean", "rewards/length/std", "completions/mean_length", "clip_ratio/region_mean"] {
        assert!(steps.iter().all(|l| l[k].is_f64()), "every loss line has {k}: {:?}", steps[0]);
    }
    // Two steps per sampled batch: the second step of a batch logs the same rewards.
    assert_eq!(steps[0]["reward"], steps[1]["reward"]);
    assert_eq!(steps[2]["reward"], steps[3]["reward"]);
    // The checkpoint after the first step holds the batch still to be trained on.
    assert!(run.join("checkpoints/step-1/rollout.json").is_file());
    assert!(run.join("checkpoints/step-2/trainer_state.json").is_file() && !run.join("checkpoints/step-2/rollout.json").exists());
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("eval_reward").is_some()).collect();
    assert_eq!(evals.first().unwrap()["step"], 0);
    assert!(evals.last().unwrap()["eval_rewards/closeness/mean"].as_f64().unwrap() <= 0.0);
}

#[test]
fn eval_writes_metrics_and_predictions_into_the_adapters_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..5).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(dir.path().join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), &rows).unwrap();
    let s = spec(dir.path(), 2, 2, "train.jsonl");
    let o = furnace(dir.path(), &["train", s.to_str().unwrap(), "--samples", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = latest_run(dir.path(), "tiny");
    let tiny = testdata().join("tiny-llama");
    let adapter = run.join("adapter");
    let args = ["eval", "--model", tiny.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--data", "eval.jsonl"];
    let o = furnace(dir.path(), &[&args[..], &["--metrics", "ppl,exact_match,rouge_l", "--max-tokens", "4"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/metrics.json")).unwrap()).unwrap();
    for k in ["ppl", "nll", "tokens", "exact_match", "rouge_l", "rows"] {
        assert!(m["metrics"][k].is_number(), "metrics.json has {k}: {m}");
    }
    // The perplexity is the eval loss the run recorded at its last step, as exp.
    let lines = read_lines(&run.join("metrics.jsonl"));
    let last_eval = lines.iter().rev().find_map(|l| l.get("eval_loss").and_then(|v| v.as_f64())).unwrap();
    assert!((m["metrics"]["nll"].as_f64().unwrap() - last_eval).abs() < 1e-4, "{m} vs {last_eval}");
    let preds = read_lines(&run.join("eval/predictions.jsonl"));
    assert_eq!(preds.len(), 5);
    assert!(preds.iter().all(|p| p["prediction"].is_string() && p["reference"].is_string() && p["nll"].is_number()));
    // Errors say what to fix.
    let o = furnace(dir.path(), &[&args[..], &["--metrics", "ppl,accuracy"]].concat());
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("'accuracy' is not one of"));
    let o = furnace(dir.path(), &["eval", "--model", tiny.to_str().unwrap(), "--data", "nope.jsonl"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nope.jsonl: no such file"));
}

#[test]
fn data_stats_reports_forms_bad_rows_and_a_length_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows: String = (0..8).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    rows.push_str("{\"prompt\": \"no answer\"}\n");
    std::fs::write(dir.path().join("d.jsonl"), &rows).unwrap();
    let tiny = testdata().join("tiny-llama");
    let o = furnace(dir.path(), &["data", "stats", "d.jsonl", "--model", tiny.to_str().unwrap(), "--max-seq-len", "40"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("d.jsonl: 9 rows, 8 usable as sft, 1 bad"), "{out}");
    assert!(out.contains("bad row d.jsonl:9: missing columns"), "{out}");
    assert!(out.contains("forms: prompt 1, prompt_completion 8"), "{out}");
    assert!(out.contains('█') && out.contains("carry the loss") && out.contains("longer than max_seq_len = 40"), "{out}");
    let o = furnace(dir.path(), &["data", "stats", "d.jsonl", "--model", tiny.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lengths"].as_array().unwrap().len(), 8);
    let o = furnace(dir.path(), &["data", "stats", "d.jsonl", "--model", tiny.to_str().unwrap(), "--kind", "kto"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("use sft, dpo or grpo"));
}
