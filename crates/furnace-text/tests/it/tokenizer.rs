//! Tokenizer tests against the reference ids in testdata/tokenizer_cases.jsonl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::{smollm_gguf_spec, testdata, tokenizer_cases};
use furnace_text::{Error, Tokenizer};

fn check_cases(tokenizer: &Tokenizer, what: &str) {
    let cases = tokenizer_cases();
    assert!(cases.len() >= 10);
    for (text, ids) in cases {
        let got = tokenizer.encode(&text, false).unwrap();
        assert_eq!(got, ids, "{what}: ids of {text:?}");
        let decoded = tokenizer.decode(&got, false).unwrap();
        assert_eq!(decoded, text, "{what}: round trip of {text:?}");
    }
}

fn check_smollm_specials(tokenizer: &Tokenizer) {
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_ids(), &[2]);
    assert!(tokenizer.is_eos(2));
    assert!(!tokenizer.is_eos(1));
    assert_eq!(tokenizer.bos_token(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token(), Some("<|im_end|>"));
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.id_to_token(4093).as_deref(), Some("user"));
    assert_eq!(tokenizer.token_to_id("no such token"), None);
    assert_eq!(tokenizer.id_to_token(1_000_000), None);
    for id in 0..=16 {
        assert!(tokenizer.is_special(id), "id {id} should be special");
    }
    assert!(!tokenizer.is_special(4093));
    let ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user\nhi");
    // add_bos is false for SmolLM2: add_special changes nothing.
    assert_eq!(tokenizer.encode("Hello, world!", true).unwrap(), vec![19556, 28, 905, 17]);
}

#[test]
fn hf_dir_matches_reference_ids() {
    let tokenizer = Tokenizer::from_hf_dir(&testdata().join("tiny-llama")).unwrap();
    check_cases(&tokenizer, "hf");
    check_smollm_specials(&tokenizer);
}

#[test]
fn tiny_qwen2_dir_loads() {
    let tokenizer = Tokenizer::from_hf_dir(&testdata().join("tiny-qwen2")).unwrap();
    assert_eq!(tokenizer.encode("Hello, world!", false).unwrap(), vec![19556, 28, 905, 17]);
    assert_eq!(tokenizer.eos_ids(), &[2]);
}

#[test]
fn gguf_spec_matches_reference_ids() {
    let tokenizer = Tokenizer::from_gguf(&smollm_gguf_spec()).unwrap();
    check_cases(&tokenizer, "gguf");
    check_smollm_specials(&tokenizer);
}

#[test]
fn gguf_and_hf_decode_every_token_alike() {
    let hf = Tokenizer::from_hf_dir(&testdata().join("tiny-llama")).unwrap();
    let gguf = Tokenizer::from_gguf(&smollm_gguf_spec()).unwrap();
    for id in 0..hf.vocab_size() as u32 {
        assert_eq!(hf.id_to_token(id), gguf.id_to_token(id), "token {id}");
        assert_eq!(hf.is_special(id), gguf.is_special(id), "special {id}");
    }
    let all: Vec<u32> = (0..hf.vocab_size() as u32).step_by(7).collect();
    assert_eq!(hf.decode(&all, false).unwrap(), gguf.decode(&all, false).unwrap());
    assert_eq!(hf.decode(&all, true).unwrap(), gguf.decode(&all, true).unwrap());
}

#[test]
fn other_pre_tokenizers_build() {
    // The vocabulary is SmolLM2's, so only check that every family's pipeline builds
    // (its regexes compile) and round-trips text.
    let text = "Hello 12345 wörld!\n\n  日本語のテキスト <|im_start|>x";
    for pre in ["llama-bpe", "qwen2", "deepseek-v3", "starcoder", "gpt2", "default", "unknown-pre"] {
        let mut spec = smollm_gguf_spec();
        spec.pre = Some(pre.to_string());
        let tokenizer = Tokenizer::from_gguf(&spec).unwrap();
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text, "{pre}");
        assert!(ids.contains(&1), "{pre}: special token matched");
    }
    // Llama 3 style splits digits in groups of three; Qwen2 one by one.
    let mut spec = smollm_gguf_spec();
    spec.pre = Some("qwen2".into());
    let qwen = Tokenizer::from_gguf(&spec).unwrap();
    assert_eq!(qwen.encode("12345", false).unwrap(), vec![33, 34, 35, 36, 37]);
}

#[test]
fn gguf_add_bos() {
    let mut spec = smollm_gguf_spec();
    spec.add_bos = true;
    let tokenizer = Tokenizer::from_gguf(&spec).unwrap();
    assert!(tokenizer.add_bos());
    assert_eq!(tokenizer.encode("a", true).unwrap(), vec![1, 81]);
    assert_eq!(tokenizer.encode("a", false).unwrap(), vec![81]);
}

#[test]
fn gguf_errors() {
    let mut spec = smollm_gguf_spec();
    spec.model = "bert".into();
    assert!(matches!(Tokenizer::from_gguf(&spec), Err(Error::UnsupportedModel(m)) if m == "bert"));
    let mut spec = smollm_gguf_spec();
    spec.bos_id = Some(10_000_000);
    assert!(matches!(Tokenizer::from_gguf(&spec), Err(Error::InvalidGguf(_))));
    let mut spec = smollm_gguf_spec();
    spec.merges.push("nospace".into());
    assert!(matches!(Tokenizer::from_gguf(&spec), Err(Error::InvalidGguf(_))));
}

#[test]
fn from_file_loads_tokenizer_json() {
    let tokenizer = Tokenizer::from_file(&testdata().join("tiny-llama/tokenizer.json")).unwrap();
    assert_eq!(tokenizer.encode("Hello, world!", false).unwrap(), vec![19556, 28, 905, 17]);
    assert_eq!(tokenizer.bos_id(), None);
    assert!(tokenizer.eos_ids().is_empty());
    assert!(tokenizer.is_special(2));
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    match &err {
        Error::MissingTokenizer(path) => assert_eq!(path, dir.path()),
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    assert!(err.to_string().contains("tokenizer.json"));
}

#[test]
fn hf_dir_reads_configs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(testdata().join("tiny-llama/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": true,
            "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": true},
            "eos_token": {"content": "<|endoftext|>"},
            "pad_token": null}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [0, 2]}"#).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.bos_token(), Some("<|im_start|>"));
    assert_eq!(tokenizer.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tokenizer.eos_ids(), &[0, 2]);
    assert!(tokenizer.is_eos(0) && tokenizer.is_eos(2));
    assert_eq!(tokenizer.encode("a", true).unwrap(), vec![1, 81]);
    assert_eq!(tokenizer.encode("a", false).unwrap(), vec![81]);

    // A single eos id in generation_config.json, tokens as plain strings.
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": 0}"#).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.eos_ids(), &[2, 0]);
    assert_eq!(tokenizer.encode("a", true).unwrap(), vec![81]);

    // Malformed JSON names the file.
    std::fs::write(dir.path().join("generation_config.json"), "{").unwrap();
    let err = Tokenizer::from_hf_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("generation_config.json"));
}

#[test]
fn tokenizer_is_send_sync_and_cheap_to_clone() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<furnace_text::ChatTemplate>();
    let tokenizer = Tokenizer::from_hf_dir(&testdata().join("tiny-llama")).unwrap();
    let clone = tokenizer.clone();
    std::thread::spawn(move || clone.encode("hi", false).unwrap()).join().unwrap();
}

#[test]
fn malformed_decoder_section_is_an_error_not_a_panic() {
    // Found by furnace-fuzz: tokenizers 0.22 panics (`expect("Helper")`) when its
    // `decoder` section does not buffer: a number out of range, nesting past the limit.
    let path = std::path::Path::new("tokenizer.json");
    let base = r#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,
        "decoder": DECODER,
        "model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#;
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    for decoder in [r#"{"type":"Fuse","x":1e400}"#, deep.as_str(), r#"{"type":"Fuse","x":"#] {
        let text = base.replace("DECODER", decoder);
        let e = Tokenizer::from_json(&text, path).unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{decoder}: {e}");
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }
    // The same document with a good decoder loads.
    Tokenizer::from_json(&base.replace("DECODER", r#"{"type":"Fuse"}"#), path).unwrap();
}

#[test]
fn tokenizers_panics_on_crafted_files_are_errors() {
    // Found by furnace-fuzz: tokenizers 0.22 panics encoding with these (a post-processor
    // naming a special token it lacks; BPE byte offsets). Either loading or encoding fails.
    let dir = testdata().join("fuzz-tokenizer-json");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let r = Tokenizer::from_json(&text, &path).and_then(|t| {
            let ids = t.encode("Hello <s> world 123 héllo", true)?;
            t.decode(&ids, false)
        });
        assert!(r.is_err(), "{}", path.display());
        n += 1;
    }
    assert_eq!(n, 2);
}
