//! `furnace adapters` end to end: a foreign PEFT adapter registered, listed, tagged,
//! resolved by name and tag in `furnace generate`, removed; a trained run's adapter listed
//! and evaluated by name; `furnace serve` serving registered adapters by name.

use crate::serve::Server;
use furnace_testutil::testdata;
use std::path::Path;
use std::process::{Command, Output};

fn furnace(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).current_dir(dir).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[test]
fn a_foreign_adapter_is_registered_listed_tagged_resolved_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let smol = testdata().join("lora_adapter");
    let smol = smol.to_str().unwrap();

    // Nothing yet: an empty list, and a name that resolves nowhere says so.
    assert_eq!(json(&furnace(d, &["adapters", "list", "--json"])), serde_json::json!([]));
    let e = err(&furnace(d, &["generate", "--adapter", "smol", "--max-tokens", "2", "hi"]));
    assert!(e.contains("no adapter directory or registered adapter 'smol'") && e.contains("furnace adapters register"), "{e}");

    let out = ok(&furnace(d, &["adapters", "register", smol, "--name", "smol", "--tag", "prod"]));
    assert!(out.contains("registered smol (base HuggingFaceTB/SmolLM2-135M-Instruct, rank 8)"), "{out}");
    let e = err(&furnace(d, &["adapters", "register", smol, "--name", "smol"]));
    assert!(e.contains("'smol' is registered already") && e.contains("--force"), "{e}");
    ok(&furnace(d, &["adapters", "register", smol, "--name", "smol", "--force", "--tag", "prod"]));
    let tiny = testdata().join("tiny-llama");
    let e = err(&furnace(d, &["adapters", "register", tiny.to_str().unwrap()]));
    assert!(e.contains("adapter_config.json"), "{e}");

    let table = ok(&furnace(d, &["adapters", "list"]));
    let header = table.lines().next().unwrap();
    for col in ["NAME", "BASE", "SOURCE", "RANK", "METRICS", "TAGS", "CREATED"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().nth(1).unwrap();
    for cell in ["smol", "HuggingFaceTB/SmolLM2-135M-Instruct", "registered", " 8 ", "prod"] {
        assert!(row.contains(cell), "{cell} not in {row}");
    }
    assert!(ok(&furnace(d, &["adapters", "list", "--base", "tiny-llama"])).is_empty());
    assert_eq!(json(&furnace(d, &["adapters", "list", "--base", "smollm2-135m-instruct", "--json"])).as_array().unwrap().len(), 1);

    let shown = json(&furnace(d, &["adapters", "show", "smol", "--json"]));
    assert_eq!(shown["path"], std::fs::canonicalize(smol).unwrap().to_str().unwrap());
    assert_eq!(shown["peft"]["lora_alpha"], 16);
    let text = ok(&furnace(d, &["adapters", "show", "smol"]));
    assert!(text.contains("source:   registered") && text.contains("tags:     prod"), "{text}");

    ok(&furnace(d, &["adapters", "tag", "smol", "best", "fast"]));
    ok(&furnace(d, &["adapters", "tag", "smol", "fast", "--remove"]));
    assert_eq!(json(&furnace(d, &["adapters", "show", "smol", "--json"]))["tags"], serde_json::json!(["prod", "best"]));
    assert_eq!(json(&furnace(d, &["adapters", "list", "--tag", "best", "--json"]))[0]["name"], "smol");

    // The name, a tag and the directory give the same generation.
    let gen = |adapter: &str| {
        let o = json(&furnace(d, &["generate", "--adapter", adapter, "--max-tokens", "8", "--json", "What is the capital of France?"]));
        o["new_ids"].clone()
    };
    let by_dir = gen(smol);
    assert_eq!(gen("smol"), by_dir);
    assert_eq!(gen("best"), by_dir);
    let e = err(&furnace(d, &["generate", "--adapter", "smoll", "--max-tokens", "2", "hi"]));
    assert!(e.contains("closest: smol"), "{e}");

    // rm: the files outside the runs folder stay; --delete-files is refused there.
    let e = err(&furnace(d, &["adapters", "rm", "smol", "--delete-files"]));
    assert!(e.contains("outside the runs folder"), "{e}");
    let out = ok(&furnace(d, &["adapters", "rm", "smol"]));
    assert!(out.contains("removed smol"), "{out}");
    assert!(Path::new(smol).join("adapter_model.safetensors").is_file());
    assert!(err(&furnace(d, &["adapters", "show", "smol"])).contains("no adapter directory, registered adapter or tag 'smol'"));
}

#[test]
fn a_trained_run_is_registered_and_evaluated_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows: String = (0..5).map(|i| format!("{{\"prompt\": \"What is {i} plus {i}?\", \"completion\": \"{}\"}}\n", 2 * i)).collect();
    std::fs::write(d.join("train.jsonl"), &rows).unwrap();
    std::fs::write(d.join("eval.jsonl"), &rows).unwrap();
    let tiny = testdata().join("tiny-llama");
    let spec = format!(
        "[experiment]\nname = \"tiny\"\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n[model]\nbase = \"{}\"\n\
         [lora]\nr = 2\nalpha = 8\ntargets = [\"q_proj\", \"v_proj\"]\n[trainer]\nlearning_rate = 1e-2\nmax_steps = 2\nbatch_size = 2\nmax_seq_len = 64\n",
        tiny.display().to_string().replace('\\', "/")
    );
    std::fs::write(d.join("spec.toml"), spec).unwrap();
    ok(&furnace(d, &["train", "spec.toml", "--samples", "0"]));

    let list = json(&furnace(d, &["adapters", "list", "--json"]));
    let a = &list[0];
    let name = a["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("tiny/run-"), "{list}");
    assert_eq!((a["source"].as_str(), a["experiment"].as_str()), (Some("run"), Some("tiny")));
    assert_eq!(a["peft"]["r"], 2);
    assert_eq!(a["metrics"]["step"], 2);
    let eval_loss = a["metrics"]["eval_loss"].as_f64().unwrap();

    // `furnace eval --adapter NAME` finds the run's folder through the registry.
    let args = ["eval", "--model", tiny.to_str().unwrap(), "--adapter", &name, "--data", "eval.jsonl"];
    ok(&furnace(d, &args));
    let run = d.join("runs").join(&name);
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/metrics.json")).unwrap()).unwrap();
    assert!((m["metrics"]["nll"].as_f64().unwrap() - eval_loss).abs() < 1e-4, "{m} vs {eval_loss}");
}

#[test]
fn serve_serves_registered_adapters_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let runs_s = runs.to_str().unwrap();
    let smol = testdata().join("lora_adapter");
    let pref = testdata().join("tiny-llama-pref-lora");
    ok(&furnace(dir.path(), &["adapters", "register", smol.to_str().unwrap(), "--name", "tuned", "--runs-dir", runs_s]));
    ok(&furnace(dir.path(), &["adapters", "register", pref.to_str().unwrap(), "--name", "other", "--runs-dir", runs_s]));

    // A bare registered name, NAME=registered name, and every registered adapter of the
    // served base (`other` is tiny-llama's: not served).
    let server = Server::start(&runs, &["--adapter", "tuned", "--adapter", "copy=tuned", "--registered"]);
    let (status, body) = server.http("GET", "/v1/models", None);
    assert_eq!(status, 200, "{body}");
    let models: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().filter(|m| m["furnace_kind"] != "rag").map(|m| m["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["copy", "smollm2-135m-instruct", "tuned"], "{body}");
    let req = serde_json::json!({"model": "tuned", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (status, body) = server.http("POST", "/v1/chat/completions", Some(&req));
    assert_eq!(status, 200, "{body}");
    // The dashboard's registry route on the same port.
    let (status, body) = server.http("GET", "/api/adapters", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().unwrap().len(), 2);
    let (status, rest) = server.stop();
    assert!(status.success(), "furnace serve exited with {status}: {rest}");

    // An unknown registered name fails to start, naming the closest.
    let o = furnace(dir.path(), &["serve", "--adapter", "tunde", "--runs-dir", runs_s, "--port", "0"]);
    let e = err(&o);
    assert!(e.contains("--adapter tunde") && e.contains("closest: tuned"), "{e}");
}
