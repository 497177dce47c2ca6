//! Times the parts of a batched decode step: `cargo run --release -p furnace-model --example decode_profile -- MODEL.gguf [BATCH]`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use furnace_model::{LoadedModel, Logits, SeqInput, WeightDType};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let m = LoadedModel::load(std::path::Path::new(&args[1]), WeightDType::Quantized)?;
    let batch: usize = args.get(2).map(|s| s.parse().unwrap_or(16)).unwrap_or(16);
    let mut caches: Vec<_> = (0..batch).map(|_| m.model.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|b| (0..16).map(|i| (100 + 7 * i + 13 * b) as u32).collect()).collect();
    {
        let mut inputs: Vec<SeqInput> =
            caches.iter_mut().zip(&prompts).map(|(c, p)| SeqInput { tokens: p, cache: c, logits: Logits::Last, adapter: None }).collect();
        m.model.forward(&mut inputs)?;
    }
    let tok = vec![[42u32]; batch];
    let steps = 64;
    let t = Instant::now();
    for _ in 0..steps {
        let mut inputs: Vec<SeqInput> =
            caches.iter_mut().zip(&tok).map(|(c, p)| SeqInput { tokens: p, cache: c, logits: Logits::Last, adapter: None }).collect();
        let out = m.model.forward(&mut inputs)?;
        for o in out.into_iter().flatten() {
            std::hint::black_box(o.squeeze(0)?.to_vec1::<f32>()?);
        }
    }
    let s = t.elapsed().as_secs_f64() / steps as f64;
    println!("batch {batch}: {:.2} ms/step, {:.1} tokens/s", s * 1e3, batch as f64 / s);
    Ok(())
}
