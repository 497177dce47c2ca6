//! A [`crate::merge::BaseModel`] written as an HF model directory: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` (with the chat template),
//! `generation_config.json`.

use crate::error::Result;
use crate::merge::BaseModel;
use std::path::Path;

/// The dtype of the written safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfDType {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// float16.
    F16,
}

/// Writes `base` as an HF model directory at `out` (created; an existing non-empty
/// directory is refused).
pub fn write_hf(base: &BaseModel, out: &Path, dtype: HfDType) -> Result<()> {
    let _ = (base, out, dtype);
    Err(crate::Error::Invalid("write_hf: not implemented yet".into()))
}
