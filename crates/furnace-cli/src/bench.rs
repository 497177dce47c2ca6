//! `furnace bench`: speed measurements as programs, not timed tests. Each figure is the
//! median of several repeats, since shared machines are noisy.

use crate::commands::{load, DEFAULT_MODEL};
use anyhow::Result;
use clap::{Args, Subcommand};
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_model::{Logits, SeqInput, WeightDType};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill tokens/s (256-token prompt), decode tokens/s at batch 1, and aggregate decode
    /// tokens/s at batch 16.
    Generate(GenBenchArgs),
    /// LoRA SFT tokens/s and peak memory on the workload of `peer_torch.py train`: batch 4 x
    /// 256 xorshift token ids, LoRA r=16 (alpha 32) on all seven projections, AdamW.
    Train(TrainBenchArgs),
}

#[derive(Args)]
pub struct TrainBenchArgs {
    /// Model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How the frozen base is held: f32, bf16, quantized.
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench_train(a: TrainBenchArgs) -> Result<()> {
    use furnace_train::{AdamWConfig, Example, LoraInit, ScheduleKind, TrainConfig, TrainableLora, Trainer};
    let loaded = load(&a.model, a.dtype)?;
    let vocab = loaded.model.config.vocab_size as u64;
    let ids = xorshift_ids(a.batch * a.seq, vocab, 42);
    let examples: Vec<Example> = ids
        .chunks(a.seq)
        .map(|c| Example { ids: c.to_vec(), labels: c.iter().map(|&t| t as i64).collect() })
        .collect();
    let cfg = serde_json::from_value(serde_json::json!({
        "r": a.rank, "lora_alpha": 2 * a.rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }))?;
    let lora = TrainableLora::new(&loaded.model, cfg, LoraInit::KaimingUniform, 42)?;
    let frozen = furnace_train::FrozenBase::new(&loaded.model)?;
    let mut trainer = Trainer::new(
        TrainConfig {
            optimizer: AdamWConfig { lr: 2e-4, ..Default::default() },
            schedule: ScheduleKind::Constant,
            batch_size: a.batch,
            max_steps: Some(a.warmup + a.steps),
            max_grad_norm: None,
            ..Default::default()
        },
        lora,
        &examples,
    )?;
    let mut times = Vec::new();
    for step in 0..a.warmup + a.steps {
        let t = Instant::now();
        let s = trainer.step(&frozen, &examples)?;
        let dt = t.elapsed().as_secs_f64();
        eprintln!("step {step} loss {:.4} ms {:.0}", s.loss, dt * 1e3);
        if step >= a.warmup {
            times.push(dt);
        }
    }
    let med = median(times);
    println!(
        "RESULT train dtype={:?} batch={} seq={} rank={} ms_per_step={:.0} tokens_per_s={:.1} peak_rss_gb={:.2}",
        a.dtype,
        a.batch,
        a.seq,
        a.rank,
        med * 1e3,
        (a.batch * a.seq) as f64 / med,
        peak_rss().unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}

#[derive(Args)]
pub struct GenBenchArgs {
    /// Model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How weights are held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 256)]
    prompt_len: usize,
    /// New tokens per sequence in the decode measurements.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Prompt tokens in the cache before the decode measurements start.
    #[arg(long, default_value_t = 16)]
    decode_prompt_len: usize,
    /// Sequences in the batched decode measurement.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Repeats of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Deterministic pseudo-random ids (xorshift64), the same as the peer script's.
pub fn xorshift_ids(n: usize, vocab: u64, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab) as u32
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Decode tokens/s of `batch` sequences generating `new` tokens each, counting only the
/// steps after every prompt is in the cache.
fn decode_rate(
    loaded: &furnace_model::LoadedModel,
    batch: usize,
    new: usize,
    prompt_len: usize,
) -> Result<f64> {
    let vocab = loaded.model.config.vocab_size as u64;
    let mut engine = Engine::new(
        &loaded.model,
        &loaded.tokenizer,
        EngineOptions {
            max_batch: batch,
            prefill_chunk: 4096,
        },
    );
    for b in 0..batch {
        engine.add(Request {
            prompt: xorshift_ids(prompt_len, vocab, 7 + b as u64),
            params: SamplingParams {
                max_tokens: new,
                stop_at_eos: false,
                ..SamplingParams::greedy(new)
            },
        })?;
    }
    // First step: prefill of every prompt plus the first new token.
    engine.step(&mut |_| {})?;
    let mut tokens = 0usize;
    let t0 = Instant::now();
    while engine.has_work() {
        engine.step(&mut |ev| {
            if matches!(ev, furnace_generate::Event::Token { .. }) {
                tokens += 1;
            }
        })?;
    }
    Ok(tokens as f64 / t0.elapsed().as_secs_f64())
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => bench_generate(a),
        BenchCmd::Train(a) => bench_train(a),
    }
}

fn bench_generate(a: GenBenchArgs) -> Result<()> {
    let t0 = Instant::now();
    let loaded = load(&a.model, a.dtype)?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = loaded.model.config.vocab_size as u64;
    let prompt = xorshift_ids(a.prompt_len, vocab, 42);
    let repeat = a.repeat.max(1);
    // Warm-up: first-touch of weights and allocator pages.
    {
        let mut cache = loaded.model.new_cache();
        loaded.model.forward(&mut [SeqInput {
            tokens: &prompt[..prompt.len().min(32)],
            cache: &mut cache,
            logits: Logits::Last,
        }])?;
    }
    let mut prefill = Vec::new();
    for _ in 0..repeat {
        let mut cache = loaded.model.new_cache();
        let t = Instant::now();
        loaded.model.forward(&mut [SeqInput {
            tokens: &prompt,
            cache: &mut cache,
            logits: Logits::Last,
        }])?;
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    let mut dec1 = Vec::new();
    let mut decb = Vec::new();
    for _ in 0..repeat {
        dec1.push(decode_rate(&loaded, 1, a.new_tokens, a.decode_prompt_len)?);
        decb.push(decode_rate(&loaded, a.batch, a.new_tokens, a.decode_prompt_len)?);
    }
    let (p, d1, db) = (median(prefill), median(dec1), median(decb));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "dtype": format!("{:?}", a.dtype), "threads": std::env::var("RAYON_NUM_THREADS").ok(),
                "load_s": load_s, "prefill_tokens_per_s": p, "decode_batch1_tokens_per_s": d1,
                "batch": a.batch, "decode_batch_tokens_per_s": db, "batch_speedup": db / d1,
            })
        );
    } else {
        println!("model: {} ({:?} weights, loaded in {load_s:.1}s)", a.model, a.dtype);
        println!("prefill ({} tokens):        {p:8.1} tokens/s", a.prompt_len);
        println!(
            "decode batch 1 ({} new after {} prompt): {d1:8.1} tokens/s",
            a.new_tokens, a.decode_prompt_len
        );
        println!(
            "decode batch {} (aggregate): {db:8.1} tokens/s  ({:.2}x batch 1)",
            a.batch,
            db / d1
        );
        println!("(median of {repeat} repeats)");
    }
    Ok(())
}
