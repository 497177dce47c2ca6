//! `furnace data generate`: synthetic datasets (`furnace_evals::synth`) from a local model
//! (batched, JSON-schema constrained decoding) or an OpenAI-compatible endpoint
//! (`response_format` json_schema), deduplicated, written as JSONL rows `furnace train`
//! reads.

use crate::models::load;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_evals::openai::OpenAiConfig;
use furnace_evals::synth::{self, Format, LocalGenerator, OpenAiSynth, Source, SynthGenerator, SynthOptions, SynthReport};
use furnace_model::WeightDType;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    /// What the examples are about (or give --docs).
    #[arg(long, conflicts_with = "docs", required_unless_present = "docs")]
    topic: Option<String>,
    /// Documents (a folder, files or a glob: txt, md, html, pdf, jsonl, csv, parquet); each
    /// example is grounded in one chunk of them and names it in its `source` column.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Characters per document chunk (with --docs).
    #[arg(long, default_value_t = 1200)]
    chunk_chars: usize,
    /// Distinct examples to write.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Row form: instruction (instruction, input, output), qa (written as prompt,
    /// completion) or chat (messages).
    #[arg(long, default_value = "instruction")]
    format: String,
    /// A JSON schema file that replaces the format's schema; rows are written as produced.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// The local model: an alias (pulled on first use), a .gguf file, or an HF model
    /// directory (ignored with --openai-url).
    #[arg(long, short, default_value = crate::args::DEFAULT_MODEL)]
    model: String,
    /// How the local model's weights are held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Requests per round: the local engine's batch (sequences decoded together), or API
    /// requests sent before the next round.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// An OpenAI-compatible API's root (e.g. http://127.0.0.1:8000/v1) to generate with
    /// instead of a local model.
    #[arg(long, requires = "openai_model")]
    openai_url: Option<String>,
    /// The model name sent to the API.
    #[arg(long, requires = "openai_url")]
    openai_model: Option<String>,
    /// The environment variable holding the API key.
    #[arg(long)]
    api_key_env: Option<String>,
    /// API requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most tokens per example.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (higher: more varied examples).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Seed of the prompts' variation and of sampling (same seed, same rows).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Word-bigram Jaccard similarity at which an example counts as a near duplicate of a
    /// kept one (above 1 turns the near-duplicate filter off).
    #[arg(long, default_value_t = 0.7)]
    near_dup: f64,
    /// Kept examples shown in each prompt as ones to differ from (helps capable models;
    /// small ones such as SmolLM2-135M tend to copy them, making duplicates).
    #[arg(long, default_value_t = 0)]
    show_previous: usize,
    /// Most requests in all, kept or not (default 4 x count + 16).
    #[arg(long)]
    max_attempts: Option<usize>,
    /// The JSONL file to write.
    #[arg(long, short, default_value = "synthetic.jsonl")]
    out: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let format: Format = a.format.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let schema = a
        .schema
        .as_deref()
        .map(|p| -> Result<serde_json::Value> {
            let text = std::fs::read_to_string(p).with_context(|| format!("--schema {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("--schema {}: not JSON", p.display()))
        })
        .transpose()?;
    let source = match (&a.topic, &a.docs) {
        (Some(t), _) => Source::Topic(t.clone()),
        (None, Some(d)) => {
            let report = furnace_rag::docs::load_documents(&[d], &Default::default()).with_context(|| format!("--docs {}", d.display()))?;
            for (path, why) in &report.skipped {
                eprintln!("skipped {}: {why}", path.display());
            }
            let chunks = synth::doc_chunks(&report.documents, a.chunk_chars).context("--chunk-chars")?;
            eprintln!("{} chunks from {} documents", chunks.len(), report.documents.len());
            Source::Docs(chunks)
        }
        (None, None) => bail!("give --topic or --docs"),
    };
    let opts = SynthOptions {
        format,
        schema,
        count: a.count,
        max_attempts: a.max_attempts,
        batch: a.batch,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        near_dup: a.near_dup,
        show_previous: a.show_previous,
    };
    let report = match &a.openai_url {
        Some(url) => {
            let model = a.openai_model.clone().unwrap_or_default();
            let cfg =
                OpenAiConfig { api_key_env: a.api_key_env.clone(), concurrency: a.concurrency, ..OpenAiConfig::new(url.clone(), model) };
            let schema = opts.effective_schema(false);
            let mut gen = OpenAiSynth::new(cfg, &schema, opts.schema.is_none()).map_err(flag_error)?;
            run_with(&mut gen, &source, &schema, &opts)?
        }
        None => {
            let model = load(&a.model, a.dtype)?;
            let schema = opts.effective_schema(true);
            let mut gen = LocalGenerator::new(&model, &schema, a.batch)?;
            run_with(&mut gen, &source, &schema, &opts)?
        }
    };
    if report.rows.is_empty() {
        bail!(
            "no example was kept after {} requests ({} cut at --max-tokens, {} invalid JSON, {} schema failures, {} duplicates, {} near duplicates, {} failed); try more --max-tokens or --max-attempts",
            report.counts.attempts,
            report.counts.truncated,
            report.counts.invalid_json,
            report.counts.schema_failures,
            report.counts.duplicates,
            report.counts.near_duplicates,
            report.counts.failed
        );
    }
    synth::write_jsonl(&a.out, &report.rows)?;
    if report.hit_attempts_bound {
        eprintln!(
            "warning: stopped at {} requests (--max-attempts) with {} of {} examples",
            report.counts.attempts,
            report.rows.len(),
            a.count
        );
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut s = report.summary();
        s["out"] = serde_json::json!(a.out);
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        let c = &report.counts;
        writeln!(out, "requested        {}", c.requested)?;
        writeln!(out, "requests         {}", c.attempts)?;
        writeln!(out, "generated        {}", c.generated)?;
        writeln!(out, "failed           {}", c.failed)?;
        writeln!(out, "truncated        {}", c.truncated)?;
        writeln!(out, "invalid json     {}", c.invalid_json)?;
        writeln!(out, "schema failures  {}", c.schema_failures)?;
        writeln!(out, "duplicates       {}", c.duplicates)?;
        writeln!(out, "near duplicates  {}", c.near_duplicates)?;
        writeln!(out, "written          {}", report.rows.len())?;
        writeln!(out, "seconds          {:.2}", report.seconds)?;
        writeln!(out, "examples/s       {:.3}", report.examples_per_sec())?;
        writeln!(out, "wrote {}", a.out.display())?;
    }
    Ok(())
}

/// A setting the library names (`count`, `generator.concurrency`) as the flag that sets it.
fn flag_error(e: furnace_evals::Error) -> anyhow::Error {
    match e {
        furnace_evals::Error::Spec { key, msg } => {
            let flag = match key.rsplit('.').next().unwrap_or(&key) {
                "base_url" => "openai-url".to_string(),
                "model" => "openai-model".to_string(),
                k => k.replace('_', "-"),
            };
            anyhow::anyhow!("--{flag}: {msg}")
        }
        e => e.into(),
    }
}

/// Runs the loop with a progress bar on stderr.
fn run_with(gen: &mut dyn SynthGenerator, source: &Source, schema: &serde_json::Value, opts: &SynthOptions) -> Result<SynthReport> {
    let bar = ProgressBar::new(opts.count as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} examples  {msg}  [{elapsed_precise} < {eta_precise}]")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let report = synth::synthesize(gen, source, schema, opts, &mut |c| {
        bar.set_position(c.kept as u64);
        bar.set_message(format!(
            "{} requests, {} invalid, {} dup",
            c.attempts,
            c.truncated + c.invalid_json + c.schema_failures,
            c.duplicates + c.near_duplicates
        ));
    })
    .map_err(flag_error)?;
    bar.finish_and_clear();
    Ok(report)
}
