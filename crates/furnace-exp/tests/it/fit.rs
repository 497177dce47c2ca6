//! Experiments on tiny-llama: every run trained chunk by chunk in fused passes, each op
//! taking effect at the next optimizer step, ASHA, and resuming after an interruption with
//! complete, non-duplicated metrics.

use furnace_exp::store::MetricRow;
use furnace_exp::{experiment, ops, run_fit, Event, ExperimentRow, FitOptions, OpKind, RunRow, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A spec over 24 training rows and 6 eval rows of the extraction task, on tiny-llama.
fn setup(dir: &Path, lora: &str, extra: &str, lr: &str, chunks: usize) -> PathBuf {
    let rows = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 24)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 6)).unwrap();
    let base = testdata().join("tiny-llama");
    let spec = format!(
        r#"
[experiment]
name = "exp"
seed = 3
num_chunks = {chunks}
{extra}

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "{}"

[lora]
alpha = 16
targets = ["q_proj", "v_proj"]
{lora}

[trainer]
learning_rate = {lr}
batch_size = 2
grad_accum = 2
max_seq_len = 96
schedule = "constant"
"#,
        base.display().to_string().replace('\\', "/")
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn loader() -> impl FnMut(&str, WeightDType) -> furnace_exp::Result<LoadedModel> {
    |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?)
}

fn fit(store: &Store, exp: &ExperimentRow, opts: &FitOptions) -> Vec<RunRow> {
    let events = furnace_exp::events::channel();
    run_fit(store, exp, &mut loader(), opts, &events).unwrap().runs
}

fn new_experiment(lora: &str, extra: &str) -> (tempfile::TempDir, Store, ExperimentRow) {
    experiment_with(lora, extra, "1e-2", 2)
}

fn experiment_with(lora: &str, extra: &str, lr: &str, chunks: usize) -> (tempfile::TempDir, Store, ExperimentRow) {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), lora, extra, lr, chunks);
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    (dir, store, exp)
}

/// metric name -> step -> value, asserting each (step, name) appears once.
fn series(store: &Store, run: i64) -> BTreeMap<String, BTreeMap<i64, f64>> {
    let mut out: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for MetricRow { step, name, value, .. } in store.metrics(run).unwrap() {
        assert!(out.entry(name.clone()).or_default().insert(step, value).is_none(), "run {run}: {name} at step {step} twice");
    }
    out
}

fn assert_complete(store: &Store, run: &RunRow) {
    let s = series(store, run.id);
    let steps: Vec<i64> = s["loss"].keys().copied().collect();
    assert_eq!(steps, (1..=run.total_steps).collect::<Vec<_>>(), "run {} has a gap or extra steps", run.id);
    assert_eq!(s["eval_loss"].len() as i64, run.total_chunks, "run {}: one eval per chunk", run.id);
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * a.abs().max(b.abs()).max(1e-6)
}

#[test]
fn every_config_trains_chunk_by_chunk_and_matches_training_alone() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 4] }", "");
    let (_d1, store1, exp1) = new_experiment("r = 4", "");
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), 2);
    for r in &runs {
        assert_eq!(r.status, RunStatus::Completed);
        // 24 examples, 2 chunks of 12, batch 2 x 2: 3 steps per chunk.
        assert_eq!((r.total_steps, r.total_chunks, r.chunks_done), (6, 2, 2));
        assert_complete(&store, r);
        assert!(exp.dir.join(format!("run-{}", r.id)).join("adapter/adapter_config.json").exists());
    }
    assert_eq!(runs[1].knobs["lora.r"], 4);
    // The r=4 run trained fused with the r=2 run equals the r=4 run trained alone.
    let alone = fit(&store1, &exp1, &FitOptions::default());
    let (fused, solo) = (series(&store, runs[1].id), series(&store1, alone[0].id));
    for name in ["loss", "eval_loss"] {
        for (step, v) in &solo[name] {
            assert!(close(fused[name][step], *v), "{name} at step {step}: fused {} alone {v}", fused[name][step]);
        }
    }
    // A memory budget that fits one run at a time (the r=4 run's state alone) gives the
    // same results.
    let (_d2, store2, exp2) = new_experiment("r = { list = [2, 4] }", "");
    let one_by_one = fit(&store2, &exp2, &FitOptions { memory_budget: Some(run_state_bytes(4)), ..Default::default() });
    assert!(one_by_one.iter().all(|r| r.status == RunStatus::Completed), "{one_by_one:?}");
    assert_same(&series(&store2, one_by_one[1].id)["loss"], &fused["loss"]);
}

/// Submits `op` for `run` when `when` (run, step) is reached.
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

#[test]
fn ops_take_effect_at_the_next_optimizer_step() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 4] }", "");
    let ids: Vec<i64> = store.runs(exp.id).unwrap().iter().map(|r| r.id).collect();
    let (a, b) = (ids[0], ids[1]);
    let warm = OpKind::Clone { set: vec!["trainer.learning_rate=3e-2".into()], warm: true };
    let cold = OpKind::Clone { set: vec!["lora.r=8".into()], warm: false };
    let opts = hook(&store, vec![((a, 1), a, OpKind::Stop), ((b, 2), b, warm), ((b, 4), b, cold), ((b, 5), b, OpKind::Delete)]);
    let runs = fit(&store, &exp, &opts);
    let by_id: BTreeMap<i64, &RunRow> = runs.iter().map(|r| (r.id, r)).collect();
    // Stop: mid-chunk, after step 1; its state is kept (a checkpoint of step 1).
    assert_eq!((by_id[&a].status, by_id[&a].steps_done, by_id[&a].checkpoint_step), (RunStatus::Stopped, 1, Some(1)));
    assert_eq!(series(&store, a)["loss"].len(), 1);
    // Delete: after step 5, files kept.
    assert_eq!((by_id[&b].status, by_id[&b].steps_done), (RunStatus::Deleted, 5));
    assert!(exp.dir.join(format!("run-{b}/checkpoints")).exists());
    // Warm clone of b at step 2: continues from b's adapter, optimizer and data position,
    // so its first step is step 3 on the same examples with the same weights (same loss),
    // and its other learning rate shows from then on.
    let warm_run = runs.iter().find(|r| r.parent_id == Some(b) && r.warm).expect("warm clone");
    let (ws, bs) = (series(&store, warm_run.id), series(&store, b));
    assert_eq!(*ws["loss"].keys().next().unwrap(), 3);
    assert!(close(ws["loss"][&3], bs["loss"][&3]), "{} vs {}", ws["loss"][&3], bs["loss"][&3]);
    assert!(close(ws["lr"][&3], 3e-2) && close(bs["lr"][&3], 1e-2));
    assert!(!close(ws["loss"][&4], bs["loss"][&4]));
    assert_eq!(warm_run.status, RunStatus::Completed);
    assert_eq!(warm_run.knobs["trainer.learning_rate"], 3e-2);
    // Cold clone: a fresh run with r = 8 from step 1.
    let cold_run = runs.iter().find(|r| r.parent_id == Some(b) && !r.warm).expect("cold clone");
    assert_eq!(cold_run.config["lora"]["r"], 8);
    assert_complete(&store, cold_run);
    // Every op is recorded with the step it took effect at.
    let recorded = store.ops(exp.id).unwrap();
    let applied: Vec<(&str, i64, Option<i64>)> = recorded.iter().map(|o| (o.kind.name(), o.run_id, o.applied_step)).collect();
    assert_eq!(applied, vec![("stop", a, Some(1)), ("clone", b, Some(2)), ("clone", b, Some(4)), ("delete", b, Some(5))]);
    assert!(recorded.iter().all(|o| o.status == "applied"));

    // Resume brings the stopped run back; it finishes with the same losses as without
    // the stop.
    ops::submit(&store, a, &OpKind::Resume, "test").unwrap();
    let runs = fit(&store, &exp, &FitOptions::default());
    let a_row = runs.iter().find(|r| r.id == a).unwrap();
    assert_eq!(a_row.status, RunStatus::Completed);
    assert_complete(&store, a_row);
    let (_d1, store1, exp1) = new_experiment("r = { list = [2, 4] }", "");
    let reference = fit(&store1, &exp1, &FitOptions::default());
    assert_same(&series(&store, a)["loss"], &series(&store1, reference[0].id)["loss"]);
}

#[test]
fn bad_ops_are_refused_and_recorded() {
    let (_d, store, exp) = new_experiment("r = 2", "");
    let a = store.runs(exp.id).unwrap()[0].id;
    // Checked when submitted...
    let err = ops::submit(&store, a, &OpKind::Clone { set: vec!["lora.r=8".into()], warm: true }, "test").unwrap_err().to_string();
    assert!(err.contains("without --warm"), "{err}");
    assert!(ops::submit(&store, a, &OpKind::Resume, "test").is_err());
    assert!(ops::submit(&store, 999, &OpKind::Stop, "test").is_err());
    assert!(ops::submit(&store, a, &OpKind::Clone { set: vec!["lora.r=0".into()], warm: false }, "test")
        .unwrap_err()
        .to_string()
        .contains("lora.r"));
    assert!(ops::submit(&store, a, &OpKind::Clone { set: vec!["data.train=x".into()], warm: false }, "test").is_err());
    // ...and again when applied (a raw record bypassing the check is rejected, not fatal).
    let op = store.add_op(a, &OpKind::Clone { set: vec!["lora.r=8".into()], warm: true }, "test").unwrap();
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Completed);
    let rec = store.op(op).unwrap();
    assert_eq!(rec.status, "rejected");
    assert!(rec.message.unwrap().contains("lora.r 2 -> 8"));
}

#[test]
fn asha_stops_the_worst_runs_at_each_rung() {
    // Four learning rates, three chunks: rung 1 keeps 2 of 4, rung 2 keeps 1 of 2.
    let (_d, store, exp) = experiment_with("r = 2", "policy = \"asha\"\neta = 2\n", "{ list = [1e-4, 3e-3, 1e-2, 3e-2] }", 3);
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), 4);
    let eval_at = |id: i64, chunk: i64| -> f64 {
        // 24 examples, 3 chunks of 8, batch 2 x 2: 2 steps per chunk.
        series(&store, id)["eval_loss"][&(2 * chunk)]
    };
    let mut rung1: Vec<(f64, i64)> = runs.iter().map(|r| (eval_at(r.id, 1), r.id)).collect();
    rung1.sort_by(|a, b| a.0.total_cmp(&b.0));
    let status = |id: i64| runs.iter().find(|r| r.id == id).unwrap().status;
    let chunks = |id: i64| runs.iter().find(|r| r.id == id).unwrap().chunks_done;
    for &(_, id) in &rung1[2..] {
        assert_eq!((status(id), chunks(id)), (RunStatus::Stopped, 1), "run {id} is among the worst at rung 1");
    }
    let mut rung2: Vec<(f64, i64)> = rung1[..2].iter().map(|&(_, id)| (eval_at(id, 2), id)).collect();
    rung2.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!((status(rung2[1].1), chunks(rung2[1].1)), (RunStatus::Stopped, 2));
    assert_eq!(status(rung2[0].1), RunStatus::Completed);
    let policy_ops: Vec<i64> = store.ops(exp.id).unwrap().iter().filter(|o| o.source == "policy").map(|o| o.run_id).collect();
    assert_eq!(policy_ops.len(), 3);
}

/// Each run's (status, chunks done), and the policy's ops as (run index, op, step), with
/// runs named by their index so two experiments compare.
type AshaOutcome = (Vec<(RunStatus, i64)>, Vec<(usize, String, Option<i64>)>);

fn asha_outcome(store: &Store, exp: &ExperimentRow, runs: &[RunRow]) -> AshaOutcome {
    let index = |id: i64| runs.iter().position(|r| r.id == id).unwrap();
    let ops = store.ops(exp.id).unwrap().into_iter().filter(|o| o.source == "policy");
    let ops = ops.map(|o| (index(o.run_id), o.kind.name().to_string(), o.applied_step)).collect();
    (runs.iter().map(|r| (r.status, r.chunks_done)).collect(), ops)
}

#[test]
fn asha_decisions_do_not_depend_on_the_memory_budget() {
    // Four runs, a budget that admits one at a time: each rung is judged once every run
    // reached it, not on the first run alone.
    let make = || experiment_with("r = 2", "policy = \"asha\"\neta = 2\n", "{ list = [3e-2, 1e-2, 3e-3, 1e-4] }", 3);
    let (_d, store, exp) = make();
    let all = fit(&store, &exp, &FitOptions::default());
    let (_d1, store1, exp1) = make();
    let one = fit(&store1, &exp1, &FitOptions { memory_budget: Some(run_state_bytes(2)), ..Default::default() });
    let (want, got) = (asha_outcome(&store, &exp, &all), asha_outcome(&store1, &exp1, &one));
    assert_eq!(got, want);
    // Rung 1 keeps 2 of 4, rung 2 keeps 1 of 2: three pauses, one run completes.
    assert_eq!(want.1.len(), 3, "{want:?}");
    assert_eq!(want.0.iter().filter(|s| s.0 == RunStatus::Completed).count(), 1, "{want:?}");
}

#[test]
fn a_paused_run_is_promoted_when_a_later_run_reaching_the_rung_makes_room() {
    // Three runs: rung 1 keeps 1 of 3. A cold clone submitted later reaches rung 1 too;
    // then 2 of 4 are kept, so the best paused run is promoted and trains on.
    let (_d, store, exp) = experiment_with("r = 2", "policy = \"asha\"\neta = 2\n", "{ list = [3e-2, 1e-2, 1e-4] }", 3);
    let ids: Vec<i64> = store.runs(exp.id).unwrap().iter().map(|r| r.id).collect();
    let clone = OpKind::Clone { set: vec!["trainer.learning_rate=1e-4".into()], warm: false };
    // Chunk 1 ends at step 2: the first step 3 (of the run kept) comes after the rung-1
    // decision; the clone is submitted then, once.
    let (s, once, target) = (Mutex::new(store.reopen().unwrap()), AtomicBool::new(false), ids[2]);
    let on_step = move |_: i64, step: i64| {
        if step == 3 && !once.swap(true, Ordering::SeqCst) {
            ops::submit(&s.lock().unwrap(), target, &clone, "test").unwrap();
        }
    };
    let runs = fit(&store, &exp, &FitOptions { on_step: Some(Arc::new(on_step)), ..Default::default() });
    assert_eq!(runs.len(), 4, "{runs:?}");
    let eval1 = |id: i64| series(&store, id)["eval_loss"][&2];
    let mut rung1: Vec<(f64, i64)> = runs.iter().map(|r| (eval1(r.id), r.id)).collect();
    rung1.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let ops = store.ops(exp.id).unwrap();
    let policy = |id: i64| -> Vec<(String, Option<i64>)> {
        ops.iter().filter(|o| o.source == "policy" && o.run_id == id).map(|o| (o.kind.name().to_string(), o.applied_step)).collect()
    };
    let (first, second) = (rung1[0].1, rung1[1].1);
    let run = |id: i64| runs.iter().find(|r| r.id == id).unwrap();
    assert!(run(first).chunks_done >= 2 && run(second).chunks_done >= 2, "{runs:?}");
    if second != *runs.iter().map(|r| r.id).max().as_ref().unwrap() {
        // The second best of the first three was paused at rung 1, then promoted.
        assert_eq!(policy(second)[..2], [("stop".to_string(), Some(2)), ("resume".to_string(), Some(2))], "{ops:?}");
    }
    for &(_, id) in &rung1[2..] {
        assert_eq!((run(id).status, run(id).chunks_done), (RunStatus::Stopped, 1), "run {id}");
    }
}

#[test]
fn an_interrupted_experiment_resumes_with_complete_metrics() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 4] }", "");
    // Interrupt in the middle of the second chunk (after step 4 of 6 of the first run).
    let cancel = Arc::new(AtomicBool::new(false));
    let first = store.runs(exp.id).unwrap()[0].id;
    let c = cancel.clone();
    let opts = FitOptions {
        cancel: Some(cancel.clone()),
        on_step: Some(Arc::new(move |run, step| {
            if (run, step) == (first, 4) {
                c.store(true, Ordering::Relaxed);
            }
        })),
        ..Default::default()
    };
    let events = furnace_exp::events::channel();
    let summary = run_fit(&store, &exp, &mut loader(), &opts, &events).unwrap();
    assert!(summary.cancelled);
    // A cancel (the first Ctrl-C) checkpoints every run at the step it is at (both stepped
    // together), so the resume redoes nothing.
    assert!(series(&store, first)["loss"].contains_key(&4));
    for r in store.runs(exp.id).unwrap() {
        assert_eq!((r.steps_done, r.checkpoint_step), (4, Some(4)), "{r:?}");
    }
    assert_eq!(experiment::interrupted(&store, &exp.spec_path).unwrap().map(|e| e.id), Some(exp.id));
    let mut rx = events.subscribe();
    let runs = run_fit(&store, &exp, &mut loader(), &FitOptions::default(), &events).unwrap().runs;
    let (_d1, store1, exp1) = new_experiment("r = { list = [2, 4] }", "");
    let reference = fit(&store1, &exp1, &FitOptions::default());
    for (r, reference) in runs.iter().zip(&reference) {
        assert_eq!(r.status, RunStatus::Completed);
        assert_complete(&store, r);
        let (got, want) = (series(&store, r.id), series(&store1, reference.id));
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        for (name, values) in &want {
            assert_same(&got[name], values);
        }
    }
    assert_eq!(store.experiment(&exp.name).unwrap().status, "done");
    // The resumed fit published its events.
    let mut saw_completed = false;
    while let Ok(ev) = rx.try_recv() {
        saw_completed |= matches!(ev, Event::Status { status: RunStatus::Completed, .. });
    }
    assert!(saw_completed);
}

fn assert_same(got: &BTreeMap<i64, f64>, want: &BTreeMap<i64, f64>) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for (step, v) in want {
        assert!(close(got[step], *v), "step {step}: {} vs {v}", got[step]);
    }
}

#[test]
fn runs_on_different_bases_form_groups_that_take_turns() {
    // Two config groups: the f32 base and the bf16 base cannot share a pass.
    let groups = "[[group]]\n[group.model]\nquantize = \"none\"\n[[group]]\n[group.model]\nquantize = \"bf16\"\n";
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), "r = 2", "", "1e-2", 2);
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("{text}\n{groups}")).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    let events = furnace_exp::events::channel();
    let mut rx = events.subscribe();
    let mut loads = Vec::new();
    let mut load = |name: &str, dtype: WeightDType| {
        loads.push(dtype);
        Ok(LoadedModel::load(Path::new(name), dtype)?)
    };
    let runs = run_fit(&store, &exp, &mut load, &FitOptions::default(), &events).unwrap().runs;
    assert_eq!(runs.iter().map(|r| r.group).collect::<Vec<_>>(), vec![0, 1]);
    for r in &runs {
        assert_eq!(r.status, RunStatus::Completed);
        assert_complete(&store, r);
    }
    // Least progress first alternates the groups at chunk boundaries: each chunk of one
    // group is followed by the other's, so the bases swap at every boundary.
    assert_eq!(loads, vec![WeightDType::F32, WeightDType::Bf16, WeightDType::F32, WeightDType::Bf16]);
    let mut swaps = 0;
    while let Ok(ev) = rx.try_recv() {
        if let Event::Log { message, .. } = ev {
            swaps += message.starts_with("swapping out") as usize;
        }
    }
    assert_eq!(swaps, 3);
    // Same config on both bases: close losses (bf16 rounding), not the same run.
    let (a, b) = (series(&store, runs[0].id), series(&store, runs[1].id));
    assert!((a["loss"][&1] - b["loss"][&1]).abs() < 0.05 * a["loss"][&1]);
}

#[test]
fn the_library_api_mirrors_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), "r = { list = [2, 4] }", "", "1e-2", 2);
    let runs_dir = dir.path().join("runs");
    let exp = furnace_exp::Experiment::create(&runs_dir, &spec).unwrap();
    let again = furnace_exp::Experiment::create(&runs_dir, &spec).unwrap();
    assert_eq!((exp.info().unwrap().name, again.info().unwrap().name), ("exp".to_string(), "exp_1".to_string()));
    let ids: Vec<i64> = exp.runs().unwrap().iter().map(|r| r.id).collect();
    assert!(exp.runs().unwrap().iter().all(|r| r.status == RunStatus::New && r.info_ok()));
    exp.op(ids[1], &OpKind::Delete).unwrap();
    assert!(exp.op(again.runs().unwrap()[0].id, &OpKind::Stop).is_err(), "another experiment's run");
    let events = furnace_exp::events::channel();
    let summary = exp.run_fit(&mut loader(), &FitOptions::default(), &events).unwrap();
    assert_eq!(summary.runs.iter().map(|r| r.status).collect::<Vec<_>>(), vec![RunStatus::Completed, RunStatus::Deleted]);
    let results = exp.results().unwrap();
    assert!(results.iter().all(|m| m.run_id == ids[0]));
    assert_eq!(results.iter().filter(|m| m.name == "loss").count(), 6);
    assert_eq!(exp.ops().unwrap()[0].status, "applied");
    let reopened = furnace_exp::Experiment::open(&runs_dir, "exp").unwrap();
    assert_eq!(reopened.info().unwrap().status, "done");
}

trait InfoOk {
    fn info_ok(&self) -> bool;
}

impl InfoOk for RunRow {
    fn info_ok(&self) -> bool {
        self.steps_done == 0 && self.parent_id.is_none() && self.config["lora"]["r"] == self.knobs["lora.r"]
    }
}

#[test]
fn one_process_drives_an_experiment_at_a_time() {
    let (_d, store, exp) = new_experiment("r = 2", "");
    let lock = std::fs::File::open(exp.dir.join(".lock")).or_else(|_| std::fs::File::create(exp.dir.join(".lock"))).unwrap();
    lock.lock().unwrap();
    let events = furnace_exp::events::channel();
    let err = run_fit(&store, &exp, &mut loader(), &FitOptions::default(), &events).unwrap_err().to_string();
    assert!(err.contains("another furnace process"), "{err}");
    lock.unlock().unwrap();
    assert_eq!(fit(&store, &exp, &FitOptions::default())[0].status, RunStatus::Completed);
}

#[test]
fn a_base_that_cannot_load_fails_its_runs_not_the_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), "r = 2", "", "1e-2", 2);
    let text = std::fs::read_to_string(&spec).unwrap();
    let groups = "[[group]]\n[group.model]\nbase = \"no-such-model-dir\"\n[[group]]\n[group.lora]\nr = 4\n";
    std::fs::write(&spec, format!("{text}\n{groups}")).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    assert_eq!(exp.dir, dir.path().join("runs").join("exp"));
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs[0].status, RunStatus::Failed);
    assert!(runs[0].error.as_deref().unwrap().contains("no-such-model-dir"), "{:?}", runs[0].error);
    assert_eq!(runs[1].status, RunStatus::Completed);
    assert_complete(&store, &runs[1]);
}

#[test]
fn a_warm_clone_cut_short_by_a_crash_is_made_again_from_its_pending_op() {
    let (_d, store, exp) = new_experiment("r = 2", "");
    let parent = store.runs(exp.id).unwrap()[0].clone();
    // The state a crash between recording the clone and checkpointing it leaves behind.
    let op = store.add_op(parent.id, &OpKind::Clone { set: vec!["trainer.learning_rate=2e-2".into()], warm: true }, "test").unwrap();
    let orphan = store.add_run(exp.id, &parent.config, &parent.knobs, 0, 0, 0, Some((parent.id, true))).unwrap();
    let runs = fit(&store, &exp, &FitOptions::default());
    assert!(runs.iter().all(|r| r.id != orphan), "the half-made clone is gone");
    let clone = runs.iter().find(|r| r.parent_id == Some(parent.id)).expect("made again");
    assert!(clone.warm && clone.status == RunStatus::Completed);
    assert_eq!(store.op(op).unwrap().new_run_id, Some(clone.id));
}

#[test]
fn start_streams_every_event_and_a_cancelled_experiment_finishes_when_started_again() {
    let (dir, store, exp) = new_experiment("r = { list = [2, 4] }", "");
    let e = furnace_exp::Experiment::open(&dir.path().join("runs"), &exp.name).unwrap();
    let opts = || furnace_exp::StartOptions { fit: FitOptions::default(), loader: Box::new(loader()), events: None };
    // Cancelled at its first optimizer step: runs stay unfinished.
    let mut running = e.start(opts()).unwrap();
    while let Some(ev) = running.next_event() {
        if matches!(ev, Event::Progress { .. }) {
            running.cancel();
        }
    }
    let summary = running.wait().unwrap();
    assert!(summary.cancelled);
    assert!(summary.runs.iter().all(|r| r.status.is_active()), "{:?}", summary.runs);
    // Checkpointed where they stopped.
    let kept: BTreeMap<i64, i64> = summary.runs.iter().map(|r| (r.id, r.checkpoint_step.unwrap_or(0))).collect();
    assert!(summary.runs.iter().all(|r| r.checkpoint_step == Some(r.steps_done)), "{:?}", summary.runs);
    // Started again: every step after the checkpoint is reported once, in order, to the end.
    let mut running = e.start(opts()).unwrap();
    let mut steps: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut totals = BTreeMap::new();
    while let Some(ev) = running.next_event() {
        if let Event::Progress { run_id, steps_done, total_steps, .. } = ev {
            steps.entry(run_id).or_default().push(steps_done);
            totals.insert(run_id, total_steps);
        }
    }
    let summary = running.wait().unwrap();
    assert!(!summary.cancelled);
    assert_eq!(steps.len(), 2);
    for r in &summary.runs {
        assert_eq!(r.status, RunStatus::Completed);
        assert_eq!(steps[&r.id], (kept[&r.id] + 1..=totals[&r.id]).collect::<Vec<_>>(), "run {}", r.id);
        assert_complete(&store, r);
    }
}

#[test]
fn eval_every_save_every_and_an_eval_before_the_first_step() {
    // 24 examples in 2 chunks, batch 2 x 2: 3 steps per chunk, 6 in all.
    let (dir, store, exp) = experiment_with("r = 4", "", "1e-2\neval_every = 2\nsave_every = 2", 2);
    let opts = FitOptions { eval_at_start: true, ..Default::default() };
    let runs = fit(&store, &exp, &opts);
    assert_eq!(runs[0].status, RunStatus::Completed);
    let s = series(&store, runs[0].id);
    // Before training, every 2 steps, and at each chunk end (3, 6).
    assert_eq!(s["eval_loss"].keys().copied().collect::<Vec<_>>(), [0, 2, 3, 4, 6]);
    assert!(s["eval_loss"][&6] < s["eval_loss"][&0], "{:?}", s["eval_loss"]);
    // Checkpoints at multiples of save_every are kept; the chunk-end one at step 3 is not.
    let ckpts = dir.path().join("runs").join(&exp.name).join(format!("run-{}", runs[0].id)).join("checkpoints");
    let mut kept: Vec<String> = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    kept.sort();
    assert_eq!(kept, ["step-2", "step-4", "step-6"]);
}

/// A trigger that fails the store write a crash would interrupt: the driver stops there
/// with an error, as a killed process would, and what it committed before stays.
fn crash_at(store: &Store, when: &str) {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn.execute_batch(&format!(
        "DROP TRIGGER IF EXISTS crash; CREATE TRIGGER crash {when} BEGIN SELECT RAISE(ABORT, 'simulated crash'); END;"
    ))
    .unwrap();
}

fn no_crash(store: &Store) {
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    conn.execute_batch("DROP TRIGGER IF EXISTS crash;").unwrap();
}

fn crashed_fit(store: &Store, exp: &ExperimentRow) -> String {
    let events = furnace_exp::events::channel();
    let err = run_fit(store, exp, &mut loader(), &FitOptions::default(), &events).unwrap_err().to_string();
    assert!(err.contains("simulated crash"), "{err}");
    err
}

#[test]
fn a_crash_while_an_op_is_applied_leaves_it_to_apply_once_on_restart() {
    let (_d, store, exp) = new_experiment("r = 2", "");
    let a = store.runs(exp.id).unwrap()[0].id;
    let cold = ops::submit(&store, a, &OpKind::Clone { set: vec!["lora.r=4".into()], warm: false }, "test").unwrap();
    let warm = ops::submit(&store, a, &OpKind::Clone { set: vec!["trainer.learning_rate=2e-2".into()], warm: true }, "test").unwrap();
    let stop = ops::submit(&store, a, &OpKind::Stop, "test").unwrap();
    // A crash as each op is marked applied: its effect is not in the store either.
    for (k, op) in [cold, warm, stop].into_iter().enumerate() {
        crash_at(&store, &format!("BEFORE UPDATE OF status ON ops WHEN NEW.id = {op} AND NEW.status <> 'pending'"));
        crashed_fit(&store, &exp);
        let runs = store.runs(exp.id).unwrap();
        assert_eq!(runs.len(), 1 + k.min(2), "one run per applied clone op: {runs:?}");
        assert_eq!(store.op(op).unwrap().status, "pending");
        assert!(runs.iter().all(|r| r.status.is_active()), "{runs:?}");
        // A warm clone is recorded with its checkpoint.
        for r in runs.iter().filter(|r| r.warm) {
            let step = r.checkpoint_step.expect("a warm clone has its checkpoint");
            assert!(exp.dir.join(format!("run-{}/checkpoints/step-{step}/trainer_state.json", r.id)).exists());
        }
    }
    no_crash(&store);
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs.len(), 3, "{runs:?}");
    let recorded = store.ops(exp.id).unwrap();
    assert!(recorded.iter().all(|o| o.status == "applied"), "{recorded:?}");
    let made: Vec<Option<i64>> = recorded.iter().map(|o| o.new_run_id).collect();
    assert_eq!(made, vec![Some(runs[1].id), Some(runs[2].id), None]);
    assert_eq!((runs[1].warm, runs[1].config["lora"]["r"].as_i64()), (false, Some(4)));
    assert!(runs[2].warm);
    assert_eq!(runs[0].status, RunStatus::Stopped);
    for r in &runs[1..] {
        assert_eq!(r.status, RunStatus::Completed);
        assert_complete(&store, r);
    }
}

#[test]
fn an_asha_stop_and_its_op_are_recorded_together() {
    let (_d, store, exp) = experiment_with("r = 2", "policy = \"asha\"\neta = 2\n", "{ list = [1e-4, 3e-2] }", 2);
    // A crash as the policy's stop sets the run's status.
    crash_at(&store, "BEFORE UPDATE OF status ON runs WHEN NEW.status = 'stopped'");
    crashed_fit(&store, &exp);
    assert!(store.ops(exp.id).unwrap().is_empty(), "no stop op without the stopped run");
    no_crash(&store);
    let runs = fit(&store, &exp, &FitOptions::default());
    // The decision is taken on restart, once, with the same outcome as without the crash.
    let recorded = store.ops(exp.id).unwrap();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    for op in recorded {
        let run = runs.iter().find(|r| r.id == op.run_id).unwrap();
        assert_eq!((op.status.as_str(), run.status, run.chunks_done), ("applied", RunStatus::Stopped, 1));
    }
    assert!(runs.iter().all(|r| !r.status.is_active()));
    let (_d1, store1, exp1) = experiment_with("r = 2", "policy = \"asha\"\neta = 2\n", "{ list = [1e-4, 3e-2] }", 2);
    let reference = fit(&store1, &exp1, &FitOptions::default());
    assert_eq!(runs.iter().map(|r| r.status).collect::<Vec<_>>(), reference.iter().map(|r| r.status).collect::<Vec<_>>());
}

#[test]
fn leftovers_of_a_crashed_checkpoint_write_are_swept_and_never_named() {
    let (_d, store, exp) = experiment_with("r = 2", "", "1e-2", 2);
    let run = store.runs(exp.id).unwrap()[0].id;
    // Cancelled after step 4, checkpointed there.
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let opts = FitOptions {
        cancel: Some(cancel.clone()),
        on_step: Some(Arc::new(move |_, step| c.store(step == 4, Ordering::Relaxed))),
        ..Default::default()
    };
    assert!(run_fit(&store, &exp, &mut loader(), &opts, &furnace_exp::events::channel()).unwrap().cancelled);
    assert_eq!(store.run(run).unwrap().checkpoint_step, Some(4));
    let ckpts = exp.dir.join(format!("run-{run}/checkpoints"));
    // What a kill leaves: a half-written folder, and a step folder the store never named.
    std::fs::create_dir_all(ckpts.join("step-4.partial-999")).unwrap();
    std::fs::write(ckpts.join("step-4.partial-999/trainer_state.json"), "{").unwrap();
    std::fs::create_dir_all(ckpts.join("step-6")).unwrap();
    std::fs::write(ckpts.join("step-6/trainer_state.json"), "{").unwrap();
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!((runs[0].status, runs[0].checkpoint_step), (RunStatus::Completed, Some(6)));
    assert_complete(&store, &runs[0]);
    let mut left: Vec<String> = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["step-6"]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpts.join("step-6/trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
}

#[test]
fn a_cut_short_warm_clone_that_an_op_targets_is_marked_deleted_not_left_new() {
    let (_d, store, exp) = new_experiment("r = 2", "");
    let parent = store.runs(exp.id).unwrap()[0].clone();
    let op = store.add_op(parent.id, &OpKind::Clone { set: vec!["trainer.learning_rate=2e-2".into()], warm: true }, "test").unwrap();
    let orphan = store.add_run(exp.id, &parent.config, &parent.knobs, 0, 0, 0, Some((parent.id, true))).unwrap();
    // Someone asked to stop the half-made clone before the crash.
    let stop = store.add_op(orphan, &OpKind::Stop, "api").unwrap();
    let runs = fit(&store, &exp, &FitOptions::default());
    let o = runs.iter().find(|r| r.id == orphan).expect("kept: an op names it");
    assert_eq!(o.status, RunStatus::Deleted);
    assert!(o.error.as_deref().unwrap_or("").contains("cut short"), "{o:?}");
    assert_eq!(store.op(stop).unwrap().status, "rejected");
    let clones: Vec<&RunRow> = runs.iter().filter(|r| r.parent_id == Some(parent.id) && r.id != orphan).collect();
    assert_eq!(clones.len(), 1);
    assert_eq!(clones[0].status, RunStatus::Completed);
    assert_eq!(store.op(op).unwrap().new_run_id, Some(clones[0].id));
}

/// Runs `run_fit` to its end; returns the runs and the messages of the `failed` Status
/// events, by run.
fn fit_with_failures(store: &Store, exp: &ExperimentRow, opts: &FitOptions) -> (Vec<RunRow>, BTreeMap<i64, String>) {
    let events = furnace_exp::events::channel();
    let mut rx = events.subscribe();
    let runs = run_fit(store, exp, &mut loader(), opts, &events).unwrap().runs;
    let mut failed = BTreeMap::new();
    while let Ok(ev) = rx.try_recv() {
        if let Event::Status { run_id, status: RunStatus::Failed, message, .. } = ev {
            failed.insert(run_id, message.unwrap_or_default());
        }
    }
    (runs, failed)
}

/// Run `bad` failed with a stored message containing each of `needles`, the same message
/// sent as its Status event; every other run completed with complete metrics.
fn assert_only_failed(store: &Store, runs: &[RunRow], failed: &BTreeMap<i64, String>, bad: i64, needles: &[&str]) {
    let row = runs.iter().find(|r| r.id == bad).unwrap();
    assert_eq!(row.status, RunStatus::Failed, "{row:?}");
    let msg = row.error.clone().unwrap_or_default();
    for n in needles {
        assert!(msg.contains(n), "run {bad}: {msg:?} lacks {n:?}");
    }
    assert_eq!(failed.get(&bad), Some(&msg), "the Status event carries the reason");
    for r in runs.iter().filter(|r| r.id != bad) {
        assert_eq!(r.status, RunStatus::Completed, "{r:?}");
        assert_complete(store, r);
    }
    assert_eq!(store.experiment(&store.experiment_by_id(runs[0].experiment_id).unwrap().name).unwrap().status, "done");
}

#[test]
fn a_checkpoint_that_cannot_be_written_fails_that_run_only() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 4] }", "");
    let bad = store.runs(exp.id).unwrap()[0].id;
    // A regular file where the run's checkpoints folder goes.
    let run_dir = exp.dir.join(format!("run-{bad}"));
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("checkpoints"), "not a folder").unwrap();
    let (runs, failed) = fit_with_failures(&store, &exp, &FitOptions::default());
    assert_only_failed(&store, &runs, &failed, bad, &["checkpoint at step 3", "checkpoints"]);
    // Nothing of it is retried on the next call: the experiment is done.
    let again = fit(&store, &exp, &FitOptions::default());
    assert_eq!(again.iter().map(|r| r.status).collect::<Vec<_>>(), vec![RunStatus::Failed, RunStatus::Completed]);
}

#[test]
fn a_loss_that_becomes_nan_fails_that_run_only() {
    let (_d, store, exp) = experiment_with("r = 2", "", "{ list = [1e-2, 1e39] }", 2);
    let bad = store.runs(exp.id).unwrap()[1].id;
    let (runs, failed) = fit_with_failures(&store, &exp, &FitOptions::default());
    assert_only_failed(&store, &runs, &failed, bad, &["became", "at step", "lower the learning rate"]);
    // Nothing that is not a number was stored; the steps before the failure were.
    let metrics = store.metrics(bad).unwrap();
    assert!(metrics.iter().all(|m| m.value.is_finite()), "{metrics:?}");
    let loss = &series(&store, bad)["loss"];
    let failed_at: i64 = runs[1].error.as_deref().unwrap().split("at step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert_eq!(loss.keys().copied().collect::<Vec<_>>(), (1..failed_at).collect::<Vec<_>>());
}

#[test]
fn a_stored_config_that_does_not_read_fails_its_run_not_the_experiment() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 4, 8] }", "");
    let ids: Vec<i64> = store.runs(exp.id).unwrap().iter().map(|r| r.id).collect();
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    // Not JSON; and a deleted run's config that is JSON but not a spec.
    conn.execute("UPDATE runs SET config = '{not json' WHERE id = ?1", [ids[0]]).unwrap();
    conn.execute("UPDATE runs SET config = '{\"lora\": 1}', status = 'deleted' WHERE id = ?1", [ids[1]]).unwrap();
    let (runs, failed) = fit_with_failures(&store, &exp, &FitOptions::default());
    assert_eq!(runs[1].status, RunStatus::Deleted, "a deleted run is skipped");
    assert!(!failed.contains_key(&ids[1]));
    let others: Vec<RunRow> = runs.iter().filter(|r| r.id != ids[1]).cloned().collect();
    assert_only_failed(&store, &others, &failed, ids[0], &["stored config", "not JSON"]);
}

/// Bytes of a run's own state on tiny-llama with LoRA rank `r` on q_proj (64 -> 64) and
/// v_proj (64 -> 32) of 2 layers: 16 bytes per parameter.
fn run_state_bytes(r: u64) -> u64 {
    16 * 2 * r * ((64 + 64) + (64 + 32))
}

#[test]
fn a_run_too_big_for_its_base_fails_before_training_and_the_others_train() {
    // tiny-llama's v_proj is 64 -> 32: a rank of 48 cannot factor it.
    let (_d, store, exp) = new_experiment("r = { list = [2, 48] }", "");
    let runs = fit(&store, &exp, &FitOptions::default());
    assert_eq!(runs[0].status, RunStatus::Completed);
    assert_eq!((runs[1].status, runs[1].steps_done), (RunStatus::Failed, 0));
    let e = runs[1].error.as_deref().unwrap();
    assert!(e.contains("lora.r: must be at most 32") && e.contains("v_proj"), "{e}");
    assert!(store.metrics(runs[1].id).unwrap().is_empty());
}

#[test]
fn a_run_that_alone_exceeds_an_explicit_memory_budget_fails_and_the_others_train() {
    let (_d, store, exp) = new_experiment("r = { list = [2, 8] }", "");
    let big = store.runs(exp.id).unwrap()[1].id;
    let budget = run_state_bytes(4);
    let opts = FitOptions { memory_budget: Some(budget), ..Default::default() };
    let (runs, failed) = fit_with_failures(&store, &exp, &opts);
    let needs = run_state_bytes(8).to_string();
    assert_only_failed(&store, &runs, &failed, big, &[&needs, &budget.to_string(), "memory budget"]);
    assert!(store.metrics(big).unwrap().is_empty(), "it never trained");
}
