//! Crash injection (`furnace_hub::failpoint`): the real `furnace` binary is made to die
//! (`abort`, as `kill -9` leaves things) at every durable write it passes — the store's
//! commits, checkpoint and adapter folders, op application, `furnace train`'s run folder —
//! then started again until it finishes; the experiment must then be exactly what an
//! uninterrupted run gives (`furnace_exp::audit`, strict): every run finished, each
//! (run, step, metric) once with the same value, each op applied once, no orphan run, every
//! checkpoint the store names loads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_exp::audit::{check, Audit};
use furnace_exp::{OpKind, Store};
use furnace_testutil::repo_root as root;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXP: &str = "chaos";

fn furnace(dir: &Path, args: &[&str], failpoint: Option<&str>, log: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_furnace"));
    c.current_dir(dir).args(args).args(["--threads", "1"]).env_remove("FURNACE_FAILPOINT").env_remove("FURNACE_FAILPOINT_LOG");
    if let Some(p) = failpoint {
        c.env("FURNACE_FAILPOINT", p);
    }
    if let Some(l) = log {
        c.env("FURNACE_FAILPOINT_LOG", l);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout))
}

/// Points and how often a run passed each, from a `FURNACE_FAILPOINT_LOG` file.
fn points(log: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for l in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *out.entry(l.to_string()).or_insert(0) += 1;
    }
    out
}

/// The hits of a point a test kills at: the first, and the middle one of a point passed
/// three times or more.
fn hits(n: usize) -> Vec<usize> {
    if n >= 3 {
        vec![1, n.div_ceil(2)]
    } else {
        vec![1]
    }
}

/// Runs `args` with the point armed: it must die there by abort.
fn die_at(dir: &Path, args: &[&str], point: &str, k: usize) -> Result<(), String> {
    let o = furnace(dir, args, Some(&format!("{point}:{k}")), None);
    let said = text(&o).contains(&format!("failpoint {point} hit {k}, aborting"));
    if o.status.signal() == Some(6) && said {
        Ok(())
    } else {
        Err(format!("{point}:{k}: did not die there ({:?}): {}", o.status, text(&o)))
    }
}

fn rows(file: &str, n: usize) -> String {
    let text = std::fs::read_to_string(root().join("data/extract").join(file)).unwrap();
    text.lines().take(n).map(|l| format!("{l}\n")).collect()
}

/// Three runs (r = 2, 4, 6), 16 rows in 2 chunks of 4 steps, an eval at each chunk's
/// end, a kept checkpoint every 3 steps; no policy. Ops recorded before it starts (so
/// they apply at step 0, the same in every attempt): stop and resume run a, a warm clone
/// of a with another learning rate, a cold clone of b with r = 3, delete c, and a stop of c
/// (rejected: deleted by then).
fn experiment(dir: &Path) {
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 16)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 3)).unwrap();
    let spec = format!(
        "[experiment]\nname = \"{EXP}\"\nnum_chunks = 2\npolicy = \"none\"\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
         [model]\nbase = \"{}\"\n\n[lora]\nr = {{ list = [2, 4, 6] }}\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [trainer]\nlearning_rate = 1e-2\nbatch_size = 2\nmax_seq_len = 96\nsave_every = 3\nschedule = \"constant\"\n",
        root().join("testdata/tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(dir.join("spec.toml"), spec).unwrap();
    let exp = furnace_exp::Experiment::create(&dir.join("runs"), &dir.join("spec.toml")).unwrap();
    let store = exp.store();
    let ids: Vec<i64> = exp.runs().unwrap().iter().map(|r| r.id).collect();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let clone = |set: &str, warm| OpKind::Clone { set: vec![set.to_string()], warm };
    for (run, op) in [
        (a, OpKind::Stop),
        (a, OpKind::Resume),
        (a, clone("trainer.learning_rate=2e-2", true)),
        (b, clone("lora.r=3", false)),
        (c, OpKind::Delete),
        (c, OpKind::Stop),
    ] {
        store.add_op(run, &op, "cli").unwrap();
    }
}

const RUN: &[&str] = &["run", "--experiment", EXP, "--no-server"];

/// Runs the experiment again (no point armed) until it exits cleanly; at most 3 times.
fn finish(dir: &Path, args: &[&str]) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        let o = furnace(dir, args, None, None);
        if o.status.success() {
            return Ok(());
        }
        last = text(&o);
    }
    Err(format!("did not finish in 3 restarts: {last}"))
}

fn audit(dir: &Path, reference: &Path) -> Vec<String> {
    let (store, rstore) = (Store::open_in(&dir.join("runs")).unwrap(), Store::open_in(&reference.join("runs")).unwrap());
    let (exp, rexp) = (store.experiment(EXP).unwrap(), rstore.experiment(EXP).unwrap());
    let mut bad = check(&store, &exp, &Audit { reference: Some((&rstore, &rexp)), strict: true, rel_tol: 1e-6 }).unwrap();
    if store.experiments().unwrap().len() != 1 {
        bad.push(format!("{} experiments in the store", store.experiments().unwrap().len()));
    }
    bad
}

/// The points a run of the experiment must pass; a durable write without one (or a point
/// that is gone) is noticed here.
const RUN_POINTS: &[&str] = &[
    "store.set_experiment_status.after_commit",
    "store.rewind.before_commit",
    "store.rewind.after_commit",
    "store.apply_status_op.before_commit",
    "store.apply_status_op.after_commit",
    "store.apply_clone_op.before_commit",
    "store.apply_clone_op.after_commit",
    "store.finish_op.before_commit",
    "store.finish_op.after_commit",
    "store.set_run_status.after_commit",
    "store.set_totals.after_commit",
    "store.record_step.before_commit",
    "store.record_step.after_commit",
    "store.set_checkpoint.before_commit",
    "store.set_checkpoint.after_commit",
    "checkpoint.files_written",
    "checkpoint.before_rename",
    "checkpoint.after_rename",
    "checkpoint.old_removed",
    "adapter.files_written",
    "adapter.before_rename",
    "adapter.after_rename",
    "adapter.old_removed",
];

#[test]
fn furnace_run_killed_at_every_durable_write_ends_as_an_uninterrupted_run() {
    let started = std::time::Instant::now();
    let reference = tempfile::tempdir().unwrap();
    experiment(reference.path());
    let log = reference.path().join("points.log");
    let o = furnace(reference.path(), RUN, None, Some(&log));
    assert!(o.status.success(), "{}", text(&o));
    let bad = audit(reference.path(), reference.path());
    assert!(bad.is_empty(), "the reference itself: {bad:#?}");
    let passed = points(&log);
    let missing: Vec<&&str> = RUN_POINTS.iter().filter(|p| !passed.contains_key(**p)).collect();
    assert!(missing.is_empty(), "points not passed: {missing:?}; passed: {passed:?}");

    let mut cases: Vec<(String, usize, Option<&str>)> =
        passed.iter().flat_map(|(p, &n)| hits(n).into_iter().map(move |k| (p.clone(), k, None))).collect();
    // A kill during the clean-up of an earlier kill's leftovers.
    cases.push(("checkpoint.files_written".into(), 1, Some("sweep.removed_partial")));
    let mut failures = Vec::new();
    for (point, k, then) in &cases {
        let d = tempfile::tempdir().unwrap();
        experiment(d.path());
        let r = die_at(d.path(), RUN, point, *k)
            .and_then(|()| then.map_or(Ok(()), |t| die_at(d.path(), RUN, t, 1)))
            .and_then(|()| finish(d.path(), RUN))
            .map(|()| audit(d.path(), reference.path()));
        match r {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => failures.push(format!("killed at {point}:{k} {then:?}: {bad:#?}")),
            Err(e) => failures.push(e),
        }
    }
    eprintln!("furnace run: {} kills at {} points in {:.0?}", cases.len(), passed.len(), started.elapsed());
    assert!(failures.is_empty(), "{failures:#?}");
}

fn train_spec(dir: &Path, steps: usize) -> PathBuf {
    let p = dir.join(format!("spec-{steps}.toml"));
    let body = format!(
        "[experiment]\nname = \"tiny\"\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n[model]\nbase = \"{}\"\n\
         [lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\"]\n\
         [trainer]\nlearning_rate = 1e-2\nmax_steps = {steps}\nbatch_size = 2\nmax_seq_len = 64\nsave_every = 2\n",
        root().join("testdata/tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(&p, body).unwrap();
    p
}

fn train_setup(dir: &Path) -> (PathBuf, PathBuf) {
    let rows: String = (0..6).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(dir.join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.join("eval.jsonl"), &rows).unwrap();
    (train_spec(dir, 4), train_spec(dir, 6))
}

/// `furnace train spec`, or `--resume` when `resume`; after a kill, `--resume` until it
/// finishes (a fresh start when the kill left nothing to resume).
fn train_args(spec: &Path, resume: bool) -> Vec<String> {
    let mut a = vec!["train".to_string(), spec.display().to_string(), "--samples".into(), "0".into()];
    if resume {
        a.push("--resume".into());
    }
    a
}

fn train_finish(dir: &Path, spec: &Path) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        let args = train_args(spec, true);
        let o = furnace(dir, &args.iter().map(String::as_str).collect::<Vec<_>>(), None, None);
        if o.status.success() {
            return Ok(());
        }
        last = text(&o);
        if last.contains("no run to resume") {
            let args = train_args(spec, false);
            let o = furnace(dir, &args.iter().map(String::as_str).collect::<Vec<_>>(), None, None);
            if o.status.success() {
                return Ok(());
            }
            last = text(&o);
        }
    }
    Err(format!("furnace train did not finish in 3 restarts: {last}"))
}

/// The run folder's view: metrics.jsonl lines without tokens_per_s (a timing), and the
/// final adapter's tensors.
type View = (Vec<serde_json::Value>, BTreeMap<String, Vec<f32>>);

fn train_view(dir: &Path) -> View {
    let exp = dir.join("runs/tiny");
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).unwrap().trim());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v
        })
        .collect();
    let adapter = furnace_model::load_adapter(&run.join("adapter")).unwrap();
    let tensors = adapter.tensors.iter().map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    (lines, tensors)
}

fn same_view(a: &View, b: &View) -> Vec<String> {
    let mut bad = Vec::new();
    let close = |x: f64, y: f64| x == y || (x - y).abs() <= 1e-6 * x.abs().max(y.abs());
    if a.0.len() != b.0.len() {
        bad.push(format!("metrics.jsonl: {} lines, the reference {}: {:?}", a.0.len(), b.0.len(), a.0));
    }
    for (x, y) in a.0.iter().zip(&b.0) {
        let (xo, yo) = (x.as_object().unwrap(), y.as_object().unwrap());
        let same = xo.len() == yo.len()
            && xo.iter().all(|(k, v)| {
                yo.get(k).is_some_and(|w| match (v.as_f64(), w.as_f64()) {
                    (Some(p), Some(q)) => close(p, q),
                    _ => v == w,
                })
            });
        if !same {
            bad.push(format!("metrics.jsonl: {x} vs the reference's {y}"));
        }
    }
    if a.1.keys().collect::<Vec<_>>() != b.1.keys().collect::<Vec<_>>()
        || a.1.iter().any(|(k, v)| v.iter().zip(&b.1[k]).any(|(p, q)| !close(*p as f64, *q as f64)))
    {
        bad.push("the final adapter differs from the reference's".into());
    }
    bad
}

fn train_audit(dir: &Path, reference: &Path) -> Vec<String> {
    let (store, rstore) = (Store::open_in(&dir.join("runs")).unwrap(), Store::open_in(&reference.join("runs")).unwrap());
    let (exps, rexp) = (store.experiments().unwrap(), rstore.experiment("tiny").unwrap());
    if exps.len() != 1 {
        return vec![format!("{} experiments in the store: {:?}", exps.len(), exps.iter().map(|e| &e.name).collect::<Vec<_>>())];
    }
    let mut bad = check(&store, &exps[0], &Audit { reference: Some((&rstore, &rexp)), strict: true, rel_tol: 1e-6 }).unwrap();
    bad.extend(same_view(&train_view(dir), &train_view(reference)));
    bad
}

const TRAIN_POINTS: &[&str] = &[
    "store.create_experiment.before_commit",
    "store.create_experiment.after_commit",
    "train.run_folder_written",
    "train.latest_written",
    "train.metrics_line",
    "store.record_step.after_commit",
    "checkpoint.before_rename",
    "adapter.after_rename",
];
const RESUME_POINTS: &[&str] = &["store.continue_run.after_commit", "train.view_rewritten", "adapter.between_renames"];

#[test]
fn furnace_train_killed_at_every_durable_write_resumes_to_the_same_run_folder() {
    let started = std::time::Instant::now();
    let reference = tempfile::tempdir().unwrap();
    let r = reference.path();
    let (four, six) = train_setup(r);
    // Two phases: 4 steps, then --resume to 6 (the resume path's own writes).
    let (log1, log2) = (r.join("points-1.log"), r.join("points-2.log"));
    let args1 = train_args(&four, false);
    let args2 = train_args(&six, true);
    let a1: Vec<&str> = args1.iter().map(String::as_str).collect();
    let a2: Vec<&str> = args2.iter().map(String::as_str).collect();
    let o = furnace(r, &a1, None, Some(&log1));
    assert!(o.status.success(), "{}", text(&o));
    let o = furnace(r, &a2, None, Some(&log2));
    assert!(o.status.success(), "{}", text(&o));
    assert!(train_audit(r, r).is_empty(), "{:?}", train_audit(r, r));
    let (p1, p2) = (points(&log1), points(&log2));
    let missing: Vec<&&str> =
        TRAIN_POINTS.iter().filter(|p| !p1.contains_key(**p)).chain(RESUME_POINTS.iter().filter(|p| !p2.contains_key(**p))).collect();
    assert!(missing.is_empty(), "points not passed: {missing:?}; passed: {p1:?} then {p2:?}");

    let mut cases: Vec<(usize, String, usize, Option<&str>)> = [(1, &p1), (2, &p2)]
        .into_iter()
        .flat_map(|(phase, ps)| ps.iter().flat_map(move |(p, &n)| hits(n).into_iter().map(move |k| (phase, p.clone(), k, None))))
        .collect();
    // A kill while the restart puts back the adapter a kill between its renames left aside.
    cases.push((2, "adapter.between_renames".into(), 1, Some("sweep.restored_old")));
    let mut failures = Vec::new();
    for (phase, point, k, then) in &cases {
        let d = tempfile::tempdir().unwrap();
        let (four, six) = train_setup(d.path());
        let args1 = train_args(&four, false);
        let args2 = train_args(&six, true);
        let a1: Vec<&str> = args1.iter().map(String::as_str).collect();
        let a2: Vec<&str> = args2.iter().map(String::as_str).collect();
        let r = if *phase == 1 {
            die_at(d.path(), &a1, point, *k).and_then(|()| train_finish(d.path(), &four)).and_then(|()| train_finish(d.path(), &six))
        } else {
            let o = furnace(d.path(), &a1, None, None);
            if !o.status.success() {
                failures.push(format!("phase 1 without a kill: {}", text(&o)));
                continue;
            }
            let resume = train_args(&six, true);
            let resume: Vec<&str> = resume.iter().map(String::as_str).collect();
            die_at(d.path(), &a2, point, *k)
                .and_then(|()| then.map_or(Ok(()), |t| die_at(d.path(), &resume, t, 1)))
                .and_then(|()| train_finish(d.path(), &six))
        };
        match r.map(|()| train_audit(d.path(), reference.path())) {
            Ok(bad) if bad.is_empty() => {}
            Ok(bad) => failures.push(format!("phase {phase}, killed at {point}:{k} {then:?}: {bad:#?}")),
            Err(e) => failures.push(format!("phase {phase}: {e}")),
        }
    }
    eprintln!("furnace train: {} kills in {:.0?}", cases.len(), started.elapsed());
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Four learning rates under ASHA (eta 2, 3 chunks): rung 1 pauses two runs, rung 2 one;
/// each pause is a policy op recorded with the run's status.
fn asha_experiment(dir: &Path) {
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 24)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 3)).unwrap();
    let spec = format!(
        "[experiment]\nname = \"{EXP}\"\nnum_chunks = 3\npolicy = \"asha\"\neta = 2\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
         [model]\nbase = \"{}\"\n\n[lora]\nr = 2\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [trainer]\nlearning_rate = {{ list = [3e-2, 1e-2, 3e-3, 1e-4] }}\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\nschedule = \"constant\"\n",
        root().join("testdata/tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(dir.join("spec.toml"), spec).unwrap();
    furnace_exp::Experiment::create(&dir.join("runs"), &dir.join("spec.toml")).unwrap();
}

#[test]
fn asha_decisions_killed_as_they_are_recorded_are_taken_again_once() {
    let reference = tempfile::tempdir().unwrap();
    asha_experiment(reference.path());
    let log = reference.path().join("points.log");
    let o = furnace(reference.path(), RUN, None, Some(&log));
    assert!(o.status.success(), "{}", text(&o));
    let bad = audit(reference.path(), reference.path());
    assert!(bad.is_empty(), "the reference itself: {bad:#?}");
    let store = Store::open_in(&reference.path().join("runs")).unwrap();
    let policy = store.ops(store.experiment(EXP).unwrap().id).unwrap().into_iter().filter(|o| o.source == "policy").count();
    assert_eq!(policy, 3, "two pauses at rung 1, one at rung 2");
    let passed = points(&log);
    let mut failures = Vec::new();
    let mut kills = 0;
    for point in ["store.add_applied_op.before_commit", "store.add_applied_op.after_commit"] {
        assert_eq!(passed.get(point), Some(&policy), "{point}: {passed:?}");
        for k in 1..=policy {
            let d = tempfile::tempdir().unwrap();
            asha_experiment(d.path());
            kills += 1;
            let r = die_at(d.path(), RUN, point, k).and_then(|()| finish(d.path(), RUN)).map(|()| audit(d.path(), reference.path()));
            match r {
                Ok(bad) if bad.is_empty() => {}
                Ok(bad) => failures.push(format!("killed at {point}:{k}: {bad:#?}")),
                Err(e) => failures.push(e),
            }
        }
    }
    assert_eq!(kills, 6);
    assert!(failures.is_empty(), "{failures:#?}");
}
