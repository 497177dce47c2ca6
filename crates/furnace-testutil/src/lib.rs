//! Helpers that furnace's integration tests share: where the repository's fixtures are,
//! reading JSONL fixture files, and the real model from the furnace cache.
//!
//! A dev-dependency only: nothing here is part of furnace's library surface. Test code may
//! panic, so these helpers do (with a message that says what to fix) instead of returning
//! errors.
#![deny(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

/// The alias of the default chat model that the real-model tests use.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The repository's root folder: above the tested crate's folder (cargo sets
/// `CARGO_MANIFEST_DIR` when it runs a test), else above this crate's as it was compiled.
/// Read at run time so that worktrees sharing one target folder each find their own files.
pub fn repo_root() -> PathBuf {
    let from_env = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    for start in from_env.into_iter().chain([PathBuf::from(env!("CARGO_MANIFEST_DIR"))]) {
        if let Some(root) = start.ancestors().find(|d| d.join("Cargo.lock").is_file() && d.join("crates").is_dir()) {
            return root.to_path_buf();
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The repository's `testdata/` folder (fixtures from the reference implementations).
pub fn testdata() -> PathBuf {
    repo_root().join("testdata")
}

/// The SmolLM2 GGUF from the furnace cache. Fails loudly when it is missing: the test
/// command of README.md (`./scripts/test.sh`) pulls it first.
pub fn smollm2_gguf() -> PathBuf {
    cached(DEFAULT_MODEL)
}

/// The path of a cached alias, or a panic that says how to fetch it.
fn cached(alias: &str) -> PathBuf {
    let cache = furnace_hub::Cache::from_env().expect("open the furnace cache");
    match cache.cached(alias) {
        Some(loc) => loc.path().to_path_buf(),
        None => panic!(
            "{alias} is not cached in {}: run `cargo run --release --bin furnace -- model pull {alias}` (the README's test command does this)",
            cache.root().display()
        ),
    }
}

/// The alias of the default sentence encoder that the retrieval tests use.
pub const DEFAULT_ENCODER: &str = "all-minilm-l6-v2";

/// The all-MiniLM-L6-v2 folder from the furnace cache. Fails loudly when it is missing:
/// the test command of README.md (`./scripts/test.sh`) pulls it first.
pub fn minilm_dir() -> PathBuf {
    cached(DEFAULT_ENCODER)
}

/// The rows of a JSONL file under `testdata/`.
pub fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = testdata().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("fixture json")).collect()
}

/// A JSON array of token ids under `key`.
pub fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key].as_array().unwrap_or_else(|| panic!("fixture: '{key}' is not an array")).iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
