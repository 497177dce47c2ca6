//! Loading models by name for the commands: the library resolves and loads
//! (`furnace_model::load_by_name`); a pull reports its progress on stderr.

use anyhow::Result;
use furnace_hub::Cache;
use furnace_model::{LoadedModel, WeightDType};

/// Opens the cache.
pub fn cache() -> Result<Cache> {
    Ok(Cache::from_env()?)
}

/// Resolves and loads a model, pulling an alias that is not cached yet.
pub fn load(name: &str, dtype: WeightDType) -> Result<LoadedModel> {
    Ok(furnace_model::load_by_name(name, dtype, &mut |msg| eprintln!("{msg}"))?)
}
