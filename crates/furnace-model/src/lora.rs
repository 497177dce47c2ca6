//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`),
//! attached to a model's [`Linear`] layers: `y = W x + (alpha / r) B A x`.
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
                return bad(format!("target module '{t}' does not exist in llama-family models (expected some of {TARGETS:?} or all-linear)"));
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
    let group = if matches!(module, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("base_model.model.model.layers.{layer}.{group}.{module}.lora_{factor}.weight")
}

impl PeftAdapter {
    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.exists() {
            return Err(Error::Adapter(format!(
                "{} has no adapter_config.json: expected a PEFT LoRA adapter directory",
                dir.display()
            )));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
        let config: LoraConfig = serde_json::from_str(&text).map_err(|source| Error::Json { path: cfg_path, source })?;
        config.validate()?;
        let st = dir.join("adapter_model.safetensors");
        if !st.exists() {
            return Err(Error::Adapter(format!("{} has no adapter_model.safetensors", dir.display())));
        }
        let raw = candle_core::safetensors::load(&st, &Device::Cpu)
            .map_err(|e| Error::Adapter(format!("{}: {e}", st.display())))?;
        // PEFT writes `...lora_A.weight`; in-memory state dicts carry the adapter name
        // (`...lora_A.default.weight`): accept both.
        let tensors = raw
            .into_iter()
            .map(|(k, v)| Ok((k.replace(".default.weight", ".weight"), v.to_dtype(candle_core::DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self { config, tensors })
    }
}

fn module_mut<'a>(model: &'a mut Llama, layer: usize, module: &str) -> Option<&'a mut Linear> {
    model.layers.get_mut(layer)?.projection_mut(module)
}

impl Llama {
    /// Attaches a PEFT adapter to every targeted layer (replacing any attached before).
    /// Shapes are checked before anything changes, so a bad adapter leaves the model as it was.
    pub fn attach_adapter(&mut self, adapter: &PeftAdapter) -> Result<()> {
        let cfg = &adapter.config;
        let scale = cfg.scale();
        let mut staged = Vec::new();
        for layer in 0..self.layers.len() {
            for module in cfg.targets() {
                let Some(lin) = module_mut(self, layer, &module) else {
                    return Err(Error::Adapter(format!("the model has no module {module}")));
                };
                let (ka, kb) = (peft_key(layer, &module, "A"), peft_key(layer, &module, "B"));
                let get = |k: &str| {
                    adapter
                        .tensors
                        .get(k)
                        .cloned()
                        .ok_or_else(|| Error::Adapter(format!("adapter lacks '{k}'")))
                };
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
        self.detach_adapter();
        for (layer, module, w) in staged {
            if let Some(lin) = module_mut(self, layer, &module) {
                lin.lora = Some(w);
            }
        }
        Ok(())
    }

    /// Removes every attached adapter.
    pub fn detach_adapter(&mut self) {
        for layer in 0..self.layers.len() {
            for module in TARGETS {
                if let Some(lin) = module_mut(self, layer, module) {
                    lin.lora = None;
                }
            }
        }
    }
}
