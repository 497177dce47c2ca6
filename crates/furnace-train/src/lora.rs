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
            let b = layer;
            let mods = [
                ("q_proj", &mut b.self_attn.q_proj),
                ("k_proj", &mut b.self_attn.k_proj),
                ("v_proj", &mut b.self_attn.v_proj),
                ("o_proj", &mut b.self_attn.o_proj),
                ("gate_proj", &mut b.mlp.gate_proj),
                ("up_proj", &mut b.mlp.up_proj),
                ("down_proj", &mut b.mlp.down_proj),
            ];
            debug_assert_eq!(mods.len(), TARGETS.len());
            for (name, lin) in mods {
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
