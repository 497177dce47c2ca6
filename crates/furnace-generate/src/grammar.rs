//! Grammar-constrained decoding with [llguidance](https://github.com/guidance-ai/llguidance):
//! JSON objects, JSON schemas, Lark grammars and tool calls, as [`Constraint`]s.
//!
//! [`GrammarTokens`] is built once per tokenizer (the exact bytes of every token, which
//! llguidance's token trie walks); [`constraint`] compiles a [`Grammar`] against it into a
//! [`Constraint`] for one request. [`tool_call_grammar`] writes the grammar of a tool call
//! in the shape a model's chat template expects, and [`parse_tool_calls`] reads calls back
//! out of generated text (constrained or not).
//!
//! JSON is generated in one fixed layout, `{"a": 1, "b": [1, 2]}` (`", "` and `": "`
//! between items, no other whitespace), unless a schema sets llguidance's own options under
//! `"x-guidance"`: a model cannot then spend its tokens on whitespace.

use std::collections::HashMap;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::constraint::Constraint;
use crate::error::{Error, Result};

/// The tokens of one tokenizer as a grammar engine sees them: the bytes each token id
/// stands for, which ids are special, and which end a sequence. Cheap to clone (shared
/// behind an [`Arc`]); build it once per tokenizer.
#[derive(Clone)]
pub struct GrammarTokens {
    inner: Arc<TokensInner>,
}

struct TokensInner {
    factory: ParserFactory,
    /// Bytes of each id; special tokens have llguidance's marker `0xFF` in front of their
    /// text, so no grammar text ever produces them.
    bytes: Vec<Vec<u8>>,
    eos: Vec<u32>,
}

/// How a vocabulary spells bytes in its token strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2's byte-level alphabet: every byte is one printable character.
    ByteLevel,
    /// SentencePiece: `▁` is a space and `<0xNN>` the byte `NN`.
    SentencePiece,
    /// Token strings are the text itself.
    Plain,
}

/// GPT-2's byte-to-character table, inverted: the byte each alphabet character stands for.
fn byte_level_alphabet() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        let c = b as char;
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            map.insert(c, b);
        } else if let Some(c) = char::from_u32(next) {
            map.insert(c, b);
            next += 1;
        }
    }
    map
}

/// The spelling of a tokenizer, from its decoder: `ByteLevel` anywhere means byte-level;
/// `ByteFallback`, `Metaspace` or a `Replace` of `▁` mean SentencePiece.
fn spelling(hf: &tokenizers::Tokenizer) -> Spelling {
    let Some(decoder) = hf.get_decoder() else { return Spelling::Plain };
    let Ok(v) = serde_json::to_value(decoder) else { return Spelling::Plain };
    let mut types = Vec::new();
    fn collect(v: &Value, types: &mut Vec<String>) {
        if let Some(t) = v.get("type").and_then(Value::as_str) {
            let replace_metaspace = t == "Replace" && v.pointer("/pattern/String").and_then(Value::as_str) == Some("\u{2581}");
            types.push(if replace_metaspace { "ReplaceMetaspace".to_string() } else { t.to_string() });
        }
        if let Some(ds) = v.get("decoders").and_then(Value::as_array) {
            for d in ds {
                collect(d, types);
            }
        }
    }
    collect(&v, &mut types);
    if types.iter().any(|t| t == "ByteLevel") {
        Spelling::ByteLevel
    } else if types.iter().any(|t| matches!(t.as_str(), "ByteFallback" | "Metaspace" | "ReplaceMetaspace")) {
        Spelling::SentencePiece
    } else {
        Spelling::Plain
    }
}

/// The bytes of a SentencePiece byte token `<0xNN>`.
fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// What llguidance asks of a tokenizer besides the trie: tokenizing text (used for forced
/// text only; greedy over the trie where the tokenizer cannot take the bytes).
struct Env {
    trie: TokTrie,
    tokenizer: furnace_text::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s).ok().and_then(|text| self.tokenizer.encode(text, false).ok()) {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The bytes of every token id of `tokenizer` (see [`GrammarTokens::new`]).
fn vocabulary_bytes(tokenizer: &furnace_text::Tokenizer) -> Vec<Vec<u8>> {
    let hf = tokenizer.hf_tokenizer();
    let added = hf.get_added_tokens_decoder();
    let n = tokenizer.vocab_size().max(added.keys().map(|&id| id as usize + 1).max().unwrap_or(0));
    let spelling = spelling(hf);
    let alphabet = if spelling == Spelling::ByteLevel { byte_level_alphabet() } else { HashMap::new() };
    let mut bytes = Vec::with_capacity(n);
    for id in 0..n as u32 {
        let special = tokenizer.is_special(id) || added.get(&id).is_some_and(|t| t.special);
        let Some(piece) = hf.id_to_token(id) else {
            bytes.push(Vec::new());
            continue;
        };
        let b = if special {
            let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            b.extend_from_slice(piece.as_bytes());
            b
        } else if let Some(t) = added.get(&id) {
            t.content.as_bytes().to_vec()
        } else {
            match spelling {
                Spelling::ByteLevel => {
                    let mapped: Option<Vec<u8>> = piece.chars().map(|c| alphabet.get(&c).copied()).collect();
                    mapped.unwrap_or_else(|| piece.as_bytes().to_vec())
                }
                Spelling::SentencePiece => match sentencepiece_byte(&piece) {
                    Some(b) => vec![b],
                    None => piece.replace('\u{2581}', " ").into_bytes(),
                },
                Spelling::Plain => piece.into_bytes(),
            }
        };
        bytes.push(b);
    }
    bytes
}

impl GrammarTokens {
    /// The tokens of `tokenizer`. Special tokens (special added tokens, BOS, EOS, PAD, UNK)
    /// are marked so that grammars never produce them (EOS aside, allowed where a grammar may
    /// end); other added tokens (like Qwen2.5's `<tool_call>`) stand for their text.
    ///
    /// Fails when the tokenizer has no end-of-sequence token.
    pub fn new(tokenizer: &furnace_text::Tokenizer) -> Result<Self> {
        let bytes = vocabulary_bytes(tokenizer);
        let n = bytes.len();
        let eos: Vec<u32> = tokenizer.eos_ids().iter().copied().filter(|&id| (id as usize) < n).collect();
        let Some(&first_eos) = eos.first() else {
            return Err(Error::Grammar("the tokenizer has no end-of-sequence token".to_string()));
        };
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, first_eos), &bytes).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(Env { trie, tokenizer: tokenizer.clone() });
        let caps = InferenceCapabilities { ff_tokens: false, backtrack: false, conditional_ff_tokens: false, fork: false };
        let mut factory = ParserFactory::new(&env, caps, &llguidance::earley::SlicedBiasComputer::general_slices())
            .map_err(|e| Error::Grammar(e.to_string()))?;
        factory.set_stderr_log_level(0);
        factory.set_buffer_log_level(0);
        Ok(GrammarTokens { inner: Arc::new(TokensInner { factory, bytes, eos }) })
    }

    /// The bytes token `id` stands for (special tokens: `0xFF` then their text); `None`
    /// outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.inner.bytes.get(id as usize).map(Vec::as_slice)
    }

    /// Whether `id` is special (never produced by a grammar's text).
    pub fn is_special(&self, id: u32) -> bool {
        self.token_bytes(id).is_some_and(|b| b.first() == Some(&TokTrie::SPECIAL_TOKEN_MARKER))
    }

    /// The ids that end a sequence (allowed where the grammar may end).
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos
    }

    /// The number of token ids (ids at or above it are never allowed).
    pub fn vocab_size(&self) -> usize {
        self.inner.bytes.len()
    }
}

impl std::fmt::Debug for GrammarTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarTokens").field("vocab_size", &self.vocab_size()).field("eos", &self.inner.eos).finish()
    }
}

/// What a constrained sequence must generate.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid under this JSON schema (OpenAI's `json_schema` response format).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect (`%json {schema}` embeds a JSON schema).
    Lark(String),
}

/// llguidance's JSON layout options: no free whitespace, `", "` and `": "` separators.
fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// `schema` with [`json_layout`] unless it sets its own `x-guidance` options.
fn with_layout(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}

/// The llguidance grammar of `grammar`.
fn top_level(grammar: &Grammar) -> TopLevelGrammar {
    match grammar {
        Grammar::JsonObject => TopLevelGrammar::from_json_schema(with_layout(&json!({"type": "object"}))),
        Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema)),
        Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
    }
}

/// A [`Constraint`] that follows an llguidance [`Matcher`].
struct GrammarConstraint {
    matcher: Matcher,
}

impl Constraint for GrammarConstraint {
    fn mask(&mut self, logits: &mut [f32]) -> std::result::Result<(), String> {
        let allowed = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let n = allowed.len().min(logits.len());
        let (known, beyond) = logits.split_at_mut(n);
        allowed.iter_unset_entries(|i| {
            if let Some(l) = known.get_mut(i) {
                *l = f32::NEG_INFINITY;
            }
        });
        beyond.fill(f32::NEG_INFINITY);
        Ok(())
    }

    fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn box_clone(&self) -> Box<dyn Constraint> {
        Box::new(GrammarConstraint { matcher: self.matcher.deep_clone() })
    }
}

/// A fresh [`Constraint`] that keeps a sequence within `grammar`: at each step only tokens
/// that continue it are allowed, EOS only where the grammar may end, and the constraint is
/// done once nothing more can follow (a JSON value ends with its closing brace).
///
/// Fails with [`Error::Grammar`] (llguidance's message) when the schema or grammar does not
/// compile.
pub fn constraint(tokens: &GrammarTokens, grammar: &Grammar) -> Result<Box<dyn Constraint>> {
    let parser = tokens.inner.factory.create_parser(top_level(grammar)).map_err(|e| Error::Grammar(e.to_string()))?;
    let matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(Error::Grammar(e));
    }
    Ok(Box::new(GrammarConstraint { matcher }))
}

/// How a model's chat template spells a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToolCallStyle {
    /// Qwen2 / Hermes: `<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>`, one
    /// block per call.
    Qwen2,
    /// Llama 3.1+: `{"name": "NAME", "parameters": {...}}` (several joined by `; `).
    Llama3,
    /// Mistral: `[TOOL_CALLS] [{"name": "NAME", "arguments": {...}}, ...]`.
    Mistral,
}

impl ToolCallStyle {
    /// The key that holds a call's arguments.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolCallStyle::Llama3 => "parameters",
            ToolCallStyle::Qwen2 | ToolCallStyle::Mistral => "arguments",
        }
    }
}

/// `text` as a Lark string literal.
fn lark_literal(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// A Lark grammar whose output is exactly a tool call in `style`: the name one of `tools`'
/// names, the arguments a JSON object valid under that tool's parameters schema (any object
/// where the schema is `null` or empty). With `parallel`, one or more calls; otherwise
/// exactly one. With no tools there is no call to make: the grammar is unsatisfiable and
/// [`constraint`] reports it as an error.
pub fn tool_call_grammar(style: ToolCallStyle, tools: &[(String, Value)], parallel: bool) -> Grammar {
    let mut lark = String::new();
    match style {
        ToolCallStyle::Qwen2 => {
            lark.push_str(&format!("block: {} call {}\n", lark_literal("<tool_call>\n"), lark_literal("\n</tool_call>")));
            if parallel {
                lark.push_str(&format!("start: block ({} block)*\n", lark_literal("\n")));
            } else {
                lark.push_str("start: block\n");
            }
        }
        ToolCallStyle::Llama3 => {
            if parallel {
                lark.push_str(&format!("start: call ({} call)*\n", lark_literal("; ")));
            } else {
                lark.push_str("start: call\n");
            }
        }
        ToolCallStyle::Mistral => {
            let more = if parallel { format!(" ({} call)*", lark_literal(", ")) } else { String::new() };
            lark.push_str(&format!("start: {} call{more} {}\n", lark_literal("[TOOL_CALLS] ["), lark_literal("]")));
        }
    }
    let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("fn_{i}")).collect();
    if alternatives.is_empty() {
        // No function to call: a schema nothing satisfies (llguidance rejects it).
        lark.push_str("call: %json {\"not\": {}}\n");
    } else {
        lark.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    }
    for (i, (name, params)) in tools.iter().enumerate() {
        let name_json = serde_json::to_string(name).unwrap_or_default();
        let head = format!("{{\"name\": {name_json}, \"{}\": ", style.arguments_key());
        let schema = match params {
            Value::Null => json!({"type": "object"}),
            Value::Object(o) if o.is_empty() => json!({"type": "object"}),
            other => other.clone(),
        };
        let schema = serde_json::to_string(&with_layout(&schema)).unwrap_or_default();
        lark.push_str(&format!("fn_{i}: {} %json {schema} {}\n", lark_literal(&head), lark_literal("}")));
    }
    Grammar::Lark(lark)
}

/// One call object `{"name": ..., KEY: {...}}`: the name and the arguments (an arguments
/// string holding JSON is parsed).
fn call_of(v: &Value, key: &str) -> Option<(String, Value)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get(key).or_else(|| v.get("arguments")).or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
    let args = match args {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        other => other,
    };
    Some((name, args))
}

/// The tool calls in generated `text` spelled in `style`; `None` when the text holds no
/// well-formed call. Works on unconstrained text too: surrounding whitespace is ignored,
/// and for [`ToolCallStyle::Llama3`] a leading `<|python_tag|>`.
pub fn parse_tool_calls(style: ToolCallStyle, text: &str) -> Option<Vec<(String, Value)>> {
    let key = style.arguments_key();
    let calls = match style {
        ToolCallStyle::Qwen2 => {
            let mut calls = Vec::new();
            let mut rest = text;
            while let Some(start) = rest.find("<tool_call>") {
                let after = &rest[start + "<tool_call>".len()..];
                let end = after.find("</tool_call>").unwrap_or(after.len());
                let v: Value = serde_json::from_str(after[..end].trim()).ok()?;
                calls.push(call_of(&v, key)?);
                rest = &after[end..];
            }
            calls
        }
        ToolCallStyle::Llama3 => {
            let body = text.trim();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
            let mut calls = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
                let Some(Ok(v)) = stream.next() else { break };
                calls.push(call_of(&v, key)?);
                rest = rest[stream.byte_offset()..].trim_start();
                // Calls are joined by `; `.
                rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
            }
            calls
        }
        ToolCallStyle::Mistral => {
            let start = text.find("[TOOL_CALLS]")?;
            let after = text[start + "[TOOL_CALLS]".len()..].trim_start();
            let mut stream = serde_json::Deserializer::from_str(after).into_iter::<Value>();
            let v = stream.next()?.ok()?;
            match v {
                Value::Array(items) => items.iter().map(|c| call_of(c, key)).collect::<Option<Vec<_>>>()?,
                obj @ Value::Object(_) => vec![call_of(&obj, key)?],
                _ => return None,
            }
        }
    };
    if calls.is_empty() {
        None
    } else {
        Some(calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let map = byte_level_alphabet();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(map[&'\u{120}'], b' ');
        assert_eq!(map[&'\u{10A}'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn sentencepiece_bytes() {
        assert_eq!(sentencepiece_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(sentencepiece_byte("<0xFF>"), Some(0xFF));
        assert_eq!(sentencepiece_byte("<0x0>"), None);
        assert_eq!(sentencepiece_byte("<s>"), None);
    }

    #[test]
    fn tool_calls_parse_in_each_style() {
        let q = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"y\\\": 2}\"}\n</tool_call>";
        assert_eq!(parse_tool_calls(ToolCallStyle::Qwen2, q), Some(vec![("a".into(), json!({"x": 1})), ("b".into(), json!({"y": 2}))]));
        assert_eq!(parse_tool_calls(ToolCallStyle::Qwen2, "no call here"), None);
        assert_eq!(parse_tool_calls(ToolCallStyle::Qwen2, "<tool_call>\n{\"name\": \"a\", \"argu"), None);
        let l = "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"x\": 1}}";
        assert_eq!(parse_tool_calls(ToolCallStyle::Llama3, l), Some(vec![("a".into(), json!({"x": 1}))]));
        let l2 = "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"z\": [1]}}";
        assert_eq!(parse_tool_calls(ToolCallStyle::Llama3, l2), Some(vec![("a".into(), json!({})), ("b".into(), json!({"z": [1]}))]));
        assert_eq!(parse_tool_calls(ToolCallStyle::Llama3, "Hello there"), None);
        let m = "[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": \"y\"}}, {\"name\": \"b\", \"arguments\": {}}]";
        assert_eq!(parse_tool_calls(ToolCallStyle::Mistral, m), Some(vec![("a".into(), json!({"x": "y"})), ("b".into(), json!({}))]));
        assert_eq!(parse_tool_calls(ToolCallStyle::Mistral, "[{\"name\": \"a\"}]"), None);
    }

    #[test]
    fn tool_call_grammar_names_each_tool() {
        let tools = vec![("get_weather".to_string(), json!({"type": "object"})), ("say \"hi\"".to_string(), Value::Null)];
        let Grammar::Lark(g) = tool_call_grammar(ToolCallStyle::Qwen2, &tools, true) else { panic!("lark") };
        assert!(g.contains("fn_0 | fn_1"), "{g}");
        assert!(g.contains(r#""{\"name\": \"get_weather\", \"arguments\": ""#), "{g}");
        assert!(g.contains(r#""{\"name\": \"say \\\"hi\\\"\", \"arguments\": ""#), "{g}");
        assert!(g.contains("block (\"\\n\" block)*"), "{g}");
    }

    /// A small SentencePiece-style (Llama 2) tokenizer: `▁` for spaces, byte fallback.
    fn sentencepiece_tokenizer() -> furnace_text::Tokenizer {
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        };
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
            "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "<0xA9>": 5,
                                "\u{2581}": 6, "h": 7, "i": 8, "\u{2581}h": 9, "\u{2581}hi": 10},
                      "merges": ["\u{2581} h", "\u{2581}h i"]}
        });
        furnace_text::Tokenizer::from_json(&tj.to_string(), std::path::Path::new("sp.json")).expect("tokenizer")
    }

    #[test]
    fn sentencepiece_vocabulary_bytes() {
        let tok = sentencepiece_tokenizer();
        let bytes = vocabulary_bytes(&tok);
        assert_eq!(bytes.len(), 11);
        for (id, b) in bytes.iter().enumerate().take(3) {
            assert_eq!(b[0], TokTrie::SPECIAL_TOKEN_MARKER, "{id} is special");
        }
        assert_eq!(bytes[3], b"\n");
        assert_eq!(bytes[4], [0xC3]);
        assert_eq!(bytes[5], [0xA9]);
        assert_eq!(bytes[6], b" ");
        assert_eq!(bytes[10], b" hi");
        // The bytes of the ids the tokenizer picks spell the text (with SentencePiece's
        // leading space), "é" from its two byte tokens.
        let text = "hi hi\n\u{e9}";
        let ids = tok.encode(text, false).expect("encode");
        let joined: Vec<u8> = ids.iter().flat_map(|&id| bytes[id as usize].clone()).collect();
        assert_eq!(joined, format!(" {text}").as_bytes(), "{ids:?}");
        assert_eq!(tok.decode(&ids, false).expect("decode"), text);
    }
}
