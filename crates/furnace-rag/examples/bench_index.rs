//! Runs [`furnace_rag::index::bench_index`] and prints its report as JSON; with `--dump DIR`
//! it first writes the same vectors for `scripts/peer_faiss.py` (`base.f32`, `queries.f32`,
//! raw little-endian f32, and `meta.json`).
//!
//! ```text
//! cargo run --release -p furnace-rag --example bench_index -- \
//!     --n 100000 --dim 384 --queries 1000 --ef-search 16,32,64,128,256 --dump target/bench-vectors
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use furnace_rag::index::{bench_index, bench_vectors, write_f32_file};

fn main() -> anyhow::Result<()> {
    let (mut n, mut dim, mut queries, mut m, mut ef_construction, mut seed) = (20_000usize, 128usize, 500usize, 16usize, 64usize, 42u64);
    let mut ef_search = vec![16usize, 32, 64, 128, 256];
    let mut dump: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--n" => n = value.parse()?,
            "--dim" => dim = value.parse()?,
            "--queries" => queries = value.parse()?,
            "--m" => m = value.parse()?,
            "--ef-construction" => ef_construction = value.parse()?,
            "--ef-search" => ef_search = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seed" => seed = value.parse()?,
            "--dump" => dump = Some(PathBuf::from(value)),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir)?;
        let (base, qs) = bench_vectors(n, dim, queries, seed);
        write_f32_file(&dir.join("base.f32"), &base)?;
        write_f32_file(&dir.join("queries.f32"), &qs)?;
        let meta = serde_json::json!({"n": n, "dim": dim, "queries": queries, "seed": seed});
        std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    }
    let report = bench_index(n, dim, queries, m, ef_construction, &ef_search, seed)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
