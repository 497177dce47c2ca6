//! Linear layers of the model, in one of three storage forms. Every projection of the model
//! goes through [`Linear::forward`] (or [`Linear::forward_many`]), which is also where LoRA
//! adapters apply: the base product runs once over all rows, then each registered adapter's
//! low-rank update is added to the rows that run with it ([`AdapterRows`]).

use crate::error::Result;
use crate::kernels::{self, Bf16Matrix};
use crate::lora::{AdapterId, AdapterRows, LoraWeights};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

/// How the weights of linear layers are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    /// Dequantized to float32: reproduces the reference implementations exactly.
    F32,
    /// Dequantized to bfloat16 (half the memory; activations stay float32).
    Bf16,
    /// Kept block-quantized; types without a fast CPU kernel (Q4_1, Q5_0, Q5_1) are
    /// requantized to Q8_0 at load for single-row decode (several times faster; about 1% of
    /// a weight's block maximum of extra error), while batches of rows use a bf16 copy of
    /// the exact stored values.
    Quantized,
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "quantized" | "q" => Ok(Self::Quantized),
            o => Err(format!("unknown dtype '{o}' (expected f32, bf16 or quantized)")),
        }
    }
}

/// A weight as read from a file, before it is placed in a [`Linear`].
pub enum RawWeight {
    /// Block-quantized (or f16/f32) GGUF tensor.
    Quantized(QTensor),
    /// A dense tensor (safetensors).
    Dense(Tensor),
}

impl RawWeight {
    /// Shape, outermost first.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            RawWeight::Quantized(q) => q.shape().dims().to_vec(),
            RawWeight::Dense(t) => t.dims().to_vec(),
        }
    }

    /// The weight as a float32 tensor.
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            RawWeight::Quantized(q) => q.dequantize(&Device::Cpu)?,
            RawWeight::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }
}

/// The storage of a linear layer's weight.
#[derive(Clone)]
pub enum LinearWeight {
    /// Dense f32 `[out, in]` (candle's GEMM; exact).
    Dense(Tensor),
    /// bf16 `[out, in]`, multiplied by our bf16 kernel (AVX512-BF16, or AVX2 + FMA).
    Bf16(Arc<Bf16Matrix>),
    /// Q8_0 `[out, in]` for single rows (memory-bound decode: candle's vector kernel reads
    /// 1 byte per weight), plus a packed bf16 copy of the weight as stored in the file for
    /// batches of rows (compute-bound: our bf16 kernel is several times faster there) and
    /// for training.
    Q8_0 {
        /// The quantized tensor.
        tensor: Arc<QTensor>,
        /// candle's matmul over it.
        qmm: QMatMul,
        /// The same weight, packed bf16.
        packed: Arc<Bf16Matrix>,
    },
    /// Other block-quantized types, through candle's kernels.
    Quantized(Arc<QMatMul>),
}

/// From this many rows on, Q8_0 layers use the packed bf16 kernel instead of candle's
/// per-row vector kernel (which re-reads the weight once per row).
pub const Q8_TILED_MIN_ROWS: usize = 2;

/// `y = x W^T (+ b)` for `x` of shape `[rows, in]`.
#[derive(Clone)]
pub struct Linear {
    /// The weight.
    pub weight: LinearWeight,
    /// Optional bias `[out]` (f32).
    pub bias: Option<Tensor>,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// The factors of every registered adapter that targets this layer, by adapter
    /// ([`crate::Llama::add_adapter`]).
    pub lora: Vec<(AdapterId, LoraWeights)>,
}

fn fast_cpu_kernel(t: GgmlDType) -> bool {
    matches!(
        t,
        GgmlDType::Q4_0
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::Q8K
    )
}

impl Linear {
    /// Builds a layer from a raw weight `[out, in]` in the requested storage.
    pub fn new(raw: RawWeight, bias: Option<Tensor>, dtype: WeightDType) -> Result<Self> {
        let dims = raw.dims();
        let (out_features, in_features) = (dims[0], dims[dims.len() - 1]);
        let weight = match dtype {
            WeightDType::F32 => LinearWeight::Dense(raw.to_f32()?),
            WeightDType::Bf16 => {
                let w = raw.to_f32()?.flatten_all()?.to_vec1::<f32>()?;
                LinearWeight::Bf16(Arc::new(Bf16Matrix::from_f32(&w, out_features, in_features)))
            }
            WeightDType::Quantized => {
                // The exact values as stored (before any requantization): the packed bf16
                // copy for batches is made from them, so prefill, batched decode and training
                // see the file's weights up to bf16 rounding.
                let exact = match &raw {
                    RawWeight::Quantized(q) if fast_cpu_kernel(q.dtype()) && q.dtype() != GgmlDType::Q8_0 => None,
                    other => Some(other.to_f32()?),
                };
                let q = match raw {
                    RawWeight::Quantized(q) if fast_cpu_kernel(q.dtype()) => q,
                    other if in_features % 32 == 0 => {
                        let w = match &exact {
                            Some(w) => w.clone(),
                            None => other.to_f32()?,
                        };
                        QTensor::quantize(&w, GgmlDType::Q8_0)?
                    }
                    // Too narrow to block-quantize: keep it dense.
                    other => {
                        return Ok(Self {
                            weight: LinearWeight::Dense(other.to_f32()?),
                            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
                            in_features,
                            out_features,
                            lora: Vec::new(),
                        })
                    }
                };
                if q.dtype() == GgmlDType::Q8_0 && kernels::has_bf16_simd() {
                    let w = match exact {
                        Some(w) => w,
                        None => q.dequantize(&Device::Cpu)?,
                    };
                    let w = w.flatten_all()?.to_vec1::<f32>()?;
                    let packed = Arc::new(Bf16Matrix::from_f32(&w, out_features, in_features));
                    let tensor = Arc::new(q);
                    let qmm = QMatMul::from_arc(tensor.clone())?;
                    LinearWeight::Q8_0 { tensor, qmm, packed }
                } else {
                    LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(q)?))
                }
            }
        };
        Ok(Self { weight, bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?, in_features, out_features, lora: Vec::new() })
    }

    /// Applies the layer to `x: [rows, in]` (f32), returning `[rows, out]` (f32); each
    /// adapter of `adapters` that targets this layer adds its update to its own rows.
    pub fn forward(&self, x: &Tensor, adapters: &AdapterRows) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Bf16(w) => self.packed(x, rows, w)?,
            LinearWeight::Q8_0 { qmm, .. } if rows < Q8_TILED_MIN_ROWS => qmm.forward(x)?,
            LinearWeight::Q8_0 { packed, .. } => self.packed(x, rows, packed)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        if !adapters.touches(&self.lora) {
            return Ok(y);
        }
        let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
        adapters.add_updates(&self.lora, x, &mut ys, self.out_features)?;
        Ok(Tensor::from_vec(ys, (rows, self.out_features), x.device())?)
    }

    /// The packed bf16 weight this layer multiplies batches of `rows` with, if any.
    fn packed_for(&self, rows: usize) -> Option<&Bf16Matrix> {
        match &self.weight {
            LinearWeight::Bf16(w) => Some(w),
            LinearWeight::Q8_0 { packed, .. } if rows >= Q8_TILED_MIN_ROWS => Some(packed),
            _ => None,
        }
    }

    /// Applies several layers to the same input, returning each output as a row-major
    /// `Vec` (`[rows, out]`), with adapters as in [`Linear::forward`]. When all of them use
    /// the packed kernel, the input is converted once and the products share one parallel
    /// region.
    pub fn forward_many(x: &Tensor, layers: &[&Linear], adapters: &AdapterRows) -> Result<Vec<Vec<f32>>> {
        let rows = x.dim(0)?;
        let packed: Option<Vec<&Bf16Matrix>> = layers.iter().map(|l| l.packed_for(rows)).collect();
        match packed {
            Some(ws) if layers.len() > 1 => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut ys = kernels::matmul_nt_many(&xs, rows, &ws);
                for (y, l) in ys.iter_mut().zip(layers) {
                    if let Some(b) = &l.bias {
                        let b = b.to_vec1::<f32>()?;
                        for row in y.chunks_mut(l.out_features) {
                            row.iter_mut().zip(&b).for_each(|(o, v)| *o += v);
                        }
                    }
                    adapters.add_updates(&l.lora, x, y, l.out_features)?;
                }
                Ok(ys)
            }
            _ => layers.iter().map(|l| Ok(l.forward(x, adapters)?.flatten_all()?.to_vec1::<f32>()?)).collect(),
        }
    }

    fn packed(&self, x: &Tensor, rows: usize, w: &Bf16Matrix) -> Result<Tensor> {
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let y = kernels::matmul_nt(&xs, rows, w);
        Ok(Tensor::from_vec(y, (rows, self.out_features), x.device())?)
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Bf16(w) => w.bytes(),
            LinearWeight::Q8_0 { tensor, packed, .. } => tensor.storage_size_in_bytes() + packed.bytes(),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
            },
        }
    }
}
