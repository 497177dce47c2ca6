//! The vector and keyword index core: an exact flat store, HNSW, BM25, result fusion
//! (reciprocal rank fusion, MMR, score thresholds), metadata filters, persistence and a
//! benchmark.

mod bench;
mod bm25;
mod distance;
mod filter;
mod fuse;
mod hit;
mod hnsw;
mod persist;
mod rng;
mod vectors;

pub use bench::{bench_index, bench_vectors, write_f32_file, BenchReport, EfReport};
pub use bm25::{tokenize, Bm25, Bm25Params, BM25_FILE};
pub use distance::{dot, l2_squared, norm, Metric};
pub use filter::{Condition, Filter};
pub use fuse::{maximal_marginal_relevance, mmr_search, reciprocal_rank_fusion, score_threshold, MmrParams, RRF_K};
pub use hit::{Hit, VectorIndex};
pub use hnsw::{Hnsw, HnswParams, HNSW_FILE};
pub use rng::random_unit_vectors;
pub use vectors::{check_dim, FlatIndex, FLAT_FILE};
