//! The compute thread count, fixed once at start.
//!
//! candle and rayon read the thread count from the environment; when it is unset, candle
//! asks for the physical core count on every matmul (which parses /proc/cpuinfo each time).
//! Setting it once, before any compute thread exists, removes that cost and makes runs
//! reproducible.

/// Physical cores of this machine.
pub fn physical_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(physical_core_count().unwrap_or(usize::MAX)).max(1)
}

fn physical_core_count() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in text.lines() {
        let mut kv = line.splitn(2, ':');
        let k = kv.next()?.trim();
        let v = kv.next().map(str::trim).unwrap_or("");
        match k {
            "physical id" => phys = v.parse::<usize>().ok(),
            "core id" => core = v.parse::<usize>().ok(),
            "" => {
                if let (Some(p), Some(c)) = (phys, core) {
                    cores.insert((p, c));
                }
                phys = None;
                core = None;
            }
            _ => {}
        }
    }
    if let (Some(p), Some(c)) = (phys, core) {
        cores.insert((p, c));
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Fixes the compute thread count for this process. Call it first thing in `main`, before
/// any thread is spawned (it sets environment variables that candle and rayon read once).
pub fn configure_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}
