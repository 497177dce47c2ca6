//! `furnace data`: dataset tools. `stats` reads a dataset as `furnace train` would and
//! reports rows, row forms, bad rows (file:line and why), a token-length histogram, the
//! completion-token share and the rows `max_seq_len` would truncate.

use crate::args::ModelArg;
use crate::models::load;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use furnace_model::WeightDType;
use furnace_train::data::{stats, DataKind, DataOptions, DataStats};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows, row forms, bad rows, token lengths (a histogram), completion-token share and
    /// truncated rows of a dataset, as `furnace train` would read it.
    Stats(StatsArgs),
    /// Split train/validation with a seed, filter by token length, deduplicate (exact and
    /// MinHash near-duplicates), convert between JSONL/CSV/Parquet and between chat,
    /// prompt/completion and instruction forms, preview the chat template on a row.
    Prepare(crate::commands::data_prepare::PrepareArgs),
    /// Synthetic examples from a local model or an OpenAI-compatible endpoint, constrained
    /// to a JSON schema, deduplicated, written as a dataset `furnace train` takes.
    Generate(crate::commands::data_generate::GenerateArgs),
}

#[derive(Args)]
struct StatsArgs {
    /// The dataset: JSONL, JSON, CSV or Parquet.
    file: PathBuf,
    /// The model whose tokenizer and chat template format the rows.
    #[command(flatten)]
    model: ModelArg,
    /// The training length the rows are checked against.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// What the rows are for: sft, dpo (prompt + chosen + rejected) or grpo (prompts).
    #[arg(long, default_value = "sft")]
    kind: String,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Stats(s) => run_stats(s),
        DataCommand::Prepare(p) => crate::commands::data_prepare::run(p),
        DataCommand::Generate(g) => crate::commands::data_generate::run(g),
    }
}

/// `count` as a bar of at most `width` blocks relative to `max`.
fn bar(count: usize, max: usize, width: usize) -> String {
    let n = if max == 0 { 0 } else { (count * width).div_ceil(max) };
    "█".repeat(n)
}

/// Bins of the lengths: at most 10 equal bins from the shortest to the longest.
fn histogram(lengths: &[usize]) -> Vec<(usize, usize, usize)> {
    let (min, max) = (lengths.iter().copied().min().unwrap_or(0), lengths.iter().copied().max().unwrap_or(0));
    let width = (max - min + 1).div_ceil(10).max(1);
    let n = (max - min + 1).div_ceil(width);
    let mut bins: Vec<(usize, usize, usize)> = (0..n).map(|i| (min + i * width, min + (i + 1) * width, 0)).collect();
    for &l in lengths {
        bins[((l - min) / width).min(n - 1)].2 += 1;
    }
    bins
}

fn run_stats(a: StatsArgs) -> Result<()> {
    let kind = match a.kind.as_str() {
        "sft" => DataKind::Sft,
        "dpo" => DataKind::Preference,
        "grpo" => DataKind::Prompt,
        o => bail!("--kind {o}: use sft, dpo or grpo"),
    };
    if !a.file.is_file() {
        bail!("{}: no such file", a.file.display());
    }
    let loaded = load(&a.model.model, WeightDType::Quantized)?;
    let Some(template) = loaded.chat_template.clone() else { bail!("{} has no chat template: rows are formatted with it", a.model.model) };
    let opts = DataOptions { kind, max_seq_len: a.max_seq_len, ..DataOptions::default() };
    let s = stats(&a.file, &loaded.tokenizer, &template, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print_stats(&a, &s)
}

fn print_stats(a: &StatsArgs, s: &DataStats) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let good = s.lengths.len();
    writeln!(out, "{}: {} rows, {} usable as {}, {} bad", a.file.display(), s.rows, good, a.kind, s.bad.len())?;
    let forms: Vec<String> = s.forms.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(out, "forms: {}", forms.join(", "))?;
    for (line, why) in s.bad.iter().take(10) {
        writeln!(out, "  bad row {}:{line}: {why}", a.file.display())?;
    }
    if s.bad.len() > 10 {
        writeln!(out, "  ... and {} more bad rows", s.bad.len() - 10)?;
    }
    if good == 0 {
        return Ok(());
    }
    let mut sorted = s.lengths.clone();
    sorted.sort_unstable();
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let mean = sorted.iter().sum::<usize>() as f64 / good as f64;
    writeln!(
        out,
        "tokens per example ({}): min {}, median {}, mean {mean:.1}, p95 {}, max {}",
        loaded_name(a),
        sorted[0],
        pct(0.5),
        pct(0.95),
        sorted[good - 1]
    )?;
    let bins = histogram(&s.lengths);
    let top = bins.iter().map(|b| b.2).max().unwrap_or(0);
    for (lo, hi, n) in bins {
        writeln!(out, "  {lo:>6}-{:<6} {n:>7}  {}", hi.saturating_sub(1), bar(n, top, 40))?;
    }
    let share = if s.tokens == 0 { 0.0 } else { 100.0 * s.completion_tokens as f64 / s.tokens as f64 };
    writeln!(out, "completion tokens: {} of {} ({share:.1}%) carry the loss", s.completion_tokens, s.tokens)?;
    writeln!(out, "longer than max_seq_len = {}: {} rows (cut at the end when training)", a.max_seq_len, s.truncated)?;
    Ok(())
}

fn loaded_name(a: &StatsArgs) -> &str {
    &a.model.model
}
