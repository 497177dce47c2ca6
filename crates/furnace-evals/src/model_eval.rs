//! A model (optionally with a LoRA adapter) evaluated on a dataset: `furnace eval`.
//!
//! The rows are SFT rows (chat, prompt/completion or instruction form, as `furnace train`
//! reads them). Perplexity is `exp` of the mean negative log-likelihood over the completion
//! tokens of every row (token-weighted; with `all_tokens`, over every token after the
//! first), computed with the training forward in f32 exactly as the eval loss of a run.
//! Generation metrics answer each row's prompt greedily (all rows in one continuous batch)
//! and compare the answer with the row's completion using this crate's text metrics.

use crate::error::{Error, Result};
use crate::metrics::text;
use furnace_generate::{Engine, EngineOptions, Request, SamplingParams};
use furnace_model::{LoadedModel, PeftAdapter};
use furnace_train::data::{read_rows, row_messages, Columns, DataKind, DataOptions};
use furnace_train::engine::token_logps;
use furnace_train::{AdapterRef, FrozenBase, SeqRef, TrainableLora};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Rows per perplexity pass.
const EVAL_BATCH: usize = 8;

/// The metrics `furnace eval` computes.
pub const MODEL_METRICS: [&str; 9] = ["ppl", "exact_match", "contains", "token_f1", "rouge_l", "bleu", "json_valid", "numeric", "length"];

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct ModelEvalOptions {
    /// Metrics, from [`MODEL_METRICS`].
    pub metrics: Vec<String>,
    /// Most tokens of a generated answer.
    pub max_tokens: usize,
    /// Evaluate the first rows only.
    pub limit: Option<usize>,
    /// Perplexity over every token instead of the completions'.
    pub all_tokens: bool,
    /// Column mapping of the rows.
    pub columns: Columns,
    /// Longest sequence in tokens (longer ones are truncated).
    pub max_seq_len: usize,
}

impl Default for ModelEvalOptions {
    fn default() -> Self {
        Self {
            metrics: vec!["ppl".into()],
            max_tokens: 128,
            limit: None,
            all_tokens: false,
            columns: Columns::default(),
            max_seq_len: 2048,
        }
    }
}

/// What an evaluation found.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEval {
    /// Each metric's value over the dataset (`ppl`, `nll` and `tokens` for perplexity; a
    /// generation metric's mean over the rows).
    pub metrics: BTreeMap<String, f64>,
    /// One record per row: prompt, reference, prediction, its metrics.
    pub predictions: Vec<Value>,
}

/// Checks a metric list: every name is one of [`MODEL_METRICS`].
pub fn check_metrics(metrics: &[String]) -> Result<()> {
    if metrics.is_empty() {
        return Err(Error::Spec { key: "metrics".into(), msg: format!("name at least one of {}", MODEL_METRICS.join(", ")) });
    }
    if let Some(m) = metrics.iter().find(|m| !MODEL_METRICS.contains(&m.as_str())) {
        return Err(Error::Spec { key: "metrics".into(), msg: format!("'{m}' is not one of {}", MODEL_METRICS.join(", ")) });
    }
    Ok(())
}

fn generation_metric(name: &str, pred: &str, reference: &str) -> f64 {
    let refs = [reference];
    match name {
        "exact_match" => text::exact_match(pred, &refs, true),
        "contains" => text::contains(pred, &refs, true),
        "token_f1" => text::token_f1(pred, &refs),
        "rouge_l" => text::rouge_l(pred, &refs),
        "bleu" => text::bleu(pred, &refs),
        "json_valid" => text::json_valid(pred),
        "numeric" => text::numeric_match(pred, &refs, 1e-6, 1e-9),
        _ => pred.chars().count() as f64,
    }
}

/// Evaluates `model` (with `adapter` when given) on the rows of `data`; `progress(done,
/// total)` follows the generation.
pub fn evaluate_model(
    model: &mut LoadedModel,
    adapter: Option<&PeftAdapter>,
    data: &Path,
    opts: &ModelEvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ModelEval> {
    check_metrics(&opts.metrics)?;
    let template =
        model.chat_template.clone().ok_or_else(|| Error::Invalid("the model has no chat template: rows are formatted with it".into()))?;
    let bad = |e: furnace_train::Error| Error::Invalid(e.to_string());
    // The rows and what each asks and expects (bad rows are errors naming file:line).
    let mut rows = Vec::new();
    for (line, row) in read_rows(data).map_err(bad)? {
        let row = row.map_err(|msg| Error::Invalid(format!("{}:{line}: {msg}", data.display())))?;
        let (msgs, completion) =
            row_messages(&row, &opts.columns).map_err(|msg| Error::Invalid(format!("{}:{line}: {msg}", data.display())))?;
        rows.push((line, row, msgs, completion));
        if opts.limit.is_some_and(|n| rows.len() >= n) {
            break;
        }
    }
    if rows.is_empty() {
        return Err(Error::Invalid(format!("{}: no rows to evaluate", data.display())));
    }
    let mut metrics = BTreeMap::new();
    let mut predictions: Vec<Value> = rows
        .iter()
        .enumerate()
        .map(|(i, (line, _, msgs, completion))| {
            let prompt = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
            json!({ "index": i, "line": line, "prompt": prompt, "reference": completion })
        })
        .collect();
    if opts.metrics.iter().any(|m| m == "ppl") {
        let dopts = DataOptions {
            kind: DataKind::Sft,
            columns: opts.columns.clone(),
            max_seq_len: opts.max_seq_len,
            completion_only: !opts.all_tokens,
            skip_bad_rows: false,
            formatting: None,
        };
        let examples = rows
            .iter()
            .map(|(line, row, ..)| {
                furnace_train::data::encode_row(row, &model.tokenizer, &template, &dopts)
                    .map(|(e, _)| e)
                    .map_err(|msg| Error::Invalid(format!("{}:{line}: {msg}", data.display())))
            })
            .collect::<Result<Vec<_>>>()?;
        let frozen = FrozenBase::new(&model.model).map_err(bad)?;
        let lora = adapter.map(|a| TrainableLora::from_adapter(&model.model, a)).transpose().map_err(bad)?;
        let adapters: Vec<AdapterRef> = lora.iter().map(|lora| AdapterRef { lora, dropout_seed: 0 }).collect();
        let mut total = (0.0, 0usize);
        // Rows in passes of EVAL_BATCH (each row's log-probabilities come back on their own).
        for (chunk, preds) in examples.chunks(EVAL_BATCH).zip(predictions.chunks_mut(EVAL_BATCH)) {
            let seqs: Vec<SeqRef> = chunk.iter().map(|e| SeqRef { ids: &e.ids, labels: &e.labels, adapter: 0, loss_weight: 0.0 }).collect();
            for (logps, p) in token_logps(&frozen, &adapters, &seqs).map_err(bad)?.iter().zip(preds) {
                let n = logps.len();
                let sum = -logps.iter().map(|&x| f64::from(x)).sum::<f64>();
                total.0 += sum;
                total.1 += n;
                p["nll"] = json!(sum / n.max(1) as f64);
                p["tokens"] = json!(n);
            }
        }
        let nll = total.0 / total.1.max(1) as f64;
        metrics.insert("nll".to_string(), nll);
        metrics.insert("ppl".to_string(), nll.exp());
        metrics.insert("tokens".to_string(), total.1 as f64);
    }
    let generated: Vec<&String> = opts.metrics.iter().filter(|m| *m != "ppl").collect();
    if !generated.is_empty() {
        let id = adapter.map(|a| model.model.add_adapter(a)).transpose().map_err(|e| Error::Generator(e.to_string()))?;
        let outputs = {
            let mut engine = Engine::new(&model.model, &model.tokenizer, EngineOptions { max_batch: 32, ..EngineOptions::default() });
            if let Some(id) = id {
                engine.name_adapter("adapter", id).map_err(|e| Error::Generator(e.to_string()))?;
            }
            let (bos, eos) = (model.tokenizer.bos_token(), model.tokenizer.eos_token());
            for (line, _, msgs, _) in &rows {
                let text = template.render(msgs, true, bos, eos).map_err(|e| Error::Invalid(format!("{}:{line}: {e}", data.display())))?;
                let prompt = model.tokenizer.encode(&text, false).map_err(|e| Error::Invalid(format!("{}:{line}: {e}", data.display())))?;
                let req = Request {
                    prompt,
                    params: SamplingParams::greedy(opts.max_tokens),
                    adapter: id.map(|_| "adapter".to_string()),
                    constraint: None,
                };
                engine.add(req).map_err(|e| Error::Generator(format!("{}:{line}: {e}", data.display())))?;
            }
            let total = rows.len();
            let mut done = 0;
            let mut on_event = |ev: furnace_generate::Event| {
                if matches!(ev, furnace_generate::Event::Finished { .. }) {
                    done += 1;
                    progress(done, total);
                }
            };
            engine.run(&mut on_event).map_err(|e| Error::Generator(e.to_string()))
        };
        if let Some(id) = id {
            model.model.remove_adapter(id);
        }
        let outputs = outputs?;
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        for ((o, p), (.., reference)) in outputs.iter().zip(predictions.iter_mut()).zip(&rows) {
            p["prediction"] = json!(o.text);
            for m in &generated {
                let v = generation_metric(m, &o.text, reference);
                p[m.as_str()] = json!(v);
                *sums.entry(m.to_string()).or_default() += v;
            }
        }
        for (m, s) in sums {
            metrics.insert(m, s / rows.len() as f64);
        }
    }
    metrics.insert("rows".to_string(), rows.len() as f64);
    Ok(ModelEval { metrics, predictions })
}

/// The rubric the judge gets when none is given: minijinja over `question` (the row's
/// prompt), `reference` (its completion) and `prediction` (the model's answer).
pub const DEFAULT_JUDGE_RUBRIC: &str = "You are grading an answer to a question against a reference answer.\n\n\
Question:\n{{ question }}\n\nReference answer:\n{{ reference }}\n\nAnswer to grade:\n{{ prediction }}\n\n\
Rate how correct and helpful the answer is, from 1 (wrong or unhelpful) to 5 (correct and complete, as good as the reference). \
Reply with the score only, as JSON: {\"score\": N}.";

/// The scores a judge gives: 1 to 5.
pub const JUDGE_RANGE: (f64, f64) = (1.0, 5.0);

/// LLM-as-judge scoring of `furnace eval`'s answers by an OpenAI-compatible API.
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// The API and the judge model.
    pub api: crate::openai::OpenAiConfig,
    /// The rubric (minijinja over `question`, `reference`, `prediction`); it must ask for a
    /// score from 1 to 5. Default [`DEFAULT_JUDGE_RUBRIC`].
    pub rubric: Option<String>,
    /// Ask for `{"score": 1..5}` with a `response_format` json_schema (off: the first number
    /// in a free-text answer is the score, for APIs without structured output).
    pub structured: bool,
    /// Most tokens of a judgement.
    pub max_tokens: usize,
}

/// What the judge found.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeSummary {
    /// The mean score over the rows (a judgement with no readable score counts as 1).
    pub mean: f64,
    /// Judgements with no score in [1, 5] (failed requests included).
    pub unreadable: usize,
}

/// A judgement's score: `{"score": n}` or, failing that, the first number in the text;
/// `None` when it is not in [`JUDGE_RANGE`].
pub fn judge_score(text: &str) -> Option<f64> {
    let from_json = serde_json::from_str::<Value>(text.trim()).ok().and_then(|v| v.get("score").and_then(Value::as_f64));
    match from_json {
        Some(v) => (v >= JUDGE_RANGE.0 && v <= JUDGE_RANGE.1).then_some(v),
        None => crate::score::parse_judge_score(text, JUDGE_RANGE),
    }
}

/// Scores every prediction of an evaluation (records with `prompt`, `reference` and
/// `prediction`, as [`evaluate_model`] writes them) with the judge: each record gets
/// `judge` (its score) and `judgement` (the judge's text). `progress(done, total)` follows
/// the requests.
pub fn judge_predictions(predictions: &mut [Value], opts: &JudgeOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<JudgeSummary> {
    use crate::generator::{GenRequest, Message, Sampling};
    if predictions.is_empty() {
        return Err(Error::Invalid("no answers to judge".into()));
    }
    if predictions.iter().any(|p| p.get("prediction").is_none()) {
        return Err(Error::Invalid("the judge scores generated answers; ask for a generation metric too".into()));
    }
    let rubric = opts.rubric.clone().unwrap_or_else(|| DEFAULT_JUDGE_RUBRIC.to_string());
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    let bad_rubric = |e: minijinja::Error| Error::Spec { key: "judge_prompt".into(), msg: format!("the rubric does not render: {e}") };
    env.add_template_owned("rubric", rubric).map_err(bad_rubric)?;
    let t = env.get_template("rubric").map_err(bad_rubric)?;
    let reqs = predictions
        .iter()
        .map(|p| {
            let text = t
                .render(minijinja::context! {
                    question => p["prompt"].as_str().unwrap_or_default(),
                    reference => p["reference"].as_str().unwrap_or_default(),
                    prediction => p["prediction"].as_str().unwrap_or_default(),
                })
                .map_err(bad_rubric)?;
            Ok(GenRequest {
                messages: vec![Message { role: "user".into(), content: text }],
                sampling: Sampling { max_tokens: opts.max_tokens, temperature: 0.0, seed: Some(0), ..Sampling::default() },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut api = crate::openai::OpenAiGenerator::new(opts.api.clone())?;
    if opts.structured {
        let schema = json!({
            "type": "object",
            "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
            "required": ["score"],
            "additionalProperties": false,
        });
        api = api
            .with_response_format(json!({"type": "json_schema", "json_schema": {"name": "judgement", "schema": schema, "strict": true}}));
    }
    let total = reqs.len();
    let mut done = 0;
    let outs = api.generate(&reqs, &mut |_| {
        done += 1;
        progress(done, total);
    });
    if outs.iter().all(|o| o.is_err()) {
        if let Some(Err(e)) = outs.into_iter().next() {
            return Err(Error::Generator(format!("the judge failed every request; the first: {e}")));
        }
        return Err(Error::Generator("the judge failed every request".into()));
    }
    let (mut sum, mut unreadable) = (0.0, 0);
    for (p, o) in predictions.iter_mut().zip(outs) {
        let (text, score) = match o {
            Ok(o) => {
                let s = judge_score(&o.text);
                (o.text, s)
            }
            Err(e) => (format!("error: {e}"), None),
        };
        if score.is_none() {
            unreadable += 1;
        }
        let v = score.unwrap_or(JUDGE_RANGE.0);
        sum += v;
        p["judge"] = json!(v);
        p["judgement"] = json!(text);
    }
    Ok(JudgeSummary { mean: sum / total as f64, unreadable })
}
