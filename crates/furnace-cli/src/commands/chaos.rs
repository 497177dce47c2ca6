//! `furnace bench chaos`: the soak test of experiment durability. An experiment trains in a
//! child `furnace run` that is SIGKILLed at random moments and started again each time,
//! while ops (stop, resume, warm and cold clones, delete) are recorded at random times;
//! at the end `furnace_exp::audit` checks the invariants, and every metric is compared with
//! an uninterrupted run of the same spec without ops (a run matched by its config: stops,
//! resumes and kills never change a run's trajectory, a cold clone made with another
//! run's knobs trains as that run, a warm clone without changes continues its parent).

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_exp::audit::{check, Audit};
use furnace_exp::{OpKind, RunStatus, Store};
use furnace_model::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct ChaosArgs {
    /// SIGKILLs of the driver, each at a random moment of its life.
    #[arg(long, default_value_t = 50)]
    kills: usize,
    /// Seed of the kill moments and the ops.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Model: alias, .gguf file or HF directory (small: the experiment trains twice).
    #[arg(long, short, default_value = "testdata/tiny-llama")]
    model: String,
    /// Training rows (the first `--rows` are used).
    #[arg(long, default_value = "data/extract/train.jsonl")]
    train: PathBuf,
    /// Eval rows (the first 8 are used).
    #[arg(long, default_value = "data/extract/eval.jsonl")]
    eval: PathBuf,
    /// Training rows.
    #[arg(long, default_value_t = 96)]
    rows: usize,
    /// Optimizer steps of each run.
    #[arg(long, default_value_t = 120)]
    steps: usize,
    /// The longest life of a driver before its kill, in milliseconds (each is uniform
    /// from 0 to this).
    #[arg(long, default_value_t = 1500)]
    max_life_ms: u64,
    /// Keep the experiment's folder here (default: a temporary folder, removed).
    #[arg(long)]
    keep: Option<PathBuf>,
}

const NAME: &str = "chaos";

fn rows(path: &Path, n: usize) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().take(n).map(|l| format!("{l}\n")).collect())
}

/// Four runs (r in {2, 4} x learning rate in {1e-2, 2e-2}), 4 chunks, an eval at each
/// chunk's end, a kept checkpoint every 10 steps; no policy (ASHA's stops would depend on
/// which clones exist when).
fn write_experiment(a: &ChaosArgs, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("train.jsonl"), rows(&a.train, a.rows)?)?;
    std::fs::write(dir.join("eval.jsonl"), rows(&a.eval, 8)?)?;
    let model = std::path::absolute(&a.model).ok().filter(|p| p.exists()).map(|p| p.display().to_string()).unwrap_or(a.model.clone());
    let spec = format!(
        "[experiment]\nname = \"{NAME}\"\nnum_chunks = 4\npolicy = \"none\"\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
         [model]\nbase = \"{}\"\n\n[lora]\nr = {{ list = [2, 4] }}\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\n\n\
         [trainer]\nlearning_rate = {{ list = [1e-2, 2e-2] }}\nbatch_size = 2\nmax_seq_len = 96\nmax_steps = {}\nsave_every = 10\n\
         schedule = \"constant\"\n",
        model.replace('\\', "/"),
        a.steps
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec)?;
    furnace_exp::Experiment::create(&dir.join("runs"), &path)?;
    Ok(dir.join("runs"))
}

/// The driver as a child process on the experiment in `runs`.
fn driver(runs: &Path) -> Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    Ok(Command::new(exe)
        .args(["run", "--experiment", NAME, "--no-server", "--threads", "1", "--runs-dir"])
        .arg(runs)
        .env_remove(furnace_hub::failpoint::FAILPOINT_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[derive(Default)]
struct OpCounts {
    submitted: usize,
    refused: usize,
}

/// One random op on a random run of the experiment, as `furnace ops` would record it.
fn random_op(store: &Store, exp: i64, rng: &mut Rng, counts: &mut OpCounts) -> Result<()> {
    let runs = store.runs(exp)?;
    if runs.is_empty() {
        return Ok(());
    }
    let pick = |rng: &mut Rng, n: usize| (rng.next_u64() % n as u64) as usize;
    let run = &runs[pick(rng, runs.len())];
    let spec_runs: Vec<_> = runs.iter().filter(|r| r.parent_id.is_none()).collect();
    let op = match pick(rng, 10) {
        0..=2 => OpKind::Stop,
        3..=5 => OpKind::Resume,
        6 | 7 => OpKind::Clone { set: Vec::new(), warm: true },
        8 => {
            // A cold clone with the knobs of a run of the spec trains as that run.
            let other = spec_runs[pick(rng, spec_runs.len())];
            let set =
                other.knobs.as_object().map(|k| k.iter().map(|(key, v)| format!("{key}={v}")).collect::<Vec<_>>()).unwrap_or_default();
            OpKind::Clone { set, warm: false }
        }
        _ => OpKind::Delete,
    };
    match furnace_exp::ops::submit(store, run.id, &op, "chaos") {
        Ok(_) => counts.submitted += 1,
        Err(_) => counts.refused += 1,
    }
    Ok(())
}

pub fn run(a: ChaosArgs) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let root = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let runs = write_experiment(&a, &root.join("chaos"))?;
    let store = Store::open_in(&runs)?;
    let exp = store.experiment(NAME)?;
    eprintln!("chaos: experiment in {}; {} kills, seed {}", runs.display(), a.kills, a.seed);

    // Ops at random times, from their own thread and store connection.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Mutex::new(OpCounts::default()));
    let ops_thread = {
        let (stop, counts, store, seed) = (stop.clone(), counts.clone(), store.reopen()?, a.seed);
        let max = a.max_life_ms;
        std::thread::spawn(move || -> Result<()> {
            let mut rng = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis((rng.uniform(0.0, 2.0) * max as f64) as u64));
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut c = counts.lock().map_err(|_| anyhow::anyhow!("op counts poisoned"))?;
                random_op(&store, exp.id, &mut rng, &mut c)?;
            }
            Ok(())
        })
    };

    let mut rng = Rng::new(a.seed);
    let (mut kills, mut lives, mut finished_early) = (0usize, 0usize, 0usize);
    while kills < a.kills {
        let mut child = driver(&runs)?;
        lives += 1;
        let life = Duration::from_millis((rng.uniform(0.0, 1.0) * a.max_life_ms as f64) as u64);
        let deadline = Instant::now() + life;
        let mut exited = None;
        while Instant::now() < deadline {
            if let Some(s) = child.try_wait()? {
                exited = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match exited {
            None => {
                child.kill()?;
                child.wait()?;
                kills += 1;
            }
            Some(s) if s.success() => {
                finished_early += 1;
                if finished_early > 3 {
                    // Nothing left to train: more kills would kill an idle driver.
                    eprintln!("chaos: the experiment finished after {kills} kills; use more --steps for more");
                    break;
                }
            }
            Some(s) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("the driver failed ({s}) after {kills} kills: {err}");
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    ops_thread.join().map_err(|_| anyhow::anyhow!("the ops thread panicked"))??;
    // Every stopped run resumes, so every run that is not deleted completes.
    let mut resumed = 0;
    for r in store.runs(exp.id)? {
        if r.status == RunStatus::Stopped {
            furnace_exp::ops::submit(&store, r.id, &OpKind::Resume, "chaos")?;
            resumed += 1;
        }
    }
    let out = driver(&runs)?.wait_with_output()?;
    lives += 1;
    if !out.status.success() {
        bail!("the last driver failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let chaos_wall = t0.elapsed();

    // The reference: the same spec, uninterrupted, without ops.
    let ref_runs = write_experiment(&a, &root.join("reference"))?;
    let out = driver(&ref_runs)?.wait_with_output()?;
    if !out.status.success() {
        bail!("the reference run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rstore = Store::open_in(&ref_runs)?;
    let rexp = rstore.experiment(NAME)?;
    let mut violations = check(&store, &exp, &Audit { reference: Some((&rstore, &rexp)), strict: false, rel_tol: 1e-6 })?;
    let final_runs = store.runs(exp.id)?;
    for r in &final_runs {
        if !matches!(r.status, RunStatus::Completed | RunStatus::Deleted) {
            violations.push(format!("run {}: ended {}", r.id, r.status.as_str()));
        }
    }
    let ops = store.ops(exp.id)?;
    let count = |s: &str| ops.iter().filter(|o| o.status == s && o.source == "chaos").count();
    let c = counts.lock().map_err(|_| anyhow::anyhow!("op counts poisoned"))?;
    let steps: i64 = final_runs.iter().map(|r| r.steps_done).sum();
    let metrics = store.experiment_metrics(exp.id)?.len();
    println!("chaos: {kills} SIGKILLs, {lives} driver starts ({finished_early} lives ended on their own)");
    println!(
        "ops: {} recorded at random times + {resumed} resumes at the end, {} refused when recorded; {} applied, {} rejected when applied",
        c.submitted,
        c.refused,
        count("applied"),
        count("rejected")
    );
    let by = |s: RunStatus| final_runs.iter().filter(|r| r.status == s).count();
    println!(
        "runs: {} ({} completed, {} deleted), {} optimizer steps, {metrics} metric rows",
        final_runs.len(),
        by(RunStatus::Completed),
        by(RunStatus::Deleted),
        steps
    );
    println!("wall: {:.1} s under chaos, {:.1} s with the reference", chaos_wall.as_secs_f64(), t0.elapsed().as_secs_f64());
    println!("invariant violations: {}", violations.len());
    for v in violations.iter().take(50) {
        println!("  {v}");
    }
    if !violations.is_empty() {
        bail!("{} invariant violations", violations.len());
    }
    Ok(())
}
