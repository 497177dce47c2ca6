//! Crash injection for tests and `furnace bench chaos`: named points at every durable
//! write, where the process can be made to die as a `kill -9` would.
//!
//! [`hit`]`("name")` does nothing unless the environment says so:
//!
//! - `FURNACE_FAILPOINT=name` or `name:N`: the N-th hit (1-based, default 1) of the point
//!   `name` in this process prints `furnace: failpoint NAME hit N, aborting` to stderr and
//!   calls [`std::process::abort`] (no destructors, no buffered writes flushed: what is on
//!   disk is what a crash leaves).
//! - `FURNACE_FAILPOINT_LOG=FILE`: every hit appends the point's name as a line to `FILE`,
//!   so a test learns which points a real run passes and how often.
//!
//! The environment is read once; with neither set a hit costs one `OnceLock` read. Point
//! names are stable and say where they are (`store.record_step.after_commit`,
//! `checkpoint.after_rename`); the crash tests check the list a reference run hits.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The variable that arms a point: `name` or `name:N`.
pub const FAILPOINT_ENV: &str = "FURNACE_FAILPOINT";
/// The variable naming a file every hit is appended to.
pub const FAILPOINT_LOG_ENV: &str = "FURNACE_FAILPOINT_LOG";

struct Config {
    armed: Option<(String, u64)>,
    count: AtomicU64,
    log: Option<Mutex<std::fs::File>>,
}

fn config() -> Option<&'static Config> {
    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let armed = std::env::var(FAILPOINT_ENV).ok().filter(|v| !v.is_empty()).map(|v| parse(&v));
            let log = std::env::var_os(FAILPOINT_LOG_ENV)
                .filter(|v| !v.is_empty())
                .and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok())
                .map(Mutex::new);
            (armed.is_some() || log.is_some()).then(|| Config { armed, count: AtomicU64::new(0), log })
        })
        .as_ref()
}

/// `name` or `name:N` as (name, N); N defaults to 1 (and a bad N is read as 1).
pub fn parse(spec: &str) -> (String, u64) {
    match spec.rsplit_once(':') {
        Some((name, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => (name.to_string(), n.parse().unwrap_or(1).max(1)),
        _ => (spec.to_string(), 1),
    }
}

/// Whether any point is armed or logged (so a caller can skip building a point's name).
pub fn active() -> bool {
    config().is_some()
}

/// Passes the point `name`: logged when `FURNACE_FAILPOINT_LOG` is set; the process aborts
/// here when `FURNACE_FAILPOINT` arms this point and this is its armed hit.
pub fn hit(name: &str) {
    let Some(c) = config() else { return };
    if let Some(log) = &c.log {
        if let Ok(mut f) = log.lock() {
            let _ = writeln!(f, "{name}");
        }
    }
    if let Some((armed, n)) = &c.armed {
        if armed == name {
            let k = c.count.fetch_add(1, Ordering::SeqCst) + 1;
            if k == *n {
                eprintln!("furnace: failpoint {name} hit {k}, aborting");
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn a_point_is_a_name_and_an_optional_hit_number() {
        assert_eq!(parse("store.record_step.after_commit"), ("store.record_step.after_commit".into(), 1));
        assert_eq!(parse("checkpoint.after_rename:3"), ("checkpoint.after_rename".into(), 3));
        assert_eq!(parse("a:0"), ("a".into(), 1));
        assert_eq!(parse("a:b"), ("a:b".into(), 1));
    }
}
