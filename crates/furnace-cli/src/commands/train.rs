//! `furnace train spec.toml`: one LoRA SFT configuration as a one-run experiment, trained
//! by the same driver as `furnace run` (`Experiment::start`), with a live progress bar.
//! Its run folder is also written as a view for people and scripts: the spec, the resolved
//! config, `metrics.jsonl` and `train.log` (from the live events), checkpoints, the final
//! adapter, and a `latest` pointer in `<runs>/<experiment name>/`.

use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_exp::{experiment, Event, Experiment, FitOptions, RunStatus, StartOptions, Store};
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_model::AdapterId;
use furnace_text::ChatMessage;
use furnace_train::{load_dataset, Spec};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// The spec (TOML): [experiment], [data], [model], [lora], [trainer].
    spec: PathBuf,
    /// Folder that holds the store and the run folders (`<runs>/<experiment name>/<run>`).
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Continue the latest run of this experiment (or the given run folder) from its last
    /// checkpoint.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
    /// Eval prompts to generate from before and after training.
    #[arg(long, default_value_t = 3)]
    samples: usize,
}

/// Greedy answers of the model (with `adapter`, registered in it, if given) to the first
/// `n` eval rows' prompts.
fn samples(loaded: &furnace_model::LoadedModel, adapter: Option<AdapterId>, spec: &Spec, n: usize) -> Result<Vec<(String, String)>> {
    let Some(eval) = &spec.data.eval else { return Ok(Vec::new()) };
    let Some(tpl) = &loaded.chat_template else { return Ok(Vec::new()) };
    let rows = furnace_train::data::read_rows(eval)?;
    let c = &spec.data.columns;
    let mut out = Vec::new();
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions::default());
    const TRAINED: &str = "trained";
    if let Some(id) = adapter {
        engine.name_adapter(TRAINED, id)?;
    }
    for (_, row) in rows.into_iter().take(n) {
        let Ok(row) = row else { continue };
        let get = |k: &str| row.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let mut msgs = Vec::new();
        // A prompt given as chat messages (DPO and GRPO rows) is shown by its last message.
        let listed: Option<Vec<ChatMessage>> = row.get(&c.prompt).and_then(|v| v.as_array()).map(|a| {
            a.iter().filter_map(|m| Some(ChatMessage::new(m.get("role")?.as_str()?, m.get("content")?.as_str()?.to_string()))).collect()
        });
        let prompt = match listed.filter(|m| !m.is_empty()) {
            Some(list) => {
                let shown = list.last().map(|m| m.content.clone()).unwrap_or_default();
                msgs = list;
                shown
            }
            None => {
                let Some(prompt) = get(&c.prompt).or_else(|| get(&c.input)) else { continue };
                if let Some(s) = get(&c.system) {
                    msgs.push(ChatMessage::new("system", s));
                }
                msgs.push(ChatMessage::new("user", prompt.clone()));
                prompt
            }
        };
        let text = tpl.render(&msgs, true, loaded.tokenizer.bos_token(), loaded.tokenizer.eos_token())?;
        engine.add(Request {
            prompt: loaded.tokenizer.encode(&text, false)?,
            params: SamplingParams::greedy(48),
            adapter: adapter.map(|_| TRAINED.to_string()),
            constraint: None,
        })?;
        out.push((prompt, String::new()));
    }
    for (o, slot) in engine.run(&mut |_| {})?.into_iter().zip(out.iter_mut()) {
        slot.1 = o.text;
    }
    Ok(out)
}

/// The run a `latest` pointer or a run folder names: its experiment and id.
fn locate_run(store: &Store, run_dir: &Path) -> Result<(String, i64)> {
    let id = run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("run-"))
        .and_then(|n| n.parse::<i64>().ok())
        .with_context(|| format!("{} is not a run folder (run-<id>)", run_dir.display()))?;
    let run = store.run(id).with_context(|| format!("{} is not a run of the store {}", run_dir.display(), store.path().display()))?;
    let exp = store.experiment_by_id(run.experiment_id)?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let parent = run_dir.parent().unwrap_or(Path::new("."));
    if !same(parent, &exp.dir) {
        bail!(
            "{} is not a run folder of the store {} (run {id} lives in {})",
            run_dir.display(),
            store.path().display(),
            exp.dir.display()
        );
    }
    Ok((exp.name, id))
}

/// Writes the run folder's `metrics.jsonl` and `train.log` from the live events, in the
/// shape `furnace train` has always written them: a loss line every `log_every` steps and
/// at the end, an eval line before training, every `eval_every` steps and at the end.
struct RunView {
    metrics: std::fs::File,
    log: std::fs::File,
    log_every: i64,
    eval_every: i64,
    total: i64,
    step_values: BTreeMap<String, f64>,
    tokens: f64,
    started: Instant,
    /// The (step, kind) of the lines in `metrics.jsonl` (kind 0: loss line, 1: eval line):
    /// a line already there is not written again (a run resumed at its last step
    /// evaluates that step again).
    written: BTreeSet<(i64, u8)>,
    /// The eval metrics of one step not yet written (step, name → value).
    pending_eval: Option<(i64, BTreeMap<String, f64>)>,
    /// Whether the run is SFT (its eval line has a perplexity).
    sft: bool,
}

/// A line's (step, kind): kind 0 for a loss line, 1 for an eval line.
fn line_key(line: &str) -> Option<(i64, u8)> {
    let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
    let step = v.get("step")?.as_i64()?;
    Some((step, u8::from(is_eval_line(&v))))
}

fn is_eval_line(v: &serde_json::Value) -> bool {
    v.as_object().is_some_and(|o| o.keys().any(|k| k.starts_with("eval_")))
}

/// A loss line: step, loss, lr, grad norm, the objective's own metrics (DPO's and GRPO's
/// rewards, ...), tokens per second when known.
fn loss_line<'a>(step: i64, values: impl Iterator<Item = (&'a str, f64)>, tps: Option<f64>) -> serde_json::Value {
    let values: BTreeMap<&str, f64> = values.collect();
    let get = |k: &str| values.get(k).copied().unwrap_or(f64::NAN);
    let mut m = serde_json::Map::new();
    m.insert("step".into(), step.into());
    for k in ["loss", "lr", "grad_norm"] {
        m.insert(k.into(), get(k).into());
    }
    for (k, v) in &values {
        if !["loss", "lr", "grad_norm", "tokens", "chunk"].contains(k) && !k.starts_with("eval_") {
            m.insert((*k).into(), (*v).into());
        }
    }
    if let Some(t) = tps {
        m.insert("tokens_per_s".into(), t.into());
    }
    serde_json::Value::Object(m)
}

/// An eval line: the step's `eval_*` metrics, and `eval_ppl` for SFT's eval loss.
fn eval_line<'a>(step: i64, values: impl Iterator<Item = (&'a str, f64)>, sft: bool) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), step.into());
    let mut loss = None;
    for (k, v) in values.filter(|(k, _)| k.starts_with("eval_")) {
        if k == "eval_loss" {
            loss = Some(v);
        }
        m.insert(k.into(), v.into());
    }
    if let (Some(l), true) = (loss, sft) {
        m.insert("eval_ppl".into(), l.exp().into());
    }
    serde_json::Value::Object(m)
}

/// What the store holds for a resumed run: its metrics and its step total then.
struct Stored<'a> {
    metrics: &'a [furnace_exp::MetricRow],
    total_steps: i64,
}

/// The `step` of a line of `metrics.jsonl` / `train.log` (`None`: not a JSON line, or a
/// line a kill cut short).
fn line_step(line: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(line).ok()?.get("step")?.as_i64()
}

/// Keeps the lines of `path` that `keep` accepts (the file is replaced whole: written
/// beside it, then renamed); returns the kept lines. A missing file is empty.
fn keep_lines(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let kept: Vec<String> = text.lines().filter(|l| keep(l)).map(str::to_string).collect();
    write_lines(path, &kept)?;
    Ok(kept)
}

/// Replaces `path` whole with `lines` (written beside it, synced, renamed).
fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let tmp = path.with_extension("rewrite");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Writes the run folder's own files: `spec.toml` (a copy of the spec) and
/// `resolved.json`, and its `checkpoints/` folder; `missing_only`: keeps those that exist.
fn write_run_files(run_dir: &Path, spec_path: &Path, spec: &Spec, missing_only: bool) -> Result<()> {
    std::fs::create_dir_all(run_dir.join("checkpoints"))?;
    if !missing_only || !run_dir.join("spec.toml").exists() {
        std::fs::copy(spec_path, run_dir.join("spec.toml"))?;
    }
    if !missing_only || !run_dir.join("resolved.json").exists() {
        std::fs::write(run_dir.join("resolved.json"), serde_json::to_string_pretty(spec)?)?;
    }
    furnace_hub::failpoint::hit("train.run_folder_written");
    Ok(())
}

impl RunView {
    /// Opens the view for appending. On a resume from the checkpoint of step `resumed`,
    /// the lines of later steps (written before a crash or kill, and trained again now)
    /// are dropped first, so no step appears twice.
    ///
    /// The lines of steps up to `resumed` that a kill kept from the view (the store
    /// committed them, the process died before this thread wrote them) are written from
    /// the store's metrics (`stored`), without `tokens_per_s`, which the store does not
    /// keep; lines stay in step order.
    fn open(run_dir: &Path, spec: &Spec, resumed: Option<i64>, stored: Option<Stored<'_>>) -> Result<Self> {
        let mut written = BTreeSet::new();
        let sft = spec.trainer.kind == "sft";
        let log_every = spec.trainer.log_every.max(1) as i64;
        let eval_every = spec.trainer.eval_every as i64;
        if let Some(step) = resumed {
            // metrics.jsonl is JSON lines only (a cut-short line goes); train.log keeps its
            // text lines.
            let path = run_dir.join("metrics.jsonl");
            let mut kept = keep_lines(&path, |l| line_step(l).is_some_and(|s| s <= step))?;
            let have: BTreeSet<(i64, u8)> = kept.iter().filter_map(|l| line_key(l)).collect();
            let mut missing = Vec::new();
            if let Some(st) = stored {
                let mut by_step: BTreeMap<i64, BTreeMap<&str, f64>> = BTreeMap::new();
                for m in st.metrics.iter().filter(|m| m.step <= step) {
                    by_step.entry(m.step).or_default().insert(m.name.as_str(), m.value);
                }
                for (s, v) in by_step {
                    if v.contains_key("loss") && !have.contains(&(s, 0)) && (s % log_every == 0 || s == st.total_steps) {
                        missing.push(loss_line(s, v.iter().map(|(k, v)| (*k, *v)), None).to_string());
                    }
                    if v.keys().any(|k| k.starts_with("eval_"))
                        && !have.contains(&(s, 1))
                        && (s == 0 || (eval_every > 0 && s % eval_every == 0) || s == st.total_steps)
                    {
                        missing.push(eval_line(s, v.iter().map(|(k, v)| (*k, *v)), sft).to_string());
                    }
                }
            }
            if !missing.is_empty() {
                kept.extend(missing);
                kept.sort_by_key(|l| line_key(l));
                write_lines(&path, &kept)?;
            }
            written = kept.iter().filter_map(|l| line_key(l)).collect();
            keep_lines(&run_dir.join("train.log"), |l| line_step(l).is_none_or(|s| s <= step))?;
            furnace_hub::failpoint::hit("train.view_rewritten");
        }
        let open = |name: &str| std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join(name));
        let view = Self {
            metrics: open("metrics.jsonl")?,
            log: open("train.log")?,
            log_every,
            eval_every,
            total: i64::MAX,
            step_values: BTreeMap::new(),
            tokens: 0.0,
            started: Instant::now(),
            written,
            pending_eval: None,
            sft,
        };
        Ok(view)
    }

    fn line(&mut self, v: serde_json::Value) -> Result<()> {
        let key = (v.get("step").and_then(|s| s.as_i64()).unwrap_or(-1), u8::from(is_eval_line(&v)));
        if !self.written.insert(key) {
            return Ok(());
        }
        // One write per line, so a kill cuts at most the line being written.
        writeln!(self.metrics, "{v}")?;
        furnace_hub::failpoint::hit("train.metrics_line");
        writeln!(self.log, "{v}")?;
        Ok(())
    }

    /// Writes the eval line of the eval metrics gathered so far (when its step is one that
    /// `eval_every` shows).
    fn flush_eval(&mut self) -> Result<()> {
        let Some((step, values)) = self.pending_eval.take() else { return Ok(()) };
        if step == 0 || (self.eval_every > 0 && step % self.eval_every == 0) || step == self.total {
            self.line(eval_line(step, values.iter().map(|(k, v)| (k.as_str(), *v)), self.sft))?;
        }
        Ok(())
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Takes one event; returns the bar message after a step.
    fn show(&mut self, ev: Event) -> Result<Option<(i64, i64, String)>> {
        // An evaluation's metrics arrive one by one: its line is written at the first event
        // after them.
        let eval_metric = matches!(&ev, Event::Metric { name, step, .. } if name.starts_with("eval_") && self.pending_eval.as_ref().is_none_or(|p| p.0 == *step));
        if !eval_metric {
            self.flush_eval()?;
        }
        match ev {
            Event::Metric { step, name, value, .. } => {
                if name.starts_with("eval_") {
                    self.pending_eval.get_or_insert_with(|| (step, BTreeMap::new())).1.insert(name, value);
                } else {
                    if name == "tokens" {
                        self.tokens += value;
                    }
                    self.step_values.insert(name, value);
                }
            }
            Event::Progress { steps_done, total_steps, .. } => {
                self.total = total_steps;
                let v = std::mem::take(&mut self.step_values);
                let get = |k: &str| v.get(k).copied().unwrap_or(f64::NAN);
                let tps = self.tokens_per_s();
                if steps_done % self.log_every == 0 || steps_done == total_steps {
                    self.line(loss_line(steps_done, v.iter().map(|(k, v)| (k.as_str(), *v)), Some(tps)))?;
                }
                let mut msg = format!("loss {:.4}  lr {:.2e}  {tps:.0} tok/s", get("loss"), get("lr"));
                if let Some(a) = v.get("rewards/accuracies") {
                    msg.push_str(&format!("  reward acc {a:.2}"));
                }
                if let Some(r) = v.get("reward") {
                    msg.push_str(&format!("  reward {r:.3}"));
                }
                return Ok(Some((steps_done, total_steps, msg)));
            }
            Event::Log { message, .. } => writeln!(self.log, "{message}")?,
            Event::Status { status, message, .. } => {
                writeln!(self.log, "{}{}", status.as_str(), message.map(|m| format!(" ({m})")).unwrap_or_default())?
            }
            Event::Op { .. } | Event::Interval { .. } => {}
        }
        Ok(None)
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    // Everything is validated before anything is written: the spec, then the data with
    // the model's tokenizer and template.
    let spec = Spec::load(&a.spec)?;
    let (_, leaves) = experiment::read_spec(&a.spec)?;
    if leaves.len() != 1 {
        bail!(
            "{} expands to {} configurations; `furnace train` trains one (use `furnace run {}` for a sweep)",
            a.spec.display(),
            leaves.len(),
            a.spec.display()
        );
    }
    let leaf = leaves[0].spec.clone();
    let dtype = spec.weight_dtype()?;
    let base = if spec.model.base.is_empty() { DEFAULT_MODEL.to_string() } else { spec.model.base.clone() };
    eprintln!("loading {base} ({dtype:?} base)");
    let mut loaded = load(&base, dtype)?;
    spec.check_against(&loaded.model.config)?;
    let Some(template) = loaded.chat_template.clone() else {
        bail!("{base} has no chat template: training rows are formatted with it");
    };
    let opts = spec.data_options();
    let train = load_dataset(&spec.data.train, &loaded.tokenizer, &template, &opts)?;
    let eval = match &spec.data.eval {
        Some(p) => Some(load_dataset(p, &loaded.tokenizer, &template, &opts)?),
        None => None,
    };
    eprintln!(
        "train: {} examples ({} truncated, {} bad rows skipped){}",
        train.examples.len(),
        train.truncated,
        train.skipped,
        eval.as_ref().map(|e| format!(", eval: {} examples", e.examples.len())).unwrap_or_default()
    );
    drop((train, eval));

    let name = &spec.experiment.name;
    let pointer_dir = a.runs_dir.join(name);
    let mut stored = None;
    let (exp, run_id, resumed_at) = match &a.resume {
        Some(r) => {
            let db = a.runs_dir.join(furnace_exp::store::DB_FILE);
            if !db.exists() {
                bail!("no run to resume in {}: nothing was trained there (no {})", a.runs_dir.display(), db.display());
            }
            let store = Store::open(&db)?;
            let (exp_name, id) = if r.is_empty() {
                match std::fs::read_to_string(pointer_dir.join("latest")) {
                    Ok(rel) => locate_run(&store, &pointer_dir.join(rel.trim()))?,
                    // A kill between making the experiment and writing `latest`: the newest
                    // experiment of this spec's name is the one to resume.
                    Err(_) => {
                        let e = store.latest_of(name)?.with_context(|| format!("no run to resume in {}", pointer_dir.display()))?;
                        let id = store.runs(e.id)?.first().map(|r| r.id).context("the experiment has no run")?;
                        (e.name, id)
                    }
                }
            } else {
                locate_run(&store, Path::new(r))?
            };
            let run = store.run(id)?;
            let exp = Experiment::open(&a.runs_dir, &exp_name)?;
            let run_dir = exp.run_dir(id);
            exp.continue_run(id, &leaf)?;
            // A run killed before its first checkpoint starts again from step 0.
            let step = run.checkpoint_step.unwrap_or(0);
            match run.checkpoint_step {
                Some(step) => {
                    eprintln!("resuming {} from {}", run_dir.display(), run_dir.join("checkpoints").join(format!("step-{step}")).display())
                }
                None => eprintln!("resuming {} from the start (it had no checkpoint yet)", run_dir.display()),
            }
            write_run_files(&run_dir, &a.spec, &spec, true)?;
            let metrics = store.metrics(id)?;
            let before = metrics.iter().find(|m| m.step == step && m.name == "eval_loss").map(|m| m.value);
            stored = Some((metrics, run.total_steps));
            (exp, id, Some((step, before)))
        }
        None => {
            let exp = Experiment::create(&a.runs_dir, &a.spec)?;
            let id = exp.runs()?.first().map(|r| r.id).context("the experiment has no run")?;
            write_run_files(&exp.run_dir(id), &a.spec, &spec, false)?;
            (exp, id, None)
        }
    };
    let run_dir = exp.run_dir(run_id);
    // `<runs>/<name>/latest` names the newest run of this spec, relative to that folder.
    let rel = if exp.row().dir == pointer_dir {
        PathBuf::from(format!("run-{run_id}"))
    } else {
        Path::new("..").join(&exp.row().name).join(format!("run-{run_id}"))
    };
    std::fs::create_dir_all(&pointer_dir)?;
    write_lines(&pointer_dir.join("latest"), &[rel.display().to_string()])?;
    furnace_hub::failpoint::hit("train.latest_written");
    let resumed_step = resumed_at.as_ref().map(|(step, _)| *step);
    let stored_view =
        stored.as_ref().map(|(metrics, total_steps): &(Vec<furnace_exp::MetricRow>, i64)| Stored { metrics, total_steps: *total_steps });
    let mut view = RunView::open(&run_dir, &spec, resumed_step, stored_view)?;

    let before_samples = if a.resume.is_none() { samples(&loaded, None, &spec, a.samples)? } else { Vec::new() };
    let mut eval_before = None;
    let mut accuracy_before = None;
    // The eval at the checkpoint is the "before" of a resumed run (its line is in the view
    // when an uninterrupted run writes one there).
    if let Some((_, Some(l))) = resumed_at {
        eval_before = Some(l);
    }

    // The model loaded here is the one the driver trains on (no second load).
    let mut handoff = Some(loaded.clone());
    let cancel = crate::interrupt::install()?;
    let mut running = exp.start(StartOptions {
        fit: FitOptions { eval_at_start: true, cancel: Some(cancel), ..Default::default() },
        loader: Box::new(move |name: &str, dtype| match handoff.take() {
            Some(m) => Ok(m),
            None => load(name, dtype).map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: format!("{e:#}") }),
        }),
        events: None,
    })?;
    let bar = ProgressBar::hidden();
    let mut shown = false;
    let headline = if spec.trainer.kind == "grpo" { "eval_reward" } else { "eval_loss" };
    while let Some(ev) = running.next_event() {
        if let Event::Metric { step: 0, ref name, value, .. } = ev {
            if name == headline {
                eval_before = Some(value);
            }
            if name == "eval_rewards/accuracies" {
                accuracy_before = Some(value);
            }
        }
        if let Some((done, total, msg)) = view.show(ev)? {
            if !shown {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                );
                shown = true;
            }
            bar.set_length(total.max(1) as u64);
            bar.set_position(done as u64);
            bar.set_message(msg);
        }
    }
    let summary = running.wait()?;
    view.flush_eval()?;
    bar.finish();
    if summary.cancelled {
        let mut resume = format!("furnace train {} --resume", a.spec.display());
        if a.runs_dir != Path::new("runs") {
            resume.push_str(&format!(" --runs-dir {}", a.runs_dir.display()));
        }
        return Err(crate::interrupt::Interrupted { resume }.into());
    }
    let run = summary.runs.iter().find(|r| r.id == run_id).context("the run left the store")?;
    if run.status != RunStatus::Completed {
        bail!("run {} ended {}: {}", run_id, run.status.as_str(), run.error.clone().unwrap_or_default());
    }
    let final_step = run.steps_done;
    let final_metrics = exp.store().metrics(run_id)?;
    let at_end = |name: &str| final_metrics.iter().find(|m| m.step == final_step && m.name == name).map(|m| m.value);
    let (eval_after, accuracy_after) = (at_end(headline), at_end("eval_rewards/accuracies"));

    let trained = loaded.model.add_adapter(&furnace_model::load_adapter(&run_dir.join("adapter"))?)?;
    let after_samples = samples(&loaded, Some(trained), &spec, a.samples)?;
    // The generations before and after, for the dashboard's run page too (written whole,
    // then renamed into place).
    if !after_samples.is_empty() {
        let rows: Vec<serde_json::Value> = after_samples
            .iter()
            .enumerate()
            .map(|(i, (prompt, after))| serde_json::json!({ "prompt": prompt, "before": before_samples.get(i).map(|b| &b.1), "after": after }))
            .collect();
        let tmp = run_dir.join(".samples.json.partial");
        std::fs::write(&tmp, serde_json::to_string_pretty(&rows)?)?;
        std::fs::rename(&tmp, run_dir.join("samples.json"))?;
    }
    println!("run: {}", run_dir.display());
    println!("adapter: {}", run_dir.join("adapter").display());
    match (spec.trainer.kind.as_str(), eval_before, eval_after) {
        ("sft", Some(b), Some(af)) => println!("eval loss: {b:.4} -> {af:.4} (perplexity {:.2} -> {:.2})", b.exp(), af.exp()),
        ("sft", None, Some(af)) => println!("eval loss: {af:.4} (perplexity {:.2})", af.exp()),
        ("grpo", b, Some(af)) => println!("eval mean reward: {}{af:.4}", b.map(|b| format!("{b:.4} -> ")).unwrap_or_default()),
        (_, b, Some(af)) => println!("eval DPO loss: {}{af:.4}", b.map(|b| format!("{b:.4} -> ")).unwrap_or_default()),
        _ => {}
    }
    if let Some(af) = accuracy_after {
        println!("eval reward accuracy: {}{af:.3}", accuracy_before.map(|b| format!("{b:.3} -> ")).unwrap_or_default());
    }
    for (i, (prompt, after)) in after_samples.iter().enumerate() {
        println!("\nprompt: {prompt}");
        if let Some((_, before)) = before_samples.get(i) {
            println!("  before: {before}");
        }
        println!("  after:  {after}");
    }
    Ok(())
}
