//! Several LoRA adapters of one base combined into one, with PEFT's
//! `add_weighted_adapter` definitions (PEFT 0.21, `peft/tuners/lora/model.py` and
//! `peft/utils/merge_utils.py`): linear, cat, ties, dare_linear, dare_ties, magnitude_prune,
//! svd and the `*_svd` variants.
//!
//! For each targeted module, with adapter `i`'s factors `Aᵢ: [rᵢ, in]`, `Bᵢ: [out, rᵢ]`, scale
//! `sᵢ = alphaᵢ / rᵢ` and weight `wᵢ`:
//! - **linear, ties, dare_linear, dare_ties, magnitude_prune** (equal ranks): the factors are
//!   merged separately, `A = merge(Aᵢ, sign(wᵢsᵢ)·√|wᵢsᵢ|)` and `B = merge(Bᵢ, √|wᵢsᵢ|)`,
//!   where `merge` is task arithmetic `Σ wᵢ tᵢ` (linear), magnitude pruning to `density`
//!   then task arithmetic (magnitude_prune), random pruning with rescale `tᵢ·maskᵢ/density`
//!   then task arithmetic (dare_linear), or TIES: prune (by magnitude, or DARE's random
//!   drop for dare_ties), elect a sign per entry from the pruned unweighted tensors (`total`:
//!   sign of their sum; `frequency`: sign of the sum of signs; ties go to +), then average the
//!   weighted entries that agree with it (`Σ wᵢtᵢ·agreeᵢ / max(1, Σ agreeᵢ)`).
//! - **cat**: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ | B₂ | …]`, rank `Σ rᵢ`; exact.
//! - **svd** (and ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd): the full
//!   deltas `Δᵢ = sᵢ Bᵢ Aᵢ` merged with the weights as above (no square roots), then the best
//!   rank-`svd_rank` approximation (default: the largest input rank): `B = U_k diag(S_k)`,
//!   `A = V_kᵀ`, optionally clamped to the `svd_clamp` quantile of their entries. Plain svd
//!   never forms `Δ` (see [`crate::svd`]); the pruned variants do. An SVD leaves each singular
//!   pair's sign free: furnace makes the largest entry of each `A` row positive. `B·A` does
//!   not depend on it, but the clamp's quantile does, so a clamped result equals PEFT's only
//!   up to those signs (PEFT's follow torch's LAPACK driver); see [`clamp_svd_factors`].
//!
//! The new adapter has PEFT's config: the first adapter's, with `r` the new rank,
//! `lora_alpha = r` (scale 1: the input scales are folded into the factors), the union of
//! the target modules, no rank/alpha patterns. One deliberate difference: PEFT keeps the first
//! adapter's `use_rslora`, which would scale a combination of rsLoRA adapters by `√r` on top
//! of the folded scales; furnace writes `use_rslora: false`, so the adapter means what was
//! computed. With a single adapter PEFT always uses linear; so does furnace.
//!
//! DARE's random drop uses furnace's seeded RNG ([`furnace_model::rng::Rng`]), one stream per
//! module, factor and adapter, so results do not depend on thread scheduling; torch's
//! Bernoulli draws cannot be reproduced, so the tests feed the masks PEFT drew through
//! [`combine_with_masks`].

use crate::error::{io_err, Error, Result};
use crate::svd::{canonical_signs, complete_rows, low_rank_truncated_svd, truncated_svd, Mat};
use candle_core::{DType, Device, Tensor};
use furnace_model::lora::TARGETS;
use furnace_model::rng::Rng;
use furnace_model::PeftAdapter;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

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
    /// Magnitude pruning to `density`, then a weighted sum of the factors (same rank).
    MagnitudePrune,
    /// TIES on the full deltas, then SVD truncation.
    TiesSvd,
    /// DARE linear on the full deltas, then SVD truncation.
    DareLinearSvd,
    /// DARE TIES on the full deltas, then SVD truncation.
    DareTiesSvd,
    /// Magnitude pruning on the full deltas, then SVD truncation.
    MagnitudePruneSvd,
}

impl CombineMethod {
    /// Every method, in PEFT's order of the docs.
    pub const ALL: [CombineMethod; 11] = [
        Self::Linear,
        Self::Cat,
        Self::Ties,
        Self::DareLinear,
        Self::DareTies,
        Self::Svd,
        Self::MagnitudePrune,
        Self::TiesSvd,
        Self::DareLinearSvd,
        Self::DareTiesSvd,
        Self::MagnitudePruneSvd,
    ];

    /// PEFT's name (`dare_linear`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Ties => "ties",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::Svd => "svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::TiesSvd => "ties_svd",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether every adapter must have the same rank (the factor-wise methods).
    pub fn needs_equal_ranks(self) -> bool {
        matches!(self, Self::Linear | Self::Ties | Self::DareLinear | Self::DareTies | Self::MagnitudePrune)
    }

    /// Whether `density` is used (and required).
    pub fn uses_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }

    /// Whether the result is an SVD truncation (`svd_rank`, `svd_clamp` apply).
    pub fn is_svd(self) -> bool {
        matches!(self, Self::Svd | Self::TiesSvd | Self::DareLinearSvd | Self::DareTiesSvd | Self::MagnitudePruneSvd)
    }

    /// Whether the majority sign method applies.
    pub fn uses_sign_election(self) -> bool {
        matches!(self, Self::Ties | Self::DareTies | Self::TiesSvd | Self::DareTiesSvd)
    }

    /// Whether DARE's random drop is used (`seed` applies).
    pub fn is_random(self) -> bool {
        matches!(self, Self::DareLinear | Self::DareTies | Self::DareLinearSvd | Self::DareTiesSvd)
    }

    /// The rule applied to each group of tensors (factors, or deltas for the svd family).
    fn merge_rule(self) -> Rule {
        match self {
            Self::Linear | Self::Svd | Self::Cat => Rule::TaskArithmetic,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Rule::MagnitudePrune,
            Self::Ties | Self::TiesSvd => Rule::Ties,
            Self::DareLinear | Self::DareLinearSvd => Rule::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Rule::DareTies,
        }
    }
}

impl fmt::Display for CombineMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CombineMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL.into_iter().find(|m| m.name() == norm).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            Error::Invalid(format!("unknown combination method '{s}': expected one of {}", names.join(", ")))
        })
    }
}

/// How TIES elects the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the pruned values (PEFT's default).
    #[default]
    Total,
    /// The sign of the sum of their signs (a vote).
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(Error::Invalid(format!("unknown majority sign method '{s}': expected total or frequency"))),
        }
    }
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
    /// Quantile (in `[0, 1]`) at which the svd factors are clamped (PEFT's `svd_clamp`;
    /// default: no clamping).
    pub svd_clamp: Option<f64>,
    /// TIES' sign election (PEFT's `majority_sign_method`, default total).
    pub majority_sign: MajoritySign,
}

impl CombineOptions {
    /// Options for `method` with PEFT's defaults (no density, svd rank = largest input
    /// rank, no clamping, total sign election) and seed 0.
    pub fn new(method: CombineMethod) -> Self {
        Self { method, density: None, svd_rank: None, seed: 0, svd_clamp: None, majority_sign: MajoritySign::Total }
    }
}

impl Default for CombineOptions {
    /// PEFT's default method is svd.
    fn default() -> Self {
        Self::new(CombineMethod::Svd)
    }
}

/// Which tensor a DARE mask drops entries of: adapter `adapter`'s (its index in the list
/// given to [`combine`]) `part` (`lora_A`, `lora_B`, or `delta` for the svd family) of the
/// module whose PEFT key prefix is `module` (e.g. `base_model.model.model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskKey<'a> {
    /// The module's key prefix.
    pub module: &'a str,
    /// `lora_A`, `lora_B` or `delta`.
    pub part: &'static str,
    /// The adapter's index.
    pub adapter: usize,
}

impl fmt::Display for MaskKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.module, self.part, self.adapter)
    }
}

/// Where DARE's keep-masks come from.
pub trait MaskSource: Sync {
    /// `len` booleans (row-major over the tensor), `true` = kept.
    fn mask(&self, key: &MaskKey<'_>, len: usize, density: f64) -> Result<Vec<bool>>;
}

/// Bernoulli(`density`) masks from furnace's seeded RNG: one stream per [`MaskKey`], seeded
/// from `seed` and the key, so a seed gives the same masks on every machine and thread count.
#[derive(Debug, Clone, Copy)]
pub struct SeededMasks {
    /// The seed.
    pub seed: u64,
}

impl MaskSource for SeededMasks {
    fn mask(&self, key: &MaskKey<'_>, len: usize, density: f64) -> Result<Vec<bool>> {
        // FNV-1a of the key, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.to_string().bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = Rng::new(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ h);
        Ok((0..len).map(|_| rng.next_f64() < density).collect())
    }
}

/// Masks given as tensors keyed by [`MaskKey`]'s display form (nonzero = kept), e.g. the
/// masks torch drew, recorded by the fixture script.
#[doc(hidden)]
pub struct TensorMasks(pub HashMap<String, Tensor>);

impl MaskSource for TensorMasks {
    fn mask(&self, key: &MaskKey<'_>, len: usize, _density: f64) -> Result<Vec<bool>> {
        let name = key.to_string();
        let t = self.0.get(&name).ok_or_else(|| Error::Invalid(format!("no DARE mask '{name}' given")))?;
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if v.len() != len {
            return Err(Error::Invalid(format!("DARE mask '{name}' has {} entries, expected {len}", v.len())));
        }
        Ok(v.into_iter().map(|x| x != 0.0).collect())
    }
}

/// Combines `adapters` (each with its weight) into one adapter.
pub fn combine(adapters: &[(&PeftAdapter, f64)], opts: &CombineOptions) -> Result<PeftAdapter> {
    combine_with_masks(adapters, opts, &SeededMasks { seed: opts.seed })
}

/// [`combine`] with DARE's masks taken from `masks` (the tests give it the masks torch drew).
#[doc(hidden)]
pub fn combine_with_masks(adapters: &[(&PeftAdapter, f64)], opts: &CombineOptions, masks: &dyn MaskSource) -> Result<PeftAdapter> {
    let first = adapters.first().ok_or_else(|| Error::Invalid("combine: no adapters given".into()))?.0;
    // PEFT: "if there is only one adapter, we can only use linear merging".
    let method = if adapters.len() == 1 { CombineMethod::Linear } else { opts.method };
    for (i, (_, w)) in adapters.iter().enumerate() {
        if !w.is_finite() {
            return Err(Error::Invalid(format!("the weight of adapter {} is {w}: weights must be finite numbers", i + 1)));
        }
    }
    let ranks: Vec<usize> = adapters.iter().map(|(a, _)| a.config.r).collect();
    let density = check_density(method, opts.density)?;
    let new_rank = new_rank(method, &ranks, opts.svd_rank)?;
    if let Some(q) = opts.svd_clamp {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::Invalid(format!("svd clamp quantile {q} must be within [0, 1]")));
        }
    }
    let modules = collect_modules(adapters)?;
    if method.is_svd() {
        // Checked here, in key order, so the error names the same module every time.
        for (prefix, present) in &modules {
            let (out, inp) = (present[0].b.rows, present[0].a.cols);
            if new_rank > out.min(inp) {
                return Err(Error::Invalid(format!(
                    "svd rank {new_rank} is larger than {prefix} allows: its delta is [{out} x {inp}], so the rank is at most {}",
                    out.min(inp)
                )));
            }
        }
    }

    let results: Vec<(String, Mat, Mat)> = modules
        .par_iter()
        .map(|(prefix, present)| {
            let (a, b) = combine_module(prefix, present, method, density, new_rank, opts, masks)?;
            Ok((prefix.clone(), a, b))
        })
        .collect::<Result<_>>()?;

    let mut tensors = HashMap::new();
    for (prefix, a, b) in results {
        tensors.insert(format!("{prefix}.lora_A.weight"), to_tensor(&a)?);
        tensors.insert(format!("{prefix}.lora_B.weight"), to_tensor(&b)?);
    }
    let mut targets: BTreeSet<String> = BTreeSet::new();
    for (a, _) in adapters {
        targets.extend(a.config.targets());
    }
    let mut config = first.config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f64;
    config.target_modules = targets.into_iter().collect();
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    config.use_rslora = false;
    Ok(PeftAdapter { config, tensors })
}

/// PEFT's `density` rules: required by the pruning methods, `>= 0`; `1` keeps everything.
fn check_density(method: CombineMethod, density: Option<f64>) -> Result<f64> {
    if !method.uses_density() {
        return Ok(1.0);
    }
    let d = density.ok_or_else(|| {
        Error::Invalid(format!(
            "the {method} combination needs a density (the fraction of entries each adapter keeps, in (0, 1], e.g. 0.5)"
        ))
    })?;
    // PEFT accepts 0 (DARE then divides by it: NaN) and > 1 (no pruning, with a warning);
    // both are refused here as what they almost certainly are, a mistake.
    if !(d.is_finite() && d > 0.0 && d <= 1.0) {
        return Err(Error::Invalid(format!("density {d} is out of range: it is the fraction of entries kept, within (0, 1]")));
    }
    Ok(d)
}

/// PEFT's `_check_add_weighted_adapter`: the new rank and the rank rules.
fn new_rank(method: CombineMethod, ranks: &[usize], svd_rank: Option<usize>) -> Result<usize> {
    let max = ranks.iter().copied().max().unwrap_or(0);
    if method.needs_equal_ranks() {
        if ranks.iter().any(|&r| r != ranks[0]) {
            let list: Vec<String> = ranks.iter().enumerate().map(|(i, r)| format!("adapter {} has r = {r}", i + 1)).collect();
            return Err(Error::Invalid(format!(
                "the {method} combination needs adapters of one rank, but {}: use cat or svd, which combine different ranks",
                list.join(", ")
            )));
        }
        return Ok(ranks[0]);
    }
    if method == CombineMethod::Cat {
        return Ok(ranks.iter().sum());
    }
    match svd_rank {
        Some(0) => Err(Error::Invalid("the svd rank must be at least 1".into())),
        Some(k) => Ok(k),
        None => Ok(max),
    }
}

/// One adapter's factors of one module, with its index and weight.
struct Factors {
    adapter: usize,
    weight: f64,
    scale: f64,
    a: Mat,
    b: Mat,
}

/// The modules of all adapters (by PEFT key prefix, sorted), each with the adapters that
/// target it; checks that their shapes agree.
fn collect_modules(adapters: &[(&PeftAdapter, f64)]) -> Result<BTreeMap<String, Vec<Factors>>> {
    let mut modules: BTreeMap<String, Vec<Factors>> = BTreeMap::new();
    for (i, (adapter, weight)) in adapters.iter().enumerate() {
        let r = adapter.config.r;
        for key in adapter.tensors.keys() {
            let Some(prefix) = key.strip_suffix(".lora_A.weight") else {
                if key.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(Error::Invalid(format!(
                    "adapter {} holds '{key}', which is not a LoRA factor: combine handles lora_A / lora_B weights only",
                    i + 1
                )));
            };
            let b_key = format!("{prefix}.lora_B.weight");
            let a = to_mat(&adapter.tensors[key], key)?;
            let b = to_mat(
                adapter.tensors.get(&b_key).ok_or_else(|| Error::Invalid(format!("adapter {} has '{key}' but no '{b_key}'", i + 1)))?,
                &b_key,
            )?;
            if a.rows != r || b.cols != r {
                return Err(Error::Invalid(format!(
                    "adapter {}: {prefix} has factors of rank {} / {} but its config says r = {r}",
                    i + 1,
                    a.rows,
                    b.cols
                )));
            }
            modules.entry(prefix.to_string()).or_default().push(Factors {
                adapter: i,
                weight: *weight,
                scale: adapter.config.scale(),
                a,
                b,
            });
        }
        for key in adapter.tensors.keys() {
            if let Some(prefix) = key.strip_suffix(".lora_B.weight") {
                if !adapter.tensors.contains_key(&format!("{prefix}.lora_A.weight")) {
                    return Err(Error::Invalid(format!("adapter {} has '{key}' but no lora_A for that module", i + 1)));
                }
            }
        }
    }
    for (prefix, present) in modules.iter_mut() {
        present.sort_by_key(|f| f.adapter);
        let (out, inp) = (present[0].b.rows, present[0].a.cols);
        for f in present.iter() {
            if f.b.rows != out || f.a.cols != inp {
                return Err(Error::Invalid(format!(
                    "{prefix}: adapter {} is for a [{} x {}] projection but adapter {} for a [{out} x {inp}] one: \
                     the adapters were trained on different base models",
                    f.adapter + 1,
                    f.b.rows,
                    f.a.cols,
                    present[0].adapter + 1
                )));
            }
        }
    }
    Ok(modules)
}

/// The new `(A, B)` of one module.
fn combine_module(
    prefix: &str,
    present: &[Factors],
    method: CombineMethod,
    density: f64,
    new_rank: usize,
    opts: &CombineOptions,
    masks: &dyn MaskSource,
) -> Result<(Mat, Mat)> {
    let (out, inp) = (present[0].b.rows, present[0].a.cols);
    let rule = method.merge_rule();
    let ctx = |part: &'static str| MergeCtx { module: prefix, part, rule, density, sign: opts.majority_sign, masks };
    match method {
        CombineMethod::Cat => {
            // A = [w₁s₁A₁; …], B = [B₁ | …], zero-padded to the total rank where an adapter
            // does not target this module (as PEFT leaves the slot it never fills).
            let mut a = Mat::zeros(new_rank, inp);
            let mut b = Mat::zeros(out, new_rank);
            let mut row = 0;
            for f in present {
                let ws = f.weight * f.scale;
                for r in 0..f.a.rows {
                    for c in 0..inp {
                        *a.at_mut(row + r, c) = f.a.at(r, c) * ws;
                    }
                    for o in 0..out {
                        *b.at_mut(o, row + r) = f.b.at(o, r);
                    }
                }
                row += f.a.rows;
            }
            Ok((a, b))
        }
        m if m.is_svd() => {
            let (mut us, mut vt) = if m == CombineMethod::Svd {
                // Σ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ | …] · [A₁; …]: never formed.
                let total: usize = present.iter().map(|f| f.a.rows).sum();
                let mut p = Mat::zeros(out, total);
                let mut q = Mat::zeros(total, inp);
                let mut col = 0;
                for f in present {
                    let ws = f.weight * f.scale;
                    for r in 0..f.a.rows {
                        for o in 0..out {
                            *p.at_mut(o, col + r) = f.b.at(o, r) * ws;
                        }
                        q.data[(col + r) * inp..(col + r + 1) * inp].copy_from_slice(f.a.row(r));
                    }
                    col += f.a.rows;
                }
                let (us, vt, _) = low_rank_truncated_svd(&p, &q, new_rank);
                pad_rank(us, vt, new_rank)
            } else {
                let deltas: Vec<(usize, f64, Mat)> = present
                    .iter()
                    .map(|f| {
                        let mut d = f.b.matmul(&f.a);
                        d.data.iter_mut().for_each(|x| *x *= f.scale);
                        (f.adapter, f.weight, d)
                    })
                    .collect();
                let delta = merge_tensors(&ctx("delta"), &deltas)?;
                let (us, vt, _) = truncated_svd(&delta, new_rank);
                (us, vt)
            };
            // Deterministic signs (they matter to the clamp's quantile; see `clamp_svd_factors`).
            canonical_signs(&mut us, &mut vt);
            if let Some(q) = opts.svd_clamp {
                clamp_quantile(&mut us, &mut vt, q);
            }
            Ok((vt, us))
        }
        _ => {
            // PEFT: the weight (times the scale) split as √|ws| over both factors, its sign on A.
            let split = |f: &Factors| {
                let ws = f.weight * f.scale;
                (ws.abs().sqrt() * if ws >= 0.0 { 1.0 } else { -1.0 }, ws.abs().sqrt())
            };
            let a_in: Vec<(usize, f64, Mat)> = present.iter().map(|f| (f.adapter, split(f).0, f.a.clone())).collect();
            let b_in: Vec<(usize, f64, Mat)> = present.iter().map(|f| (f.adapter, split(f).1, f.b.clone())).collect();
            let a = merge_tensors(&ctx("lora_A"), &a_in)?;
            let b = merge_tensors(&ctx("lora_B"), &b_in)?;
            Ok((a, b))
        }
    }
}

/// `us: m × k'`, `vt: k' × n` padded to rank `k` when the factored delta's rank is below `k`:
/// zero `us` columns and orthonormal completion rows in `vt`, as PEFT's extra singular
/// vectors (zero singular values: the product is the same, and `A` keeps orthonormal rows).
fn pad_rank(us: Mat, vt: Mat, k: usize) -> (Mat, Mat) {
    if us.cols >= k {
        return (us, vt);
    }
    let mut us2 = Mat::zeros(us.rows, k);
    for r in 0..us.rows {
        us2.data[r * k..r * k + us.cols].copy_from_slice(us.row(r));
    }
    let mut vt2 = Mat::zeros(k, vt.cols);
    vt2.data[..vt.data.len()].copy_from_slice(&vt.data);
    complete_rows(&mut vt2);
    (us2, vt2)
}

/// PEFT's `svd_clamp`: both factors clamped to `[-h, h]`, `h` the `q` quantile (linear
/// interpolation, as `torch.quantile`) of all their entries together.
fn clamp_quantile(us: &mut Mat, vt: &mut Mat, q: f64) {
    let mut all: Vec<f64> = us.data.iter().chain(&vt.data).copied().collect();
    if all.is_empty() {
        return;
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (all.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi_i = pos.ceil() as usize;
    let hi = all[lo] + (all[hi_i] - all[lo]) * (pos - lo as f64);
    let lo_val = -hi;
    for x in us.data.iter_mut().chain(vt.data.iter_mut()) {
        // torch.clamp(x, min, max) = min(max(x, min), max).
        *x = x.max(lo_val).min(hi);
    }
}

/// PEFT's `svd_clamp` applied to svd factors `a = Vh` (`k × in`) and `b = U·S` (`out × k`):
/// both clamped to `[-h, h]`, `h` the `q` quantile of all their entries together.
///
/// The quantile depends on the signs of the singular vectors, which an SVD leaves free
/// (PEFT's follow whatever LAPACK driver torch uses; furnace makes the largest entry of each
/// `A` row positive), so a clamped combination matches PEFT's exactly only once the signs
/// agree: the tests align them and call this.
#[doc(hidden)]
pub fn clamp_svd_factors(a: &Tensor, b: &Tensor, q: f64) -> Result<(Tensor, Tensor)> {
    let (mut vt, mut us) = (to_mat(a, "lora_A")?, to_mat(b, "lora_B")?);
    clamp_quantile(&mut us, &mut vt, q);
    Ok((to_tensor(&vt)?, to_tensor(&us)?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    TaskArithmetic,
    MagnitudePrune,
    Ties,
    DareLinear,
    DareTies,
}

struct MergeCtx<'a> {
    module: &'a str,
    part: &'static str,
    rule: Rule,
    density: f64,
    sign: MajoritySign,
    masks: &'a dyn MaskSource,
}

/// PEFT's merge_utils on `(adapter index, weight, tensor)` of one module part.
fn merge_tensors(ctx: &MergeCtx<'_>, tensors: &[(usize, f64, Mat)]) -> Result<Mat> {
    let (rows, cols) = (tensors[0].2.rows, tensors[0].2.cols);
    // Sparsify (PEFT's `prune`: density >= 1 leaves the tensor as it is).
    let pruned: Vec<Vec<f64>> = tensors
        .iter()
        .map(|(adapter, _, t)| {
            if ctx.density >= 1.0 {
                return Ok(t.data.clone());
            }
            match ctx.rule {
                Rule::TaskArithmetic => Ok(t.data.clone()),
                Rule::MagnitudePrune | Rule::Ties => Ok(magnitude_prune(&t.data, ctx.density)),
                Rule::DareLinear | Rule::DareTies => {
                    let key = MaskKey { module: ctx.module, part: ctx.part, adapter: *adapter };
                    let mask = ctx.masks.mask(&key, t.data.len(), ctx.density)?;
                    Ok(t.data.iter().zip(mask).map(|(x, keep)| if keep { x / ctx.density } else { 0.0 }).collect())
                }
            }
        })
        .collect::<Result<_>>()?;
    let mut out = Mat::zeros(rows, cols);
    match ctx.rule {
        Rule::TaskArithmetic | Rule::MagnitudePrune | Rule::DareLinear => {
            for ((_, w, _), p) in tensors.iter().zip(&pruned) {
                out.data.iter_mut().zip(p).for_each(|(o, x)| *o += w * x);
            }
        }
        Rule::Ties | Rule::DareTies => {
            for (j, o) in out.data.iter_mut().enumerate() {
                // Elect the sign from the pruned, unweighted values.
                let magnitude: f64 = match ctx.sign {
                    MajoritySign::Total => pruned.iter().map(|p| p[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|p| sign(p[j])).sum(),
                };
                let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
                let mut sum = 0.0;
                let mut count = 0.0;
                for ((_, w, _), p) in tensors.iter().zip(&pruned) {
                    if sign(p[j]) == majority {
                        sum += w * p[j];
                        count += 1.0;
                    }
                }
                *o = sum / f64::max(count, 1.0);
            }
        }
    }
    Ok(out)
}

/// torch.sign: -1, 0 or 1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// PEFT's `magnitude_based_pruning`: keeps the `int(density · n)` entries of largest
/// magnitude (ties broken by position), zeroes the rest.
fn magnitude_prune(t: &[f64], density: f64) -> Vec<f64> {
    let k = ((density * t.len() as f64) as usize).min(t.len());
    let mut out = vec![0.0; t.len()];
    if k == 0 {
        return out;
    }
    let mut order: Vec<usize> = (0..t.len()).collect();
    // A total order (magnitude descending, then position), so the k first are well defined.
    order.select_nth_unstable_by(k - 1, |&i, &j| t[j].abs().total_cmp(&t[i].abs()).then(i.cmp(&j)));
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

fn to_mat(t: &Tensor, key: &str) -> Result<Mat> {
    let dims = t.dims();
    if dims.len() != 2 {
        return Err(Error::Invalid(format!("'{key}' has shape {dims:?}, expected a 2-d LoRA factor")));
    }
    let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat { rows: dims[0], cols: dims[1], data })
}

fn to_tensor(m: &Mat) -> Result<Tensor> {
    let v: Vec<f32> = m.data.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, (m.rows, m.cols), &Device::Cpu)?)
}

/// The `base_model_name_or_path` recorded in a PEFT adapter directory's
/// `adapter_config.json` (`None` when absent or null).
pub fn adapter_base_model(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    Ok(v.get("base_model_name_or_path").and_then(|b| b.as_str()).filter(|s| !s.trim().is_empty()).map(str::to_string))
}

/// A base model name reduced to what identifies the model: the last path component,
/// lowercased, without `.gguf` / `.safetensors` and without quantization or format tags
/// (`-q4_k_m`, `.Q8_0`, `-f16`, `-gguf`, …). `HuggingFaceTB/SmolLM2-135M-Instruct` and
/// `smollm2-135m-instruct-q4_1.gguf` both give `smollm2-135m-instruct`.
pub fn base_identity(name: &str) -> String {
    let trimmed = name.trim().trim_end_matches(['/', '\\']);
    let last = trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed).to_ascii_lowercase();
    let mut s = last.trim_end_matches(".gguf").trim_end_matches(".safetensors").to_string();
    // Tags after the last '-' or '.': q4_1, q4_k_m, iq2_xs, f16, bf16, gguf, …
    while let Some(pos) = s.rfind(['-', '.']) {
        let tag = &s[pos + 1..];
        let t = tag.strip_prefix('i').unwrap_or(tag);
        let is_quant = t.len() >= 2 && t.starts_with('q') && t.as_bytes()[1].is_ascii_digit();
        let is_fmt = matches!(tag, "gguf" | "f16" | "f32" | "bf16" | "fp16" | "fp32");
        if (is_quant || is_fmt) && pos > 0 {
            s.truncate(pos);
        } else {
            break;
        }
    }
    s
}

/// Checks that the adapters (each `(label, base_model_name_or_path)`) were trained on one
/// base, compared loosely with [`base_identity`]; adapters that do not record a base are not
/// compared. Returns the first recorded base (what the combined adapter records).
pub fn check_same_base(bases: &[(String, Option<String>)]) -> Result<Option<String>> {
    let recorded: Vec<(&String, &String)> = bases.iter().filter_map(|(l, b)| b.as_ref().map(|b| (l, b))).collect();
    if let Some((l0, b0)) = recorded.first() {
        for (l, b) in &recorded[1..] {
            if base_identity(b) != base_identity(b0) {
                return Err(Error::Invalid(format!(
                    "{l0} was trained on '{b0}' but {l} on '{b}': adapters combine only when they share a base model"
                )));
            }
        }
    }
    Ok(recorded.first().map(|(_, b)| (*b).clone()))
}

/// Adapters read for [`combine`] by [`load_adapters`].
pub struct LoadedAdapters {
    /// The adapters, in the order given.
    pub adapters: Vec<PeftAdapter>,
    /// The base they record (the first recorded `base_model_name_or_path`), for
    /// [`save_adapter_with_base`].
    pub base_model: Option<String>,
}

/// Reads PEFT adapter directories ([`furnace_model::load_adapter`]) and checks that they
/// record one base model ([`check_same_base`]).
pub fn load_adapters(dirs: &[&Path]) -> Result<LoadedAdapters> {
    let mut adapters = Vec::with_capacity(dirs.len());
    let mut bases = Vec::with_capacity(dirs.len());
    for dir in dirs {
        adapters.push(furnace_model::load_adapter(dir)?);
        bases.push((format!("adapter {}", dir.display()), adapter_base_model(dir)?));
    }
    let base_model = check_same_base(&bases)?;
    Ok(LoadedAdapters { adapters, base_model })
}

/// Writes `adapter` as a PEFT adapter directory (`adapter_config.json`,
/// `adapter_model.safetensors`) that PEFT and furnace load.
pub fn save_adapter(adapter: &PeftAdapter, dir: &Path) -> Result<()> {
    save_adapter_with_base(adapter, dir, None)
}

/// [`save_adapter`] recording `base_model` as `base_model_name_or_path` (PEFT's loaders use
/// it when no model is given).
pub fn save_adapter_with_base(adapter: &PeftAdapter, dir: &Path, base_model: Option<&str>) -> Result<()> {
    adapter.config.validate()?;
    let mut cfg = serde_json::to_value(&adapter.config).map_err(|e| Error::Invalid(format!("adapter config: {e}")))?;
    if let Some(obj) = cfg.as_object_mut() {
        // PEFT saves target_modules expanded (a config saying all-linear fails to load).
        let mut targets = adapter.config.targets();
        targets.sort_by_key(|t| TARGETS.iter().position(|x| x == t).unwrap_or(usize::MAX));
        obj.insert("target_modules".into(), targets.into());
        obj.insert("task_type".into(), "CAUSAL_LM".into());
        obj.insert("bias".into(), "none".into());
        obj.insert("inference_mode".into(), true.into());
        obj.insert("init_lora_weights".into(), true.into());
        obj.insert("base_model_name_or_path".into(), base_model.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null));
        obj.insert("modules_to_save".into(), serde_json::Value::Null);
        obj.insert("lora_bias".into(), false.into());
    }
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Invalid(format!("adapter config: {e}")))?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors: HashMap<String, Tensor> =
        adapter.tensors.iter().map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?.contiguous()?))).collect::<Result<_>>()?;
    // Written under temporary names and renamed, so an interrupted save leaves no half file.
    let st = dir.join("adapter_model.safetensors");
    let st_tmp = dir.join(".adapter_model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &st_tmp)?;
    std::fs::rename(&st_tmp, &st).map_err(io_err(&st))?;
    let cfg_path = dir.join("adapter_config.json");
    let cfg_tmp = dir.join(".adapter_config.json.tmp");
    std::fs::write(&cfg_tmp, text).map_err(io_err(&cfg_tmp))?;
    std::fs::rename(&cfg_tmp, &cfg_path).map_err(io_err(&cfg_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_identity_is_loose() {
        assert_eq!(base_identity("HuggingFaceTB/SmolLM2-135M-Instruct"), "smollm2-135m-instruct");
        assert_eq!(base_identity("models/smollm2-135m-instruct-q4_1.gguf"), "smollm2-135m-instruct");
        assert_eq!(base_identity("SmolLM2-135M-Instruct-Q4_K_M.gguf"), "smollm2-135m-instruct");
        assert_eq!(base_identity("testdata/tiny-llama/"), "tiny-llama");
        assert_ne!(base_identity("SmolLM2-135M"), base_identity("SmolLM2-360M"));
        assert_ne!(base_identity("Llama-3.1-8B"), base_identity("Llama-3.2-8B"));
    }

    #[test]
    fn magnitude_prune_keeps_largest() {
        assert_eq!(magnitude_prune(&[0.1, -3.0, 2.0, 0.5], 0.5), vec![0.0, -3.0, 2.0, 0.0]);
        assert_eq!(magnitude_prune(&[0.1, -3.0, 2.0], 0.5), vec![0.0, -3.0, 0.0]);
        assert_eq!(magnitude_prune(&[1.0, -1.0, 1.0, 0.5], 0.5), vec![1.0, -1.0, 0.0, 0.0], "ties: first positions");
        assert_eq!(magnitude_prune(&[1.0, 2.0], 0.4), vec![0.0, 0.0], "int(0.8) = 0 kept");
    }
}
