//! Search policies on tiny-llama: ASHA's geometric rungs, PBT's replacements with
//! lineage, and TPE's proposals; each seeded, recorded as ops or runs in the store, and
//! the same after the driver is cancelled or crashes and starts again.

use furnace_exp::store::MetricRow;
use furnace_exp::{experiment, run_fit, ExperimentRow, FitOptions, OpKind, OpRow, RunRow, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A spec over 24 training rows and 6 eval rows of the extraction task, on tiny-llama,
/// with `experiment` lines added to `[experiment]` and `search` as the `[search]` table.
fn setup(dir: &Path, experiment: &str, lr: &str, chunks: usize, search: &str) -> PathBuf {
    let rows = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 24)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 6)).unwrap();
    let base = testdata().join("tiny-llama");
    let search = if search.is_empty() { String::new() } else { format!("[search]\n{search}") };
    let spec = format!(
        "[experiment]\nname = \"search\"\nseed = 3\nnum_chunks = {chunks}\n{experiment}\n\n{search}\n\n\
         [data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n[model]\nbase = \"{}\"\n\n\
         [lora]\nr = 2\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [trainer]\nlearning_rate = {lr}\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\nschedule = \"constant\"\n",
        base.display().to_string().replace('\\', "/")
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn make(experiment_lines: &str, lr: &str, chunks: usize, search: &str) -> (tempfile::TempDir, Store, ExperimentRow) {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), experiment_lines, lr, chunks, search);
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    (dir, store, exp)
}

fn loader() -> impl FnMut(&str, WeightDType) -> furnace_exp::Result<LoadedModel> {
    |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?)
}

fn fit_with(store: &Store, exp: &ExperimentRow, opts: &FitOptions) -> furnace_exp::Result<Vec<RunRow>> {
    run_fit(store, exp, &mut loader(), opts, &furnace_exp::events::channel()).map(|s| s.runs)
}

fn fit(store: &Store, exp: &ExperimentRow) -> Vec<RunRow> {
    fit_with(store, exp, &FitOptions::default()).unwrap()
}

/// A store trigger that aborts the write a crash would interrupt (see tests/it/fit.rs).
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

fn crashed(store: &Store, exp: &ExperimentRow) {
    let err = fit_with(store, exp, &FitOptions::default()).unwrap_err().to_string();
    assert!(err.contains("simulated crash"), "{err}");
}

/// A fit cancelled once a run takes step `at`, then finished.
fn cancelled_then_finished(store: &Store, exp: &ExperimentRow, at: i64) -> Vec<RunRow> {
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let opts = FitOptions {
        cancel: Some(cancel.clone()),
        on_step: Some(Arc::new(move |_, step| {
            if step == at {
                c.store(true, Ordering::Relaxed);
            }
        })),
        ..Default::default()
    };
    let summary = run_fit(store, exp, &mut loader(), &opts, &furnace_exp::events::channel()).unwrap();
    assert!(summary.cancelled);
    fit(store, exp)
}

/// The step that ended chunk `chunk` of a run (its `chunk` metric).
fn chunk_step(store: &Store, run: i64, chunk: i64) -> Option<i64> {
    store.metrics(run).unwrap().into_iter().find(|m| m.name == "chunk" && m.value as i64 == chunk).map(|m| m.step)
}

fn eval_losses(store: &Store, run: i64) -> BTreeMap<i64, f64> {
    store.metrics(run).unwrap().into_iter().filter(|m| m.name == "eval_loss").map(|MetricRow { step, value, .. }| (step, value)).collect()
}

/// The outcome of an experiment with runs named by their index (so two experiments
/// compare): each run's (status, chunks done, parent index), and the policy's ops as (run
/// index, op, step, message without run ids, new run index).
type Outcome = (Vec<(RunStatus, i64, Option<usize>)>, Vec<(usize, String, Option<i64>, Option<usize>)>);

fn outcome(store: &Store, exp: &ExperimentRow) -> Outcome {
    let runs = store.runs(exp.id).unwrap();
    let index = |id: i64| runs.iter().position(|r| r.id == id).unwrap();
    let ops = store.ops(exp.id).unwrap().into_iter().filter(|o| o.source == "policy");
    let ops = ops
        .map(|o| {
            let name = match &o.kind {
                OpKind::Clone { set, warm } => format!("clone warm={warm} {set:?}"),
                k => k.name().to_string(),
            };
            (index(o.run_id), name, o.applied_step, o.new_run_id.map(index))
        })
        .collect();
    (runs.iter().map(|r| (r.status, r.chunks_done, r.parent_id.map(index))).collect(), ops)
}

fn policy_ops(store: &Store, exp: &ExperimentRow) -> Vec<OpRow> {
    store.ops(exp.id).unwrap().into_iter().filter(|o| o.source == "policy").collect()
}

const LRS: &str = "{ list = [1e-4, 3e-3, 1e-2, 3e-2] }";

#[test]
fn asha_decides_only_at_geometric_rungs() {
    // Four runs, four chunks, rungs at 2 and 4 chunks (min_chunks 2, eta 2): nobody stops
    // after chunk 1 or 3; at chunk 2 the worst two pause.
    let (_d, store, exp) = make("policy = \"asha\"\neta = 2\nmin_chunks = 2", LRS, 4, "");
    let runs = fit(&store, &exp);
    assert_eq!(runs.len(), 4);
    let ops = policy_ops(&store, &exp);
    assert_eq!(ops.len(), 2, "{ops:?}");
    let mut at_rung2: Vec<(f64, i64)> = runs
        .iter()
        .map(|r| {
            let step = chunk_step(&store, r.id, 2).unwrap();
            (eval_losses(&store, r.id)[&step], r.id)
        })
        .collect();
    at_rung2.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for op in &ops {
        assert_eq!(op.kind, OpKind::Stop);
        assert_eq!(op.applied_step, chunk_step(&store, op.run_id, 2), "a stop at the rung's step: {op:?}");
        assert!(op.message.as_deref().unwrap().contains("rung 2"), "{op:?}");
    }
    let stopped: Vec<i64> = ops.iter().map(|o| o.run_id).collect();
    for (k, &(_, id)) in at_rung2.iter().enumerate() {
        let run = runs.iter().find(|r| r.id == id).unwrap();
        if k < 2 {
            assert_eq!((run.status, run.chunks_done), (RunStatus::Completed, 4), "{run:?}");
        } else {
            assert!(stopped.contains(&id));
            assert_eq!((run.status, run.chunks_done), (RunStatus::Stopped, 2), "{run:?}");
        }
    }
    // The same experiment with rungs at every chunk (min_chunks 1, eta 2 → rungs 1, 2, 4)
    // pauses runs after chunk 1 already.
    let (_d1, store1, exp1) = make("policy = \"asha\"\neta = 2", LRS, 4, "");
    fit(&store1, &exp1);
    let first = policy_ops(&store1, &exp1);
    assert!(first.iter().any(|o| o.applied_step == chunk_step(&store1, o.run_id, 1)), "{first:?}");
}

#[test]
fn asha_with_rungs_resumes_after_a_cancel_and_after_a_crash_with_the_same_decisions() {
    let lines = "policy = \"asha\"\neta = 2\nmin_chunks = 2";
    let (_d0, store0, exp0) = make(lines, LRS, 4, "");
    fit(&store0, &exp0);
    let want = outcome(&store0, &exp0);
    // Cancelled inside chunk 3 (after the rung-2 decision), then started again.
    let (_d, store, exp) = make(lines, LRS, 4, "");
    cancelled_then_finished(&store, &exp, 5);
    assert_eq!(outcome(&store, &exp), want);
    // A crash as the policy stops a run: the decision is taken again on restart, once.
    let (_d1, store1, exp1) = make(lines, LRS, 4, "");
    crash_at(&store1, "BEFORE UPDATE OF status ON runs WHEN NEW.status = 'stopped'");
    crashed(&store1, &exp1);
    assert!(policy_ops(&store1, &exp1).is_empty());
    no_crash(&store1);
    fit(&store1, &exp1);
    assert_eq!(outcome(&store1, &exp1), want);
}

const PBT: &str = "policy = \"pbt\"\npbt_fraction = 0.25\nmax_runs = 6";

#[test]
fn pbt_replaces_the_worst_runs_with_perturbed_warm_clones_of_the_best() {
    // Four runs, three chunks: at chunk 1 and chunk 2 the worst run stops and a warm clone
    // of the best takes its place (6 runs: max_runs); none at chunk 3, the end.
    let (_d, store, exp) = make(PBT, LRS, 3, "");
    let runs = fit(&store, &exp);
    assert_eq!(runs.len(), 6, "{runs:?}");
    let ops = policy_ops(&store, &exp);
    let stops: Vec<&OpRow> = ops.iter().filter(|o| o.kind == OpKind::Stop).collect();
    let clones: Vec<&OpRow> = ops.iter().filter(|o| matches!(o.kind, OpKind::Clone { .. })).collect();
    assert_eq!((stops.len(), clones.len()), (2, 2), "{ops:?}");
    for (boundary, (stop, clone)) in stops.iter().zip(&clones).enumerate() {
        let chunk = boundary as i64 + 1;
        // The worst stops at the boundary's step, the best is the clone's parent.
        assert_eq!(stop.applied_step, chunk_step(&store, stop.run_id, chunk), "{stop:?}");
        let reached: Vec<(f64, i64)> =
            runs.iter().filter_map(|r| chunk_step(&store, r.id, chunk).map(|s| (eval_losses(&store, r.id)[&s], r.id))).collect();
        let worst = reached.iter().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap().1;
        let best = reached.iter().min_by(|a, b| a.0.total_cmp(&b.0)).unwrap().1;
        assert_eq!((stop.run_id, clone.run_id), (worst, best), "chunk {chunk}: {reached:?}");
        assert!(stop.message.as_deref().unwrap().starts_with("pbt: replaced"));
        let stopped = runs.iter().find(|r| r.id == worst).unwrap();
        assert_eq!((stopped.status, stopped.chunks_done), (RunStatus::Stopped, chunk));
        // Lineage: the clone op names its parent (run_id) and child (new_run_id).
        assert_eq!(clone.status, "applied");
        let child = runs.iter().find(|r| Some(r.id) == clone.new_run_id).unwrap();
        let parent = runs.iter().find(|r| r.id == best).unwrap();
        assert_eq!((child.parent_id, child.warm, child.status, child.chunks_done), (Some(best), true, RunStatus::Completed, 3));
        let lr = |r: &RunRow| r.config["trainer"]["learning_rate"].as_f64().unwrap();
        let ratio = lr(child) / lr(parent);
        assert!((ratio - 0.8).abs() < 1e-9 || (ratio - 1.2).abs() < 1e-9, "{ratio}");
        assert_eq!(child.knobs["trainer.learning_rate"].as_f64(), Some(lr(child)));
        // The clone continues the parent's training: its first eval follows the parent's steps.
        assert!(eval_losses(&store, child.id).keys().all(|&s| s > stop.applied_step.unwrap()));
    }
    // max_runs bounds the population: with 5, one replacement only.
    let (_d1, store1, exp1) = make(&PBT.replace("max_runs = 6", "max_runs = 5"), LRS, 3, "");
    assert_eq!(fit(&store1, &exp1).len(), 5);
}

#[test]
fn pbt_is_seeded_and_resumes_after_a_cancel_and_crashes_with_the_same_lineage() {
    let (_d0, store0, exp0) = make(PBT, LRS, 3, "");
    fit(&store0, &exp0);
    let want = outcome(&store0, &exp0);
    // Same spec, same outcome.
    let (_d, store, exp) = make(PBT, LRS, 3, "");
    fit(&store, &exp);
    assert_eq!(outcome(&store, &exp), want);
    // Cancelled in chunk 2 (after the first replacement), then started again.
    let (_d1, store1, exp1) = make(PBT, LRS, 3, "");
    cancelled_then_finished(&store1, &exp1, 3);
    assert_eq!(outcome(&store1, &exp1), want);
    // A crash as a replacement is recorded (neither the stop nor the clone op stays), and
    // one as its clone op is applied: each is made once on restart.
    let (_d2, store2, exp2) = make(PBT, LRS, 3, "");
    crash_at(&store2, "BEFORE INSERT ON ops WHEN NEW.source = 'policy' AND NEW.status = 'pending'");
    crashed(&store2, &exp2);
    assert!(policy_ops(&store2, &exp2).is_empty());
    crash_at(&store2, "BEFORE UPDATE OF status ON ops WHEN OLD.source = 'policy' AND OLD.status = 'pending' AND NEW.status <> 'pending'");
    crashed(&store2, &exp2);
    assert_eq!(policy_ops(&store2, &exp2).iter().filter(|o| o.status == "pending").count(), 1);
    no_crash(&store2);
    fit(&store2, &exp2);
    assert_eq!(outcome(&store2, &exp2), want);
}

const TPE: &str = "kind = \"tpe\"\nnum_runs = 5\nmax_concurrent = 2\nstartup = 2\nseed = 11";

/// Each run's learning rate, in id order.
fn lrs(store: &Store, exp: &ExperimentRow) -> Vec<f64> {
    store.runs(exp.id).unwrap().iter().map(|r| r.config["trainer"]["learning_rate"].as_f64().unwrap()).collect()
}

#[test]
fn tpe_proposes_trials_as_runs_end_with_at_most_max_concurrent_training() {
    let (_d, store, exp) = make("", "{ range = [1e-4, 3e-2], log = true }", 2, TPE);
    // Created with its first max_concurrent trials only.
    assert_eq!(store.runs(exp.id).unwrap().len(), 2);
    let s = std::sync::Mutex::new(store.reopen().unwrap());
    let (id, most) = (exp.id, Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let m = most.clone();
    let opts = FitOptions {
        on_step: Some(Arc::new(move |_, _| {
            let active = s.lock().unwrap().runs(id).unwrap().iter().filter(|r| r.status.is_active()).count();
            m.fetch_max(active, Ordering::SeqCst);
        })),
        ..Default::default()
    };
    let runs = fit_with(&store, &exp, &opts).unwrap();
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert!(runs.iter().all(|r| r.status == RunStatus::Completed && r.chunks_done == 2), "{runs:?}");
    assert_eq!(most.load(Ordering::SeqCst), 2, "at most max_concurrent runs active, and that many");
    for r in &runs {
        let lr = r.config["trainer"]["learning_rate"].as_f64().unwrap();
        assert!((1e-4..=3e-2).contains(&lr), "{lr}");
        assert_eq!(r.knobs["trainer.learning_rate"].as_f64(), Some(lr));
        assert_eq!(r.parent_id, None);
    }
    // Seeded: the same spec proposes the same trials.
    let (_d1, store1, exp1) = make("", "{ range = [1e-4, 3e-2], log = true }", 2, TPE);
    fit(&store1, &exp1);
    assert_eq!(lrs(&store1, &exp1), lrs(&store, &exp));
}

#[test]
fn tpe_resumes_after_a_cancel_and_a_crash_with_the_same_trials() {
    let lr = "{ range = [1e-4, 3e-2], log = true }";
    let (_d0, store0, exp0) = make("", lr, 2, TPE);
    fit(&store0, &exp0);
    let want = lrs(&store0, &exp0);
    // Cancelled once a run reaches step 4 (in its second chunk), then started again.
    let (_d, store, exp) = make("", lr, 2, TPE);
    cancelled_then_finished(&store, &exp, 4);
    assert_eq!(lrs(&store, &exp), want);
    // A crash as the fourth run is added: proposed again, once.
    let (_d1, store1, exp1) = make("", lr, 2, TPE);
    crash_at(&store1, "BEFORE INSERT ON runs WHEN (SELECT COUNT(*) FROM runs) = 3");
    crashed(&store1, &exp1);
    assert_eq!(store1.runs(exp1.id).unwrap().len(), 3);
    no_crash(&store1);
    let runs = fit(&store1, &exp1);
    assert!(runs.iter().all(|r| r.status == RunStatus::Completed));
    assert_eq!(lrs(&store1, &exp1), want);
}
