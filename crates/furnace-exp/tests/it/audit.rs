//! `audit::check` finds each kind of broken invariant in a store made by hand.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_exp::audit::{check, Audit};
use furnace_exp::{OpKind, RunStatus, Store};
use serde_json::json;

#[test]
fn the_audit_names_each_broken_invariant_and_passes_a_sound_experiment() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_in(d.path()).unwrap();
    let spec = d.path().join("spec.toml");
    let exp = store.create_experiment_with_runs("e", "fit", &spec, "", &[(json!({"a": 1}), json!({}), 0)]).unwrap();
    let mut w = store.reopen().unwrap();
    let a = store.runs(exp.id).unwrap()[0].id;
    w.record_step(a, 1, 0, &[("loss", 2.0)]).unwrap();
    w.record_step(a, 2, 1, &[("loss", 1.5)]).unwrap();
    store.set_totals(a, 2, 1).unwrap();
    store.set_run_status(a, RunStatus::Stopped, None).unwrap();
    // Sound so far, and equal to itself.
    let own = Audit { reference: Some((&store, &exp)), strict: true, rel_tol: 1e-9 };
    assert_eq!(check(&store, &exp, &own).unwrap(), Vec::<String>::new());

    // A clone no op made, an op still pending, a checkpoint that is not there, a gap.
    let orphan = store.add_run(exp.id, &json!({"a": 2}), &json!({}), 0, 2, 1, Some((a, false))).unwrap();
    store.set_run_status(orphan, RunStatus::Stopped, None).unwrap();
    store.add_op(a, &OpKind::Resume, "cli").unwrap();
    store.set_checkpoint(a, 2, 1).unwrap();
    w.record_step(orphan, 2, 1, &[("loss", 1.0)]).unwrap();
    let bad = check(&store, &exp, &Audit::default()).unwrap();
    let has = |s: &str| bad.iter().any(|b| b.contains(s));
    assert!(has("an orphan"), "{bad:#?}");
    assert!(has("still pending"), "{bad:#?}");
    assert!(has("does not load"), "{bad:#?}");
    assert!(has("loss at steps [2]"), "{bad:#?}");
    // Against a reference: another value, and a run too many.
    let r = tempfile::tempdir().unwrap();
    let rstore = Store::open_in(r.path()).unwrap();
    let rexp = rstore.create_experiment_with_runs("e", "fit", &spec, "", &[(json!({"a": 1}), json!({}), 0)]).unwrap();
    let ra = rstore.runs(rexp.id).unwrap()[0].id;
    let mut rw = rstore.reopen().unwrap();
    rw.record_step(ra, 1, 0, &[("loss", 2.0)]).unwrap();
    rw.record_step(ra, 2, 1, &[("loss", 1.25)]).unwrap();
    let bad = check(&store, &exp, &Audit { reference: Some((&rstore, &rexp)), strict: true, rel_tol: 1e-6 }).unwrap();
    assert!(bad.iter().any(|b| b.contains("loss at step 2 is 1.5, the reference's 1.25")), "{bad:#?}");
    assert!(bad.iter().any(|b| b.contains("2 runs, the reference has 1")), "{bad:#?}");
}
