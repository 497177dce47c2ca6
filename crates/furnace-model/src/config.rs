//! Architecture hyperparameters of a llama-family model, read from GGUF metadata or an HF
//! `config.json`, in one struct that the model code uses.

use crate::error::{Error, Result};
use serde_json::Value;

/// How rotary position embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): what GGUF llama weights need as stored (llama.cpp permuted their
    /// q/k rows). The loader undoes that permutation, so loaded models use `HalfSplit`.
    Interleaved,
    /// Pairs (i, i + d/2): HF checkpoints, and GGUF qwen2 (NEOX style).
    HalfSplit,
}

/// Frequency scaling of RoPE for long-context models.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context the model was trained at before scaling.
        original_max_position_embeddings: usize,
    },
    /// Per-frequency divisors stored in the GGUF (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// Hyperparameters of the llama family (Llama 2/3, SmolLM, Mistral, Qwen2).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// Context length.
    pub max_position_embeddings: usize,
    /// The LM head shares the token embedding.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2).
    pub attention_bias: bool,
}

/// Upper bounds on the sizes a config may declare (far above any llama-family model),
/// checked before anything is sized by them, so a crafted file cannot ask for a huge
/// allocation: `(name, max)` for layers, hidden size, intermediate size, heads, head
/// dimension, vocabulary and context.
pub const MAX_SIZES: [(&str, usize); 8] = [
    ("layers", 4096),
    ("hidden size", 1 << 17),
    ("intermediate size", 1 << 20),
    ("attention heads", 4096),
    ("key/value heads", 4096),
    ("head dimension", 1 << 14),
    ("vocabulary", 1 << 24),
    ("context length", 1 << 26),
];

impl LlamaConfig {
    /// Checks the invariants the model code relies on, and the bounds of [`MAX_SIZES`].
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be non-zero".into());
        }
        let sizes = [
            self.num_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.max_position_embeddings,
        ];
        for ((name, max), v) in MAX_SIZES.iter().zip(sizes) {
            if v > *max {
                return bad(format!("{name} {v} is larger than the supported maximum {max}"));
            }
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!("{} attention heads are not a multiple of {} key/value heads", self.num_heads, self.num_kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.max_position_embeddings == 0 {
            return bad("context length must be non-zero".into());
        }
        Ok(())
    }

    /// Reads an HF `config.json` value (llama, mistral, qwen2).
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let arch =
            v.get("model_type").and_then(Value::as_str).ok_or_else(|| Error::Config("config.json has no model_type".into()))?.to_string();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(Error::UnknownArchitecture(arch));
        }
        let usize_key = |k: &str| -> Result<usize> {
            v.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| Error::Config(format!("config.json lacks integer '{k}'")))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = usize_key("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size / num_heads.max(1),
        };
        // transformers 5 nests rope settings in `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling` at the top level.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta =
            rope_params.and_then(|p| p.get("rope_theta")).or_else(|| v.get("rope_theta")).and_then(Value::as_f64).unwrap_or(10_000.0);
        let scaling_obj = v.get("rope_scaling").filter(|p| p.is_object()).or(rope_params);
        let rope_scaling = match scaling_obj {
            Some(s) => parse_hf_rope_scaling(s)?,
            None => RopeScaling::None,
        };
        let cfg = LlamaConfig {
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            vocab_size: usize_key("vocab_size")?,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            max_position_embeddings: usize_key("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: arch == "qwen2" || v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            architecture: arch,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rope_style: RopeStyle::HalfSplit,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn parse_hf_rope_scaling(s: &Value) -> Result<RopeScaling> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(Value::as_f64);
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: f("factor").unwrap_or(1.0) },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: s.get("original_max_position_embeddings").and_then(Value::as_u64).unwrap_or(8192) as usize,
        },
        other => return Err(Error::Config(format!("rope scaling '{other}' is not supported (supported: default, linear, llama3)"))),
    })
}

/// Inverse frequencies of RoPE for one head, after scaling.
pub fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
    match &cfg.rope_scaling {
        RopeScaling::None => base.iter().map(|&x| x as f32).collect(),
        RopeScaling::Linear { factor } => base.iter().map(|&x| (x / factor) as f32).collect(),
        RopeScaling::Factors(fs) => {
            base.iter().zip(fs.iter().chain(std::iter::repeat(&1.0))).map(|(&x, &f)| (x / f as f64) as f32).collect()
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let f = if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    };
                    f as f32
                })
                .collect()
        }
    }
}
