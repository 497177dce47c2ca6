//! RAG over uploaded documents: named collections backed by the retrieval crate's
//! persistent indexes (`furnace_rag::collection`), and retrieval for chat.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/documents` | upload: `multipart/form-data` with one or more `file` parts (txt, md, html, pdf, jsonl, csv, parquet) and a `collection` field, or JSON `{"collection", "documents": [{"text", "name"?, "metadata"?}]}`; returns each upload's id and chunk count |
//! | `GET /v1/documents[?collection=NAME]` | the uploads, by collection |
//! | `DELETE /v1/documents/{id}` | removes an upload's documents and chunks from its collection |
//! | `POST /v1/documents/query` | `{"query", "collection", "k"?, "hybrid"?, "rerank"?}`: the best chunks with scores and sources |
//!
//! A chat completion retrieves when its model is `rag:COLLECTION` (the base answers), or
//! when its body has `"rag": {"collection", "k"?, "template"?}` (any model): the last user
//! turn is the query, and the template (with `{context}` and `{question}`) replaces that
//! turn's content. The response carries the chunks used as `sources`, a field OpenAI clients
//! ignore.
//!
//! An upload is one index edit: the index writes a complete new version and switches to it
//! atomically, so a crash never leaves a half-added upload. A collection's first upload
//! builds its index; the collection's name then points at it (`<collections>/<name>.index`,
//! written atomically). An upload's documents have ids `file-<hex>` (or `file-<hex>/<row id>`
//! for tables), and the upload is found again by that prefix.

use super::{json_body, refuse_unknown, serving_of, OpenAiError, Serving};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use furnace_rag::collection::{self, BuildSettings, Index, SearchKind, SearchOptions};
use furnace_rag::docs::{load_documents, Document, LoadOptions};
use furnace_rag::{CrossEncoder, SentenceEncoder};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The largest upload request, in bytes (32 MiB).
pub const UPLOAD_LIMIT: usize = 32 << 20;
/// The most chunks one query or retrieval may return.
pub const MAX_K: usize = 64;
/// The prompt template of a retrieval chat when the request gives none.
pub const DEFAULT_TEMPLATE: &str =
    "Answer the question using the context below. If the context does not contain the answer, say so.\n\nContext:\n{context}\n\nQuestion: {question}";

/// Where collections live and what embeds them.
#[derive(Debug, Clone)]
pub struct RagSettings {
    /// The folder of the indexes (shared with `furnace index`).
    pub index_root: PathBuf,
    /// The folder of the collection names (`<name>.index` holds the index id).
    pub collections_dir: PathBuf,
    /// The sentence encoder uploads and queries use (an alias or a directory).
    pub encoder: String,
    /// A cross-encoder for `rerank`, if any.
    pub reranker: Option<String>,
}

/// The collections of a server: settings, the encoders (loaded on first use) and the open
/// indexes (one lock each: an upload and a query of one collection take turns).
pub(crate) struct Collections {
    settings: RagSettings,
    encoder: Mutex<Option<Arc<SentenceEncoder>>>,
    reranker: Mutex<Option<Arc<CrossEncoder>>>,
    open: Mutex<HashMap<String, Arc<Mutex<Index>>>>,
    /// Serializes first builds (two first uploads to one collection).
    creating: Mutex<()>,
}

type RagResult<T> = std::result::Result<T, OpenAiError>;

fn rag_error(e: furnace_rag::Error) -> OpenAiError {
    OpenAiError::invalid(e.to_string())
}

impl Collections {
    pub(crate) fn new(settings: RagSettings) -> Self {
        Self { settings, encoder: Mutex::new(None), reranker: Mutex::new(None), open: Mutex::new(HashMap::new()), creating: Mutex::new(()) }
    }

    /// The encoder, loaded on first use (blocking).
    fn encoder(&self, embedders: &BTreeMap<String, Arc<SentenceEncoder>>) -> RagResult<Arc<SentenceEncoder>> {
        let mut slot = self.encoder.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let e = match embedders.get(&self.settings.encoder) {
            Some(e) => e.clone(),
            None => Arc::new(
                SentenceEncoder::load(&self.settings.encoder, &mut |_| {})
                    .map_err(|e| OpenAiError::internal(format!("loading the collections' encoder {}: {e}", self.settings.encoder)))?,
            ),
        };
        *slot = Some(e.clone());
        Ok(e)
    }

    fn reranker(&self) -> RagResult<Arc<CrossEncoder>> {
        let Some(name) = &self.settings.reranker else {
            return Err(OpenAiError::bad_param("rerank", "no reranker is served: start furnace serve with --reranker NAME"));
        };
        let mut slot = self.reranker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = slot.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(
            CrossEncoder::load(name, &mut |_| {}).map_err(|e| OpenAiError::internal(format!("loading the reranker {name}: {e}")))?,
        );
        *slot = Some(r.clone());
        Ok(r)
    }

    /// The names of the collections.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.settings.collections_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".index")).map(str::to_string))
                    .filter(|n| valid_name(n))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn pointer(&self, name: &str) -> PathBuf {
        self.settings.collections_dir.join(format!("{name}.index"))
    }

    /// The open index of a collection; `Ok(None)` when it has none yet.
    fn index(&self, name: &str) -> RagResult<Option<Arc<Mutex<Index>>>> {
        if let Some(i) = self.open.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(Some(i.clone()));
        }
        let id = match std::fs::read_to_string(self.pointer(name)) {
            Ok(id) => id.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OpenAiError::internal(format!("reading collection {name}: {e}"))),
        };
        let index = Index::open(&self.settings.index_root, &id)
            .map_err(|e| OpenAiError::internal(format!("collection {name}: its index {id} does not open: {e}")))?;
        let index = Arc::new(Mutex::new(index));
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), index.clone());
        Ok(Some(index))
    }

    /// Adds documents to a collection (building its index on the first upload); returns
    /// the chunks added.
    fn add(&self, name: &str, docs: &[Document], embedders: &BTreeMap<String, Arc<SentenceEncoder>>) -> RagResult<usize> {
        let encoder = self.encoder(embedders)?;
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = self.index(name)? {
            let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
            return index.add_documents(docs, &encoder).map_err(rag_error);
        }
        let settings = BuildSettings { splitter: Default::default(), load: LoadOptions::default(), vectors: Default::default() };
        let report = collection::build_documents(&self.settings.index_root, docs, Vec::new(), &settings, &encoder, &mut |_| {})
            .map_err(rag_error)?;
        let chunks = report.index.manifest().chunks;
        write_atomically(&self.pointer(name), report.index.id().as_bytes())
            .map_err(|e| OpenAiError::internal(format!("recording collection {name}: {e}")))?;
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Arc::new(Mutex::new(report.index)));
        Ok(chunks)
    }
}

/// A collection name: 1–64 of `A-Za-z0-9_.-`, not starting with a dot.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn check_name(name: &str) -> RagResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(OpenAiError::bad_param(
            "collection",
            format!("collection names are 1 to 64 of A-Z a-z 0-9 _ - . (not starting with a dot); got {name:?}"),
        ))
    }
}

/// Writes a small file whole or not at all: a temp file, fsync, rename, fsync of the folder.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn collections_of(s: &Serving) -> RagResult<&Collections> {
    s.collections
        .as_ref()
        .ok_or_else(|| OpenAiError::new(StatusCode::NOT_FOUND, "this server keeps no document collections", "invalid_request_error"))
}

/// A fresh upload id, `file-` and 24 hex digits.
fn upload_id() -> String {
    super::new_id("file")
}

/// The documents of one upload, with their ids set: `file-<hex>` for one document,
/// `file-<hex>/<its own id>` for several.
fn name_documents(upload: &str, filename: &str, mut docs: Vec<Document>) -> Vec<Document> {
    let single = docs.len() == 1;
    for d in &mut docs {
        d.id = if single { upload.to_string() } else { format!("{upload}/{}", d.id) };
        d.source = filename.to_string();
        d.metadata.insert("upload".into(), Value::from(upload));
        d.metadata.insert("filename".into(), Value::from(filename));
    }
    docs
}

/// Reads one uploaded file with the retrieval crate's loaders (by its extension).
fn read_file(filename: &str, bytes: &[u8]) -> RagResult<Vec<Document>> {
    let ext = Path::new(filename).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if !furnace_rag::docs::SUPPORTED_EXTENSIONS.contains(&ext.as_str()) {
        return Err(OpenAiError::bad_param(
            "file",
            format!("{filename}: unsupported file type; give one of {}", furnace_rag::docs::SUPPORTED_EXTENSIONS.join(", ")),
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| OpenAiError::internal(format!("a folder for the upload: {e}")))?;
    let path = dir.path().join(format!("upload.{ext}"));
    std::fs::write(&path, bytes).map_err(|e| OpenAiError::internal(format!("saving the upload: {e}")))?;
    let opts = LoadOptions { strict: true, ..LoadOptions::default() };
    let report = load_documents(&[path], &opts).map_err(|e| OpenAiError::bad_param("file", format!("{filename}: {e}")))?;
    if report.documents.is_empty() {
        return Err(OpenAiError::bad_param("file", format!("{filename} holds no text")));
    }
    Ok(report.documents)
}

/// A file name as given, reduced to its last component and safe characters.
fn clean_filename(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let clean: String = last.chars().filter(|c| !c.is_control()).take(200).collect();
    if clean.is_empty() {
        "upload.txt".into()
    } else {
        clean
    }
}

pub(super) async fn upload(State(st): State<AppState>, req: Request) -> RagResult<Json<Value>> {
    let s = serving_of(&st)?;
    collections_of(&s)?;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("multipart/form-data"));
    // (collection, upload id, file name, documents)
    let mut uploads: Vec<(String, String, Vec<Document>)> = Vec::new();
    let mut collection = None;
    if is_multipart {
        let mut form = Multipart::from_request(req, &()).await.map_err(|e| OpenAiError::invalid(format!("bad multipart body: {e}")))?;
        while let Some(field) = form.next_field().await.map_err(|e| OpenAiError::invalid(format!("bad multipart body: {e}")))? {
            match field.name().unwrap_or_default() {
                "collection" => collection = Some(field.text().await.map_err(|e| OpenAiError::bad_param("collection", e.to_string()))?),
                "file" | "files" => {
                    let filename = clean_filename(field.file_name().unwrap_or("upload.txt"));
                    let bytes = field.bytes().await.map_err(|e| OpenAiError::bad_param("file", e.to_string()))?;
                    let name = filename.clone();
                    let docs = tokio::task::spawn_blocking(move || read_file(&name, &bytes))
                        .await
                        .map_err(|e| OpenAiError::internal(e.to_string()))??;
                    let id = upload_id();
                    uploads.push((id.clone(), filename.clone(), name_documents(&id, &filename, docs)));
                }
                other => return Err(OpenAiError::bad_param(other, format!("unknown form field {other:?} (give collection and file)"))),
            }
        }
    } else {
        let body = json_body(Bytes::from_request(req, &()).await)?;
        refuse_unknown(&body, &["collection", "documents"])?;
        collection = body.get("collection").and_then(Value::as_str).map(str::to_string);
        let Some(Value::Array(items)) = body.get("documents") else {
            return Err(OpenAiError::bad_param("documents", "documents is required: a list of {\"text\", \"name\"?, \"metadata\"?}"));
        };
        for (i, item) in items.iter().enumerate() {
            let param = format!("documents[{i}]");
            let Some(text) = item.get("text").and_then(Value::as_str).filter(|t| !t.trim().is_empty()) else {
                return Err(OpenAiError::bad_param(&param, format!("{param}.text must be a non-empty string")));
            };
            let filename = clean_filename(item.get("name").and_then(Value::as_str).unwrap_or("text"));
            let metadata = match item.get("metadata") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => m.clone(),
                Some(_) => return Err(OpenAiError::bad_param(&param, format!("{param}.metadata must be an object"))),
            };
            let id = upload_id();
            let doc = Document { id: id.clone(), source: filename.clone(), text: text.to_string(), metadata };
            uploads.push((id.clone(), filename.clone(), name_documents(&id, &filename, vec![doc])));
        }
    }
    let collection = collection.unwrap_or_else(|| "default".to_string());
    check_name(&collection)?;
    if uploads.is_empty() {
        return Err(OpenAiError::bad_param("file", "no file or document to add"));
    }
    let s2 = s.clone();
    let c2 = collection.clone();
    let added = tokio::task::spawn_blocking(move || -> RagResult<Vec<Value>> {
        let collections = collections_of(&s2)?;
        let mut out = Vec::new();
        for (id, filename, docs) in &uploads {
            let chunks = collections.add(&c2, docs, &s2.embedders)?;
            out.push(
                json!({"id": id, "object": "document", "collection": c2, "filename": filename, "documents": docs.len(), "chunks": chunks}),
            );
        }
        Ok(out)
    })
    .await
    .map_err(|e| OpenAiError::internal(e.to_string()))??;
    Ok(Json(json!({"object": "list", "data": added})))
}

/// The uploads of one collection, from its index's documents.
fn uploads_of(name: &str, index: &Index) -> Vec<Value> {
    let mut by_upload: BTreeMap<String, (String, usize, usize)> = BTreeMap::new();
    for d in &index.manifest().documents {
        let upload = d.id.split('/').next().unwrap_or(&d.id).to_string();
        let e = by_upload.entry(upload).or_insert_with(|| (d.source.clone(), 0, 0));
        e.1 += 1;
        e.2 += d.chunks;
    }
    by_upload
        .into_iter()
        .map(|(id, (filename, documents, chunks))| {
            json!({"id": id, "object": "document", "collection": name, "filename": filename, "documents": documents, "chunks": chunks})
        })
        .collect()
}

pub(super) async fn list(State(st): State<AppState>, Query(q): Query<HashMap<String, String>>) -> RagResult<Json<Value>> {
    let s = serving_of(&st)?;
    if let Some(k) = q.keys().find(|k| *k != "collection") {
        return Err(OpenAiError::bad_param(k, format!("unknown query parameter {k}")));
    }
    let wanted = q.get("collection").cloned();
    let data = tokio::task::spawn_blocking(move || -> RagResult<Vec<Value>> {
        let collections = collections_of(&s)?;
        let mut out = Vec::new();
        for name in collections.names() {
            if wanted.as_ref().is_some_and(|w| *w != name) {
                continue;
            }
            if let Some(index) = collections.index(&name)? {
                out.extend(uploads_of(&name, &index.lock().unwrap_or_else(|p| p.into_inner())));
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| OpenAiError::internal(e.to_string()))??;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(super) async fn delete(State(st): State<AppState>, UrlPath(id): UrlPath<String>) -> RagResult<Json<Value>> {
    let s = serving_of(&st)?;
    let out = tokio::task::spawn_blocking(move || -> RagResult<Value> {
        let collections = collections_of(&s)?;
        for name in collections.names() {
            let Some(index) = collections.index(&name)? else { continue };
            let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = index
                .manifest()
                .documents
                .iter()
                .filter(|d| d.id == id || d.id.starts_with(&format!("{id}/")))
                .map(|d| d.id.clone())
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut chunks = 0;
            for doc in &ids {
                chunks += index.delete_document(doc).map_err(rag_error)?;
            }
            return Ok(json!({"id": id, "object": "document", "collection": name, "deleted": true, "chunks": chunks}));
        }
        Err(OpenAiError::new(StatusCode::NOT_FOUND, format!("no document {id} in any collection"), "invalid_request_error").param("id"))
    })
    .await
    .map_err(|e| OpenAiError::internal(e.to_string()))??;
    Ok(Json(out))
}

/// One retrieved chunk, as `sources` and the query route give it.
pub(crate) fn source_json(hit: &collection::SearchHit) -> Value {
    json!({
        "rank": hit.rank,
        "score": hit.score,
        "document_id": hit.chunk.doc_id,
        "filename": hit.chunk.metadata.get("filename").cloned().unwrap_or(Value::Null),
        "chunk": hit.chunk.index,
        "text": hit.chunk.text,
        "metadata": hit.chunk.metadata,
    })
}

/// What to retrieve: `k` chunks of `collection` for `query`.
pub(crate) struct Retrieval {
    pub collection: String,
    pub k: usize,
    pub hybrid: bool,
    pub rerank: bool,
}

/// Retrieves (blocking: run it on the blocking pool).
pub(crate) fn retrieve(s: &Serving, r: &Retrieval, query: &str) -> RagResult<Vec<collection::SearchHit>> {
    let collections = collections_of(s)?;
    check_name(&r.collection)?;
    let Some(index) = collections.index(&r.collection)? else {
        return Err(OpenAiError::new(
            StatusCode::NOT_FOUND,
            format!("no collection {:?}: upload documents to it first (POST /v1/documents)", r.collection),
            "invalid_request_error",
        )
        .param("collection")
        .code("model_not_found"));
    };
    if r.k == 0 || r.k > MAX_K {
        return Err(OpenAiError::bad_param("k", format!("k must be from 1 to {MAX_K}")));
    }
    let encoder = collections.encoder(&s.embedders)?;
    let reranker = if r.rerank { Some(collections.reranker()?) } else { None };
    let (k, top_n) = if r.rerank { ((r.k * 4).min(MAX_K), Some(r.k)) } else { (r.k, None) };
    let opts = SearchOptions { k, kind: SearchKind::Similarity, hybrid: r.hybrid, filter: furnace_rag::index::Filter::all(), top_n };
    let index = index.lock().unwrap_or_else(|p| p.into_inner());
    let results = index.search(&encoder, query, &opts, reranker.as_deref()).map_err(rag_error)?;
    Ok(results.hits)
}

/// The `rag` object of a chat body (or the collection of a `rag:` model).
pub(crate) fn retrieval_of(body: &Map<String, Value>, model: &str) -> RagResult<Option<(Retrieval, String)>> {
    let mut r = model.strip_prefix("rag:").map(|c| Retrieval { collection: c.to_string(), k: 4, hybrid: false, rerank: false });
    let mut template = DEFAULT_TEMPLATE.to_string();
    match body.get("rag") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            refuse_unknown(o, &["collection", "k", "hybrid", "rerank", "template"]).map_err(|e| e.param("rag"))?;
            let collection = match (o.get("collection").and_then(Value::as_str), &r) {
                (Some(c), _) => c.to_string(),
                (None, Some(existing)) => existing.collection.clone(),
                (None, None) => return Err(OpenAiError::bad_param("rag", "rag.collection is required")),
            };
            let k = match o.get("k") {
                None => 4,
                Some(v) => v
                    .as_u64()
                    .filter(|k| (1..=MAX_K as u64).contains(k))
                    .ok_or_else(|| OpenAiError::bad_param("rag", format!("rag.k must be from 1 to {MAX_K}")))?
                    as usize,
            };
            let flag = |key: &str| {
                o.get(key)
                    .map(|v| v.as_bool().ok_or_else(|| OpenAiError::bad_param("rag", format!("rag.{key} must be true or false"))))
                    .transpose()
            };
            if let Some(t) = o.get("template") {
                let t = t.as_str().ok_or_else(|| OpenAiError::bad_param("rag", "rag.template must be a string"))?;
                if !t.contains("{context}") {
                    return Err(OpenAiError::bad_param("rag", "rag.template must contain {context}"));
                }
                template = t.to_string();
            }
            r = Some(Retrieval { collection, k, hybrid: flag("hybrid")?.unwrap_or(false), rerank: flag("rerank")?.unwrap_or(false) });
        }
        Some(_) => return Err(OpenAiError::bad_param("rag", "rag must be an object")),
    }
    Ok(r.map(|r| (r, template)))
}

/// Fills the template with the retrieved chunks and the question.
pub(crate) fn fill_template(template: &str, hits: &[collection::SearchHit], question: &str) -> String {
    let context: Vec<String> = hits.iter().map(|h| format!("[{}] {}", h.rank, h.chunk.text.trim())).collect();
    template.replace("{context}", &context.join("\n\n")).replace("{question}", question)
}

pub(super) async fn query(State(st): State<AppState>, body: std::result::Result<Bytes, BytesRejection>) -> RagResult<Json<Value>> {
    let s = serving_of(&st)?;
    let body = json_body(body)?;
    refuse_unknown(&body, &["query", "collection", "k", "hybrid", "rerank"])?;
    let Some(query) = body.get("query").and_then(Value::as_str).filter(|q| !q.trim().is_empty()).map(str::to_string) else {
        return Err(OpenAiError::bad_param("query", "query is required (a non-empty string)"));
    };
    let collection = body.get("collection").and_then(Value::as_str).unwrap_or("default").to_string();
    let k = match body.get("k") {
        None => 4,
        Some(v) => v
            .as_u64()
            .filter(|k| (1..=MAX_K as u64).contains(k))
            .ok_or_else(|| OpenAiError::bad_param("k", format!("k must be from 1 to {MAX_K}")))? as usize,
    };
    let flag = |key: &str| match body.get(key) {
        None => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| OpenAiError::bad_param(key, format!("{key} must be true or false"))),
    };
    let r = Retrieval { collection: collection.clone(), k, hybrid: flag("hybrid")?, rerank: flag("rerank")? };
    let hits = tokio::task::spawn_blocking(move || retrieve(&s, &r, &query)).await.map_err(|e| OpenAiError::internal(e.to_string()))??;
    let data: Vec<Value> = hits.iter().map(source_json).collect();
    Ok(Json(json!({"object": "list", "collection": collection, "data": data})))
}
