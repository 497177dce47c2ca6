//! `furnace bench`: speed measurements as programs, not timed tests. Each figure is the
//! median of several repeats, since shared machines are noisy.

use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::Result;
use clap::{Args, Subcommand};
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_model::{Logits, SeqInput, WeightDType};
use std::collections::HashMap;
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Prefill tokens/s (256-token prompt), decode tokens/s at batch 1, and aggregate decode
    /// tokens/s at batch 16.
    Generate(GenBenchArgs),
    /// LoRA SFT tokens/s and peak memory on the workload of `peer_torch.py train`: batch 4 x
    /// 256 xorshift token ids, LoRA r=16 (alpha 32) on all seven projections, AdamW.
    Train(TrainBenchArgs),
    /// A sweep of 8 LoRA configurations (r in {8, 16, 32, 64} x learning rate in {1e-4,
    /// 3e-4}) for one epoch over a fixed dataset, through the experiment driver of `furnace
    /// run`: one experiment of all eight (fused passes), then eight experiments one after
    /// another; prints wall time, tokens/s summed over runs, peak RSS and the time until
    /// every configuration has an eval loss.
    Sweep(SweepBenchArgs),
    /// furnace's bf16 GEMM kernels on the training shapes of a model (forward `x Wᵀ`,
    /// backward `dy W`, LoRA products) in GFLOP/s against `torch.matmul` in bf16 on the same
    /// shapes (`scripts/peer_gemm.py`), and the measured peak of the dot-product instruction.
    Gemm(super::bench_gemm::GemmBenchArgs),
    /// Experimentation throughput: 16 configurations (rank x learning rate x alpha) on the
    /// extraction task, every one trained to the end (round-robin over chunks) versus ASHA,
    /// TPE and PBT; wall time and best final eval loss of each, and the ratios.
    Search(super::bench_search::SearchBenchArgs),
    /// The durability soak test: an experiment whose driver (`furnace run`, a child
    /// process) is SIGKILLed at `--kills` random moments and restarted, with ops recorded
    /// at random times; checks that every run finishes, each metric exists once and equals
    /// an uninterrupted run's, each op is applied once, no run is orphaned and every
    /// checkpoint loads. Exits non-zero on any violation.
    Chaos(super::chaos::ChaosArgs),
    /// Sentence-encoder throughput: passages of about 128 tokens in batches of 32,
    /// sentences/s and peak RSS (the workload of `scripts/peer_embed.py`).
    Embed(super::bench_embed::EmbedBenchArgs),
    /// Vector search: HNSW build time, recall@10 and queries/s for each ef_search, and
    /// exact search queries/s, over random unit vectors (the workload of
    /// `scripts/peer_faiss.py`).
    Index(super::bench_index::IndexBenchArgs),
    /// Load on an OpenAI-compatible server (`furnace serve` or a peer): streamed
    /// `/v1/completions` at a set concurrency; aggregate output tokens/s, time to first
    /// token, inter-token latency, request latency and errors (the workload of
    /// `scripts/peer_llamacpp_server.sh`'s comparison in docs/serving.md).
    Serve(super::bench_serve::ServeBenchArgs),
    /// Evals mode: 4 RAG pipelines (chunk size x k) over 256 questions with the local
    /// generator, batched together (what `furnace run` does) versus one pipeline after
    /// another; questions/s and peak RSS of each, each in its own process.
    Evals(super::bench_evals::EvalsBenchArgs),
    /// `furnace data generate` with the local engine: kept examples/s and tokens/s one
    /// request at a time versus batched (same topic, count, seed and token limit).
    Datagen(super::bench_datagen::DatagenBenchArgs),
    /// DPO against TRL's DPOTrainer + PEFT on PyTorch (`scripts/peer_trl.py`): the first 64
    /// pairs of data/dpo, 4 pairs per step, 96 tokens at most, sigmoid loss (beta 0.1);
    /// tokens/s of the training steps (chosen + rejected, prompts included), the one-off
    /// reference pass apart, and peak RSS, as furnace / peer ratios (medians of repeats).
    Dpo(super::bench_prefs::DpoBenchArgs),
    /// GRPO against TRL's GRPOTrainer + PEFT on PyTorch (`scripts/peer_trl.py`): 2 prompts
    /// of data/grpo x 4 sampled completions per step, 32 tokens at most, temperature 1.0, a
    /// regex reward (a digit in the completion), beta 0, dapo loss; prompts/s and completion
    /// tokens/s with generation included, and peak RSS, as furnace / peer ratios (medians of
    /// repeats).
    Grpo(super::bench_prefs::GrpoBenchArgs),
}

#[derive(Args, Clone)]
pub struct SweepBenchArgs {
    /// Model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How the frozen base is held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Training rows (any dataset format furnace trains on).
    #[arg(long, default_value = "data/extract/train.jsonl")]
    train: std::path::PathBuf,
    /// Eval rows.
    #[arg(long, default_value = "data/extract/eval.jsonl")]
    eval: std::path::PathBuf,
    /// Use only the first N training rows.
    #[arg(long)]
    limit: Option<usize>,
    /// Examples per micro-batch of every run.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Data chunks per epoch, each ending with an eval (the first is the "every config has an
    /// eval loss" time).
    #[arg(long, default_value_t = 4)]
    evals: usize,
    /// fused, sequential, or both (each in its own process, so peak RSS is its own).
    #[arg(long, default_value = "both")]
    mode: String,
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
pub fn peak_rss() -> Option<u64> {
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
        .map(|c| Example { ids: c.to_vec(), labels: c.iter().map(|&t| t as i64).collect(), ..Default::default() })
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
        // The step the experiment driver takes (run_fit steps every run through
        // `fused_step`; here one run).
        let s = furnace_train::fused_step(&frozen, &mut [&mut trainer], &examples)?.remove(0);
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

pub fn median(mut xs: Vec<f64>) -> f64 {
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
fn decode_rate(loaded: &furnace_model::LoadedModel, batch: usize, new: usize, prompt_len: usize) -> Result<f64> {
    let vocab = loaded.model.config.vocab_size as u64;
    let mut engine =
        Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions { max_batch: batch, prefill_chunk: 4096, prefix_cache_bytes: 0 });
    for b in 0..batch {
        engine.add(Request {
            prompt: xorshift_ids(prompt_len, vocab, 7 + b as u64),
            params: SamplingParams { max_tokens: new, stop_at_eos: false, ..SamplingParams::greedy(new) },
            adapter: None,
            constraint: None,
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
        BenchCmd::Sweep(a) => bench_sweep(a),
        BenchCmd::Gemm(a) => super::bench_gemm::run(a),
        BenchCmd::Search(a) => super::bench_search::run(a),
        BenchCmd::Chaos(a) => super::chaos::run(a),
        BenchCmd::Embed(a) => super::bench_embed::run(a),
        BenchCmd::Index(a) => super::bench_index::run(a),
        BenchCmd::Serve(a) => super::bench_serve::run(a),
        BenchCmd::Evals(a) => super::bench_evals::run(a),
        BenchCmd::Datagen(a) => super::bench_datagen::run(a),
        BenchCmd::Dpo(a) => super::bench_prefs::run_dpo(a),
        BenchCmd::Grpo(a) => super::bench_prefs::run_grpo(a),
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
            adapter: None,
        }])?;
    }
    let mut prefill = Vec::new();
    for _ in 0..repeat {
        let mut cache = loaded.model.new_cache();
        let t = Instant::now();
        loaded.model.forward(&mut [SeqInput { tokens: &prompt, cache: &mut cache, logits: Logits::Last, adapter: None }])?;
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
        println!("decode batch 1 ({} new after {} prompt): {d1:8.1} tokens/s", a.new_tokens, a.decode_prompt_len);
        println!("decode batch {} (aggregate): {db:8.1} tokens/s  ({:.2}x batch 1)", a.batch, db / d1);
        println!("(median of {repeat} repeats)");
    }
    Ok(())
}

/// One measured sweep: `(wall s, tokens summed over runs, s until every run has an eval
/// loss, final eval loss per run)`.
type SweepOutcome = (f64, usize, f64, Vec<f64>);

/// The sweep's configurations: (rank, learning rate).
const SWEEP: [(usize, f64); 8] = [(8, 1e-4), (8, 3e-4), (16, 1e-4), (16, 3e-4), (32, 1e-4), (32, 3e-4), (64, 1e-4), (64, 3e-4)];

/// A spec for `configs` (one `[[group]]` each: rank, alpha = 2 x rank, learning rate).
fn sweep_spec(a: &SweepBenchArgs, train: &std::path::Path, configs: &[(usize, f64)]) -> Result<String> {
    let abs = |p: &std::path::Path| -> Result<String> { Ok(std::path::absolute(p)?.display().to_string().replace('\\', "/")) };
    let quantize = match a.dtype {
        WeightDType::F32 => "none",
        WeightDType::Bf16 => "bf16",
        WeightDType::Quantized => "q4",
    };
    let mut spec = format!(
        "[experiment]\nname = \"bench-sweep\"\nseed = 42\nnum_chunks = {}\n\n[data]\ntrain = \"{}\"\neval = \"{}\"\n\n\
         [model]\nbase = \"{}\"\nquantize = \"{quantize}\"\n\n[lora]\nr = 8\nalpha = 16\ntargets = [\"all-linear\"]\n\n\
         [trainer]\nlearning_rate = 1e-4\nepochs = 1\nbatch_size = {}\nmax_seq_len = 256\nschedule = \"linear\"\n",
        a.evals.max(1),
        abs(train)?,
        abs(&a.eval)?,
        a.model.replace('\\', "/"),
        a.batch
    );
    for (r, lr) in configs {
        spec.push_str(&format!("\n[[group]]\n[group.lora]\nr = {r}\nalpha = {}\n[group.trainer]\nlearning_rate = {lr:e}\n", 2 * r));
    }
    Ok(spec)
}

/// The sweep through the experiment driver (`Experiment::start`, as `furnace run`): fused,
/// one experiment of all eight configs; sequential, eight one-config experiments one after
/// another. Evals come at chunk ends (`--evals` chunks).
fn run_sweep(a: &SweepBenchArgs, fused: bool) -> Result<SweepOutcome> {
    use furnace_exp::{Event, Experiment, FitOptions, StartOptions};
    let dir = tempfile::tempdir()?;
    let train = match a.limit {
        Some(n) => {
            let path = dir.path().join("train.jsonl");
            let rows: Vec<String> = furnace_train::data::read_rows(&a.train)?
                .into_iter()
                .filter_map(|(_, r)| r.ok())
                .take(n.max(1))
                .map(|r| r.to_string())
                .collect();
            std::fs::write(&path, rows.join("\n") + "\n")?;
            path
        }
        None => a.train.clone(),
    };
    let loaded = load(&a.model, a.dtype)?;
    let specs: Vec<String> = if fused {
        vec![sweep_spec(a, &train, &SWEEP)?]
    } else {
        SWEEP.iter().map(|c| sweep_spec(a, &train, std::slice::from_ref(c))).collect::<Result<_>>()?
    };
    let runs_dir = dir.path().join("runs");
    let mut last: HashMap<i64, f64> = HashMap::new();
    let mut first_all = None;
    let mut tokens = 0usize;
    let t0 = Instant::now();
    for (k, text) in specs.iter().enumerate() {
        let spec_path = dir.path().join(format!("sweep-{k}.toml"));
        std::fs::write(&spec_path, text)?;
        let exp = Experiment::create(&runs_dir, &spec_path)?;
        let model = loaded.clone();
        let mut running =
            exp.start(StartOptions { fit: FitOptions::default(), loader: Box::new(move |_: &str, _| Ok(model.clone())), events: None })?;
        while let Some(ev) = running.next_event() {
            match ev {
                Event::Metric { run_id, name, value, .. } if name == "eval_loss" => {
                    last.insert(run_id, value);
                    if first_all.is_none() && last.len() == SWEEP.len() {
                        first_all = Some(t0.elapsed().as_secs_f64());
                    }
                }
                Event::Metric { name, value, .. } if name == "tokens" => tokens += value as usize,
                Event::Progress { steps_done, total_steps, .. } if fused => eprint!("\rfused step {steps_done}/{total_steps}   "),
                _ => {}
            }
        }
        running.wait()?;
        if !fused {
            eprintln!("sequential run {}/{} done", k + 1, specs.len());
        }
    }
    eprintln!();
    let evals = last.into_iter().collect::<std::collections::BTreeMap<_, _>>().into_values().collect();
    Ok((t0.elapsed().as_secs_f64(), tokens, first_all.unwrap_or(f64::NAN), evals))
}

fn bench_sweep(a: SweepBenchArgs) -> Result<()> {
    if a.mode == "fused" || a.mode == "sequential" {
        let (wall, tokens, first, evals) = run_sweep(&a, a.mode == "fused")?;
        println!(
            "RESULT sweep mode={} runs=8 wall_s={wall:.1} tokens_per_s={:.1} first_eval_all_s={first:.1} peak_rss_gb={:.2} eval_losses={}",
            a.mode,
            tokens as f64 / wall,
            peak_rss().unwrap_or(0) as f64 / 1e9,
            evals.iter().map(|l| format!("{l:.4}")).collect::<Vec<_>>().join(",")
        );
        return Ok(());
    }
    if a.mode != "both" {
        anyhow::bail!("--mode must be fused, sequential or both, not '{}'", a.mode);
    }
    // Each mode in its own process, so that each peak RSS is its own.
    let mut results = Vec::new();
    for mode in ["fused", "sequential"] {
        let get = rerun_in_mode(mode)?;
        results.push((get("wall_s"), get("peak_rss_gb"), get("first_eval_all_s")));
    }
    let (f, q) = (results[0], results[1]);
    println!(
        "SUMMARY fused vs sequential: {:.2}x faster, {:.2}x the memory, every config has an eval loss {:.2}x sooner",
        q.0 / f.0,
        f.1 / q.1,
        q.2 / f.2
    );
    Ok(())
}

/// Runs this same command line again with `--mode` set to `mode`, in a child process (so
/// its peak RSS is its own); prints what it printed and returns a reader of its
/// `key=value` figures.
pub fn rerun_in_mode(mode: &str) -> Result<impl Fn(&str) -> f64> {
    let exe = std::env::current_exe()?;
    let mut args = Vec::new();
    let mut skip_next = false;
    for x in std::env::args().skip(1) {
        if std::mem::take(&mut skip_next) || x.starts_with("--mode=") {
            continue;
        }
        if x == "--mode" {
            skip_next = true;
            continue;
        }
        args.push(x);
    }
    args.push(format!("--mode={mode}"));
    let out = std::process::Command::new(&exe).args(&args).stderr(std::process::Stdio::inherit()).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    if !out.status.success() {
        anyhow::bail!("the {mode} run failed");
    }
    Ok(move |k: &str| -> f64 {
        text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    })
}
