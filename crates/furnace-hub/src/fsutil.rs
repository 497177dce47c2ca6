//! Small file-system helpers: unique scratch names, self-removing scratch
//! directories, hashing copies and clean-up of stale leftovers.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{io_err, Error, Result};

/// Prefix of staging directories inside `<root>/models/`.
pub(crate) const STAGING_PREFIX: &str = ".tmp-";
/// Prefix of directories being thrown away inside `<root>/models/`.
pub(crate) const TRASH_PREFIX: &str = ".trash-";
/// Prefix of pip download directories inside `<root>/tmp/`.
pub(crate) const DOWNLOAD_PREFIX: &str = "dl-";

/// Scratch entries older than this are assumed abandoned by a crashed process.
const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A name that is unique across processes and threads: `pid-nanos-counter`.
pub(crate) fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{}", std::process::id(), nanos, n)
}

/// A directory that is removed (with its contents) when dropped, unless
/// [`ScratchDir::disarm`] was called.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
    armed: bool,
}

impl ScratchDir {
    /// Creates a fresh, uniquely named directory `parent/<prefix><unique>`.
    pub(crate) fn create(parent: &Path, prefix: &str) -> Result<ScratchDir> {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        loop {
            let path = parent.join(format!("{prefix}{}", unique_suffix()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path, armed: true }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create directory", &path)(e)),
            }
        }
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory on drop (it was moved or is owned elsewhere now).
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Copies `reader` into a new file at `dest`, flushes it to disk and returns
/// the lowercase-hex SHA-256 and the byte count of what was written.
/// Errors reading from `reader` are mapped with `read_err`.
pub(crate) fn copy_hashing(reader: &mut dyn Read, dest: &Path, read_err: &dyn Fn(io::Error) -> Error) -> Result<(String, u64)> {
    let mut file = fs::File::create(dest).map_err(io_err("create", dest))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        let chunk = &buf[..n];
        hasher.update(chunk);
        file.write_all(chunk).map_err(io_err("write", dest))?;
        total += n as u64;
    }
    file.sync_all().map_err(io_err("flush", dest))?;
    Ok((to_hex(&hasher.finalize()), total))
}

/// Lowercase hex encoding.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Best effort: flushes a directory entry so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Best effort: removes entries of `dir` whose name starts with one of
/// `prefixes` and that were last modified more than a day ago.
pub(crate) fn remove_stale(dir: &Path, prefixes: &[&str]) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let old =
            entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age > STALE_AFTER);
        if old {
            let path = entry.path();
            if path.is_dir() {
                let _ = fs::remove_dir_all(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
}
