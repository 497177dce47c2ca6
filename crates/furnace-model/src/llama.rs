//! The llama family (Llama 2/3, SmolLM, Mistral, Qwen2): RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP, tied or separate LM head, optional q/k/v bias.
//!
//! Reference: Touvron et al., "LLaMA" (2023) and HF transformers' `modeling_llama.py`.
//! The forward pass is *ragged*: one call carries new tokens of many sequences, each with
//! its own [`SeqCache`]. Linear layers and the MLP run once over all rows; attention runs
//! per sequence. Generation (one token per sequence) and prefill (whole prompts) are the
//! same call, which is what continuous batching needs. Each sequence names the LoRA adapter
//! it runs with, if any ([`crate::lora`]), so one pass serves sequences of many adapters.

use crate::config::{rope_inv_freq, LlamaConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::kernels::attention::{decode_attention, rope_inplace};
use crate::kv_cache::SeqCache;
use crate::linear::{Linear, RawWeight, WeightDType};
use crate::lora::{AdapterId, AdapterRows};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// RMSNorm with a learned scale.
#[derive(Clone)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f32,
}

impl RmsNorm {
    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Self-attention projections of one block.
#[derive(Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
}

/// SwiGLU MLP of one block.
#[derive(Clone)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`, with the adapters of `adapters` on their rows.
    pub fn forward(&self, x: &Tensor, adapters: &AdapterRows) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let mut gu = Linear::forward_many(x, &[&self.gate_proj, &self.up_proj], adapters)?;
        let u = gu.pop().unwrap_or_default();
        let mut g = gu.pop().unwrap_or_default();
        // SwiGLU in place: silu(g) * u.
        for (a, b) in g.iter_mut().zip(&u) {
            *a = *a / (1.0 + (-*a).exp()) * b;
        }
        let h = Tensor::from_vec(g, (rows, self.gate_proj.out_features), x.device())?;
        self.down_proj.forward(&h, adapters)
    }
}

/// One transformer block.
#[derive(Clone)]
pub struct Block {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
}

impl Block {
    /// The projection with this PEFT module name (`q_proj` ... `down_proj`).
    pub fn projection(&self, module: &str) -> Option<&Linear> {
        Some(match module {
            "q_proj" => &self.self_attn.q_proj,
            "k_proj" => &self.self_attn.k_proj,
            "v_proj" => &self.self_attn.v_proj,
            "o_proj" => &self.self_attn.o_proj,
            "gate_proj" => &self.mlp.gate_proj,
            "up_proj" => &self.mlp.up_proj,
            "down_proj" => &self.mlp.down_proj,
            _ => return None,
        })
    }

    /// Mutable [`Block::projection`].
    pub fn projection_mut(&mut self, module: &str) -> Option<&mut Linear> {
        Some(match module {
            "q_proj" => &mut self.self_attn.q_proj,
            "k_proj" => &mut self.self_attn.k_proj,
            "v_proj" => &mut self.self_attn.v_proj,
            "o_proj" => &mut self.self_attn.o_proj,
            "gate_proj" => &mut self.mlp.gate_proj,
            "up_proj" => &mut self.mlp.up_proj,
            "down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }
}

/// Which logits a sequence wants from a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (prefill of a chunk that is not the prompt's last).
    None,
    /// Only the last new position (generation).
    Last,
    /// Every new position (scoring, training).
    All,
}

/// New tokens of one sequence in a ragged forward pass.
pub struct SeqInput<'a> {
    /// Tokens to append.
    pub tokens: &'a [u32],
    /// The sequence's cache; its length is the position of `tokens[0]`.
    pub cache: &'a mut SeqCache,
    /// Which logits to return.
    pub logits: Logits,
    /// The registered adapter this sequence runs with ([`Llama::add_adapter`]), or `None`
    /// for the base model.
    pub adapter: Option<AdapterId>,
}

/// A llama-family causal language model. Cloning is cheap: weights are shared.
#[derive(Clone)]
pub struct Llama {
    /// Hyperparameters.
    pub config: LlamaConfig,
    /// Token embedding `[vocab, hidden]`, f32.
    pub embed_tokens: Tensor,
    /// Blocks.
    pub layers: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    /// LM head (the embedding when tied).
    pub lm_head: Linear,
    /// How the linear weights are held.
    pub dtype: WeightDType,
    /// RoPE tables `[positions, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Registered adapters, oldest first (their factors live in the layers).
    pub(crate) adapters: Vec<AdapterId>,
    /// The id the next registered adapter gets.
    pub(crate) next_adapter: u64,
}

/// Source of weights by HF name.
pub trait WeightSource {
    /// The weight with this HF name, if the model has it.
    fn get(&mut self, name: &str) -> Result<Option<RawWeight>>;
}

fn required(src: &mut dyn WeightSource, name: &str) -> Result<RawWeight> {
    src.get(name)?.ok_or_else(|| Error::MissingWeight(name.to_string()))
}

fn check_shape(name: &str, w: &RawWeight, expected: &[usize]) -> Result<()> {
    let got = w.dims();
    if got != expected {
        return Err(Error::WeightShape { name: name.to_string(), got, expected: expected.to_vec() });
    }
    Ok(())
}

impl Llama {
    /// Builds the model from a weight source.
    pub fn load(config: LlamaConfig, src: &mut dyn WeightSource, dtype: WeightDType) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let qd = c.num_heads * c.head_dim;
        let kvd = c.num_kv_heads * c.head_dim;
        let norm = |src: &mut dyn WeightSource, name: &str| -> Result<RmsNorm> {
            let w = required(src, name)?;
            check_shape(name, &w, &[h])?;
            Ok(RmsNorm { weight: w.to_f32()?, eps: c.rms_norm_eps as f32 })
        };
        let linear = |src: &mut dyn WeightSource, name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let wname = format!("{name}.weight");
            let w = required(src, &wname)?;
            check_shape(&wname, &w, &[out, inp])?;
            let b = if bias {
                let bname = format!("{name}.bias");
                let b = required(src, &bname)?;
                check_shape(&bname, &b, &[out])?;
                Some(b.to_f32()?)
            } else {
                None
            };
            Linear::new(w, b, dtype)
        };
        let embed_raw = required(src, "model.embed_tokens.weight")?;
        check_shape("model.embed_tokens.weight", &embed_raw, &[c.vocab_size, h])?;
        let embed_tokens = embed_raw.to_f32()?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_layernorm: norm(src, &format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: linear(src, &format!("{p}.self_attn.q_proj"), qd, h, c.attention_bias)?,
                    k_proj: linear(src, &format!("{p}.self_attn.k_proj"), kvd, h, c.attention_bias)?,
                    v_proj: linear(src, &format!("{p}.self_attn.v_proj"), kvd, h, c.attention_bias)?,
                    o_proj: linear(src, &format!("{p}.self_attn.o_proj"), h, qd, false)?,
                },
                post_attention_layernorm: norm(src, &format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: linear(src, &format!("{p}.mlp.gate_proj"), c.intermediate_size, h, false)?,
                    up_proj: linear(src, &format!("{p}.mlp.up_proj"), c.intermediate_size, h, false)?,
                    down_proj: linear(src, &format!("{p}.mlp.down_proj"), h, c.intermediate_size, false)?,
                },
            });
        }
        let norm_f = norm(src, "model.norm.weight")?;
        let lm_head = match (c.tie_word_embeddings, src.get("lm_head.weight")?) {
            (false, Some(w)) => {
                check_shape("lm_head.weight", &w, &[c.vocab_size, h])?;
                Linear::new(w, None, dtype)?
            }
            (false, None) => return Err(Error::MissingWeight("lm_head.weight".into())),
            (true, _) => Linear::new(embed_raw, None, dtype)?,
        };
        let (cos, sin) = rope_tables(c)?;
        Ok(Self { config, embed_tokens, layers, norm: norm_f, lm_head, dtype, cos, sin, adapters: Vec::new(), next_adapter: 0 })
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        let c = &self.config;
        SeqCache::new(c.num_layers, c.num_kv_heads, c.head_dim, c.max_position_embeddings)
    }

    /// Logits `[ids.len(), vocab]` at every position of one sequence, from scratch, with
    /// the base model.
    pub fn logits_all(&self, ids: &[u32]) -> Result<Tensor> {
        self.logits_all_with(ids, None)
    }

    /// [`Llama::logits_all`] with a registered adapter (or none).
    pub fn logits_all_with(&self, ids: &[u32], adapter: Option<AdapterId>) -> Result<Tensor> {
        let mut cache = self.new_cache();
        let mut out = self.forward(&mut [SeqInput { tokens: ids, cache: &mut cache, logits: Logits::All, adapter }])?;
        out.pop().flatten().ok_or_else(|| Error::Config("empty input".into()))
    }

    /// Runs new tokens of several sequences through the model in one pass, appending to each
    /// sequence's cache. Returns, per sequence, the requested logits `[n, vocab]` (f32).
    pub fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Option<Tensor>>> {
        // Run the pass on a compute-pool thread: the parallel regions inside then start and
        // join without waking the calling thread each time (hundreds of times per pass).
        // A single-row pass of a quantized model runs in candle's own pool instead; hopping
        // into ours would leave its idle worker competing for the cores.
        let rows: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let candle_pool = rows < crate::linear::Q8_TILED_MIN_ROWS && self.dtype == WeightDType::Quantized;
        if rayon::current_thread_index().is_none() && !candle_pool {
            return rayon::join(|| self.forward_inner(batch), || ()).0;
        }
        self.forward_inner(batch)
    }

    /// The final (normed) hidden state at the last new position of each sequence,
    /// `[batch, hidden]`: what a decoder used as a sentence embedder pools (last-token
    /// pooling). Appends to each cache like [`Llama::forward`]; `logits` is ignored.
    pub fn last_hidden(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        if rayon::current_thread_index().is_none() {
            return rayon::join(|| self.last_hidden(batch), || ()).0;
        }
        let ids = self.check_batch(batch)?;
        let adapters = AdapterRows::from_sequences(batch.iter().map(|s| (s.adapter, s.tokens.len())))?;
        let x = self.layers_forward(&ids, batch, &adapters)?;
        let mut rows = Vec::with_capacity(batch.len());
        let mut offset = 0u32;
        for s in batch.iter() {
            offset += s.tokens.len() as u32;
            rows.push(offset - 1);
        }
        let n = rows.len();
        let sel = x.index_select(&Tensor::from_vec(rows, n, &Device::Cpu)?, 0)?;
        self.norm.forward(&sel)
    }

    /// Runs the decoder layers over the new tokens of every sequence (`ids`, concatenated)
    /// and advances the caches; returns the last layer's residual stream `[tokens, hidden]`.
    fn layers_forward(&self, ids: &Tensor, batch: &mut [SeqInput<'_>], adapters: &AdapterRows) -> Result<Tensor> {
        let mut x = self.embed_tokens.index_select(ids, 0)?;
        for (li, block) in self.layers.iter().enumerate() {
            let h = block.input_layernorm.forward(&x)?;
            let attn = self.attention(li, &block.self_attn, &h, batch, adapters)?;
            x = (x + block.self_attn.o_proj.forward(&attn, adapters)?)?;
            let h = block.post_attention_layernorm.forward(&x)?;
            x = (x + block.mlp.forward(&h, adapters)?)?;
        }
        for s in batch.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        Ok(x)
    }

    /// Checks every sequence of a batch (tokens, room, adapter, vocabulary), reserves
    /// cache room and returns all new tokens concatenated.
    fn check_batch(&self, batch: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let c = &self.config;
        let vocab = c.vocab_size as u32;
        let mut all_ids = Vec::new();
        if batch.is_empty() {
            return Err(Error::Config("an empty batch".into()));
        }
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Config("a sequence in the batch has no new tokens".into()));
            }
            s.cache.check_room(s.tokens.len())?;
            if let Some(id) = s.adapter.filter(|id| !self.has_adapter(*id)) {
                return Err(Error::Adapter(format!("{id} is not registered in this model")));
            }
        }
        for s in batch.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
            if let Some(&id) = s.tokens.iter().find(|&&id| id >= vocab) {
                return Err(Error::TokenOutOfRange { id, vocab: c.vocab_size });
            }
            all_ids.extend_from_slice(s.tokens);
        }
        let n = all_ids.len();
        Ok(Tensor::from_vec(all_ids, n, &Device::Cpu)?)
    }

    fn forward_inner(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Option<Tensor>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.check_batch(batch)?;
        let n = ids.dim(0)?;
        let adapters = AdapterRows::from_sequences(batch.iter().map(|s| (s.adapter, s.tokens.len())))?;
        let x = self.layers_forward(&ids, batch, &adapters)?;
        // Only rows whose logits are wanted go through the (large) LM head.
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        let mut offset = 0u32;
        for s in batch.iter() {
            let t = s.tokens.len() as u32;
            let start = rows.len();
            match s.logits {
                Logits::None => {}
                Logits::Last => rows.push(offset + t - 1),
                Logits::All => rows.extend(offset..offset + t),
            }
            spans.push((start, rows.len() - start));
            offset += t;
        }
        if rows.is_empty() {
            return Ok(batch.iter().map(|_| None).collect());
        }
        let nrows = rows.len();
        let sel = if nrows == n { x } else { x.index_select(&Tensor::from_vec(rows, nrows, &Device::Cpu)?, 0)? };
        let logits = self.lm_head.forward(&self.norm.forward(&sel)?, &AdapterRows::none())?;
        spans.into_iter().map(|(start, len)| if len == 0 { Ok(None) } else { Ok(Some(logits.narrow(0, start, len)?)) }).collect()
    }

    fn attention(&self, layer: usize, a: &Attention, h: &Tensor, batch: &mut [SeqInput<'_>], adapters: &AdapterRows) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (qw, kw) = (nh * hd, nkv * hd);
        let half = hd / 2;
        let interleaved = c.rope_style == RopeStyle::Interleaved;
        let mut qkv = Linear::forward_many(h, &[&a.q_proj, &a.k_proj, &a.v_proj], adapters)?;
        let v = qkv.pop().unwrap_or_default();
        let mut k = qkv.pop().unwrap_or_default();
        let mut q = qkv.pop().unwrap_or_default();
        let n = q.len() / qw;
        // RoPE at each token's own position, then append keys/values to each cache.
        let mut row = 0;
        for s in batch.iter_mut() {
            let pos = s.cache.len();
            for i in 0..s.tokens.len() {
                let p = pos + i;
                let (cos, sin) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
                let r = row + i;
                rope_inplace(&mut q[r * qw..(r + 1) * qw], hd, cos, sin, interleaved);
                rope_inplace(&mut k[r * kw..(r + 1) * kw], hd, cos, sin, interleaved);
            }
            let t = s.tokens.len();
            s.cache.append(layer, &k[row * kw..(row + t) * kw], &v[row * kw..(row + t) * kw]);
            row += t;
        }
        let mut out = vec![0f32; n * qw];
        // Split the output into each sequence's rows.
        let mut jobs = Vec::with_capacity(batch.len());
        let mut rest: &mut [f32] = &mut out;
        let mut row = 0;
        for s in batch.iter() {
            let t = s.tokens.len();
            let (mine, tail) = rest.split_at_mut(t * qw);
            rest = tail;
            jobs.push((&*s.cache, row, t, mine));
            row += t;
        }
        let q = &q;
        jobs.into_par_iter().try_for_each(|(cache, row, t, dst)| -> Result<()> {
            let (kc, stride) = cache.keys(layer);
            let vc = cache.values(layer);
            let l = vc.len() / cache.width();
            if t == 1 {
                decode_attention(&q[row * qw..(row + 1) * qw], kc, stride, vc, l, nh, nkv, hd, dst);
                return Ok(());
            }
            // Prefill: batched matmuls. Query heads that share a key/value head are stacked
            // along the row axis, so K/V are never repeated.
            let rep = nh / nkv;
            let pos = l - t;
            let qs = Tensor::from_slice(&q[row * qw..(row + t) * qw], (t, nh, hd), &Device::Cpu)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((nkv, rep * t, hd))?;
            let qs = (qs * (1.0 / (hd as f64).sqrt()))?;
            let mut kt = Vec::with_capacity(nkv * hd * l);
            for r in kc.chunks(stride).take(nkv * hd) {
                kt.extend_from_slice(&r[..l]);
            }
            let kt = Tensor::from_vec(kt, (nkv, hd, l), &Device::Cpu)?;
            let vt = Tensor::from_slice(vc, (l, nkv, hd), &Device::Cpu)?.transpose(0, 1)?.contiguous()?;
            let mut scores = qs.matmul(&kt)?; // [nkv, rep*t, l]
            let mut mask = vec![0f32; rep * t * l];
            for r in 0..rep {
                for i in 0..t {
                    let m = &mut mask[(r * t + i) * l..(r * t + i + 1) * l];
                    m.iter_mut().skip(pos + i + 1).for_each(|x| *x = f32::NEG_INFINITY);
                }
            }
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (rep * t, l), &Device::Cpu)?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&vt)?; // [nkv, rep*t, hd] == [nh, t, hd]
            let o = o.reshape((nh, t, hd))?.transpose(0, 1)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            dst.copy_from_slice(&o);
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, (n, qw), &Device::Cpu)?)
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        let c = &self.config;
        let per_layer = 2 * c.hidden_size
            + c.hidden_size * c.num_heads * c.head_dim * 2
            + c.hidden_size * c.num_kv_heads * c.head_dim * 2
            + 3 * c.hidden_size * c.intermediate_size
            + if c.attention_bias { c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim } else { 0 };
        let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * c.hidden_size };
        c.vocab_size * c.hidden_size + head + c.hidden_size + c.num_layers * per_layer
    }
}

fn rope_tables(c: &LlamaConfig) -> Result<(Vec<f32>, Vec<f32>)> {
    let inv = rope_inv_freq(c);
    let half = inv.len();
    let n = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    debug_assert_eq!(cos.len(), n * half);
    Ok((cos, sin))
}
