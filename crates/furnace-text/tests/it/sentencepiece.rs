//! SentencePiece ("llama") GGUF tokenizers on a small synthetic vocabulary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_text::{GgufTokenizerSpec, Tokenizer};

/// <unk>, <s>, </s>, 256 byte tokens, then normal pieces with merge scores.
fn spec(with_bytes: bool) -> GgufTokenizerSpec {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut token_types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    if with_bytes {
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            token_types.push(6);
            scores.push(0.0);
        }
    }
    let pieces: [(&str, f32); 18] = [
        ("▁", -100.0),
        ("h", -100.0),
        ("e", -100.0),
        ("l", -100.0),
        ("o", -100.0),
        ("w", -100.0),
        ("r", -100.0),
        ("d", -100.0),
        ("ll", -1.0),
        ("he", -2.0),
        ("hell", -3.0),
        ("hello", -4.0),
        ("▁hello", -5.0),
        ("or", -6.0),
        ("▁w", -7.0),
        ("▁wor", -8.0),
        ("ld", -9.0),
        ("▁world", -10.0),
    ];
    for (piece, score) in pieces {
        tokens.push(piece.to_string());
        token_types.push(1);
        scores.push(score);
    }
    GgufTokenizerSpec {
        model: "llama".into(),
        pre: None,
        tokens,
        token_types,
        merges: Vec::new(),
        scores,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: None,
        add_bos: true,
        add_space_prefix: true,
    }
}

#[test]
fn merges_by_score_and_round_trips() {
    let tokenizer = Tokenizer::from_gguf(&spec(true)).unwrap();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    let ids = tokenizer.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id("▁hello"), id("▁world")]);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "hello world");
    // BOS on request, and special tokens in the text are matched.
    let ids = tokenizer.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, id("▁hello"), id("▁world")]);
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hello world");
    let ids = tokenizer.encode("hello</s>", false).unwrap();
    assert_eq!(ids, vec![id("▁hello"), 2]);
    assert!(tokenizer.is_special(2) && tokenizer.is_eos(2));
    assert_eq!(tokenizer.eos_token(), Some("</s>"));
    assert_eq!(tokenizer.bos_token(), Some("<s>"));
}

#[test]
fn byte_fallback_for_unknown_characters() {
    let tokenizer = Tokenizer::from_gguf(&spec(true)).unwrap();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    let ids = tokenizer.encode("hé", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "hé");
    for text in ["hello wörld 🎉", "  two  spaces", "line\nbreak", "hello world"] {
        let ids = tokenizer.encode(text, false).unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        // Streaming gives the same text and never half a character.
        let mut decoder = tokenizer.incremental_decoder(false);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = decoder.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'));
            streamed.push_str(&piece);
        }
        streamed.push_str(&decoder.flush().unwrap());
        assert_eq!(streamed, text);
    }
}

#[test]
fn unknown_without_byte_tokens() {
    let tokenizer = Tokenizer::from_gguf(&spec(false)).unwrap();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    // Consecutive unknown characters fuse into one <unk>.
    let ids = tokenizer.encode("héé", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("h"), 0]);
}

#[test]
fn no_space_prefix() {
    let mut spec = spec(true);
    spec.add_space_prefix = false;
    let tokenizer = Tokenizer::from_gguf(&spec).unwrap();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    let ids = tokenizer.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id("hello"), id("▁world")]);
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "hello world");
}
