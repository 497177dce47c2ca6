//! `furnace pipeline` end to end on the tiny checkpoint: stage folders, skipping finished
//! stages, rerunning from a changed input, `--from`, and a pipeline killed while training
//! that resumes without redoing its finished stages (prepare → train → merge → eval).

use furnace_testutil::testdata;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn furnace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn rows(n: usize) -> String {
    (0..n).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect()
}

/// A tiny SFT spec on testdata/tiny-llama, reading train.jsonl and eval.jsonl beside it.
fn train_spec(dir: &Path, max_steps: usize) {
    let body = format!(
        r#"[experiment]
name = "tiny"
[data]
train = "train.jsonl"
eval = "eval.jsonl"
[model]
base = "{}"
[lora]
r = 4
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
    std::fs::write(dir.join("train.toml"), body).unwrap();
}

fn stage_json(root: &Path, stage: &str) -> serde_json::Value {
    let dir = latest_dir(root, stage);
    serde_json::from_str(&std::fs::read_to_string(dir.join("stage.json")).unwrap()).unwrap()
}

fn latest_dir(root: &Path, stage: &str) -> PathBuf {
    let rel = std::fs::read_to_string(root.join(stage).join("latest")).unwrap();
    root.join(stage).join(rel.trim())
}

/// The attempt folder's bytes we compare to show a stage was not redone.
fn snapshot(root: &Path, stage: &str) -> (String, String, String) {
    let d = latest_dir(root, stage);
    (d.display().to_string(), std::fs::read_to_string(d.join("stage.json")).unwrap(), std::fs::read_to_string(d.join("log.txt")).unwrap())
}

/// The steps of the loss lines of a run's metrics.jsonl.
fn loss_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn pipeline_runs_skips_reruns_changed_stages_and_restarts_from_a_stage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("train.jsonl"), rows(6)).unwrap();
    std::fs::write(d.join("eval.jsonl"), rows(4)).unwrap();
    train_spec(d, 4);
    let pipeline = |eval_extra: &str| {
        let body = format!(
            "[pipeline]\nname = \"tiny\"\nstages = [\"train\", \"eval\"]\nruns_dir = \"runs\"\n\n[train]\nspec = \"train.toml\"\nsamples = 0\n\n[eval]\nmetrics = [\"ppl\"]\nmax_seq_len = 64\n{eval_extra}"
        );
        std::fs::write(d.join("pipeline.toml"), body).unwrap();
    };
    pipeline("");
    let root = d.join("runs/pipelines/tiny");

    // First run: every stage runs in attempt-1, wired train → eval.
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    running attempt-1 (never run)"), "{out}");
    assert!(out.contains("[2/2] eval     done"), "{out}");
    let train = stage_json(&root, "train");
    assert_eq!(train["status"], "done");
    assert_eq!(train["attempt"], 1);
    assert_eq!(train["exit_code"], 0);
    let adapter = PathBuf::from(train["outputs"]["adapter"].as_str().unwrap());
    assert!(adapter.join("adapter_model.safetensors").is_file(), "{train}");
    assert!(adapter.starts_with(root.join("train/attempt-1").canonicalize().unwrap()), "{}", adapter.display());
    // The effective train spec names the data by absolute paths.
    let eff = std::fs::read_to_string(latest_dir(&root, "train").join("spec.toml")).unwrap();
    assert!(eff.contains(&d.canonicalize().unwrap().join("train.jsonl").display().to_string()), "{eff}");
    assert!(train["inputs"]["files"].as_object().unwrap().keys().any(|k| k.ends_with("train.jsonl")), "{train}");
    let eval = stage_json(&root, "eval");
    let cmd: Vec<&str> = eval["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let at = |flag: &str| cmd[cmd.iter().position(|c| *c == flag).unwrap() + 1];
    assert_eq!(at("--adapter"), adapter.to_str().unwrap(), "{cmd:?}");
    assert!(at("--data").ends_with("eval.jsonl"), "{cmd:?}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(latest_dir(&root, "eval").join("eval/metrics.json")).unwrap()).unwrap();
    assert!(metrics["metrics"]["ppl"].as_f64().unwrap() > 1.0, "{metrics}");
    assert!(std::fs::read_to_string(latest_dir(&root, "train").join("log.txt")).unwrap().contains("adapter:"));
    // The trained adapter is registered in the pipeline's runs folder as PIPELINE/STAGE.
    let registered = |d: &Path| {
        let list: serde_json::Value =
            serde_json::from_str(&ok(&furnace(d, &["adapters", "list", "--json", "--runs-dir", "runs"]))).unwrap();
        let rec = list.as_array().unwrap().iter().find(|a| a["name"] == "tiny/train").cloned();
        rec.unwrap_or_else(|| panic!("tiny/train not registered: {list}"))
    };
    let rec = registered(d);
    assert_eq!(d.join(rec["path"].as_str().unwrap()).canonicalize().unwrap(), adapter, "{rec}");
    assert!(rec["metrics"]["loss"].as_f64().is_some() && rec["tags"] == serde_json::json!(["pipeline"]), "{rec}");

    // A rerun skips both, touching nothing.
    let before = (snapshot(&root, "train"), snapshot(&root, "eval"));
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    skipped (inputs unchanged; attempt-1)"), "{out}");
    assert!(out.contains("[2/2] eval     skipped (inputs unchanged; attempt-1)"), "{out}");
    assert_eq!(before, (snapshot(&root, "train"), snapshot(&root, "eval")));
    let status = ok(&furnace(d, &["pipeline", "pipeline.toml", "--status"]));
    assert_eq!(status.matches("skip: inputs unchanged").count(), 2, "{status}");

    // An eval option changes: train stays, eval runs again.
    pipeline("limit = 2\n");
    let status = ok(&furnace(d, &["pipeline", "pipeline.toml", "--dry-run"]));
    assert!(status.contains("run: inputs changed: its table changed"), "{status}");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    skipped"), "{out}");
    assert!(out.contains("[2/2] eval     running attempt-2 (inputs changed: its table changed)"), "{out}");
    assert_eq!(before.0, snapshot(&root, "train"));
    assert!(stage_json(&root, "eval")["command"].as_array().unwrap().iter().any(|v| v == "--limit"));
    // The option goes back: the attempt that finished with those inputs is reused, not rerun.
    pipeline("");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[2/2] eval     skipped (inputs as in attempt-1, which finished"), "{out}");
    assert_eq!(latest_dir(&root, "eval"), root.join("eval/attempt-1"));
    pipeline("limit = 2\n");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[2/2] eval     skipped (inputs as in attempt-2, which finished"), "{out}");

    // The training data changes: train and everything after it run again.
    std::fs::write(d.join("train.jsonl"), rows(8)).unwrap();
    let status = ok(&furnace(d, &["pipeline", "pipeline.toml", "--status"]));
    assert!(status.contains("train.jsonl changed") && status.contains("run: after train"), "{status}");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    running attempt-2 (inputs changed:") && out.contains("train.jsonl changed"), "{out}");
    assert!(out.contains("[2/2] eval     running attempt-3 (inputs changed: stage train ran again)"), "{out}");
    let adapter2 = stage_json(&root, "train")["outputs"]["adapter"].as_str().unwrap().to_string();
    assert!(adapter2.contains("attempt-2"), "{adapter2}");
    assert!(adapter.is_dir(), "the earlier attempt is kept");

    // --from train: new attempts from train on; the registry names the newest adapter.
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml", "--from", "train"]));
    assert!(out.contains("[1/2] train    running attempt-3 (--from)"), "{out}");
    assert!(registered(d)["path"].as_str().unwrap().contains("attempt-3"), "{}", registered(d));
    assert!(out.contains("[2/2] eval     running attempt-4 (--from)"), "{out}");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert_eq!(out.matches("skipped (inputs unchanged").count(), 2, "{out}");

    // A finished stage whose output was deleted is not skipped: attempt-2 ran on the same
    // inputs and still has its adapter, so it is reused (with the eval that ran after it);
    // with that one deleted too, train runs again, and so does what follows it.
    let adapter3 = stage_json(&root, "train")["outputs"]["adapter"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(&adapter3).unwrap();
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    skipped (inputs as in attempt-2, which finished"), "{out}");
    assert!(out.contains("[2/2] eval     skipped (inputs as in attempt-3, which finished"), "{out}");
    assert!(registered(d)["path"].as_str().unwrap().contains("attempt-2"), "{}", registered(d));
    std::fs::remove_dir_all(&adapter2).unwrap();
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    running attempt-4 (attempt-2's adapter is gone"), "{out}");
    assert!(out.contains("[2/2] eval     running attempt-5"), "{out}");
}

#[test]
fn a_pipeline_killed_while_training_resumes_without_redoing_finished_stages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The spec's own data files are replaced by the prepare stage's split.
    std::fs::write(d.join("train.jsonl"), rows(2)).unwrap();
    std::fs::write(d.join("eval.jsonl"), rows(2)).unwrap();
    std::fs::write(d.join("all.jsonl"), rows(20)).unwrap();
    const STEPS: u64 = 200;
    train_spec(d, STEPS as usize);
    let body = "[pipeline]\nname = \"tiny\"\nstages = [\"prepare\", \"train\", \"merge\", \"eval\"]\n\n\
         [prepare]\ninput = \"all.jsonl\"\nval_fraction = 0.2\nseed = 7\n\n\
         [train]\nspec = \"train.toml\"\nsamples = 0\n\n[merge]\nformat = \"hf\"\n\n[eval]\nmax_seq_len = 64\n";
    std::fs::write(d.join("pipeline.toml"), body).unwrap();
    let root = d.join("runs/pipelines/tiny");
    let mut child = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .current_dir(d)
        .args(["pipeline", "pipeline.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a checkpoint of the training run inside the train stage's folder.
    let exp = root.join("train/attempt-1/runs/tiny");
    let deadline = Instant::now() + Duration::from_secs(300);
    let run = loop {
        assert!(Instant::now() < deadline, "no checkpoint within the time limit");
        assert!(child.try_wait().unwrap().is_none(), "the pipeline ended before it could be killed; make training longer");
        let run = std::fs::read_to_string(exp.join("latest")).ok().map(|r| exp.join(r.trim()));
        if let Some(run) = run {
            let ckpts = std::fs::read_dir(run.join("checkpoints")).map(|rd| rd.count()).unwrap_or(0);
            if ckpts > 0 {
                break run;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // kill -9 of the pipeline process: its training child is left running.
    child.kill().unwrap();
    child.wait().unwrap();
    let prepare = snapshot(&root, "prepare");
    assert_eq!(stage_json(&root, "prepare")["status"], "done");
    assert_eq!(stage_json(&root, "train")["status"], "running", "the kill left the attempt running");
    assert!(loss_steps(&run).len() < STEPS as usize, "training finished before the kill");

    let status = ok(&furnace(d, &["pipeline", "pipeline.toml", "--status"]));
    assert!(status.contains("resume: attempt-1 was cut off"), "{status}");
    let o = furnace(d, &["pipeline", "pipeline.toml"]);
    let out = ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("[1/4] prepare  skipped (inputs unchanged; attempt-1)"), "{out}");
    assert!(out.contains("[2/4] train    resuming attempt-1 (attempt-1 was cut off"), "{out}");
    assert!(out.contains("[3/4] merge    running attempt-1"), "{out}\n{err}");
    assert!(out.contains("[4/4] eval     running attempt-1"), "{out}\n{err}");
    // The finished stage was not redone.
    assert_eq!(prepare, snapshot(&root, "prepare"));
    // Training continued in the same run from a checkpoint, not from step 0.
    let train = stage_json(&root, "train");
    assert_eq!((train["status"].as_str(), train["attempt"].as_u64(), train["resumed"].as_u64()), (Some("done"), Some(1), Some(1)));
    let log = std::fs::read_to_string(latest_dir(&root, "train").join("log.txt")).unwrap();
    let resumed = log.lines().find(|l| l.starts_with("resuming ")).unwrap_or_else(|| panic!("{log}"));
    let step: u64 = resumed.rsplit("step-").next().unwrap().trim().parse().unwrap();
    assert!(step >= 2, "{resumed}");
    assert!(resumed.contains(run.canonicalize().unwrap().file_name().unwrap().to_str().unwrap()), "{resumed}");
    assert_eq!(loss_steps(&run), (1..=STEPS).collect::<Vec<_>>(), "every step once");
    let runs = std::fs::read_dir(&exp).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("run-")).count();
    assert_eq!(runs, 1, "one run, continued");
    // Train read prepare's split; eval read the merged model and prepare's val split, and
    // its perplexity is that of the base with the trained adapter.
    let val = stage_json(&root, "prepare")["outputs"]["val"].as_str().unwrap().to_string();
    let eff = std::fs::read_to_string(latest_dir(&root, "train").join("spec.toml")).unwrap();
    assert!(eff.contains(&val) && eff.contains(stage_json(&root, "prepare")["outputs"]["train"].as_str().unwrap()), "{eff}");
    let eval = stage_json(&root, "eval");
    assert_eq!(eval["status"], "done");
    let merged = stage_json(&root, "merge")["outputs"]["model"].as_str().unwrap().to_string();
    let cmd: Vec<&str> = eval["command"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&cmd[..5], ["eval", "--model", merged.as_str(), "--data", val.as_str()], "{cmd:?}");
    let ppl = |p: &Path| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("eval/metrics.json")).unwrap()).unwrap();
        v["metrics"]["ppl"].as_f64().unwrap()
    };
    let adapter = stage_json(&root, "train")["outputs"]["adapter"].as_str().unwrap().to_string();
    let tiny = testdata().join("tiny-llama");
    let args = ["eval", "--model", tiny.to_str().unwrap(), "--adapter", &adapter, "--data", &val, "--max-seq-len", "64", "--out", "check"];
    ok(&furnace(d, &args));
    let (a, b) = (ppl(&latest_dir(&root, "eval")), ppl(&d.join("check")));
    assert!((a - b).abs() <= 1e-3 * b, "merged model ppl {a} vs base + adapter {b}");
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert_eq!(out.matches("skipped (inputs unchanged").count(), 4, "{out}");
    // A prepare option changes: every stage runs again.
    std::fs::write(d.join("pipeline.toml"), body.replace("seed = 7", "seed = 8")).unwrap();
    let status = ok(&furnace(d, &["pipeline", "pipeline.toml", "--status"]));
    assert!(status.contains("run: inputs changed: its table changed") && status.matches("run: after prepare").count() == 3, "{status}");
}

#[test]
fn bad_pipeline_specs_are_refused_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("data.jsonl"), rows(2)).unwrap();
    let cases = [
        ("[pipeline]\nstages = [\"train\", \"deploy\"]\n[train]\nspec = \"t.toml\"\n[deploy]\n", "unknown stage kind 'deploy'"),
        ("[pipeline]\nstages = [\"train\", \"eval\"]\n[train]\nspec = \"t.toml\"\n", "stage 'eval' has no [eval] table"),
        (
            "[pipeline]\nstages = [\"eval\"]\n[eval]\ndata = \"data.jsonl\"\n",
            "stage 'eval' has no model to eval: put a train or merge stage before it",
        ),
        ("[pipeline]\nstages = [\"merge\"]\n[merge]\nformat = \"hf\"\n", "stage 'merge' has nothing to merge"),
        ("[pipeline]\nstages = [\"train\"]\n[train]\nspec = \"t.toml\"\n[eval]\n", "[eval] is not a stage of pipeline.stages"),
        (
            "[pipeline]\nstages = [\"train\"]\n[train]\nspec = \"t.toml\"\nruns_dir = \"x\"\n",
            "train.runs_dir: the pipeline sets this itself",
        ),
        (
            "[pipeline]\nstages = [\"serve\", \"eval\"]\n[serve]\nmodel = \"m\"\n[eval]\nmodel = \"m\"\ndata = \"data.jsonl\"\n",
            "must be the last stage",
        ),
        ("[stages]\n", "no [pipeline] table"),
        // A stage's keys are checked as its command's flags before anything runs.
        (
            "[pipeline]\nstages = [\"eval\"]\n[eval]\nmodel = \"m\"\ndata = \"data.jsonl\"\nmax_token = 4\n",
            "[eval]: unexpected argument '--max-token' found (a stage's keys are the flags of `furnace eval --help`",
        ),
        (
            "[pipeline]\nstages = [\"prepare\"]\n[prepare]\ninput = \"data.jsonl\"\ndedup = \"fuzzy\"\n",
            "[prepare]: invalid value 'fuzzy' for '--dedup",
        ),
    ];
    for (body, want) in cases {
        std::fs::write(d.join("p.toml"), body).unwrap();
        let o = furnace(d, &["pipeline", "p.toml"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "wanted '{want}' for:\n{body}\ngot: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!d.join("runs").exists(), "a refused spec wrote a runs folder");
    // A missing input file and an unknown --from stage.
    std::fs::write(d.join("p.toml"), "[pipeline]\nstages = [\"train\"]\n[train]\nspec = \"t.toml\"\n").unwrap();
    let err = String::from_utf8_lossy(&furnace(d, &["pipeline", "p.toml"]).stderr).into_owned();
    assert!(err.contains("train.spec") && err.contains("t.toml does not exist"), "{err}");
    let err = String::from_utf8_lossy(&furnace(d, &["pipeline", "p.toml", "--from", "eval"]).stderr).into_owned();
    assert!(err.contains("--from eval: no such stage (stages: train)"), "{err}");
}

#[test]
fn a_failed_stage_shows_its_log_and_runs_again_in_a_new_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("data.jsonl"), rows(2)).unwrap();
    let body = format!(
        "[pipeline]\nname = \"e\"\nstages = [\"eval\"]\n[eval]\nmodel = \"{}\"\ndata = \"data.jsonl\"\nmetrics = [\"bogus\"]\n",
        testdata().join("tiny-llama").display()
    );
    std::fs::write(d.join("p.toml"), &body).unwrap();
    let root = d.join("runs/pipelines/e");
    for attempt in [1, 2] {
        let o = furnace(d, &["pipeline", "p.toml"]);
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
        let why = if attempt == 1 { "never run".to_string() } else { "attempt-1 failed".to_string() };
        assert!(out.contains(&format!("[1/1] eval     running attempt-{attempt} ({why})")), "{out}");
        assert!(err.contains("bogus") && err.contains("stage eval failed: see") && err.contains("log.txt"), "{err}");
        let st = stage_json(&root, "eval");
        assert_eq!((st["status"].as_str(), st["attempt"].as_u64(), st["exit_code"].as_i64()), (Some("failed"), Some(attempt), Some(1)));
    }
    std::fs::write(d.join("p.toml"), body.replace("bogus", "ppl")).unwrap();
    let out = ok(&furnace(d, &["pipeline", "p.toml"]));
    assert!(out.contains("[1/1] eval     running attempt-3 (attempt-2 failed)") && out.contains("ppl"), "{out}");
    assert_eq!(stage_json(&root, "eval")["status"], "done");
}

#[test]
fn sigterm_stops_the_running_stage_and_the_rerun_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("train.jsonl"), rows(6)).unwrap();
    std::fs::write(d.join("eval.jsonl"), rows(4)).unwrap();
    const STEPS: u64 = 200;
    train_spec(d, STEPS as usize);
    let body = "[pipeline]\nname = \"tiny\"\nstages = [\"train\", \"eval\"]\n[train]\nspec = \"train.toml\"\nsamples = 0\n[eval]\nmax_seq_len = 64\n";
    std::fs::write(d.join("pipeline.toml"), body).unwrap();
    let root = d.join("runs/pipelines/tiny");
    let child = Command::new(env!("CARGO_BIN_EXE_furnace"))
        .current_dir(d)
        .args(["pipeline", "pipeline.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exp = root.join("train/attempt-1/runs/tiny");
    let deadline = Instant::now() + Duration::from_secs(300);
    let run = loop {
        assert!(Instant::now() < deadline, "no training step within the time limit");
        if let Some(run) = std::fs::read_to_string(exp.join("latest")).ok().map(|r| exp.join(r.trim())) {
            if loss_steps(&run).len() >= 3 {
                break run;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(130), "{out}\n{err}");
    assert!(err.contains("resume with: furnace pipeline pipeline.toml"), "{err}");
    assert!(out.contains("[1/2] train    interrupted after"), "{out}");
    let train = stage_json(&root, "train");
    assert_eq!(train["status"], "interrupted");
    assert_eq!(train["exit_code"], 130, "the stage got the signal and stopped itself");
    let steps = loss_steps(&run).len() as u64;
    assert!(steps < STEPS, "{steps}");
    // Nothing of the stage is left running.
    let pid = train["child_pid"].as_u64().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}/cmdline")).exists() || std::fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty());
    let out = ok(&furnace(d, &["pipeline", "pipeline.toml"]));
    assert!(out.contains("[1/2] train    resuming attempt-1 (attempt-1 was interrupted: continuing it from its last checkpoint)"), "{out}");
    assert!(out.contains("[2/2] eval     done"), "{out}");
    assert_eq!(loss_steps(&run), (1..=STEPS).collect::<Vec<_>>(), "every step once");
}
