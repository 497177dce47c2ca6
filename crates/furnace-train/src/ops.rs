//! The frozen-base linear op: `y = x W^T (+ b)` whose backward returns the gradient with
//! respect to `x` only (`dy W`). It replaces a plain matmul in training because
//! - candle's `QMatMul` and our packed bf16 kernel have no backward at all: without this op,
//!   gradients to every layer below a quantized projection would silently be zero;
//! - candle's matmul backward always computes the weight gradient too, which a frozen weight
//!   never needs (time and memory wasted).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use furnace_model::{Linear, LinearWeight};
use std::sync::OnceLock;

/// A frozen [`Linear`] as a candle op with an input-only backward.
pub struct FrozenLinear {
    base: Linear,
    /// `W: [out, in]` in f32, dequantized on first use for quantized storages (and dropped
    /// with the op, so the model keeps only its compact copy).
    weight: OnceLock<Tensor>,
}

impl FrozenLinear {
    /// Wraps the base part of `linear` (an attached LoRA adapter is not included).
    pub fn new(linear: &Linear) -> Self {
        let mut base = linear.clone();
        base.lora = None;
        let weight = OnceLock::new();
        if let LinearWeight::Dense(w) = &base.weight {
            let _ = weight.set(w.clone());
        }
        Self { base, weight }
    }

    fn weight_f32(&self) -> candle_core::Result<Tensor> {
        if let Some(w) = self.weight.get() {
            return Ok(w.clone());
        }
        let w = match &self.base.weight {
            LinearWeight::Dense(w) => w.clone(),
            LinearWeight::Bf16(m) => Tensor::from_vec(m.to_f32(), (m.n, m.k), &candle_core::Device::Cpu)?,
            // The bf16 copy holds the file's values (the Q8_0 copy is a requantization).
            LinearWeight::Q8_0 { packed, .. } => Tensor::from_vec(packed.to_f32(), (packed.n, packed.k), &candle_core::Device::Cpu)?,
            LinearWeight::Quantized(q) => match q.as_ref() {
                candle_core::quantized::QMatMul::QTensor(t) => t.dequantize(&candle_core::Device::Cpu)?,
                candle_core::quantized::QMatMul::Tensor(t) | candle_core::quantized::QMatMul::TensorF16(t) => {
                    t.to_dtype(candle_core::DType::F32)?
                }
            },
        };
        let _ = self.weight.set(w.clone());
        Ok(w)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp) = layout.shape().dims2()?;
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("frozen-linear: input must be f32");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: input must be contiguous");
        };
        let data = v[a..b].to_vec();
        let x = Tensor::from_vec(data, (rows, inp), &candle_core::Device::Cpu)?;
        // Dequantize on the fly and multiply in f32 (QLoRA's approach): activations keep
        // full precision, so gradients through many quantized layers stay accurate.
        let mut y = x.matmul(&self.weight_f32()?.t()?)?;
        if let Some(b) = &self.base.bias {
            y = y.broadcast_add(b)?;
        }
        let out = y.dim(1)?;
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight_f32()?)?))
    }
}

/// `linear(x)` for training: the frozen base through [`FrozenLinear`], plus the attached
/// LoRA adapter through ordinary (differentiable) ops.
pub fn train_linear(l: &Linear, x: &Tensor) -> crate::Result<Tensor> {
    let y = x.contiguous()?.apply_op1(FrozenLinear::new(l))?;
    Ok(match &l.lora {
        Some(lora) => (y + lora.delta(x)?)?,
        None => y,
    })
}
