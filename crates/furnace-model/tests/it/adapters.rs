//! Several LoRA adapters registered in one model: in a ragged batch, each sequence runs with
//! its own adapter (or none) and gets the logits it gets alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{max_abs_diff, synthetic_adapter};
use candle_core::Tensor;
use furnace_model::{AdapterId, Error, Llama, LoadedModel, Logits, PeftAdapter, SeqInput, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};

type Seq = (Vec<u32>, Option<AdapterId>);

/// Runs `seqs` as one ragged batch: a prefill of every sequence (all logits), then one
/// decode step of `next` for each. Returns each sequence's prefill and decode logits.
fn batched(model: &Llama, seqs: &[Seq], next: u32) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|((tokens, adapter), cache)| SeqInput { tokens, cache, logits: Logits::All, adapter: *adapter })
        .collect();
    let prefill = model.forward(&mut inputs)?;
    drop(inputs);
    let step = [next];
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|((_, adapter), cache)| SeqInput { tokens: &step, cache, logits: Logits::Last, adapter: *adapter })
        .collect();
    let decode = model.forward(&mut inputs)?;
    Ok(prefill.into_iter().zip(decode).map(|(p, d)| (p.expect("prefill logits"), d.expect("decode logits"))).collect())
}

/// Every sequence of the batch against the same sequence (plus `next`) alone.
fn check_batch_equals_alone(model: &Llama, seqs: &[Seq], next: u32, tol: f32, what: &str) -> anyhow::Result<()> {
    let got = batched(model, seqs, next)?;
    for (i, ((tokens, adapter), (prefill, decode))) in seqs.iter().zip(&got).enumerate() {
        let mut full = tokens.clone();
        full.push(next);
        let alone = model.logits_all_with(&full, *adapter)?;
        let d = max_abs_diff(prefill, &alone.narrow(0, 0, tokens.len())?);
        assert!(d < tol, "{what}: sequence {i} ({adapter:?}) prefill differs from alone by {d}");
        let d = max_abs_diff(decode, &alone.narrow(0, tokens.len(), 1)?);
        assert!(d < tol, "{what}: sequence {i} ({adapter:?}) decode differs from alone by {d}");
    }
    Ok(())
}

/// The fixture adapter with its B factors scaled: another adapter of the same shapes.
fn scaled(a: &PeftAdapter, factor: f64) -> PeftAdapter {
    let tensors =
        a.tensors.iter().map(|(k, v)| (k.clone(), if k.contains("lora_B") { (v * factor).expect("scale") } else { v.clone() })).collect();
    PeftAdapter { config: a.config.clone(), tensors }
}

#[test]
fn per_row_adapters_in_a_ragged_batch_match_each_sequence_alone() -> anyhow::Result<()> {
    let mut m = LoadedModel::load(&smollm2_gguf(), WeightDType::F32)?;
    let fixture = PeftAdapter::load(&testdata().join("lora_adapter"))?;
    let a = m.model.add_adapter(&fixture)?;
    let b = m.model.add_adapter(&scaled(&fixture, -0.5))?;
    assert_ne!(a, b);
    let prompts: Vec<Vec<u32>> = jsonl("logits_cases.jsonl").iter().map(|c| ids(c, "ids")).collect();
    // The adapters change the logits, and differently: the comparison below can fail.
    let p = &prompts[0];
    let (base, with_a, with_b) = (m.model.logits_all(p)?, m.model.logits_all_with(p, Some(a))?, m.model.logits_all_with(p, Some(b))?);
    assert!(max_abs_diff(&with_a, &base) > 0.1 && max_abs_diff(&with_b, &base) > 0.1 && max_abs_diff(&with_a, &with_b) > 0.1);
    // A, B, none, and A again: A's rows are not contiguous.
    let seqs: Vec<Seq> = vec![
        (prompts[0].clone(), Some(a)),
        (prompts[1].clone(), Some(b)),
        (prompts[2].clone(), None),
        (ids(&jsonl("lora_cases.jsonl")[0], "ids"), Some(a)),
    ];
    check_batch_equals_alone(&m.model, &seqs, 28, 1e-4, "smollm2 f32")
}

#[test]
fn per_row_adapters_work_in_every_weight_storage() -> anyhow::Result<()> {
    let dir = testdata().join("tiny-llama");
    let seqs = |a, b| -> Vec<Seq> {
        vec![
            (vec![1604, 3987, 46477, 24, 94, 727], Some(a)),
            (vec![504, 3575, 282], None),
            (vec![6403, 1980, 253, 655], Some(b)),
            (vec![42, 43], Some(a)),
            (vec![7], Some(b)),
        ]
    };
    for (dt, tol) in [(WeightDType::F32, 1e-4), (WeightDType::Bf16, 1e-3), (WeightDType::Quantized, 1e-3)] {
        let mut m = LoadedModel::load(&dir, dt)?;
        // A targets every projection, B only some: layers B skips carry A alone.
        let a = m.model.add_adapter(&synthetic_adapter(&m.model, 4, &["all-linear"], 1))?;
        let b = m.model.add_adapter(&synthetic_adapter(&m.model, 2, &["q_proj", "v_proj", "down_proj"], 2))?;
        let ids = [1604u32, 3987, 46477];
        assert!(max_abs_diff(&m.model.logits_all_with(&ids, Some(a))?, &m.model.logits_all(&ids)?) > 0.01, "{dt:?}");
        assert!(max_abs_diff(&m.model.logits_all_with(&ids, Some(b))?, &m.model.logits_all(&ids)?) > 0.01, "{dt:?}");
        check_batch_equals_alone(&m.model, &seqs(a, b), 11, tol, &format!("tiny-llama {dt:?}"))?;
    }
    Ok(())
}

#[test]
fn removing_an_adapter_leaves_the_others_and_its_id_unknown() -> anyhow::Result<()> {
    let mut m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32)?;
    let ids = [1604u32, 3987, 46477, 24];
    let a = m.model.add_adapter(&synthetic_adapter(&m.model, 4, &["all-linear"], 1))?;
    let b = m.model.add_adapter(&synthetic_adapter(&m.model, 4, &["all-linear"], 7))?;
    let with_b = m.model.logits_all_with(&ids, Some(b))?;
    assert_eq!(m.model.adapters(), [a, b]);
    assert!(m.model.remove_adapter(a));
    assert!(!m.model.remove_adapter(a), "removed once");
    assert_eq!(m.model.adapters(), [b]);
    assert!(m.model.layers.iter().all(|l| l.self_attn.q_proj.lora.len() == 1 && l.mlp.down_proj.lora.len() == 1));
    assert_eq!(max_abs_diff(&m.model.logits_all_with(&ids, Some(b))?, &with_b), 0.0);
    match m.model.logits_all_with(&ids, Some(a)) {
        Err(Error::Adapter(msg)) => assert!(msg.contains("not registered"), "{msg}"),
        other => panic!("expected an adapter error, got {:?}", other.map(|t| t.dims().to_vec())),
    }
    // Ids are never reused.
    let c = m.model.add_adapter(&synthetic_adapter(&m.model, 4, &["all-linear"], 1))?;
    assert!(c != a && c != b);
    Ok(())
}
