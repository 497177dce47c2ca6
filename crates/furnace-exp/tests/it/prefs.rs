//! DPO and GRPO runs in experiments on tiny-llama: fused steps equal steps taken alone,
//! knobs over preference settings, resuming after a cancel or a crash (a GRPO checkpoint
//! holding a batch still to be trained on), warm clones, ASHA by eval reward, and specs
//! that name the key they get wrong.

use furnace_exp::store::MetricRow;
use furnace_exp::{experiment, ops, run_fit, ExperimentRow, FitOptions, OpKind, RunRow, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn base() -> String {
    testdata().join("tiny-llama").display().to_string().replace('\\', "/")
}

fn head(file: &Path, n: usize) -> String {
    std::fs::read_to_string(file).unwrap().lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// A DPO spec over 8 pairs (2 chunks of 2 steps: batch 2) and 4 eval pairs.
fn dpo_spec(dir: &Path, trainer: &str, extra: &str) -> PathBuf {
    let data = repo_root().join("data/dpo");
    std::fs::write(dir.join("train.jsonl"), head(&data.join("train.jsonl"), 8)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), head(&data.join("eval.jsonl"), 4)).unwrap();
    let spec = format!(
        r#"
[experiment]
name = "dpo"
seed = 3
num_chunks = 2
{extra}

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "{}"

[lora]
r = 4
alpha = 16
targets = ["q_proj", "v_proj"]

[trainer]
kind = "dpo"
learning_rate = 2e-2
batch_size = 2
max_seq_len = 96
schedule = "constant"
{trainer}
"#,
        base()
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

/// GRPO prompts: the shipped arithmetic problems without their system message (short
/// prompts for the tiny model).
fn prompts(file: &Path, n: usize) -> String {
    head(file, n)
        .lines()
        .map(|l| {
            let mut row: serde_json::Value = serde_json::from_str(l).unwrap();
            let msgs = row["prompt"].as_array().unwrap().iter().filter(|m| m["role"] != "system").cloned().collect();
            row["prompt"] = serde_json::Value::Array(msgs);
            format!("{row}\n")
        })
        .collect()
}

/// Two rewards that vary over the random completions of the tiny model (which always
/// run to `max_completion_length` tokens, so a length in tokens would not): a doubled vowel
/// somewhere, and the length in characters of the item the command reads.
const REWARDS: &str = r#"
[[reward]]
kind = "regex"
name = "vowels"
pattern = "[aeiou]{2}"

[[reward]]
kind = "command"
name = "chars"
program = ["sh", "-c", 'while IFS= read -r l; do echo ${#l}; done']
"#;

/// A GRPO spec over 4 prompts (2 chunks of 2 prompts, one prompt a step) and 2 eval
/// prompts, short completions.
fn grpo_spec(dir: &Path, trainer: &str, extra: &str) -> PathBuf {
    let data = repo_root().join("data/grpo");
    std::fs::write(dir.join("train.jsonl"), prompts(&data.join("train.jsonl"), 4)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), prompts(&data.join("eval.jsonl"), 2)).unwrap();
    let spec = format!(
        r#"
[experiment]
name = "grpo"
seed = 5
num_chunks = 2
{extra}

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "{}"

[lora]
r = 4
alpha = 16
targets = ["q_proj", "v_proj"]

[trainer]
kind = "grpo"
learning_rate = 5e-2
batch_size = 1
max_seq_len = 64
schedule = "constant"
max_completion_length = 8
temperature = 1.0
{trainer}
{REWARDS}
"#,
        base()
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

type Made = (tempfile::TempDir, Store, ExperimentRow);

fn make(spec: fn(&Path, &str, &str) -> PathBuf, trainer: &str, extra: &str) -> Made {
    let dir = tempfile::tempdir().unwrap();
    let path = spec(dir.path(), trainer, extra);
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &path).unwrap();
    (dir, store, exp)
}

fn loader() -> impl FnMut(&str, WeightDType) -> furnace_exp::Result<LoadedModel> {
    |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?)
}

fn fit(store: &Store, exp: &ExperimentRow, opts: &FitOptions) -> Vec<RunRow> {
    run_fit(store, exp, &mut loader(), opts, &furnace_exp::events::channel()).unwrap().runs
}

type Series = BTreeMap<String, BTreeMap<i64, f64>>;

/// metric name -> step -> value, asserting each (step, name) appears once.
fn series(store: &Store, run: i64) -> Series {
    let mut out: Series = BTreeMap::new();
    for MetricRow { step, name, value, .. } in store.metrics(run).unwrap() {
        assert!(out.entry(name.clone()).or_default().insert(step, value).is_none(), "run {run}: {name} at step {step} twice");
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-4)
}

/// Every metric of `want` (and only those) in `got`, at the same steps, with close values.
fn assert_same_series(got: &Series, want: &Series, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: metric names");
    for (name, values) in want {
        assert_eq!(got[name].keys().collect::<Vec<_>>(), values.keys().collect::<Vec<_>>(), "{what}: steps of {name}");
        for (step, v) in values {
            let g = got[name][step];
            assert!(close(g, *v), "{what}: {name} at step {step}: {g} vs {v}");
        }
    }
}

fn assert_complete(store: &Store, run: &RunRow) {
    assert_complete_from(store, run, 1, run.total_chunks);
}

/// Completed, with every step from `first` on recorded once and `rungs` chunk ends.
fn assert_complete_from(store: &Store, run: &RunRow, first: i64, rungs: i64) {
    assert_eq!(run.status, RunStatus::Completed, "{run:?}");
    let s = series(store, run.id);
    let steps: Vec<i64> = s["loss"].keys().copied().collect();
    assert_eq!(steps, (first..=run.total_steps).collect::<Vec<_>>(), "run {} has a gap or extra steps", run.id);
    assert_eq!(s["chunk"].len() as i64, rungs, "run {}: one rung per chunk", run.id);
}

/// Submits `op` for `target` when run `when.0` reaches step `when.1`.
fn hook(store: &Store, plan: Vec<((i64, i64), i64, OpKind)>) -> FitOptions {
    let s = Mutex::new(store.reopen().unwrap());
    let plan = Mutex::new(plan);
    FitOptions {
        on_step: Some(Arc::new(move |run, step| {
            for (when, target, op) in plan.lock().unwrap().iter() {
                if *when == (run, step) {
                    ops::submit(&s.lock().unwrap(), *target, op, "test").unwrap();
                }
            }
        })),
        ..Default::default()
    }
}

/// Cancels the fit once run `run` took step `step` (every run is checkpointed there).
fn cancel_at(run: i64, step: i64) -> FitOptions {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    FitOptions {
        cancel: Some(cancel),
        on_step: Some(Arc::new(move |r, s| {
            if (r, s) == (run, step) {
                c.store(true, Ordering::Relaxed);
            }
        })),
        ..Default::default()
    }
}

/// Makes the store write a crash would interrupt fail (see fit.rs's tests).
fn crash_at(store: &Store, when: &str) {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn.execute_batch(&format!(
        "DROP TRIGGER IF EXISTS crash; CREATE TRIGGER crash {when} BEGIN SELECT RAISE(ABORT, 'simulated crash'); END;"
    ))
    .unwrap();
}

fn no_crash(store: &Store) {
    rusqlite::Connection::open(store.path()).unwrap().execute_batch("DROP TRIGGER IF EXISTS crash;").unwrap();
}

// ---------------------------------------------------------------------------------------
// 1. Fused = alone.

#[test]
fn prefs_dpo_runs_trained_fused_match_each_trained_alone() {
    let (_d, store, exp) = make(dpo_spec, "beta = { list = [0.1, 0.5] }", "");
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), 2);
    for r in &runs {
        // 8 pairs, 2 chunks of 4, batch 2: 2 steps per chunk.
        assert_eq!((r.total_steps, r.total_chunks), (4, 2));
        assert_complete(&store, r);
    }
    assert_eq!(runs[1].knobs["trainer.beta"], 0.5);
    for (i, beta) in [(0, "0.1"), (1, "0.5")] {
        let (_d1, store1, exp1) = make(dpo_spec, &format!("beta = {beta}"), "");
        let alone = fit(&store1, &exp1, &FitOptions::default());
        let (fused, solo) = (series(&store, runs[i].id), series(&store1, alone[0].id));
        for name in ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/margins"] {
            assert!(solo.contains_key(name), "{name} is stored: {:?}", solo.keys());
        }
        assert_same_series(&fused, &solo, &format!("dpo beta {beta}"));
    }
    // The two betas trained differently.
    let (a, b) = (series(&store, runs[0].id), series(&store, runs[1].id));
    assert!(!close(a["loss"][&4], b["loss"][&4]));
}

fn assert_grpo_fused_matches_alone(knob: &str, values: &[&str], key: &str) {
    let (_d, store, exp) = make(grpo_spec, &format!("{key} = {{ list = [{knob}] }}"), "");
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), values.len());
    for r in &runs {
        // 4 prompts, 2 chunks of 2, one prompt a step.
        assert_eq!((r.total_steps, r.total_chunks), (4, 2));
        assert_complete(&store, r);
    }
    let mut varied = false;
    for (i, value) in values.iter().enumerate() {
        let (_d1, store1, exp1) = make(grpo_spec, &format!("{key} = {value}"), "");
        let alone = fit(&store1, &exp1, &FitOptions::default());
        let (fused, solo) = (series(&store, runs[i].id), series(&store1, alone[0].id));
        for name in ["loss", "reward", "reward_std", "rewards/vowels/mean", "completions/mean_length", "eval_reward"] {
            assert!(solo.contains_key(name), "{name} is stored: {:?}", solo.keys());
        }
        varied |= solo["reward_std"].values().any(|&s| s > 0.0);
        assert_same_series(&fused, &solo, &format!("grpo {key} = {value}"));
    }
    assert!(varied, "the rewards vary over the sampled completions (non-zero advantages)");
}

#[test]
fn prefs_grpo_runs_trained_fused_match_each_trained_alone() {
    assert_grpo_fused_matches_alone("[1.0, 0.0], [1.0, 1.0]", &["[1.0, 0.0]", "[1.0, 1.0]"], "reward_weights");
    assert_grpo_fused_matches_alone("2, 4", &["2", "4"], "num_generations");
}

// ---------------------------------------------------------------------------------------
// 2. Knobs over preference settings.

#[test]
fn prefs_reward_weights_knobs_and_reward_tables_survive_expansion() {
    let dir = tempfile::tempdir().unwrap();
    let path = grpo_spec(dir.path(), "reward_weights = { list = [[1.0, 0.0], [1.0, 1.0]] }\nnum_generations = 2", "");
    let (_, leaves) = experiment::read_spec(&path).unwrap();
    assert_eq!(leaves.len(), 2);
    for (leaf, want) in leaves.iter().zip([[1.0, 0.0], [1.0, 1.0]]) {
        assert_eq!(leaf.spec.trainer.reward_weights.as_deref(), Some(&want[..]));
        let names: Vec<Option<&str>> = leaf.spec.rewards.iter().map(|r| r.name.as_deref()).collect();
        assert_eq!(names, [Some("vowels"), Some("chars")]);
        assert_eq!(leaf.spec.rewards[1].program.as_ref().map(Vec::len), Some(3));
        let furnace_train::Objective::Grpo(g) = leaf.spec.objective().unwrap() else { panic!("not grpo") };
        assert_eq!((g.reward_weights.as_deref(), g.num_generations), (Some(&want[..]), 2));
        assert_eq!(leaf.knobs.len(), 1);
        assert_eq!(leaf.knobs[0].0, "trainer.reward_weights");
    }
    // Stored with each run: the config has the rewards, the knobs the weights.
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &path).unwrap();
    let runs = store.runs(exp.id).unwrap();
    assert_eq!(runs[1].knobs["trainer.reward_weights"], serde_json::json!([1.0, 1.0]));
    for r in &runs {
        assert_eq!(r.config["reward"].as_array().map(Vec::len), Some(2), "{}", r.config);
        let spec: furnace_train::Spec = serde_json::from_value(r.config.clone()).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.rewards, leaves[0].spec.rewards);
    }
    // A loss_type list knob for DPO: each leaf a list.
    let d = tempfile::tempdir().unwrap();
    let p = dpo_spec(
        d.path(),
        "loss_type = { list = [\"sigmoid\", [\"sigmoid\", \"sft\"]] }\nloss_weights = { list = [[1.0], [1.0, 0.5]] }",
        "",
    );
    let err = experiment::read_spec(&p).unwrap_err().to_string();
    // The grid pairs every loss_type with every loss_weights: mismatched lengths name the key.
    assert!(err.contains("trainer.loss_weights"), "{err}");
}

// ---------------------------------------------------------------------------------------
// 3. Resuming after a cancel or a crash.

#[test]
fn prefs_grpo_resumes_exactly_with_a_pending_rollout() {
    let trainer = "num_iterations = 2\nsave_every = 1\nnum_generations = 2";
    let (_d0, store0, exp0) = make(grpo_spec, trainer, "");
    let reference = fit(&store0, &exp0, &FitOptions::default());
    // 4 prompts, 2 chunks, 2 iterations a batch: 4 steps per chunk.
    assert_eq!((reference[0].total_steps, reference[0].total_chunks), (8, 2));
    assert_complete(&store0, &reference[0]);
    let want = series(&store0, reference[0].id);
    // The second iteration of a batch logs that batch's rewards again.
    assert_eq!(want["reward"][&1], want["reward"][&2]);

    // Cancelled after step 3: the first iteration of the second batch; the checkpoint holds
    // the batch still to be trained on once more.
    let (_d, store, exp) = make(grpo_spec, trainer, "");
    let id = store.runs(exp.id).unwrap()[0].id;
    let summary = run_fit(&store, &exp, &mut loader(), &cancel_at(id, 3), &furnace_exp::events::channel()).unwrap();
    assert!(summary.cancelled);
    let row = store.run(id).unwrap();
    assert_eq!(row.checkpoint_step, Some(3));
    let ckpt = exp.dir.join(format!("run-{id}/checkpoints/step-3"));
    let rollout: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("rollout.json")).unwrap()).unwrap();
    assert_eq!(rollout["iterations_left"], 1);
    assert!(rollout["old"].is_array(), "the first iteration's log-probabilities are kept");
    // A checkpoint after the second iteration has none.
    assert!(!exp.dir.join(format!("run-{id}/checkpoints/step-2/rollout.json")).exists());
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_complete(&store, &runs[0]);
    assert_same_series(&series(&store, id), &want, "grpo resumed after a cancel at step 3");

    // A crash (the store write of step 4's metrics fails, as a kill would leave it): the
    // restart continues from the step-3 checkpoint and its pending batch.
    let (_d2, store2, exp2) = make(grpo_spec, trainer, "");
    let id2 = store2.runs(exp2.id).unwrap()[0].id;
    crash_at(&store2, "BEFORE INSERT ON metrics WHEN NEW.step = 4");
    let err = run_fit(&store2, &exp2, &mut loader(), &FitOptions::default(), &furnace_exp::events::channel()).unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    assert_eq!(store2.run(id2).unwrap().checkpoint_step, Some(3));
    no_crash(&store2);
    let runs = fit(&store2, &exp2, &FitOptions::default());
    assert_complete(&store2, &runs[0]);
    assert_same_series(&series(&store2, id2), &want, "grpo restarted after a crash at step 4");
}

#[test]
fn prefs_dpo_resumes_exactly_after_a_cancel_and_a_crash() {
    let trainer = "beta = { list = [0.1, 0.3] }\nsave_every = 1";
    let (_d0, store0, exp0) = make(dpo_spec, trainer, "");
    let reference = fit(&store0, &exp0, &FitOptions::default());
    let (_d, store, exp) = make(dpo_spec, trainer, "");
    let ids: Vec<i64> = store.runs(exp.id).unwrap().iter().map(|r| r.id).collect();
    assert!(run_fit(&store, &exp, &mut loader(), &cancel_at(ids[0], 3), &furnace_exp::events::channel()).unwrap().cancelled);
    crash_at(&store, "BEFORE INSERT ON metrics WHEN NEW.step = 4");
    assert!(run_fit(&store, &exp, &mut loader(), &FitOptions::default(), &furnace_exp::events::channel()).is_err());
    no_crash(&store);
    let runs = fit(&store, &exp, &FitOptions::default());
    for (r, want) in runs.iter().zip(&reference) {
        assert_complete(&store, r);
        assert_same_series(&series(&store, r.id), &series(&store0, want.id), &format!("dpo run {}", r.id));
    }
}

// ---------------------------------------------------------------------------------------
// 4. Warm clones.

#[test]
fn prefs_a_dpo_warm_clone_with_another_beta_continues_from_the_parent() {
    // The parent's beta is the default (not in its spec): the clone still sets it.
    let (_d, store, exp) = make(dpo_spec, "", "");
    let a = store.runs(exp.id).unwrap()[0].id;
    let warm = OpKind::Clone { set: vec!["trainer.beta=0.5".into()], warm: true };
    let runs = fit(&store, &exp, &hook(&store, vec![((a, 2), a, warm)]));
    let clone = runs.iter().find(|r| r.parent_id == Some(a) && r.warm).expect("warm clone");
    // From step 3, the second chunk only.
    assert_complete_from(&store, clone, 3, 1);
    assert_eq!((clone.total_steps, clone.total_chunks), (4, 2));
    assert_eq!(clone.knobs["trainer.beta"], 0.5);
    assert_eq!(clone.config["trainer"]["beta"], 0.5);
    let (c, p) = (series(&store, clone.id), series(&store, a));
    // Step 3 on the parent's weights and pairs: the same log-probabilities; the rewards
    // scale with beta (0.5 / 0.1).
    assert_eq!(*c["loss"].keys().next().unwrap(), 3);
    for name in ["logps/chosen", "logps/rejected", "rewards/accuracies"] {
        assert!(close(c[name][&3], p[name][&3]), "{name}: {} vs {}", c[name][&3], p[name][&3]);
    }
    for name in ["rewards/chosen", "rewards/margins"] {
        assert!(close(c[name][&3], 5.0 * p[name][&3]), "{name}: {} vs 5 x {}", c[name][&3], p[name][&3]);
    }
    assert!(!close(c["loss"][&3], p["loss"][&3]));
}

#[test]
fn prefs_a_grpo_warm_clone_keeps_the_parents_rewards() {
    let (_d, store, exp) = make(grpo_spec, "num_generations = 2", "");
    let a = store.runs(exp.id).unwrap()[0].id;
    let warm = OpKind::Clone { set: vec!["trainer.reward_weights=[1.0, 0.0]".into()], warm: true };
    let runs = fit(&store, &exp, &hook(&store, vec![((a, 2), a, warm)]));
    let clone = runs.iter().find(|r| r.parent_id == Some(a) && r.warm).expect("warm clone");
    // From step 3, the second chunk only.
    assert_complete_from(&store, clone, 3, 1);
    assert_eq!((clone.total_steps, clone.total_chunks), (4, 2));
    assert_eq!(clone.config["reward"], runs[0].config["reward"]);
    let (c, p) = (series(&store, clone.id), series(&store, a));
    assert_eq!(*c["loss"].keys().next().unwrap(), 3);
    // Step 3 samples the same completions from the same adapter: the same per-reward
    // means; the total reward weighs only the first now.
    for name in ["rewards/vowels/mean", "rewards/chars/mean", "completions/mean_length"] {
        assert!(close(c[name][&3], p[name][&3]), "{name}: {} vs {}", c[name][&3], p[name][&3]);
    }
    assert!(close(c["reward"][&3], c["rewards/vowels/mean"][&3]), "{c:?}");
    assert!(c.contains_key("eval_reward"));
}

// ---------------------------------------------------------------------------------------
// 5. ASHA ranks GRPO runs by eval reward.

#[test]
fn prefs_rank_score_prefers_a_higher_eval_reward() {
    let score = |m: &[(&str, f64)]| {
        let m: Vec<(String, f64)> = m.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        furnace_exp::fit::rank_score(&|n: &str| m.iter().find(|x| x.0 == n).map(|x| x.1)).unwrap()
    };
    assert!(score(&[("eval_reward", 0.7), ("loss", 5.0)]) < score(&[("eval_reward", 0.2), ("loss", 0.1)]));
    assert!(score(&[("eval_loss", 0.5)]) < score(&[("eval_loss", 0.9)]));
    assert!(score(&[("reward", 0.9)]) < score(&[("reward", 0.1)]));
}

#[test]
fn prefs_asha_stops_the_grpo_run_with_the_lower_eval_reward() {
    // The second run's total adds a reward >= 0: its eval reward is at least the first's.
    let (_d, store, exp) =
        make(grpo_spec, "reward_weights = { list = [[1.0, 0.0], [1.0, 1.0]] }\nnum_generations = 2", "policy = \"asha\"\neta = 2");
    let runs = fit(&store, &exp, &FitOptions::default());
    let rung1: Vec<f64> = runs.iter().map(|r| series(&store, r.id)["eval_reward"][&2]).collect();
    assert!(rung1[0] != rung1[1], "the runs differ at rung 1: {rung1:?}");
    let (worse, better) = if rung1[0] < rung1[1] { (0, 1) } else { (1, 0) };
    assert_eq!((runs[worse].status, runs[worse].chunks_done), (RunStatus::Stopped, 1), "{runs:?}");
    assert_eq!(runs[better].status, RunStatus::Completed, "{runs:?}");
    let policy: Vec<i64> = store.ops(exp.id).unwrap().iter().filter(|o| o.source == "policy").map(|o| o.run_id).collect();
    assert_eq!(policy, [runs[worse].id]);
}

// ---------------------------------------------------------------------------------------
// 6. Bad specs name their key.

#[test]
fn prefs_bad_specs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let parse = |spec: fn(&Path, &str, &str) -> PathBuf, trainer: &str, rewards: Option<&str>| -> String {
        let path = spec(dir.path(), trainer, "");
        let mut text = std::fs::read_to_string(&path).unwrap();
        if let Some(r) = rewards {
            text = text.replace(REWARDS, r);
        }
        match furnace_train::Spec::parse(&text, &path) {
            Ok(_) => panic!("accepted: {trainer}"),
            Err(e) => e.to_string(),
        }
    };
    let cases: Vec<(String, &str)> = vec![
        (parse(dpo_spec, "num_generations = 4", None), "trainer.num_generations"),
        (parse(dpo_spec, "reward_weights = [1.0]", None), "trainer.reward_weights"),
        (parse(dpo_spec, "packing = true", None), "trainer.packing"),
        (parse(dpo_spec, "loss_type = \"dapo\"", None), "trainer.loss_type"),
        (parse(dpo_spec, "loss_type = [\"sigmoid\", \"sft\"]\nloss_weights = [1.0]", None), "trainer.loss_weights"),
        (parse(grpo_spec, "", Some("")), "reward"),
        (parse(grpo_spec, "reward_weights = [1.0]", None), "trainer.reward_weights"),
        (parse(grpo_spec, "reward_weights = [1.0, 2.0, 3.0]", None), "trainer.reward_weights"),
        (parse(grpo_spec, "loss_type = [\"grpo\", \"dapo\"]", None), "trainer.loss_type"),
        (parse(grpo_spec, "label_smoothing = 0.1", None), "trainer.label_smoothing"),
        (parse(grpo_spec, "group_by_length = true", None), "trainer.group_by_length"),
        (parse(grpo_spec, "num_generations = 0", None), "num_generations"),
    ];
    for (err, key) in &cases {
        assert!(err.contains(key), "{key}: {err}");
    }
    // Through knob expansion too: the leaf's error names the key.
    let path = dpo_spec(dir.path(), "beta = { list = [0.1, 0.5] }\nnum_generations = 4", "");
    let err = experiment::read_spec(&path).unwrap_err().to_string();
    assert!(err.contains("trainer.num_generations"), "{err}");
    // A reward table of a DPO spec.
    let path = dpo_spec(dir.path(), "", "");
    let text = format!("{}\n{REWARDS}", std::fs::read_to_string(&path).unwrap());
    let err = furnace_train::Spec::parse(&text, &path).unwrap_err().to_string();
    assert!(err.contains("reward"), "{err}");
}
