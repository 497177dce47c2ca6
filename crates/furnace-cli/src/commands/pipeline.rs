//! `furnace pipeline SPEC.toml`: stage pipelines (prepare → train → merge → eval → serve),
//! each stage a furnace command run as a child process in its own attempt folder, with its
//! log and its inputs' hashes. A rerun skips finished stages whose inputs did not change,
//! resumes an interrupted one in place (train continues from its last checkpoint), and runs
//! a changed stage and every later one again; `--from STAGE` restarts from a stage.
//! The spec, the wiring and the folders: `crate::stages`; docs/pipeline.md.

use crate::stages::{self as pl, Kind, PipelineSpec, StageState, Status, Upstream, Upstreams, Wired};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs a stage pipeline: each stage (prepare, train, merge, eval, serve) is a furnace
/// command run in its own folder, `<runs>/pipelines/<name>/<stage>/attempt-N/`, with
/// `stage.json` (status, command, input hashes, outputs), `log.txt` and a `latest` pointer.
///
/// A rerun skips the finished stages whose inputs (their table, the files they read, the
/// stages they take from) did not change, resumes an interrupted stage in its folder
/// (training continues from its last checkpoint), and runs a changed stage and every
/// later one again. Ctrl-C stops the running stage; run the same command to continue.
///
/// Examples:
///
///   furnace pipeline examples/pipeline.toml
///
///   furnace pipeline examples/pipeline.toml --status
///
///   furnace pipeline examples/pipeline.toml --from merge
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct PipelineArgs {
    /// The pipeline spec (TOML): `[pipeline] name, stages = ["prepare", "train", "merge",
    /// "eval"]` and one table per stage whose keys are that command's flags (docs/pipeline.md).
    spec: PathBuf,
    /// Start again from this stage: new attempts for it and every stage after it (the
    /// stages before it are skipped when finished and unchanged).
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,
    /// Print each stage's state and what a run would do (skip, resume, run and why); run
    /// nothing.
    #[arg(long, visible_alias = "dry-run")]
    status: bool,
    /// Folder that holds `pipelines/<name>/` (default: [pipeline] runs_dir, else `runs`).
    #[arg(long)]
    runs_dir: Option<PathBuf>,
    /// Echo every line the stages print (default: a status line per stage, and the end of
    /// the log when a stage fails).
    #[arg(long, short)]
    verbose: bool,
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Whether process `pid` is alive and its command line contains `marker` (on Linux; where
/// there is no /proc, whether it is alive).
fn alive(pid: u32, marker: &str) -> bool {
    if Path::new("/proc/self").exists() {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // A zombie (state Z) has ended.
            if stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')) {
                return false;
            }
        }
        let text: String = cmd.iter().map(|&b| if b == 0 { ' ' } else { b as char }).collect();
        return text.contains(marker);
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends a signal (`TERM`, `KILL`) to a process.
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([format!("-{sig}"), pid.to_string()]).stderr(std::process::Stdio::null()).status();
}

/// Stops a stage process a killed pipeline left running (SIGTERM: train stops after its
/// current step and keeps its checkpoints), waiting for it to end.
fn stop_orphan(pid: u32, marker: &str, stage: &str) {
    if !alive(pid, marker) {
        return;
    }
    eprintln!("stage {stage}: its process (pid {pid}) outlived the pipeline that started it; stopping it first");
    signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(120);
    while alive(pid, marker) {
        if Instant::now() > deadline {
            signal(pid, "KILL");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a run does with a stage.
enum Action {
    /// Finished and unchanged.
    Skip(StageState),
    /// An earlier attempt (not the latest) finished with these same inputs: it becomes the
    /// latest again, and nothing runs.
    Reuse(StageState),
    /// A new attempt, and why.
    New(String),
    /// Continue the interrupted attempt in its folder, and why.
    Resume(StageState, String),
}

/// [`decide`], then, for a stage that would run anew, an earlier attempt that finished with
/// the same inputs (a failed or changed attempt whose inputs went back) is reused.
fn choose(root: &Path, st: &pl::Stage, forced: bool, latest: Option<StageState>, inputs: &pl::Inputs, digest: &str) -> Result<Action> {
    let action = decide(st.kind, forced, latest, inputs, digest);
    if matches!(action, Action::New(_)) && !forced && st.kind != Kind::Serve {
        if let Some(s) = pl::finished_with(root, &st.name, digest)? {
            return Ok(Action::Reuse(s));
        }
    }
    Ok(action)
}

fn decide(kind: Kind, forced: bool, latest: Option<StageState>, inputs: &pl::Inputs, digest: &str) -> Action {
    if kind == Kind::Serve {
        return Action::New("serve runs every time".into());
    }
    if forced {
        return Action::New("--from".into());
    }
    let Some(s) = latest else { return Action::New("never run".into()) };
    // A finished attempt whose outputs were deleted since (an adapter removed with
    // `furnace adapters rm --delete-files`, a cleaned folder) is done again.
    let gone = s.missing_output();
    match s.status {
        Status::Done if s.inputs_sha256 == digest => match gone {
            Some((k, p)) => Action::New(format!("attempt-{}'s {k} is gone ({p})", s.attempt)),
            None => Action::Skip(s),
        },
        Status::Done => Action::New(format!("inputs changed: {}", inputs.changes(&s.inputs))),
        Status::Running | Status::Interrupted if s.inputs_sha256 == digest => {
            let why = match (kind, s.status) {
                (Kind::Train, Status::Running) => {
                    "attempt-{n} was cut off (its pipeline was killed): continuing it from its last checkpoint"
                }
                (Kind::Train, _) => "attempt-{n} was interrupted: continuing it from its last checkpoint",
                (_, Status::Running) => "attempt-{n} was cut off (its pipeline was killed): doing it again in its folder",
                _ => "attempt-{n} was interrupted: doing it again in its folder",
            };
            let why = why.replace("{n}", &s.attempt.to_string());
            Action::Resume(s, why)
        }
        Status::Running | Status::Interrupted => {
            Action::New(format!("attempt-{} did not finish and its inputs changed: {}", s.attempt, inputs.changes(&s.inputs)))
        }
        Status::Failed => Action::New(format!("attempt-{} failed", s.attempt)),
        Status::Stopped => Action::New("serve runs every time".into()),
    }
}

pub fn run(a: PipelineArgs) -> Result<()> {
    let spec = PipelineSpec::load(&a.spec)?;
    pl::check_flags(&spec, &crate::check_args)?;
    let from = a.from.as_deref().map(|f| spec.position(f)).transpose()?;
    let runs_dir = a.runs_dir.clone().or_else(|| spec.runs_dir.clone()).unwrap_or_else(|| PathBuf::from("runs"));
    // Absolute, so the paths stages record stay valid from any folder.
    let runs_dir = if runs_dir.is_absolute() { runs_dir } else { std::env::current_dir()?.join(runs_dir) };
    let root = runs_dir.join("pipelines").join(&spec.name);
    let lock = root.join("pipeline.pid");
    // A pid file names the pipeline running this spec's folders; one left by a killed
    // pipeline is stale.
    let running = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && alive(pid, "pipeline"));
    if a.status {
        if let Some(pid) = running {
            println!("(process {pid} is running this pipeline now)");
        }
        return status(&spec, &root, from);
    }
    if let Some(pid) = running {
        bail!("pipeline {} is being run by process {pid} ({}); wait for it or stop it", spec.name, root.display());
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    pl::write_whole(&lock, &format!("{}\n", std::process::id()))?;
    std::fs::copy(&spec.path, root.join("pipeline.toml")).with_context(|| format!("copying {}", spec.path.display()))?;
    let cancel = crate::interrupt::install_saying("interrupting: the running stage is asked to stop (Ctrl-C again to exit at once)")?;
    let result = run_stages(&a, &spec, &root, from, &cancel);
    let _ = std::fs::remove_file(&lock);
    result
}

/// `--status`: each stage's latest attempt and what a run would do.
fn status(spec: &PipelineSpec, root: &Path, from: Option<usize>) -> Result<()> {
    println!("pipeline {} ({})", spec.name, root.display());
    let mut ups = Upstreams::new();
    let mut rerun: Option<String> = None;
    let mut out = std::io::stdout().lock();
    for (i, st) in spec.stages.iter().enumerate() {
        let latest = pl::latest(root, &st.name)?;
        let state = latest.as_ref().map(|s| format!("{} (attempt-{})", s.status.as_str(), s.attempt)).unwrap_or_else(|| "not run".into());
        let action = if let Some(after) = &rerun {
            if st.kind == Kind::Serve {
                "run: serve runs every time".to_string()
            } else {
                format!("run: after {after}")
            }
        } else {
            match pl::wire(spec, i, &ups) {
                Err(e) => format!("cannot run: {e:#}"),
                Ok(w) => {
                    let digest = w.inputs.digest();
                    match choose(root, st, from.is_some_and(|f| i >= f), latest, &w.inputs, &digest)? {
                        Action::Skip(s) => {
                            ups.insert(st.kind, Upstream::of(&s));
                            "skip: inputs unchanged".to_string()
                        }
                        Action::Reuse(s) => {
                            ups.insert(st.kind, Upstream::of(&s));
                            format!("skip: inputs as in attempt-{}, which finished (it becomes the latest)", s.attempt)
                        }
                        Action::New(why) => {
                            rerun = Some(st.name.clone());
                            format!("run: {why}")
                        }
                        Action::Resume(_, why) => {
                            rerun = Some(st.name.clone());
                            format!("resume: {why}")
                        }
                    }
                }
            }
        };
        writeln!(out, "{:<10} {:<8} {:<24} {action}", st.name, st.kind.as_str(), state)?;
    }
    Ok(())
}

fn run_stages(a: &PipelineArgs, spec: &PipelineSpec, root: &Path, from: Option<usize>, cancel: &Arc<AtomicBool>) -> Result<()> {
    let exe = std::env::current_exe().context("finding the furnace binary")?;
    let n = spec.stages.len();
    let mut ups = Upstreams::new();
    let started = Instant::now();
    for (i, st) in spec.stages.iter().enumerate() {
        let head = format!("[{}/{n}] {:<8}", i + 1, st.name);
        if cancel.load(Ordering::SeqCst) {
            return Err(crate::interrupt::Interrupted { resume: resume_command(a) }.into());
        }
        let latest = pl::latest(root, &st.name)?;
        let w = pl::wire(spec, i, &ups)?;
        let digest = w.inputs.digest();
        let (state, resumed) = match choose(root, st, from.is_some_and(|f| i >= f), latest, &w.inputs, &digest)? {
            Action::Skip(s) => {
                println!("{head} skipped (inputs unchanged; attempt-{})", s.attempt);
                ups.insert(st.kind, Upstream::of(&s));
                continue;
            }
            Action::Reuse(s) => {
                pl::set_latest(root, &st.name, s.attempt)?;
                if st.kind == Kind::Train {
                    register_trained(root, &spec.name, &st.name, &pl::attempt_dir(root, &st.name, s.attempt), &s.outputs)?;
                }
                println!("{head} skipped (inputs as in attempt-{}, which finished; it is the latest again)", s.attempt);
                ups.insert(st.kind, Upstream::of(&s));
                continue;
            }
            Action::New(why) => {
                let attempt = pl::next_attempt(root, &st.name);
                println!("{head} running attempt-{attempt} ({why})");
                let dir = pl::attempt_dir(root, &st.name, attempt);
                let state = StageState {
                    stage: st.name.clone(),
                    kind: st.kind.as_str().into(),
                    attempt,
                    status: Status::Running,
                    command: w.args(&dir),
                    inputs: w.inputs.clone(),
                    inputs_sha256: digest.clone(),
                    outputs: w.outputs(&dir),
                    started_unix: now(),
                    finished_unix: None,
                    exit_code: None,
                    pipeline_pid: std::process::id(),
                    child_pid: None,
                    resumed: 0,
                };
                (state, false)
            }
            Action::Resume(s, why) => {
                println!("{head} resuming attempt-{} ({why})", s.attempt);
                (s, true)
            }
        };
        let state = execute(a, spec, root, st, &w, state, resumed, &exe, cancel, &head)?;
        if st.kind != Kind::Serve {
            ups.insert(st.kind, Upstream::of(&state));
        }
    }
    println!("pipeline {} finished in {:.1}s: {}", spec.name, started.elapsed().as_secs_f64(), root.display());
    Ok(())
}

/// Runs (or resumes) one attempt of a stage and records it; returns its final record.
#[allow(clippy::too_many_arguments)]
fn execute(
    a: &PipelineArgs,
    spec: &PipelineSpec,
    root: &Path,
    st: &pl::Stage,
    w: &Wired,
    mut state: StageState,
    resumed: bool,
    exe: &Path,
    cancel: &Arc<AtomicBool>,
    head: &str,
) -> Result<StageState> {
    let dir = pl::attempt_dir(root, &st.name, state.attempt);
    let marker = dir.display().to_string();
    if resumed {
        if let Some(pid) = state.child_pid {
            stop_orphan(pid, &marker, &st.name);
        }
        state.resumed += 1;
        state.pipeline_pid = std::process::id();
        state.child_pid = None;
        state.status = Status::Running;
        state.finished_unix = None;
        state.exit_code = None;
        state.command = w.args(&dir);
        let mut resume_train = false;
        if st.kind == Kind::Train {
            let exp = w.experiment.as_deref().unwrap_or_default();
            resume_train = dir.join("runs").join(furnace_exp::store::DB_FILE).is_file() && dir.join("runs").join(exp).is_dir();
            if resume_train {
                state.command.push("--resume".into());
            } else {
                // Killed before its run existed: start it again from nothing.
                let _ = std::fs::remove_dir_all(dir.join("runs"));
            }
        }
        if !resume_train {
            let _ = std::fs::remove_dir_all(dir.join("out"));
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (path, text) in w.files(&dir)? {
        if !resumed || !path.exists() {
            pl::write_whole(&path, &text)?;
        }
    }
    let log_path = dir.join("log.txt");
    let mut log =
        std::fs::OpenOptions::new().create(true).append(true).open(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
    let start_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    writeln!(
        log,
        "== furnace pipeline {}: stage {} attempt-{} {} at unix {} ==\n$ furnace {}",
        spec.name,
        st.name,
        state.attempt,
        if resumed { "resumed" } else { "started" },
        now(),
        threads_flag().into_iter().chain(state.command.iter().cloned()).collect::<Vec<_>>().join(" ")
    )?;
    state.write(&dir)?;
    pl::set_latest(root, &st.name, state.attempt)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(threads_flag()).args(&state.command).stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log.try_clone()?);
    // Its own process group: a terminal's Ctrl-C reaches the pipeline, which asks the
    // stage to stop once (SIGTERM).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
    state.child_pid = Some(child.id());
    state.write(&dir)?;
    furnace_hub::failpoint::hit("pipeline.stage_started");

    let t0 = Instant::now();
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}").map_err(|e| anyhow::anyhow!("{e}"))?);
    bar.set_prefix(head.to_string());
    if a.verbose || st.kind == Kind::Serve {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut reader = std::fs::File::open(&log_path)?;
    reader.seek(SeekFrom::Start(start_offset))?;
    let mut pending: Vec<u8> = Vec::new();
    let mut forwarded = false;
    let mut last_peek = Instant::now();
    let status = loop {
        let exited = child.try_wait()?;
        reader.read_to_end(&mut pending).ok();
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let bytes: Vec<u8> = pending.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&bytes);
            let line = text.trim_end();
            if a.verbose || st.kind == Kind::Serve {
                eprintln!("  {}| {line}", st.name);
            } else if !line.trim().is_empty() {
                bar.set_message(line.chars().take(100).collect::<String>());
            }
        }
        if let Some(s) = exited {
            break s;
        }
        if st.kind == Kind::Train && last_peek.elapsed() > Duration::from_secs(1) {
            last_peek = Instant::now();
            if let Some(m) = train_progress(&dir, w.experiment.as_deref().unwrap_or_default()) {
                bar.set_message(m);
            }
        }
        if cancel.load(Ordering::SeqCst) && !forwarded {
            signal(child.id(), "TERM");
            forwarded = true;
        }
        bar.tick();
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let code = status.code().or_else(|| {
        #[cfg(unix)]
        {
            std::os::unix::process::ExitStatusExt::signal(&status).map(|s| -s)
        }
        #[cfg(not(unix))]
        {
            None
        }
    });
    state.exit_code = code;
    state.finished_unix = Some(now());
    let took = t0.elapsed().as_secs_f64();
    if forwarded || cancel.load(Ordering::SeqCst) {
        state.status = if st.kind == Kind::Serve { Status::Stopped } else { Status::Interrupted };
        state.write(&dir)?;
        if st.kind == Kind::Serve {
            println!("{head} stopped after {took:.1}s");
            return Ok(state);
        }
        println!("{head} interrupted after {took:.1}s (log: {})", log_path.display());
        return Err(crate::interrupt::Interrupted { resume: resume_command(a) }.into());
    }
    if !status.success() {
        state.status = Status::Failed;
        state.write(&dir)?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "{head} failed (exit {}) after {took:.1}s; the end of {}:",
            code.map(|c| c.to_string()).unwrap_or("?".into()),
            log_path.display()
        );
        for l in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("  {l}");
        }
        bail!("stage {} failed: see {} (fix it, then run the pipeline again: the stages before it are kept)", st.name, log_path.display());
    }
    if st.kind == Kind::Train {
        state.outputs.extend(pl::train_outputs(&dir, w.experiment.as_deref().unwrap_or_default())?);
        register_trained(root, &spec.name, &st.name, &dir, &state.outputs)?;
    }
    for (k, p) in &state.outputs {
        if matches!(k.as_str(), "model" | "metrics" | "train" | "adapter") && !Path::new(p).exists() {
            state.status = Status::Failed;
            state.write(&dir)?;
            bail!("stage {} ended without writing its {k} ({p}): see {}", st.name, log_path.display());
        }
    }
    state.status = if st.kind == Kind::Serve { Status::Stopped } else { Status::Done };
    state.write(&dir)?;
    let shown = ["adapter", "model", "metrics", "train"]
        .iter()
        .find_map(|k| state.outputs.get(*k).map(|p| format!(": {k} {p}")))
        .unwrap_or_default();
    println!("{head} done in {took:.1}s (attempt-{}){shown}", state.attempt);
    if st.kind == Kind::Eval {
        if let Some(m) = state.outputs.get("metrics").and_then(|p| std::fs::read_to_string(p).ok()) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&m) {
                if let Some(obj) = v.get("metrics").and_then(|m| m.as_object()) {
                    for (k, v) in obj {
                        println!("           {k:<12} {v}");
                    }
                }
            }
        }
    }
    Ok(state)
}

/// A training stage's progress from its run's `metrics.jsonl`: the last step and loss.
fn train_progress(dir: &Path, experiment: &str) -> Option<String> {
    let exp = dir.join("runs").join(experiment);
    let run = exp.join(std::fs::read_to_string(exp.join("latest")).ok()?.trim());
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
    let last = text.lines().rev().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| v.get("loss").is_some())?;
    Some(format!("step {}  loss {:.4}", last.get("step")?, last.get("loss")?.as_f64()?))
}

/// `--threads N` as given to the pipeline, for its stages.
fn threads_flag() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if a == "--threads" {
            if let Some(n) = args.get(i + 1) {
                return vec![a.clone(), n.clone()];
            }
        } else if a.starts_with("--threads=") {
            return vec![a.clone()];
        }
    }
    Vec::new()
}

/// The command line that continues an interrupted pipeline.
fn resume_command(a: &PipelineArgs) -> String {
    let mut resume = format!("furnace pipeline {}", a.spec.display());
    if let Some(r) = &a.runs_dir {
        resume.push_str(&format!(" --runs-dir {}", r.display()));
    }
    resume
}

/// Registers a train stage's adapter in the adapter registry of the pipeline's runs folder
/// as `PIPELINE/STAGE` (tag `pipeline`; a later attempt replaces the record), with the base,
/// spec, metrics and PEFT settings its run was registered with in the stage's own store, so
/// `furnace adapters list`, `--adapter PIPELINE/STAGE`, `furnace serve --registered` and the
/// dashboard find it beside the runs of `furnace run` and `furnace train`.
fn register_trained(
    root: &Path,
    pipeline: &str,
    stage: &str,
    attempt: &Path,
    outputs: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    use furnace_exp::registry;
    let (Some(run), Some(experiment), Some(adapter)) = (outputs.get("run"), outputs.get("experiment"), outputs.get("adapter")) else {
        return Ok(());
    };
    let run_name = Path::new(run).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let own = furnace_exp::Store::open_in(&attempt.join("runs")).context("opening the train stage's store")?;
    let Some(rec) = registry::get(&own, &format!("{experiment}/{run_name}"))? else {
        bail!("the train stage's run {experiment}/{run_name} is not in its registry ({})", attempt.join("runs").display());
    };
    let Some(runs_dir) = root.parent().and_then(Path::parent) else { return Ok(()) };
    let store = furnace_exp::Store::open_in(runs_dir).with_context(|| format!("opening the store in {}", runs_dir.display()))?;
    let name = format!("{pipeline}/{stage}");
    let new = registry::NewAdapter {
        name: name.clone(),
        path: PathBuf::from(adapter),
        base: rec.base,
        source: "run".into(),
        spec: rec.spec,
        metrics: rec.metrics,
        peft: rec.peft,
        tags: vec!["pipeline".into()],
        ..Default::default()
    };
    registry::register(&store, &new, true).with_context(|| format!("registering the adapter as {name}"))?;
    Ok(())
}
