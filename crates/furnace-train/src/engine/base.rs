//! The frozen base model in the form the training pass multiplies with.
//!
//! Each group of projections that shares an input (q/k/v, gate/up, o, down, the LM head)
//! is a [`FrozenGroup`]. Two forms:
//! - f32 (`quantize = "none"`): candle's f32 GEMM, exact; the reference for the fixture
//!   tests.
//! - bf16 (bf16 or quantized bases): our bf16 kernel (AVX512-BF16, or AVX2 + FMA on
//!   weights widened in registers) with f32 accumulation, forward
//!   `x W^T` over the packed weight the model already holds, and backward `dy W` over a
//!   second packing of `W^T` built here (the concatenated weights of the group, so the
//!   whole group's input gradient is one product; the kernel blocks the reduction for the
//!   cache itself). Weights are never differentiated: the backward is the input gradient
//!   only.

use crate::error::Result;
use candle_core::{Device, Tensor};
use furnace_model::kernels::{self, Bf16Matrix};
use furnace_model::{Linear, LinearWeight, Llama, LlamaConfig};
use std::sync::Arc;

enum Form {
    /// f32 weights `[out, in]`, one per projection.
    F32(Vec<Tensor>),
    /// Packed bf16 weights for the forward, and the group's concatenated `W^T` packed for
    /// the backward (`[in, sum of outs]`).
    Bf16 { fwd: Vec<Arc<Bf16Matrix>>, bwd: Bf16Matrix },
}

/// Frozen projections that share an input.
pub struct FrozenGroup {
    /// Input width.
    pub inp: usize,
    /// Output width of each projection.
    pub outs: Vec<usize>,
    bias: Vec<Option<Vec<f32>>>,
    form: Form,
}

fn f32_values(l: &Linear) -> Result<Vec<f32>> {
    Ok(match &l.weight {
        LinearWeight::Dense(w) => w.flatten_all()?.to_vec1()?,
        LinearWeight::Bf16(m) => m.to_f32(),
        LinearWeight::Q8_0 { packed, .. } => packed.to_f32(),
        LinearWeight::Quantized(q) => match q.as_ref() {
            candle_core::quantized::QMatMul::QTensor(t) => t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?,
            candle_core::quantized::QMatMul::Tensor(t) | candle_core::quantized::QMatMul::TensorF16(t) => {
                t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?
            }
        },
    })
}

impl FrozenGroup {
    /// The base parts of `linears` (attached adapters are ignored). All-f32 layers keep the
    /// exact f32 form; anything else is multiplied in bf16 where the CPU has a SIMD bf16
    /// kernel (AVX512-BF16 or AVX2 + FMA), else dequantized to f32.
    pub fn new(linears: &[&Linear]) -> Result<Self> {
        Self::build(linears, kernels::has_bf16_simd())
    }

    /// [`FrozenGroup::new`] with the bf16 form allowed or not (tests force it on CPUs
    /// without a SIMD bf16 kernel, where the kernels run their portable twin).
    fn build(linears: &[&Linear], bf16_ok: bool) -> Result<Self> {
        let inp = linears.first().map(|l| l.in_features).unwrap_or(0);
        let outs: Vec<usize> = linears.iter().map(|l| l.out_features).collect();
        let bias =
            linears.iter().map(|l| l.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()).collect::<candle_core::Result<Vec<_>>>()?;
        let dense: Vec<Tensor> = linears
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeight::Dense(w) => Some(w.clone()),
                _ => None,
            })
            .collect();
        let form = if dense.len() == linears.len() {
            Form::F32(dense)
        } else if !bf16_ok {
            // Without AVX512-BF16 or AVX2 + FMA the bf16 kernels run their portable scalar
            // twin, about 100x slower than candle's f32 GEMM (measured 2026-12-01): keep f32
            // copies instead, trading memory for speed.
            let weights = linears
                .iter()
                .map(|l| Ok(Tensor::from_vec(f32_values(l)?, (l.out_features, l.in_features), &Device::Cpu)?))
                .collect::<Result<Vec<_>>>()?;
            Form::F32(weights)
        } else {
            let mut fwd = Vec::with_capacity(linears.len());
            let mut cat: Vec<f32> = Vec::new();
            for l in linears {
                let values = f32_values(l)?;
                fwd.push(match &l.weight {
                    LinearWeight::Bf16(m) => m.clone(),
                    LinearWeight::Q8_0 { packed, .. } => packed.clone(),
                    _ => Arc::new(Bf16Matrix::from_f32(&values, l.out_features, l.in_features)),
                });
                cat.extend_from_slice(&values);
            }
            let total: usize = outs.iter().sum();
            // W^T: [inp, total].
            let mut t = vec![0f32; inp * total];
            for r in 0..total {
                for c in 0..inp {
                    t[c * total + r] = cat[r * inp + c];
                }
            }
            Form::Bf16 { fwd, bwd: Bf16Matrix::from_f32(&t, inp, total) }
        };
        Ok(Self { inp, outs, bias, form })
    }

    /// `y_i = x W_i^T + b_i` for `x: [m, inp]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let mut ys = match &self.form {
            Form::F32(ws) => {
                let xt = Tensor::from_slice(x, (m, self.inp), &Device::Cpu)?;
                ws.iter().map(|w| Ok(xt.matmul(&w.t()?)?.flatten_all()?.to_vec1()?)).collect::<Result<Vec<_>>>()?
            }
            Form::Bf16 { fwd, .. } => {
                let ws: Vec<&Bf16Matrix> = fwd.iter().map(|w| w.as_ref()).collect();
                kernels::matmul_nt_many(x, m, &ws)
            }
        };
        for ((y, b), &n) in ys.iter_mut().zip(&self.bias).zip(&self.outs) {
            if let Some(b) = b {
                for row in y.chunks_mut(n) {
                    row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
                }
            }
        }
        Ok(ys)
    }

    /// The input gradient `sum_i dy_i W_i` (`[m, inp]`) for output gradients `dys[i]: [m, outs[i]]`.
    pub fn backward(&self, dys: &[&[f32]], m: usize) -> Result<Vec<f32>> {
        match &self.form {
            Form::F32(ws) => {
                let mut dx = vec![0f32; m * self.inp];
                for ((dy, w), &n) in dys.iter().zip(ws).zip(&self.outs) {
                    let d = Tensor::from_slice(dy, (m, n), &Device::Cpu)?.matmul(w)?.flatten_all()?.to_vec1::<f32>()?;
                    dx.iter_mut().zip(&d).for_each(|(o, v)| *o += v);
                }
                Ok(dx)
            }
            Form::Bf16 { bwd, .. } => {
                let total: usize = self.outs.iter().sum();
                // The output gradients side by side: [m, total].
                let cat: std::borrow::Cow<[f32]> = if dys.len() == 1 {
                    std::borrow::Cow::Borrowed(dys[0])
                } else {
                    let mut c = Vec::with_capacity(m * total);
                    for i in 0..m {
                        for (dy, &n) in dys.iter().zip(&self.outs) {
                            c.extend_from_slice(&dy[i * n..(i + 1) * n]);
                        }
                    }
                    std::borrow::Cow::Owned(c)
                };
                Ok(kernels::matmul_nt(&cat, m, bwd))
            }
        }
    }

    /// Whether this group multiplies in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.form, Form::Bf16 { .. })
    }

    /// Bytes of packed copies made for training (not shared with the model).
    pub fn extra_bytes(&self) -> usize {
        match &self.form {
            Form::F32(_) => 0,
            Form::Bf16 { bwd, .. } => bwd.bytes(),
        }
    }
}

/// One decoder layer of the frozen base.
pub struct FrozenLayer {
    /// Input RMSNorm weight.
    pub ln1: Vec<f32>,
    /// Post-attention RMSNorm weight.
    pub ln2: Vec<f32>,
    /// q, k, v projections.
    pub qkv: FrozenGroup,
    /// Output projection.
    pub o: FrozenGroup,
    /// gate and up projections.
    pub gate_up: FrozenGroup,
    /// Down projection.
    pub down: FrozenGroup,
}

/// The frozen base model as the training pass uses it. It shares the model's weight
/// storage (tensors and packed matrices are reference-counted) and adds only the packed
/// `W^T` copies of the bf16 backward.
pub struct FrozenBase {
    /// Model configuration.
    pub config: LlamaConfig,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<FrozenLayer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: FrozenGroup,
    pub(crate) inv_freq: Vec<f32>,
}

impl FrozenBase {
    /// Builds the frozen form of `model` (any attached adapter is ignored).
    pub fn new(model: &Llama) -> Result<Self> {
        let layers = model
            .layers
            .iter()
            .map(|b| {
                let (a, m) = (&b.self_attn, &b.mlp);
                Ok(FrozenLayer {
                    ln1: b.input_layernorm.weight.to_vec1()?,
                    ln2: b.post_attention_layernorm.weight.to_vec1()?,
                    qkv: FrozenGroup::new(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    o: FrozenGroup::new(&[&a.o_proj])?,
                    gate_up: FrozenGroup::new(&[&m.gate_proj, &m.up_proj])?,
                    down: FrozenGroup::new(&[&m.down_proj])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: model.config.clone(),
            embed: model.embed_tokens.clone(),
            layers,
            norm: model.norm.weight.to_vec1()?,
            lm_head: FrozenGroup::new(&[&model.lm_head])?,
            inv_freq: furnace_model::config::rope_inv_freq(&model.config),
        })
    }

    /// Whether the frozen GEMMs run in bf16 (else exact f32).
    pub fn is_bf16(&self) -> bool {
        self.lm_head.is_bf16()
    }

    /// Bytes of the packed backward copies made for training.
    pub fn extra_bytes(&self) -> usize {
        self.lm_head.extra_bytes()
            + self
                .layers
                .iter()
                .map(|l| l.qkv.extra_bytes() + l.o.extra_bytes() + l.gate_up.extra_bytes() + l.down.extra_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use furnace_model::kernels::{bf16_to_f32, f32_to_bf16};
    use furnace_model::{LoadedModel, WeightDType};

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s % 20_001) as f32 / 10_000.0) - 1.0
            })
            .collect()
    }

    /// The bf16 group (q/k/v: three widths in one packed `W^T`) against f64 products of
    /// the same bf16-stored weights and bf16-rounded inputs, forward and backward, on few
    /// rows (column-split tasks) and many (row-split tasks, partial register tiles).
    #[test]
    fn bf16_group_matches_f64_reference() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
        let model = LoadedModel::load(&dir, WeightDType::Bf16).unwrap();
        let a = &model.model.layers[0].self_attn;
        let linears = [&a.q_proj, &a.k_proj, &a.v_proj];
        let g = FrozenGroup::build(&linears, true).unwrap();
        assert!(g.is_bf16());
        let ws: Vec<Vec<f32>> = linears.iter().map(|l| f32_values(l).unwrap()).collect();
        let r = |v: f32| bf16_to_f32(f32_to_bf16(v)) as f64;
        for rows in [1usize, 5, 101] {
            let x = pseudo(rows * g.inp, 3 + rows as u64);
            let ys = g.forward(&x, rows).unwrap();
            let dys: Vec<Vec<f32>> = g.outs.iter().enumerate().map(|(i, &n)| pseudo(rows * n, 9 + i as u64)).collect();
            let refs: Vec<&[f32]> = dys.iter().map(|d| d.as_slice()).collect();
            let dx = g.backward(&refs, rows).unwrap();
            let inp = g.inp;
            let total: usize = g.outs.iter().sum();
            for ((w, y), &n) in ws.iter().zip(&ys).zip(&g.outs) {
                for i in 0..rows {
                    for o in 0..n {
                        let want: f64 = (0..inp).map(|c| r(x[i * inp + c]) * w[o * inp + c] as f64).sum();
                        let got = y[i * n + o] as f64;
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (inp as f64).sqrt(), "forward rows={rows} ({i},{o})");
                    }
                }
            }
            for i in 0..rows {
                for c in 0..inp {
                    let want: f64 = ws
                        .iter()
                        .zip(&dys)
                        .zip(&g.outs)
                        .map(|((w, dy), &n)| (0..n).map(|o| r(dy[i * n + o]) * w[o * inp + c] as f64).sum::<f64>())
                        .sum();
                    let got = dx[i * inp + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (total as f64).sqrt(),
                        "backward rows={rows} ({i},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
