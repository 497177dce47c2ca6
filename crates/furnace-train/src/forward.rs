//! The differentiable forward pass and the causal-LM loss.
//!
//! Same mathematics as `furnace_model::Llama::forward` (HF's `LlamaForCausalLM`), written
//! with candle ops that have a backward: RMSNorm as `x * rsqrt(mean(x^2) + eps) * w`,
//! half-split RoPE as `x * cos + rotate_half(x) * sin`, softmax with the row max
//! subtracted, SiLU as `x * sigmoid(x)`. Frozen projections go through
//! [`crate::ops::FrozenLinear`] (input gradient only, any weight storage) and LoRA factors
//! are `Var`s, so `backward` returns gradients for the factors only.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor, D};
use furnace_model::{Linear, Llama};

/// Label value that contributes nothing to the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?.broadcast_mul(w)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    crate::ops::train_linear(l, x)
}

/// RoPE tables `[t, head_dim]` (cos and sin, each half repeated) for positions `0..t`.
fn rope_tables(model: &Llama, t: usize) -> Result<(Tensor, Tensor)> {
    let c = &model.config;
    let inv = furnace_model::config::rope_inv_freq(c);
    let half = inv.len();
    let mut cos = Vec::with_capacity(t * 2 * half);
    let mut sin = Vec::with_capacity(t * 2 * half);
    for p in 0..t {
        // cos and sin repeat over the two halves of a head (half-split RoPE).
        for _half in 0..2 {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, 2 * half), &Device::Cpu)?,
        Tensor::from_vec(sin, (t, 2 * half), &Device::Cpu)?,
    ))
}

/// Logits `[t, vocab]` of one sequence, through ops with gradients.
pub fn causal_lm_logits(model: &Llama, ids: &[u32]) -> Result<Tensor> {
    let c = &model.config;
    let t = ids.len();
    if t == 0 {
        return Err(Error::Input("empty sequence".into()));
    }
    if t > c.max_position_embeddings {
        return Err(Error::Input(format!("sequence of {t} tokens exceeds the context of {}", c.max_position_embeddings)));
    }
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let rep = nh / nkv;
    let eps = c.rms_norm_eps;
    let (cos, sin) = rope_tables(model, t)?;
    let ids_t = Tensor::from_vec(ids.to_vec(), t, &Device::Cpu)?;
    let mut x = model.embed_tokens.index_select(&ids_t, 0)?;
    let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
    for b in &model.layers {
        let h = rms_norm(&x, &b.input_layernorm.weight, eps)?;
        let a = &b.self_attn;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous()?) };
        let q = heads(linear(&a.q_proj, &h)?, nh)?;
        let k = heads(linear(&a.k_proj, &h)?, nkv)?;
        let v = heads(linear(&a.v_proj, &h)?, nkv)?;
        let q = (q.broadcast_mul(&cos)? + rotate_half(&q)?.broadcast_mul(&sin)?)?;
        let k = (k.broadcast_mul(&cos)? + rotate_half(&k)?.broadcast_mul(&sin)?)?;
        // Grouped-query attention: repeat each key/value head for its query heads.
        let expand = |y: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(1)?.expand((nkv, rep, t, hd))?.reshape((nh, t, hd))?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let o = probs.matmul(&v)?.transpose(0, 1)?.reshape((t, nh * hd))?;
        x = (x + linear(&a.o_proj, &o)?)?;
        let h = rms_norm(&x, &b.post_attention_layernorm.weight, eps)?;
        let m = &b.mlp;
        let g = linear(&m.gate_proj, &h)?;
        let silu = (&g * candle_nn::ops::sigmoid(&g)?)?;
        x = (x + linear(&m.down_proj, &(silu * linear(&m.up_proj, &h)?)?)?)?;
    }
    let x = rms_norm(&x, &model.norm.weight, eps)?;
    linear(&model.lm_head, &x)
}

/// Mean cross-entropy of next-token prediction over positions whose label is not
/// [`IGNORE_INDEX`] (labels are shifted by one, as transformers does).
pub fn sft_loss(model: &Llama, ids: &[u32], labels: &[i64]) -> Result<Tensor> {
    if labels.len() != ids.len() {
        return Err(Error::Input(format!("{} labels for {} tokens", labels.len(), ids.len())));
    }
    let vocab = model.config.vocab_size as i64;
    if let Some((pos, &l)) = labels.iter().enumerate().skip(1).find(|(_, &l)| l != IGNORE_INDEX && !(0..vocab).contains(&l)) {
        return Err(Error::Input(format!("label {l} at position {pos} is outside the vocabulary")));
    }
    let ex = crate::data::Example { ids: ids.to_vec(), labels: labels.to_vec() };
    let (sum, n) = crate::trainer::example_loss_sum(model, &ex)?;
    if n == 0 {
        return Err(Error::Input("every label is ignored: nothing to learn from".into()));
    }
    Ok((sum / n as f64)?)
}
