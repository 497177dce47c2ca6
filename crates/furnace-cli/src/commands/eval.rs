//! `furnace eval`: a model, optionally with an adapter, evaluated on a dataset: perplexity
//! and generation metrics (`furnace_evals::model_eval`), written as `eval/metrics.json` and
//! `eval/predictions.jsonl` into a run folder.

use crate::args::ModelArg;
use crate::models::load;
use anyhow::{Context, Result};
use clap::Args;
use furnace_evals::model_eval::{self, ModelEvalOptions};
use furnace_model::WeightDType;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A PEFT LoRA adapter directory to evaluate with (a run's `adapter/`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The dataset: JSONL, JSON, CSV or Parquet rows in chat, prompt/completion or
    /// instruction form (as `furnace train` reads them).
    #[arg(long)]
    data: PathBuf,
    /// Comma-separated metrics: ppl (perplexity of the completions), exact_match, contains,
    /// token_f1, rouge_l, bleu, json_valid, numeric, length (of the greedy answers).
    #[arg(long, default_value = "ppl", value_delimiter = ',')]
    metrics: Vec<String>,
    /// Most tokens of a generated answer.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Evaluate the first N rows only.
    #[arg(long)]
    limit: Option<usize>,
    /// Perplexity over every token of each row, not only the completion's.
    #[arg(long)]
    all_tokens: bool,
    /// Longest sequence in tokens (longer rows are cut at the end).
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// How weights are held: f32 (matches PyTorch), bf16, quantized.
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// The run folder to write `eval/` into (default: the adapter's run folder when the
    /// adapter is a run's `adapter/`, else `runs/eval-<unix time>`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The run folder the results go to.
fn out_dir(a: &EvalArgs) -> PathBuf {
    if let Some(o) = &a.out {
        return o.clone();
    }
    if let Some(run) = a.adapter.as_deref().filter(|d| d.file_name().is_some_and(|n| n == "adapter")).and_then(Path::parent) {
        if run.join("metrics.jsonl").is_file() || run.join("spec.toml").is_file() {
            return run.to_path_buf();
        }
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("eval-{secs}"))
}

pub fn run(a: EvalArgs) -> Result<()> {
    model_eval::check_metrics(&a.metrics)?;
    if !a.data.is_file() {
        anyhow::bail!("--data {}: no such file", a.data.display());
    }
    let adapter = a.adapter.as_deref().map(furnace_model::load_adapter).transpose().context("--adapter")?;
    let mut model = load(&a.model.model, a.dtype)?;
    let opts = ModelEvalOptions {
        metrics: a.metrics.clone(),
        max_tokens: a.max_tokens,
        limit: a.limit,
        all_tokens: a.all_tokens,
        columns: Default::default(),
        max_seq_len: a.max_seq_len,
    };
    let bar = ProgressBar::hidden();
    if a.metrics.iter().any(|m| m != "ppl") {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} answers  [{elapsed_precise} < {eta_precise}]")
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let result = model_eval::evaluate_model(&mut model, adapter.as_ref(), &a.data, &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let dir = out_dir(&a).join("eval");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = serde_json::json!({
        "model": a.model.model,
        "adapter": a.adapter,
        "data": a.data,
        "metrics": result.metrics,
        "options": { "max_tokens": a.max_tokens, "limit": a.limit, "all_tokens": a.all_tokens, "dtype": format!("{:?}", a.dtype) },
    });
    write_whole(&dir.join("metrics.json"), &serde_json::to_string_pretty(&summary)?)?;
    let lines: Vec<String> = result.predictions.iter().map(|p| p.to_string()).collect();
    write_whole(&dir.join("predictions.jsonl"), &(lines.join("\n") + "\n"))?;
    let mut out = std::io::stdout().lock();
    for (k, v) in &result.metrics {
        writeln!(out, "{k:<12} {v:.6}")?;
    }
    writeln!(out, "wrote {} and {}", dir.join("metrics.json").display(), dir.join("predictions.jsonl").display())?;
    Ok(())
}

/// Writes a file whole: beside it first, then renamed into place.
fn write_whole(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
