//! Bad input gives a clear error, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use furnace_model::{Error, LoadedModel, WeightDType};
use furnace_testutil::{smollm2_gguf, testdata};
use std::path::Path;

fn load_err(path: &Path) -> Error {
    match LoadedModel::load(path, WeightDType::F32) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_gguf_is_an_error() -> anyhow::Result<()> {
    let full = std::fs::read(smollm2_gguf())?;
    let dir = tempfile::tempdir()?;
    for cut in [0usize, 3, 100, 4096, full.len() / 2, full.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &full[..cut])?;
        let e = load_err(&p);
        assert!(matches!(e, Error::Gguf { .. }), "cut at {cut}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("GGUF"), "{msg}");
    }
    Ok(())
}

#[test]
fn corrupt_gguf_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("garbage.gguf");
    std::fs::write(&p, b"this is not a gguf file at all, just some text")?;
    assert!(matches!(load_err(&p), Error::Gguf { .. }));
    // Valid magic, absurd counts.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &bytes)?;
    assert!(matches!(load_err(&p), Error::Gguf { .. }));
    Ok(())
}

fn write_gguf(path: &Path, arch: &str) -> anyhow::Result<()> {
    let t = QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu)?, GgmlDType::F32)?;
    let arch = Value::String(arch.to_string());
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &t)])?;
    Ok(())
}

#[test]
fn unknown_architecture_is_named() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("falcon.gguf");
    write_gguf(&p, "falcon")?;
    match load_err(&p) {
        Error::UnknownArchitecture(a) => assert_eq!(a, "falcon"),
        e => panic!("unexpected: {e}"),
    }
    // The same for an HF directory.
    let hf = dir.path().join("neox");
    std::fs::create_dir(&hf)?;
    std::fs::write(hf.join("config.json"), r#"{"model_type": "gpt_neox", "hidden_size": 8}"#)?;
    std::fs::write(hf.join("model.safetensors"), b"")?;
    let e = load_err(&hf);
    assert!(matches!(e, Error::UnknownArchitecture(ref a) if a == "gpt_neox"), "{e}");
    assert!(e.to_string().contains("llama"), "the message says what is supported: {e}");
    Ok(())
}

#[test]
fn gguf_without_llama_metadata_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("bare.gguf");
    write_gguf(&p, "llama")?;
    let e = load_err(&p);
    assert!(e.to_string().contains("embedding_length"), "{e}");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn hf_dir_missing_tokenizer_or_weights_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let m = dir.path().join("m");
    copy_dir(&testdata().join("tiny-llama"), &m)?;
    std::fs::remove_file(m.join("tokenizer.json"))?;
    let e = load_err(&m);
    assert!(e.to_string().contains("tokenizer"), "{e}");

    copy_dir(&testdata().join("tiny-llama"), &m)?;
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(m.join("config.json"))?)?;
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(m.join("config.json"), cfg.to_string())?;
    let e = load_err(&m);
    assert!(matches!(e, Error::MissingWeight(ref w) if w.contains("layers.2")), "{e}");

    cfg["num_hidden_layers"] = 2.into();
    cfg["hidden_size"] = 32.into();
    std::fs::write(m.join("config.json"), cfg.to_string())?;
    let e = load_err(&m);
    assert!(matches!(e, Error::WeightShape { .. }), "{e}");

    let e = load_err(&dir.path().join("does-not-exist"));
    assert!(e.to_string().contains("does-not-exist"), "{e}");
    Ok(())
}

#[test]
fn sequence_longer_than_context_is_an_error() -> anyhow::Result<()> {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let max = m.model.config.max_position_embeddings;
    let ids = vec![5u32; max + 1];
    match m.model.logits_all(&ids) {
        Err(Error::ContextOverflow { len, max: m2 }) => assert_eq!((len, m2), (max + 1, max)),
        Err(e) => panic!("unexpected: {e}"),
        Ok(_) => panic!("accepted {} tokens in a context of {max}", max + 1),
    }
    match m.model.logits_all(&[49_152]) {
        Err(Error::TokenOutOfRange { id, .. }) => assert_eq!(id, 49_152),
        other => panic!("unexpected: {:?}", other.err()),
    }
    Ok(())
}
