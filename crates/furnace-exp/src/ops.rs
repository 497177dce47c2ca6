//! Control ops (stop, resume, delete, clone-modify): checking one before it is recorded,
//! and the overrides of a clone.

use crate::error::{Error, Result};
use crate::store::{OpKind, RunRow, RunStatus, Store};
use furnace_train::Spec;

/// The sections a clone of a training run may change.
const SECTIONS: [&str; 3] = ["lora", "trainer", "model"];
/// The sections a clone of an evals pipeline may change.
pub const EVAL_SECTIONS: [&str; 4] = ["rag", "prompt", "generator", "judge"];

/// Checks an evals pipeline's config after a clone's overrides (furnace-evals registers
/// it; without one, the driver's check when it applies the op is the only one).
pub type EvalsCheck = fn(&serde_json::Value) -> std::result::Result<(), String>;

static EVALS_CHECK: std::sync::OnceLock<EvalsCheck> = std::sync::OnceLock::new();

/// Registers the check of evals pipeline configs (done once by programs that link
/// furnace-evals).
pub fn register_evals_check(check: EvalsCheck) {
    let _ = EVALS_CHECK.set(check);
}

/// Whether a run's stored config is an evals pipeline's.
pub fn is_evals(config: &serde_json::Value) -> bool {
    config.pointer("/experiment/mode").and_then(|m| m.as_str()) == Some("evals")
}

/// Parses `section.key=value` (the value as TOML: `64`, `1e-4`, `true`, `"q4"`, or a bare
/// word taken as a string).
pub fn parse_set(s: &str) -> Result<(String, String, serde_json::Value)> {
    parse_set_in(s, &SECTIONS)
}

/// [`parse_set`] for a clone that may change the given sections.
pub fn parse_set_in(s: &str, sections: &[&str]) -> Result<(String, String, serde_json::Value)> {
    let example = if sections.contains(&"lora") { "lora.r=64" } else { "rag.k=8" };
    let bad = |m: &str| Error::Invalid(format!("--set {s}: {m} (expected section.key=value, e.g. {example})"));
    let (path, raw) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
    let (section, key) = path.trim().split_once('.').ok_or_else(|| bad("no section"))?;
    if !sections.contains(&section) {
        return Err(bad(&format!("'{section}' cannot be changed; a clone changes {} settings", sections.join(", "))));
    }
    let raw = raw.trim();
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").ok_or_else(|| bad("no value"))?,
        Err(_) if !raw.is_empty() => toml::Value::String(raw.to_string()),
        Err(_) => return Err(bad("no value")),
    };
    let value = serde_json::to_value(value).map_err(|e| bad(&e.to_string()))?;
    Ok((section.to_string(), key.trim().to_string(), value))
}

/// The spec of a run with `set` applied, validated (errors name the key).
pub fn apply_overrides(config: &serde_json::Value, set: &[String]) -> Result<Spec> {
    let c = override_json(config, set, &SECTIONS)?;
    let spec: Spec = serde_json::from_value(c).map_err(|e| Error::Invalid(format!("--set: {e}")))?;
    spec.validate()?;
    Ok(spec)
}

/// An evals pipeline's config with `set` applied, checked by the registered evals check.
pub fn apply_eval_overrides(config: &serde_json::Value, set: &[String]) -> Result<serde_json::Value> {
    let c = override_json(config, set, &EVAL_SECTIONS)?;
    if let Some(check) = EVALS_CHECK.get() {
        check(&c).map_err(|m| Error::Invalid(format!("--set: {m}")))?;
    }
    Ok(c)
}

/// `config` with each `section.key=value` of `set` in place; the key must be a setting of
/// the section.
fn override_json(config: &serde_json::Value, set: &[String], sections: &[&str]) -> Result<serde_json::Value> {
    let mut c = config.clone();
    for s in set {
        let (section, key, value) = parse_set_in(s, sections)?;
        let Some(obj) = c.get_mut(&section).and_then(|v| v.as_object_mut()) else {
            return Err(Error::Invalid(format!("--set {s}: the run's config has no [{section}]")));
        };
        // The DPO and GRPO settings are stored only when given (a default one is absent).
        let optional = section == "trainer" && furnace_train::spec::OPTIONAL_TRAINER_KEYS.contains(&key.as_str());
        if !obj.contains_key(&key) && !optional {
            let mut known: Vec<&str> = obj.keys().map(String::as_str).collect();
            if section == "trainer" {
                known.extend(furnace_train::spec::OPTIONAL_TRAINER_KEYS.iter().filter(|k| !obj.contains_key(**k)));
            }
            return Err(Error::Invalid(format!("--set {s}: {section}.{key} is not a setting (known: {known:?})")));
        }
        obj.insert(key, value);
    }
    Ok(c)
}

/// Checks that `op` can apply to `run` as it stands now (the trainer checks again when
/// it applies it, since the run may change in between).
pub fn check(run: &RunRow, op: &OpKind) -> Result<()> {
    let s = run.status;
    let fail = |m: String| Err(Error::Invalid(format!("run {}: {m}", run.id)));
    match op {
        OpKind::Stop if !s.is_active() => fail(format!("is {}; only a new or ongoing run can stop", s.as_str())),
        OpKind::Resume if s != RunStatus::Stopped => fail(format!("is {}; only a stopped run can resume", s.as_str())),
        OpKind::Delete if s == RunStatus::Deleted => fail("is already deleted".into()),
        OpKind::Clone { .. } if s == RunStatus::Deleted => fail("is deleted; it cannot be cloned".into()),
        OpKind::Clone { warm: true, .. } if is_evals(&run.config) => {
            fail("is an evals pipeline; its clones start at shard 0 (clone without --warm)".into())
        }
        OpKind::Clone { set, .. } if is_evals(&run.config) => apply_eval_overrides(&run.config, set).map(|_| ()),
        OpKind::Clone { set, warm } => {
            let spec = apply_overrides(&run.config, set)?;
            if *warm {
                let parent: Spec =
                    serde_json::from_value(run.config.clone()).map_err(|source| Error::StoredConfig { run: run.id, source })?;
                check_warm(&parent, &spec)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A warm clone continues the parent's adapter and data: rank, targets, base model and
/// its quantization must stay.
pub fn check_warm(parent: &Spec, child: &Spec) -> Result<()> {
    let why = if parent.lora.r != child.lora.r {
        Some(format!("lora.r {} -> {} changes the shape of the adapter's factors", parent.lora.r, child.lora.r))
    } else if parent.lora.targets != child.lora.targets {
        Some("lora.targets changes which layers have factors".to_string())
    } else if parent.model.base != child.model.base || parent.model.quantize != child.model.quantize {
        Some("the base model (or its quantization) changes what the adapter was trained on".to_string())
    } else if parent.trainer.max_seq_len != child.trainer.max_seq_len {
        Some("trainer.max_seq_len changes the examples".to_string())
    } else if parent.trainer.kind != child.trainer.kind {
        Some(format!("trainer.kind {} -> {} changes what the examples are (and their order)", parent.trainer.kind, child.trainer.kind))
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::Invalid(format!(
            "a warm clone continues its parent's adapter and optimizer state, but {w}: clone without --warm (cold) instead"
        ))),
        None => Ok(()),
    }
}

/// Checks and records an op (pending until the trainer applies it); returns its id.
pub fn submit(store: &Store, run_id: i64, op: &OpKind, source: &str) -> Result<i64> {
    let run = store.run(run_id)?;
    check(&run, op)?;
    store.add_op(run_id, op, source)
}
