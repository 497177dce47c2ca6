//! Encoders against the reference implementations: all-MiniLM-L6-v2 against
//! sentence-transformers' vectors (`testdata/minilm_*`).

use anyhow::Result;
use furnace_rag::{PoolingMode, SentenceEncoder};
use furnace_testutil::{minilm_dir, testdata};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() -> Result<()> {
    let enc = SentenceEncoder::from_dir(&minilm_dir())?;
    assert_eq!(enc.dim(), 384);
    assert_eq!(enc.max_seq_length(), 256);
    assert_eq!(enc.pooling().mode, PoolingMode::Mean);
    assert!(enc.pooling().normalize);
    let case = &furnace_testutil::jsonl("minilm_cases.jsonl")[0];
    let sentences: Vec<&str> = case["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let expected = candle_core::safetensors::load(testdata().join("minilm_embeddings.safetensors"), &candle_core::Device::Cpu)?;
    let expected = expected["embeddings"].to_vec2::<f32>()?;
    // In one batch (padded to the longest) and one at a time: the same vectors.
    let batched = enc.embed(&sentences)?;
    assert!(batched.truncated.is_empty());
    for (i, (got, want)) in batched.vectors.iter().zip(&expected).enumerate() {
        let c = cosine(got, want);
        assert!(c >= 0.9999, "sentence {i}: cosine {c}");
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "sentence {i}: norm {norm}");
    }
    for (i, s) in sentences.iter().enumerate() {
        let alone = enc.embed(&[s])?;
        let c = cosine(&alone.vectors[0], &expected[i]);
        assert!(c >= 0.9999, "sentence {i} alone: cosine {c}");
    }
    Ok(())
}

#[test]
fn a_text_longer_than_the_model_is_cut_and_reported() -> Result<()> {
    let enc = SentenceEncoder::from_dir(&minilm_dir())?;
    let long = "word ".repeat(600);
    let out = enc.embed(&["short", &long])?;
    assert_eq!(out.truncated, vec![1]);
    assert_eq!(out.vectors[1].len(), 384);
    // Cutting is what makes it equal to the first 254 words (+ [CLS] and [SEP]).
    let cut = "word ".repeat(254);
    let same = enc.embed(&[&cut])?;
    assert!(cosine(&out.vectors[1], &same.vectors[0]) > 0.99999);
    Ok(())
}
