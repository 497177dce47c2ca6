//! Linear layers of the model, in one of three storage forms. Every projection of the model
//! goes through [`Linear::forward`], which is where LoRA adapters and the frozen-base
//! training op attach later without touching the model code.

use crate::error::Result;
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
    /// requantized to Q8_0 at load, which is near-lossless and several times faster.
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
    /// Dense `[out, in]`, f32 or bf16.
    Dense(Tensor),
    /// Block-quantized `[out, in]`.
    Quantized(Arc<QMatMul>),
}

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
            WeightDType::Bf16 => LinearWeight::Dense(raw.to_f32()?.to_dtype(DType::BF16)?),
            WeightDType::Quantized => {
                let q = match raw {
                    RawWeight::Quantized(q) if fast_cpu_kernel(q.dtype()) => q,
                    other if in_features % 32 == 0 => {
                        QTensor::quantize(&other.to_f32()?, GgmlDType::Q8_0)?
                    }
                    // Too narrow to block-quantize: keep it dense.
                    other => {
                        return Ok(Self {
                            weight: LinearWeight::Dense(other.to_f32()?),
                            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
                            in_features,
                            out_features,
                        })
                    }
                };
                LinearWeight::Quantized(Arc::new(QMatMul::from_qtensor(q)?))
            }
        };
        Ok(Self {
            weight,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            in_features,
            out_features,
        })
    }

    /// Applies the layer to `x: [rows, in]` (f32), returning `[rows, out]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 => x.matmul(&w.t()?)?,
            LinearWeight::Dense(w) => x
                .to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?,
            LinearWeight::Quantized(q) => q.forward(x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Bytes the weight occupies.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            },
        }
    }
}
