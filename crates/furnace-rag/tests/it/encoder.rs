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

fn case(kind: &str) -> serde_json::Value {
    furnace_testutil::jsonl("tiny_encoder_cases.jsonl").into_iter().find(|c| c["kind"] == kind).expect("fixture case")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn a_tiny_random_bert_with_cls_pooling_matches_sentence_transformers() -> Result<()> {
    let enc = SentenceEncoder::from_dir(&testdata().join("tiny-bert"))?.with_batch_size(3);
    assert_eq!(enc.pooling().mode, PoolingMode::Cls);
    assert!(!enc.pooling().normalize);
    assert_eq!(enc.max_seq_length(), 24);
    let c = case("sentence");
    let texts: Vec<&str> = c["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let out = enc.embed(&texts)?;
    // sentence-transformers cuts to max_seq_length = 24 tokens: texts 5 and 7 are longer.
    let counts: Vec<usize> = c["token_counts"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).collect();
    let longer: Vec<usize> = counts.iter().enumerate().filter(|(_, &n)| n > 24).map(|(i, _)| i).collect();
    assert_eq!(out.truncated, longer);
    for (i, (got, want)) in out.vectors.iter().zip(c["vectors"].as_array().unwrap()).enumerate() {
        let want = floats(want);
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_err < 1e-4, "text {i}: max abs error {max_err}");
        assert!(cosine(got, &want) >= 0.9999);
    }
    Ok(())
}

#[test]
fn a_tiny_random_cross_encoder_matches_sentence_transformers() -> Result<()> {
    let ce = furnace_rag::CrossEncoder::from_dir(&testdata().join("tiny-cross-encoder"))?;
    let c = case("cross");
    let pairs: Vec<(&str, &str)> =
        c["pairs"].as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap(), p[1].as_str().unwrap())).collect();
    // The fixture's max_length (40) is shorter than the model's: cut the same way.
    let ce = ce.with_max_length(c["max_length"].as_u64().unwrap() as usize)?;
    let logits = ce.logits(&pairs)?;
    for (i, (got, want)) in logits.iter().zip(floats(&c["logits"])).enumerate() {
        assert!((got[0] - want).abs() < 1e-5, "pair {i}: logit {} vs {want}", got[0]);
    }
    for (i, (q, p)) in pairs.iter().enumerate() {
        let score = ce.scores(q, &[p])?[0];
        let want = floats(&c["scores"])[i];
        assert!((score - want).abs() < 1e-5, "pair {i}: score {score} vs {want}");
    }
    Ok(())
}

#[test]
fn a_sentence_encoder_folder_is_not_a_cross_encoder() {
    let err = furnace_rag::CrossEncoder::from_dir(&testdata().join("tiny-bert")).unwrap_err().to_string();
    assert!(err.contains("not a cross-encoder"), "{err}");
    // A folder that is no model at all (a LoRA adapter) names the file it lacks.
    let err = SentenceEncoder::from_dir(&testdata().join("lora_adapter")).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn minilm_matches_sentence_transformers_on_texts_of_our_own() -> Result<()> {
    let enc = SentenceEncoder::from_dir(&minilm_dir())?.with_batch_size(4);
    let c = case("minilm");
    let texts: Vec<&str> = c["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let out = enc.embed(&texts)?;
    assert_eq!(out.truncated, vec![texts.len() - 1], "only the long passage is over 256 tokens");
    for (i, (got, want)) in out.vectors.iter().zip(c["vectors"].as_array().unwrap()).enumerate() {
        let c = cosine(got, &floats(want));
        assert!(c >= 0.9999, "text {i}: cosine {c}");
    }
    Ok(())
}

#[test]
fn a_llama_decoder_embeds_by_its_last_token_like_transformers() -> Result<()> {
    let enc = SentenceEncoder::from_dir(&testdata().join("tiny-llama"))?.with_batch_size(4);
    assert_eq!(enc.pooling().mode, PoolingMode::LastToken);
    let c = case("decoder");
    let texts: Vec<&str> = c["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let out = enc.embed(&texts)?;
    assert_eq!(out.vectors[0].len(), enc.dim());
    for (i, (got, want)) in out.vectors.iter().zip(c["vectors"].as_array().unwrap()).enumerate() {
        let want = floats(want);
        let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_err < 1e-4, "text {i}: max abs error {max_err}");
    }
    Ok(())
}
