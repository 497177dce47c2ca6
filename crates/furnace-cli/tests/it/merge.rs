//! `furnace merge` end to end: tiny-llama with its adapter merged into an HF directory that
//! holds PEFT's `merge_and_unload()` weights, and bad inputs refused with clear messages.

use furnace_testutil::testdata;
use std::path::Path;
use std::process::{Command, Output};

fn furnace(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(cwd).args(args).output().expect("run furnace")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn td(name: &str) -> String {
    testdata().join(name).to_str().expect("utf8 path").to_string()
}

#[test]
fn merge_tiny_llama_adapter_into_an_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let out_s = out.to_str().unwrap();
    let (base, adapter) = (td("tiny-llama"), td("tiny-llama-pref-lora"));
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &adapter, "--out", out_s, "--dtype", "f32"]);
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "stdout: {so}\nstderr: {se}");
    assert!(se.contains("merged 14 projections"), "{se}");
    assert!(se.contains("stored as f32"), "{se}");
    assert!(so.contains("wrote HF model") && so.contains("weights f32"), "{so}");
    for f in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]
    {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The merged projections are PEFT's.
    let got = furnace_export::merge::read_f32_safetensors(&out.join("model.safetensors")).unwrap();
    let want = furnace_export::merge::read_f32_safetensors(&testdata().join("merge_tiny_llama_pref.safetensors")).unwrap();
    for (name, w) in &want {
        let d = (&got[name] - w).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{name}: {d}");
    }
    // furnace loads it; the tokenizer config carries the chat template (as transformers writes it).
    let m = furnace_model::LoadedModel::load(&out, furnace_model::WeightDType::F32).unwrap();
    assert_eq!(m.model.config.num_layers, 2);
    let tok_cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    let template = std::fs::read_to_string(testdata().join("tiny-llama/chat_template.jinja")).unwrap();
    assert_eq!(tok_cfg["chat_template"].as_str(), Some(template.as_str()));
    // No staging folder is left beside the output.
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.contains("partial")), "{left:?}");

    // Writing again into the same, now non-empty, directory needs --force, which replaces an
    // earlier export's files (a stale shard index would mislead transformers) and keeps others.
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &adapter, "--out", out_s]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--force"), "{}", text(&o.stderr));
    std::fs::write(out.join("model.safetensors.index.json"), "{}").unwrap();
    std::fs::write(out.join("model-00001-of-00002.safetensors"), "stale").unwrap();
    std::fs::write(out.join("NOTES.md"), "mine").unwrap();
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &adapter, "--out", out_s, "--force", "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!out.join("model.safetensors.index.json").exists() && !out.join("model-00001-of-00002.safetensors").exists());
    assert_eq!(std::fs::read_to_string(out.join("NOTES.md")).unwrap(), "mine");
    let m = furnace_model::LoadedModel::load(&out, furnace_model::WeightDType::F32).unwrap();
    assert_eq!(m.model.config.num_layers, 2);

    // A GGUF into a folder that does not exist yet.
    let gguf = tmp.path().join("sub/dir/m.gguf");
    let o = furnace(
        tmp.path(),
        &["merge", "--base", &base, "--adapter", &adapter, "--format", "gguf", "--quant", "q8_0", "--out", gguf.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(furnace_model::LoadedModel::load(&gguf, furnace_model::WeightDType::F32).is_ok());
}

#[test]
fn merge_refuses_bad_input_with_clear_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let out_s = out.to_str().unwrap();
    let (base, adapter) = (td("tiny-llama"), td("tiny-llama-pref-lora"));

    // An adapter trained for another base (SmolLM2) is refused, naming the module.
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &td("lora_adapter"), "--out", out_s]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("another base") && e.contains("model.layers."), "{e}");
    assert!(!out.exists(), "nothing written on failure");

    // One --weight per --adapter.
    let o =
        furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &adapter, "--adapter", &adapter, "--weight", "0.5", "--out", out_s]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("1 --weight values for 2 --adapter values"), "{e}");

    // --quant belongs to --format gguf.
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--adapter", &adapter, "--quant", "q8_0", "--out", out_s]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--quant applies to --format gguf"), "{}", text(&o.stderr));

    // --format hf needs a base.
    let o = furnace(tmp.path(), &["merge", "--adapter", &adapter, "--format", "hf", "--out", out_s]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("needs --base"), "{}", text(&o.stderr));

    // A base that does not exist.
    let o = furnace(tmp.path(), &["merge", "--base", "no/such/model", "--adapter", &adapter, "--out", out_s]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("no/such/model"), "{}", text(&o.stderr));
}

#[test]
fn a_combined_adapter_is_registered_and_merged_by_its_name() {
    let tmp = tempfile::tempdir().unwrap();
    let combined = tmp.path().join("mixed");
    let (a, b) = (td("combine/adapter_a"), td("combine/adapter_b"));
    let o = furnace(
        tmp.path(),
        &["merge", "--adapter", &a, "--weight", "0.7", "--adapter", &b, "--weight", "0.3", "--method", "ties", "--density", "0.5"]
            .into_iter()
            .chain(["--out", combined.to_str().unwrap(), "--register", "mixed"])
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("registered as mixed"), "{}", text(&o.stdout));
    let show = furnace(tmp.path(), &["adapters", "show", "mixed", "--json"]);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(rec["source"], "merge", "{rec}");
    assert_eq!(rec["spec"]["method"], "ties", "{rec}");
    assert_eq!(rec["spec"]["weights"], serde_json::json!([0.7, 0.3]), "{rec}");
    assert_eq!(std::fs::canonicalize(rec["path"].as_str().unwrap()).unwrap(), std::fs::canonicalize(&combined).unwrap());
    // The registered name resolves as --adapter of a merge into the base.
    let out = tmp.path().join("merged");
    let o = furnace(tmp.path(), &["merge", "--base", &td("tiny-llama"), "--adapter", "mixed", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    // --register is for adapters only.
    let o = furnace(
        tmp.path(),
        &["merge", "--base", &td("tiny-llama"), "--adapter", "mixed", "--out", tmp.path().join("m2").to_str().unwrap(), "--register", "x"],
    );
    assert!(!o.status.success() && text(&o.stderr).contains("--register applies to --format adapter"), "{}", text(&o.stderr));
}

#[test]
fn merge_without_an_adapter_exports_the_base_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let base = td("tiny-llama");
    // HF to HF in f32: every tensor is the base's, bit for bit.
    let out = tmp.path().join("plain");
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--format", "hf", "--dtype", "f32", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "stdout: {}\nstderr: {}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stderr).contains("exporting the base unchanged"), "{}", text(&o.stderr));
    let got = furnace_export::merge::read_f32_safetensors(&out.join("model.safetensors")).unwrap();
    let want = furnace_export::merge::read_f32_safetensors(&testdata().join("tiny-llama/model.safetensors")).unwrap();
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let d = (&got[name] - w).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "{name}");
    }
    assert!(out.join("tokenizer.json").is_file());
    // HF to a q4_0 GGUF (the 1B benchmark model's path): it loads, with the base's shapes.
    let gguf = tmp.path().join("plain.q4_0.gguf");
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--format", "gguf", "--quant", "q4_0", "--out", gguf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("weights q4_0"), "{}", text(&o.stdout));
    let m = furnace_model::LoadedModel::load(&gguf, furnace_model::WeightDType::F32).unwrap();
    assert_eq!(m.model.config.num_layers, 2);
    // Adapter-only options need an adapter.
    let o = furnace(tmp.path(), &["merge", "--base", &base, "--weight", "0.5", "--out", tmp.path().join("w").to_str().unwrap()]);
    assert!(!o.status.success() && text(&o.stderr).contains("apply to adapters"), "{}", text(&o.stderr));
    // Neither --base nor --adapter: clap names what is missing.
    let o = furnace(tmp.path(), &["merge", "--out", tmp.path().join("n").to_str().unwrap()]);
    assert!(!o.status.success() && text(&o.stderr).contains("--adapter"), "{}", text(&o.stderr));
}
