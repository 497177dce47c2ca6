//! A base model as f32 tensors under HF names, and LoRA adapters merged into it.

use crate::error::{Error, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use furnace_model::gguf::GgufFile;
use furnace_model::llama::WeightSource;
use furnace_model::{LlamaConfig, PeftAdapter, RawWeight, RopeStyle};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where a base came from: what the writers copy the tokenizer and metadata from.
#[derive(Debug, Clone)]
pub enum BaseOrigin {
    /// A `.gguf` file (its metadata holds the tokenizer and chat template).
    Gguf(PathBuf),
    /// An HF model directory (tokenizer files beside `config.json`).
    Hf(PathBuf),
}

/// A base model held as f32 tensors under HF names (`model.layers.0.self_attn.q_proj.weight`,
/// `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` when not tied), q and k
/// rows in HF's layout (llama.cpp's permutation undone).
pub struct BaseModel {
    /// Its configuration (`rope_style` as HF's half-split).
    pub config: LlamaConfig,
    /// Every weight, f32.
    pub tensors: BTreeMap<String, candle_core::Tensor>,
    /// Where it came from.
    pub origin: BaseOrigin,
    /// What the file stored, for the output to say what precision the merge holds
    /// (e.g. "q4_1 (dequantized to f32)", "bf16", "f32").
    pub source_precision: String,
    /// Whether the file held block-quantized weights (dequantized on load).
    pub dequantized: bool,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Projections that received a delta.
    pub modules_merged: usize,
    /// The factor applied to `B A` (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

/// The HF names of every weight of a llama-family model with configuration `c`, in order:
/// the embedding, each block's norms, projections (and q/k/v biases when
/// `attention_bias`), the final norm, and `lm_head.weight` unless the embeddings are tied.
pub fn weight_names(c: &LlamaConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        names.push(format!("{p}.input_layernorm.weight"));
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("{p}.self_attn.{m}.weight"));
        }
        if c.attention_bias {
            for m in ["q_proj", "k_proj", "v_proj"] {
                names.push(format!("{p}.self_attn.{m}.bias"));
            }
        }
        names.push(format!("{p}.post_attention_layernorm.weight"));
        for m in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}.mlp.{m}.weight"));
        }
    }
    names.push("model.norm.weight".to_string());
    if !c.tie_word_embeddings {
        names.push("lm_head.weight".to_string());
    }
    names
}

/// The shape each weight of [`weight_names`] must have.
fn expected_shape(c: &LlamaConfig, name: &str) -> Vec<usize> {
    let h = c.hidden_size;
    let qd = c.num_heads * c.head_dim;
    let kvd = c.num_kv_heads * c.head_dim;
    let leaf = name.rsplit_once("layers.").map(|(_, r)| r.split_once('.').map_or(r, |(_, l)| l)).unwrap_or(name);
    match leaf {
        "model.embed_tokens.weight" | "lm_head.weight" => vec![c.vocab_size, h],
        "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        "self_attn.q_proj.weight" => vec![qd, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kvd, h],
        "self_attn.o_proj.weight" => vec![h, qd],
        "self_attn.q_proj.bias" => vec![qd],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kvd],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![c.intermediate_size, h],
        "mlp.down_proj.weight" => vec![h, c.intermediate_size],
        _ => Vec::new(),
    }
}

fn check_shape(c: &LlamaConfig, name: &str, dims: &[usize], file: &Path) -> Result<()> {
    let want = expected_shape(c, name);
    if dims != want.as_slice() {
        return Err(Error::Invalid(format!("{}: weight '{name}' has shape {dims:?} but its configuration needs {want:?}", file.display())));
    }
    Ok(())
}

/// How a GGUF storage type is named in messages (`q4_1`, `f16`, `q4_k`).
pub(crate) fn ggml_name(t: GgmlDType) -> String {
    format!("{t:?}").to_ascii_lowercase()
}

fn dtype_name(t: DType) -> &'static str {
    match t {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// The storage type holding the most elements among `counts`.
fn dominant(counts: &BTreeMap<String, u64>) -> String {
    counts.iter().max_by_key(|(_, c)| **c).map(|(k, _)| k.clone()).unwrap_or_else(|| "?".into())
}

impl BaseModel {
    /// Reads a `.gguf` file or an HF model directory (quantized weights dequantized to f32).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Self::load_gguf(path);
        }
        if path.is_dir() && path.join("config.json").is_file() {
            return Self::load_hf(path);
        }
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "{}: no such file or directory (expected a .gguf file or an HF model directory)",
                path.display()
            )));
        }
        Err(Error::Invalid(format!(
            "{}: not a model (expected a .gguf file or an HF model directory with config.json and *.safetensors)",
            path.display()
        )))
    }

    fn load_gguf(path: &Path) -> Result<Self> {
        let mut g = GgufFile::open(path)?;
        let file_config = g.config()?;
        let names = weight_names(&file_config);
        let mut raw = Vec::with_capacity(names.len());
        {
            let mut src = furnace_model::GgufSource::new(&mut g, &file_config);
            for name in names {
                let w = src.get(&name)?.ok_or_else(|| {
                    Error::Invalid(format!("{}: the GGUF lacks the weight of '{name}' (a llama-family model needs it)", path.display()))
                })?;
                check_shape(&file_config, &name, &w.dims(), path)?;
                raw.push((name, w));
            }
        }
        // What the projections were stored as (the norms are f32 in every GGUF).
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut quantized = false;
        for (_, w) in &raw {
            if let RawWeight::Quantized(q) = w {
                if q.shape().dims().len() >= 2 {
                    *counts.entry(ggml_name(q.dtype())).or_default() += q.shape().elem_count() as u64;
                    quantized |= !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
                }
            }
        }
        let tensors = raw.into_par_iter().map(|(name, w)| Ok((name, w.to_f32()?))).collect::<Result<BTreeMap<_, _>>>()?;
        let mut mix: Vec<(&String, &u64)> = counts.iter().collect();
        mix.sort_by(|a, b| b.1.cmp(a.1));
        let main = dominant(&counts);
        let others: Vec<&str> = mix.iter().skip(1).map(|(k, _)| k.as_str()).collect();
        let stored = if others.is_empty() { main } else { format!("{main} (with {})", others.join(", ")) };
        let source_precision = if quantized { format!("{stored}, dequantized to f32") } else { format!("{stored}, converted to f32") };
        let mut config = file_config;
        config.rope_style = RopeStyle::HalfSplit;
        Ok(Self { config, tensors, origin: BaseOrigin::Gguf(path.to_path_buf()), source_precision, dequantized: quantized })
    }

    fn load_hf(dir: &Path) -> Result<Self> {
        let config = furnace_model::hf::read_config(dir)?;
        let mut all = furnace_model::hf::load_tensors(dir)?;
        let names = weight_names(&config);
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut raw = Vec::with_capacity(names.len());
        for name in names {
            let t = all.remove(&name).ok_or_else(|| {
                Error::Invalid(format!("{}: the safetensors lack '{name}' (a llama-family model needs it)", dir.display()))
            })?;
            check_shape(&config, &name, t.dims(), dir)?;
            *counts.entry(dtype_name(t.dtype()).to_string()).or_default() += t.elem_count() as u64;
            raw.push((name, t));
        }
        let tensors = raw.into_par_iter().map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?))).collect::<Result<BTreeMap<_, _>>>()?;
        let main = dominant(&counts);
        let source_precision = if main == "f32" { main } else { format!("{main}, converted to f32") };
        Ok(Self { config, tensors, origin: BaseOrigin::Hf(dir.to_path_buf()), source_precision, dequantized: false })
    }

    /// Adds `scale · B A` of every targeted projection of `adapter` (PEFT's
    /// `merge_and_unload`); an adapter whose shapes do not fit the base is refused.
    pub fn merge_adapter(&mut self, adapter: &PeftAdapter) -> Result<MergeReport> {
        let scale = adapter.config.scale();
        let another = "the adapter was trained for another base model";
        // Pair the factors by module: `base_model.model.<module>.lora_{A,B}.weight`.
        let mut pairs: BTreeMap<String, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
        for (key, t) in &adapter.tensors {
            let stripped = key.strip_prefix("base_model.model.").unwrap_or(key);
            if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
                pairs.entry(m.to_string()).or_default().0 = Some(t);
            } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
                pairs.entry(m.to_string()).or_default().1 = Some(t);
            } else {
                return Err(Error::Invalid(format!(
                    "adapter tensor '{key}' is not a LoRA factor (lora_A / lora_B): embeddings, biases and modules_to_save cannot be merged yet"
                )));
            }
        }
        if pairs.is_empty() {
            return Err(Error::Invalid("the adapter holds no LoRA factors (no lora_A / lora_B tensors)".into()));
        }
        // Check every module before anything changes.
        let mut staged: Vec<(String, &Tensor, &Tensor)> = Vec::with_capacity(pairs.len());
        for (module, (a, b)) in &pairs {
            let (Some(a), Some(b)) = (a, b) else {
                let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                return Err(Error::Invalid(format!("adapter module '{module}' has no {missing} factor")));
            };
            let wname = format!("{module}.weight");
            let Some(w) = self.tensors.get(&wname) else {
                return Err(Error::Invalid(format!(
                    "adapter module '{module}' does not exist in the base ({} layers, {}): {another}",
                    self.config.num_layers, self.config.architecture
                )));
            };
            let (out, inp) = match w.dims() {
                [o, i] => (*o, *i),
                d => return Err(Error::Invalid(format!("base weight '{wname}' of shape {d:?} is not a matrix"))),
            };
            let (ad, bd) = (a.dims(), b.dims());
            let fits = ad.len() == 2 && bd.len() == 2 && ad[1] == inp && bd[0] == out && ad[0] == bd[1];
            if !fits {
                return Err(Error::Invalid(format!(
                    "adapter module '{module}': lora_A {ad:?} and lora_B {bd:?} do not fit the base's {out}x{inp} weight \
                     (hidden size {}): {another}",
                    self.config.hidden_size
                )));
            }
            staged.push((wname, a, b));
        }
        let merged = staged
            .par_iter()
            .map(|(wname, a, b)| {
                let w = &self.tensors[wname];
                let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
                Ok((wname.clone(), (w + delta)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let modules_merged = merged.len();
        for (name, t) in merged {
            self.tensors.insert(name, t);
        }
        Ok(MergeReport { modules_merged, scale })
    }

    /// The number of parameters (elements of every tensor).
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }
}

/// Reads the tensors of a safetensors file as f32 (for tests and tools).
pub fn read_f32_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
    let all = furnace_model::hf::read_safetensors(&bytes, path)?;
    all.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect()
}
