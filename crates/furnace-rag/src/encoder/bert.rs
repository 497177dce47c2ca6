//! BERT (Devlin et al., 2018) as Hugging Face `transformers`' `BertModel` computes it:
//! word + position + token-type embeddings, post-LayerNorm encoder layers with
//! bidirectional attention over the unpadded tokens, and the optional pooler
//! (`dense` + `tanh` on the first token) that sequence-classification heads read.
//!
//! Weights are read from safetensors by their HF names; a `bert.` prefix (what
//! `BertForSequenceClassification` saves) is recognised.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use furnace_model::{AdapterRows, Linear, RawWeight, WeightDType};

use crate::error::{Error, Result};

/// The fields of a BERT `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh approximation) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest input the position table covers.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    /// Labels of a classification head (`id2label`'s size), when present.
    #[serde(default)]
    pub id2label: Option<serde_json::Map<String, serde_json::Value>>,
    /// `model_type` (`bert`, ...).
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

/// The largest sizes a config may declare (a crafted `config.json` must not make us
/// allocate terabytes).
const MAX_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 256;
const MAX_VOCAB: usize = 1 << 22;
const MAX_POSITIONS: usize = 1 << 17;

impl BertConfig {
    /// Checks that the sizes are consistent and bounded.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("config.json: {m}")));
        if self.hidden_size == 0 || self.hidden_size > MAX_WIDTH || self.intermediate_size == 0 || self.intermediate_size > 4 * MAX_WIDTH {
            return bad(format!("hidden_size {} / intermediate_size {} out of range", self.hidden_size, self.intermediate_size));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if self.num_hidden_layers == 0 || self.num_hidden_layers > MAX_LAYERS {
            return bad(format!("num_hidden_layers {} out of range (1..={MAX_LAYERS})", self.num_hidden_layers));
        }
        if self.vocab_size == 0
            || self.vocab_size > MAX_VOCAB
            || self.max_position_embeddings == 0
            || self.max_position_embeddings > MAX_POSITIONS
        {
            return bad(format!("vocab_size {} / max_position_embeddings {} out of range", self.vocab_size, self.max_position_embeddings));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!("position_embedding_type {:?} is not supported (only \"absolute\")", self.position_embedding_type));
        }
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(Error::Invalid(format!("config.json: hidden_act {other:?} is not supported (gelu, gelu_new, relu)"))),
        }
    }

    fn apply(self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => {
                let shape = x.shape().clone();
                let mut v = x.flatten_all()?.to_vec1::<f32>()?;
                crate::encoder::ops::gelu_erf(&mut v);
                Tensor::from_vec(v, shape, x.device())?
            }
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// A dense layer `x Wᵀ + b` through furnace-model's [`Linear`] (f32, or bf16 with the
/// packed bf16 kernels).
pub(crate) struct Dense {
    lin: Linear,
}

impl Dense {
    pub(crate) fn load(w: &mut Weights, name: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = w.take(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let b = w.take(&format!("{name}.bias"), &[out_dim])?;
        Self::from_parts(&weight, b, w.dtype)
    }

    /// A layer from a `[out, in]` weight and its bias.
    pub(crate) fn from_parts(w: &Tensor, b: Tensor, dtype: WeightDType) -> Result<Self> {
        Ok(Dense { lin: Linear::new(RawWeight::Dense(w.clone()), Some(b), dtype)? })
    }

    /// `x` is `[rows, in]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.lin.forward(x, &AdapterRows::none())?)
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    w: Tensor,
    b: Tensor,
    w_host: Vec<f32>,
    b_host: Vec<f32>,
    eps: f64,
}

impl LayerNorm {
    fn load(w: &mut Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let (wt, bt) = (w.take(&format!("{name}.weight"), &[dim])?, w.take(&format!("{name}.bias"), &[dim])?);
        Ok(LayerNorm { w_host: wt.to_vec1()?, b_host: bt.to_vec1()?, w: wt, b: bt, eps })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps as f32)
    }

    /// `LayerNorm(x + residual)` for `[rows, dim]` tensors, fused.
    fn add_forward(&self, x: Tensor, residual: &Tensor) -> Result<Tensor> {
        let shape = x.shape().clone();
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let r = residual.flatten_all()?.to_vec1::<f32>()?;
        if v.len() != r.len() {
            return Err(Error::Invalid(format!("residual of {} values for {}", r.len(), v.len())));
        }
        crate::encoder::ops::add_layer_norm(&mut v, &r, &self.w_host, &self.b_host, self.eps as f32);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

struct Layer {
    qkv: Dense,
    out: Dense,
    attn_norm: LayerNorm,
    up: Dense,
    down: Dense,
    ffn_norm: LayerNorm,
}

/// The safetensors of a model, taken by name (so a missing or misshapen tensor is an
/// error naming it).
pub(crate) struct Weights {
    tensors: HashMap<String, Tensor>,
    prefix: String,
    /// How dense layers hold their weights.
    pub(crate) dtype: WeightDType,
}

impl Weights {
    pub(crate) fn new(tensors: HashMap<String, Tensor>, dtype: WeightDType) -> Self {
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") { String::new() } else { "bert.".to_string() };
        Weights { tensors, prefix, dtype }
    }

    /// A tensor of the BERT body (the `bert.` prefix added when the file uses one).
    pub(crate) fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        self.take_exact(&full, shape)
    }

    /// A tensor by its full name.
    pub(crate) fn take_exact(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| Error::Invalid(format!("the model has no tensor {name:?}")))?;
        if t.dims() != shape {
            return Err(Error::Invalid(format!("tensor {name:?} has shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(&format!("{}{name}", self.prefix)) || self.tensors.contains_key(name)
    }
}

/// A BERT encoder in f32.
pub struct Bert {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Dense>,
    act: Activation,
}

impl Bert {
    /// Builds the model from its config and weights (the pooler is loaded when present).
    pub(crate) fn load(config: BertConfig, w: &mut Weights) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let word = w.take("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = w.take("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?;
        let token_type = w.take("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?;
        let emb_norm = LayerNorm::load(w, "embeddings.LayerNorm", h, eps)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            // One [3h, h] product instead of three.
            let mut ws = Vec::with_capacity(3);
            let mut bs = Vec::with_capacity(3);
            for part in ["query", "key", "value"] {
                ws.push(w.take(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                bs.push(w.take(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            let qkv = Dense::from_parts(&Tensor::cat(&ws, 0)?, Tensor::cat(&bs, 0)?, w.dtype)?;
            layers.push(Layer {
                qkv,
                out: Dense::load(w, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"), h, eps)?,
                up: Dense::load(w, &format!("{p}.intermediate.dense"), h, config.intermediate_size)?,
                down: Dense::load(w, &format!("{p}.output.dense"), config.intermediate_size, h)?,
                ffn_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"), h, eps)?,
            });
        }
        let pooler = if w.has("pooler.dense.weight") { Some(Dense::load(w, "pooler.dense", h, h)?) } else { None };
        let act = Activation::parse(&config.hidden_act)?;
        Ok(Bert { config, word, position, token_type, emb_norm, layers, pooler, act })
    }

    /// The model's config.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Hidden states `[batch, len, hidden]` of a padded batch: `ids` and `type_ids` are
    /// `batch × len` row-major, `lens[i]` the real length of row `i` (the rest is padding,
    /// masked out of attention).
    pub fn forward(&self, ids: &[u32], type_ids: &[u32], lens: &[usize], len: usize) -> Result<Tensor> {
        // On a compute-pool thread, the kernels' parallel regions start and join without
        // waking the calling thread each time (as furnace-model's forward does).
        if rayon::current_thread_index().is_none() {
            return rayon::join(|| self.forward(ids, type_ids, lens, len), || ()).0;
        }
        let batch = lens.len();
        let h = self.config.hidden_size;
        if ids.len() != batch * len || type_ids.len() != batch * len {
            return Err(Error::Invalid(format!("{} ids for a batch of {batch} × {len}", ids.len())));
        }
        if len > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!("{len} tokens, more than the model's {} positions", self.config.max_position_embeddings)));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::Invalid(format!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size)));
        }
        if let Some(&bad) = type_ids.iter().find(|&&i| i as usize >= self.config.type_vocab_size) {
            return Err(Error::Invalid(format!("token type {bad} is outside the model's {} types", self.config.type_vocab_size)));
        }
        let dev = Device::Cpu;
        let ids_t = Tensor::from_slice(ids, batch * len, &dev)?;
        let types_t = Tensor::from_slice(type_ids, batch * len, &dev)?;
        let pos = self.position.narrow(0, 0, len)?;
        let x = self.word.index_select(&ids_t, 0)?.reshape((batch, len, h))?;
        let x = x.broadcast_add(&pos)?.add(&self.token_type.index_select(&types_t, 0)?.reshape((batch, len, h))?)?;
        let mut x = self.emb_norm.forward(&x)?.reshape((batch * len, h))?;
        let heads = self.config.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.reshape((batch, len, 3, heads, hd))?;
            let q = qkv.narrow(2, 0, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
            let k = qkv.narrow(2, 1, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
            let v = qkv.narrow(2, 2, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?;
            let mut scores = q.matmul(&k.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            crate::encoder::ops::masked_softmax(&mut scores, heads, len, lens, scale as f32);
            let probs = Tensor::from_vec(scores, (batch, heads, len, len), &dev)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch * len, h))?;
            let attn = layer.out.forward(&ctx)?;
            x = layer.attn_norm.add_forward(attn, &x)?;
            let up = self.act.apply(layer.up.forward(&x)?)?;
            let down = layer.down.forward(&up)?;
            x = layer.ffn_norm.add_forward(down, &x)?;
        }
        Ok(x.reshape((batch, len, h))?)
    }

    /// Whether the model has a pooler (`pooler.dense`).
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// The pooler's output (`tanh(dense(h[:, 0]))`), `[batch, hidden]`, when the model has one.
    pub fn pool(&self, hidden: &Tensor) -> Result<Option<Tensor>> {
        let Some(pooler) = &self.pooler else { return Ok(None) };
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(Some(pooler.forward(&first)?.tanh()?))
    }
}

/// Reads a `[batch, hidden]` tensor into rows.
pub(crate) fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// The last dimension's softmax-free L2 normalisation, as `torch.nn.functional.normalize`
/// (norms clamped at 1e-12).
pub(crate) fn l2_normalize(t: &Tensor) -> Result<Tensor> {
    let norm = t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(t.broadcast_div(&norm)?)
}
