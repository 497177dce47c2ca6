//! Building a Hugging Face `tokenizers` pipeline from GGUF tokenizer metadata.
//!
//! The GGUF file only stores the vocabulary, merges/scores and a few flags; this
//! module turns them into the `tokenizer.json` that Hugging Face's GGUF converter
//! would produce, and loads it with the `tokenizers` library. Two tokenizer models
//! are supported: byte-level BPE (`"gpt2"`) and SentencePiece (`"llama"`).

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// Token type of a normal vocabulary entry.
const TYPE_NORMAL: i32 = 1;
/// Token type of a control token (`<|im_start|>`, `<s>`, ...): a special added token.
const TYPE_CONTROL: i32 = 3;
/// Token type of a user-defined token: an added (non-special) token.
const TYPE_USER_DEFINED: i32 = 4;

/// Tokenizer metadata as stored in a GGUF file (`tokenizer.ggml.*` keys).
///
/// Another crate reads the GGUF file and fills this in;
/// [`Tokenizer::from_gguf`](crate::Tokenizer::from_gguf) turns it into a tokenizer.
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer family (`"smollm"`, `"llama-bpe"`, `"qwen2"`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token strings indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined,
    /// 5 unused, 6 byte. May be empty.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"a b"` strings (byte-level BPE); may be empty for SentencePiece.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece piece scores; may be empty.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_space_prefix`: whether SentencePiece prepends `▁` to the text.
    pub add_space_prefix: bool,
}

/// The SentencePiece word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

/// Llama 3's pre-tokenization regex (digits in groups of up to three).
const LLAMA3_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenization regex (single digits).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek V3's pre-tokenization regexes, applied one after the other.
const DEEPSEEK3_REGEXES: [&str; 3] = [
    r"\p{N}{1,3}",
    "[\u{4e00}-\u{9fa5}\u{3040}-\u{309f}\u{30a0}-\u{30ff}]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

impl GgufTokenizerSpec {
    fn token_type(&self, id: usize) -> i32 {
        self.token_types.get(id).copied().unwrap_or(TYPE_NORMAL)
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|id| self.tokens.get(id as usize)).map(String::as_str)
    }

    /// The `tokenizer.json` document equivalent to this metadata.
    pub(crate) fn to_tokenizer_json(&self) -> Result<Value> {
        if self.tokens.is_empty() {
            return Err(Error::InvalidGguf("tokenizer.ggml.tokens is empty".into()));
        }
        for (name, id) in [("bos", self.bos_id), ("eos", self.eos_id), ("unknown", self.unk_id), ("padding", self.pad_id)] {
            if let Some(id) = id {
                if id as usize >= self.tokens.len() {
                    return Err(Error::InvalidGguf(format!(
                        "{name} token id {id} is outside the vocabulary of {} tokens",
                        self.tokens.len()
                    )));
                }
            }
        }
        let (normalizer, pre_tokenizer, model, decoder) = match self.model.as_str() {
            "gpt2" => self.byte_level_parts()?,
            "llama" => self.sentencepiece_parts()?,
            other => return Err(Error::UnsupportedModel(other.to_string())),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": decoder,
            "model": model,
        }))
    }

    /// Control tokens become special added tokens and user-defined tokens plain
    /// added tokens, so both are matched verbatim in raw text. Without token types,
    /// the BOS/EOS/UNK/PAD tokens are the special ones.
    fn added_tokens(&self) -> Vec<Value> {
        let entry = |id: usize, special: bool| {
            json!({
                "id": id,
                "content": self.tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": special,
            })
        };
        if self.token_types.is_empty() {
            let mut ids: Vec<usize> =
                [self.unk_id, self.bos_id, self.eos_id, self.pad_id].into_iter().flatten().map(|id| id as usize).collect();
            ids.sort_unstable();
            ids.dedup();
            return ids.into_iter().map(|id| entry(id, true)).collect();
        }
        (0..self.tokens.len())
            .filter_map(|id| match self.token_type(id) {
                TYPE_CONTROL => Some(entry(id, true)),
                TYPE_USER_DEFINED => Some(entry(id, false)),
                _ => None,
            })
            .collect()
    }

    fn vocab(&self) -> Map<String, Value> {
        let mut vocab = Map::with_capacity(self.tokens.len());
        for (id, token) in self.tokens.iter().enumerate() {
            // Like a Python dict comprehension, a duplicated token keeps its last id.
            vocab.insert(token.clone(), Value::from(id));
        }
        vocab
    }

    /// Byte-level BPE, as GPT-2 and most modern BPE vocabularies use.
    fn byte_level_parts(&self) -> Result<(Value, Value, Value, Value)> {
        let merges = self
            .merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| Error::InvalidGguf(format!("merge {merge:?} is not \"a b\"")))
            })
            .collect::<Result<Vec<_>>>()?;
        let byte_level = |use_regex: bool| {
            json!({
                "type": "ByteLevel",
                "add_prefix_space": false,
                "trim_offsets": true,
                "use_regex": use_regex,
            })
        };
        let split = |regex: &str| {
            json!({
                "type": "Split",
                "pattern": {"Regex": regex},
                "behavior": "Isolated",
                "invert": false,
            })
        };
        let sequence = |splits: &[&str]| {
            let mut items: Vec<Value> = splits.iter().map(|r| split(r)).collect();
            items.push(byte_level(false));
            json!({"type": "Sequence", "pretokenizers": items})
        };
        let pre = self.pre.as_deref().unwrap_or("default");
        let mut normalizer = Value::Null;
        let mut ignore_merges = false;
        let pre_tokenizer = match pre {
            "llama-bpe" | "llama3" | "smaug-bpe" | "falcon3" => {
                ignore_merges = true;
                sequence(&[LLAMA3_REGEX])
            }
            "qwen2" | "deepseek-r1-qwen" | "megrez" => {
                normalizer = json!({"type": "NFC"});
                sequence(&[QWEN2_REGEX])
            }
            "deepseek-v3" => sequence(&DEEPSEEK3_REGEXES),
            "starcoder" | "refact" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ],
            }),
            // "gpt2", "default", "smollm" and anything unknown: GPT-2's own regex,
            // exactly what Hugging Face's GGUF converter produces.
            _ => byte_level(true),
        };
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": self.token(self.unk_id),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": self.vocab(),
            "merges": merges,
        });
        let decoder = json!({
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        });
        Ok((normalizer, pre_tokenizer, model, decoder))
    }

    /// SentencePiece (BPE flavour, as Llama/Mistral/Gemma use) with byte fallback.
    fn sentencepiece_parts(&self) -> Result<(Value, Value, Value, Value)> {
        let merges: Vec<Value> = if self.merges.is_empty() {
            self.merges_from_scores().into_iter().map(|(a, b)| json!([a, b])).collect()
        } else {
            self.merges
                .iter()
                .map(|merge| {
                    merge
                        .split_once(' ')
                        .map(|(a, b)| json!([a, b]))
                        .ok_or_else(|| Error::InvalidGguf(format!("merge {merge:?} is not \"a b\"")))
                })
                .collect::<Result<_>>()?
        };
        let replace_space = json!({
            "type": "Replace",
            "pattern": {"String": " "},
            "content": SPM_SPACE,
        });
        let normalizer = if self.add_space_prefix {
            json!({
                "type": "Sequence",
                "normalizers": [{"type": "Prepend", "prepend": SPM_SPACE}, replace_space],
            })
        } else {
            replace_space
        };
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": self.token(self.unk_id),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": self.vocab(),
            "merges": merges,
        });
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let decoder = json!({"type": "Sequence", "decoders": decoders});
        Ok((normalizer, Value::Null, model, decoder))
    }

    /// BPE merges equivalent to SentencePiece's score-driven merging: every split of a
    /// normal piece into two normal pieces is a merge, ranked by the merged piece's
    /// score (highest first; ties keep vocabulary order, then the pieces' ids).
    fn merges_from_scores(&self) -> Vec<(String, String)> {
        let normal: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .filter(|&(id, _)| self.token_type(id) == TYPE_NORMAL)
            .map(|(id, token)| (token.as_str(), id))
            .collect();
        let mut merges: Vec<(usize, usize, f32)> = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            if self.token_type(id) != TYPE_NORMAL {
                continue;
            }
            let score = self.scores.get(id).copied().unwrap_or(0.0);
            let mut local: Vec<(usize, usize, f32)> = token
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let left = normal.get(&token[..at])?;
                    let right = normal.get(&token[at..])?;
                    Some((*left, *right, score))
                })
                .collect();
            local.sort_by_key(|&(left, right, _)| (left, right));
            merges.extend(local);
        }
        // Stable: equal scores keep the order built above.
        merges.sort_by(|a, b| b.2.total_cmp(&a.2));
        merges.into_iter().map(|(left, right, _)| (self.tokens[left].clone(), self.tokens[right].clone())).collect()
    }
}
