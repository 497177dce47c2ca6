//! `furnace index build|list|show|add|delete|rm` and `furnace search`: persistent
//! retrieval indexes over documents (furnace-rag's collections).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use furnace_model::WeightDType;
use furnace_rag::collection::{self, BuildProgress, BuildSettings, Index, SearchKind, SearchOptions, VectorKind};
use furnace_rag::docs::{load_documents, LoadOptions};
use furnace_rag::index::{Condition, Filter};
use furnace_rag::split::{LengthUnit, SplitKind, SplitterConfig};
use furnace_rag::{CrossEncoder, SentenceEncoder};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Subcommand)]
pub enum IndexCmd {
    /// Build an index of documents (txt, md, html, pdf, jsonl, csv, parquet): split, embed,
    /// store. Identical settings reuse the existing index; changed documents re-embed only
    /// their new chunks. Prints the index id, documents, chunks and seconds.
    Build(BuildArgs),
    /// List the indexes.
    List(RootArg),
    /// Show an index: model, splitter, documents, skipped files.
    Show(ShowArgs),
    /// Add (or replace) documents in an index.
    Add(AddArgs),
    /// Delete a document from an index.
    Delete(DeleteArgs),
    /// Remove an index.
    Rm(ShowArgs),
}

#[derive(Args, Clone)]
pub struct RootArg {
    /// Where indexes live (default: $FURNACE_HOME/indexes).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl RootArg {
    fn path(&self) -> Result<PathBuf> {
        Ok(match &self.root {
            Some(r) => r.clone(),
            None => collection::default_root()?,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitterArg {
    Recursive,
    Markdown,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum LengthArg {
    Chars,
    Tokens,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Files, folders (read recursively) or glob patterns.
    #[arg(long, required = true, num_args = 1..)]
    docs: Vec<PathBuf>,
    /// The encoder: an alias (`all-minilm-l6-v2`) or a folder.
    #[arg(long, short, default_value = "all-minilm-l6-v2")]
    model: String,
    /// How the encoder's weights are held (f32 exact, bf16 faster).
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// How documents are cut: recursive (LangChain's recursive character splitter),
    /// markdown (by headers, then recursive) or none (a document is one chunk).
    #[arg(long, value_enum, default_value = "recursive")]
    splitter: SplitterArg,
    /// The longest chunk, in --length units.
    #[arg(long, default_value_t = 1000)]
    chunk_size: usize,
    /// How much of a chunk is repeated at the start of the next.
    #[arg(long, default_value_t = 200)]
    chunk_overlap: usize,
    /// What chunk sizes count: characters or the encoder's tokens.
    #[arg(long, value_enum, default_value = "chars")]
    length: LengthArg,
    /// Use an HNSW graph (approximate, for large corpora) instead of exact search.
    #[arg(long)]
    hnsw: bool,
    /// HNSW: links per node.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW: candidate list while building.
    #[arg(long, default_value_t = 64)]
    ef_construction: usize,
    /// HNSW: candidate list while searching.
    #[arg(long, default_value_t = 64)]
    ef_search: usize,
    /// Tables (jsonl, csv, parquet): the text column.
    #[arg(long, default_value = "text")]
    text_column: String,
    /// Tables: the id column (default: `<file>#<row>`).
    #[arg(long)]
    id_column: Option<String>,
    /// Stop at the first unreadable file instead of skipping and reporting it.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    root: RootArg,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The index id (or its first characters).
    id: String,
    #[command(flatten)]
    root: RootArg,
}

#[derive(Args)]
pub struct AddArgs {
    /// The index id (or its first characters).
    id: String,
    /// Files, folders or globs to add; a document whose id is in the index replaces it.
    #[arg(long, required = true, num_args = 1..)]
    docs: Vec<PathBuf>,
    #[command(flatten)]
    root: RootArg,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// The index id (or its first characters).
    id: String,
    /// The document id (see `furnace index show`).
    #[arg(long)]
    doc: String,
    #[command(flatten)]
    root: RootArg,
}

fn load_encoder(model: &str, dtype: WeightDType) -> Result<SentenceEncoder> {
    Ok(SentenceEncoder::load_with(model, dtype, &mut |l| eprintln!("{l}"))?)
}

pub fn run(cmd: IndexCmd) -> Result<()> {
    match cmd {
        IndexCmd::Build(a) => build(a),
        IndexCmd::List(r) => list(r),
        IndexCmd::Show(a) => show(a),
        IndexCmd::Add(a) => add(a),
        IndexCmd::Delete(a) => delete(a),
        IndexCmd::Rm(a) => {
            let root = a.root.path()?;
            let id = collection::resolve_id(&root, &a.id)?;
            collection::remove(&root, &id)?;
            println!("removed index {id}");
            Ok(())
        }
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let root = a.root.path()?;
    let splitter = SplitterConfig {
        kind: match a.splitter {
            SplitterArg::Recursive => SplitKind::Recursive,
            SplitterArg::Markdown => SplitKind::Markdown,
            SplitterArg::None => SplitKind::None,
        },
        chunk_size: a.chunk_size,
        chunk_overlap: a.chunk_overlap,
        length: match a.length {
            LengthArg::Chars => LengthUnit::Chars,
            LengthArg::Tokens => LengthUnit::Tokens,
        },
        ..SplitterConfig::default()
    };
    splitter.validate()?;
    let load =
        LoadOptions { strict: a.strict, text_column: a.text_column.clone(), id_column: a.id_column.clone(), ..LoadOptions::default() };
    let vectors =
        if a.hnsw { VectorKind::Hnsw { m: a.m, ef_construction: a.ef_construction, ef_search: a.ef_search } } else { VectorKind::Exact };
    let settings = BuildSettings { splitter, load, vectors };
    let encoder = load_encoder(&a.model, a.dtype)?;
    let started = Instant::now();
    let bar = ProgressBar::hidden();
    let mut on_progress = |p: BuildProgress| match p {
        BuildProgress::Split { documents, chunks, reused } => {
            eprintln!("{documents} documents, {chunks} chunks ({reused} with vectors from other indexes)");
        }
        BuildProgress::Embedded { done, total } => {
            if bar.is_hidden() && total > 0 {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_length(total as u64);
                if let Ok(style) =
                    ProgressStyle::with_template("embedding {bar:30} {pos}/{len} chunks  [{elapsed_precise} < {eta_precise}]")
                {
                    bar.set_style(style);
                }
            }
            bar.set_position(done as u64);
        }
    };
    let report = collection::build(&root, &a.docs, &settings, &encoder, &mut on_progress)?;
    bar.finish_and_clear();
    let m = report.index.manifest();
    for (path, why) in &m.skipped {
        eprintln!("skipped {path}: {why}");
    }
    if a.root.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "existed": report.existed, "manifest": m }))?);
        return Ok(());
    }
    let secs = started.elapsed().as_secs_f64();
    if report.existed {
        println!("index {} already exists with these documents and settings (reused)", m.id);
    } else {
        println!("built index {}", m.id);
    }
    println!(
        "{} documents, {} chunks ({} skipped files), {} dim {}, {secs:.1} s",
        m.documents.len(),
        m.chunks,
        m.skipped.len(),
        m.dim,
        m.model
    );
    Ok(())
}

fn list(r: RootArg) -> Result<()> {
    let root = r.path()?;
    let all = collection::list(&root)?;
    if r.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no indexes in {} (build one with `furnace index build --docs DIR`)", root.display());
        return Ok(());
    }
    println!("{:<18} {:>9} {:>9} {:<10} {:<22} model", "id", "documents", "chunks", "vectors", "splitter");
    for m in all {
        let vectors = match m.settings.vectors {
            VectorKind::Exact => "exact".to_string(),
            VectorKind::Hnsw { m, .. } => format!("hnsw m={m}"),
        };
        let s = &m.settings.splitter;
        let splitter = format!("{:?} {}/{}", s.kind, s.chunk_size, s.chunk_overlap).to_lowercase();
        println!("{:<18} {:>9} {:>9} {:<10} {:<22} {}", m.id, m.documents.len(), m.chunks, vectors, splitter, m.model);
    }
    Ok(())
}

fn show(a: ShowArgs) -> Result<()> {
    let root = a.root.path()?;
    let id = collection::resolve_id(&root, &a.id)?;
    let index = Index::open(&root, &id)?;
    let m = index.manifest();
    if a.root.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("index      {}", m.id);
    println!("model      {} (fingerprint {}, dim {})", m.model, m.model_fingerprint, m.dim);
    println!("splitter   {}", serde_json::to_string(&m.settings.splitter)?);
    println!("vectors    {}", serde_json::to_string(&m.settings.vectors)?);
    println!(
        "chunks     {} ({} vectors reused at build, built in {:.1} s{})",
        m.chunks,
        m.reused_vectors,
        m.build_seconds,
        if m.edited { ", edited since" } else { "" }
    );
    println!("documents  {}", m.documents.len());
    for d in &m.documents {
        println!("  {:<40} {:>5} chunks  {}", d.id, d.chunks, d.source);
    }
    for (path, why) in &m.skipped {
        println!("skipped    {path}: {why}");
    }
    Ok(())
}

fn add(a: AddArgs) -> Result<()> {
    let root = a.root.path()?;
    let id = collection::resolve_id(&root, &a.id)?;
    let mut index = Index::open(&root, &id)?;
    let m = index.manifest().clone();
    let report = load_documents(&a.docs, &m.settings.load)?;
    for (path, why) in &report.skipped {
        eprintln!("skipped {}: {why}", path.display());
    }
    let dtype: WeightDType = m.model_dtype.parse().map_err(anyhow::Error::msg)?;
    let encoder = SentenceEncoder::load_with(&m.model, dtype, &mut |l| eprintln!("{l}"))
        .with_context(|| format!("loading the index's model {}", m.model))?;
    let added = index.add_documents(&report.documents, &encoder)?;
    println!("added {} documents ({added} chunks) to index {id}", report.documents.len());
    Ok(())
}

fn delete(a: DeleteArgs) -> Result<()> {
    let root = a.root.path()?;
    let id = collection::resolve_id(&root, &a.id)?;
    let mut index = Index::open(&root, &id)?;
    let removed = index.delete_document(&a.doc)?;
    println!("deleted {} ({removed} chunks) from index {id}", a.doc);
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum SearchType {
    Similarity,
    Threshold,
    Mmr,
}

#[derive(Args)]
pub struct SearchArgs {
    /// The index id (or its first characters; see `furnace index list`).
    #[arg(long)]
    index: String,
    /// The query.
    query: String,
    /// Results wanted.
    #[arg(long, short, default_value_t = 4)]
    k: usize,
    /// similarity (the k nearest), threshold (those scoring at least --threshold) or mmr
    /// (maximal marginal relevance: relevant and diverse).
    #[arg(long = "type", value_enum, default_value = "similarity")]
    kind: SearchType,
    /// The score threshold of `--type threshold` (cosine similarity).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// MMR: candidates fetched first.
    #[arg(long, default_value_t = 20)]
    fetch_k: usize,
    /// MMR: 1 is pure relevance, 0 pure diversity.
    #[arg(long, default_value_t = 0.5)]
    lambda: f32,
    /// Fuse vector results with BM25 keyword results (reciprocal rank fusion).
    #[arg(long)]
    hybrid: bool,
    /// Only chunks whose metadata matches: `key=value`, or `key=a|b` for any of several
    /// values. Repeatable (all must match).
    #[arg(long)]
    filter: Vec<String>,
    /// Rerank the k results with this cross-encoder (alias or folder).
    #[arg(long)]
    rerank: Option<String>,
    /// With --rerank: keep the best N (at most k).
    #[arg(long)]
    top_n: Option<usize>,
    /// The query's encoder (default: the one the index was built with).
    #[arg(long)]
    model: Option<String>,
    /// How the encoder's weights are held (default: as when the index was built).
    #[arg(long)]
    dtype: Option<WeightDType>,
    /// Show at most this many characters of each chunk in the table.
    #[arg(long, default_value_t = 100)]
    width: usize,
    #[command(flatten)]
    root: RootArg,
}

fn parse_filter(items: &[String]) -> Result<Filter> {
    let mut filter = Filter::all();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            bail!("--filter {item:?}: expected key=value or key=a|b");
        };
        let values: Vec<serde_json::Value> = value.split('|').map(|v| serde_json::Value::String(v.to_string())).collect();
        let cond = if values.len() == 1 { Condition::Eq(values[0].clone()) } else { Condition::In(values) };
        filter = filter.with(key, cond);
    }
    Ok(filter)
}

pub fn search(a: SearchArgs) -> Result<()> {
    let root = a.root.path()?;
    let id = collection::resolve_id(&root, &a.index)?;
    let index = Index::open(&root, &id)?;
    if a.top_n.is_some() && a.rerank.is_none() {
        bail!("--top-n needs --rerank MODEL");
    }
    let model = a.model.clone().unwrap_or_else(|| index.manifest().model.clone());
    let dtype = match a.dtype {
        Some(d) => d,
        None => index.manifest().model_dtype.parse().map_err(anyhow::Error::msg)?,
    };
    let encoder = load_encoder(&model, dtype)?;
    let reranker = match &a.rerank {
        Some(name) => Some(CrossEncoder::load(name, &mut |l| eprintln!("{l}"))?),
        None => None,
    };
    let kind = match a.kind {
        SearchType::Similarity => SearchKind::Similarity,
        SearchType::Threshold => SearchKind::Threshold(a.threshold),
        SearchType::Mmr => SearchKind::Mmr { fetch_k: a.fetch_k, lambda_mult: a.lambda },
    };
    let opts = SearchOptions {
        k: a.k,
        kind,
        hybrid: a.hybrid,
        filter: parse_filter(&a.filter)?,
        top_n: a.top_n.or(a.rerank.as_ref().map(|_| a.k)),
    };
    let results = index.search(&encoder, &a.query, &opts, reranker.as_ref())?;
    if results.query_truncated {
        eprintln!("warning: the query is longer than {}'s {} tokens; only its start was used", encoder.name(), encoder.max_seq_length());
    }
    if a.root.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    if results.hits.is_empty() {
        println!("no results");
        return Ok(());
    }
    println!("{:>4} {:>8} {:<32} {:>5} {:>13}  text", "rank", "score", "document", "chunk", "chars");
    for h in &results.hits {
        let c = &h.chunk;
        let text: String = c.text.chars().take(a.width).collect::<String>().replace('\n', " ");
        let more = if c.text.chars().count() > a.width { "…" } else { "" };
        println!(
            "{:>4} {:>8.4} {:<32} {:>5} {:>13}  {text}{more}",
            h.rank,
            h.score,
            c.doc_id,
            c.index,
            format!("{}-{}", c.start_char, c.end_char)
        );
    }
    Ok(())
}
