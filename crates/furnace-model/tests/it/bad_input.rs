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

/// A GGUF v3 header with `general.architecture = llama`, `extra` metadata and one F32
/// tensor `name` of `dims` (innermost first, as stored) at offset 0, then `data` bytes.
fn crafted_gguf(extra: &[(&str, u32)], name: &str, dims: &[u64], data: usize) -> Vec<u8> {
    let s = |out: &mut Vec<u8>, v: &str| {
        out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&(1 + extra.len() as u64).to_le_bytes());
    s(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes());
    s(&mut out, "llama");
    for (k, v) in extra {
        s(&mut out, k);
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    s(&mut out, name);
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.resize(out.len().div_ceil(32) * 32 + data, 0);
    out
}

fn gguf_err(bytes: Vec<u8>) -> String {
    match furnace_model::gguf::GgufFile::from_bytes(Path::new("crafted.gguf"), bytes) {
        Ok(_) => panic!("a crafted GGUF opened"),
        Err(e) => {
            assert!(matches!(e, Error::Gguf { .. }), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn gguf_alignment_zero_is_an_error_not_a_division_by_zero() {
    // Found by furnace-fuzz: candle divides the data offset by `general.alignment`.
    let msg = gguf_err(crafted_gguf(&[("general.alignment", 0)], "token_embd.weight", &[4, 2], 32));
    assert!(msg.contains("general.alignment is 0"), "{msg}");
    // A valid alignment still opens.
    let ok = crafted_gguf(&[("general.alignment", 32)], "token_embd.weight", &[4, 2], 32);
    furnace_model::gguf::GgufFile::from_bytes(Path::new("ok.gguf"), ok).unwrap();
}

#[test]
fn gguf_tensor_sizes_that_overflow_are_an_error() {
    // Found by furnace-fuzz: the element count and byte size of a crafted shape
    // overflowed 64 bits (a panic in debug builds, a wrapped bounds check in release).
    for dims in [vec![1u64 << 40, 1 << 40], vec![u64::MAX, 2], vec![1 << 62]] {
        let msg = gguf_err(crafted_gguf(&[], "token_embd.weight", &dims, 0));
        assert!(msg.contains("larger than any file") || msg.contains("truncated"), "{dims:?}: {msg}");
    }
}

#[test]
fn empty_gguf_tensor_is_an_error_not_an_abort() {
    // Found by furnace-fuzz: candle builds a slice of an empty buffer through an
    // unaligned dangling pointer, which aborts the process in debug builds.
    let bytes = crafted_gguf(&[], "rope_freqs.weight", &[0], 0);
    let mut g = furnace_model::gguf::GgufFile::from_bytes(Path::new("empty.gguf"), bytes).unwrap();
    let e = g.tensor("rope_freqs.weight").map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("has no elements"), "{e}");
}

#[test]
fn safetensors_header_length_is_checked_before_allocating() {
    // Found by furnace-fuzz: the header length was trusted up to 100 MB and allocated
    // before reading; shapes overflowed when multiplied.
    let path = Path::new("crafted.safetensors");
    let mut bytes = 99_999_999u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let e = furnace_model::load::safetensors_header_stats(std::io::Cursor::new(&bytes), bytes.len() as u64, path).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    let header = br#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    let (params, _) = furnace_model::load::safetensors_header_stats(std::io::Cursor::new(&bytes), bytes.len() as u64, path).unwrap();
    assert_eq!(params, u64::MAX);
}

#[test]
fn config_sizes_are_bounded() {
    // Found by furnace-fuzz: a config.json with a huge head_dim passed validation and
    // `rope_inv_freq` then asked for a huge allocation.
    let v = serde_json::json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "num_hidden_layers": 2, "vocab_size": 100, "head_dim": 1u64 << 40});
    let e = furnace_model::LlamaConfig::from_hf_json(&v).unwrap_err();
    assert!(e.to_string().contains("head dimension 1099511627776 is larger than the supported maximum"), "{e}");
}
