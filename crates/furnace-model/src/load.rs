//! Loading a model from a path (a `.gguf` file or an HF model directory) or by name (an
//! alias of the furnace-hub cache, fetched when needed, or a path), together with its
//! tokenizer and chat template; and loading PEFT adapter directories.

use crate::config::{LlamaConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::{gguf_name, GgufFile};
use crate::hf;
use crate::linear::{RawWeight, WeightDType};
use crate::llama::{Llama, WeightSource};
use crate::lora::PeftAdapter;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;
use candle_core::Tensor;
use furnace_hub::{Cache, ModelLocation};
use furnace_text::{ChatTemplate, Tokenizer};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What a model file is, without loading its weights (for listings).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Where it was read from.
    pub path: PathBuf,
    /// `gguf` or `hf-dir`.
    pub format: &'static str,
    /// Architecture (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// Human name, if the file has one.
    pub name: Option<String>,
    /// Number of parameters (all tensors).
    pub params: u64,
    /// Storage type of the bulk of the weights (`Q4_1`, `F32`, ...).
    pub quantization: String,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Context length.
    pub context_length: usize,
}

/// A model ready to run, with its tokenizer and chat template. Cloning is cheap: weights
/// are shared.
#[derive(Clone)]
pub struct LoadedModel {
    /// The network.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if it ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Facts about the files.
    pub info: ModelInfo,
}

/// The weights of an opened GGUF file by HF name, in HF layout (llama.cpp's q/k row
/// permutation undone), as stored (block-quantized or float): what [`LoadedModel::load`]
/// builds a model from, and what exporters read a base from.
pub struct GgufSource<'a> {
    file: &'a mut GgufFile,
    /// Heads of q and k whose rows llama.cpp permuted (None for qwen2, which it leaves).
    permuted_heads: Option<(usize, usize)>,
}

impl<'a> GgufSource<'a> {
    /// The weights of `file`, whose own configuration ([`GgufFile::config`], before its
    /// `rope_style` is changed) is `config`: it says whether llama.cpp permuted q and k.
    pub fn new(file: &'a mut GgufFile, config: &LlamaConfig) -> Self {
        let permuted_heads = (config.rope_style == RopeStyle::Interleaved).then_some((config.num_heads, config.num_kv_heads));
        Self { file, permuted_heads }
    }
}

impl WeightSource for GgufSource<'_> {
    fn get(&mut self, name: &str) -> Result<Option<RawWeight>> {
        let g = gguf_name(name);
        if !self.file.has_tensor(&g) {
            return Ok(None);
        }
        let t = self.file.tensor(&g)?;
        let heads = match self.permuted_heads {
            Some((q, _)) if name.ends_with("self_attn.q_proj.weight") => Some(q),
            Some((_, k)) if name.ends_with("self_attn.k_proj.weight") => Some(k),
            _ => None,
        };
        Ok(Some(RawWeight::Quantized(match heads {
            Some(h) => unpermute_rows(&t, h)?,
            None => t,
        })))
    }
}

/// Undoes llama.cpp's q/k row permutation (made for its interleaved RoPE) so that the
/// weights are in HF layout: within each head, HF row `a * d/2 + b` is GGUF row `2b + a`.
/// With every model in HF layout, PEFT adapters apply as they are and HF's half-split RoPE
/// is the only one the runtime needs. Rows hold whole quantization blocks, so this moves
/// bytes without requantizing.
fn unpermute_rows(t: &QTensor, heads: usize) -> Result<QTensor> {
    let dims = t.shape().dims();
    let (rows, cols) = (dims[0], dims[dims.len() - 1]);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Config(format!("cannot un-permute a {rows}-row q/k weight over {heads} heads")));
    }
    let dtype = t.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data()?;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..half {
                let dst = h * hd + a * half + b;
                let src = h * hd + 2 * b + a;
                out[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, t.shape().clone())?)
}

struct HfSource(HashMap<String, Tensor>);

impl WeightSource for HfSource {
    fn get(&mut self, name: &str) -> Result<Option<RawWeight>> {
        Ok(self.0.remove(name).map(RawWeight::Dense))
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reads a model's facts without loading its weights.
pub fn inspect(path: &Path) -> Result<ModelInfo> {
    if is_gguf(path) {
        let g = GgufFile::open(path)?;
        return gguf_info(&g);
    }
    if path.is_dir() && path.join("config.json").exists() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(crate::error::io_err(&cfg_path))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path, source })?;
        let mut size = 0u64;
        let mut params = 0u64;
        let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
        for f in hf::safetensors_files(path)? {
            size += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            let stats = std::fs::File::open(&f)
                .and_then(|file| Ok((file.metadata()?.len(), file)))
                .map_err(crate::error::io_err(&f))
                .and_then(|(len, file)| safetensors_header_stats(std::io::BufReader::new(file), len, &f));
            if let Ok((n, d)) = stats {
                params = params.saturating_add(n);
                for (k, c) in d {
                    let e = dtypes.entry(k).or_default();
                    *e = e.saturating_add(c);
                }
            }
        }
        return Ok(ModelInfo {
            path: path.to_path_buf(),
            format: "hf-dir",
            architecture: v.get("model_type").and_then(|x| x.as_str()).unwrap_or("?").to_string(),
            name: None,
            params,
            quantization: dominant(dtypes),
            size_bytes: size,
            context_length: v.get("max_position_embeddings").and_then(|x| x.as_u64()).unwrap_or(0) as usize,
        });
    }
    Err(Error::NotAModel(path.to_path_buf()))
}

/// The largest safetensors header [`safetensors_header_stats`] reads (the format's own limit).
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Parameter count and per-dtype element counts from the safetensors header at the start
/// of `r` (a file of `file_len` bytes, named `path` in errors). The header length is
/// checked against the file before anything is allocated; counts saturate rather than
/// overflow.
pub fn safetensors_header_stats<R: std::io::Read>(mut r: R, file_len: u64, path: &Path) -> Result<(u64, HashMap<String, u64>)> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(crate::error::io_err(path))?;
    let n = u64::from_le_bytes(len);
    let available = file_len.saturating_sub(8);
    if n > available || n > MAX_SAFETENSORS_HEADER {
        return Err(Error::Config(format!(
            "{}: safetensors header of {n} bytes does not fit (file of {file_len} bytes, at most {MAX_SAFETENSORS_HEADER})",
            path.display()
        )));
    }
    let mut buf = vec![0u8; n as usize];
    r.read_exact(&mut buf).map_err(crate::error::io_err(path))?;
    let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let mut total = 0u64;
    let mut by: HashMap<String, u64> = HashMap::new();
    if let Some(obj) = v.as_object() {
        for (k, t) in obj {
            if k == "__metadata__" {
                continue;
            }
            let shape: u64 = t
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| a.iter().filter_map(|d| d.as_u64()).fold(1u64, u64::saturating_mul))
                .unwrap_or(0);
            total = total.saturating_add(shape);
            let dt = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
            let e = by.entry(dt.to_string()).or_default();
            *e = e.saturating_add(shape);
        }
    }
    Ok((total, by))
}

/// What [`inspect`] reports for an opened GGUF file.
pub fn gguf_info(g: &GgufFile) -> Result<ModelInfo> {
    let mut params = 0u64;
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for (_, dims, dt) in g.tensor_infos() {
        let n: u64 = dims.iter().map(|&d| d as u64).fold(1u64, u64::saturating_mul);
        params = params.saturating_add(n);
        if dims.len() >= 2 {
            let e = by.entry(format!("{dt:?}")).or_default();
            *e = e.saturating_add(n);
        }
    }
    let arch = g.architecture()?;
    let ctx_key = format!("{arch}.context_length");
    let context_length = match g.metadata().get(&ctx_key) {
        Some(v) => v.to_u64().map(|x| x as usize).or_else(|_| v.to_u32().map(|x| x as usize)).unwrap_or(0),
        None => 0,
    };
    Ok(ModelInfo {
        path: g.path().to_path_buf(),
        format: "gguf",
        architecture: arch,
        name: g.name(),
        params,
        quantization: dominant(by),
        size_bytes: g.file_len(),
        context_length,
    })
}

/// The storage type holding the most elements.
fn dominant(counts: BTreeMap<String, u64>) -> String {
    counts.into_iter().max_by_key(|(_, c)| *c).map(|(k, _)| k).unwrap_or_else(|| "?".into())
}

impl LoadedModel {
    /// Loads a `.gguf` file or an HF model directory with weights held as `dtype`.
    pub fn load(path: &Path, dtype: WeightDType) -> Result<Self> {
        if is_gguf(path) {
            let mut g = GgufFile::open(path)?;
            let info = gguf_info(&g)?;
            let config = g.config()?;
            let tokenizer = Tokenizer::from_gguf(&g.tokenizer_spec()?)?;
            let chat_template = g.chat_template().map(|s| ChatTemplate::new(&s)).transpose()?;
            let mut src = GgufSource::new(&mut g, &config);
            let mut config = config;
            config.rope_style = RopeStyle::HalfSplit;
            let model = Llama::load(config, &mut src, dtype)?;
            check_vocab(&model.config, &tokenizer)?;
            return Ok(Self { model, tokenizer, chat_template, info });
        }
        if path.is_dir() && path.join("config.json").exists() {
            let config = hf::read_config(path)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let chat_template = ChatTemplate::from_hf_dir(path)?;
            let info = inspect(path)?;
            let mut src = HfSource(hf::load_tensors(path)?);
            let model = Llama::load(config, &mut src, dtype)?;
            check_vocab(&model.config, &tokenizer)?;
            return Ok(Self { model, tokenizer, chat_template, info });
        }
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            });
        }
        Err(Error::NotAModel(path.to_path_buf()))
    }
}

/// Resolves a model name to a local path through the furnace-hub cache (`$FURNACE_HOME`):
/// a cached alias, an alias not cached yet (pulled now, with progress lines sent to
/// `progress`), a `.gguf` file or an HF model directory.
pub fn resolve_name(name: &str, progress: &mut dyn FnMut(&str)) -> Result<ModelLocation> {
    let cache = Cache::from_env()?;
    if let Some(loc) = cache.cached(name) {
        return Ok(loc);
    }
    Ok(cache.resolve_or_pull(name, progress)?)
}

/// Resolves `name` ([`resolve_name`]) and loads the model with weights held as `dtype`.
/// A load failure names the file: `loading <path>: <cause>`.
pub fn load_by_name(name: &str, dtype: WeightDType, progress: &mut dyn FnMut(&str)) -> Result<LoadedModel> {
    let loc = resolve_name(name, progress)?;
    let path = loc.path();
    LoadedModel::load(path, dtype).map_err(|e| Error::LoadModel { path: path.to_path_buf(), error: Box::new(e) })
}

/// Reads a PEFT LoRA adapter directory ([`PeftAdapter::load`]); a failure names the
/// directory: `loading adapter <dir>: <cause>`.
pub fn load_adapter(dir: &Path) -> Result<PeftAdapter> {
    PeftAdapter::load(dir).map_err(|e| Error::LoadAdapter { path: dir.to_path_buf(), error: Box::new(e) })
}

fn check_vocab(cfg: &LlamaConfig, tok: &Tokenizer) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(Error::Config(format!("tokenizer has {} tokens but the model's vocabulary is {}", tok.vocab_size(), cfg.vocab_size)));
    }
    Ok(())
}
