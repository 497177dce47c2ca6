//! `furnace train spec.toml`: one LoRA SFT configuration, with a live progress bar and a
//! run folder (resolved config, metrics.jsonl, train.log, checkpoints, final adapter, and a
//! `latest` pointer next to the runs).

use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_text::ChatMessage;
use furnace_train::{eval_loss, load_dataset, FrozenBase, Spec, TrainableLora, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// The spec (TOML): [experiment], [data], [model], [lora], [trainer].
    spec: PathBuf,
    /// Folder that holds run folders (`<runs>/<experiment name>/<run>`).
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

fn log_line(log: &mut std::fs::File, metrics: &mut std::fs::File, v: serde_json::Value) -> Result<()> {
    writeln!(metrics, "{v}")?;
    writeln!(log, "{v}")?;
    Ok(())
}

fn last_checkpoint(run: &Path) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(run.join("checkpoints")).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse::<usize>().ok()) {
            if best.as_ref().is_none_or(|(b, _)| n > *b) {
                best = Some((n, e.path()));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Greedy answers of the model to the first `n` eval rows' prompts.
fn samples(loaded: &furnace_model::LoadedModel, spec: &Spec, n: usize) -> Result<Vec<(String, String)>> {
    let Some(eval) = &spec.data.eval else { return Ok(Vec::new()) };
    let Some(tpl) = &loaded.chat_template else { return Ok(Vec::new()) };
    let rows = furnace_train::data::read_rows(eval)?;
    let c = &spec.data.columns;
    let mut out = Vec::new();
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions::default());
    for (_, row) in rows.into_iter().take(n) {
        let Ok(row) = row else { continue };
        let get = |k: &str| row.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let Some(prompt) = get(&c.prompt).or_else(|| get(&c.input)) else { continue };
        let mut msgs = Vec::new();
        if let Some(s) = get(&c.system) {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", prompt.clone()));
        let text = tpl.render(&msgs, true, loaded.tokenizer.bos_token(), loaded.tokenizer.eos_token())?;
        engine.add(Request { prompt: loaded.tokenizer.encode(&text, false)?, params: SamplingParams::greedy(48) })?;
        out.push((prompt, String::new()));
    }
    for (o, slot) in engine.run(&mut |_| {})?.into_iter().zip(out.iter_mut()) {
        slot.1 = o.text;
    }
    Ok(out)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let spec = Spec::load(&a.spec)?;
    let dtype = spec.weight_dtype()?;
    let base = if spec.model.base.is_empty() { DEFAULT_MODEL.to_string() } else { spec.model.base.clone() };
    eprintln!("loading {base} ({dtype:?} base)");
    let mut loaded = load(&base, dtype)?;
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
    let frozen = FrozenBase::new(&loaded.model)?;
    let exp_dir = a.runs_dir.join(&spec.experiment.name);
    let config = spec.train_config(&train.examples);

    // Everything is validated; only now does anything get written.
    let (run_dir, mut trainer) = match &a.resume {
        Some(r) => {
            let run = if r.is_empty() {
                let name = std::fs::read_to_string(exp_dir.join("latest"))
                    .with_context(|| format!("no run to resume in {}", exp_dir.display()))?;
                exp_dir.join(name.trim())
            } else {
                PathBuf::from(r)
            };
            let ckpt = last_checkpoint(&run).with_context(|| format!("{} has no checkpoint to resume from", run.display()))?;
            eprintln!("resuming {} from {}", run.display(), ckpt.display());
            let t = Trainer::resume(&loaded.model, &ckpt, config, &train.examples)?;
            (run, t)
        }
        None => {
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
            let mut run = exp_dir.join(format!("run-{stamp}"));
            let mut k = 1;
            while run.exists() {
                k += 1;
                run = exp_dir.join(format!("run-{stamp}-{k}"));
            }
            std::fs::create_dir_all(run.join("checkpoints"))?;
            std::fs::copy(&a.spec, run.join("spec.toml"))?;
            std::fs::write(run.join("resolved.json"), serde_json::to_string_pretty(&spec)?)?;
            let lora = TrainableLora::new(&loaded.model, spec.lora_config(), spec.init(), spec.experiment.seed)?;
            let t = Trainer::new(config, lora, &train.examples)?;
            (run, t)
        }
    };
    let run_name = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    std::fs::write(exp_dir.join("latest"), format!("{run_name}\n"))?;
    let open = |name: &str| std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join(name));
    let (mut metrics, mut log) = (open("metrics.jsonl")?, open("train.log")?);

    let before_samples = if a.resume.is_none() { samples(&loaded, &spec, a.samples)? } else { Vec::new() };
    let eval_before = match &eval {
        Some(e) => Some(eval_loss(&frozen, Some(&trainer.lora), &e.examples)?),
        None => None,
    };
    if let Some(l) = eval_before {
        log_line(&mut log, &mut metrics, serde_json::json!({"step": trainer.steps_done(), "eval_loss": l, "eval_ppl": l.exp()}))?;
    }

    let total = trainer.total_steps();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.set_position(trainer.steps_done() as u64);
    let t = &spec.trainer;
    let started = Instant::now();
    let mut tokens_total = 0usize;
    while !trainer.finished() {
        let s = trainer.step(&frozen, &train.examples)?;
        tokens_total += s.tokens;
        let tps = tokens_total as f64 / started.elapsed().as_secs_f64();
        bar.set_position(s.step as u64);
        bar.set_message(format!("loss {:.4}  lr {:.2e}  {tps:.0} tok/s", s.loss, s.lr));
        if s.step % t.log_every == 0 || trainer.finished() {
            log_line(&mut log, &mut metrics, serde_json::json!({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens_per_s": tps}))?;
        }
        if let Some(e) = &eval {
            if t.eval_every > 0 && s.step % t.eval_every == 0 && !trainer.finished() {
                let l = eval_loss(&frozen, Some(&trainer.lora), &e.examples)?;
                log_line(&mut log, &mut metrics, serde_json::json!({"step": s.step, "eval_loss": l, "eval_ppl": l.exp()}))?;
            }
        }
        if t.save_every > 0 && s.step % t.save_every == 0 && !trainer.finished() {
            trainer.save_checkpoint(&run_dir.join("checkpoints").join(format!("step-{}", s.step)), &base)?;
        }
    }
    bar.finish();
    trainer.save_checkpoint(&run_dir.join("checkpoints").join(format!("step-{}", trainer.steps_done())), &base)?;
    trainer.lora.save_peft(&run_dir.join("adapter"), &base)?;
    let eval_after = match &eval {
        Some(e) => {
            let l = eval_loss(&frozen, Some(&trainer.lora), &e.examples)?;
            log_line(&mut log, &mut metrics, serde_json::json!({"step": trainer.steps_done(), "eval_loss": l, "eval_ppl": l.exp()}))?;
            Some(l)
        }
        None => None,
    };
    loaded.model.attach_adapter(&trainer.lora.to_adapter()?)?;
    let after_samples = samples(&loaded, &spec, a.samples)?;
    println!("run: {}", run_dir.display());
    println!("adapter: {}", run_dir.join("adapter").display());
    if let (Some(b), Some(af)) = (eval_before, eval_after) {
        println!("eval loss: {b:.4} -> {af:.4} (perplexity {:.2} -> {:.2})", b.exp(), af.exp());
    } else if let Some(af) = eval_after {
        println!("eval loss: {af:.4} (perplexity {:.2})", af.exp());
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
