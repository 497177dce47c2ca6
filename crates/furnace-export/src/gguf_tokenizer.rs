//! The `tokenizer.*` metadata of a GGUF file built from an HF model directory's
//! `tokenizer.json` and `tokenizer_config.json`, as llama.cpp's `convert_hf_to_gguf.py`
//! builds it for byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`).

use crate::error::{io_err, Error, Result};
use candle_core::quantized::gguf_file::Value;
use furnace_text::{ChatTemplate, Tokenizer};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types (`llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;

/// The text llama.cpp's `convert_hf_to_gguf.py` (`get_vocab_base_pre`) encodes to recognise
/// a BPE pre-tokenizer: the sha256 of the ids' Python list text names it.
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1F680} (normal) \u{1F636}\u{200d}\u{1F32B}\u{FE0F} (multiple emojis concatenated) \u{2705} \u{1F999}\u{1F999} 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17B6}\u{1793}\u{17CB}\u{178F}\u{17C2}\u{1796}\u{17B7}\u{179F}\u{17C1}\u{179F}\u{17A2}\u{17B6}\u{1785}\u{1F601} ?\u{6211}\u{60F3}\u{5728}apple\u{5DE5}\u{4F5C}1314151\u{5929}\u{FF5E} ------======= \u{043D}\u{0435}\u{0449}\u{043E} \u{043D}\u{0430} \u{0411}\u{044A}\u{043B}\u{0433}\u{0430}\u{0440}\u{0441}\u{043A}\u{0438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// `chkhsh` → `tokenizer.ggml.pre`, from llama.cpp's `get_vocab_base_pre`, for the
/// pre-tokenizers furnace's GGUF tokenizer reproduces.
const KNOWN_PRE: [(&str, &str); 12] = [
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3"),
];

/// Llama 3's split regex, as HF writes it in `tokenizer.json`.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

fn read_optional_json(path: &Path) -> Result<Option<Json>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Added tokens whose text looks like a control token although the file does not mark them
/// special (`convert_hf_to_gguf.py`'s `does_token_look_special`).
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// A special token's text in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The `tokenizer.ggml.pre` name llama.cpp gives the pre-tokenizer of the HF tokenizer in
/// `dir`: by `convert_hf_to_gguf.py`'s hash of the ids of a test text when it is one
/// llama.cpp knows, else from the shape of `tokenizer.json`'s pre-tokenizer.
fn pre_tokenizer_name(dir: &Path, doc: &Json) -> Result<String> {
    let tok = Tokenizer::from_hf_dir(dir).map_err(|e| Error::Invalid(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
    let ids = tok.encode(CHKTXT, true).map_err(|e| Error::Invalid(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
    let list = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash: String = Sha256::digest(list.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    if let Some((_, name)) = KNOWN_PRE.iter().find(|(h, _)| *h == hash) {
        return Ok((*name).to_string());
    }
    let pre = &doc["pre_tokenizer"];
    let kind = |v: &Json| v.get("type").and_then(Json::as_str).unwrap_or("").to_string();
    let parts: Vec<&Json> = match kind(pre).as_str() {
        "Sequence" => pre["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        _ => vec![pre],
    };
    let kinds: Vec<String> = parts.iter().map(|p| kind(p)).collect();
    let split_regex = parts.iter().find(|p| kind(p) == "Split").and_then(|p| p["pattern"]["Regex"].as_str());
    let name = match (kinds.iter().map(String::as_str).collect::<Vec<_>>().as_slice(), split_regex) {
        (["ByteLevel"], _) if pre["use_regex"].as_bool() != Some(false) => "gpt-2",
        (["Digits", "ByteLevel"], _) if parts[0]["individual_digits"].as_bool() == Some(true) => "smollm",
        (["Split", "ByteLevel"], Some(r)) if r == LLAMA3_SPLIT => "llama-bpe",
        (["Split", "ByteLevel"], Some(r)) if r == QWEN2_SPLIT => "qwen2",
        _ => {
            return Err(Error::Invalid(format!(
                "{}: its pre-tokenizer ({}) is not one llama.cpp is known to reproduce (test hash {hash}); \
                 export from a .gguf of this model instead",
                dir.join("tokenizer.json").display(),
                serde_json::to_string(pre).unwrap_or_default()
            )))
        }
    };
    Ok(name.to_string())
}

/// The `tokenizer.*` metadata of the HF model directory `dir` for a model of `vocab_size`
/// embedding rows: tokens (ids without a token become `[PAD<id>]`, unused), their types
/// (special or special-looking added tokens control, other added tokens user-defined),
/// merges, the BOS/EOS/UNK/padding ids of `tokenizer_config.json` (or `config.json`),
/// whether BOS is added, the pre-tokenizer name and the chat template.
pub(crate) fn hf_tokenizer_metadata(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Value)>> {
    let tj_path = dir.join("tokenizer.json");
    let doc = read_json(&tj_path)?;
    let model = &doc["model"];
    let bad = |m: String| Error::Invalid(format!("{}: {m}", tj_path.display()));
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "a {} tokenizer cannot be written to GGUF from an HF directory yet (only byte-level BPE); export from a .gguf base instead",
            model["type"].as_str().unwrap_or("?")
        )));
    }
    let pre_json = doc["pre_tokenizer"].to_string();
    if !pre_json.contains("\"ByteLevel\"") {
        return Err(bad(
            "its BPE is not byte-level (SentencePiece-style): only byte-level BPE is written from an HF directory; export from a .gguf base instead"
                .into(),
        ));
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is missing".into()))?;
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    for (tok, id) in vocab {
        if let Some(id) = id.as_u64() {
            by_id.insert(id as usize, (tok.clone(), TYPE_NORMAL));
        }
    }
    for added in doc["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else { continue };
        let special = added["special"].as_bool().unwrap_or(false) || looks_special(content);
        let (text, ty) = if special { (content.to_string(), TYPE_CONTROL) } else { (content.replace('\u{2581}', " "), TYPE_USER_DEFINED) };
        by_id.insert(id as usize, (text, ty));
    }
    let n = vocab_size.max(by_id.keys().max().map_or(0, |m| m + 1));
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n {
        match by_id.remove(&id) {
            Some((t, ty)) => {
                tokens.push(Value::String(t));
                types.push(Value::I32(ty));
            }
            None => {
                tokens.push(Value::String(format!("[PAD{id}]")));
                types.push(Value::I32(TYPE_UNUSED));
            }
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => {
                Ok(Value::String(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())))
            }
            other => Err(bad(format!("merge {other} is neither \"a b\" nor [a, b]"))),
        })
        .collect::<Result<_>>()?;

    let tc = read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let cfg = read_optional_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
    let lookup = |t: &str| -> Option<u32> { tokens.iter().position(|v| matches!(v, Value::String(s) if s == t)).map(|i| i as u32) };
    let special_id = |typ: &str| -> Option<u32> {
        tc.get(format!("{typ}_token")).and_then(token_text).and_then(|t| lookup(&t)).or_else(|| {
            cfg.get(format!("{typ}_token_id")).and_then(|v| v.as_u64().or_else(|| v.as_array()?.first()?.as_u64())).map(|v| v as u32)
        })
    };
    let bos = special_id("bos");
    // BOS is added when tokenizer_config.json says so, or when tokenizer.json's
    // post-processor puts it in front of a single sequence.
    let post_adds_bos = || {
        let first = &doc["post_processor"]["single"][0]["SpecialToken"]["id"];
        matches!((first.as_str(), bos), (Some(t), Some(b)) if lookup(t) == Some(b))
    };
    let add_bos = tc.get("add_bos_token").and_then(Json::as_bool).unwrap_or_else(post_adds_bos);

    let mut out: Vec<(String, Value)> = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre_tokenizer_name(dir, &doc)?)),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.clone())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    for (typ, key) in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id")] {
        if let Some(id) = special_id(typ) {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    out.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    let template = ChatTemplate::from_hf_dir(dir).map_err(|e| Error::Invalid(format!("{}: chat template: {e}", dir.display())))?;
    if let Some(t) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.source().to_string())));
    }
    Ok(out)
}
