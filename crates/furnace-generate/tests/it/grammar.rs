//! Grammar-constrained decoding (llguidance): token bytes of real tokenizers, JSON schemas
//! and tool calls on a random-weight model (whose free output is garbage) and on the real
//! model.

use crate::common::smollm2;
use furnace_generate::{
    constraint, generate, parse_tool_calls, tool_call_grammar, EngineOptions, Error, FinishReason, Grammar, GrammarTokens, Output, Request,
    SamplingParams, ToolCallStyle,
};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::testdata;
use serde_json::{json, Value};
use std::sync::OnceLock;

/// The tiny random qwen2 of `testdata/` (SmolLM2's byte-level tokenizer), loaded once.
fn tiny_qwen2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| LoadedModel::load(&testdata().join("tiny-qwen2"), WeightDType::F32).expect("tiny-qwen2"))
}

/// Checks `v` against the subset of JSON schema the tests use: `type` (object, string,
/// integer, number, boolean, array), `properties`, `required`, `additionalProperties:
/// false`, `enum`, `items`, `minItems`/`maxItems`, `minLength`/`maxLength`,
/// `minimum`/`maximum`.
fn validate(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    let fail = |what: &str| Err(format!("{path}: {what} (value {v})"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return fail("not one of the enum");
        }
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(obj) = v.as_object() else { return fail("not an object") };
            for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !obj.contains_key(r.as_str().unwrap_or_default()) {
                    return fail(&format!("missing required {r}"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, x) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(s, x, &format!("{path}.{k}"))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        return fail(&format!("unexpected property {k}"))
                    }
                    None => {}
                }
            }
        }
        Some("string") => {
            let Some(s) = v.as_str() else { return fail("not a string") };
            let n = s.chars().count() as u64;
            if schema.get("minLength").and_then(Value::as_u64).is_some_and(|m| n < m)
                || schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| n > m)
            {
                return fail("string length out of range");
            }
        }
        Some("integer") | Some("number") => {
            // JSON schema's integers are numbers without a fraction (`-0` is one).
            let integer = schema["type"] == "integer";
            let Some(x) = v.as_f64().filter(|x| !integer || x.fract() == 0.0) else {
                return fail("not a number of that type");
            };
            if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m)
                || schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| x > m)
            {
                return fail("number out of range");
            }
        }
        Some("boolean") if !v.is_boolean() => return fail("not a boolean"),
        Some("boolean") => {}
        Some("array") => {
            let Some(items) = v.as_array() else { return fail("not an array") };
            let n = items.len() as u64;
            if schema.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m)
                || schema.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m)
            {
                return fail("array length out of range");
            }
            if let Some(s) = schema.get("items") {
                for (i, x) in items.iter().enumerate() {
                    validate(s, x, &format!("{path}[{i}]"))?;
                }
            }
        }
        Some(other) => return Err(format!("{path}: the test validator does not know type {other}")),
        None => {}
    }
    Ok(())
}

/// An object with required string, integer, enum and array fields.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "active": {"type": "boolean"}
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": false
    })
}

/// Generates with `grammar` from `prompt` once per seed (temperature 1).
fn sample(m: &LoadedModel, grammar: &Grammar, prompt: &str, seeds: &[u64], max_tokens: usize) -> Vec<Output> {
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    let prompt = m.tokenizer.encode(prompt, false).expect("encode");
    let reqs = seeds
        .iter()
        .map(|&seed| Request {
            prompt: prompt.clone(),
            params: SamplingParams { temperature: 1.0, seed: Some(seed), max_tokens, ..Default::default() },
            adapter: None,
            constraint: Some(constraint(&tokens, grammar).expect("grammar compiles")),
        })
        .collect();
    generate(&m.model, &m.tokenizer, reqs, EngineOptions::default()).expect("generate")
}

/// Every token's bytes are what decoding the token alone gives, wherever that decoding is
/// lossless (the bytes are UTF-8); special tokens are marked, EOS among them.
fn check_token_bytes(m: &LoadedModel) {
    let tok = &m.tokenizer;
    let tokens = GrammarTokens::new(tok).expect("grammar tokens");
    assert_eq!(tokens.vocab_size(), tok.vocab_size());
    assert_eq!(tokens.eos_ids(), tok.eos_ids());
    let (mut text, mut partial, mut special) = (0, 0, 0);
    for id in 0..tok.vocab_size() as u32 {
        let bytes = tokens.token_bytes(id).expect("in vocabulary");
        assert!(!bytes.is_empty(), "token {id} has no bytes");
        if tokens.is_special(id) {
            assert!(tok.is_special(id), "token {id} marked special");
            special += 1;
            continue;
        }
        let decoded = tok.decode(&[id], false).expect("decode");
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                assert_eq!(decoded, s, "token {id} ({:?})", tok.id_to_token(id));
                text += 1;
            }
            Err(_) => {
                // Part of a multi-byte character: decoding alone is lossy.
                assert!(decoded.contains('\u{FFFD}'), "token {id}: {decoded:?}");
                partial += 1;
            }
        }
    }
    for &eos in tok.eos_ids() {
        assert!(tokens.is_special(eos), "EOS {eos} is special");
    }
    eprintln!("{text} text tokens, {partial} partial UTF-8, {special} special");
    assert!(text > tok.vocab_size() * 9 / 10);
    // Tokens whose bytes are only part of a character join up: the bytes of "é€😀" come
    // back from the ids the tokenizer picks.
    let s = "caf\u{e9} \u{20ac}5 \u{1F600}!";
    let ids = tok.encode(s, false).expect("encode");
    let joined: Vec<u8> = ids.iter().flat_map(|&id| tokens.token_bytes(id).expect("bytes").to_vec()).collect();
    assert_eq!(joined, s.as_bytes());
}

#[test]
fn grammar_token_bytes_of_tiny_qwen2() {
    check_token_bytes(tiny_qwen2());
}

#[test]
fn grammar_token_bytes_of_smollm2() {
    check_token_bytes(smollm2());
}

#[test]
fn json_schema_holds_on_random_weights() {
    let m = tiny_qwen2();
    let schema = person_schema();
    let outs = sample(m, &Grammar::JsonSchema(schema.clone()), "Describe a person as JSON:", &[0, 1, 2, 3, 4], 400);
    for (i, o) in outs.iter().enumerate() {
        eprintln!("seed {i}: {:?} {:?}", o.finish_reason, o.text);
        assert_eq!(o.finish_reason, FinishReason::Stop, "seed {i}: {:?}", o.text);
        let v: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("seed {i}: {e}: {:?}", o.text));
        validate(&schema, &v, "$").unwrap_or_else(|e| panic!("seed {i}: {e}"));
    }
    // The outputs are samples, not one forced string.
    assert!(outs.iter().any(|o| o.text != outs[0].text));
}

#[test]
fn unconstrained_random_weights_are_not_json() {
    // The control: without the grammar the same model does not write the object.
    let m = tiny_qwen2();
    let prompt = m.tokenizer.encode("Describe a person as JSON:", false).expect("encode");
    let reqs = (0..3)
        .map(|seed| Request {
            prompt: prompt.clone(),
            params: SamplingParams { temperature: 1.0, seed: Some(seed), max_tokens: 60, ..Default::default() },
            ..Default::default()
        })
        .collect();
    let outs = generate(&m.model, &m.tokenizer, reqs, EngineOptions::default()).expect("generate");
    for o in outs {
        let valid = serde_json::from_str::<Value>(&o.text).is_ok_and(|v| validate(&person_schema(), &v, "$").is_ok());
        assert!(!valid, "{:?}", o.text);
    }
}

#[test]
fn json_object_holds_on_random_weights() {
    // Any object: keys and strings are unbounded, and a random model rarely picks a token
    // with a closing quote, so an object may still be open at the token limit. Whatever
    // stops before the limit is a whole object, and the rest are prefixes of one.
    let m = tiny_qwen2();
    let outs = sample(m, &Grammar::JsonObject, "JSON:", &[10, 11, 12, 13, 14, 15], 120);
    for (i, o) in outs.iter().enumerate() {
        eprintln!("seed {i}: {:?} {:?}", o.finish_reason, o.text);
        match o.finish_reason {
            FinishReason::Length => assert!(o.text.starts_with('{'), "{:?}", o.text),
            FinishReason::Stop => {
                let v: Value = serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("seed {i}: {e}: {:?}", o.text));
                assert!(v.is_object(), "{v}");
            }
            ref other => panic!("seed {i}: {other:?}"),
        }
    }
}

#[test]
fn json_object_holds_on_smollm2_greedy() {
    let m = smollm2();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    let prompt = m.tokenizer.encode("The capital of France as a JSON object with keys country and capital:", false).expect("encode");
    let req = Request {
        prompt,
        params: SamplingParams::greedy(80),
        adapter: None,
        constraint: Some(constraint(&tokens, &Grammar::JsonObject).expect("compiles")),
    };
    let out = generate(&m.model, &m.tokenizer, vec![req], EngineOptions::default()).expect("generate").remove(0);
    eprintln!("{:?} {:?}", out.finish_reason, out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    let v: Value = serde_json::from_str(&out.text).expect("JSON");
    assert!(v.is_object(), "{v}");
}

#[test]
fn json_schema_holds_on_smollm2_greedy() {
    let m = smollm2();
    let schema = person_schema();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    let prompt = m.tokenizer.encode("Alice is a 30 year old admin who likes chess and tea. As JSON:", false).expect("encode");
    let req = Request {
        prompt,
        params: SamplingParams::greedy(120),
        adapter: None,
        constraint: Some(constraint(&tokens, &Grammar::JsonSchema(schema.clone())).expect("compiles")),
    };
    let out = generate(&m.model, &m.tokenizer, vec![req], EngineOptions::default()).expect("generate").remove(0);
    eprintln!("{:?} {:?}", out.finish_reason, out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    let v: Value = serde_json::from_str(&out.text).expect("JSON");
    validate(&schema, &v, "$").expect("valid");
}

#[test]
fn mask_time_on_smollm2() {
    // One mask per step: how long llguidance takes over SmolLM2's 49152 tokens.
    let m = smollm2();
    let start = std::time::Instant::now();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    eprintln!("GrammarTokens::new: {:?}", start.elapsed());
    let start = std::time::Instant::now();
    let mut c = constraint(&tokens, &Grammar::JsonSchema(person_schema())).expect("compiles");
    eprintln!("constraint (compile the schema): {:?}", start.elapsed());
    let text = r#"{"name": "Alice", "age": 30, "role": "admin", "tags": ["chess", "tea"], "active": true}"#;
    let ids = m.tokenizer.encode(text, false).expect("encode");
    let mut logits = vec![0.0f32; tokens.vocab_size()];
    let mut times = Vec::new();
    for &id in &ids {
        logits.fill(0.0);
        let start = std::time::Instant::now();
        c.mask(&mut logits).expect("mask");
        times.push(start.elapsed());
        assert!(logits[id as usize].is_finite(), "token {id} of the valid text is allowed");
        c.commit(id).expect("commit");
    }
    let total: std::time::Duration = times.iter().sum();
    times.sort();
    eprintln!(
        "mask over {} tokens: mean {:?}, median {:?}, max {:?}",
        ids.len(),
        total / ids.len() as u32,
        times[times.len() / 2],
        times[times.len() - 1]
    );
    assert!(c.is_done(), "the closing brace ends the object");
    // A copy taken mid-way carries the state, then goes its own way.
    let mut copy = constraint(&tokens, &Grammar::JsonSchema(person_schema())).expect("compiles");
    let half = ids.len() / 2;
    for &id in &ids[..half] {
        copy.commit(id).expect("commit");
    }
    let mut other = copy.box_clone();
    assert!(other.commit(ids[0]).is_err(), "a second opening brace is not allowed mid-way");
    let mut other = copy.box_clone();
    for &id in &ids[half..] {
        copy.commit(id).expect("commit");
    }
    assert!(copy.is_done());
    assert!(!other.is_done(), "the clone did not move with the original");
    for &id in &ids[half..] {
        other.commit(id).expect("commit");
    }
    assert!(other.is_done());
}

/// Two tools whose arguments the random model can finish (bounded strings and numbers).
fn tools() -> Vec<(String, Value)> {
    let weather = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "unit": {"enum": ["celsius", "fahrenheit"]}
        },
        "required": ["city", "unit"],
        "additionalProperties": false
    });
    let add = json!({
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100}, "b": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["a", "b"],
        "additionalProperties": false
    });
    vec![("get_weather".to_string(), weather), ("add".to_string(), add)]
}

/// Samples tool calls in `style` on the random model; each output parses into calls to
/// known tools with valid arguments. Returns the outputs.
fn check_tool_calls(style: ToolCallStyle, parallel: bool, seeds: &[u64]) -> Vec<Vec<(String, Value)>> {
    let m = tiny_qwen2();
    let tools = tools();
    let grammar = tool_call_grammar(style, &tools, parallel);
    let outs = sample(m, &grammar, "Call a tool:", seeds, 400);
    let mut all = Vec::new();
    for (i, o) in outs.iter().enumerate() {
        eprintln!("{style:?} seed {i}: {:?} {:?}", o.finish_reason, o.text);
        // A single call ends by itself; parallel calls end with EOS after any whole call.
        let ended = if parallel {
            [FinishReason::Stop, FinishReason::Eos].contains(&o.finish_reason)
        } else {
            o.finish_reason == FinishReason::Stop
        };
        assert!(ended, "{style:?} seed {i}: {:?} {:?}", o.finish_reason, o.text);
        let calls = parse_tool_calls(style, &o.text).unwrap_or_else(|| panic!("no call in {:?}", o.text));
        if !parallel {
            assert_eq!(calls.len(), 1);
        }
        for (name, args) in &calls {
            let schema = &tools.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("unknown tool {name}")).1;
            validate(schema, args, "$").unwrap_or_else(|e| panic!("{style:?} seed {i}: {e}"));
        }
        all.push(calls);
    }
    all
}

#[test]
fn qwen2_tool_call_on_random_weights() {
    let m = tiny_qwen2();
    let tools = tools();
    let grammar = tool_call_grammar(ToolCallStyle::Qwen2, &tools, false);
    for o in sample(m, &grammar, "Call a tool:", &[5, 6, 7, 8], 300) {
        assert!(o.text.starts_with("<tool_call>\n{\"name\": \"") && o.text.ends_with("}\n</tool_call>"), "{:?}", o.text);
    }
    let calls = check_tool_calls(ToolCallStyle::Qwen2, false, &[5, 6, 7, 8]);
    // The random model picks both tools across seeds.
    assert!(calls.iter().any(|c| c[0].0 == "add") && calls.iter().any(|c| c[0].0 == "get_weather"), "{calls:?}");
}

#[test]
fn llama3_and_mistral_tool_calls_on_random_weights() {
    check_tool_calls(ToolCallStyle::Llama3, false, &[1, 2, 3]);
    check_tool_calls(ToolCallStyle::Mistral, false, &[1, 2, 3]);
}

#[test]
fn parallel_tool_calls_on_random_weights() {
    for style in [ToolCallStyle::Qwen2, ToolCallStyle::Llama3, ToolCallStyle::Mistral] {
        check_tool_calls(style, true, &[21, 22, 23]);
    }
}

#[test]
fn tool_call_grammars_compile_in_every_style() {
    let m = tiny_qwen2();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    let tools =
        vec![("f".to_string(), json!({"type": "object", "properties": {"x": {"type": "integer"}}})), ("g".to_string(), Value::Null)];
    for style in [ToolCallStyle::Qwen2, ToolCallStyle::Llama3, ToolCallStyle::Mistral] {
        for parallel in [false, true] {
            let g = tool_call_grammar(style, &tools, parallel);
            if let Err(e) = constraint(&tokens, &g) {
                panic!("{style:?} parallel={parallel}: {e}\n{g:?}");
            }
        }
    }
}

#[test]
fn bad_schema_and_grammar_are_errors() {
    let m = tiny_qwen2();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    let bad = [
        Grammar::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}})),
        Grammar::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})),
        Grammar::Lark("start: /[abc/".to_string()),
        Grammar::Lark("start: undefined_rule".to_string()),
        tool_call_grammar(ToolCallStyle::Qwen2, &[], false),
    ];
    for g in bad {
        match constraint(&tokens, &g) {
            Err(Error::Grammar(msg)) => {
                eprintln!("{g:?}: {msg}");
                assert!(!msg.is_empty());
            }
            Err(e) => panic!("{g:?}: not a grammar error: {e}"),
            Ok(_) => panic!("{g:?} compiled"),
        }
    }
}

/// Feeds `text`'s tokens to a fresh constraint of `grammar`; whether all were accepted and
/// the grammar may end there (the constraint is done, or its mask allows EOS).
fn accepts(tokens: &GrammarTokens, m: &LoadedModel, grammar: &Grammar, text: &str) -> bool {
    let mut c = constraint(tokens, grammar).expect("compiles");
    let ids = m.tokenizer.encode(text, false).expect("encode");
    if !ids.iter().all(|&id| c.commit(id).is_ok()) {
        return false;
    }
    if c.is_done() {
        return true;
    }
    let mut logits = vec![0.0f32; tokens.vocab_size()];
    c.mask(&mut logits).expect("mask");
    tokens.eos_ids().iter().any(|&eos| logits[eos as usize].is_finite())
}

#[test]
fn local_refs_and_lark_grammars_constrain() {
    let m = tiny_qwen2();
    let tokens = GrammarTokens::new(&m.tokenizer).expect("grammar tokens");
    // `$ref` to `$defs` resolves without the `referencing` feature.
    let schema = Grammar::JsonSchema(json!({
        "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 9}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/small"}},
        "required": ["a"],
        "additionalProperties": false
    }));
    assert!(accepts(&tokens, m, &schema, r#"{"a": 5}"#));
    assert!(!accepts(&tokens, m, &schema, r#"{"a": 12}"#));
    assert!(!accepts(&tokens, m, &schema, r#"{"a":5}"#), "one fixed layout");
    let lark = Grammar::Lark("start: \"yes\" | \"no\" \" \" %json {\"type\": \"integer\"}".to_string());
    assert!(accepts(&tokens, m, &lark, "yes"));
    assert!(accepts(&tokens, m, &lark, "no 42"), "may end after a number, or add digits");
    assert!(!accepts(&tokens, m, &lark, "no"), "may not end before the number");
    assert!(!accepts(&tokens, m, &lark, "maybe"));
}
