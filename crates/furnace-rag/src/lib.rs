//! Retrieval: load documents, split them into chunks, embed the chunks with a sentence
//! encoder, index them (exact, HNSW, BM25), retrieve (similarity, threshold, MMR, hybrid
//! with reciprocal rank fusion, metadata filters) and rerank with a cross-encoder.
//!
//! The evals mode and `furnace serve` both retrieve through this crate.
#![deny(missing_docs)]

/// Persistent indexes of document chunks: build, search (similarity, threshold, MMR,
/// hybrid), filter, rerank, add and delete documents.
pub mod collection;
pub mod encoder;
mod error;
/// The vector and keyword index core: exact and HNSW vector search, BM25, fusion (RRF,
/// MMR), metadata filters, persistence and a benchmark.
pub mod index;

/// Document ingestion: files, folders and globs of text, Markdown, HTML, PDF, JSONL, CSV
/// and Parquet into [`docs::Document`]s.
pub mod docs;
/// Text splitters (LangChain-compatible recursive and Markdown-header splitting) that cut
/// documents into [`docs::Chunk`]s.
pub mod split;

pub use encoder::{CrossEncoder, Embeddings, Pooling, PoolingMode, ScoreActivation, SentenceEncoder};
pub use error::{Error, Result};
