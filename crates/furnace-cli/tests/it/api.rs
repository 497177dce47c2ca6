//! `furnace run`'s API token: from `--token`, `--token-file` or `FURNACE_TOKEN`, checked
//! before anything is created, and never printed. (A missing spec stops each command
//! right after the token is settled, so no server starts and nothing trains.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// `furnace run missing.toml ARGS` in `dir` with `FURNACE_TOKEN` as given: its stderr
/// (the command must fail).
fn run(dir: &Path, env_token: Option<&str>, args: &[&str]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_furnace"));
    c.current_dir(dir).args(["run", "missing.toml", "--port", "0"]).args(args).env_remove("FURNACE_TOKEN");
    if let Some(t) = env_token {
        c.env("FURNACE_TOKEN", t);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    err
}

#[test]
fn run_takes_the_token_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = "file-secret-91b7";
    std::fs::write(d.join("token"), format!("{secret}\n")).unwrap();
    std::fs::write(d.join("empty"), "\n").unwrap();
    let open = ["--host", "0.0.0.0"];

    // Off loopback without a token: refused before anything else.
    let err = run(d, None, &open);
    assert!(err.contains("needs --token") && !err.contains("missing.toml"), "{err}");

    // Unusable token sources are errors that name them.
    let err = run(d, None, &["--token-file", "nofile"]);
    assert!(err.contains("--token-file nofile"), "{err}");
    let err = run(d, Some("env-secret-3c2d"), &["--token-file", "empty"]);
    assert!(err.contains("--token-file empty") && err.contains("empty"), "{err}");
    let err = run(d, Some(""), &[]);
    assert!(err.contains("FURNACE_TOKEN is set but empty"), "{err}");
    assert!(!d.join("runs").exists(), "nothing is created with a bad token source");

    // A token from the file or the environment passes that check (the missing spec is next).
    for (env, extra) in [(None, vec!["--token-file", "token"]), (Some("env-secret-3c2d"), vec![]), (Some(""), vec!["--token", "flag"])] {
        let args: Vec<&str> = open.iter().copied().chain(extra.iter().copied()).collect();
        let err = run(d, env, &args);
        assert!(err.contains("missing.toml") && !err.contains("--token"), "{env:?} {args:?}: {err}");
        assert!(!err.contains(secret) && !err.contains("env-secret"), "{err}");
    }
}
