//! A base model as f32 tensors under HF names, and LoRA adapters merged into it.

use crate::error::Result;
use furnace_model::{LlamaConfig, PeftAdapter};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a base came from: what the writers copy the tokenizer and metadata from.
#[derive(Debug, Clone)]
pub enum BaseOrigin {
    /// A `.gguf` file (its metadata holds the tokenizer and chat template).
    Gguf(PathBuf),
    /// An HF model directory (tokenizer files beside `config.json`).
    Hf(PathBuf),
}

/// A base model held as f32 tensors under HF names (`model.layers.0.self_attn.q_proj.weight`,
/// `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` when not tied), q and k
/// rows in HF's layout (llama.cpp's permutation undone).
pub struct BaseModel {
    /// Its configuration (`rope_style` as HF's half-split).
    pub config: LlamaConfig,
    /// Every weight, f32.
    pub tensors: BTreeMap<String, candle_core::Tensor>,
    /// Where it came from.
    pub origin: BaseOrigin,
    /// What the file stored, for the output to say what precision the merge holds
    /// (e.g. "q4_1 (dequantized to f32)", "bf16", "f32").
    pub source_precision: String,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Projections that received a delta.
    pub modules_merged: usize,
}

impl BaseModel {
    /// Reads a `.gguf` file or an HF model directory (quantized weights dequantized to f32).
    pub fn load(path: &Path) -> Result<Self> {
        let _ = path;
        Err(crate::Error::Invalid("BaseModel::load: not implemented yet".into()))
    }

    /// Adds `scale · B A` of every targeted projection of `adapter` (PEFT's
    /// `merge_and_unload`); an adapter whose shapes do not fit the base is refused.
    pub fn merge_adapter(&mut self, adapter: &PeftAdapter) -> Result<MergeReport> {
        let _ = adapter;
        Err(crate::Error::Invalid("BaseModel::merge_adapter: not implemented yet".into()))
    }
}
