//! Resolving and loading models by name for the commands.

use anyhow::{Context, Result};
use furnace_hub::{Cache, ModelLocation};
use furnace_model::{LoadedModel, WeightDType};
use std::path::PathBuf;

/// Opens the cache.
pub fn cache() -> Result<Cache> {
    Ok(Cache::from_env()?)
}

/// Resolves a model name to a path, pulling aliases that are not cached yet.
pub fn resolve(name: &str) -> Result<ModelLocation> {
    let cache = cache()?;
    if let Some(loc) = cache.cached(name) {
        return Ok(loc);
    }
    Ok(cache.resolve_or_pull(name, &mut |msg| eprintln!("{msg}"))?)
}

/// Resolves and loads a model.
pub fn load(name: &str, dtype: WeightDType) -> Result<LoadedModel> {
    let loc = resolve(name)?;
    let path = loc.path().to_path_buf();
    LoadedModel::load(&path, dtype).with_context(|| format!("loading {}", path.display()))
}

/// Loads a model and attaches a PEFT adapter if one is given.
pub fn load_with_adapter(name: &str, dtype: WeightDType, adapter: Option<&PathBuf>) -> Result<LoadedModel> {
    let mut loaded = load(name, dtype)?;
    if let Some(dir) = adapter {
        let a = furnace_model::PeftAdapter::load(dir).with_context(|| format!("loading adapter {}", dir.display()))?;
        loaded.model.attach_adapter(&a)?;
    }
    Ok(loaded)
}
