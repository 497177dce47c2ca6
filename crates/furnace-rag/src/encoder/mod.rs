//! Encoders: [`SentenceEncoder`] turns texts into vectors (a BERT-family
//! sentence-transformers model, pooled and normalised as its folder says), and
//! [`CrossEncoder`] scores (query, passage) pairs with a BERT sequence-classification head.
//!
//! Both tokenise with the model's `tokenizer.json` (through `furnace-text`), truncate to
//! the model's maximum sequence length the way sentence-transformers does (longest first,
//! special tokens included in the count) and run batches of similar lengths together.

pub mod bert;
mod ops;
pub mod pooling;

use std::path::{Path, PathBuf};

use furnace_model::WeightDType;
use sha2::{Digest, Sha256};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

use crate::encoder::bert::{rows, Bert, BertConfig, Dense, Weights};
use crate::encoder::pooling::read_json;
pub use crate::encoder::pooling::{Pooling, PoolingMode};
use crate::error::{Error, Result};

/// Texts per forward pass unless told otherwise (sentence-transformers' default).
pub const DEFAULT_BATCH: usize = 32;

/// Texts per BERT forward pass within a batch.
const FORWARD_ROWS: usize = 8;

/// A model folder or file resolved from a name: an alias (fetched into the cache when
/// needed) or a path.
pub fn resolve_model(name: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let loc = furnace_model::resolve_name(name, progress)?;
    Ok(loc.path().to_path_buf())
}

/// A tokeniser set up for an encoder: no padding, truncation at `max_len`.
struct EncoderTokenizer {
    hf: tokenizers::Tokenizer,
    max_len: usize,
}

/// The ids and token types of one tokenised input, and whether it was cut.
struct Encoded {
    ids: Vec<u32>,
    types: Vec<u32>,
    truncated: bool,
}

impl EncoderTokenizer {
    fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let tok = furnace_text::Tokenizer::from_hf_dir(dir)?;
        Self::from_hf(tok.hf_tokenizer().clone(), max_len)
    }

    fn from_hf(mut hf: tokenizers::Tokenizer, max_len: usize) -> Result<Self> {
        hf.with_padding(None);
        hf.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(EncoderTokenizer { hf, max_len })
    }

    fn encode<'s, I: Into<tokenizers::EncodeInput<'s>>>(&self, input: I) -> Result<Encoded> {
        let input = input.into();
        // tokenizers panics on some crafted tokenizer.json files; contain it.
        let run = || self.hf.encode(input, true);
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .map_err(|_| Error::Tokenizer("the tokenizer failed (panicked)".into()))?
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let truncated = !enc.get_overflowing().is_empty();
        let mut ids = enc.get_ids().to_vec();
        let mut types = enc.get_type_ids().to_vec();
        ids.truncate(self.max_len);
        types.truncate(self.max_len);
        if ids.is_empty() {
            return Err(Error::Tokenizer("the tokenizer produced no tokens".into()));
        }
        Ok(Encoded { ids, types, truncated })
    }
}

/// The longest input of a model folder: sentence-transformers' `max_seq_length`, else the
/// tokenizer's `model_max_length`, capped by the position table.
fn max_seq_length(dir: &Path, positions: usize) -> Result<usize> {
    let from = |file: &str, key: &str| -> Result<Option<usize>> {
        let path = dir.join(file);
        if !path.is_file() {
            return Ok(None);
        }
        let v: serde_json::Value = read_json(&path)?;
        Ok(v.get(key).and_then(serde_json::Value::as_u64).map(|n| n.min(usize::MAX as u64) as usize))
    };
    let declared = match from("sentence_bert_config.json", "max_seq_length")? {
        Some(n) => Some(n),
        None => from("tokenizer_config.json", "model_max_length")?,
    };
    Ok(declared.filter(|&n| n > 0).unwrap_or(positions).min(positions))
}

/// A fingerprint of what determines a model's outputs (config, tokenizer, pooling and
/// the weights' sizes and edges), so an index knows which model built it.
fn fingerprint(dir: &Path, extra: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(extra.as_bytes());
    for name in ["config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"] {
        let path = dir.join(name);
        if path.is_file() {
            h.update(name.as_bytes());
            h.update(std::fs::read(&path).map_err(|e| Error::io(&path, e))?);
        }
    }
    for f in furnace_model::hf::safetensors_files(dir)? {
        hash_edges(&mut h, &f)?;
    }
    Ok(short_hex(h))
}

/// Hashes a weights file's size and its first and last MiB (hashing all of a large model
/// would take seconds at every load).
fn hash_edges(h: &mut Sha256, path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    h.update(len.to_le_bytes());
    let edge = 1 << 20;
    let mut buf = Vec::new();
    (&mut file).take(edge).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    if len > edge {
        file.seek(SeekFrom::Start(len.saturating_sub(edge).max(edge))).map_err(|e| Error::io(path, e))?;
        file.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    }
    h.update(&buf);
    Ok(())
}

fn short_hex(h: Sha256) -> String {
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// [`fingerprint`] of a single model file (a GGUF).
fn file_fingerprint(path: &Path, extra: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(extra.as_bytes());
    hash_edges(&mut h, path)?;
    Ok(short_hex(h))
}

fn load_bert(dir: &Path, dtype: WeightDType) -> Result<(Bert, Weights)> {
    let config_path = dir.join("config.json");
    let config: BertConfig = read_json(&config_path)?;
    if let Some(kind) = config.model_type.as_deref() {
        if kind != "bert" {
            return Err(Error::Invalid(format!(
                "{}: model_type {kind:?} is not supported as an encoder yet (BERT models are)",
                config_path.display()
            )));
        }
    }
    let mut weights = Weights::new(furnace_model::hf::load_tensors(dir)?, dtype);
    let bert = Bert::load(config, &mut weights)?;
    Ok((bert, weights))
}

/// The vectors of a batch of texts.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// One vector per text, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Indexes of the texts that were longer than the model's maximum sequence length and
    /// were cut to it.
    pub truncated: Vec<usize>,
}

/// What computes an encoder's token states.
enum Body {
    /// A BERT-family encoder (bidirectional), tokenised by `tokenizer.json` with truncation.
    Bert(Box<Bert>, Box<EncoderTokenizer>),
    /// A llama-family decoder used as an embedder: the last token's final hidden state.
    Decoder(Box<furnace_model::LoadedModel>, usize),
}

/// A sentence encoder: a BERT-family model with sentence-transformers' pooling, or a
/// llama-family decoder with last-token pooling.
pub struct SentenceEncoder {
    name: String,
    dtype: WeightDType,
    body: Body,
    pooling: Pooling,
    fingerprint: String,
    batch: usize,
}

/// The longest input of a decoder embedder unless the model allows less.
pub const DECODER_MAX_TOKENS: usize = 8192;

/// Whether a folder holds a llama-family decoder (by its config's `model_type`).
fn is_decoder_dir(dir: &Path) -> bool {
    let Ok(v) = read_json::<serde_json::Value>(&dir.join("config.json")) else { return false };
    matches!(v.get("model_type").and_then(serde_json::Value::as_str), Some("llama" | "mistral" | "qwen2" | "qwen3"))
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder").field("name", &self.name).field("dim", &self.dim()).finish_non_exhaustive()
    }
}

impl SentenceEncoder {
    /// Loads an encoder by alias (`all-minilm-l6-v2`, fetched when missing) or folder.
    pub fn load(name: &str, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        Self::load_with(name, WeightDType::F32, progress)
    }

    /// [`SentenceEncoder::load`] with the weights held as `dtype`.
    pub fn load_with(name: &str, dtype: WeightDType, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let dir = resolve_model(name, progress)?;
        let mut enc = Self::from_dir_with(&dir, dtype)?;
        enc.name = name.to_string();
        Ok(enc)
    }

    /// Loads an encoder from a Hugging Face / sentence-transformers folder (a BERT
    /// encoder, or a llama-family decoder used with last-token pooling), or a decoder GGUF.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_with(dir, WeightDType::F32)
    }

    /// [`SentenceEncoder::from_dir`] with the weights held as `dtype` (`F32` reproduces
    /// sentence-transformers exactly; `Bf16` runs the packed bf16 kernels, faster on CPUs
    /// with bf16 dot products, at about 1e-3 relative error).
    pub fn from_dir_with(dir: &Path, dtype: WeightDType) -> Result<Self> {
        if dir.is_file() || is_decoder_dir(dir) {
            return Self::decoder(dir, dtype);
        }
        let (bert, _) = load_bert(dir, dtype)?;
        let pooling = Pooling::from_dir(dir)?;
        let max_len = max_seq_length(dir, bert.config().max_position_embeddings)?;
        let tokenizer = EncoderTokenizer::load(dir, max_len)?;
        let fingerprint = fingerprint(dir, &format!("{pooling:?}/{max_len}/{dtype:?}"))?;
        Ok(SentenceEncoder {
            name: dir.display().to_string(),
            dtype,
            body: Body::Bert(Box::new(bert), Box::new(tokenizer)),
            pooling,
            fingerprint,
            batch: DEFAULT_BATCH,
        })
    }

    /// A llama-family decoder (HF folder or GGUF) as an embedder: f32 weights, the last
    /// token's final hidden state, L2-normalised (unless a sentence-transformers folder
    /// says otherwise).
    fn decoder(path: &Path, dtype: WeightDType) -> Result<Self> {
        let loaded = furnace_model::LoadedModel::load(path, dtype)?;
        let positions = loaded.model.config.max_position_embeddings;
        let pooling = if path.is_dir() && path.join("modules.json").is_file() {
            Pooling::from_dir(path)?
        } else {
            Pooling { mode: PoolingMode::LastToken, normalize: true }
        };
        if pooling.mode != PoolingMode::LastToken {
            return Err(Error::Invalid(format!("{}: a decoder embedder pools the last token, not {:?}", path.display(), pooling.mode)));
        }
        let max_len = if path.is_dir() { max_seq_length(path, positions)? } else { positions }.min(DECODER_MAX_TOKENS);
        let fingerprint = if path.is_dir() {
            fingerprint(path, &format!("{pooling:?}/{max_len}/{dtype:?}"))?
        } else {
            file_fingerprint(path, &format!("{pooling:?}/{max_len}/{dtype:?}"))?
        };
        Ok(SentenceEncoder {
            name: path.display().to_string(),
            dtype,
            body: Body::Decoder(Box::new(loaded), max_len),
            pooling,
            fingerprint,
            batch: DEFAULT_BATCH,
        })
    }

    /// Texts per forward pass (at least 1).
    pub fn with_batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// The name it was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the weights are held.
    pub fn dtype(&self) -> WeightDType {
        self.dtype
    }

    /// The vectors' dimension.
    pub fn dim(&self) -> usize {
        match &self.body {
            Body::Bert(bert, _) => bert.config().hidden_size,
            Body::Decoder(m, _) => m.model.config.hidden_size,
        }
    }

    /// The longest input in tokens (longer texts are cut).
    pub fn max_seq_length(&self) -> usize {
        match &self.body {
            Body::Bert(_, tok) => tok.max_len,
            Body::Decoder(_, max_len) => *max_len,
        }
    }

    /// The pooling and normalisation.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// A short hash of what determines this encoder's vectors.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The number of tokens of a text without special tokens and before truncation (what
    /// a token-length splitter counts).
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        match &self.body {
            Body::Bert(_, tok) => {
                let enc = tok.hf.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
                // Truncation applies to this call too: count what was cut off.
                Ok(enc.get_ids().len() + enc.get_overflowing().iter().map(|o| o.get_ids().len()).sum::<usize>())
            }
            Body::Decoder(m, _) => Ok(m.tokenizer.encode(text, false)?.len()),
        }
    }

    /// Embeds texts: one vector per text, in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings> {
        let encoded: Vec<Encoded> = texts.iter().map(|t| self.encode(t)).collect::<Result<_>>()?;
        let truncated = encoded.iter().enumerate().filter(|(_, e)| e.truncated).map(|(i, _)| i).collect();
        let vectors = run_batches(&encoded, self.batch, |batch| match &self.body {
            Body::Bert(bert, _) => {
                // Forward passes of at most FORWARD_ROWS texts: the activations stay small
                // enough to be reused by the allocator instead of mapped afresh (measured
                // 55 -> 60 sentences/s on MiniLM, 2026-11-30); texts are independent, so
                // the vectors are the same.
                let mut out = Vec::with_capacity(batch.len());
                for part in batch.chunks(FORWARD_ROWS) {
                    let (ids, types, lens, len) = pad(part);
                    let hidden = bert.forward(&ids, &types, &lens, len)?;
                    out.extend(rows(&self.pooling.apply(&hidden, &lens)?)?);
                }
                Ok(out)
            }
            Body::Decoder(m, _) => {
                let mut caches: Vec<furnace_model::SeqCache> = batch.iter().map(|_| m.model.new_cache()).collect();
                let mut inputs: Vec<furnace_model::SeqInput<'_>> = batch
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(e, cache)| furnace_model::SeqInput { tokens: &e.ids, cache, logits: furnace_model::Logits::None, adapter: None })
                    .collect();
                let last = m.model.last_hidden(&mut inputs)?;
                let last = if self.pooling.normalize { bert::l2_normalize(&last)? } else { last };
                rows(&last)
            }
        })?;
        Ok(Embeddings { vectors, truncated })
    }

    fn encode(&self, text: &str) -> Result<Encoded> {
        match &self.body {
            Body::Bert(_, tok) => tok.encode(text),
            Body::Decoder(m, max_len) => {
                let mut ids = m.tokenizer.encode(text, true)?;
                let truncated = ids.len() > *max_len;
                ids.truncate(*max_len);
                if ids.is_empty() {
                    return Err(Error::Invalid("an empty text has no tokens for a decoder embedder to pool".into()));
                }
                let types = vec![0; ids.len()];
                Ok(Encoded { ids, types, truncated })
            }
        }
    }
}

/// Runs `f` over batches of similar length (longest first, as sentence-transformers
/// sorts) and returns its rows in input order.
fn run_batches(encoded: &[Encoded], batch: usize, mut f: impl FnMut(&[&Encoded]) -> Result<Vec<Vec<f32>>>) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].ids.len()));
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); encoded.len()];
    for chunk in order.chunks(batch.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &encoded[i]).collect();
        let rows = f(&items)?;
        for (&i, row) in chunk.iter().zip(rows) {
            out[i] = row;
        }
    }
    Ok(out)
}

/// Pads a batch to its longest row: (ids, types, lens, len).
fn pad(batch: &[&Encoded]) -> (Vec<u32>, Vec<u32>, Vec<usize>, usize) {
    let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = vec![0u32; batch.len() * len];
    let mut types = vec![0u32; batch.len() * len];
    let mut lens = Vec::with_capacity(batch.len());
    for (b, e) in batch.iter().enumerate() {
        ids[b * len..b * len + e.ids.len()].copy_from_slice(&e.ids);
        types[b * len..b * len + e.types.len()].copy_from_slice(&e.types);
        lens.push(e.ids.len());
    }
    (ids, types, lens, len)
}

/// What a cross-encoder's logit becomes (sentence-transformers' default: a sigmoid when
/// the head has one label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// The raw logit.
    Identity,
}

/// A cross-encoder: BERT + pooler + a linear classification head, scoring
/// (query, passage) pairs.
pub struct CrossEncoder {
    name: String,
    bert: Bert,
    classifier: Dense,
    num_labels: usize,
    tokenizer: EncoderTokenizer,
    activation: ScoreActivation,
    batch: usize,
}

impl std::fmt::Debug for CrossEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrossEncoder").field("name", &self.name).field("num_labels", &self.num_labels).finish_non_exhaustive()
    }
}

impl CrossEncoder {
    /// Loads a cross-encoder by alias or folder.
    pub fn load(name: &str, progress: &mut dyn FnMut(&str)) -> Result<Self> {
        let dir = resolve_model(name, progress)?;
        let mut enc = Self::from_dir(&dir)?;
        enc.name = name.to_string();
        Ok(enc)
    }

    /// Loads a `BertForSequenceClassification` folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let (bert, mut weights) = load_bert(dir, WeightDType::F32)?;
        let h = bert.config().hidden_size;
        if !weights.has("classifier.weight") {
            return Err(Error::Invalid(format!(
                "{} has no classification head (classifier.weight): it is not a cross-encoder",
                dir.display()
            )));
        }
        let num_labels = bert.config().id2label.as_ref().map(|m| m.len()).filter(|&n| n > 0).unwrap_or(1);
        let w = weights.take_exact("classifier.weight", &[num_labels, h])?;
        let b = weights.take_exact("classifier.bias", &[num_labels])?;
        let classifier = Dense::from_parts(&w, b, WeightDType::F32)?;
        if !bert.has_pooler() {
            return Err(Error::Invalid(format!("{} has no pooler (bert.pooler.dense): it is not a BERT cross-encoder", dir.display())));
        }
        let max_len = max_seq_length(dir, bert.config().max_position_embeddings)?;
        let tokenizer = EncoderTokenizer::load(dir, max_len)?;
        let activation = if num_labels == 1 { ScoreActivation::Sigmoid } else { ScoreActivation::Identity };
        Ok(CrossEncoder { name: dir.display().to_string(), bert, classifier, num_labels, tokenizer, activation, batch: DEFAULT_BATCH })
    }

    /// The name it was loaded by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cuts (query, passage) pairs at `max_len` tokens (at most the model's limit).
    pub fn with_max_length(mut self, max_len: usize) -> Result<Self> {
        let limit = self.bert.config().max_position_embeddings;
        if max_len == 0 || max_len > limit {
            return Err(Error::Invalid(format!("max length {max_len} is outside 1..={limit} (the model's positions)")));
        }
        let hf = self.tokenizer.hf.clone();
        self.tokenizer = EncoderTokenizer::from_hf(hf, max_len)?;
        Ok(self)
    }

    /// How logits become scores.
    pub fn with_activation(mut self, activation: ScoreActivation) -> Self {
        self.activation = activation;
        self
    }

    /// The head's raw logits for each (query, passage) pair, `[pairs][num_labels]`.
    pub fn logits(&self, pairs: &[(&str, &str)]) -> Result<Vec<Vec<f32>>> {
        let encoded: Vec<Encoded> = pairs.iter().map(|&(q, p)| self.tokenizer.encode((q, p))).collect::<Result<_>>()?;
        run_batches(&encoded, self.batch, |batch| {
            let (ids, types, lens, len) = pad(batch);
            let hidden = self.bert.forward(&ids, &types, &lens, len)?;
            let pooled = self.bert.pool(&hidden)?.ok_or_else(|| Error::Invalid("the cross-encoder lost its pooler".into()))?;
            rows(&self.classifier.forward(&pooled)?)
        })
    }

    /// One relevance score per passage for `query` (the first label's logit through the
    /// activation).
    pub fn scores(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let pairs: Vec<(&str, &str)> = passages.iter().map(|p| (query, *p)).collect();
        let logits = self.logits(&pairs)?;
        Ok(logits
            .into_iter()
            .map(|l| {
                let x = l.first().copied().unwrap_or(f32::NAN);
                match self.activation {
                    ScoreActivation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                    ScoreActivation::Identity => x,
                }
            })
            .collect())
    }
}
