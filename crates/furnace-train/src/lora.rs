//! Trainable LoRA factors: `Var`s placed in a model's linear layers, initialised as PEFT
//! does or copied from an existing adapter.

use crate::error::Result;
use candle_core::Var;
use furnace_model::lora::{peft_key, LoraConfig, LoraWeights, TARGETS};
use furnace_model::{Llama, PeftAdapter};

/// The trainable factors of one adapter, by PEFT key.
pub struct TrainableLora {
    /// Configuration.
    pub config: LoraConfig,
    /// `(PEFT key, factor)` pairs, A then B for each targeted layer.
    pub vars: Vec<(String, Var)>,
}

impl TrainableLora {
    /// Makes `Var`s of an adapter's factors and attaches them to `model`.
    pub fn attach(model: &mut Llama, adapter: &PeftAdapter) -> Result<Self> {
        model.attach_adapter(adapter)?;
        let mut vars = Vec::new();
        for (li, layer) in model.layers.iter_mut().enumerate() {
            for name in TARGETS {
                let Some(lin) = layer.projection_mut(name) else { continue };
                if let Some(l) = &lin.lora {
                    let a = Var::from_tensor(&l.a)?;
                    let bv = Var::from_tensor(&l.b)?;
                    lin.lora = Some(LoraWeights {
                        a: a.as_tensor().clone(),
                        b: bv.as_tensor().clone(),
                        scale: l.scale,
                    });
                    vars.push((peft_key(li, name, "A"), a));
                    vars.push((peft_key(li, name, "B"), bv));
                }
            }
        }
        Ok(Self {
            config: adapter.config.clone(),
            vars,
        })
    }
}

/// How new LoRA factors start (B is always zero, so training starts from the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: A ~ Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    KaimingUniform,
    /// A ~ N(0, 1/r).
    Gaussian,
}

impl TrainableLora {
    /// Fresh factors for `config` (initialised as PEFT does, from `seed`), attached to `model`.
    pub fn new(model: &mut Llama, config: LoraConfig, init: LoraInit, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = furnace_model::rng::Rng::new(seed);
        let mut tensors = std::collections::HashMap::new();
        let targets = config.targets();
        for (li, layer) in model.layers.iter().enumerate() {
            for name in &targets {
                let Some(lin) = layer.projection(name) else { continue };
                let (inp, out, r) = (lin.in_features, lin.out_features, config.r);
                let a: Vec<f32> = match init {
                    LoraInit::KaimingUniform => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        (0..r * inp).map(|_| rng.uniform(-bound, bound) as f32).collect()
                    }
                    LoraInit::Gaussian => {
                        let std = 1.0 / r as f64;
                        (0..r * inp).map(|_| (rng.normal() * std) as f32).collect()
                    }
                };
                let a = candle_core::Tensor::from_vec(a, (r, inp), &candle_core::Device::Cpu)?;
                let b = candle_core::Tensor::zeros((out, r), candle_core::DType::F32, &candle_core::Device::Cpu)?;
                tensors.insert(peft_key(li, name, "A"), a);
                tensors.insert(peft_key(li, name, "B"), b);
            }
        }
        Self::attach(model, &PeftAdapter { config, tensors })
    }

    /// The factors, in a fixed order (for the optimizer).
    pub fn params(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Writes the adapter in PEFT's format (`adapter_config.json` +
    /// `adapter_model.safetensors`), which PEFT's `PeftModel.from_pretrained` loads. The
    /// directory is replaced as a whole: files are written to a sibling temp directory first,
    /// so a crash never leaves a half-written adapter under `dir`.
    pub fn save_peft(&self, dir: &std::path::Path, base_model: &str) -> Result<()> {
        let mut cfg = serde_json::to_value(&self.config).map_err(|e| crate::Error::Input(e.to_string()))?;
        if let Some(obj) = cfg.as_object_mut() {
            // PEFT expands `all-linear` when it builds a model and saves the expanded list;
            // loading a config that still says `all-linear` fails in PEFT.
            obj.insert("target_modules".into(), self.config.targets().into());
            obj.insert("task_type".into(), "CAUSAL_LM".into());
            obj.insert("bias".into(), "none".into());
            obj.insert("inference_mode".into(), true.into());
            obj.insert("init_lora_weights".into(), true.into());
            obj.insert("base_model_name_or_path".into(), base_model.into());
            obj.insert("modules_to_save".into(), serde_json::Value::Null);
            obj.insert("lora_bias".into(), false.into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| crate::Error::Input(e.to_string()))?;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> =
            self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        replace_dir(dir, |tmp| {
            std::fs::write(tmp.join("adapter_config.json"), &text)
                .map_err(|e| crate::Error::Input(format!("writing adapter to {}: {e}", dir.display())))?;
            candle_core::safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))?;
            Ok(())
        })
    }
}

/// Replaces `dir` as a whole with what `fill` writes into a sibling temp directory, so a
/// crash never leaves a half-written directory under that name.
pub(crate) fn replace_dir(dir: &std::path::Path, fill: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    let io = |e: std::io::Error| crate::Error::Input(format!("writing {}: {e}", dir.display()));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let parent = dir.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io)?;
    }
    std::fs::rename(&tmp, dir).map_err(io)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
