//! `furnace bench datagen`: `furnace data generate`'s throughput with the local engine,
//! one request at a time (`--batch 1`) versus batched, on the same topic, count, seed and
//! token limit; kept examples/s and generated tokens/s of each, and the ratio. The model is
//! loaded (and the schema compiled) before the clock starts.

use crate::args::DEFAULT_MODEL;
use crate::models::load;
use anyhow::Result;
use clap::Args;
use furnace_evals::synth::{self, Format, LocalGenerator, Source, SynthOptions};
use furnace_model::WeightDType;

#[derive(Args, Clone)]
pub struct DatagenBenchArgs {
    /// Model: alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// How its weights are held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Examples per measurement.
    #[arg(long, default_value_t = 32)]
    count: usize,
    /// The batched run's batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Most tokens per example.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Row form: instruction, qa or chat.
    #[arg(long, default_value = "qa")]
    format: String,
    /// Kept examples shown in each prompt (see `furnace data generate --show-previous`).
    #[arg(long, default_value_t = 0)]
    show_previous: usize,
    /// The topic.
    #[arg(long, default_value = "basic physics")]
    topic: String,
}

pub fn run(a: DatagenBenchArgs) -> Result<()> {
    let format: Format = a.format.parse().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let model = load(&a.model, a.dtype)?;
    let source = Source::Topic(a.topic.clone());
    let mut got = Vec::new();
    for batch in [1, a.batch] {
        let opts = SynthOptions {
            format,
            count: a.count,
            batch,
            max_tokens: a.max_tokens,
            seed: 1,
            show_previous: a.show_previous,
            ..SynthOptions::default()
        };
        let schema = opts.effective_schema(true);
        let mut gen = LocalGenerator::new(&model, &schema, batch)?;
        let r = synth::synthesize(&mut gen, &source, &schema, &opts, &mut |_| {})?;
        let tps = r.counts.completion_tokens as f64 / r.seconds.max(1e-9);
        let c = &r.counts;
        println!(
            "batch {batch:>3}: {} examples ({} requests: {} cut at the token limit, {} invalid JSON, {} schema failures, {} duplicates, {} near duplicates; {} tokens) in {:.2} s: {:.3} examples/s, {:.1} tokens/s",
            r.rows.len(),
            c.attempts,
            c.truncated,
            c.invalid_json,
            c.schema_failures,
            c.duplicates,
            c.near_duplicates,
            c.completion_tokens,
            r.seconds,
            r.examples_per_sec(),
            tps
        );
        got.push((r.examples_per_sec(), tps));
    }
    println!(
        "SUMMARY batch {} vs 1: {:.2}x the examples/s ({:.3} vs {:.3}), {:.2}x the tokens/s",
        a.batch,
        got[1].0 / got[0].0,
        got[1].0,
        got[0].0,
        got[1].1 / got[0].1
    );
    Ok(())
}
