//! Evals experiments in the store: a spec becomes an experiment of mode `evals` with one
//! run per pipeline, checked (including against its eval set) before anything runs; an
//! interrupted one is found again; and the check clones go through.

use crate::error::{Error, Result};
use crate::spec::{expand, EvalSpec, Pipeline};
use furnace_exp::{ExperimentRow, Store};
use std::path::Path;

/// The spec's pipelines, every one validated, also against the eval set (a retrieval
/// metric needs relevant ids in every row, a text metric reference answers).
pub fn pipelines_of(text: &str, spec_path: &Path) -> Result<Vec<Pipeline>> {
    let pipes = expand(text, spec_path)?;
    let set = crate::dataset::load(&pipes[0].spec.data)?;
    for p in &pipes {
        check_against_data(&p.spec, &set)?;
    }
    Ok(pipes)
}

fn check_against_data(spec: &EvalSpec, set: &crate::dataset::EvalSet) -> Result<()> {
    let names = spec.metric_names();
    for (i, m) in spec.metrics.iter().enumerate() {
        if m.is_retrieval() && !set.has_relevant {
            return Err(Error::Spec {
                key: format!("metric[{i}]"),
                msg: format!(
                    "{} needs the relevant document ids of every question, but rows of {} have none: add a 'relevant' column (or set [data] relevant)",
                    names[i],
                    spec.data.path.display()
                ),
            });
        }
        let needs_refs =
            matches!(m.kind.as_str(), "exact_match" | "contains" | "token_f1" | "rouge_l" | "bleu" | "numeric_match" | "json_field");
        if needs_refs && !set.has_answers {
            return Err(Error::Spec {
                key: format!("metric[{i}]"),
                msg: format!(
                    "{} compares answers with references, but rows of {} lack them: add an 'answer' or 'answers' column (or set [data] answers)",
                    names[i],
                    spec.data.path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Creates an evals experiment from a spec file: a unique name, its folder, one `new` run
/// per pipeline.
pub fn create(store: &Store, spec_path: &Path) -> Result<ExperimentRow> {
    let text = std::fs::read_to_string(spec_path).map_err(Error::io("reading", spec_path))?;
    create_from_text(store, &text, spec_path)
}

/// The adapter folder of a training run named `EXPERIMENT/run-N` (`[generator] run`): it
/// must exist in this store and have finished with an adapter. Any other name (or tag) is
/// looked up in the adapter registry (`furnace adapters`).
pub fn run_adapter(store: &Store, reference: &str) -> Result<std::path::PathBuf> {
    let bad = |m: String| Error::Spec { key: "generator.run".into(), msg: m };
    let Some((name, id)) = crate::spec::parse_run_ref(reference) else {
        return furnace_exp::registry::resolve(store, reference)
            .map(|a| a.path)
            .map_err(|e| bad(format!("'{reference}' is neither EXPERIMENT/run-N nor a registered adapter: {e}")));
    };
    let exp = store.experiment(name).map_err(|e| bad(format!("{reference}: {e}")))?;
    let run = store.run(id).map_err(|e| bad(format!("{reference}: {e}")))?;
    if run.experiment_id != exp.id {
        return Err(bad(format!("{reference}: run {id} is not in experiment {name}")));
    }
    let dir = furnace_exp::fit::run_dir(&exp, id).join("adapter");
    if !dir.join("adapter_config.json").is_file() {
        return Err(bad(format!("{reference}: the run has no adapter yet (it is {}); wait until it completes", run.status.as_str())));
    }
    Ok(dir)
}

/// [`create`] from spec text (checked as a file at `spec_path` would be).
pub fn create_from_text(store: &Store, text: &str, spec_path: &Path) -> Result<ExperimentRow> {
    let mut pipes = pipelines_of(text, spec_path)?;
    // Training runs named by `[generator] run` become their adapter folders.
    for p in &mut pipes {
        for g in [Some(&mut p.spec.generator), p.spec.judge.as_mut()].into_iter().flatten() {
            if let Some(r) = g.run.take() {
                g.adapter = Some(run_adapter(store, &r)?);
            }
        }
    }
    let set = crate::dataset::load(&pipes[0].spec.data)?;
    let shards = pipes[0].spec.data.num_shards.min(set.examples.len()) as i64;
    let mut runs = Vec::new();
    for p in &pipes {
        let config = serde_json::to_value(&p.spec).map_err(|e| Error::Invalid(format!("encoding a pipeline: {e}")))?;
        let knobs: serde_json::Map<String, serde_json::Value> =
            p.knobs.iter().map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null))).collect();
        runs.push((config, serde_json::Value::Object(knobs), p.group as i64));
    }
    let abs = std::path::absolute(spec_path).unwrap_or_else(|_| spec_path.to_path_buf());
    let exp = store.create_experiment_with_runs(&pipes[0].spec.experiment.name, "evals", &abs, text, &runs)?;
    for r in store.runs(exp.id)? {
        store.set_totals(r.id, shards, shards)?;
    }
    std::fs::create_dir_all(&exp.dir).map_err(Error::io("creating", &exp.dir))?;
    Ok(exp)
}

/// The evals experiment this spec was last started as, if it never finished and the spec
/// is unchanged.
pub fn interrupted(store: &Store, spec_path: &Path) -> Result<Option<ExperimentRow>> {
    let text = std::fs::read_to_string(spec_path).map_err(Error::io("reading", spec_path))?;
    let pipes = expand(&text, spec_path)?;
    let name = &pipes[0].spec.experiment.name;
    Ok(store.latest_of(name)?.filter(|e| e.status == "running" && e.spec == text && e.mode == "evals"))
}

/// Checks a pipeline config a clone made (registered with furnace-exp's ops by
/// [`register`]).
fn check_config(config: &serde_json::Value) -> std::result::Result<(), String> {
    let spec: EvalSpec = serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
    spec.validate().map_err(|e| e.to_string())
}

/// Lets furnace-exp's op checks validate evals clones (call once at program start).
pub fn register() {
    furnace_exp::ops::register_evals_check(check_config);
}
