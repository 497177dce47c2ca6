//! Shared helpers for the furnace-text integration tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use furnace_text::GgufTokenizerSpec;
use serde_json::Value;

pub use furnace_testutil::{jsonl as read_jsonl, testdata};

/// `(text, ids)` pairs of tokenizer_cases.jsonl.
pub fn tokenizer_cases() -> Vec<(String, Vec<u32>)> {
    read_jsonl("tokenizer_cases.jsonl")
        .into_iter()
        .map(|case| {
            let text = case["text"].as_str().unwrap().to_string();
            let ids = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (text, ids)
        })
        .collect()
}

/// The tokenizer metadata a SmolLM2 GGUF holds, rebuilt from tiny-llama's tokenizer.json.
pub fn smollm_gguf_spec() -> GgufTokenizerSpec {
    let path = testdata().join("tiny-llama/tokenizer.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut by_id: Vec<(u64, String)> =
        json["model"]["vocab"].as_object().unwrap().iter().map(|(token, id)| (id.as_u64().unwrap(), token.clone())).collect();
    for added in json["added_tokens"].as_array().unwrap() {
        let id = added["id"].as_u64().unwrap();
        if !by_id.iter().any(|(i, _)| *i == id) {
            by_id.push((id, added["content"].as_str().unwrap().to_string()));
        }
    }
    by_id.sort();
    for (expected, (id, _)) in by_id.iter().enumerate() {
        assert_eq!(*id, expected as u64, "vocabulary ids are not contiguous");
    }
    let tokens: Vec<String> = by_id.into_iter().map(|(_, t)| t).collect();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            other => panic!("unexpected merge {other}"),
        })
        .collect();
    let n_special = json["added_tokens"].as_array().unwrap().len();
    assert_eq!(n_special, 17);
    let token_types = (0..tokens.len()).map(|id| if id < n_special { 3 } else { 1 }).collect();
    GgufTokenizerSpec {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types,
        merges,
        scores: Vec::new(),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: Some(2),
        add_bos: false,
        add_space_prefix: false,
    }
}
