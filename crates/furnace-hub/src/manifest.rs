//! The `furnace-model.json` manifest: written into a model directory as the
//! last step of a pull, its presence (and agreement with the alias table)
//! is what marks the directory as complete.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::alias::{Alias, ModelFormat, ModelKind};
use crate::error::{io_err, Result};

/// File name of the manifest inside a model directory.
pub(crate) const MANIFEST_FILE: &str = "furnace-model.json";

/// One verified file of a cached model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestFile {
    /// Path relative to the model directory, `/`-separated.
    pub path: String,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Contents of `furnace-model.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// Alias the directory holds.
    pub alias: String,
    /// Python package the files came from.
    pub package: String,
    /// Package version the files came from.
    pub version: String,
    /// Storage format.
    pub format: ModelFormat,
    /// Model kind.
    pub kind: ModelKind,
    /// Entry point relative to the model directory (empty: the directory).
    pub main: String,
    /// Every extracted file with its checksum and size.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Reads and parses the manifest of `dir`; `None` if absent or unreadable.
    pub(crate) fn read(dir: &Path) -> Option<Manifest> {
        let bytes = fs::read(dir.join(MANIFEST_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Writes the manifest into `dir` and flushes it to disk.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| crate::Error::Io {
            action: "serialize manifest",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        let mut file = fs::File::create(&path).map_err(io_err("create", &path))?;
        file.write_all(&bytes).map_err(io_err("write", &path))?;
        file.sync_all().map_err(io_err("flush", &path))?;
        Ok(())
    }

    /// True when this manifest describes exactly `alias` and every file it
    /// lists is present in `dir` with the recorded size. Does not hash.
    pub(crate) fn is_complete_for(&self, alias: &Alias, dir: &Path) -> bool {
        if self.alias != alias.name
            || self.package != alias.package
            || self.version != alias.version
            || self.format != alias.format
            || self.main != alias.main
        {
            return false;
        }
        let listed = |f: &crate::alias::AliasFile| self.files.iter().any(|m| m.path == f.path && m.sha256.eq_ignore_ascii_case(f.sha256));
        if !alias.files.iter().all(listed) {
            return false;
        }
        self.files.iter().all(|m| fs::metadata(dir.join(&m.path)).map(|md| md.is_file() && md.len() == m.size).unwrap_or(false))
    }
}
