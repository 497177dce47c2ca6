//! A reproducible benchmark of the vector indexes: random unit vectors from a seed, HNSW
//! build time, queries per second (one thread, one query at a time; and all threads,
//! batched), recall@10 against exact search for each `ef_search`, and exact search speed.
//! `scripts/peer_faiss.py` measures faiss on the same vectors (written by
//! [`write_f32_file`]).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::distance::Metric;
use super::hit::{Hit, VectorIndex};
use super::hnsw::{Hnsw, HnswParams};
use super::rng::random_unit_vectors;
use super::vectors::FlatIndex;
use crate::{Error, Result};

/// Recall is measured at this depth.
const RECALL_AT: usize = 10;
/// Timings are the median of this many runs.
const REPEATS: usize = 3;
/// Exact search one query at a time is timed on at most this many queries (it is slow).
const EXACT_SINGLE_QUERIES: usize = 100;

/// Figures for one `ef_search`.
#[derive(Debug, Clone, Serialize)]
pub struct EfReport {
    /// The candidate-list size.
    pub ef_search: usize,
    /// Fraction of the exact top 10 found in HNSW's top 10, over all queries.
    pub recall_at_10: f64,
    /// Queries per second on one thread, one query at a time (median of 3).
    pub qps_single: f64,
    /// Queries per second on all threads, one batch (median of 3).
    pub qps_batch: f64,
}

/// What [`bench_index`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Vectors indexed.
    pub n: usize,
    /// Their dimension.
    pub dim: usize,
    /// Queries run.
    pub queries: usize,
    /// HNSW `m`.
    pub m: usize,
    /// HNSW `ef_construction`.
    pub ef_construction: usize,
    /// The seed of the vectors (queries use `seed + 1`) and of the HNSW level draws.
    pub seed: u64,
    /// Threads used by the batched figures.
    pub threads: usize,
    /// Seconds to build the HNSW graph (one thread, inserts in order).
    pub build_secs: f64,
    /// Exact search, one thread, one query at a time, over the first
    /// `exact_single_queries` queries (median of 3).
    pub exact_qps_single: f64,
    /// How many queries `exact_qps_single` timed.
    pub exact_single_queries: usize,
    /// Exact search on all threads, one batch of all queries (median of 3).
    pub exact_qps_batch: f64,
    /// One entry per `ef_search` value.
    pub ef: Vec<EfReport>,
}

/// The benchmark's base vectors (`n` rows) and queries, as [`bench_index`] draws them:
/// unit vectors from `seed` and `seed + 1`.
pub fn bench_vectors(n: usize, dim: usize, queries: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    (random_unit_vectors(n, dim, seed), random_unit_vectors(queries, dim, seed.wrapping_add(1)))
}

/// Writes `data` as raw little-endian `f32` (what numpy's `fromfile(dtype="<f4")` reads).
pub fn write_f32_file(path: &Path, data: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for x in data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn median_secs<F: FnMut() -> Result<()>>(mut run: F) -> Result<f64> {
    let mut times = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[REPEATS / 2].max(1e-9))
}

fn recall(truth: &[Vec<Hit>], got: &[Vec<Hit>]) -> f64 {
    let (mut found, mut total) = (0usize, 0usize);
    for (t, g) in truth.iter().zip(got) {
        total += t.len();
        found += g.iter().filter(|h| t.iter().any(|x| x.id == h.id)).count();
    }
    if total == 0 {
        0.0
    } else {
        found as f64 / total as f64
    }
}

/// Builds an exact index and an HNSW index (inner product) over `n` random unit vectors of
/// dimension `dim`, runs `queries` random unit queries and reports speed and recall@10 for
/// each of `ef_search_values`.
pub fn bench_index(
    n: usize,
    dim: usize,
    queries: usize,
    m: usize,
    ef_construction: usize,
    ef_search_values: &[usize],
    seed: u64,
) -> Result<BenchReport> {
    if n < RECALL_AT || queries == 0 || dim == 0 {
        return Err(Error::Invalid(format!("the benchmark needs n >= {RECALL_AT}, dim >= 1 and queries >= 1")));
    }
    let (data, qs) = bench_vectors(n, dim, queries, seed);
    let one_thread =
        rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| Error::Invalid(format!("cannot start a thread pool: {e}")))?;

    let mut exact = FlatIndex::new(dim, Metric::InnerProduct)?;
    exact.add_batch(&data)?;
    let mut truth = Vec::new();
    let exact_batch = median_secs(|| {
        truth = exact.search_batch(&qs, RECALL_AT)?;
        Ok(())
    })?;
    let single_n = queries.min(EXACT_SINGLE_QUERIES);
    let exact_single = one_thread.install(|| {
        median_secs(|| {
            for q in qs.chunks_exact(dim).take(single_n) {
                exact.search(q, RECALL_AT)?;
            }
            Ok(())
        })
    })?;
    drop(exact);

    let params = HnswParams { m, ef_construction, ef_search: ef_search_values.first().copied().unwrap_or(64), seed };
    let mut hnsw = Hnsw::new(dim, Metric::InnerProduct, params)?;
    let t = Instant::now();
    hnsw.add_batch(&data)?;
    let build_secs = t.elapsed().as_secs_f64();

    let mut ef = Vec::with_capacity(ef_search_values.len());
    for &e in ef_search_values {
        let mut got = Vec::new();
        let batch = median_secs(|| {
            got = hnsw.search_batch(&qs, RECALL_AT, e)?;
            Ok(())
        })?;
        let single = one_thread.install(|| {
            median_secs(|| {
                for q in qs.chunks_exact(dim) {
                    hnsw.search_ef(q, RECALL_AT, e)?;
                }
                Ok(())
            })
        })?;
        ef.push(EfReport {
            ef_search: e,
            recall_at_10: recall(&truth, &got),
            qps_single: queries as f64 / single,
            qps_batch: queries as f64 / batch,
        });
    }
    Ok(BenchReport {
        n,
        dim,
        queries,
        m,
        ef_construction,
        seed,
        threads: rayon::current_num_threads(),
        build_secs,
        exact_qps_single: single_n as f64 / exact_single,
        exact_single_queries: single_n,
        exact_qps_batch: queries as f64 / exact_batch,
        ef,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_benchmark_runs() {
        let r = bench_index(500, 16, 20, 8, 32, &[10, 50], 3).unwrap();
        assert_eq!(r.ef.len(), 2);
        assert!(r.ef[1].recall_at_10 >= r.ef[0].recall_at_10 - 0.05);
        assert!(r.ef[1].recall_at_10 > 0.9);
        assert!(r.exact_qps_batch > 0.0 && r.build_secs > 0.0);
        assert!(bench_index(5, 16, 20, 8, 32, &[10], 3).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.f32");
        write_f32_file(&p, &[1.0, -2.5]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }
}
