//! Copying a cache's prefix into another sequence's cache (prefix caching) is exact: decoding
//! after the copy gives the logits of a full prefill.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::max_abs_diff;
use furnace_model::{LoadedModel, Logits, SeqInput, WeightDType};
use furnace_testutil::{smollm2_gguf, testdata};

fn check(m: &LoadedModel, prompt: &[u32], n: usize) -> anyhow::Result<()> {
    let model = &m.model;
    // Full prefill of the prompt.
    let mut full = model.new_cache();
    let a = model.forward(&mut [SeqInput { tokens: prompt, cache: &mut full, logits: Logits::All, adapter: None }])?;
    let a = a[0].clone().expect("logits");
    // A snapshot of its first n tokens, exactly sized.
    let snap = full.prefix(n);
    assert_eq!(snap.len(), n);
    assert!(snap.bytes() <= full.bytes());
    // A new sequence starts from the snapshot and runs the rest of the prompt.
    let mut seq = model.new_cache();
    seq.extend_from(&snap, n)?;
    assert_eq!(seq.len(), n);
    let b = model.forward(&mut [SeqInput { tokens: &prompt[n..], cache: &mut seq, logits: Logits::All, adapter: None }])?;
    let b = b[0].clone().expect("logits");
    let d = max_abs_diff(&a.narrow(0, n, prompt.len() - n)?, &b);
    assert!(d <= 1e-5, "prefill after a copied prefix differs by {d}");
    // Decoding a few tokens on both caches stays the same.
    for t in [17u32, 4, 250] {
        let x = model.forward(&mut [SeqInput { tokens: &[t], cache: &mut full, logits: Logits::Last, adapter: None }])?;
        let y = model.forward(&mut [SeqInput { tokens: &[t], cache: &mut seq, logits: Logits::Last, adapter: None }])?;
        let d = max_abs_diff(x[0].as_ref().expect("x"), y[0].as_ref().expect("y"));
        assert!(d <= 1e-5, "decode after a copied prefix differs by {d}");
    }
    // The snapshot itself is a usable cache: copying it into a cache that already holds
    // tokens is rejected only when shapes differ or tokens are missing.
    assert!(seq.extend_from(&snap, n + 1).is_err());
    Ok(())
}

#[test]
fn decoding_after_a_copied_prefix_matches_a_full_prefill() -> anyhow::Result<()> {
    let tiny = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % 1000).collect();
    for n in [1, 32, 64, 69] {
        check(&tiny, &prompt, n)?;
    }
    let real = LoadedModel::load(&smollm2_gguf(), WeightDType::F32)?;
    let prompt: Vec<u32> = (0..100u32).map(|i| (i * 101 + 7) % 40_000).collect();
    check(&real, &prompt, 64)?;
    Ok(())
}
