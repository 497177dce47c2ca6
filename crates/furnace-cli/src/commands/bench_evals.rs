//! `furnace bench evals`: 4 RAG pipelines (chunk size 256/768 x k 1/4) over 256 questions
//! (the shipped Varnholt questions, twice) with the local generator, through the evals
//! driver of `furnace run`: all pipelines of a round batched together, then one pipeline
//! after another. Indexes are built before the clock starts; model loading is inside it
//! (the same in both modes).

use super::bench::{peak_rss, rerun_in_mode};
use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::{bail, Result};
use clap::Args;
use furnace_exp::Store;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct EvalsBenchArgs {
    /// The generator model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How its weights are held: none (f32), bf16, q8/q4 (quantized).
    #[arg(long, default_value = "bf16")]
    quantize: String,
    /// Questions (the shipped set repeated to this many).
    #[arg(long, default_value_t = 256)]
    questions: usize,
    /// Shards of the question set.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// The shipped data folder (questions.jsonl, docs/).
    #[arg(long, default_value = "data/rag_eval")]
    data: PathBuf,
    /// batched, sequential, or both (each in its own process, so peak RSS is its own).
    #[arg(long, default_value = "both")]
    mode: String,
}

pub fn run(a: EvalsBenchArgs) -> Result<()> {
    match a.mode.as_str() {
        "batched" | "sequential" => return one(&a),
        "both" => {}
        o => bail!("--mode must be batched, sequential or both, not '{o}'"),
    }
    let mut got = Vec::new();
    for mode in ["batched", "sequential"] {
        let get = rerun_in_mode(mode)?;
        got.push((get("questions_per_s"), get("peak_rss_gb")));
    }
    println!(
        "SUMMARY batched vs sequential: {:.2}x the questions/s ({:.2} vs {:.2}), {:.2}x the memory",
        got[0].0 / got[1].0,
        got[0].0,
        got[1].0,
        got[0].1 / got[1].1
    );
    Ok(())
}

fn one(a: &EvalsBenchArgs) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = std::path::absolute(&a.data)?;
    let source = std::fs::read_to_string(data.join("questions.jsonl"))
        .map_err(|e| anyhow::anyhow!("reading {}: {e} (run from the repository root or give --data)", data.display()))?;
    let rows: Vec<serde_json::Value> =
        source.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    if rows.is_empty() {
        bail!("{} has no questions", data.display());
    }
    let mut out = String::new();
    for i in 0..a.questions {
        let mut r = rows[i % rows.len()].clone();
        r["id"] = format!("{}-{}", r["id"].as_str().unwrap_or("q"), i / rows.len()).into();
        out.push_str(&format!("{r}\n"));
    }
    let questions = dir.path().join("questions.jsonl");
    std::fs::write(&questions, out)?;
    let spec = format!(
        r#"[experiment]
name = "bench-evals"
mode = "evals"
seed = 1

[data]
path = "{q}"
num_shards = {shards}

[rag]
documents = ["{docs}"]
chunk_size = {{ list = [256, 768] }}
chunk_overlap = 32
k = {{ list = [1, 4] }}

[prompt]
system = "Answer the question using the context. Reply with the answer only, in a few words."
template = "Context:\n{{{{ context }}}}\n\nQuestion: {{{{ question }}}}"

[generator]
kind = "local"
model = "{model}"
quantize = "{quantize}"
max_tokens = {max_tokens}

[[metric]]
kind = "contains"
"#,
        q = questions.display(),
        docs = data.join("docs").display(),
        shards = a.shards,
        model = a.model,
        quantize = a.quantize,
        max_tokens = a.max_tokens,
    );
    let spec_path = dir.path().join("bench.toml");
    std::fs::write(&spec_path, spec)?;
    let runs = dir.path().join("runs");
    let store = Store::open_in(&runs)?;
    let exp = furnace_evals::experiment::create(&store, &spec_path)?;
    // Indexes first, outside the clock.
    let index_root = runs.join("indexes");
    let encoder = furnace_rag::SentenceEncoder::load("all-minilm-l6-v2", &mut |m| eprintln!("{m}"))?;
    for p in furnace_evals::spec::expand(&std::fs::read_to_string(&spec_path)?, &spec_path)? {
        if let Some(r) = &p.spec.rag {
            furnace_rag::collection::build(&index_root, &r.documents, &furnace_evals::driver::build_settings(r), &encoder, &mut |_| {})?;
        }
    }
    let opts = furnace_evals::EvalOptions { sequential: a.mode == "sequential", index_root: Some(index_root), ..Default::default() };
    let events = furnace_exp::events::channel();
    let mut loader =
        |name: &str, dtype| load(name, dtype).map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: format!("{e:#}") });
    let started = Instant::now();
    let summary = furnace_evals::run_evals(&store, &exp, &mut loader, &opts, &events)?;
    let wall = started.elapsed().as_secs_f64();
    let answered: i64 = summary.runs.iter().map(|r| store.eval_examples(r.id).map(|e| e.len() as i64).unwrap_or(0)).sum();
    if let Some(r) = summary.runs.iter().find(|r| r.status.as_str() != "completed") {
        bail!("pipeline {} ended {}: {}", r.id, r.status.as_str(), r.error.clone().unwrap_or_default());
    }
    let contains: Vec<String> = summary
        .runs
        .iter()
        .map(|r| store.metric_series(r.id, "contains").ok().and_then(|s| s.last().map(|x| format!("{:.3}", x.1))).unwrap_or_default())
        .collect();
    println!(
        "RESULT evals mode={} pipelines={} questions={} answers={answered} wall_s={wall:.1} questions_per_s={:.2} peak_rss_gb={:.2} contains={}",
        a.mode,
        summary.runs.len(),
        a.questions,
        answered as f64 / wall,
        peak_rss().unwrap_or(0) as f64 / 1e9,
        contains.join(",")
    );
    Ok(())
}
