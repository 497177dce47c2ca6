//! merge tests: [`BaseModel::merge_adapter`] against PEFT's `merge_and_unload()` (fixtures of
//! scripts/make_merge_fixtures.py), and an HF directory written from a merged GGUF base read
//! back by furnace.

use anyhow::Result;
use furnace_export::hf::{write_hf, write_hf_with, HfDType, HfOptions};
use furnace_export::merge::{read_f32_safetensors, BaseModel};
use furnace_model::{load_adapter, LoadedModel, WeightDType};
use furnace_testutil::{ids, jsonl, smollm2_gguf, testdata};

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn merged_tensors_equal_peft_merge_and_unload() -> Result<()> {
    let mut base = BaseModel::load(&testdata().join("tiny-llama"))?;
    assert_eq!(base.source_precision, "f32");
    assert!(!base.dequantized);
    let adapter = load_adapter(&testdata().join("tiny-llama-pref-lora"))?;
    let report = base.merge_adapter(&adapter)?;
    assert_eq!(report.modules_merged, 14, "2 layers x 7 projections");
    assert_eq!(report.scale, 2.0, "alpha 8 / r 4");
    let want = read_f32_safetensors(&testdata().join("merge_tiny_llama_pref.safetensors"))?;
    assert_eq!(want.len(), 14);
    let mut worst = 0f32;
    for (name, w) in &want {
        let got = base.tensors.get(name).unwrap_or_else(|| panic!("merged base lacks {name}"));
        assert_eq!(got.dims(), w.dims(), "{name}");
        worst = worst.max(max_abs_diff(got, w)?);
    }
    assert!(worst < 1e-5, "merged tensors differ from PEFT's by {worst}");
    // And the merge changed them: the unmerged base differs from PEFT's merge.
    let plain = BaseModel::load(&testdata().join("tiny-llama"))?;
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert!(max_abs_diff(&plain.tensors[name], &want[name])? > 1e-4, "the fixture's delta is too small to test anything");
    Ok(())
}

#[test]
fn adapter_of_another_base_is_refused() -> Result<()> {
    let mut base = BaseModel::load(&testdata().join("tiny-llama"))?;
    let before = base.tensors["model.layers.0.self_attn.q_proj.weight"].clone();
    // testdata/lora_adapter was trained on SmolLM2 (hidden 576, 30 layers).
    let adapter = load_adapter(&testdata().join("lora_adapter"))?;
    let err = base.merge_adapter(&adapter).expect_err("a SmolLM2 adapter must not merge into tiny-llama").to_string();
    assert!(err.contains("another base"), "{err}");
    assert!(err.contains("model.layers."), "names the module: {err}");
    assert!(err.contains("576") || err.contains("does not exist"), "says the shapes: {err}");
    // Nothing changed.
    assert_eq!(max_abs_diff(&base.tensors["model.layers.0.self_attn.q_proj.weight"], &before)?, 0.0);
    Ok(())
}

#[test]
fn hf_output_refuses_a_non_empty_directory_and_round_trips_bf16() -> Result<()> {
    let base = BaseModel::load(&testdata().join("tiny-llama"))?;
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("keep.txt"), "x")?;
    let err = write_hf(&base, tmp.path(), HfDType::F32).expect_err("non-empty dir").to_string();
    assert!(err.contains("not empty") && err.contains("--force"), "{err}");
    let report = write_hf_with(&base, tmp.path(), HfOptions { dtype: HfDType::Bf16, overwrite: true })?;
    assert!(report.files.iter().any(|(p, _)| p.ends_with("model.safetensors")));
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert!(tmp.path().join(f).is_file(), "{f} written");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json"))?)?;
    assert_eq!(cfg["dtype"], "bfloat16");
    let back = BaseModel::load(tmp.path())?;
    assert_eq!(back.source_precision, "bf16, converted to f32");
    let name = "model.layers.1.mlp.down_proj.weight";
    let d = max_abs_diff(&back.tensors[name], &base.tensors[name])?;
    assert!(d > 0.0 && d < 1e-2, "bf16 rounding only: {d}");
    Ok(())
}

/// The SmolLM2 Q4_1 GGUF merged with testdata/lora_adapter, written as an f32 HF directory
/// and loaded back by furnace, computes what furnace computes on the GGUF with the adapter
/// applied at run time, and its tokenizer.json gives the GGUF tokenizer's ids.
#[test]
fn smollm2_gguf_merge_written_as_hf_matches_runtime_adapter() -> Result<()> {
    let gguf = smollm2_gguf();
    let adapter = load_adapter(&testdata().join("lora_adapter"))?;
    let mut base = BaseModel::load(&gguf)?;
    assert!(base.dequantized, "the SmolLM2 fixture is Q4_1");
    assert!(base.source_precision.starts_with("q4_1") && base.source_precision.contains("dequantized to f32"), "{}", base.source_precision);
    assert!(base.config.tie_word_embeddings && !base.tensors.contains_key("lm_head.weight"));
    let report = base.merge_adapter(&adapter)?;
    assert_eq!(report.modules_merged, 30 * 7);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("merged");
    write_hf(&base, &out, HfDType::F32)?;
    drop(base);

    let merged = LoadedModel::load(&out, WeightDType::F32)?;
    let mut reference = LoadedModel::load(&gguf, WeightDType::F32)?;
    let id = reference.model.add_adapter(&adapter)?;
    assert_eq!(merged.model.config.num_layers, 30);
    assert!(merged.model.config.tie_word_embeddings);

    let ids_in = reference.tokenizer.encode("The capital of France is Paris, and the capital of Italy is", false)?;
    let want = reference.model.logits_all_with(&ids_in, Some(id))?;
    let got = merged.model.logits_all(&ids_in)?;
    let d = max_abs_diff(&got, &want)?;
    eprintln!("merged SmolLM2 vs the runtime adapter: max abs logit diff {d:e}");
    assert!(d < 5e-4, "merged logits differ from the runtime adapter's by {d}");
    let base_logits = reference.model.logits_all(&ids_in)?;
    assert!(max_abs_diff(&base_logits, &want)? > 1e-2, "the adapter changes the logits");

    // Tokenizer: the written tokenizer.json against the GGUF's and the fixture's ids.
    for case in jsonl("tokenizer_cases.jsonl") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case, "ids");
        assert_eq!(reference.tokenizer.encode(text, false)?, want, "GGUF tokenizer on {text:?}");
        assert_eq!(merged.tokenizer.encode(text, false)?, want, "written tokenizer.json on {text:?}");
        assert_eq!(merged.tokenizer.encode(text, true)?, reference.tokenizer.encode(text, true)?, "with special tokens on {text:?}");
    }
    assert_eq!(merged.tokenizer.bos_id(), reference.tokenizer.bos_id());
    assert_eq!(merged.tokenizer.eos_ids(), reference.tokenizer.eos_ids());
    let msgs = [furnace_text::ChatMessage { role: "user".into(), content: "Hi there".into() }];
    let t_ref = reference.chat_template.as_ref().expect("GGUF chat template");
    let t_got = merged.chat_template.as_ref().expect("written chat template");
    assert_eq!(
        t_got.render(&msgs, true, merged.tokenizer.bos_token(), merged.tokenizer.eos_token())?,
        t_ref.render(&msgs, true, reference.tokenizer.bos_token(), reference.tokenizer.eos_token())?
    );
    Ok(())
}

/// A qwen2 base (q/k/v biases, tied embeddings) goes through BaseModel and the HF writer
/// unchanged: furnace computes the same logits on the written directory.
#[test]
fn qwen2_hf_base_round_trips_with_its_biases() -> Result<()> {
    let src = testdata().join("tiny-qwen2");
    let base = BaseModel::load(&src)?;
    assert!(base.config.attention_bias && base.config.tie_word_embeddings);
    assert!(base.tensors.contains_key("model.layers.1.self_attn.k_proj.bias"));
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("q");
    write_hf(&base, &out, HfDType::F32)?;
    let a = LoadedModel::load(&src, WeightDType::F32)?;
    let b = LoadedModel::load(&out, WeightDType::F32)?;
    let ids_in = a.tokenizer.encode("def fib(n): return n", false)?;
    assert_eq!(b.tokenizer.encode("def fib(n): return n", false)?, ids_in);
    assert_eq!(max_abs_diff(&a.model.logits_all(&ids_in)?, &b.model.logits_all(&ids_in)?)?, 0.0);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(cfg["model_type"], "qwen2");
    Ok(())
}
