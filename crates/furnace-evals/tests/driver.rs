//! The evals scheduler on the real SmolLM2: pipelines of one base, with and without a LoRA
//! adapter, generate in one batch (adapters mixed) and answer exactly as each does alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_evals::{run_evals, EvalOptions};
use furnace_exp::Store;
use furnace_testutil::{repo_root, smollm2_gguf, testdata};
use std::collections::BTreeMap;

/// Runs an evals experiment to its end on the real model.
fn evaluate(store: &Store, exp: &furnace_exp::ExperimentRow, opts: &EvalOptions) -> furnace_evals::EvalSummary {
    let mut loader = |name: &str, dtype| {
        furnace_model::load_by_name(name, dtype, &mut |_| {})
            .map_err(|e| furnace_exp::Error::Load { model: name.into(), message: e.to_string() })
    };
    run_evals(store, exp, &mut loader, opts, &furnace_exp::events::channel()).unwrap()
}

fn run(dir: &std::path::Path, sequential: bool) -> BTreeMap<(i64, String), String> {
    let data = repo_root().join("data/rag_eval/questions.jsonl");
    let spec = format!(
        r#"[experiment]
name = "mix"
mode = "evals"

[data]
path = "{}"
limit = 6
num_shards = 2

[prompt]
system = "Answer in a few words."

[generator]
model = "{}"
max_tokens = 6

[[group]]
[group.generator]
max_tokens = 6

[[group]]
[group.generator]
adapter = "{}"

[[metric]]
kind = "token_f1"
"#,
        data.display(),
        smollm2_gguf().display(),
        testdata().join("lora_adapter").display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    let store = Store::open_in(&dir.join("runs")).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let summary = evaluate(&store, &exp, &EvalOptions { sequential, ..Default::default() });
    assert!(!summary.cancelled);
    let mut out = BTreeMap::new();
    for (i, r) in summary.runs.iter().enumerate() {
        assert_eq!((r.status.as_str(), r.steps_done), ("completed", 2), "{r:?}");
        for e in store.eval_examples(r.id).unwrap() {
            out.insert((i as i64, e.example_id), e.prediction);
        }
    }
    out
}

#[test]
fn pipelines_with_and_without_an_adapter_batched_together_answer_as_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let batched = run(&dir.path().join("batched"), false);
    let alone = run(&dir.path().join("alone"), true);
    assert_eq!(batched.len(), 12);
    assert_eq!(batched, alone);
    // The adapter changes some answer: the pipelines did not both run the base model.
    let differs = batched.iter().filter(|((p, id), text)| *p == 0 && batched.get(&(1, id.clone())) != Some(text)).count();
    assert!(differs > 0, "the adapter changed no answer: {batched:?}");
}

#[test]
fn a_generator_names_a_training_run_of_the_store_by_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let store = Store::open_in(&runs).unwrap();
    // A finished training run with an adapter, as `furnace run` leaves it.
    let sft = store
        .create_experiment_with_runs("sft", "fit", &dir.path().join("s.toml"), "", &[(serde_json::json!({}), serde_json::json!({}), 0)])
        .unwrap();
    let run = store.runs(sft.id).unwrap()[0].id;
    let adapter = furnace_exp::fit::run_dir(&sft, run).join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(testdata().join("lora_adapter").join(f), adapter.join(f)).unwrap();
    }
    let data = repo_root().join("data/rag_eval/questions.jsonl");
    let spec = |reference: &str| {
        format!(
            "[experiment]\nname = \"byrun\"\nmode = \"evals\"\n\n[data]\npath = \"{}\"\n\n[generator]\nrun = \"{reference}\"\n\n[[metric]]\nkind = \"contains\"\n",
            data.display()
        )
    };
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec(&format!("sft/run-{run}"))).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let p = furnace_evals::driver::pipeline_spec(&store.runs(exp.id).unwrap()[0]).unwrap();
    assert_eq!(p.generator.adapter.as_deref(), Some(adapter.as_path()));
    assert_eq!(p.generator.run, None);
    // A name of the adapter registry resolves to the registered folder.
    let foreign = testdata().join("lora_adapter");
    furnace_exp::registry::register_path(&store, &foreign, Some("tuned"), None, &[], false).unwrap();
    std::fs::write(&path, spec("tuned")).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let p = furnace_evals::driver::pipeline_spec(&store.runs(exp.id).unwrap()[0]).unwrap();
    assert_eq!(p.generator.adapter.as_deref().map(std::fs::canonicalize).transpose().unwrap(), Some(foreign.canonicalize().unwrap()));
    for (reference, needle) in
        [("sft/run-99", "no run 99"), ("nope/run-1", "nope"), ("sft-run-1", "neither EXPERIMENT/run-N nor a registered adapter")]
    {
        std::fs::write(&path, spec(reference)).unwrap();
        let e = furnace_evals::experiment::create(&store, &path).unwrap_err().to_string();
        assert!(e.contains("generator.run") && e.contains(needle), "{reference}: {e}");
    }
}

#[test]
fn a_reranked_pipeline_keeps_top_n_of_its_k_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let data = repo_root().join("data/rag_eval");
    let spec = format!(
        r#"[experiment]
name = "rerank"
mode = "evals"

[data]
path = "{}"
limit = 4
num_shards = 1

[rag]
documents = ["{}"]
chunk_size = 256
chunk_overlap = 0
k = 3
reranker = "{}"
top_n = 1

[generator]
model = "{}"
max_tokens = 2

[[metric]]
kind = "hit_rate"
"#,
        data.join("questions.jsonl").display(),
        data.join("docs").display(),
        testdata().join("tiny-cross-encoder").display(),
        smollm2_gguf().display()
    );
    let path = dir.path().join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let exp = furnace_evals::experiment::create(&store, &path).unwrap();
    let summary = evaluate(&store, &exp, &EvalOptions::default());
    let r = &summary.runs[0];
    assert_eq!((r.status.as_str(), r.steps_done), ("completed", 1), "{r:?}");
    let ex = store.eval_examples(r.id).unwrap();
    assert_eq!(ex.len(), 4);
    assert!(ex.iter().all(|e| e.retrieved.len() == 1), "{ex:?}");
}
