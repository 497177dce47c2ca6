//! Retrieval: load documents, split them into chunks, embed the chunks with a sentence
//! encoder, index them (exact, HNSW, BM25), retrieve (similarity, threshold, MMR, hybrid
//! with reciprocal rank fusion, metadata filters) and rerank with a cross-encoder.
//!
//! The evals mode and `furnace serve` both retrieve through this crate.
#![deny(missing_docs)]

mod error;
/// The vector and keyword index core: exact and HNSW vector search, BM25, fusion (RRF,
/// MMR), metadata filters, persistence and a benchmark.
pub mod index;

pub use error::{Error, Result};
