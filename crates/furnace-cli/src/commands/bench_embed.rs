//! `furnace bench embed`: sentence-encoder throughput on passages of about 128 tokens, the
//! workload of `scripts/peer_embed.py` (sentence-transformers on PyTorch).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_rag::SentenceEncoder;

use super::bench::{median, peak_rss};

#[derive(Args, Clone)]
pub struct EmbedBenchArgs {
    /// The encoder: alias or folder.
    #[arg(long, short, default_value = "all-minilm-l6-v2")]
    model: String,
    /// Passages to embed per repeat.
    #[arg(long, default_value_t = 512)]
    passages: usize,
    /// How the encoder's weights are held: f32 (exact) or bf16 (faster on CPUs with bf16
    /// dot products).
    #[arg(long, default_value = "f32")]
    dtype: furnace_model::WeightDType,
    /// Passages per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed repeats (the median is reported); one untimed warm-up runs first.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Write the passages here (one per line) for the peer script to read the same texts.
    #[arg(long, default_value = "target/bench-embed-passages.txt")]
    write_passages: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Words the passages are drawn from (English prose words, so WordPiece splits them like
/// real text: about 1.1 tokens per word).
const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "from",
    "data",
    "and",
    "each",
    "training",
    "run",
    "adapter",
    "rank",
    "weights",
    "are",
    "frozen",
    "while",
    "small",
    "matrices",
    "change",
    "retrieval",
    "finds",
    "passages",
    "that",
    "answer",
    "questions",
    "about",
    "documents",
    "in",
    "a",
    "large",
    "corpus",
    "with",
    "vectors",
    "index",
    "search",
    "fast",
    "slow",
    "memory",
    "evaluation",
    "metrics",
    "show",
    "which",
    "configuration",
    "is",
    "better",
    "users",
    "compare",
    "many",
    "runs",
    "at",
    "once",
    "on",
    "one",
    "machine",
    "language",
    "understanding",
    "requires",
    "context",
    "window",
    "tokens",
    "per",
    "second",
    "throughput",
    "latency",
    "batch",
    "size",
    "learning",
    "rate",
    "schedule",
    "warmup",
    "steps",
];

/// `n` passages of 110 words (about 128 WordPiece tokens with [CLS] and [SEP]), from an
/// xorshift64 stream (deterministic).
pub fn passages(n: usize) -> Vec<String> {
    let ids = super::bench::xorshift_ids(n * 110, WORDS.len() as u64, 0x9E37_79B9_7F4A_7C15);
    ids.chunks(110).map(|c| c.iter().map(|&i| WORDS[i as usize]).collect::<Vec<_>>().join(" ") + ".").collect()
}

pub fn run(a: EmbedBenchArgs) -> Result<()> {
    if a.passages == 0 || a.batch_size == 0 || a.repeat == 0 {
        bail!("--passages, --batch-size and --repeat must be at least 1");
    }
    let texts = passages(a.passages);
    if let Some(dir) = a.write_passages.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.write_passages, texts.join("\n") + "\n").with_context(|| format!("writing {}", a.write_passages.display()))?;
    let enc = SentenceEncoder::load_with(&a.model, a.dtype, &mut |l| eprintln!("{l}"))?.with_batch_size(a.batch_size);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let tokens: usize = refs.iter().map(|t| enc.count_tokens(t)).sum::<furnace_rag::Result<usize>>()?;
    enc.embed(&refs[..a.batch_size.min(refs.len())])?;
    let mut rates = Vec::with_capacity(a.repeat);
    for _ in 0..a.repeat {
        let t = Instant::now();
        let out = enc.embed(&refs)?;
        let secs = t.elapsed().as_secs_f64();
        if out.vectors.len() != refs.len() {
            bail!("the encoder returned {} vectors for {} passages", out.vectors.len(), refs.len());
        }
        rates.push(refs.len() as f64 / secs);
    }
    let rate = median(rates.clone());
    let rss = peak_rss().unwrap_or(0);
    let mean_tokens = tokens as f64 / refs.len() as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "dtype": format!("{:?}", a.dtype), "passages": refs.len(), "batch_size": a.batch_size, "mean_tokens": mean_tokens,
                "sentences_per_s": rate, "repeats": rates, "peak_rss_bytes": rss,
                "passages_file": a.write_passages,
            })
        );
    } else {
        println!(
            "{} ({:?}): {} passages of {mean_tokens:.0} tokens, batch {}: {rate:.1} sentences/s (median of {}), peak RSS {:.0} MiB",
            a.model,
            a.dtype,
            refs.len(),
            a.batch_size,
            a.repeat,
            rss as f64 / (1 << 20) as f64
        );
        println!("peer: python3 scripts/peer_embed.py --model <the model folder> --passages {}", a.write_passages.display());
    }
    Ok(())
}
