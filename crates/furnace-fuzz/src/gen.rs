//! Seeds (real files of the repository and hand-built ones) and structure-aware
//! generators: inputs that are well-formed up to a crafted count, length, type, offset
//! or value, which byte mutation alone rarely reaches.

use crate::mutate::{INTERESTING_NUMBERS, INTERESTING_U64};
use crate::rng::Rng;
use crate::targets::testdata;
use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(testdata().join(rel)).unwrap_or_default()
}

// ---------------------------------------------------------------- GGUF

fn gguf_bytes(arch: &str, tok_model: &str, rope_freqs: bool) -> candle_core::Result<Vec<u8>> {
    let zeros = |shape: &[usize]| QTensor::quantize(&Tensor::zeros(shape, DType::F32, &Device::Cpu)?, GgmlDType::F32);
    let embd = zeros(&[8, 32])?;
    let norm = zeros(&[32])?;
    let freqs = zeros(&[4])?;
    let s = |v: &str| GValue::String(v.to_string());
    let strs = |v: &[&str]| GValue::Array(v.iter().map(|x| s(x)).collect());
    let tokens = ["<s>", "</s>", "a", "b", "c", "ab", "\u{2581}a", "abc"];
    let k = |x: &str| format!("{arch}.{x}");
    let meta: Vec<(String, GValue)> = vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("fuzz")),
        ("general.alignment".into(), GValue::U32(32)),
        (k("embedding_length"), GValue::U32(32)),
        (k("attention.head_count"), GValue::U32(4)),
        (k("attention.head_count_kv"), GValue::U32(2)),
        (k("feed_forward_length"), GValue::U32(64)),
        (k("block_count"), GValue::U32(1)),
        (k("context_length"), GValue::U32(128)),
        (k("rope.freq_base"), GValue::F32(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), GValue::F32(1e-5)),
        ("tokenizer.ggml.model".into(), s(tok_model)),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        ("tokenizer.ggml.token_type".into(), GValue::Array([3, 3, 1, 1, 1, 1, 1, 4].iter().map(|&t| GValue::I32(t)).collect())),
        ("tokenizer.ggml.merges".into(), strs(&["a b", "ab c"])),
        ("tokenizer.ggml.scores".into(), GValue::Array((0..8).map(|i| GValue::F32(-(i as f32))).collect())),
        ("tokenizer.ggml.bos_token_id".into(), GValue::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), GValue::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), GValue::Bool(true)),
        ("tokenizer.chat_template".into(), s("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")),
    ];
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut tensors = vec![("token_embd.weight", &embd), ("output_norm.weight", &norm)];
    if rope_freqs {
        tensors.push(("rope_freqs.weight", &freqs));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensors)?;
    Ok(out.into_inner())
}

/// Small valid GGUF models (llama with a byte-level BPE tokenizer, qwen2 with RoPE
/// factors and a SentencePiece tokenizer).
pub fn gguf_seeds() -> Vec<Vec<u8>> {
    [("llama", "gpt2", false), ("qwen2", "llama", true), ("mistral", "gpt2", true)]
        .iter()
        .filter_map(|&(a, t, f)| gguf_bytes(a, t, f).ok())
        .collect()
}

const GGUF_KEYS: [&str; 16] = [
    "general.architecture",
    "general.alignment",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.context_length",
    "llama.vocab_size",
    "llama.rope.scaling.type",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.chat_template",
];

fn put_len(out: &mut Vec<u8>, v: u64, v1: bool) {
    if v1 {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn small_or_huge(rng: &mut Rng, small: u64) -> u64 {
    if rng.one_in(4) {
        INTERESTING_U64[rng.below(INTERESTING_U64.len())]
    } else {
        rng.next_u64() % (small + 1)
    }
}

fn gguf_value(rng: &mut Rng, out: &mut Vec<u8>, t: u32, v1: bool, depth: usize) {
    match t {
        0 | 1 | 7 => out.push(if rng.one_in(2) { rng.next_u64() as u8 } else { rng.below(2) as u8 }),
        2 | 3 => out.extend_from_slice(&(small_or_huge(rng, 64) as u16).to_le_bytes()),
        4 | 5 => out.extend_from_slice(&(small_or_huge(rng, 64) as u32).to_le_bytes()),
        6 => out.extend_from_slice(&[1.0f32, 0.0, -1.0, f32::NAN, f32::INFINITY, 1e30][rng.below(6)].to_le_bytes()),
        10 | 11 => out.extend_from_slice(&small_or_huge(rng, 64).to_le_bytes()),
        12 => out.extend_from_slice(&[1.0f64, 0.0, f64::NAN, 1e300][rng.below(4)].to_le_bytes()),
        8 => {
            let s: &[u8] = [&b"llama"[..], b"qwen2", b"gpt2", b"linear", b"a b", b"{{ x }}", b""][rng.below(7)];
            let len = if rng.one_in(6) { small_or_huge(rng, 16) } else { s.len() as u64 };
            put_len(out, len, v1);
            out.extend_from_slice(s);
        }
        _ => {
            let et = if depth < 3 { [4u32, 5, 8, 9, 6, 0, 13][rng.below(7)] } else { 4 };
            out.extend_from_slice(&et.to_le_bytes());
            let n = small_or_huge(rng, 8);
            put_len(out, n, v1);
            for _ in 0..n.min(8) {
                gguf_value(rng, out, et, v1, depth + 1);
            }
        }
    }
}

/// A GGUF header built field by field with crafted counts, lengths, value types, tensor
/// dimensions, data types and offsets.
pub fn gguf_crafted(rng: &mut Rng) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    let version = [3u32, 3, 2, 1, 0, 4][rng.below(6)];
    let v1 = version == 1;
    out.extend_from_slice(&version.to_le_bytes());
    let n_tensors = rng.below(4) as u64;
    let n_kv = 1 + rng.below(8) as u64;
    put_len(&mut out, if rng.one_in(8) { small_or_huge(rng, 4) } else { n_tensors }, v1);
    put_len(&mut out, if rng.one_in(8) { small_or_huge(rng, 4) } else { n_kv }, v1);
    for i in 0..n_kv {
        let key = if i == 0 { "general.architecture" } else { GGUF_KEYS[rng.below(GGUF_KEYS.len())] };
        let len = if rng.one_in(10) { small_or_huge(rng, 64) } else { key.len() as u64 };
        put_len(&mut out, len, v1);
        out.extend_from_slice(key.as_bytes());
        let t = if i == 0 && rng.one_in(2) {
            8
        } else if rng.one_in(10) {
            rng.below(20) as u32
        } else {
            rng.below(13) as u32
        };
        out.extend_from_slice(&t.to_le_bytes());
        gguf_value(rng, &mut out, t, v1, 0);
    }
    for _ in 0..n_tensors {
        let name: &[u8] = [&b"token_embd.weight"[..], b"rope_freqs.weight", b"output.weight", b"blk.0.attn_q.bias"][rng.below(4)];
        put_len(&mut out, name.len() as u64, v1);
        out.extend_from_slice(name);
        let dims = if rng.one_in(6) { rng.below(7) as u32 } else { 1 + rng.below(3) as u32 };
        out.extend_from_slice(&dims.to_le_bytes());
        for _ in 0..dims.min(6) {
            put_len(&mut out, small_or_huge(rng, 64), v1);
        }
        let dtype = if rng.one_in(4) { rng.below(40) as u32 } else { [0u32, 1, 8, 30][rng.below(4)] };
        out.extend_from_slice(&dtype.to_le_bytes());
        out.extend_from_slice(&small_or_huge(rng, 256).to_le_bytes());
    }
    let pad = rng.below(64) + rng.below(2) * 1024;
    out.extend((0..pad).map(|_| rng.next_u64() as u8));
    out
}

// ---------------------------------------------------------------- safetensors

fn safetensors_file(header: &Value, data_len: usize) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

/// Small valid safetensors files.
pub fn safetensors_seeds() -> Vec<Vec<u8>> {
    vec![
        safetensors_file(&json!({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "__metadata__": {"format": "pt"}}), 16),
        safetensors_file(
            &json!({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}, "b": {"dtype": "I64", "shape": [], "data_offsets": [6, 14]}}),
            14,
        ),
        safetensors_file(&json!({}), 0),
    ]
}

/// A safetensors header with crafted dtypes, shapes, offsets and length field.
pub fn safetensors_crafted(rng: &mut Rng) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    for i in 0..rng.below(4) {
        let dtype = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "Q4", ""][rng.below(9)];
        let shape: Vec<Value> = (0..rng.below(5)).map(|_| json!(small_or_huge(rng, 8))).collect();
        let a = small_or_huge(rng, 32);
        let b = if rng.one_in(2) { a.saturating_add(rng.below(64) as u64) } else { small_or_huge(rng, 64) };
        header.insert(format!("t{i}"), json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}));
    }
    let mut out = safetensors_file(&Value::Object(header), rng.below(128));
    if rng.one_in(5) {
        let v = INTERESTING_U64[rng.below(INTERESTING_U64.len())];
        out[..8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------- JSON helpers

fn interesting_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(10) {
        0 => Value::Null,
        1 => json!(rng.one_in(2)),
        2 | 3 => serde_json::from_str(INTERESTING_NUMBERS[rng.below(11)]).unwrap_or(Value::Null),
        4 => json!((small_or_huge(rng, 10) as i64).wrapping_neg()),
        5 => {
            let long = "x".repeat(rng.below(300));
            json!(["", "a", "\u{0}", "llama", "llama3", "linear", "default", "<s>", "{{", long.as_str()][rng.below(10)])
        }
        6 if depth < 4 => Value::Array((0..rng.below(5)).map(|_| interesting_json(rng, depth + 1)).collect()),
        7 if depth < 4 => {
            let keys = ["type", "factor", "content", "id", "role", "messages", "vocab", "merges", "rope_type"];
            Value::Object((0..rng.below(4)).map(|_| (keys[rng.below(keys.len())].to_string(), interesting_json(rng, depth + 1))).collect())
        }
        8 => {
            // Deep nesting (serde_json stops at 128 levels).
            let d = rng.below(300);
            serde_json::from_str(&format!("{}{}", "[".repeat(d), "]".repeat(d))).unwrap_or(Value::Null)
        }
        _ => json!(small_or_huge(rng, 100)),
    }
}

/// Replaces one to four random nodes of `v` with interesting values.
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
    for _ in 0..1 + rng.below(4) {
        replace_random_node(rng, v, 0);
    }
}

fn replace_random_node(rng: &mut Rng, v: &mut Value, depth: usize) {
    let stop = rng.one_in(4) || depth > 8;
    match v {
        Value::Object(m) if !m.is_empty() && !stop => {
            let i = rng.below(m.len());
            if let Some((_, child)) = m.iter_mut().nth(i) {
                replace_random_node(rng, child, depth + 1);
            }
        }
        Value::Array(a) if !a.is_empty() && !stop => {
            let i = rng.below(a.len());
            replace_random_node(rng, &mut a[i], depth + 1);
        }
        _ => *v = interesting_json(rng, 0),
    }
}

fn json_mutant(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = rng.pick(seeds).cloned().unwrap_or_default();
    let mut v: Value = serde_json::from_slice(&seed).unwrap_or(Value::Null);
    mutate_json(rng, &mut v);
    v.to_string().into_bytes()
}

// ---------------------------------------------------------------- config.json

/// `config.json` of the tiny checkpoints plus a llama3-scaled one.
pub fn config_seeds() -> Vec<Vec<u8>> {
    let mut v = vec![read("tiny-llama/config.json"), read("tiny-qwen2/config.json")];
    v.push(
        json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
               "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 512,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}})
        .to_string()
        .into_bytes(),
    );
    v.retain(|s| !s.is_empty());
    v
}

/// A seed config with crafted values.
pub fn config_crafted(rng: &mut Rng) -> Vec<u8> {
    json_mutant(rng, &config_seeds())
}

// ---------------------------------------------------------------- tokenizer.json

const BPE_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}}],
"pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],"special_tokens":{"<s>":{"id":"<s>","ids":[0],"tokens":["<s>"]}}},
"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
"vocab":{"<s>":0,"H":1,"e":2,"l":3,"o":4,"He":5,"ll":6,"Hell":7,"Ġ":8,"w":9,"1":10},"merges":["H e","l l","He ll"]}}"#;

const UNIGRAM_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]},
"pre_tokenizer":null,"post_processor":null,
"decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]},
"model":{"type":"Unigram","unk_id":0,"vocab":[["<unk>",0.0],["▁",-1.0],["H",-2.0],["e",-2.0],["llo",-3.0],["<0x41>",-5.0]],"byte_fallback":true}}"#;

const WORDPIECE_TOKENIZER: &str = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},
"pre_tokenizer":{"type":"BertPreTokenizer"},"post_processor":null,"decoder":{"type":"WordPiece","prefix":"##","cleanup":true},
"model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
"vocab":{"[UNK]":0,"he":1,"##llo":2,"world":3}}}"###;

/// Small tokenizers of each model kind.
pub fn tokenizer_seeds() -> Vec<Vec<u8>> {
    [BPE_TOKENIZER, UNIGRAM_TOKENIZER, WORDPIECE_TOKENIZER].iter().map(|s| s.as_bytes().to_vec()).collect()
}

/// A seed tokenizer with crafted values.
pub fn tokenizer_crafted(rng: &mut Rng) -> Vec<u8> {
    json_mutant(rng, &tokenizer_seeds())
}

// ---------------------------------------------------------------- chat templates

/// The tiny checkpoints' templates and hand-written ones in the styles of common models.
pub fn template_seeds() -> Vec<Vec<u8>> {
    let mut v = vec![read("tiny-llama/chat_template.jinja"), read("tiny-qwen2/chat_template.jinja")];
    v.extend(
        [
            "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
            "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
            "{%- for m in messages -%}{{ m.role | upper }}: {{ m.content.strip() | tojson }}{% if not loop.last %}\n{% endif %}{%- endfor -%}{{ messages | length }}{{ strftime_now('%Y') }}",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    v.retain(|s| !s.is_empty());
    v
}

/// Templates built from snippets that loop long, recurse, or build large values.
pub fn template_crafted(rng: &mut Rng) -> Vec<u8> {
    // Small counts mostly: an input that burns the whole fuel budget takes ~0.1 s, so
    // the huge ones come one time in eight.
    let small = ["0", "3", "10", "-1", "messages|length", "'7'|int"];
    let huge = ["100000", "10**9", "2**62", "99999999999999999999999"];
    let num = |rng: &mut Rng| if rng.one_in(8) { huge[rng.below(huge.len())] } else { small[rng.below(small.len())] };
    let mut out = String::new();
    for _ in 0..1 + rng.below(4) {
        let a = num(rng);
        let b = num(rng);
        let s = match rng.below(12) {
            0 => format!("{{% for i in range({a}) %}}x{{% endfor %}}"),
            1 => format!("{{% for i in range({a}) %}}{{% for j in range({b}) %}}{{{{ i }}}}{{% endfor %}}{{% endfor %}}"),
            2 => "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".to_string(),
            // Repetition stays small: `messages * 9999999` is an open finding (see
            // docs/fuzzing.md), and would stop the run as a hang.
            3 => format!("{{{{ 'ab' * {} }}}}", small[rng.below(small.len())]),
            // Doubling a string by recursion: bounded here (2^24 bytes), see docs/fuzzing.md on why
            // more is an open finding (minijinja does not limit `~`).
            4 => {
                let d = if rng.one_in(16) { 24 } else { [4, 8, 12][rng.below(3)] };
                format!("{{% macro f(s, n) %}}{{% if n > 0 %}}{{{{ f(s ~ s, n - 1) }}}}{{% else %}}{{{{ s|length }}}}{{% endif %}}{{% endmacro %}}{{{{ f('ab', {d}) }}}}")
            }
            5 => format!("{{{{ messages * {} }}}}", small[rng.below(small.len())]),
            6 => format!("{{{{ (messages * {}) | tojson }}}}", small[rng.below(small.len())]),
            7 => "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}".to_string(),
            8 => format!("{{{{ range({a}) | join(',') }}}}"),
            9 => format!("{{{{ {a} ** {b} }}}}"),
            10 => format!("{{% for m in messages %}}{{{{ m['content'] * {} }}}}{{% endfor %}}", small[rng.below(small.len())]),
            _ => format!("{{{{ '%s' | format({a}) }}}}{{{{ raise_exception('bad ' ~ {b}) }}}}"),
        };
        out.push_str(&s);
    }
    out.into_bytes()
}

// ---------------------------------------------------------------- spec TOML

const SPEC: &str = r#"[experiment]
name = "fuzz"
seed = 1
num_chunks = 2
policy = "asha"
eta = 2

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "tiny"
quantize = "none"

[lora]
r = 4
alpha = 8
dropout = 0.0
targets = ["q_proj", "v_proj"]

[trainer]
learning_rate = 1e-3
epochs = 1
batch_size = 2
max_seq_len = 64
max_steps = 10
"#;

/// The example specs of the repository and a small one.
pub fn spec_seeds() -> Vec<Vec<u8>> {
    let root = testdata().join("../examples");
    let mut v: Vec<Vec<u8>> =
        ["sweep.toml", "extract.toml"].iter().map(|f| std::fs::read(root.join(f)).unwrap_or_default()).filter(|s| !s.is_empty()).collect();
    v.push(SPEC.as_bytes().to_vec());
    v.push(format!("{SPEC}\n[search]\nkind = \"random\"\nnum_runs = 3\n").into_bytes());
    v
}

const SPEC_KEYS: [(&str, &str); 24] = [
    ("experiment", "seed"),
    ("experiment", "num_chunks"),
    ("experiment", "eta"),
    ("experiment", "name"),
    ("experiment", "policy"),
    ("lora", "r"),
    ("lora", "alpha"),
    ("lora", "dropout"),
    ("lora", "targets"),
    ("lora", "init"),
    ("trainer", "learning_rate"),
    ("trainer", "epochs"),
    ("trainer", "max_steps"),
    ("trainer", "batch_size"),
    ("trainer", "grad_accum"),
    ("trainer", "max_seq_len"),
    ("trainer", "warmup_steps"),
    ("trainer", "warmup_ratio"),
    ("trainer", "eval_every"),
    ("trainer", "save_every"),
    ("trainer", "schedule"),
    ("model", "quantize"),
    ("search", "num_runs"),
    ("search", "kind"),
];

fn toml_value(rng: &mut Rng, depth: usize) -> String {
    match rng.below(12) {
        0..=2 => INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())].to_string(),
        3 => ["\"\"", "\"x\"", "\"all-linear\"", "\"random\"", "\"q4\"", "true", "1979-05-27"][rng.below(7)].to_string(),
        4 if depth < 3 => {
            let n = if rng.one_in(32) { rng.below(5000) } else { rng.below(6) };
            format!("{{ list = [{}] }}", (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", "))
        }
        5 => {
            let lo = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
            let hi = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
            let step = ["0", "1", "1e-300", "-1", "0.5", "nan"][rng.below(6)];
            let dtype = ["\"int\"", "\"float\"", "\"x\""][rng.below(3)];
            format!("{{ range = [{lo}, {hi}], step = {step}, dtype = {dtype}, log = {} }}", rng.one_in(2))
        }
        6 if depth < 3 => format!("[{}]", (0..rng.below(4)).map(|_| toml_value(rng, depth + 1)).collect::<Vec<_>>().join(", ")),
        7 => {
            // Deep nesting: arrays in arrays.
            let d = if rng.one_in(16) { 100_000 } else { [10usize, 100, 1000][rng.below(3)] };
            format!("{}1{}", "[".repeat(d), "]".repeat(d))
        }
        8 => {
            let d = if rng.one_in(16) { 100_000 } else { [10usize, 1000][rng.below(2)] };
            format!("{}{}", "{ a = ".repeat(d), "1 }".repeat(d))
        }
        _ => (small_or_huge(rng, 100) as i64).to_string(),
    }
}

/// A spec whose keys get crafted values (huge, negative, wrong types, deep nesting,
/// knob lists and ranges), sometimes with several groups.
pub fn spec_crafted(rng: &mut Rng) -> Vec<u8> {
    let mut text = SPEC.to_string();
    for _ in 0..1 + rng.below(4) {
        let (section, key) = SPEC_KEYS[rng.below(SPEC_KEYS.len())];
        let v = toml_value(rng, 0);
        let line = format!("{key} = ");
        let header = format!("[{section}]\n");
        // Replace an existing key's line, or add the key to its section.
        if let Some(start) = text.find(&format!("\n{line}")) {
            let start = start + 1;
            let end = text[start..].find('\n').map_or(text.len(), |e| start + e);
            text.replace_range(start..end, &format!("{line}{v}"));
        } else if let Some(at) = text.find(&header) {
            text.insert_str(at + header.len(), &format!("{line}{v}\n"));
        } else {
            text.push_str(&format!("\n{header}{line}{v}\n"));
        }
    }
    if rng.one_in(4) {
        for _ in 0..1 + rng.below(3) {
            let (_, key) = SPEC_KEYS[5 + rng.below(16)];
            text.push_str(&format!("\n[[group]]\n[group.trainer]\n{key} = {}\n", toml_value(rng, 0)));
        }
    }
    text.into_bytes()
}

// ---------------------------------------------------------------- datasets

const JSONL: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"prompt": "2+2=", "completion": "4"}
{"instruction": "Add", "input": "2 and 2", "output": "4"}
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]}
"#;

/// JSONL rows of each form.
pub fn jsonl_seeds() -> Vec<Vec<u8>> {
    vec![JSONL.as_bytes().to_vec(), JSONL.lines().next().unwrap_or_default().as_bytes().to_vec()]
}

/// JSONL whose rows carry crafted values.
pub fn jsonl_crafted(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for line in JSONL.lines() {
        let mut v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if rng.one_in(2) {
            mutate_json(rng, &mut v);
        }
        out.extend_from_slice(v.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// A JSON list and a `{"data": [...]}` object of rows.
pub fn json_dataset_seeds() -> Vec<Vec<u8>> {
    let rows: Vec<Value> = JSONL.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    vec![Value::Array(rows.clone()).to_string().into_bytes(), json!({ "data": rows }).to_string().into_bytes()]
}

/// CSV files of prompt/completion and instruction rows.
pub fn csv_seeds() -> Vec<Vec<u8>> {
    vec![
        b"prompt,completion\n2+2=,4\n\"Say \"\"hi\"\"\",\"hi, there\"\n".to_vec(),
        b"instruction,input,output\nAdd,2 and 2,4\n,just input,out\n".to_vec(),
    ]
}

/// The Parquet files of `testdata/parquet` (chat rows, zstd prompt/completion, missing column).
pub fn parquet_seeds() -> Vec<Vec<u8>> {
    ["parquet/chat.parquet", "parquet/pc_zstd.parquet", "parquet/missing.parquet"]
        .iter()
        .map(|f| read(f))
        .filter(|s| !s.is_empty())
        .collect()
}

// ---------------------------------------------------------------- HTTP

/// Requests as `METHOD PATH\nBODY`: ops of each kind, views of the store.
pub fn http_seeds() -> Vec<Vec<u8>> {
    [
        "POST /api/ops\n{\"run\": 1, \"op\": \"stop\"}",
        "POST /api/ops\n{\"run\": 1, \"op\": \"clone\", \"set\": [\"lora.r=8\", \"trainer.learning_rate=3e-4\"], \"warm\": true}",
        "POST /api/ops\n{\"run\": 2, \"op\": \"resume\"}",
        "POST /api/ops\n{\"run\": 1, \"op\": \"delete\"}",
        "GET /api/experiments\n",
        "GET /api/experiments/fuzz?all=true\n",
        "GET /api/experiments/fuzz/runs\n",
        "GET /api/experiments/fuzz/ops\n",
        "GET /api/runs/1\n",
        "GET /api/runs/1/metrics?name=loss\n",
        "GET /api/health\n",
        "GET /api/summary\n",
        "GET /api/experiments/fuzz/table\n",
        "GET /api/experiments/fuzz/series?names=loss,lr&points=100&runs=1,2\n",
        "GET /api/runs/1/detail\n",
        "GET /api/playground/targets\n",
        "POST /api/specs/check\n{\"spec\": \"[experiment]\\nname = \\\"a\\\"\\n[data]\\ntrain = \\\"t.jsonl\\\"\\n[model]\\nbase = \\\"smollm2-135m-instruct\\\"\\n[lora]\\nr = { list = [4, 8] }\\n\"}",
        "POST /api/experiments\n{\"spec\": \"[experiment]\\nname = \\\"a\\\"\\n\"}",
        "POST /api/login\n{\"token\": \"x\"}",
        "GET /\n",
        "GET /ui/app.js\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// An op request with crafted fields, or a view with a crafted id or query.
pub fn http_crafted(rng: &mut Rng) -> Vec<u8> {
    if rng.one_in(3) {
        let id = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
        let path = ["/api/runs/{}", "/api/runs/{}/metrics?name={}", "/api/experiments/{}", "/api/experiments/{}/runs?all={}"][rng.below(4)];
        return format!("GET {}\n", path.replace("{}", id)).into_bytes();
    }
    let op = ["stop", "resume", "delete", "clone"][rng.below(4)];
    let mut body = json!({"run": 1 + rng.below(4), "op": op});
    if rng.one_in(2) {
        let keys = ["lora.r", "lora.alpha", "trainer.learning_rate", "trainer.max_steps", "trainer.batch_size", "x", "lora", ""];
        let set: Vec<String> = (0..rng.below(4))
            .map(|_| format!("{}={}", keys[rng.below(keys.len())], INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())]))
            .collect();
        body["set"] = json!(set);
        body["op"] = json!("clone");
    }
    mutate_json(rng, &mut body);
    format!("POST /api/ops\n{body}").into_bytes()
}
