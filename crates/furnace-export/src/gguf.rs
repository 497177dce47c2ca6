//! A [`crate::merge::BaseModel`] written as a GGUF file llama.cpp and furnace load.

use crate::error::Result;
use crate::merge::BaseModel;
use std::path::Path;

/// The storage type of the written GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    /// float16 everywhere.
    F16,
    /// 8-bit blocks.
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
    /// llama.cpp's Q4_K_M mixture (Q4_K, with Q6_K for the tensors llama.cpp keeps higher).
    Q4KM,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct GgufReport {
    /// Bytes of the file.
    pub bytes: u64,
    /// Tensors written, with their storage type, e.g. `("blk.0.attn_q.weight", "q8_0")`.
    pub tensors: Vec<(String, String)>,
}

/// Writes `base` as a GGUF file at `out` with weights stored as `quant`.
pub fn write_gguf(base: &BaseModel, out: &Path, quant: GgufQuant) -> Result<GgufReport> {
    let _ = (base, out, quant);
    Err(crate::Error::Invalid("write_gguf: not implemented yet".into()))
}
