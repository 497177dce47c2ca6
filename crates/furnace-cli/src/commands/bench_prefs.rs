//! `furnace bench dpo` and `furnace bench grpo`: preference training speed against TRL's
//! own DPOTrainer / GRPOTrainer with PEFT on PyTorch (`scripts/peer_trl.py`), on the same
//! model (the peer dequantizes the same GGUF), rows, batch, lengths, LoRA (r, alpha = 2r,
//! all seven projections), AdamW settings (lr 5e-4 constant, no weight decay, gradient
//! clipping at 1.0) and thread count. Each repeat runs furnace and then the peer, each in
//! its own process (so each peak RSS is its own); the figures are medians over repeats and
//! the ratios are furnace / peer.
//!
//! Step times include everything a step does (batching, generation and reward scoring for
//! GRPO, forward, backward, the optimizer step); the first `--warmup` steps are not timed.

use super::bench::{median, peak_rss, rerun_in_mode};
use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_model::WeightDType;
use furnace_train::{
    dpo::DpoConfig, grpo::GrpoConfig, grpo::GrpoLoss, policy::Policy, rewards::Rewards, AdamWConfig, DataKind, DataOptions, Example,
    FrozenBase, LoraInit, Objective, ScheduleKind, StepMetrics, TrainConfig, TrainableLora, Trainer,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the two benchmarks share.
#[derive(Args, Clone)]
pub struct PeerArgs {
    /// Model: alias, .gguf file or HF directory (the peer needs a .gguf file).
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How the frozen base is held, on both sides: bf16 or f32 (quantized: furnace only,
    /// with --no-peer).
    #[arg(long, default_value = "bf16")]
    dtype: WeightDType,
    /// LoRA rank (alpha = 2 x rank, all seven projections).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Peak learning rate (constant schedule).
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Repeats of the whole measurement (furnace, then the peer); medians are reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The Python that runs the peer (needs torch, transformers, peft, trl, gguf); default:
    /// $FURNACE_PEER_PYTHON, else `python3` (it needs torch, transformers, peft, trl and gguf).
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// The peer script.
    #[arg(long, default_value = "scripts/peer_trl.py")]
    peer_script: PathBuf,
    /// Measure furnace only (no ratios).
    #[arg(long)]
    no_peer: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// both (furnace then the peer, each in its own process), furnace or peer: one
    /// measurement in this process (what `both` runs).
    #[arg(long, default_value = "both")]
    mode: String,
}

#[derive(Args, Clone)]
pub struct DpoBenchArgs {
    #[command(flatten)]
    common: PeerArgs,
    /// Preference rows (prompt, chosen, rejected).
    #[arg(long, default_value = "data/dpo/train.jsonl")]
    data: PathBuf,
    /// Use the first N pairs.
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Pairs per optimizer step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Longest sequence (prompt + answer) in tokens.
    #[arg(long, default_value_t = 96)]
    max_len: usize,
    /// DPO beta (sigmoid loss).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Timed steps (with the defaults, warm-up + timed steps are one pass over 64 pairs).
    #[arg(long, default_value_t = 14)]
    steps: usize,
    /// Untimed first steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The reference log-probabilities: precompute (once over the pairs before training,
    /// timed apart as ref_s; TRL's precompute_ref_log_probs=True) or per-step (inside each
    /// step of the first pass: TRL's default; furnace computes each pair's once and keeps
    /// it, which within one pass is the same work).
    #[arg(long, default_value = "precompute")]
    reference: String,
}

#[derive(Args, Clone)]
pub struct GrpoBenchArgs {
    #[command(flatten)]
    common: PeerArgs,
    /// Prompt rows (prompt, answer).
    #[arg(long, default_value = "data/grpo/train.jsonl")]
    data: PathBuf,
    /// Prompts per optimizer step.
    #[arg(long, default_value_t = 2)]
    prompts: usize,
    /// Completions sampled per prompt.
    #[arg(long, default_value_t = 4)]
    generations: usize,
    /// Most tokens per completion (a completion also ends at end-of-sequence, so lengths
    /// differ between the two: completion tokens/s is reported too).
    #[arg(long, default_value_t = 32)]
    max_completion: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Timed steps.
    #[arg(long, default_value_t = 7)]
    steps: usize,
    /// Untimed first steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

/// The reward both sides compute (furnace's `kind = "regex"`, a Python function in the
/// peer): 1.0 when the completion holds a digit. A reward the untrained model earns on some
/// completions and not others, so the advantages (and the gradients) are not all zero.
const REWARD_PATTERN: &str = r"\d";
/// LoRA targets (PEFT's names; the peer lists the same).
const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// The peer's Python when neither --peer-python nor $FURNACE_PEER_PYTHON is given.
const DEFAULT_PEER_PYTHON: &str = "python3";
/// Completions the GRPO sampler decodes together (the experiment driver's figure).
const SAMPLING_BATCH: usize = 64;

pub fn run_dpo(a: DpoBenchArgs) -> Result<()> {
    if a.pairs == 0 || a.batch == 0 || a.steps == 0 {
        bail!("--pairs, --batch and --steps must be at least 1");
    }
    if a.reference != "precompute" && a.reference != "per-step" {
        bail!("--reference must be precompute or per-step, not '{}'", a.reference);
    }
    let peer_args = vec![
        "dpo".to_string(),
        "--data".into(),
        abs(&a.data)?,
        "--pairs".into(),
        a.pairs.to_string(),
        "--batch".into(),
        a.batch.to_string(),
        "--max-length".into(),
        a.max_len.to_string(),
        "--beta".into(),
        a.beta.to_string(),
        "--steps".into(),
        a.steps.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
        "--ref".into(),
        a.reference.clone(),
    ];
    let figures = [("tokens_per_s", true), ("ms_per_step", false), ("tokens_per_step", false), ("ref_s", false)];
    orchestrate(&a.common, "dpo", peer_args, &figures, "tokens_per_s", || furnace_dpo(&a))
}

pub fn run_grpo(a: GrpoBenchArgs) -> Result<()> {
    if a.prompts == 0 || a.generations < 2 || a.steps == 0 || a.max_completion == 0 {
        bail!("--prompts, --steps and --max-completion must be at least 1 and --generations at least 2");
    }
    let peer_args = vec![
        "grpo".to_string(),
        "--data".into(),
        abs(&a.data)?,
        "--prompts".into(),
        a.prompts.to_string(),
        "--generations".into(),
        a.generations.to_string(),
        "--max-completion".into(),
        a.max_completion.to_string(),
        "--temperature".into(),
        a.temperature.to_string(),
        "--steps".into(),
        a.steps.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
    ];
    let figures = [
        ("prompts_per_s", true),
        ("completion_tokens_per_s", true),
        ("ms_per_step", false),
        ("completion_tokens_per_step", false),
        ("mean_reward", false),
    ];
    orchestrate(&a.common, "grpo", peer_args, &figures, "prompts_per_s", || furnace_grpo(&a))
}

/// Runs `one` (`--mode furnace`), the peer (`--mode peer`), or both `--repeats` times in
/// child processes and prints the medians and ratios. `figures` are the RESULT keys shown
/// (with whether higher is better); peak RSS is always shown.
fn orchestrate(
    c: &PeerArgs,
    what: &str,
    mut peer_args: Vec<String>,
    figures: &[(&str, bool)],
    headline: &str,
    one: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|t| t.parse::<usize>().ok()).unwrap_or(1);
    match c.mode.as_str() {
        "furnace" => return one(),
        "peer" => {
            let dtype = match c.dtype {
                WeightDType::Bf16 => "bfloat16",
                WeightDType::F32 => "float32",
                WeightDType::Quantized => bail!("the peer trains on bf16 or f32 weights: use --dtype bf16 or f32, or --no-peer"),
            };
            let gguf = furnace_model::resolve_name(&c.model, &mut |m| eprintln!("{m}"))?.path().to_path_buf();
            if gguf.extension().and_then(|e| e.to_str()) != Some("gguf") {
                bail!("the peer loads a .gguf file; {} resolves to {}", c.model, gguf.display());
            }
            peer_args.extend([
                "--gguf".into(),
                gguf.display().to_string(),
                "--dtype".into(),
                dtype.into(),
                "--rank".into(),
                c.rank.to_string(),
                "--lr".into(),
                c.lr.to_string(),
                "--threads".into(),
                threads.to_string(),
            ]);
            let python = c
                .peer_python
                .clone()
                .or_else(|| std::env::var_os("FURNACE_PEER_PYTHON").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PEER_PYTHON));
            let out = std::process::Command::new(&python)
                .arg(&c.peer_script)
                .args(&peer_args)
                .stderr(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running the peer {} {}", python.display(), c.peer_script.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            print!("{text}");
            if !out.status.success() {
                bail!("the peer failed ({}): {} {} {}", out.status, python.display(), c.peer_script.display(), peer_args.join(" "));
            }
            return Ok(());
        }
        "both" => {}
        o => bail!("--mode must be both, furnace or peer, not '{o}'"),
    }
    if c.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let sides: &[&str] = if c.no_peer { &["furnace"] } else { &["furnace", "peer"] };
    let mut keys: Vec<&str> = figures.iter().map(|f| f.0).collect();
    keys.push("peak_rss_gb");
    // got[side][key] = one value per repeat.
    let mut got = vec![vec![Vec::new(); keys.len()]; sides.len()];
    for r in 0..c.repeats {
        for (s, side) in sides.iter().enumerate() {
            eprintln!("== {what} repeat {}/{}: {side}", r + 1, c.repeats);
            let get = rerun_in_mode(side)?;
            for (k, key) in keys.iter().enumerate() {
                got[s][k].push(get(key));
            }
        }
    }
    let med: Vec<Vec<f64>> = got.iter().map(|side| side.iter().map(|v| median(v.clone())).collect()).collect();
    let ratio = |k: usize| if sides.len() == 2 { med[0][k] / med[1][k] } else { f64::NAN };
    if c.json {
        let mut obj = serde_json::json!({
            "bench": what, "model": c.model, "dtype": format!("{:?}", c.dtype), "threads": threads, "repeats": c.repeats,
            "rank": c.rank, "peer": if c.no_peer { serde_json::Value::Null } else { "trl".into() },
        });
        for (s, side) in sides.iter().enumerate() {
            for (k, key) in keys.iter().enumerate() {
                obj[*side][*key] = serde_json::json!({ "median": med[s][k], "repeats": got[s][k] });
            }
        }
        if sides.len() == 2 {
            for (k, key) in keys.iter().enumerate() {
                obj["ratio_furnace_over_peer"][*key] = ratio(k).into();
            }
        }
        println!("{obj}");
        return Ok(());
    }
    println!();
    println!("{what}: {} ({:?}), {threads} threads, LoRA r={}, median of {} repeat(s)", c.model, c.dtype, c.rank, c.repeats);
    println!("{:<28} {:>12} {:>12} {:>16}", "", "furnace", if c.no_peer { "" } else { "TRL+PEFT" }, "furnace / peer");
    for (k, key) in keys.iter().enumerate() {
        let peer = if sides.len() == 2 { format!("{:12.2}", med[1][k]) } else { String::new() };
        let r = if sides.len() == 2 { format!("{:15.2}x", ratio(k)) } else { String::new() };
        println!("{key:<28} {:12.2} {peer:>12} {r:>16}", med[0][k]);
    }
    if sides.len() == 2 {
        let h = keys.iter().position(|k| *k == headline).unwrap_or(0);
        let m = keys.len() - 1;
        println!("SUMMARY {what}: furnace {:.2}x the peer's {headline}, {:.2}x its peak RSS", ratio(h), ratio(m));
    }
    Ok(())
}

fn abs(p: &Path) -> Result<String> {
    Ok(std::path::absolute(p)?.display().to_string())
}

/// The LoRA both sides train, and its initialisation (PEFT's: Kaiming-uniform A, zero B).
fn new_lora(model: &furnace_model::Llama, rank: usize) -> Result<TrainableLora> {
    let cfg = serde_json::from_value(serde_json::json!({ "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS }))?;
    Ok(TrainableLora::new(model, cfg, LoraInit::KaimingUniform, 42)?)
}

fn train_config(c: &PeerArgs, batch: usize, steps: usize, objective: Objective) -> TrainConfig {
    TrainConfig {
        optimizer: AdamWConfig { lr: c.lr, ..Default::default() },
        schedule: ScheduleKind::Constant,
        batch_size: batch,
        max_steps: Some(steps),
        max_grad_norm: Some(1.0),
        seed: 42,
        objective,
        ..Default::default()
    }
}

/// Loads the first `n` rows of `path` as `kind` examples.
fn examples(loaded: &furnace_model::LoadedModel, path: &Path, kind: DataKind, max_len: usize, n: usize) -> Result<Vec<Example>> {
    let template = loaded.chat_template.clone().context("the model has no chat template")?;
    let opts = DataOptions { kind, max_seq_len: max_len, ..Default::default() };
    let mut ex = furnace_train::load_dataset(path, &loaded.tokenizer, &template, &opts)
        .with_context(|| format!("reading {} (run from the repository root or give --data)", path.display()))?
        .examples;
    if ex.len() < n {
        bail!("{} has {} rows, fewer than the {n} asked for", path.display(), ex.len());
    }
    ex.truncate(n);
    Ok(ex)
}

/// Times `total` steps, logging each; returns the metrics and times of the steps after
/// `warmup`.
fn timed_steps(
    warmup: usize,
    total: usize,
    mut step: impl FnMut() -> Result<StepMetrics>,
    show: impl Fn(&StepMetrics) -> String,
) -> Result<Vec<(StepMetrics, f64)>> {
    let mut out = Vec::new();
    for k in 0..total {
        let t = Instant::now();
        let m = step()?;
        let dt = t.elapsed().as_secs_f64();
        eprintln!("step {k} loss {:.4} ms {:.0} {}", m.loss, dt * 1e3, show(&m));
        if k >= warmup {
            out.push((m, dt));
        }
    }
    Ok(out)
}

fn extra(m: &StepMetrics, key: &str) -> f64 {
    m.extra.iter().find(|(k, _)| k == key).map(|x| x.1).unwrap_or(f64::NAN)
}

fn furnace_dpo(a: &DpoBenchArgs) -> Result<()> {
    let c = &a.common;
    let t0 = Instant::now();
    let loaded = load(&c.model, c.dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let examples = examples(&loaded, &a.data, DataKind::Preference, a.max_len, a.pairs)?;
    let frozen = FrozenBase::new(&loaded.model)?;
    let objective = Objective::Dpo(DpoConfig { beta: a.beta, ..Default::default() });
    let mut trainer = Trainer::new(train_config(c, a.batch, a.warmup + a.steps, objective), new_lora(&loaded.model, c.rank)?, &examples)?;
    let mut ref_s = 0.0;
    if a.reference == "precompute" {
        let t = Instant::now();
        let all: Vec<usize> = (0..examples.len()).collect();
        furnace_train::policy::ensure_reference(&frozen, None, &examples, &all)?;
        ref_s = t.elapsed().as_secs_f64();
    }
    let steps = timed_steps(
        a.warmup,
        a.warmup + a.steps,
        || Ok(furnace_train::fused_step_with(&frozen, None, &mut [&mut trainer], &examples)?.remove(0)),
        |m| format!("tokens {} acc {:.2}", m.tokens, extra(m, "rewards/accuracies")),
    )?;
    let secs: f64 = steps.iter().map(|s| s.1).sum();
    let tokens: usize = steps.iter().map(|s| s.0.tokens).sum();
    let n = steps.len().max(1) as f64;
    println!(
        "RESULT dpo side=furnace dtype={:?} pairs={} batch={} max_length={} ref={} steps={} load_s={load_s:.1} ref_s={ref_s:.2} \
         ms_per_step={:.0} tokens_per_step={:.1} tokens_per_s={:.1} last_loss={:.4} peak_rss_gb={:.2}",
        c.dtype,
        a.pairs,
        a.batch,
        a.max_len,
        a.reference,
        steps.len(),
        secs * 1e3 / n,
        tokens as f64 / n,
        tokens as f64 / secs,
        steps.last().map_or(f64::NAN, |s| s.0.loss),
        peak_rss().unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}

fn furnace_grpo(a: &GrpoBenchArgs) -> Result<()> {
    let c = &a.common;
    let t0 = Instant::now();
    let mut loaded = load(&c.model, c.dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let total = a.warmup + a.steps;
    // Longest prompt: the data's own (prompts are never cut here).
    let examples = examples(&loaded, &a.data, DataKind::Prompt, 4096, a.prompts * total)?;
    let frozen = FrozenBase::new(&loaded.model)?;
    let objective = Objective::Grpo(GrpoConfig {
        num_generations: a.generations,
        temperature: a.temperature,
        top_p: 1.0,
        top_k: 0,
        max_completion_length: a.max_completion,
        beta: 0.0,
        loss_type: GrpoLoss::Dapo,
        num_iterations: 1,
        ..Default::default()
    });
    let mut trainer = Trainer::new(train_config(c, a.prompts, total, objective), new_lora(&loaded.model, c.rank)?, &examples)?;
    let reward =
        serde_json::from_value(serde_json::json!({ "kind": "regex", "name": "has_digit", "pattern": REWARD_PATTERN, "value": 1.0 }))?;
    trainer.rewards = Some(std::sync::Arc::new(Rewards::compile(&[reward], Path::new("."))?));
    let furnace_model::LoadedModel { model, tokenizer, .. } = &mut loaded;
    let mut policy = Policy { model, tokenizer, max_batch: SAMPLING_BATCH };
    let steps = timed_steps(
        a.warmup,
        total,
        || Ok(furnace_train::fused_step_with(&frozen, Some(&mut policy), &mut [&mut trainer], &examples)?.remove(0)),
        |m| format!("reward {:.3} mean_length {:.1}", extra(m, "reward"), extra(m, "completions/mean_length")),
    )?;
    let secs: f64 = steps.iter().map(|s| s.1).sum();
    let n = steps.len().max(1) as f64;
    let completions = (a.prompts * a.generations) as f64;
    let comp: f64 = steps.iter().map(|s| extra(&s.0, "completions/mean_length") * completions).sum();
    let reward: f64 = steps.iter().map(|s| extra(&s.0, "reward")).sum::<f64>() / n;
    println!(
        "RESULT grpo side=furnace dtype={:?} prompts={} generations={} max_completion={} steps={} load_s={load_s:.1} \
         ms_per_step={:.0} prompts_per_s={:.3} completion_tokens_per_step={:.1} completion_tokens_per_s={:.1} mean_reward={reward:.3} \
         peak_rss_gb={:.2}",
        c.dtype,
        a.prompts,
        a.generations,
        a.max_completion,
        steps.len(),
        secs * 1e3 / n,
        (a.prompts * steps.len()) as f64 / secs,
        comp / n,
        comp / secs,
        peak_rss().unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}
