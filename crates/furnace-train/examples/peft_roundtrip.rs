//! Writes a trained-looking adapter for tiny-llama and the logits it gives, so PEFT can be
//! checked to load it to the same logits:
//! `cargo run -p furnace-train --example peft_roundtrip -- OUT_DIR`, then load OUT_DIR/adapter
//! with `PeftModel.from_pretrained` on testdata/tiny-llama and compare with OUT_DIR/logits.json.
use furnace_model::{LoadedModel, WeightDType};
use furnace_train::{LoraInit, TrainableLora};

fn main() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "peft-roundtrip".into()));
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
    let mut m = LoadedModel::load(&dir, WeightDType::F32)?;
    let cfg = serde_json::from_value(serde_json::json!({"r": 4, "lora_alpha": 8, "target_modules": ["all-linear"]}))?;
    let mut lora = TrainableLora::new(&m.model, cfg, LoraInit::Gaussian, 11)?;
    for p in lora.layers.iter_mut().flatten().flatten() {
        p.b.iter_mut().for_each(|v| *v = 0.1);
    }
    lora.save_peft(&out.join("adapter"), "tiny-llama")?;
    let adapter = m.model.add_adapter(&lora.to_adapter()?)?;
    let ids = [1604u32, 3987, 46477, 24, 94, 727];
    let logits = m.model.logits_all_with(&ids, Some(adapter))?.to_vec2::<f32>()?;
    std::fs::write(out.join("logits.json"), serde_json::to_string(&serde_json::json!({"ids": ids, "logits": logits}))?)?;
    println!("{}", out.display());
    Ok(())
}
