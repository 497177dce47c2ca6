//! The HF tokenizer files of a GGUF base: `tokenizer.json` serialized from the tokenizer
//! furnace builds from the GGUF metadata (the same one furnace runs the GGUF with), and a
//! `tokenizer_config.json` naming its special tokens, so that transformers' `AutoTokenizer`
//! gives the same ids.

use crate::error::{Error, Result};
use crate::hf::SpecialIds;
use furnace_text::{GgufTokenizerSpec, Tokenizer};
use serde_json::{json, Value};

/// The tokenizer files of a GGUF base.
pub(crate) struct GgufTokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: String,
    /// `tokenizer_config.json`.
    pub tokenizer_config: Value,
    /// `chat_template.jinja`, when the GGUF has a chat template.
    pub chat_template: Option<String>,
    /// Its special token ids.
    pub ids: SpecialIds,
}

/// Builds the HF tokenizer files from GGUF tokenizer metadata.
pub(crate) fn from_gguf(spec: &GgufTokenizerSpec, chat_template: Option<String>, max_len: usize) -> Result<GgufTokenizerFiles> {
    let tok = Tokenizer::from_gguf(spec).map_err(|e| Error::Invalid(format!("the GGUF's tokenizer: {e}")))?;
    let text = tok.hf_tokenizer().to_string(false).map_err(|e| Error::Invalid(format!("serializing the GGUF's tokenizer: {e}")))?;
    let mut doc: Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("serialized tokenizer: {e}")))?;
    let name = |id: Option<u32>| id.and_then(|i| spec.tokens.get(i as usize)).cloned();
    let bos = name(spec.bos_id);
    // furnace puts BOS in front itself when the GGUF asks for it; transformers reads that
    // from tokenizer.json's post-processor.
    if let (true, Some(bos_tok), Some(bos_id)) = (spec.add_bos, bos.as_ref(), spec.bos_id) {
        let special = |seq: &str| json!({"Sequence": {"id": seq, "type_id": 0}});
        let bos_piece = json!({"SpecialToken": {"id": bos_tok, "type_id": 0}});
        doc["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [bos_piece, special("A")],
            "pair": [bos_piece, special("A"), bos_piece, special("B")],
            "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos_id], "tokens": [bos_tok]}},
        });
    }
    let tokenizer_json = serde_json::to_string(&doc).map_err(|e| Error::Invalid(format!("serializing the tokenizer: {e}")))?;
    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, id) in [("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id), ("pad_token", spec.pad_id)] {
        if let Some(t) = name(id) {
            cfg.insert(key.into(), json!(t));
        }
    }
    cfg.insert("add_bos_token".into(), json!(spec.add_bos));
    cfg.insert("add_eos_token".into(), json!(false));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert("model_max_length".into(), json!(max_len));
    Ok(GgufTokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(cfg),
        chat_template,
        ids: SpecialIds { bos: spec.bos_id, eos: spec.eos_id, pad: spec.pad_id },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use furnace_model::gguf::GgufFile;

    /// A GGUF that asks for BOS (llama-style) gets a tokenizer.json whose post-processor puts
    /// it in front, so the written directory encodes as furnace encodes the GGUF.
    #[test]
    fn add_bos_becomes_a_post_processor() {
        let g = GgufFile::open(&furnace_testutil::smollm2_gguf()).unwrap();
        let mut spec = g.tokenizer_spec().unwrap();
        let bos = spec.bos_id.expect("SmolLM2 declares a BOS token");
        for add_bos in [false, true] {
            spec.add_bos = add_bos;
            let files = from_gguf(&spec, g.chat_template(), 8192).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), &files.tokenizer_json).unwrap();
            std::fs::write(dir.path().join("tokenizer_config.json"), files.tokenizer_config.to_string()).unwrap();
            let got = Tokenizer::from_hf_dir(dir.path()).unwrap();
            let want = Tokenizer::from_gguf(&spec).unwrap();
            for text in ["Hello, world!", "<|im_start|>user\nHi<|im_end|>", "  spaces\tand tabs"] {
                assert_eq!(got.encode(text, true).unwrap(), want.encode(text, true).unwrap(), "add_bos={add_bos} {text:?}");
                assert_eq!(got.encode(text, false).unwrap(), want.encode(text, false).unwrap(), "add_bos={add_bos} {text:?}");
            }
            assert_eq!(got.encode("Hi", true).unwrap()[0] == bos, add_bos);
            assert_eq!(got.bos_id(), Some(bos));
            assert_eq!(got.eos_ids(), want.eos_ids());
        }
    }
}
