//! `Cache::from_env`. The only test in this binary, so changing the
//! process environment cannot race with other tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;

use furnace_hub::{Cache, DEFAULT_PYTHON, HOME_ENV, PYTHON_ENV};

#[test]
fn from_env_reads_home_and_python() {
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var(HOME_ENV, tmp.path());
    std::env::set_var(PYTHON_ENV, "custom-python3");
    let cache = Cache::from_env().unwrap();
    assert_eq!(cache.root(), tmp.path());
    assert_eq!(cache.python(), OsStr::new("custom-python3"));

    // Empty values count as unset.
    std::env::set_var(PYTHON_ENV, "");
    assert_eq!(Cache::from_env().unwrap().python(), OsStr::new(DEFAULT_PYTHON));
    std::env::remove_var(PYTHON_ENV);
    std::env::remove_var(HOME_ENV);
    if let Some(dir) = dirs::cache_dir() {
        assert_eq!(Cache::from_env().unwrap().root(), dir.join("furnace"));
    }
}
