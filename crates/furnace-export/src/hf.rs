//! A [`crate::merge::BaseModel`] written as an HF model directory: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` (with the chat template),
//! `generation_config.json`.
//!
//! For an HF base, its `config.json` is kept (only the dtype changes) and its tokenizer and
//! generation files are copied. For a GGUF base, `config.json` is written from the GGUF's
//! hyperparameters and the tokenizer from its metadata ([`crate::tokenizer`]), so
//! transformers' `AutoTokenizer` gives the ids furnace gives on the GGUF.

use crate::error::{io_err, Error, Result};
use crate::merge::{BaseModel, BaseOrigin};
use furnace_model::gguf::GgufFile;
use furnace_model::{LlamaConfig, RopeScaling};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The dtype of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDType {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

impl HfDType {
    /// The name transformers uses in `config.json` (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            HfDType::F32 => "float32",
            HfDType::Bf16 => "bfloat16",
            HfDType::F16 => "float16",
        }
    }

    /// The short name (`f32`, `bf16`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            HfDType::F32 => "f32",
            HfDType::Bf16 => "bf16",
            HfDType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for HfDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            o => Err(format!("unknown dtype '{o}' (expected f32, bf16 or f16)")),
        }
    }
}

/// Options of [`write_hf_with`].
#[derive(Debug, Clone, Copy)]
pub struct HfOptions {
    /// The dtype of the safetensors.
    pub dtype: HfDType,
    /// Write into an existing non-empty directory, replacing the files written here.
    pub overwrite: bool,
}

/// What [`write_hf_with`] wrote.
#[derive(Debug, Clone)]
pub struct HfReport {
    /// The files written, with their sizes in bytes.
    pub files: Vec<(PathBuf, u64)>,
}

impl HfReport {
    /// Bytes of all files written.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }
}

/// Writes `base` as an HF model directory at `out` (created; an existing non-empty
/// directory is refused).
pub fn write_hf(base: &BaseModel, out: &Path, dtype: HfDType) -> Result<()> {
    write_hf_with(base, out, HfOptions { dtype, overwrite: false }).map(|_| ())
}

/// Writes `base` as an HF model directory at `out`, as [`write_hf`], with options; says what
/// it wrote. Everything is written into a sibling folder first and moved into place at the
/// end, so a failed export leaves no half-written directory; with `overwrite`, the model,
/// config and tokenizer files of an earlier export in `out` (shards and index included) are
/// removed before the new ones move in, and other files there are left alone.
pub fn write_hf_with(base: &BaseModel, out: &Path, opts: HfOptions) -> Result<HfReport> {
    prepare_out_dir(out, opts.overwrite)?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let written = write_files(base, &tmp, opts.dtype).and_then(|files| move_into(&tmp, out, files));
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written.map(|files| HfReport { files })
}

/// Whether `name` is a file an HF model export writes (replaced by a new export).
fn is_export_file(name: &str) -> bool {
    matches!(
        name,
        "config.json"
            | "generation_config.json"
            | "special_tokens_map.json"
            | "chat_template.jinja"
            | "chat_template.json"
            | "vocab.json"
            | "merges.txt"
            | "added_tokens.json"
            | "model.safetensors.index.json"
            | "pytorch_model.bin.index.json"
    ) || name.starts_with("tokenizer")
        || (name.starts_with("model") && name.ends_with(".safetensors"))
        || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
}

/// Moves the files written in `tmp` to `out` (renaming `tmp` itself when `out` does not
/// exist), after removing an earlier export's files from `out`.
fn move_into(tmp: &Path, out: &Path, files: Vec<(PathBuf, u64)>) -> Result<Vec<(PathBuf, u64)>> {
    let moved: Vec<(PathBuf, u64)> =
        files.into_iter().map(|(p, n)| (p.file_name().map(|f| out.join(f)).unwrap_or_else(|| out.to_path_buf()), n)).collect();
    if !out.exists() {
        std::fs::rename(tmp, out).map_err(io_err(out))?;
        return Ok(moved);
    }
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let path = entry.map_err(io_err(out))?.path();
        if path.is_file() && path.file_name().is_some_and(|n| is_export_file(&n.to_string_lossy())) {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    for entry in std::fs::read_dir(tmp).map_err(io_err(tmp))? {
        let from = entry.map_err(io_err(tmp))?.path();
        if let Some(f) = from.file_name() {
            let to = out.join(f);
            std::fs::rename(&from, &to).map_err(io_err(&to))?;
        }
    }
    std::fs::remove_dir_all(tmp).map_err(io_err(tmp))?;
    Ok(moved)
}

/// `tokenizer_config` with the chat template in it (as transformers writes it), unless it
/// has one.
fn with_chat_template(mut cfg: Value, template: Option<&str>) -> Value {
    if let (Some(obj), Some(t)) = (cfg.as_object_mut(), template) {
        obj.entry("chat_template").or_insert_with(|| json!(t));
    }
    cfg
}

/// Every file of the export, written into `dir`.
fn write_files(base: &BaseModel, dir: &Path, dtype: HfDType) -> Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut put = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text.as_bytes()).map_err(io_err(&p))?;
        files.push((p, text.len() as u64));
        Ok(())
    };
    match &base.origin {
        BaseOrigin::Hf(src_dir) => {
            let cfg_path = src_dir.join("config.json");
            let mut cfg = read_json(&cfg_path)?;
            if let Some(obj) = cfg.as_object_mut() {
                obj.insert("dtype".into(), json!(dtype.torch_name()));
                if obj.contains_key("torch_dtype") {
                    obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
                }
            }
            put("config.json", pretty(&cfg)?)?;
            let gen_path = src_dir.join("generation_config.json");
            let gen = if gen_path.is_file() { read_json(&gen_path)? } else { generation_config(&cfg) };
            put("generation_config.json", pretty(&gen)?)?;
            let jinja = src_dir.join("chat_template.jinja");
            let template = if jinja.is_file() { Some(std::fs::read_to_string(&jinja).map_err(io_err(&jinja))?) } else { None };
            let tok_cfg = src_dir.join("tokenizer_config.json");
            if tok_cfg.is_file() {
                put("tokenizer_config.json", pretty(&with_chat_template(read_json(&tok_cfg)?, template.as_deref()))?)?;
            }
            for name in [
                "tokenizer.json",
                "special_tokens_map.json",
                "chat_template.jinja",
                "chat_template.json",
                "tokenizer.model",
                "vocab.json",
                "merges.txt",
                "added_tokens.json",
            ] {
                let src = src_dir.join(name);
                if src.is_file() {
                    let dst = dir.join(name);
                    let n = std::fs::copy(&src, &dst).map_err(io_err(&dst))?;
                    files.push((dst, n));
                }
            }
        }
        BaseOrigin::Gguf(path) => {
            let g = GgufFile::open(path)?;
            let spec = g.tokenizer_spec()?;
            let tok = crate::tokenizer::from_gguf(&spec, g.chat_template(), base.config.max_position_embeddings)?;
            let cfg = gguf_config_json(&base.config, &tok.ids, dtype)?;
            put("config.json", pretty(&cfg)?)?;
            put("generation_config.json", pretty(&generation_config(&cfg))?)?;
            put("tokenizer.json", tok.tokenizer_json)?;
            put("tokenizer_config.json", pretty(&with_chat_template(tok.tokenizer_config, tok.chat_template.as_deref()))?)?;
            if let Some(t) = tok.chat_template {
                put("chat_template.jinja", t)?;
            }
        }
    }
    let st = dir.join("model.safetensors");
    write_safetensors(base, &st, dtype)?;
    let n = std::fs::metadata(&st).map_err(io_err(&st))?.len();
    files.push((st, n));
    Ok(files)
}

fn prepare_out_dir(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_file() {
        return Err(Error::Invalid(format!("{} is a file: the HF output is a directory", out.display())));
    }
    if out.is_dir() {
        let non_empty = std::fs::read_dir(out).map_err(io_err(out))?.next().is_some();
        if non_empty && !overwrite {
            return Err(Error::Invalid(format!(
                "{} exists and is not empty: choose another --out, or pass --force to write into it",
                out.display()
            )));
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: invalid JSON: {e}", path.display())))
}

fn pretty(v: &Value) -> Result<String> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| Error::Invalid(format!("serializing JSON: {e}")))
}

/// `generation_config.json` from the token ids of `config.json`.
fn generation_config(cfg: &Value) -> Value {
    let mut g = serde_json::Map::new();
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = cfg.get(k).filter(|v| !v.is_null()) {
            g.insert(k.into(), v.clone());
        }
    }
    g.insert("_from_model_config".into(), json!(true));
    Value::Object(g)
}

/// The special token ids a GGUF's tokenizer declares.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

/// `config.json` for a base read from a GGUF file.
fn gguf_config_json(c: &LlamaConfig, ids: &SpecialIds, dtype: HfDType) -> Result<Value> {
    let class = match c.architecture.as_str() {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        other => {
            return Err(Error::Invalid(format!("architecture '{other}' cannot be written as an HF directory (llama, mistral, qwen2)")))
        }
    };
    let mut rope = serde_json::Map::new();
    rope.insert("rope_theta".into(), json!(f32_shortest(c.rope_theta)));
    match &c.rope_scaling {
        RopeScaling::None => {
            rope.insert("rope_type".into(), json!("default"));
        }
        RopeScaling::Linear { factor } => {
            rope.insert("rope_type".into(), json!("linear"));
            rope.insert("factor".into(), json!(factor));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            rope.insert("rope_type".into(), json!("llama3"));
            rope.insert("factor".into(), json!(factor));
            rope.insert("low_freq_factor".into(), json!(low_freq_factor));
            rope.insert("high_freq_factor".into(), json!(high_freq_factor));
            rope.insert("original_max_position_embeddings".into(), json!(original_max_position_embeddings));
        }
        RopeScaling::Factors(_) => return Err(Error::Invalid(
            "the GGUF scales RoPE by per-frequency factors (rope_freqs.weight, Llama 3.1 style), which config.json cannot express yet: \
                 merge into the model's HF directory instead"
                .into(),
        )),
    }
    let mut v = json!({
        "architectures": [class],
        "model_type": c.architecture,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "num_hidden_layers": c.num_layers,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_shortest(c.rms_norm_eps),
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "rope_parameters": Value::Object(rope),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "dtype": dtype.torch_name(),
    });
    if let Some(obj) = v.as_object_mut() {
        match c.architecture.as_str() {
            "qwen2" => {
                obj.insert("use_sliding_window".into(), json!(false));
                obj.insert("sliding_window".into(), Value::Null);
                obj.insert("max_window_layers".into(), json!(c.num_layers));
            }
            "mistral" => {
                obj.insert("sliding_window".into(), Value::Null);
            }
            _ => {
                obj.insert("attention_bias".into(), json!(c.attention_bias));
                obj.insert("mlp_bias".into(), json!(false));
                obj.insert("pretraining_tp".into(), json!(1));
            }
        }
    }
    Ok(v)
}

/// A GGUF float (stored as f32) by its shortest decimal form: `1e-5`, not `9.99999974e-6`.
fn f32_shortest(x: f64) -> f64 {
    (x as f32).to_string().parse().unwrap_or(x)
}

/// Writes the tensors of `base` as one safetensors file in `dtype` (metadata `format: pt`,
/// as transformers' `save_pretrained` writes).
fn write_safetensors(base: &BaseModel, path: &Path, dtype: HfDType) -> Result<()> {
    let items: Vec<(&String, &candle_core::Tensor)> = base.tensors.iter().collect();
    let encoded = items
        .par_iter()
        .map(|(name, t)| {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = match dtype {
                HfDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                HfDType::Bf16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                HfDType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            };
            Ok(((*name).clone(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let st_dtype = match dtype {
        HfDType::F32 => Dtype::F32,
        HfDType::Bf16 => Dtype::BF16,
        HfDType::F16 => Dtype::F16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor '{name}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::Invalid(format!("{}: cannot write: {e}", path.display())))
}
