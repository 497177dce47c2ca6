//! DPO and GRPO against TRL 1.16 + PEFT on tiny-llama (fixtures from
//! `scripts/make_pref_fixtures.py`): losses, metrics, reference log-probabilities,
//! advantages and every LoRA factor's gradient.

use crate::common::*;
use furnace_model::{LoadedModel, PeftAdapter, WeightDType};
use furnace_testutil::{ids, jsonl};
use furnace_train::dpo::{DpoConfig, DpoLoss};
use furnace_train::grpo::{self, GrpoConfig, GrpoLoss, ScaleRewards};
use furnace_train::policy::{self, Sampled};
use furnace_train::{Example, FrozenBase, Sequence, TrainableLora, IGNORE_INDEX};
use std::collections::HashMap;

fn setup() -> (FrozenBase, TrainableLora) {
    let m = LoadedModel::load(&testdata().join("tiny-llama"), WeightDType::F32).unwrap();
    let base = FrozenBase::new(&m.model).unwrap();
    let lora = TrainableLora::from_adapter(&m.model, &PeftAdapter::load(&testdata().join("tiny-llama-pref-lora")).unwrap()).unwrap();
    (base, lora)
}

fn grads(file: &str) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(testdata().join(file), &candle_core::Device::Cpu).unwrap()
}

fn check_grads(case: &str, got: &TrainableLora, want: &HashMap<String, candle_core::Tensor>) {
    let named = got.named();
    let mut n = 0;
    for (key, w) in want.iter().filter(|(k, _)| k.starts_with(&format!("{case}/"))) {
        let name = &key[case.len() + 1..];
        let g = named.iter().find(|(k, ..)| k == name).unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = rel_l2(g.2, &w);
        assert!(err < 1e-3, "{case} {name}: relative L2 error {err}");
        n += 1;
    }
    assert_eq!(n, named.len(), "{case}: every factor has a reference gradient");
}

fn seq(prompt: &[u32], answer: &[u32]) -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt.len() { IGNORE_INDEX } else { i64::from(t) }).collect();
    (ids, labels)
}

/// A DPO case's preference pairs as examples.
fn pairs(case: &serde_json::Value) -> Vec<Example> {
    let pair = |p: &serde_json::Value| {
        let (ids_c, labels_c) = seq(&ids(p, "prompt"), &ids(p, "chosen"));
        let (ids_r, labels_r) = seq(&ids(p, "prompt"), &ids(p, "rejected"));
        Example { ids: ids_c, labels: labels_c, rejected: Some(Box::new(Sequence { ids: ids_r, labels: labels_r })), ..Default::default() }
    };
    case["pairs"].as_array().unwrap().iter().map(pair).collect()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn dpo_losses_metrics_and_gradients_match_trl() {
    let (base, lora) = setup();
    let want_grads = grads("dpo_grads.safetensors");
    let cases = jsonl("dpo_cases.jsonl");
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let examples = pairs(&case);
        let losses = case["loss_types"].as_array().unwrap().iter().map(|l| DpoLoss::parse(l.as_str().unwrap()).unwrap());
        let cfg = DpoConfig {
            beta: case["beta"].as_f64().unwrap(),
            losses: losses.zip(f64s(&case["loss_weights"])).collect(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        };
        let (loss, metrics, g) = policy::dpo_batch(&base, &lora, None, &cfg, &examples).unwrap();
        let want = case["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-4, "{name}: loss {loss} vs {want}");
        for (k, e) in examples.iter().enumerate() {
            let (rc, rr) = *e.reference.get().unwrap();
            assert!((rc - f64s(&case["ref_chosen_logps"])[k]).abs() < 1e-3, "{name}: reference chosen logp");
            assert!((rr - f64s(&case["ref_rejected_logps"])[k]).abs() < 1e-3, "{name}: reference rejected logp");
        }
        for (m, v) in &metrics {
            let w = case["metrics"][m].as_f64().unwrap_or_else(|| panic!("{name}: TRL logs no {m}"));
            assert!((v - w).abs() < 1e-4 * w.abs().max(1.0), "{name}: {m} {v} vs {w}");
        }
        check_grads(name, &g, &want_grads);
    }
}

#[test]
fn grpo_advantages_losses_and_gradients_match_trl() {
    let (base, lora) = setup();
    let want_grads = grads("grpo_grads.safetensors");
    let cases = jsonl("grpo_cases.jsonl");
    assert_eq!(cases.len(), 9);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let g = case["num_generations"].as_u64().unwrap() as usize;
        // Advantages from the per-function rewards, as TRL computes them.
        let rows: Vec<Vec<f64>> = case["rewards_per_func"].as_array().unwrap().iter().map(f64s).collect();
        let per_func: Vec<Vec<f64>> = (0..rows[0].len()).map(|f| rows.iter().map(|r| r[f]).collect()).collect();
        let scale = ScaleRewards::parse(case["scale_rewards"].as_str().unwrap()).unwrap();
        let adv = grpo::advantages(&per_func, &f64s(&case["reward_weights"]), g, scale);
        let want_adv = f64s(&case["advantages"]);
        for (a, w) in adv.advantages.iter().zip(&want_adv) {
            assert!((a - w).abs() < 1e-5 * w.abs().max(1.0), "{name}: advantage {a} vs {w}");
        }
        let prompts: Vec<Vec<u32>> = case["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let batch: Vec<Sampled> = case["completions"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = &prompts[i / g];
                let mut ids = p.clone();
                ids.extend(c.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32));
                Sampled { example: i / g, ids, prompt_len: p.len(), advantage: want_adv[i] }
            })
            .collect();
        let per_token = |key: &str| -> Option<Vec<Vec<f32>>> {
            case[key].as_array().map(|a| a.iter().map(|v| f64s(v).into_iter().map(|x| x as f32).collect()).collect())
        };
        let old = per_token("old_per_token_logps");
        let beta = case["beta"].as_f64().unwrap();
        // Our reference pass matches TRL's; the loss takes TRL's values, as it takes TRL's
        // old log-probabilities.
        let reference = per_token("ref_per_token_logps");
        if let Some(want) = &reference {
            for (a, b) in policy::reference_logps(&base, &batch).unwrap().iter().zip(want) {
                assert!(max_diff(a, b) < 1e-4, "{name}: reference log-probabilities");
            }
        }
        let cfg = GrpoConfig {
            num_generations: g,
            max_completion_length: case["max_completion_length"].as_u64().unwrap() as usize,
            beta,
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            loss_type: GrpoLoss::parse(case["loss_type"].as_str().unwrap()).unwrap(),
            scale_rewards: scale,
            ..GrpoConfig::default()
        };
        let (loss, stats, gr, logps) = policy::grpo_batch(&base, &lora, &cfg, &batch, old.as_deref(), reference.as_deref()).unwrap();
        for (a, b) in logps.iter().zip(&per_token("per_token_logps").unwrap()) {
            assert!(max_diff(a, b) < 1e-4, "{name}: policy log-probabilities");
        }
        let want = case["loss"].as_f64().unwrap();
        assert!((loss - want).abs() < 1e-5 + 1e-4 * want.abs(), "{name}: loss {loss} vs {want}");
        let n = stats.tokens as f64;
        let m = &case["metrics"];
        assert!((stats.low_clipped as f64 / n - m["clip_ratio/low_mean"].as_f64().unwrap()).abs() < 1e-6, "{name}: low clip ratio");
        assert!((stats.high_clipped as f64 / n - m["clip_ratio/high_mean"].as_f64().unwrap()).abs() < 1e-6, "{name}: high clip ratio");
        if beta != 0.0 {
            assert!((stats.kl / n - m["kl"].as_f64().unwrap()).abs() < 1e-5, "{name}: kl");
        }
        check_grads(name, &gr, &want_grads);
    }
}

#[test]
fn a_reference_adapter_is_the_reference() {
    let (base, lora) = setup();
    let case = &jsonl("dpo_cases.jsonl")[0];
    let examples = pairs(case);
    // With the policy's own adapter as the reference every implicit reward is 0, the
    // sigmoid loss is log 2 and no pair is won.
    let (loss, metrics, _) = policy::dpo_batch(&base, &lora, Some(&lora), &DpoConfig::default(), &examples).unwrap();
    assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
    let get = |n: &str| metrics.iter().find(|(k, _)| k == n).unwrap().1;
    assert!(get("rewards/chosen").abs() < 1e-6 && get("rewards/rejected").abs() < 1e-6);
    assert_eq!(get("rewards/accuracies"), 0.0);
    // The reference kept in the examples is the adapter's, not the base's.
    let (rc, _) = *examples[0].reference.get().unwrap();
    assert!((rc - f64s(&case["policy_chosen_logps"])[0]).abs() < 1e-3);
    assert!((rc - f64s(&case["ref_chosen_logps"])[0]).abs() > 1e-3);
}

#[test]
fn spec_paths_of_the_reference_and_of_rewards_are_anchored_at_the_spec() {
    let text = r#"
[experiment]
name = "g"
[data]
train = "t.jsonl"
[model]
base = "m"
[lora]
r = 2
alpha = 4
[trainer]
kind = "grpo"
[[reward]]
kind = "command"
program = ["./score.py", "--x"]
[[reward]]
kind = "json_schema"
schema = "schemas/answer.json"
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("score.py"), "print(1)\n").unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("schemas/answer.json"), "{\"type\": \"object\"}").unwrap();
    let s = furnace_train::Spec::parse(text, &dir.path().join("grpo.toml")).unwrap();
    let at = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    assert_eq!(s.rewards[0].program.as_ref().unwrap()[0], at("./score.py"));
    assert_eq!(s.rewards[1].schema, Some(serde_json::json!(at("schemas/answer.json"))));
    let dpo = text.replace("kind = \"grpo\"", "kind = \"dpo\"\nreference_adapter = \"ref\"");
    let dpo = &dpo[..dpo.find("[[reward]]").unwrap()];
    let s = furnace_train::Spec::parse(dpo, &dir.path().join("dpo.toml")).unwrap();
    assert_eq!(s.trainer.reference_adapter, Some(dir.path().join("ref")));
}
