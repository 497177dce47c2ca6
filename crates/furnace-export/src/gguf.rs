//! A [`crate::merge::BaseModel`] written as a GGUF file llama.cpp and furnace load.
//!
//! The container is GGUF v3 (little-endian, `general.alignment` 32), written here in safe
//! Rust: candle's own writer emits version 2. Tensor names are llama.cpp's (`token_embd`,
//! `blk.N.attn_q`, ..., `output_norm`, `output` when the embeddings are not tied); q and k
//! rows of llama-style models are permuted as llama.cpp's `convert_hf_to_gguf.py` does for
//! its interleaved RoPE (qwen2 keeps HF's layout). The tokenizer metadata is copied from a
//! GGUF base, or built from an HF base's tokenizer files ([`crate::gguf_tokenizer`]).

use crate::error::{io_err, Error, Result};
use crate::merge::{BaseModel, BaseOrigin};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use furnace_model::gguf::GgufFile;
use furnace_model::RopeScaling;
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// The storage type of the written GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    /// float16 everywhere.
    F16,
    /// 8-bit blocks.
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
    /// llama.cpp's Q4_K_M mixture (Q4_K, with Q6_K for the tensors llama.cpp keeps higher).
    Q4KM,
}

impl GgufQuant {
    /// The `--quant` spelling: `f16`, `q8_0`, `q4_0`, `q4_k_m`.
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F16 => "f16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`) of this choice.
    pub fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
        }
    }
}

impl std::str::FromStr for GgufQuant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "q4_k_m" => Ok(Self::Q4KM),
            other => Err(Error::Invalid(format!("--quant {other}: expected one of f16, q8_0, q4_0, q4_k_m"))),
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GgufReport {
    /// Bytes of the file.
    pub bytes: u64,
    /// Tensors written, with their storage type, e.g. `("blk.0.attn_q.weight", "q8_0")`.
    pub tensors: Vec<(String, String)>,
}

/// The GGUF data alignment written as `general.alignment`.
const ALIGNMENT: usize = 32;

/// How a storage type is named in reports (`q4_k`, `q8_0`, `f16`).
pub fn ggml_type_name(t: GgmlDType) -> String {
    format!("{t:?}").to_ascii_lowercase()
}

/// ggml's numeric type id (`ggml_type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer in between.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let (i, n) = (i_layer as i64, n_layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8).rem_euclid(3) == 2
}

/// The storage type of the matrix `name` (a GGUF name, of block `layer` of `n_layers`) with
/// rows of `cols` values, for `quant`; `has_output` says the file has its own `output.weight`
/// (embeddings not tied).
///
/// - `f16`: F16.
/// - `q8_0` / `q4_0`: that type for every matrix (as `convert_hf_to_gguf.py --outtype q8_0`
///   does); a matrix whose rows are not a multiple of 32 values falls back to F16.
/// - `q4_k_m`: llama.cpp's `llama_tensor_get_type` for `LLAMA_FTYPE_MOSTLY_Q4_K_M`:
///   Q4_K by default; the output projection (`output.weight`, or `token_embd.weight` when
///   tied) Q6_K, or Q8_0 when its rows are not a multiple of 256; `attn_v.weight` and
///   `ffn_down.weight` Q6_K in the layers `use_more_bits` picks (the first and last eighth
///   and every third layer between). Then llama.cpp's fallback for rows that are not a
///   multiple of the 256-value K-quant block: Q4_K → Q5_0, Q6_K → Q8_0, and F16 when the
///   rows are not a multiple of 32 either.
pub fn matrix_type(quant: GgufQuant, name: &str, layer: Option<usize>, n_layers: usize, cols: usize, has_output: bool) -> GgmlDType {
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    let plain = |t: GgmlDType| if fits(t) { t } else { GgmlDType::F16 };
    match quant {
        GgufQuant::F16 => GgmlDType::F16,
        GgufQuant::Q8_0 => plain(GgmlDType::Q8_0),
        GgufQuant::Q4_0 => plain(GgmlDType::Q4_0),
        GgufQuant::Q4KM => {
            let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
            let more_bits = layer.is_some_and(|i| use_more_bits(i, n_layers));
            let t = if is_output {
                if fits(GgmlDType::Q6K) {
                    GgmlDType::Q6K
                } else {
                    GgmlDType::Q8_0
                }
            } else if (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight")) && more_bits {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            if fits(t) {
                return t;
            }
            let fallback = match t {
                GgmlDType::Q4K => GgmlDType::Q5_0,
                GgmlDType::Q6K => GgmlDType::Q8_0,
                other => other,
            };
            plain(fallback)
        }
    }
}

/// The GGUF name of an HF weight name, and its block index.
fn gguf_name(hf: &str) -> Option<(String, Option<usize>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, leaf) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let leaf = match leaf {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some((format!("blk.{i}.{leaf}"), Some(i)))
}

/// Where a tensor goes in the file: the embedding, the blocks in order (each in llama.cpp's
/// usual order), the final norm and the output projection.
fn order_key(gguf: &str, layer: Option<usize>) -> (usize, usize) {
    const LEAVES: [&str; 12] = [
        "attn_norm.weight",
        "attn_q.weight",
        "attn_q.bias",
        "attn_k.weight",
        "attn_k.bias",
        "attn_v.weight",
        "attn_v.bias",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    match (gguf, layer) {
        ("rope_freqs.weight", _) => (0, 0),
        ("token_embd.weight", _) => (1, 0),
        (_, Some(i)) => (2 + i, LEAVES.iter().position(|l| gguf.ends_with(l)).unwrap_or(LEAVES.len())),
        ("output_norm.weight", None) => (usize::MAX - 1, 0),
        _ => (usize::MAX, 0),
    }
}

/// Within each head of `heads`, row `a * d/2 + b` (HF) goes to row `2b + a` (llama.cpp):
/// `convert_hf_to_gguf.py`'s `LlamaModel.permute`. `cols` is 1 for a bias.
fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize, name: &str) -> Result<Vec<f32>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Invalid(format!("{name}: cannot permute {rows} rows over {heads} heads for llama.cpp's RoPE layout")));
    }
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..half {
                let src = h * hd + a * half + b;
                let dst = h * hd + 2 * b + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// Values per parallel work item when encoding.
const CHUNK_VALUES: usize = 1 << 16;

/// `data` (`rows × cols`, row-major) in storage type `ty`, block by block as ggml lays it out.
fn encode(data: &[f32], cols: usize, ty: GgmlDType) -> Result<Vec<u8>> {
    match ty {
        GgmlDType::F32 => Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlDType::F16 => {
            let parts: Vec<Vec<u8>> =
                data.par_chunks(CHUNK_VALUES).map(|c| c.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()).collect();
            Ok(parts.concat())
        }
        _ => {
            let rows_per_chunk = (CHUNK_VALUES / cols.max(1)).max(1);
            let parts: Vec<Vec<u8>> = data
                .par_chunks(rows_per_chunk * cols)
                .map(|c| -> Result<Vec<u8>> {
                    let t = Tensor::from_slice(c, (c.len() / cols, cols), &Device::Cpu)?;
                    let q = QTensor::quantize(&t, ty)?;
                    Ok(q.data()?.into_owned())
                })
                .collect::<Result<_>>()?;
            Ok(parts.concat())
        }
    }
}

/// One tensor to write: GGUF name, shape (outermost first), storage type, bytes.
struct Encoded {
    name: String,
    dims: Vec<usize>,
    ty: GgmlDType,
    bytes: Vec<u8>,
}

/// llama.cpp's per-frequency RoPE divisors of Llama 3.1 scaling (`rope_freqs.weight`), as
/// `convert_hf_to_gguf.py` computes them.
fn llama3_rope_factors(head_dim: usize, theta: f64, factor: f64, low: f64, high: f64, old_ctx: usize) -> Vec<f32> {
    let old = old_ctx as f64;
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// Writes `base` as a GGUF file at `out` with weights stored as `quant` (norms and biases
/// stay F32; see [`matrix_type`] for the matrices). The file is written beside `out` and
/// renamed into place, so a failed export leaves no partial file.
pub fn write_gguf(base: &BaseModel, out: &Path, quant: GgufQuant) -> Result<GgufReport> {
    let c = &base.config;
    let arch = match c.architecture.as_str() {
        // llama.cpp runs Mistral (v0.1-v0.3) as llama, as convert_hf_to_gguf.py writes it.
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        other => return Err(Error::Invalid(format!("GGUF export of architecture '{other}' is not supported (llama, mistral, qwen2)"))),
    };
    let permute = arch == "llama";
    let has_output = base.tensors.contains_key("lm_head.weight");

    // Plan: GGUF name, layer, HF tensor.
    let mut plan: Vec<(String, Option<usize>, &Tensor)> = Vec::with_capacity(base.tensors.len());
    for (hf, t) in &base.tensors {
        if hf == "rope_freqs.weight" {
            continue; // written from the configuration below
        }
        let (g, layer) =
            gguf_name(hf).ok_or_else(|| Error::Invalid(format!("weight '{hf}' has no GGUF name (not a llama-family weight)")))?;
        plan.push((g, layer, t));
    }
    plan.sort_by_key(|(g, layer, _)| order_key(g, *layer));

    let mut encoded: Vec<Encoded> = plan
        .par_iter()
        .map(|(g, layer, t)| -> Result<Encoded> {
            let dims = t.dims().to_vec();
            let mut data = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
            let (rows, cols) = match dims.as_slice() {
                [n] => (*n, 1),
                [r, c] => (*r, *c),
                other => return Err(Error::Invalid(format!("weight '{g}' has shape {other:?}; expected a vector or a matrix"))),
            };
            if permute {
                let heads = if g.contains("attn_q.") {
                    Some(c.num_heads)
                } else if g.contains("attn_k.") {
                    Some(c.num_kv_heads)
                } else {
                    None
                };
                if let Some(h) = heads {
                    data = permute_rows(&data, rows, cols, h, g)?;
                }
            }
            let ty = if dims.len() == 1 { GgmlDType::F32 } else { matrix_type(quant, g, *layer, c.num_layers, cols, has_output) };
            let bytes = encode(&data, cols, ty)?;
            Ok(Encoded { name: g.clone(), dims, ty, bytes })
        })
        .collect::<Result<_>>()?;

    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = &c.rope_scaling {
        let f =
            llama3_rope_factors(c.head_dim, c.rope_theta, *factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings);
        encoded.insert(
            0,
            Encoded { name: "rope_freqs.weight".into(), dims: vec![f.len()], ty: GgmlDType::F32, bytes: encode(&f, 1, GgmlDType::F32)? },
        );
    }
    if let RopeScaling::Factors(f) = &c.rope_scaling {
        encoded.insert(
            0,
            Encoded { name: "rope_freqs.weight".into(), dims: vec![f.len()], ty: GgmlDType::F32, bytes: encode(f, 1, GgmlDType::F32)? },
        );
    }

    let metadata = metadata(base, arch, quant)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = out.with_extension("gguf.partial");
    let written = write_file(&tmp, &metadata, &encoded);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(io_err(out))?;
    let bytes = std::fs::metadata(out).map_err(io_err(out))?.len();
    Ok(GgufReport { bytes, tensors: encoded.iter().map(|e| (e.name.clone(), ggml_type_name(e.ty))).collect() })
}

/// The key/value metadata: general, architecture hyperparameters, tokenizer.
fn metadata(base: &BaseModel, arch: &str, quant: GgufQuant) -> Result<Vec<(String, Value)>> {
    let c = &base.config;
    let u32v = |n: usize| -> Result<Value> {
        u32::try_from(n).map(Value::U32).map_err(|_| Error::Invalid(format!("{n} does not fit the GGUF's 32-bit field")))
    };
    let (name, tokenizer) = match &base.origin {
        BaseOrigin::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let name = match g.metadata().get("general.name") {
                Some(Value::String(s)) => s.clone(),
                _ => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
            };
            let mut keys: Vec<(String, Value)> =
                g.metadata().iter().filter(|(k, _)| k.starts_with("tokenizer.")).map(|(k, v)| (k.clone(), v.clone())).collect();
            if keys.is_empty() {
                return Err(Error::Invalid(format!("{}: it holds no tokenizer (no tokenizer.* metadata) to copy", path.display())));
            }
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            (name, keys)
        }
        BaseOrigin::Hf(dir) => {
            let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
            (name, crate::gguf_tokenizer::hf_tokenizer_metadata(dir, c.vocab_size)?)
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name)),
        ("general.alignment".into(), Value::U32(ALIGNMENT as u32)),
        (k("context_length"), u32v(c.max_position_embeddings)?),
        (k("embedding_length"), u32v(c.hidden_size)?),
        (k("block_count"), u32v(c.num_layers)?),
        (k("feed_forward_length"), u32v(c.intermediate_size)?),
        (k("attention.head_count"), u32v(c.num_heads)?),
        (k("attention.head_count_kv"), u32v(c.num_kv_heads)?),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.dimension_count"), u32v(c.head_dim)?),
        (k("vocab_size"), u32v(c.vocab_size)?),
    ];
    if c.head_dim * c.num_heads != c.hidden_size {
        m.push((k("attention.key_length"), u32v(c.head_dim)?));
        m.push((k("attention.value_length"), u32v(c.head_dim)?));
    }
    match &c.rope_scaling {
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), Value::String("linear".into())));
            m.push((k("rope.scaling.factor"), Value::F32(*factor as f32)));
        }
        RopeScaling::Llama3 { original_max_position_embeddings, .. } => {
            m.push((k("rope.scaling.original_context_length"), u32v(*original_max_position_embeddings)?));
        }
        RopeScaling::None | RopeScaling::Factors(_) => {}
    }
    m.push(("general.file_type".into(), Value::U32(quant.file_type())));
    m.push(("general.quantization_version".into(), Value::U32(2)));
    m.extend(tokenizer);
    Ok(m)
}

/// GGUF's value type id.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(u8::from(*x)),
        Value::String(s) => put_str(buf, s),
        Value::Array(items) => {
            let t = items.first().map_or(4, value_type);
            if items.iter().any(|i| value_type(i) != t) {
                return Err(Error::Invalid(format!("metadata '{key}' mixes value types in one array")));
            }
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(buf, key, i)?;
            }
        }
    }
    Ok(())
}

fn pad_to(len: usize) -> usize {
    len.div_ceil(ALIGNMENT) * ALIGNMENT - len
}

fn write_file(path: &Path, metadata: &[(String, Value)], tensors: &[Encoded]) -> Result<()> {
    let mut head = Vec::with_capacity(2 << 20);
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        // ggml's ne[0] is the innermost (row length) dimension.
        for d in t.dims.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(t.ty).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.bytes.len() + pad_to(t.bytes.len());
    }
    head.resize(head.len() + pad_to(head.len()), 0);
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&head).map_err(io_err(path))?;
    let zeros = [0u8; ALIGNMENT];
    for t in tensors {
        w.write_all(&t.bytes).map_err(io_err(path))?;
        w.write_all(&zeros[..pad_to(t.bytes.len())]).map_err(io_err(path))?;
    }
    w.flush().map_err(io_err(path))?;
    Ok(())
}
