//! The adapter registry: a round trip through the store (register, list, tag, show, rm,
//! resolve), an older store gaining the table, and a trained run registering its adapter
//! with its base, spec and final metrics.

use furnace_exp::registry::{self, AdapterFilter};
use furnace_exp::{experiment, run_fit, FitOptions, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use std::path::Path;

fn tags(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_foreign_adapter_round_trips_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_in(&dir.path().join("runs")).unwrap();
    let smol = testdata().join("lora_adapter");
    let tiny = testdata().join("tiny-llama-pref-lora");

    // Defaults: the folder's name, the base from adapter_config.json, the PEFT settings.
    let a = registry::register_path(&store, &smol, None, None, &tags(&["prod"]), false).unwrap();
    assert_eq!(a.name, "lora_adapter");
    assert_eq!(a.base, "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(a.source, "registered");
    assert_eq!(a.peft["r"], 8);
    assert_eq!(a.peft["lora_alpha"], 16);
    assert!(a.peft["target_modules"].as_array().unwrap().iter().any(|t| t == "q_proj"), "{}", a.peft);
    assert_eq!(a.path, std::fs::canonicalize(&smol).unwrap());
    assert_eq!(a.tags, ["prod"]);

    let b = registry::register_path(&store, &tiny, Some("pref"), Some("tiny-llama"), &[], false).unwrap();
    assert_eq!((b.name.as_str(), b.base.as_str()), ("pref", "tiny-llama"));

    // EXP/run-N names belong to training runs (which replace their record when they finish).
    let e = registry::register_path(&store, &tiny, Some("tiny/run-1"), None, &[], true).unwrap_err().to_string();
    assert!(e.contains("kept for the adapters of training runs"), "{e}");
    assert!(registry::is_run_name("a/b/run-12") && !registry::is_run_name("a/run-x") && !registry::is_run_name("run-1"));
    // A tag may not be another adapter's name (the name would always win).
    let e = registry::tag(&store, "lora_adapter", &tags(&["pref"])).unwrap_err().to_string();
    assert!(e.contains("tag 'pref' is the name of a registered adapter"), "{e}");

    // A taken name is refused unless replaced.
    let e = registry::register_path(&store, &tiny, Some("pref"), None, &[], false).unwrap_err().to_string();
    assert!(e.contains("'pref' is registered already") && e.contains("--force"), "{e}");
    // Not an adapter: the loader's error.
    let e = registry::register_path(&store, &testdata().join("tiny-llama"), Some("x"), None, &[], false).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    let e = registry::register_path(&store, &tiny, Some("../x"), None, &[], false).unwrap_err().to_string();
    assert!(e.contains("adapter name '../x'"), "{e}");

    // List, filtered by base (the same model under an alias, a hub id or a file) and tag.
    let names = |f: AdapterFilter| registry::list(&store, &f).unwrap().into_iter().map(|a| a.name).collect::<Vec<_>>();
    assert_eq!(names(AdapterFilter::default()), ["lora_adapter", "pref"]);
    assert_eq!(names(AdapterFilter { base: Some("smollm2-135m-instruct".into()), tag: None }), ["lora_adapter"]);
    assert_eq!(names(AdapterFilter { base: Some("/models/SmolLM2-135M-Instruct.Q4_1.gguf".into()), tag: None }), ["lora_adapter"]);
    assert_eq!(names(AdapterFilter { base: None, tag: Some("prod".into()) }), ["lora_adapter"]);

    // Tags: added once, removed; a tag naming one adapter resolves to it.
    let t = registry::tag(&store, "pref", &tags(&["best", "best", "dpo"])).unwrap();
    assert_eq!(t.tags, ["best", "dpo"]);
    assert_eq!(registry::untag(&store, "pref", &tags(&["dpo"])).unwrap().tags, ["best"]);
    assert_eq!(registry::get(&store, "pref").unwrap().unwrap().tags, ["best"]);
    assert_eq!(registry::resolve(&store, "best").unwrap().name, "pref");
    assert_eq!(registry::resolve(&store, "lora_adapter").unwrap().path, a.path);
    registry::tag(&store, "lora_adapter", &tags(&["best"])).unwrap();
    let e = registry::resolve(&store, "best").unwrap_err().to_string();
    assert!(e.contains("tag 'best' names 2 adapters (lora_adapter, pref)"), "{e}");
    // Unknown: the closest names and how to register.
    let e = registry::resolve(&store, "lora_adaptr").unwrap_err().to_string();
    assert!(e.contains("closest: lora_adapter") && e.contains("furnace adapters register"), "{e}");

    // rm never deletes files outside the runs folder.
    let e = registry::remove(&store, "pref", true).unwrap_err().to_string();
    assert!(e.contains("outside the runs folder"), "{e}");
    assert!(registry::get(&store, "pref").unwrap().is_some());
    let gone = registry::remove(&store, "pref", false).unwrap();
    assert_eq!(gone.name, "pref");
    assert!(tiny.join("adapter_config.json").is_file());
    assert!(registry::get(&store, "pref").unwrap().is_none());
    assert!(registry::remove(&store, "pref", false).is_err());

    // An adapter copied inside the runs folder may be deleted with its files.
    let inside = dir.path().join("runs").join("copies").join("pref");
    std::fs::create_dir_all(&inside).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(tiny.join(f), inside.join(f)).unwrap();
    }
    registry::register_path(&store, &inside, None, None, &[], false).unwrap();
    registry::remove(&store, "pref", true).unwrap();
    assert!(!inside.exists());
}

#[test]
fn an_older_store_gains_the_adapters_table_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("furnace.db");
    {
        let store = Store::open(&db).unwrap();
        store.create_experiment("old", "fit", &dir.path().join("spec.toml"), "").unwrap();
    }
    // As a store made before the registry: no adapters table.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("DROP TABLE adapters").unwrap();
    drop(conn);
    let store = Store::open(&db).unwrap();
    assert_eq!(store.experiments().unwrap()[0].name, "old");
    assert!(registry::list(&store, &AdapterFilter::default()).unwrap().is_empty());
    registry::register_path(&store, &testdata().join("lora_adapter"), Some("smol"), None, &[], false).unwrap();
    assert_eq!(registry::list(&store, &AdapterFilter::default()).unwrap().len(), 1);
}

/// A one-run SFT spec on tiny-llama over 8 rows (2 steps), with an eval set.
fn tiny_spec(dir: &Path) -> std::path::PathBuf {
    let rows = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 8)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 2)).unwrap();
    let spec = format!(
        r#"
[experiment]
name = "reg"
seed = 3

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
batch_size = 2
grad_accum = 2
max_seq_len = 64
"#,
        testdata().join("tiny-llama").display().to_string().replace('\\', "/")
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

#[test]
fn a_trained_run_registers_its_adapter_with_base_spec_and_final_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny_spec(dir.path());
    let runs_dir = dir.path().join("runs");
    let store = Store::open_in(&runs_dir).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    let mut loader = |name: &str, dtype: WeightDType| Ok(LoadedModel::load(Path::new(name), dtype)?);
    let runs = run_fit(&store, &exp, &mut loader, &FitOptions::default(), &furnace_exp::events::channel()).unwrap().runs;
    assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
    let run = &runs[0];

    let name = format!("reg/run-{}", run.id);
    let a = registry::get(&store, &name).unwrap().unwrap_or_else(|| panic!("{name} is not registered"));
    assert_eq!(a.source, "run");
    assert_eq!((a.experiment.as_deref(), a.run_id), (Some("reg"), Some(run.id)));
    assert_eq!(a.path, runs_dir.join("reg").join(format!("run-{}", run.id)).join("adapter"));
    assert!(a.path.join("adapter_model.safetensors").is_file());
    assert_eq!(a.base, testdata().join("tiny-llama").display().to_string().replace('\\', "/"));
    assert_eq!(a.spec, run.config);
    assert_eq!(a.peft["r"], 4);
    assert_eq!(a.peft["lora_alpha"], 8.0);
    // The run's last values, as the store holds them.
    let metrics = store.metrics(run.id).unwrap();
    let last = |n: &str| metrics.iter().filter(|m| m.name == n).max_by_key(|m| m.step).map(|m| m.value).unwrap();
    assert_eq!(a.metrics["step"], run.steps_done);
    assert_eq!(a.metrics["loss"].as_f64().unwrap(), last("loss"));
    assert_eq!(a.metrics["eval_loss"].as_f64().unwrap(), last("eval_loss"));
    // It resolves by name and loads.
    furnace_model::load_adapter(&registry::resolve(&store, &name).unwrap().path).unwrap();
    // The runs folder moved: the run's adapter moves with it.
    drop(store);
    let moved = dir.path().join("moved");
    std::fs::rename(&runs_dir, &moved).unwrap();
    let store = Store::open_in(&moved).unwrap();
    let a = registry::get(&store, &name).unwrap().unwrap();
    assert!(a.path.starts_with(&moved) && a.path.join("adapter_config.json").is_file(), "{}", a.path.display());
}
