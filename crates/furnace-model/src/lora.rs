//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`),
//! registered in a model's [`Linear`] layers: `y = W x + (alpha / r) B A x`.
//!
//! A model holds any number of adapters at once. [`Llama::add_adapter`] gives each an
//! [`AdapterId`], and every targeted [`Linear`] keeps that adapter's factors next to the
//! others'. Each sequence of a ragged forward pass names the adapter it runs with (or none);
//! [`AdapterRows`] says which rows of the pass belong to which adapter, and each layer adds
//! an adapter's low-rank update to that adapter's rows only, after the base product that
//! runs once over all rows. Rows without an adapter get the base model exactly.
//!
//! Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), and
//! PEFT's `LoraModel`. Key names follow PEFT, e.g.
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. The model is in HF
//! layout (the GGUF loader undoes llama.cpp's q/k permutation), so adapters trained with
//! PEFT apply unchanged.

use crate::error::{io_err, Error, Result};
use crate::linear::Linear;
use crate::llama::Llama;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// The projections LoRA can target, in PEFT's names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The subset of PEFT's `LoraConfig` furnace reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Target module names (or `all-linear`).
    pub target_modules: Vec<String>,
    /// Scale `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Dropout during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Per-module rank overrides (must be empty: not supported yet).
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    /// Per-module alpha overrides (must be empty: not supported yet).
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    /// PEFT's adapter type; must be `LORA`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// DoRA (not supported).
    #[serde(default)]
    pub use_dora: bool,
    /// Weights stored transposed (Conv1D models; not supported).
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

fn lora_type() -> String {
    "LORA".into()
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Target modules with `all-linear` expanded.
    pub fn targets(&self) -> Vec<String> {
        if self.target_modules.iter().any(|t| t == "all-linear") {
            return TARGETS.iter().map(|s| s.to_string()).collect();
        }
        self.target_modules.clone()
    }

    /// Checks the values furnace supports, with a message naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Adapter(m));
        if self.peft_type != "LORA" {
            return bad(format!("peft_type is '{}', only LORA adapters are supported", self.peft_type));
        }
        if self.r == 0 {
            return bad("r must be > 0".into());
        }
        if self.use_dora || self.fan_in_fan_out {
            return bad("DoRA and fan_in_fan_out adapters are not supported".into());
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return bad("rank_pattern / alpha_pattern are not supported yet".into());
        }
        for t in self.targets() {
            if !TARGETS.contains(&t.as_str()) {
                return bad(format!(
                    "target module '{t}' does not exist in llama-family models (expected some of {TARGETS:?} or all-linear)"
                ));
            }
        }
        Ok(())
    }
}

/// LoRA factors of one linear layer.
#[derive(Clone)]
pub struct LoraWeights {
    /// `A: [r, in]`.
    pub a: Tensor,
    /// `B: [out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or rsLoRA's).
    pub scale: f64,
}

impl LoraWeights {
    /// `scale * (x A^T) B^T` for `x: [rows, in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?)
    }
}

/// A PEFT LoRA adapter read from disk.
pub struct PeftAdapter {
    /// Its configuration.
    pub config: LoraConfig,
    /// Tensors by PEFT key.
    pub tensors: HashMap<String, Tensor>,
}

/// PEFT's key for a factor (`"A"` or `"B"`) of `module` in `layer`.
pub fn peft_key(layer: usize, module: &str, factor: &str) -> String {
    let group = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("base_model.model.model.layers.{layer}.{group}.{module}.lora_{factor}.weight")
}

impl PeftAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.exists() {
            return Err(Error::Adapter(format!("{} has no adapter_config.json: expected a PEFT LoRA adapter directory", dir.display())));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let config: LoraConfig = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path, source })?;
        config.validate()?;
        let st = dir.join("adapter_model.safetensors");
        if !st.exists() {
            return Err(Error::Adapter(format!("{} has no adapter_model.safetensors", dir.display())));
        }
        let raw = candle_core::safetensors::load(&st, &Device::Cpu).map_err(|e| Error::Adapter(format!("{}: {e}", st.display())))?;
        // PEFT writes `...lora_A.weight`; in-memory state dicts carry the adapter name
        // (`...lora_A.default.weight`): accept both.
        let tensors = raw
            .into_iter()
            .map(|(k, v)| Ok((k.replace(".default.weight", ".weight"), v.to_dtype(candle_core::DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self { config, tensors })
    }
}

/// Identifies an adapter registered in a [`Llama`] by [`Llama::add_adapter`]. A model never
/// reuses an id, so an id that was removed stays unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterId(u64);

impl fmt::Display for AdapterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "adapter #{}", self.0)
    }
}

/// The rows of one forward pass that run with one adapter.
#[derive(Debug)]
struct RowGroup {
    adapter: AdapterId,
    /// Row indices, ascending.
    rows: Vec<u32>,
    /// The rows as an index tensor, when they are not one contiguous span.
    index: Option<Tensor>,
}

impl RowGroup {
    /// The rows of `x` that belong to this group.
    fn select(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.index {
            Some(index) => x.index_select(index, 0)?,
            None => x.narrow(0, self.rows[0] as usize, self.rows.len())?,
        })
    }
}

/// Which rows of a forward pass run with which adapter. Rows in no group run with the base
/// weights only. Built once per pass and handed to every [`Linear`] of it.
#[derive(Debug, Default)]
pub struct AdapterRows {
    groups: Vec<RowGroup>,
}

impl AdapterRows {
    /// Every row runs with the base weights only.
    pub fn none() -> Self {
        Self::default()
    }

    /// The rows of a ragged batch: its sequences in order, each as (its adapter, its number
    /// of rows). Rows of sequences with the same adapter form one group, wherever they are.
    pub fn from_sequences(seqs: impl IntoIterator<Item = (Option<AdapterId>, usize)>) -> Result<Self> {
        let mut grouped: Vec<(AdapterId, Vec<u32>)> = Vec::new();
        let mut row = 0usize;
        for (adapter, n) in seqs {
            let span = row as u32..(row + n) as u32;
            row += n;
            let Some(id) = adapter else { continue };
            match grouped.iter_mut().find(|(a, _)| *a == id) {
                Some((_, rows)) => rows.extend(span),
                None => grouped.push((id, span.collect())),
            }
        }
        let groups = grouped
            .into_iter()
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(adapter, rows)| {
                let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
                let index = if contiguous { None } else { Some(Tensor::from_slice(&rows, rows.len(), &Device::Cpu)?) };
                Ok(RowGroup { adapter, rows, index })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    /// Whether no row runs with an adapter.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether any group's adapter has factors in `lora` (a layer's adapters).
    pub(crate) fn touches(&self, lora: &[(AdapterId, LoraWeights)]) -> bool {
        self.groups.iter().any(|g| lora.iter().any(|(id, _)| *id == g.adapter))
    }

    /// Adds each adapter's update `scale * (x A^T) B^T` to its own rows of `y`
    /// (`[rows, out]`, row-major), for the adapters in `lora` (a layer's adapters).
    pub(crate) fn add_updates(&self, lora: &[(AdapterId, LoraWeights)], x: &Tensor, y: &mut [f32], out: usize) -> Result<()> {
        for g in &self.groups {
            let Some((_, w)) = lora.iter().find(|(id, _)| *id == g.adapter) else { continue };
            let d = w.delta(&g.select(x)?)?.flatten_all()?.to_vec1::<f32>()?;
            for (&r, dr) in g.rows.iter().zip(d.chunks_exact(out)) {
                let r = r as usize;
                y[r * out..(r + 1) * out].iter_mut().zip(dr).for_each(|(o, v)| *o += v);
            }
        }
        Ok(())
    }
}

fn module_mut<'a>(model: &'a mut Llama, layer: usize, module: &str) -> Option<&'a mut Linear> {
    model.layers.get_mut(layer)?.projection_mut(module)
}

impl Llama {
    /// Registers a PEFT adapter: every layer it targets keeps its factors, and sequences
    /// that name the returned id in [`crate::SeqInput::adapter`] run with it. Other
    /// sequences, and adapters registered before, are unaffected. Shapes are checked before
    /// anything changes, so a bad adapter leaves the model as it was.
    pub fn add_adapter(&mut self, adapter: &PeftAdapter) -> Result<AdapterId> {
        let cfg = &adapter.config;
        let scale = cfg.scale();
        let mut staged = Vec::new();
        for layer in 0..self.layers.len() {
            for module in cfg.targets() {
                let Some(lin) = module_mut(self, layer, &module) else {
                    return Err(Error::Adapter(format!("the model has no module {module}")));
                };
                let (ka, kb) = (peft_key(layer, &module, "A"), peft_key(layer, &module, "B"));
                let get = |k: &str| adapter.tensors.get(k).cloned().ok_or_else(|| Error::Adapter(format!("adapter lacks '{k}'")));
                let (a, b) = (get(&ka)?, get(&kb)?);
                if a.dims() != [cfg.r, lin.in_features] || b.dims() != [lin.out_features, cfg.r] {
                    return Err(Error::Adapter(format!(
                        "layer {layer} {module}: lora_A {:?} / lora_B {:?} do not fit a {}x{} layer with r={}",
                        a.dims(),
                        b.dims(),
                        lin.out_features,
                        lin.in_features,
                        cfg.r
                    )));
                }
                staged.push((layer, module, LoraWeights { a, b, scale }));
            }
        }
        let id = AdapterId(self.next_adapter);
        self.next_adapter += 1;
        for (layer, module, w) in staged {
            if let Some(lin) = module_mut(self, layer, &module) {
                lin.lora.push((id, w));
            }
        }
        self.adapters.push(id);
        Ok(id)
    }

    /// Removes an adapter's factors from every layer. Returns whether it was registered.
    pub fn remove_adapter(&mut self, id: AdapterId) -> bool {
        let Some(pos) = self.adapters.iter().position(|a| *a == id) else {
            return false;
        };
        self.adapters.remove(pos);
        for layer in 0..self.layers.len() {
            for module in TARGETS {
                if let Some(lin) = module_mut(self, layer, module) {
                    lin.lora.retain(|(a, _)| *a != id);
                }
            }
        }
        true
    }

    /// The registered adapters, oldest first.
    pub fn adapters(&self) -> &[AdapterId] {
        &self.adapters
    }

    /// Whether `id` is registered.
    pub fn has_adapter(&self, id: AdapterId) -> bool {
        self.adapters.contains(&id)
    }
}
