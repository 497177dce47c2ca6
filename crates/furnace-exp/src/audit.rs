//! The durability invariants of an experiment, checked after the fact: what the crash
//! tests and `furnace bench chaos` assert after killing the driver and running it again.
//!
//! [`check`] returns the violations it finds (empty: all hold):
//!
//! - every run is finished: none is `new` or `ongoing` (the driver ran to its end);
//! - no run is orphaned: a run either comes from the spec or is the run of exactly one
//!   applied clone op, and every applied clone op names a run of the experiment;
//! - each op was applied at most once and is finished (`applied` or `rejected`);
//! - a run's steps are all there, once: a completed run has a `loss` at every step from
//!   its start (0, or a warm clone's fork step) to its last, any run's steps are
//!   contiguous, and no metric lies past its progress;
//! - every checkpoint the store names is a complete folder that loads
//!   ([`furnace_train::Trainer::check_checkpoint`]) at that step; a completed run's
//!   adapter loads; no half-written folder (`*.partial-*`, `.*.old-*`) is left;
//! - with a reference (the same experiment run without a crash): each metric value equals
//!   the reference's (relative tolerance [`Audit::rel_tol`]), and under
//!   [`Audit::strict`] the runs (configs, statuses, progress), the ops (status, step,
//!   the run they made) and the set of (step, metric) of every run are the same.

use crate::error::Result;
use crate::fit::run_dir;
use crate::store::{ExperimentRow, MetricRow, OpKind, RunRow, RunStatus, Store};
use std::collections::{BTreeMap, BTreeSet};

/// What [`check`] compares with.
#[derive(Clone, Copy)]
pub struct Audit<'a> {
    /// The same experiment run without a crash (its store and row), if any.
    pub reference: Option<(&'a Store, &'a ExperimentRow)>,
    /// The reference had the same ops at the same steps: runs are matched by position
    /// and must agree in everything. Otherwise each run is matched with the reference run
    /// of the same config (ops at other steps: only the values of the steps both have
    /// are compared).
    pub strict: bool,
    /// Relative tolerance of metric values.
    pub rel_tol: f64,
}

impl Default for Audit<'_> {
    fn default() -> Self {
        Self { reference: None, strict: false, rel_tol: 1e-6 }
    }
}

/// (step, name) → value of one run.
type Series = BTreeMap<(i64, String), f64>;

fn series(metrics: &[MetricRow]) -> Series {
    metrics.iter().map(|m| ((m.step, m.name.clone()), m.value)).collect()
}

/// A run's config with its data files by name only (the same experiment made in another
/// folder reads its own copies).
fn portable(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(data) = c.get_mut("data").and_then(|d| d.as_object_mut()) {
        for key in ["train", "eval"] {
            if let Some(v) = data.get_mut(key) {
                if let Some(name) = v.as_str().and_then(|p| std::path::Path::new(p).file_name()).map(|n| n.to_string_lossy().into_owned()) {
                    *v = name.into();
                }
            }
        }
    }
    c
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    a == b || (a - b).abs() <= tol * a.abs().max(b.abs())
}

/// The violations of the durability invariants by experiment `exp` (see the module docs).
/// Errors are the store's only.
pub fn check(store: &Store, exp: &ExperimentRow, audit: &Audit<'_>) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    let runs = store.runs(exp.id)?;
    let ops = store.ops(exp.id)?;
    let ids: BTreeSet<i64> = runs.iter().map(|r| r.id).collect();

    // Ops: finished, each clone's run there once.
    let mut made_by: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut fork_step: BTreeMap<i64, i64> = BTreeMap::new();
    for op in &ops {
        match op.status.as_str() {
            "applied" => {
                if let OpKind::Clone { warm, .. } = &op.kind {
                    match op.new_run_id {
                        Some(new) if ids.contains(&new) => {
                            made_by.entry(new).or_default().push(op.id);
                            if *warm {
                                fork_step.insert(new, op.applied_step.unwrap_or(0));
                            }
                        }
                        other => bad.push(format!("op {}: an applied clone names run {other:?}, not a run of the experiment", op.id)),
                    }
                } else if op.new_run_id.is_some() {
                    bad.push(format!("op {}: a {} op names a new run", op.id, op.kind.name()));
                }
            }
            "rejected" => {}
            s => bad.push(format!("op {}: still {s}", op.id)),
        }
    }
    for run in &runs {
        let makers = made_by.get(&run.id).map(Vec::len).unwrap_or(0);
        match (run.parent_id, makers) {
            (None, 0) | (Some(_), 1) => {}
            (None, n) => bad.push(format!("run {}: from the spec, yet {n} clone ops name it", run.id)),
            (Some(p), 0) => bad.push(format!("run {}: an orphan (a clone of run {p} no applied op made)", run.id)),
            (Some(_), n) => bad.push(format!("run {}: made by {n} clone ops", run.id)),
        }
        if run.status.is_active() {
            bad.push(format!("run {}: still {} at step {}/{}", run.id, run.status.as_str(), run.steps_done, run.total_steps));
        }
    }

    // Steps, checkpoints, adapters, leftovers.
    let mut all: BTreeMap<i64, Series> = BTreeMap::new();
    for run in &runs {
        let s = series(&store.metrics(run.id)?);
        let start = fork_step.get(&run.id).copied().unwrap_or(0);
        let losses: Vec<i64> = s.keys().filter(|(_, n)| n == "loss").map(|(st, _)| *st).collect();
        let want: Vec<i64> = (start + 1..=run.steps_done).collect();
        if losses != want && run.status != RunStatus::Failed {
            bad.push(format!("run {}: loss at steps {losses:?}, not {}..={}", run.id, start + 1, run.steps_done));
        }
        if run.status == RunStatus::Completed && run.steps_done != run.total_steps {
            bad.push(format!("run {}: completed at step {} of {}", run.id, run.steps_done, run.total_steps));
        }
        if let Some(((st, n), _)) = s.iter().find(|((st, _), _)| *st > run.steps_done) {
            bad.push(format!("run {}: {n} at step {st}, past its progress {}", run.id, run.steps_done));
        }
        let dir = run_dir(exp, run.id);
        if let Some(step) = run.checkpoint_step {
            let ck = dir.join("checkpoints").join(format!("step-{step}"));
            match furnace_train::Trainer::check_checkpoint(&ck) {
                Ok(s) if s as i64 == step => {}
                Ok(s) => bad.push(format!("run {}: checkpoint {} holds step {s}", run.id, ck.display())),
                Err(e) => bad.push(format!("run {}: the checkpoint the store names does not load: {e}", run.id)),
            }
        }
        if run.status == RunStatus::Completed {
            if let Err(e) = furnace_model::load_adapter(&dir.join("adapter")) {
                bad.push(format!("run {}: its adapter does not load: {e}", run.id));
            }
        }
        for d in [dir.clone(), dir.join("checkpoints")] {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(".partial-") || (name.starts_with('.') && name.contains(".old-")) {
                    bad.push(format!("run {}: a half-written folder is left: {}", run.id, e.path().display()));
                }
            }
        }
        all.insert(run.id, s);
    }

    let Some((rstore, rexp)) = audit.reference else { return Ok(bad) };
    let rruns = rstore.runs(rexp.id)?;
    let mut rseries = BTreeMap::new();
    for r in &rruns {
        rseries.insert(r.id, series(&rstore.metrics(r.id)?));
    }
    let counterpart = |i: usize, run: &RunRow| -> Option<&RunRow> {
        if audit.strict {
            rruns.get(i)
        } else {
            rruns.iter().find(|r| r.parent_id.is_none() && portable(&r.config) == portable(&run.config))
        }
    };
    if audit.strict && runs.len() != rruns.len() {
        bad.push(format!("{} runs, the reference has {}", runs.len(), rruns.len()));
    }
    let mut to_ref = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        let Some(r) = counterpart(i, run) else {
            if audit.strict {
                bad.push(format!("run {}: no counterpart in the reference", run.id));
            }
            continue;
        };
        to_ref.insert(run.id, r.id);
        if audit.strict {
            let same = portable(&run.config) == portable(&r.config)
                && run.knobs == r.knobs
                && run.status == r.status
                && run.steps_done == r.steps_done
                && run.chunks_done == r.chunks_done
                && run.total_steps == r.total_steps
                && run.warm == r.warm
                && run.checkpoint_step == r.checkpoint_step;
            if !same {
                bad.push(format!(
                    "run {}: {} at step {} (checkpoint {:?}), the reference's run {}: {} at step {} (checkpoint {:?}), or another config",
                    run.id,
                    run.status.as_str(),
                    run.steps_done,
                    run.checkpoint_step,
                    r.id,
                    r.status.as_str(),
                    r.steps_done,
                    r.checkpoint_step
                ));
            }
        }
        let (mine, theirs) = (&all[&run.id], &rseries[&r.id]);
        for ((step, name), v) in mine {
            match theirs.get(&(*step, name.clone())) {
                Some(w) if close(*v, *w, audit.rel_tol) => {}
                Some(w) => bad.push(format!("run {}: {name} at step {step} is {v}, the reference's {w}", run.id)),
                None if audit.strict => bad.push(format!("run {}: {name} at step {step}, which the reference does not have", run.id)),
                None => {}
            }
        }
        if audit.strict {
            for (step, name) in theirs.keys().filter(|k| !mine.contains_key(*k)) {
                bad.push(format!("run {}: no {name} at step {step} (the reference has it)", run.id));
            }
        }
    }
    if audit.strict {
        let rops = rstore.ops(rexp.id)?;
        if ops.len() != rops.len() {
            bad.push(format!("{} ops, the reference has {}", ops.len(), rops.len()));
        }
        for (op, r) in ops.iter().zip(&rops) {
            let new_ok = match (op.new_run_id, r.new_run_id) {
                (Some(a), Some(b)) => to_ref.get(&a) == Some(&b),
                (a, b) => a.is_none() && b.is_none(),
            };
            if op.kind != r.kind || op.status != r.status || op.applied_step != r.applied_step || !new_ok {
                bad.push(format!(
                    "op {}: {} {} at step {:?} (run {:?}), the reference's: {} at step {:?} (run {:?})",
                    op.id,
                    op.kind.name(),
                    op.status,
                    op.applied_step,
                    op.new_run_id,
                    r.status,
                    r.applied_step,
                    r.new_run_id
                ));
            }
        }
    }
    Ok(bad)
}
