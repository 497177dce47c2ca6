//! Persistent indexes of document chunks: built from files, named by what determines them,
//! searched by similarity, score threshold, MMR or hybrid (vector + BM25 fused by
//! reciprocal rank fusion), filtered by metadata and reranked by a cross-encoder.
//!
//! ## Identity
//! An index built by [`build`] is named by a hash of what determines it: every document's id
//! and content hash, the splitter settings, the encoder's fingerprint and the vector index
//! kind. Building with identical settings finds the existing index and reuses it; a build
//! whose documents changed embeds only the chunks whose text no index of the same encoder
//! holds yet. An index edited later ([`Index::add_documents`], [`Index::delete_document`])
//! keeps its name; its manifest records that it was edited.
//!
//! ## On disk
//! `<root>/<id>/CURRENT` names the live version folder `v<N>/`, which holds
//! `manifest.json`, `chunks.jsonl` and the vector and BM25 files. A build is written in
//! `<root>/.partial-*` and renamed into place; an edit writes `v<N+1>/` complete and synced,
//! then replaces `CURRENT` atomically, then removes `v<N>/`. A crash at any point leaves the
//! previous index readable; leftovers are swept by the next build.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::docs::{load_documents, Chunk, Document, LoadOptions};
use crate::encoder::{CrossEncoder, SentenceEncoder};
use crate::error::{Error, Result};
use crate::index::{
    maximal_marginal_relevance, reciprocal_rank_fusion, score_threshold, Bm25, Bm25Params, Filter, FlatIndex, Hit, Hnsw, HnswParams,
    Metric, VectorIndex, RRF_K,
};
use crate::split::{LengthUnit, SplitterConfig};

/// The on-disk format version of an index folder.
pub const FORMAT_VERSION: u32 = 1;

const CURRENT: &str = "CURRENT";
const MANIFEST: &str = "manifest.json";
const CHUNKS: &str = "chunks.jsonl";
const PARTIAL_PREFIX: &str = ".partial-";

/// Chunks embedded per encoder call while building (progress is reported after each).
const EMBED_GROUP: usize = 256;

/// How an index stores its vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VectorKind {
    /// Exact search over every vector.
    #[default]
    Exact,
    /// An HNSW graph (approximate, for large corpora).
    Hnsw {
        /// Links per node.
        m: usize,
        /// Candidate list while inserting.
        ef_construction: usize,
        /// Candidate list while searching.
        ef_search: usize,
    },
}

/// What an index is built from, besides its documents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSettings {
    /// How documents are cut into chunks.
    pub splitter: SplitterConfig,
    /// How files are read.
    pub load: LoadOptions,
    /// Exact or HNSW.
    pub vectors: VectorKind,
}

/// One document of an index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocEntry {
    /// The document id.
    pub id: String,
    /// Where it came from.
    pub source: String,
    /// Its content hash ([`Document::content_hash`]).
    pub hash: String,
    /// How many chunks it has.
    pub chunks: usize,
}

/// What an index folder says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format: u32,
    /// The index's name (a hash of what determines it).
    pub id: String,
    /// Seconds since the epoch when it was built.
    pub created: u64,
    /// The encoder's name as given.
    pub model: String,
    /// The encoder's fingerprint: queries must use the same encoder.
    pub model_fingerprint: String,
    /// How the encoder's weights were held (`f32` or `bf16`): queries load it the same way.
    #[serde(default = "default_dtype")]
    pub model_dtype: String,
    /// The vectors' dimension.
    pub dim: usize,
    /// The build settings.
    pub settings: BuildSettings,
    /// The documents, in order.
    pub documents: Vec<DocEntry>,
    /// Live chunks.
    pub chunks: usize,
    /// Files or rows that were skipped while building, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Chunks whose vectors were reused from another index of the same encoder.
    pub reused_vectors: usize,
    /// Seconds the build took.
    pub build_seconds: f64,
    /// Whether documents were added or deleted after the build.
    pub edited: bool,
}

/// Where indexes live by default: `$FURNACE_HOME/indexes`.
pub fn default_root() -> Result<PathBuf> {
    let cache = furnace_hub::Cache::from_env().map_err(|e| Error::Invalid(format!("cannot open the furnace home: {e}")))?;
    Ok(cache.root().join("indexes"))
}

/// Progress of a build, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildProgress {
    /// Documents were loaded and split: `chunks` to embed (`reused` already have vectors).
    Split {
        /// Documents loaded.
        documents: usize,
        /// Chunks in all.
        chunks: usize,
        /// Chunks whose vectors are reused.
        reused: usize,
    },
    /// `done` of `total` chunks embedded.
    Embedded {
        /// Embedded so far.
        done: usize,
        /// To embed in all.
        total: usize,
    },
}

/// What [`build`] did.
#[derive(Debug)]
pub struct BuildReport {
    /// The index (its manifest says what it holds).
    pub index: Index,
    /// Whether an identical index existed and was reused as is.
    pub existed: bool,
}

fn default_dtype() -> String {
    "f32".into()
}

/// The name `WeightDType`'s parser reads back.
fn dtype_name(d: furnace_model::WeightDType) -> &'static str {
    match d {
        furnace_model::WeightDType::F32 => "f32",
        furnace_model::WeightDType::Bf16 => "bf16",
        furnace_model::WeightDType::Quantized => "quantized",
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of an index of these documents built with these settings and this encoder.
fn index_id(docs: &[Document], settings: &BuildSettings, fingerprint: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("furnace-index v{FORMAT_VERSION}\n").as_bytes());
    h.update(serde_json::to_vec(&settings.splitter).map_err(|e| Error::Invalid(e.to_string()))?);
    h.update(serde_json::to_vec(&settings.vectors).map_err(|e| Error::Invalid(e.to_string()))?);
    h.update(fingerprint.as_bytes());
    for d in docs {
        h.update(d.id.as_bytes());
        h.update([0u8]);
        h.update(d.content_hash().as_bytes());
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// Splits documents into chunks with the settings (token lengths counted by the encoder).
fn split_all(docs: &[Document], splitter: &SplitterConfig, encoder: &SentenceEncoder) -> Result<Vec<Vec<Chunk>>> {
    let count = |t: &str| encoder.count_tokens(t).unwrap_or_else(|_| t.chars().count());
    let tokens: Option<&dyn Fn(&str) -> usize> = match splitter.length {
        LengthUnit::Tokens => Some(&count),
        LengthUnit::Chars => None,
    };
    docs.iter().map(|d| splitter.split_document(d, tokens)).collect()
}

/// Builds (or finds) the index of `inputs` (files, folders, globs) in `root`.
pub fn build(
    root: &Path,
    inputs: &[PathBuf],
    settings: &BuildSettings,
    encoder: &SentenceEncoder,
    progress: &mut dyn FnMut(BuildProgress),
) -> Result<BuildReport> {
    settings.splitter.validate()?;
    let report = load_documents(inputs, &settings.load)?;
    let skipped: Vec<(String, String)> = report.skipped.iter().map(|(p, r)| (p.display().to_string(), r.clone())).collect();
    build_documents(root, &report.documents, skipped, settings, encoder, progress)
}

/// Builds (or finds) the index of documents already read (their ids as given), in `root`;
/// `skipped` is recorded in the manifest. [`build`] reads files and calls this.
pub fn build_documents(
    root: &Path,
    documents: &[Document],
    skipped: Vec<(String, String)>,
    settings: &BuildSettings,
    encoder: &SentenceEncoder,
    progress: &mut dyn FnMut(BuildProgress),
) -> Result<BuildReport> {
    settings.splitter.validate()?;
    let started = Instant::now();
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    sweep_partials(root);
    let id = index_id(documents, settings, encoder.fingerprint())?;
    if let Ok(index) = Index::open(root, &id) {
        return Ok(BuildReport { index, existed: true });
    }
    let per_doc = split_all(documents, &settings.splitter, encoder)?;
    let chunks: Vec<Chunk> = per_doc.iter().flatten().cloned().collect();
    if chunks.is_empty() {
        return Err(Error::Invalid("the documents hold no text to index (every chunk is empty)".into()));
    }
    let known = known_vectors(root, encoder.fingerprint(), &chunks);
    let reused = chunks.iter().filter(|c| known.contains_key(&sha_hex(c.text.as_bytes()))).count();
    progress(BuildProgress::Split { documents: documents.len(), chunks: chunks.len(), reused });
    let vectors = embed_chunks(encoder, &chunks, &known, progress)?;

    let entries = documents
        .iter()
        .zip(&per_doc)
        .map(|(d, cs)| DocEntry { id: d.id.clone(), source: d.source.clone(), hash: d.content_hash(), chunks: cs.len() })
        .collect();
    let manifest = Manifest {
        format: FORMAT_VERSION,
        id: id.clone(),
        created: now(),
        model: encoder.name().to_string(),
        model_fingerprint: encoder.fingerprint().to_string(),
        model_dtype: dtype_name(encoder.dtype()).to_string(),
        dim: encoder.dim(),
        settings: settings.clone(),
        documents: entries,
        chunks: chunks.len(),
        skipped,
        reused_vectors: reused,
        build_seconds: 0.0,
        edited: false,
    };
    let mut index = Index::empty(root.join(&id), manifest)?;
    for (chunk, vector) in chunks.into_iter().zip(vectors) {
        index.push(chunk, &vector)?;
    }
    index.manifest.build_seconds = started.elapsed().as_secs_f64();
    // Written aside and renamed into place: a crash leaves no half-built index.
    let partial = root.join(format!("{PARTIAL_PREFIX}{id}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    index.write_version(&partial, 1)?;
    furnace_hub::failpoint::hit("index.build.before_rename");
    let final_dir = root.join(&id);
    match fs::rename(&partial, &final_dir) {
        Ok(()) => {
            sync_dir(root)?;
            furnace_hub::failpoint::hit("index.build.after_rename");
        }
        Err(_) if final_dir.join(CURRENT).is_file() => {
            // Another build of the same index finished first: theirs is as good.
            let _ = fs::remove_dir_all(&partial);
        }
        Err(e) => return Err(Error::io(&final_dir, e)),
    }
    index.dir = final_dir;
    index.version = 1;
    Ok(BuildReport { index, existed: false })
}

/// Vectors of chunk texts that other indexes of the same encoder already hold, by the
/// SHA-256 of the text (only those this build needs).
fn known_vectors(root: &Path, fingerprint: &str, chunks: &[Chunk]) -> HashMap<String, Vec<f32>> {
    let wanted: HashSet<String> = chunks.iter().map(|c| sha_hex(c.text.as_bytes())).collect();
    let mut known = HashMap::new();
    for manifest in list(root).unwrap_or_default() {
        if manifest.model_fingerprint != fingerprint {
            continue;
        }
        let Ok(index) = Index::open(root, &manifest.id) else { continue };
        for (slot, chunk) in index.chunks.iter().enumerate() {
            let Some(chunk) = chunk else { continue };
            let key = sha_hex(chunk.text.as_bytes());
            if wanted.contains(&key) && !known.contains_key(&key) {
                if let Some(v) = index.vectors.as_dyn().vector(slot as u32) {
                    known.insert(key, v.to_vec());
                }
            }
        }
    }
    known
}

fn embed_chunks(
    encoder: &SentenceEncoder,
    chunks: &[Chunk],
    known: &HashMap<String, Vec<f32>>,
    progress: &mut dyn FnMut(BuildProgress),
) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Option<Vec<f32>>> = chunks.iter().map(|c| known.get(&sha_hex(c.text.as_bytes())).cloned()).collect();
    let todo: Vec<usize> = out.iter().enumerate().filter(|(_, v)| v.is_none()).map(|(i, _)| i).collect();
    let total = todo.len();
    progress(BuildProgress::Embedded { done: 0, total });
    for (g, group) in todo.chunks(EMBED_GROUP).enumerate() {
        let texts: Vec<&str> = group.iter().map(|&i| chunks[i].text.as_str()).collect();
        let emb = encoder.embed(&texts)?;
        for (&i, v) in group.iter().zip(emb.vectors) {
            out[i] = Some(v);
        }
        progress(BuildProgress::Embedded { done: (g * EMBED_GROUP + group.len()).min(total), total });
    }
    out.into_iter().map(|v| v.ok_or_else(|| Error::Invalid("a chunk was left without a vector".into()))).collect()
}

/// The manifests of every index in `root`, newest first (unreadable folders are left out).
pub fn list(root: &Path) -> Result<Vec<Manifest>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if let Ok(m) = read_manifest(&entry.path()) {
            out.push(m);
        }
    }
    out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// The full id of the index whose id starts with `prefix` (at least 4 characters, and
/// only one index may match).
pub fn resolve_id(root: &Path, prefix: &str) -> Result<String> {
    if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!("{prefix:?} is not an index id (hex, at least 4 characters; see `furnace index list`)")));
    }
    let ids: Vec<String> = list(root)?.into_iter().map(|m| m.id).filter(|id| id.starts_with(prefix)).collect();
    match ids.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Invalid(format!("no index {prefix} in {} (see `furnace index list`)", root.display()))),
        many => Err(Error::Invalid(format!("{prefix} matches {} indexes ({}); give more of the id", many.len(), many.join(", ")))),
    }
}

/// Removes an index folder.
pub fn remove(root: &Path, id: &str) -> Result<()> {
    let dir = root.join(id);
    // Renamed away first, so that a crash while deleting never leaves a half index that
    // `list` would show.
    let trash = root.join(format!("{PARTIAL_PREFIX}rm-{id}-{}", std::process::id()));
    fs::rename(&dir, &trash).map_err(|e| Error::io(&dir, e))?;
    fs::remove_dir_all(&trash).map_err(|e| Error::io(&trash, e))
}

/// Removes `.partial-*` leftovers of builds that crashed (not those of running builds of
/// this process).
fn sweep_partials(root: &Path) {
    let mine = format!("-{}", std::process::id());
    let Ok(entries) = fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(PARTIAL_PREFIX) && !name.ends_with(&mine) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let current = dir.join(CURRENT);
    let version = fs::read_to_string(&current).map_err(|e| Error::io(&current, e))?;
    let path = dir.join(version.trim()).join(MANIFEST);
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
    if m.format != FORMAT_VERSION {
        return Err(Error::Invalid(format!("{}: index format {} is not {FORMAT_VERSION}; rebuild it", path.display(), m.format)));
    }
    Ok(m)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, write: impl FnOnce(&mut BufWriter<fs::File>) -> std::io::Result<()>) -> Result<()> {
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::new(file);
    write(&mut w).map_err(|e| Error::io(path, e))?;
    let file = w.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// The vectors of an index.
#[derive(Debug)]
enum Vectors {
    Exact(FlatIndex),
    Hnsw(Hnsw),
}

impl Vectors {
    fn as_dyn(&self) -> &dyn VectorIndex {
        match self {
            Vectors::Exact(f) => f,
            Vectors::Hnsw(h) => h,
        }
    }
}

/// How results are picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SearchKind {
    /// The `k` most similar chunks.
    Similarity,
    /// The `k` most similar chunks scoring at least the threshold.
    Threshold(f32),
    /// Maximal marginal relevance over `fetch_k` candidates.
    Mmr {
        /// Candidates fetched first.
        fetch_k: usize,
        /// Relevance (1) against diversity (0).
        lambda_mult: f32,
    },
}

/// A search request.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Results wanted (before reranking).
    pub k: usize,
    /// How results are picked.
    pub kind: SearchKind,
    /// Fuse the vector results with BM25's by reciprocal rank fusion.
    pub hybrid: bool,
    /// Only chunks whose metadata matches.
    pub filter: Filter,
    /// With a reranker: keep the best `top_n` (at most `k`) by its score.
    pub top_n: Option<usize>,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions { k: 4, kind: SearchKind::Similarity, hybrid: false, filter: Filter::all(), top_n: None }
    }
}

/// One result.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    /// 1 for the best.
    pub rank: usize,
    /// The score results are ordered by: the reranker's when reranked, else the fused RRF
    /// score for hybrid search, else the vector similarity.
    pub score: f32,
    /// The vector similarity, when the chunk was among the vector results.
    pub vector_score: Option<f32>,
    /// The BM25 score, when hybrid search found the chunk by keywords.
    pub bm25_score: Option<f32>,
    /// The chunk (document id, position, span, text, metadata).
    pub chunk: Chunk,
}

/// What a search returned.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResults {
    /// Best first.
    pub hits: Vec<SearchHit>,
    /// The query was longer than the encoder's limit and was cut.
    pub query_truncated: bool,
}

/// An index, open for searching and editing.
#[derive(Debug)]
pub struct Index {
    dir: PathBuf,
    version: u64,
    manifest: Manifest,
    /// Chunk by slot; deleted slots are `None`.
    chunks: Vec<Option<Chunk>>,
    vectors: Vectors,
    bm25: Bm25,
}

impl Index {
    fn empty(dir: PathBuf, manifest: Manifest) -> Result<Self> {
        let vectors = match manifest.settings.vectors {
            VectorKind::Exact => Vectors::Exact(FlatIndex::new(manifest.dim, Metric::Cosine)?),
            VectorKind::Hnsw { m, ef_construction, ef_search } => {
                let params = HnswParams { m, ef_construction, ef_search, ..HnswParams::default() };
                Vectors::Hnsw(Hnsw::new(manifest.dim, Metric::Cosine, params)?)
            }
        };
        Ok(Index { dir, version: 0, manifest, chunks: Vec::new(), vectors, bm25: Bm25::new(Bm25Params::default())? })
    }

    /// Opens index `id` in `root`.
    pub fn open(root: &Path, id: &str) -> Result<Self> {
        let dir = root.join(id);
        let manifest = read_manifest(&dir)?;
        let current = fs::read_to_string(dir.join(CURRENT)).map_err(|e| Error::io(dir.join(CURRENT), e))?;
        let vdir = dir.join(current.trim());
        let version: u64 =
            current.trim().trim_start_matches('v').parse().map_err(|_| Error::Invalid(format!("{}: bad CURRENT", dir.display())))?;
        let path = vdir.join(CHUNKS);
        let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut chunks = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| Error::io(&path, e))?;
            let chunk: Option<Chunk> = serde_json::from_str(&line)
                .map_err(|e| Error::Invalid(format!("{} line {}: {e}; the index is damaged, rebuild it", path.display(), i + 1)))?;
            chunks.push(chunk);
        }
        let vectors = match manifest.settings.vectors {
            VectorKind::Exact => Vectors::Exact(FlatIndex::load(&vdir)?),
            VectorKind::Hnsw { .. } => Vectors::Hnsw(Hnsw::load(&vdir)?),
        };
        let bm25 = Bm25::load(&vdir)?;
        let live = chunks.iter().filter(|c| c.is_some()).count();
        if vectors.as_dyn().dim() != manifest.dim || bm25.len() != live || live != manifest.chunks {
            return Err(Error::Invalid(format!("{}: its files disagree (chunks, vectors, keywords); rebuild it", dir.display())));
        }
        Ok(Index { dir, version, manifest, chunks, vectors, bm25 })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The index's id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// The live chunks, in slot order.
    pub fn chunks(&self) -> impl Iterator<Item = &Chunk> {
        self.chunks.iter().flatten()
    }

    fn push(&mut self, chunk: Chunk, vector: &[f32]) -> Result<()> {
        let slot = self.chunks.len() as u32;
        let meta = Some(chunk.metadata.clone());
        let v = match &mut self.vectors {
            Vectors::Exact(f) => f.add_with_metadata(vector, meta)?,
            Vectors::Hnsw(h) => h.add_with_metadata(vector, meta)?,
        };
        let b = self.bm25.add(&chunk.text)?;
        if v != slot || b != slot {
            return Err(Error::Invalid(format!("index slots disagree (chunk {slot}, vector {v}, keywords {b})")));
        }
        self.chunks.push(Some(chunk));
        Ok(())
    }

    /// Writes version `v` of the index into `dir/v<v>/` and points `dir/CURRENT` at it.
    fn write_version(&self, dir: &Path, v: u64) -> Result<()> {
        let vdir = dir.join(format!("v{v}"));
        let _ = fs::remove_dir_all(&vdir);
        fs::create_dir_all(&vdir).map_err(|e| Error::io(&vdir, e))?;
        write_synced(&vdir.join(CHUNKS), |w| {
            for c in &self.chunks {
                serde_json::to_writer(&mut *w, c)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        match &self.vectors {
            Vectors::Exact(f) => f.save(&vdir)?,
            Vectors::Hnsw(h) => h.save(&vdir)?,
        };
        self.bm25.save(&vdir)?;
        let manifest = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::Invalid(e.to_string()))?;
        write_synced(&vdir.join(MANIFEST), |w| w.write_all(&manifest))?;
        sync_dir(&vdir)?;
        furnace_hub::failpoint::hit("index.version.before_current");
        let tmp = dir.join(format!("{CURRENT}.tmp"));
        write_synced(&tmp, |w| w.write_all(format!("v{v}\n").as_bytes()))?;
        fs::rename(&tmp, dir.join(CURRENT)).map_err(|e| Error::io(dir.join(CURRENT), e))?;
        sync_dir(dir)
    }

    /// Saves an edit as a new version and removes the old one.
    fn commit(&mut self) -> Result<()> {
        self.manifest.edited = true;
        self.manifest.chunks = self.chunks.iter().filter(|c| c.is_some()).count();
        let next = self.version + 1;
        self.write_version(&self.dir, next)?;
        let old = self.dir.join(format!("v{}", self.version));
        self.version = next;
        furnace_hub::failpoint::hit("index.edit.before_removing_old");
        let _ = fs::remove_dir_all(old);
        // Versions a crashed edit left behind (written but never made current, or current
        // once but not removed).
        let live = format!("v{next}");
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('v') && name != live && e.path().is_dir() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    fn check_encoder(&self, encoder: &SentenceEncoder) -> Result<()> {
        if encoder.fingerprint() != self.manifest.model_fingerprint {
            return Err(Error::Invalid(format!(
                "index {} was built with {} (fingerprint {}), not with {} (fingerprint {}): search it with the same model, or build an index with this one",
                self.manifest.id,
                self.manifest.model,
                self.manifest.model_fingerprint,
                encoder.name(),
                encoder.fingerprint()
            )));
        }
        Ok(())
    }

    /// Adds documents (split with the index's settings and embedded with `encoder`, which
    /// must be the index's). A document whose id is already in the index replaces it.
    /// Returns the number of chunks added.
    pub fn add_documents(&mut self, docs: &[Document], encoder: &SentenceEncoder) -> Result<usize> {
        self.check_encoder(encoder)?;
        let per_doc = split_all(docs, &self.manifest.settings.splitter, encoder)?;
        let mut added = 0;
        for (doc, chunks) in docs.iter().zip(per_doc) {
            self.remove_doc_chunks(&doc.id)?;
            self.manifest.documents.retain(|d| d.id != doc.id);
            let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
            let vectors = if texts.is_empty() { Vec::new() } else { encoder.embed(&texts)?.vectors };
            self.manifest.documents.push(DocEntry {
                id: doc.id.clone(),
                source: doc.source.clone(),
                hash: doc.content_hash(),
                chunks: chunks.len(),
            });
            added += chunks.len();
            for (chunk, v) in chunks.into_iter().zip(vectors) {
                self.push(chunk, &v)?;
            }
        }
        self.commit()?;
        Ok(added)
    }

    /// Deletes a document and its chunks; an unknown id is an error.
    pub fn delete_document(&mut self, doc_id: &str) -> Result<usize> {
        if !self.manifest.documents.iter().any(|d| d.id == doc_id) {
            return Err(Error::Invalid(format!("index {} has no document {doc_id:?}", self.manifest.id)));
        }
        let removed = self.remove_doc_chunks(doc_id)?;
        self.manifest.documents.retain(|d| d.id != doc_id);
        self.commit()?;
        Ok(removed)
    }

    fn remove_doc_chunks(&mut self, doc_id: &str) -> Result<usize> {
        let slots: Vec<usize> =
            self.chunks.iter().enumerate().filter(|(_, c)| c.as_ref().is_some_and(|c| c.doc_id == doc_id)).map(|(i, _)| i).collect();
        for &slot in &slots {
            match &mut self.vectors {
                Vectors::Exact(f) => f.delete(slot as u32)?,
                Vectors::Hnsw(h) => h.delete(slot as u32)?,
            }
            self.bm25.delete(slot as u32)?;
            self.chunks[slot] = None;
        }
        Ok(slots.len())
    }

    /// Searches with a query text embedded by `encoder` (the index's own), optionally
    /// reranked by `reranker`.
    pub fn search(
        &self,
        encoder: &SentenceEncoder,
        query: &str,
        opts: &SearchOptions,
        reranker: Option<&CrossEncoder>,
    ) -> Result<SearchResults> {
        self.check_encoder(encoder)?;
        if opts.k == 0 {
            return Err(Error::Invalid("k must be at least 1".into()));
        }
        match (opts.top_n, reranker) {
            (Some(n), _) if n == 0 || n > opts.k => {
                return Err(Error::Invalid(format!("top_n ({n}) must be between 1 and k ({})", opts.k)));
            }
            (Some(_), None) => return Err(Error::Invalid("top_n needs a reranker".into())),
            _ => {}
        }
        let emb = encoder.embed(&[query])?;
        let query_truncated = !emb.truncated.is_empty();
        let qv = emb.vectors.into_iter().next().ok_or_else(|| Error::Invalid("the encoder returned no vector".into()))?;
        let index = self.vectors.as_dyn();
        let live = self.manifest.chunks;
        let k = opts.k.min(live.max(1));
        let vector_hits: Vec<Hit> = match opts.kind {
            SearchKind::Similarity => index.search_filtered(&qv, k, &opts.filter)?,
            SearchKind::Threshold(t) => score_threshold(&index.search_filtered(&qv, k, &opts.filter)?, t),
            SearchKind::Mmr { fetch_k, lambda_mult } => {
                if !(0.0..=1.0).contains(&lambda_mult) {
                    return Err(Error::Invalid(format!("lambda_mult must be between 0 and 1, not {lambda_mult}")));
                }
                // LangChain's MMR: fetch `fetch_k` (filtered) candidates, then pick `k`.
                let candidates = index.search_filtered(&qv, fetch_k.max(k), &opts.filter)?;
                let vectors: Vec<&[f32]> = candidates.iter().filter_map(|h| index.vector(h.id)).collect();
                if vectors.len() != candidates.len() {
                    return Err(Error::Invalid("a candidate of the index has no vector; the index is damaged, rebuild it".into()));
                }
                maximal_marginal_relevance(&qv, &vectors, lambda_mult, k.min(candidates.len()).max(1))?
                    .into_iter()
                    .filter_map(|i| candidates.get(i).copied())
                    .collect()
            }
        };
        let vector_score: HashMap<u32, f32> = vector_hits.iter().map(|h| (h.id, h.score)).collect();
        let mut bm25_score: HashMap<u32, f32> = HashMap::new();
        let ranked: Vec<Hit> = if opts.hybrid {
            let keyword_hits: Vec<Hit> = self
                .bm25
                .search(query, live.max(1))?
                .into_iter()
                .filter(|h| h.score > 0.0 && self.chunk_matches(h.id, &opts.filter))
                .take(k)
                .collect();
            bm25_score.extend(keyword_hits.iter().map(|h| (h.id, h.score)));
            let mut fused = reciprocal_rank_fusion(&[(&vector_hits, 1.0), (&keyword_hits, 1.0)], RRF_K)?;
            fused.truncate(k);
            fused
        } else {
            vector_hits
        };
        let mut hits: Vec<SearchHit> = ranked
            .iter()
            .filter_map(|h| {
                let chunk = self.chunks.get(h.id as usize)?.clone()?;
                Some(SearchHit {
                    rank: 0,
                    score: h.score,
                    vector_score: vector_score.get(&h.id).copied(),
                    bm25_score: bm25_score.get(&h.id).copied(),
                    chunk,
                })
            })
            .collect();
        if let Some(reranker) = reranker {
            let passages: Vec<&str> = hits.iter().map(|h| h.chunk.text.as_str()).collect();
            let scores = reranker.scores(query, &passages)?;
            for (h, s) in hits.iter_mut().zip(scores) {
                h.score = s;
            }
            hits.sort_by(|a, b| b.score.total_cmp(&a.score));
            hits.truncate(opts.top_n.unwrap_or(hits.len()));
        }
        for (i, h) in hits.iter_mut().enumerate() {
            h.rank = i + 1;
        }
        Ok(SearchResults { hits, query_truncated })
    }

    fn chunk_matches(&self, slot: u32, filter: &Filter) -> bool {
        self.chunks.get(slot as usize).and_then(|c| c.as_ref()).is_some_and(|c| filter.matches(Some(&c.metadata)))
    }
}
