//! `furnace eval`: a model, optionally with an adapter, evaluated on a dataset: perplexity
//! and generation metrics (`furnace_evals::model_eval`), written as `eval/metrics.json` and
//! `eval/predictions.jsonl` into a run folder.

use crate::args::{resolve_adapter, ModelArg, RunsDir};
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
    /// A LoRA adapter to evaluate with: a PEFT directory (a run's `adapter/`), or a name or
    /// tag in the adapter registry of --runs-dir (`furnace adapters list`).
    #[arg(long, value_name = "DIR|NAME")]
    adapter: Option<String>,
    #[command(flatten)]
    dir: RunsDir,
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
    /// Score each answer with an LLM judge at this OpenAI-compatible API's root (e.g.
    /// http://127.0.0.1:8000/v1): a 1-5 score per row, their mean as the `judge` metric.
    /// The answers are generated for it (greedy, as for the other generation metrics).
    #[arg(long, requires = "judge_model")]
    judge_url: Option<String>,
    /// The judge model's name at --judge-url.
    #[arg(long)]
    judge_model: Option<String>,
    /// A rubric file for the judge (minijinja over question, reference, prediction) that
    /// asks for a score from 1 to 5 (default: a correctness-and-helpfulness rubric).
    #[arg(long)]
    judge_prompt: Option<PathBuf>,
    /// The environment variable holding the judge API's key.
    #[arg(long)]
    judge_api_key_env: Option<String>,
    /// Ask the judge for a free-text score instead of `{"score": N}` via response_format
    /// (for APIs without structured output).
    #[arg(long)]
    judge_plain: bool,
    /// The run folder to write `eval/` into (default: the adapter's run folder when the
    /// adapter is a run's `adapter/`, else `<--runs-dir>/eval-<unix time>`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The run folder the results go to.
fn out_dir(a: &EvalArgs, adapter: Option<&Path>) -> PathBuf {
    if let Some(o) = &a.out {
        return o.clone();
    }
    if let Some(run) = adapter.filter(|d| d.file_name().is_some_and(|n| n == "adapter")).and_then(Path::parent) {
        if run.join("metrics.jsonl").is_file() || run.join("spec.toml").is_file() {
            return run.to_path_buf();
        }
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    a.dir.runs_dir.join(format!("eval-{secs}"))
}

pub fn run(a: EvalArgs) -> Result<()> {
    model_eval::check_metrics(&a.metrics)?;
    let judge = judge_options(&a)?;
    if !a.data.is_file() {
        anyhow::bail!("--data {}: no such file", a.data.display());
    }
    let adapter_dir = a.adapter.as_deref().map(|g| resolve_adapter(g, &a.dir)).transpose()?;
    let adapter = adapter_dir.as_deref().map(furnace_model::load_adapter).transpose().context("--adapter")?;
    let mut model = load(&a.model.model, a.dtype)?;
    let mut metrics = a.metrics.clone();
    if judge.is_some() && metrics.iter().all(|m| m == "ppl") {
        // The judge scores answers: generate them (their length comes along).
        metrics.push("length".into());
    }
    let opts = ModelEvalOptions {
        metrics: metrics.clone(),
        max_tokens: a.max_tokens,
        limit: a.limit,
        all_tokens: a.all_tokens,
        columns: Default::default(),
        max_seq_len: a.max_seq_len,
    };
    let bar = ProgressBar::hidden();
    if metrics.iter().any(|m| m != "ppl") {
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
    let mut result = result;
    if let Some(j) = &judge {
        let bar = ProgressBar::new(result.predictions.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} judged  [{elapsed_precise} < {eta_precise}]")
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let summary = model_eval::judge_predictions(&mut result.predictions, j, &mut |done, _| bar.set_position(done as u64))
            .context("--judge-url")?;
        bar.finish_and_clear();
        result.metrics.insert("judge".into(), summary.mean);
        result.metrics.insert("judge_unreadable".into(), summary.unreadable as f64);
        if summary.unreadable > 0 {
            eprintln!(
                "warning: the judge gave no score in [1, 5] for {} of {} answers (counted as 1)",
                summary.unreadable,
                result.predictions.len()
            );
        }
    }
    let dir = out_dir(&a, adapter_dir.as_deref()).join("eval");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let summary = serde_json::json!({
        "model": a.model.model,
        "adapter": adapter_dir,
        "data": a.data,
        "metrics": result.metrics,
        "judge": judge.as_ref().map(|j| serde_json::json!({ "url": j.api.base_url, "model": j.api.model, "prompt": a.judge_prompt })),
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

/// The judge settings of the flags, if a judge is asked for.
fn judge_options(a: &EvalArgs) -> Result<Option<model_eval::JudgeOptions>> {
    let Some(url) = &a.judge_url else {
        if a.judge_prompt.is_some() || a.judge_model.is_some() {
            anyhow::bail!("--judge-model and --judge-prompt need --judge-url (the judge's OpenAI-compatible API)");
        }
        return Ok(None);
    };
    let rubric = a
        .judge_prompt
        .as_deref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("--judge-prompt {}", p.display())))
        .transpose()?;
    let api = furnace_evals::openai::OpenAiConfig {
        api_key_env: a.judge_api_key_env.clone(),
        ..furnace_evals::openai::OpenAiConfig::new(url.clone(), a.judge_model.clone().unwrap_or_default())
    };
    api.validate().map_err(|e| anyhow::anyhow!("--judge-url/--judge-model: {e}"))?;
    Ok(Some(model_eval::JudgeOptions { api, rubric, structured: !a.judge_plain, max_tokens: 16 }))
}
