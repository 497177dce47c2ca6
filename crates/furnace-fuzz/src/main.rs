//! `furnace-fuzz`: runs the parser targets over seeded, mutated and crafted inputs and
//! reports per target the inputs run, clean errors, accepted inputs, findings (panics,
//! slow inputs, huge allocations, empty error messages, 5xx answers; each saved as a
//! reproducer) and the rate. Exits non-zero on any finding.

use anyhow::{bail, Context};
use furnace_fuzz::alloc::CountingAlloc;
use furnace_fuzz::{run_one, run_target, Finding, Kind, Limits, Progress};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const USAGE: &str = "usage: furnace-fuzz [--target NAME|all] [--iters N] [--seed S] [--time-limit-ms MS] [--alloc-cap-mib MIB]
                    [--hang-ms MS] [--out DIR] [--list] [--replay FILE]
  --target       a target name (see --list) or all (default all); may be given several times
  --iters        inputs per target (default 10000)
  --seed         PRNG seed (default 1)
  --time-limit-ms  an input slower than this is a finding (default 1000)
  --alloc-cap-mib  one allocation larger than this is a finding (default 256)
  --hang-ms      an input still running after this is a hang: it is saved and the run stops (default 30000)
  --out          where findings are saved (default target/fuzz-findings)
  --replay FILE  run one saved input of --target NAME and print what it does";

struct Args {
    targets: Vec<String>,
    iters: u64,
    seed: u64,
    limits: Limits,
    hang: Duration,
    out: PathBuf,
    list: bool,
    replay: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        targets: Vec::new(),
        iters: 10_000,
        seed: 1,
        limits: Limits::default(),
        hang: Duration::from_secs(30),
        out: PathBuf::from("target/fuzz-findings"),
        list: false,
        replay: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--target" => a.targets.push(value()?),
            "--iters" => a.iters = value()?.parse().context("--iters")?,
            "--seed" => a.seed = value()?.parse().context("--seed")?,
            "--time-limit-ms" => a.limits.time = Duration::from_millis(value()?.parse().context("--time-limit-ms")?),
            "--alloc-cap-mib" => a.limits.alloc_bytes = value()?.parse::<usize>().context("--alloc-cap-mib")? << 20,
            "--hang-ms" => a.hang = Duration::from_millis(value()?.parse().context("--hang-ms")?),
            "--out" => a.out = PathBuf::from(value()?),
            "--replay" => a.replay = Some(PathBuf::from(value()?)),
            "--list" => a.list = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'\n{USAGE}"),
        }
    }
    Ok(a)
}

fn save(out: &Path, target: &str, f: &Finding) -> anyhow::Result<PathBuf> {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir)?;
    let kind = match f.kind {
        Kind::Panic(_) => "panic",
        Kind::Slow(_) => "slow",
        Kind::Alloc(_) => "alloc",
        Kind::EmptyError => "empty-error",
        Kind::Bug(_) => "bug",
    };
    let hash = f.input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("{kind}-{hash:016x}.bin"));
    std::fs::write(&path, &f.input)?;
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    // Chat templates render in worker processes of this program, as in `furnace`.
    if std::env::args_os().nth(1).is_some_and(|a| a == furnace_text::sandbox::WORKER_ARG) {
        std::process::exit(furnace_text::sandbox::serve_worker());
    }
    furnace_text::sandbox::install(std::env::current_exe()?);
    // candle captures a backtrace into every error when these are set, which makes
    // rejecting an input a hundred times slower; measure what users run.
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
    let args = parse_args()?;
    let all = furnace_fuzz::all();
    if args.list {
        for t in &all {
            println!("{:<16} {}", t.name, t.entry);
        }
        return Ok(());
    }
    let wanted: Vec<&str> = if args.targets.is_empty() || args.targets.iter().any(|t| t == "all") {
        all.iter().map(|t| t.name).collect()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    for w in &wanted {
        if !all.iter().any(|t| t.name == *w) {
            bail!("unknown target '{w}' (see --list)");
        }
    }
    if let Some(file) = &args.replay {
        let input = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        for t in all.iter().filter(|t| wanted.contains(&t.name)) {
            let ran = run_one(t, &input, &args.limits);
            println!("{}: {:?} in {:?}, largest allocation {} bytes", t.name, ran.result, ran.took, ran.largest_alloc);
        }
        return Ok(());
    }
    println!(
        "seed {}, {} inputs per target, time limit {:?}, allocation cap {} MiB",
        args.seed,
        args.iters,
        args.limits.time,
        args.limits.alloc_bytes >> 20
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}",
        "target", "inputs", "errors", "oks", "findings", "inputs/s", "wall s", "slowest", "max alloc"
    );
    let mut total_findings = 0;
    for t in all.into_iter().filter(|t| wanted.contains(&t.name)) {
        let name = t.name;
        let progress = Arc::new(Progress { started_ms: u64::MAX.into(), ..Default::default() });
        let (iters, seed, limits, out) = (args.iters, args.seed, args.limits, args.out.clone());
        let p = Arc::clone(&progress);
        // The stack of a main thread: a parser that overflows it would overflow in furnace.
        let worker = std::thread::Builder::new().name(name.into()).stack_size(8 << 20).spawn(move || {
            run_target(&t, iters, seed, &limits, Some(&p), |f| match save(&out, name, f) {
                Ok(path) => eprintln!("FINDING {name}: {:?} → {}", f.kind, path.display()),
                Err(e) => eprintln!("FINDING {name}: {:?} (not saved: {e})", f.kind),
            })
        })?;
        let start = Instant::now();
        let mut reported = Instant::now();
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
            if reported.elapsed() > Duration::from_secs(60) {
                reported = Instant::now();
                eprintln!("progress {name}: {} inputs in {:.0} s", progress.count.load(Ordering::Relaxed), start.elapsed().as_secs_f64());
            }
            let began = progress.started_ms.load(Ordering::SeqCst);
            if began != u64::MAX && start.elapsed().as_millis() as u64 > began.saturating_add(args.hang.as_millis() as u64) {
                let input = progress.input.lock().map(|i| i.clone()).unwrap_or_default();
                let f = Finding { input, kind: Kind::Slow(args.hang) };
                let path = save(&args.out, name, &f)?;
                eprintln!("HANG {name}: an input ran over {:?}; saved to {}", args.hang, path.display());
                furnace_fuzz::http::cleanup();
                std::process::exit(2);
            }
        }
        let stats = worker.join().map_err(|_| anyhow::anyhow!("the {name} worker panicked outside an input"))?;
        let rate = stats.runs as f64 / stats.elapsed.as_secs_f64().max(1e-9);
        println!(
            "{:<16} {:>10} {:>10} {:>10} {:>9} {:>10.0} {:>9.1} {:>8.0}ms {:>7}MiB",
            name,
            stats.runs,
            stats.errs,
            stats.oks,
            stats.finding_count,
            rate,
            stats.elapsed.as_secs_f64(),
            stats.slowest.as_secs_f64() * 1000.0,
            stats.largest_alloc >> 20
        );
        for e in &stats.sample_errors {
            println!("    e.g. {e}");
        }
        total_findings += stats.finding_count;
    }
    furnace_fuzz::http::cleanup();
    if total_findings > 0 {
        eprintln!("{total_findings} findings, saved under {}", args.out.display());
        std::process::exit(1);
    }
    Ok(())
}
