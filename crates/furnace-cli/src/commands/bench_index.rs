//! `furnace bench index`: HNSW and exact search over random unit vectors, the workload of
//! `scripts/peer_faiss.py` (faiss-cpu `IndexHNSWFlat` and `IndexFlatIP`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use furnace_rag::index::{bench_index, bench_vectors, write_f32_file};

#[derive(Args, Clone)]
pub struct IndexBenchArgs {
    /// Vectors indexed.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Their dimension.
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Queries run.
    #[arg(long, default_value_t = 1_000)]
    queries: usize,
    /// HNSW links per node.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW candidate list while building.
    #[arg(long, default_value_t = 64)]
    ef_construction: usize,
    /// The ef_search values swept (recall@10 and queries/s for each).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256,512")]
    ef_search: Vec<usize>,
    /// Seed of the vectors (queries use seed + 1).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Also write the vectors here (base.f32, queries.f32, meta.json) for the peer script.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(a: IndexBenchArgs) -> Result<()> {
    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (base, qs) = bench_vectors(a.n, a.dim, a.queries, a.seed);
        write_f32_file(&dir.join("base.f32"), &base)?;
        write_f32_file(&dir.join("queries.f32"), &qs)?;
        let meta = serde_json::json!({"n": a.n, "dim": a.dim, "queries": a.queries, "seed": a.seed});
        std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    }
    let r = bench_index(a.n, a.dim, a.queries, a.m, a.ef_construction, &a.ef_search, a.seed)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{} random unit vectors of dim {}, {} queries, HNSW m={} ef_construction={}", r.n, r.dim, r.queries, r.m, r.ef_construction);
    println!("HNSW build: {:.1} s (one thread)", r.build_secs);
    println!(
        "exact: {:.0} queries/s one at a time, {:.0} queries/s batched ({} threads)",
        r.exact_qps_single, r.exact_qps_batch, r.threads
    );
    println!("{:>10} {:>10} {:>14} {:>14}", "ef_search", "recall@10", "qps (single)", "qps (batch)");
    for e in &r.ef {
        println!("{:>10} {:>10.4} {:>14.0} {:>14.0}", e.ef_search, e.recall_at_10, e.qps_single, e.qps_batch);
    }
    if let Some(dir) = &a.dump {
        println!("peer: python3 scripts/peer_faiss.py {}", dir.display());
    }
    Ok(())
}
