//! Streaming detokenization never emits half a character and adds up to `decode`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::{smollm_gguf_spec, testdata, tokenizer_cases};
use furnace_text::Tokenizer;

fn stream(tokenizer: &Tokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, String) {
    let mut decoder = tokenizer.incremental_decoder(skip_special);
    let pieces: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    let rest = decoder.flush().unwrap();
    assert_eq!(decoder.ids(), ids);
    (pieces, rest)
}

fn check(tokenizer: &Tokenizer) {
    let cases = tokenizer_cases();
    let multibyte: Vec<_> = cases.iter().filter(|(text, _)| !text.is_ascii()).collect();
    // The accented, Japanese, emoji and lambda cases.
    assert!(multibyte.len() >= 4);
    for (text, ids) in &cases {
        for skip_special in [false, true] {
            let (pieces, rest) = stream(tokenizer, ids, skip_special);
            for piece in &pieces {
                assert!(!piece.contains('\u{FFFD}'), "{text:?}: push emitted {piece:?}");
            }
            let streamed = pieces.concat() + &rest;
            assert_eq!(streamed, tokenizer.decode(ids, skip_special).unwrap(), "{text:?}");
            if !skip_special {
                assert_eq!(&streamed, text);
            }
        }
    }
    // Byte-level tokens really do split characters in these cases: something was held back.
    let (text, ids) = cases.iter().find(|(t, _)| t.starts_with("emoji")).unwrap();
    let (pieces, _) = stream(tokenizer, ids, false);
    assert!(pieces.iter().any(String::is_empty), "{text:?}");
}

#[test]
fn incremental_hf() {
    check(&Tokenizer::from_hf_dir(&testdata().join("tiny-llama")).unwrap());
}

#[test]
fn incremental_gguf() {
    check(&Tokenizer::from_gguf(&smollm_gguf_spec()).unwrap());
}

#[test]
fn flush_emits_an_incomplete_tail() {
    let tokenizer = Tokenizer::from_hf_dir(&testdata().join("tiny-llama")).unwrap();
    // "日" is three bytes over several byte-level tokens; stop after the first one.
    let ids = tokenizer.encode("日本", false).unwrap();
    let mut decoder = tokenizer.incremental_decoder(false);
    assert_eq!(decoder.push(ids[0]).unwrap(), "");
    let tail = decoder.flush().unwrap();
    assert_eq!(tail, tokenizer.decode(&ids[..1], false).unwrap());
    assert!(tail.contains('\u{FFFD}'));
    assert_eq!(decoder.flush().unwrap(), "");
}
