//! Several LoRA adapters of one base combined into one, with PEFT's
//! `add_weighted_adapter` definitions: linear, cat, ties, dare_linear, dare_ties, svd.

use crate::error::Result;
use furnace_model::PeftAdapter;
use std::path::Path;

/// How the adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombineMethod {
    /// Weighted sum of the factors (same rank).
    Linear,
    /// Factors concatenated (rank = sum of ranks).
    Cat,
    /// TIES: trim to `density`, elect signs, disjoint merge.
    Ties,
    /// DARE: random drop to `density`, rescale, weighted sum.
    DareLinear,
    /// DARE then TIES' sign election.
    DareTies,
    /// The weighted sum of full deltas, truncated by SVD to a rank.
    Svd,
}

/// Options of [`combine`].
#[derive(Debug, Clone)]
pub struct CombineOptions {
    /// The method.
    pub method: CombineMethod,
    /// Fraction kept by ties / dare (PEFT's `density`).
    pub density: Option<f64>,
    /// The rank of the svd result (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random drop.
    pub seed: u64,
}

/// Combines `adapters` (each with its weight) into one adapter.
pub fn combine(adapters: &[(&PeftAdapter, f64)], opts: &CombineOptions) -> Result<PeftAdapter> {
    let _ = (adapters, opts);
    Err(crate::Error::Invalid("combine: not implemented yet".into()))
}

/// Writes `adapter` as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`) that PEFT and furnace load.
pub fn save_adapter(adapter: &PeftAdapter, dir: &Path) -> Result<()> {
    let _ = (adapter, dir);
    Err(crate::Error::Invalid("save_adapter: not implemented yet".into()))
}
