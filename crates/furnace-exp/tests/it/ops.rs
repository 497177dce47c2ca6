//! Ops checked when submitted: a clone's overrides keep every size within its bound.

use furnace_exp::{experiment, ops, OpKind, Store};
use furnace_testutil::{repo_root, testdata};

#[test]
fn clone_with_an_unbounded_size_is_refused_when_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows = |file: &str| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
        text.lines().take(8).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(d.join("train.jsonl"), rows("train.jsonl")).unwrap();
    std::fs::write(d.join("eval.jsonl"), rows("eval.jsonl")).unwrap();
    let spec = format!(
        "[experiment]\nname = \"ops\"\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n[model]\nbase = \"{}\"\n\n[lora]\nr = 4\nalpha = 8\n\n[trainer]\nbatch_size = 2\nmax_seq_len = 96\n",
        testdata().join("tiny-llama").display().to_string().replace('\\', "/")
    );
    std::fs::write(d.join("spec.toml"), spec).unwrap();
    let store = Store::open_in(&d.join("runs")).unwrap();
    let exp = experiment::create(&store, &d.join("spec.toml")).unwrap();
    let run = store.runs(exp.id).unwrap()[0].id;
    let clone = |set: &str| ops::submit(&store, run, &OpKind::Clone { set: vec![set.into()], warm: false }, "test");
    for (set, want) in [
        ("lora.r=100000", "lora.r: must be at most 4096"),
        ("trainer.batch_size=65537", "trainer.batch_size: must be at most 65536"),
        ("trainer.max_seq_len=2000000", "trainer.max_seq_len: must be at most 1048576"),
        ("trainer.grad_accum=100000", "trainer.grad_accum: must be at most 65536"),
        ("trainer.epochs=100001", "trainer.epochs: must be at most 100000"),
    ] {
        let e = clone(set).unwrap_err().to_string();
        assert!(e.contains(want), "{set}: {e}");
    }
    assert!(store.ops(exp.id).unwrap().is_empty(), "nothing recorded");
    clone("lora.r=4096").unwrap();
}
