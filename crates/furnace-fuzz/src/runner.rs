//! Running a target over many inputs: each input under `catch_unwind` (a panic is a
//! finding), timed (over the time limit is a finding), with the largest allocation it
//! asked for measured (over the cap is a finding), and its error message checked.

use crate::alloc;
use crate::rng::Rng;
use crate::targets::{Outcome, Target};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The limits one input runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longer than this is a finding ("slow").
    pub time: Duration,
    /// A single allocation request larger than this is a finding.
    pub alloc_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { time: Duration::from_secs(1), alloc_bytes: 256 << 20 }
    }
}

/// Why an input is a finding.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The parser panicked (the message and location).
    Panic(String),
    /// It took longer than the time limit.
    Slow(Duration),
    /// It asked for one allocation of this many bytes.
    Alloc(usize),
    /// Its error message is empty.
    EmptyError,
    /// The target reported wrong behaviour (e.g. a 500 answer).
    Bug(String),
}

/// One input that went wrong.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The input.
    pub input: Vec<u8>,
    /// What went wrong.
    pub kind: Kind,
}

/// What a run of one target did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Inputs run.
    pub runs: u64,
    /// Inputs accepted.
    pub oks: u64,
    /// Inputs rejected with a clean error.
    pub errs: u64,
    /// The findings (at most [`MAX_KEPT`] kept; `finding_count` counts all).
    pub findings: Vec<Finding>,
    /// Every finding, kept or not.
    pub finding_count: u64,
    /// The slowest input.
    pub slowest: Duration,
    /// The largest allocation any input asked for.
    pub largest_alloc: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// A few error messages, for the report.
    pub sample_errors: Vec<String>,
}

/// Findings kept per target (the rest are counted).
pub const MAX_KEPT: usize = 20;

/// What a watchdog sees of a running target: when the current input started (ms since
/// the run began, `u64::MAX` when idle) and the input itself.
#[derive(Debug, Default)]
pub struct Progress {
    /// Start of the current input in ms since `Progress` was made, `u64::MAX` when none.
    pub started_ms: AtomicU64,
    /// Inputs started so far.
    pub count: AtomicU64,
    /// The current input.
    pub input: Mutex<Vec<u8>>,
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static IN_INPUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Replaces the panic hook (once) with one that records the message and location for
/// the runner instead of printing it.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let msg = match (info.payload().downcast_ref::<&str>(), info.payload().downcast_ref::<String>()) {
                (Some(s), _) => s.to_string(),
                (_, Some(s)) => s.clone(),
                _ => "(non-string panic)".to_string(),
            };
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            if IN_INPUT.try_with(std::cell::Cell::get).unwrap_or(false) {
                let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
            } else {
                eprintln!("panic outside a fuzz input: {msg}{at}");
            }
        }));
    });
}

/// One input's result: its outcome or the finding, how long it took and the largest
/// allocation it asked for.
#[derive(Debug, Clone)]
pub struct Ran {
    /// `Ok(outcome)`, or why the input is a finding.
    pub result: Result<Outcome, Kind>,
    /// Wall time.
    pub took: Duration,
    /// The largest single allocation request, in bytes.
    pub largest_alloc: usize,
}

/// Runs one input and classifies it.
pub fn run_one(target: &Target, input: &[u8], limits: &Limits) -> Ran {
    install_panic_hook();
    alloc::reset();
    let t0 = Instant::now();
    IN_INPUT.with(|f| f.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    IN_INPUT.with(|f| f.set(false));
    let took = t0.elapsed();
    let largest = alloc::largest();
    let kind = match result {
        Err(_) => Some(Kind::Panic(LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "(no message)".into()))),
        Ok(_) if largest > limits.alloc_bytes => Some(Kind::Alloc(largest)),
        Ok(_) if took > limits.time => Some(Kind::Slow(took)),
        Ok(Outcome::Err(ref m)) if m.trim().is_empty() => Some(Kind::EmptyError),
        Ok(Outcome::Bug(ref m)) => Some(Kind::Bug(m.clone())),
        Ok(_) => None,
    };
    let result = match (kind, result) {
        (Some(k), _) => Err(k),
        (None, Ok(o)) => Ok(o),
        (None, Err(_)) => Err(Kind::Panic("(unclassified)".into())),
    };
    Ran { result, took, largest_alloc: largest }
}

/// Runs `iters` inputs of `target` from `seed`; `on_finding` sees each finding as it
/// happens, `progress` (when given) is kept up to date for a watchdog.
pub fn run_target(
    target: &Target,
    iters: u64,
    seed: u64,
    limits: &Limits,
    progress: Option<&Progress>,
    mut on_finding: impl FnMut(&Finding),
) -> Stats {
    let seeds = (target.seeds)();
    let mut rng = Rng::new(seed ^ fnv(target.name));
    let mut stats = Stats::default();
    let start = Instant::now();
    // For inputs that abort the process (a panic while unwinding, a stack overflow):
    // each input is written here before it runs, so the last one is the culprit.
    let trace = std::env::var_os("FURNACE_FUZZ_TRACE").map(std::path::PathBuf::from);
    for i in 0..iters {
        // The seeds themselves first, unmutated.
        let input = match seeds.get(i as usize) {
            Some(s) => s.clone(),
            None => target.input(&mut rng, &seeds),
        };
        if let Some(p) = progress {
            if let Ok(mut cur) = p.input.lock() {
                cur.clear();
                cur.extend_from_slice(&input);
            }
            p.started_ms.store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
            p.count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(t) = &trace {
            let _ = std::fs::write(t, &input);
        }
        let ran = run_one(target, &input, limits);
        stats.runs += 1;
        stats.slowest = stats.slowest.max(ran.took);
        stats.largest_alloc = stats.largest_alloc.max(ran.largest_alloc);
        match ran.result {
            Ok(Outcome::Ok) => stats.oks += 1,
            Ok(Outcome::Err(m)) => {
                stats.errs += 1;
                if stats.sample_errors.len() < 5 && !stats.sample_errors.iter().any(|s| s == &m) && rng.one_in(64) {
                    stats.sample_errors.push(m.chars().take(200).collect());
                }
            }
            Ok(Outcome::Bug(_)) => {}
            Err(kind) => {
                let f = Finding { input, kind };
                on_finding(&f);
                stats.finding_count += 1;
                if stats.findings.len() < MAX_KEPT {
                    stats.findings.push(f);
                }
            }
        }
    }
    if let Some(p) = progress {
        p.started_ms.store(u64::MAX, Ordering::SeqCst);
    }
    stats.elapsed = start.elapsed();
    stats
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
