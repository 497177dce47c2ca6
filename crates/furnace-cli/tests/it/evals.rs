//! Evals mode through the real `furnace` binary, the real SmolLM2 generator and the real
//! MiniLM encoder on the shipped Varnholt data: pipelines answer shard by shard, results
//! print intervals that narrow, an external command metric scores, a clone with a new
//! chunk size builds a new index, an OpenAI-compatible generator (a real `furnace serve`)
//! answers, and a run killed at a shard's commit continues to exactly what an
//! uninterrupted run gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_exp::Store;
use furnace_testutil::repo_root as root;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

fn furnace(dir: &Path, args: &[&str], failpoint: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_furnace"));
    c.current_dir(dir).args(args).env_remove("FURNACE_FAILPOINT").env_remove("FURNACE_FAILPOINT_LOG");
    if let Some(p) = failpoint {
        c.env("FURNACE_FAILPOINT", p);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stderr), String::from_utf8_lossy(&o.stdout))
}

/// A small evals spec over the shipped data: `limit` questions in `shards` shards, two
/// pipelines (k = 1 and 2), greedy answers of a few tokens; `extra` is appended.
fn spec(dir: &Path, name: &str, limit: usize, shards: usize, generator: &str, extra: &str) -> std::path::PathBuf {
    let data = root().join("data/rag_eval");
    let text = format!(
        r#"[experiment]
name = "{name}"
mode = "evals"
seed = 7
primary = "contains"

[data]
path = "{q}"
num_shards = {shards}
limit = {limit}

[rag]
documents = ["{docs}"]
chunk_size = 256
chunk_overlap = 0
k = {{ list = [1, 2] }}

[prompt]
system = "Answer with the answer only."
template = "Context:\n{{{{ context }}}}\n\nQuestion: {{{{ question }}}}"

{generator}

[[metric]]
kind = "contains"

[[metric]]
kind = "hit_rate"
{extra}"#,
        q = data.join("questions.jsonl").display(),
        docs = data.join("docs").display(),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

const LOCAL: &str = "[generator]\nkind = \"local\"\nmodel = \"smollm2-135m-instruct\"\nmax_tokens = 8\n";

/// (run, example id) → (prediction, scores), and (run, step, metric) → value, without the
/// timing figures.
type Snapshot = (BTreeMap<(i64, String), (String, BTreeMap<String, f64>)>, BTreeMap<(i64, i64, String), f64>);

fn snapshot(runs_dir: &Path) -> Snapshot {
    let store = Store::open_in(runs_dir).unwrap();
    let exp = store.experiments().unwrap().pop().unwrap();
    let mut examples = BTreeMap::new();
    let mut metrics = BTreeMap::new();
    for r in store.runs(exp.id).unwrap() {
        for e in store.eval_examples(r.id).unwrap() {
            assert!(examples.insert((r.id, e.example_id.clone()), (e.prediction, e.scores)).is_none(), "an example scored twice");
        }
        for m in store.metrics(r.id).unwrap() {
            if !["latency", "throughput"].contains(&m.name.as_str()) {
                metrics.insert((r.id, m.step, m.name), m.value);
            }
        }
    }
    (examples, metrics)
}

#[test]
fn evals_run_prints_narrowing_intervals_scores_by_command_and_clones_with_a_new_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    // An external metric: 1 when the answer is non-empty (reads JSON lines, writes scores).
    let script = dir.path().join("nonempty.py");
    std::fs::write(
        &script,
        "import json, sys\nfor line in sys.stdin:\n    item = json.loads(line)\n    print(json.dumps({\"score\": 1.0 if item['prediction'].strip() else 0.0}))\n",
    )
    .unwrap();
    // And an LLM judge (the same local model) whose answer is read as a score in [0, 5].
    let extra = format!(
        "\n[[metric]]\nkind = \"command\"\nname = \"nonempty\"\ncommand = [\"python3\", \"{}\"]\n\n\
         [[metric]]\nkind = \"judge\"\nrange = [0, 5]\nrubric = \"Question: {{{{ question }}}}\\nReference: {{{{ answer }}}}\\nAnswer: {{{{ prediction }}}}\\nRate the answer from 0 to 5. Reply with one digit.\"\n\n\
         [judge]\nkind = \"local\"\nmodel = \"smollm2-135m-instruct\"\nmax_tokens = 4\n",
        script.display()
    );
    let s = spec(dir.path(), "ev", 16, 4, LOCAL, &extra);
    let runs = dir.path().join("runs");
    let r = runs.to_str().unwrap();
    let o = furnace(dir.path(), &["run", s.to_str().unwrap(), "--runs-dir", r, "--no-server"], None);
    assert!(o.status.success(), "{}", text(&o));
    let store = Store::open_in(&runs).unwrap();
    let exp = store.experiment("ev").unwrap();
    assert_eq!(exp.mode, "evals");
    let pipes = store.runs(exp.id).unwrap();
    assert_eq!(pipes.len(), 2);
    for p in &pipes {
        assert_eq!((p.status.as_str(), p.steps_done, p.total_steps), ("completed", 4, 4), "{p:?}");
        let ex = store.eval_examples(p.id).unwrap();
        assert_eq!(ex.len(), 16);
        // Every question once, each scored by every metric; k retrieved documents at most.
        let ids: std::collections::BTreeSet<&str> = ex.iter().map(|e| e.example_id.as_str()).collect();
        assert_eq!(ids.len(), 16);
        let k = p.config["rag"]["k"].as_u64().unwrap() as usize;
        for e in &ex {
            assert_eq!(e.scores.keys().collect::<Vec<_>>(), ["contains", "hit_rate", "judge", "nonempty"]);
            assert!((0.0..=5.0).contains(&e.scores["judge"]), "{e:?}");
            assert!(e.retrieved.len() <= k && !e.retrieved.is_empty(), "{e:?}");
            assert_eq!(e.scores["nonempty"], f64::from(!e.prediction.trim().is_empty()));
            assert!(e.prompt_tokens > 0 && e.completion_tokens > 0);
        }
        // Intervals narrow shard by shard; with the whole set scored (finite population)
        // the interval is the exact mean.
        let b = store.bound_series(p.id, "contains").unwrap();
        assert_eq!(b.len(), 4);
        let width: Vec<f64> = b.iter().map(|(_, lo, hi)| hi - lo).collect();
        assert!(width[0] > width[3], "{width:?}");
        let mean = ex.iter().map(|e| e.scores["contains"]).sum::<f64>() / 16.0;
        assert!((b[3].1 - mean).abs() < 1e-9 && (b[3].2 - mean).abs() < 1e-9, "{b:?} vs {mean}");
        for (step, lo, hi) in &b {
            let v = store.metric_series(p.id, "contains").unwrap().into_iter().find(|(s, _)| s == step).unwrap().1;
            assert!(*lo <= v + 1e-12 && v <= hi + 1e-12);
        }
    }
    // The shards are a permutation, the same for both pipelines, not the file's order.
    let first = store.eval_examples(pipes[0].id).unwrap();
    let second = store.eval_examples(pipes[1].id).unwrap();
    let order = |v: &[furnace_exp::ExampleRecord]| v.iter().map(|e| e.example_id.clone()).collect::<Vec<_>>();
    assert_eq!(order(&first), order(&second));
    assert_ne!(order(&first), (1..=16).map(|i| format!("q{i:03}")).collect::<Vec<_>>());
    let o = furnace(dir.path(), &["results", "--runs-dir", r], None);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("contains") && out.contains(" ± ") && out.contains("after shard 4/4"), "{out}");
    let o = furnace(dir.path(), &["runs", "--runs-dir", r], None);
    let out = text(&o);
    assert!(o.status.success() && out.contains("shards") && out.contains("4/4") && out.contains(" ± "), "{out}");

    // A clone with a new chunk size: a new index, all four shards, its parent recorded.
    let o = furnace(dir.path(), &["ops", "clone", &pipes[0].id.to_string(), "--set", "rag.chunk_size=128", "--runs-dir", r], None);
    assert!(o.status.success(), "{}", text(&o));
    let bad = furnace(dir.path(), &["ops", "clone", &pipes[0].id.to_string(), "--set", "rag.top_n=9", "--runs-dir", r], None);
    assert!(!bad.status.success() && text(&bad).contains("top_n"), "{}", text(&bad));
    let o = furnace(dir.path(), &["run", "--experiment", "ev", "--runs-dir", r, "--no-server"], None);
    assert!(o.status.success(), "{}", text(&o));
    let all = store.runs(exp.id).unwrap();
    assert_eq!(all.len(), 3);
    let clone = &all[2];
    assert_eq!((clone.parent_id, clone.status.as_str(), clone.steps_done), (Some(pipes[0].id), "completed", 4));
    assert_eq!(clone.config["rag"]["chunk_size"], 128);
    assert_eq!(store.eval_examples(clone.id).unwrap().len(), 16);
    let indexes =
        std::fs::read_dir(runs.join("indexes")).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().join("CURRENT").exists()).count();
    assert_eq!(indexes, 2, "one index per chunk size");
}

#[test]
fn an_evals_run_killed_at_a_shard_continues_to_what_an_uninterrupted_run_gives() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(dir.path(), "crash", 12, 3, LOCAL, "");
    let reference = dir.path().join("reference");
    let o = furnace(dir.path(), &["run", s.to_str().unwrap(), "--runs-dir", reference.to_str().unwrap(), "--no-server"], None);
    assert!(o.status.success(), "{}", text(&o));
    let want = snapshot(&reference);
    assert_eq!(want.0.len(), 24);
    // Killed after the third shard commit (one pipeline ahead of the other), then before
    // the fifth one's commit; each time `furnace run` continues the interrupted experiment.
    for point in ["store.record_shard.after_commit:3", "store.record_shard.before_commit:2"] {
        let runs = dir.path().join(point.replace([':', '.'], "_"));
        let args = ["run", s.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap(), "--no-server"];
        let o = furnace(dir.path(), &args, Some(point));
        assert_eq!(o.status.signal(), Some(6), "{point}: {}", text(&o));
        let o = furnace(dir.path(), &args, None);
        assert!(o.status.success(), "{point}: {}", text(&o));
        assert!(text(&o).contains("continuing experiment crash"), "{}", text(&o));
        let got = snapshot(&runs);
        assert_eq!(got.0, want.0, "{point}: examples differ");
        assert_eq!(got.1, want.1, "{point}: metrics differ");
    }
}

#[test]
fn an_evals_spec_that_makes_no_sense_fails_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("runs");
    let cases = [
        ("top_n", "[rag]\nreranker = \"x\"\ntop_n = 5\n", "rag.top_n"),
        ("judge", "[[metric]]\nkind = \"judge\"\nrubric = \"Score 0-1\"\n", "needs a [judge] generator"),
    ];
    for (name, extra, want) in cases {
        // A second [rag] table would be a TOML error: those keys go under the spec's own.
        let s = spec(dir.path(), name, 8, 2, LOCAL, "");
        let body = std::fs::read_to_string(&s).unwrap();
        let body = if extra.starts_with("[rag]") { body.replace("[rag]\n", extra) } else { format!("{body}\n{extra}") };
        std::fs::write(&s, body).unwrap();
        let o = furnace(dir.path(), &["run", s.to_str().unwrap(), "--runs-dir", r.to_str().unwrap(), "--no-server"], None);
        assert!(!o.status.success() && text(&o).contains(want), "{name}: {}", text(&o));
    }
    // A retrieval metric over questions without relevant ids.
    let rows: String = (0..4).map(|i| format!("{{\"question\": \"q{i}?\", \"answer\": \"a\"}}\n")).collect();
    let q = dir.path().join("plain.jsonl");
    std::fs::write(&q, rows).unwrap();
    let s = spec(dir.path(), "norel", 4, 2, LOCAL, "");
    let body = std::fs::read_to_string(&s)
        .unwrap()
        .replace(&root().join("data/rag_eval/questions.jsonl").display().to_string(), &q.display().to_string());
    std::fs::write(&s, body).unwrap();
    let o = furnace(dir.path(), &["run", s.to_str().unwrap(), "--runs-dir", r.to_str().unwrap(), "--no-server"], None);
    assert!(!o.status.success() && text(&o).contains("relevant document ids"), "{}", text(&o));
    // Nothing was created.
    assert!(Store::open_in(&r).unwrap().experiments().unwrap().is_empty());
}

#[test]
fn an_openai_generator_pipeline_answers_from_a_real_furnace_serve() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::serve::Server::start(&dir.path().join("serve-runs"), &[]);
    let generator = format!(
        "[generator]\nkind = \"openai\"\nbase_url = \"{}\"\nmodel = \"smollm2-135m-instruct\"\nmax_tokens = 8\nconcurrency = 4\nrpm = 600\ninput_price_per_million = 1.0\noutput_price_per_million = 2.0\n",
        server.url
    );
    let s = spec(dir.path(), "api", 8, 2, &generator, "");
    let runs = dir.path().join("runs");
    let o = furnace(dir.path(), &["run", s.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap(), "--no-server"], None);
    assert!(o.status.success(), "{}", text(&o));
    let store = Store::open_in(&runs).unwrap();
    let exp = store.experiment("api").unwrap();
    for p in store.runs(exp.id).unwrap() {
        assert_eq!((p.status.as_str(), p.steps_done), ("completed", 2), "{p:?}");
        let ex = store.eval_examples(p.id).unwrap();
        assert_eq!(ex.len(), 8);
        assert!(ex.iter().all(|e| e.prompt_tokens > 0 && e.completion_tokens > 0 && e.latency > 0.0), "{ex:?}");
        let (pt, ct): (usize, usize) = ex.iter().fold((0, 0), |a, e| (a.0 + e.prompt_tokens, a.1 + e.completion_tokens));
        let cost = store.metric_series(p.id, "cost").unwrap().last().unwrap().1;
        assert!((cost - (pt as f64 * 1.0 + ct as f64 * 2.0) / 1e6).abs() < 1e-12, "{cost}");
    }
    server.stop();
}
