//! The evals spec: defaults, knob expansion into pipelines, and settings that make no
//! sense refused with the key and what to fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_evals::spec::{expand, EvalSpec};
use std::path::Path;

const BASE: &str = r#"
[experiment]
name = "e"
mode = "evals"

[data]
path = "q.jsonl"

[rag]
documents = ["docs"]

[[metric]]
kind = "contains"

[[metric]]
kind = "hit_rate"
"#;

fn err(extra_rag: &str, extra: &str) -> String {
    let text = BASE.replace("[rag]\n", &format!("[rag]\n{extra_rag}")) + extra;
    match EvalSpec::parse(&text, Path::new("/x/spec.toml")) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_and_absolute_paths() {
    let s = EvalSpec::parse(BASE, Path::new("/x/spec.toml")).unwrap();
    assert_eq!(s.data.path, Path::new("/x/q.jsonl"));
    assert_eq!(s.rag.as_ref().unwrap().documents, [Path::new("/x/docs")]);
    assert_eq!((s.data.num_shards, s.rag.as_ref().unwrap().k, s.generator.kind.as_str()), (8, 4, "local"));
    assert_eq!(s.experiment.interval, furnace_evals::interval::Method::ConfSeq);
    assert_eq!(s.metric_names(), ["contains", "hit_rate"]);
    assert_eq!(s.primary(), Some(("contains".to_string(), true)));
}

#[test]
fn knobs_expand_into_pipelines_with_one_metric_name() {
    let text = BASE.replace("[rag]\n", "[rag]\nk = { list = [2, 4] }\nchunk_size = { list = [128, 256, 512] }\n");
    let p = expand(&text, Path::new("/x/spec.toml")).unwrap();
    assert_eq!(p.len(), 6);
    // The grid over knobs in key order: chunk_size outer, k inner.
    assert_eq!(p.iter().map(|p| p.spec.rag.as_ref().unwrap().k).collect::<Vec<_>>(), [2, 4, 2, 4, 2, 4]);
    assert_eq!(p.iter().map(|p| p.spec.rag.as_ref().unwrap().chunk_size).collect::<Vec<_>>(), [128, 128, 256, 256, 512, 512]);
    // A retrieval metric without its own k is taken at each pipeline's k, under one name.
    assert!(p.iter().all(|p| p.spec.metric_names() == ["contains", "hit_rate"]));
    // Knobs only where they make sense.
    let bad = BASE.replace("[data]\n", "[data]\nnum_shards = { list = [2, 4] }\n");
    let e = expand(&bad, Path::new("/x/spec.toml")).unwrap_err().to_string();
    assert!(e.contains("knobs are allowed only in [rag], [prompt], [generator] and [judge]"), "{e}");
}

#[test]
fn settings_that_make_no_sense_are_refused() {
    let e = err("k = 2\nreranker = \"r\"\ntop_n = 3\n", "");
    assert!(e.contains("rag.top_n") && e.contains("between 1 and k (2)"), "{e}");
    assert!(err("top_n = 1\n", "").contains("needs a reranker"));
    assert!(err("chunk_overlap = 600\n", "").contains("rag.chunk_overlap"));
    assert!(err("", "\n[[metric]]\nkind = \"judge\"\nrubric = \"0 or 1?\"\n").contains("needs a [judge] generator"));
    assert!(err("", "\n[[metric]]\nkind = \"regex\"\npattern = \"(\"\n").contains("not a regular expression"));
    assert!(err("", "\n[[metric]]\nkind = \"contains\"\n").contains("taken by an earlier metric"));
    assert!(err("", "\n[[metric]]\nkind = \"bleu\"\nk = 3\n").contains("only retrieval metrics take k"));
    assert!(err("", "\n[[metric]]\nkind = \"rogue\"\n").contains("'rogue' is not a metric"));
    assert!(err("", "\n[generator]\nkind = \"local\"\nrpm = 10\n").contains("generator.rpm"));
    assert!(err("", "\n[generator]\nkind = \"openai\"\nmodel = \"m\"\n").contains("needs base_url"));
    let no_rag = BASE.replace("[rag]\ndocuments = [\"docs\"]\n", "");
    let e = EvalSpec::parse(&no_rag, Path::new("/x/spec.toml")).unwrap_err().to_string();
    assert!(e.contains("hit_rate scores retrieved documents, but the spec has no [rag]"), "{e}");
    let e = EvalSpec::parse(&BASE.replace("mode = \"evals\"", "mode = \"evals\"\nprimary = \"f1\""), Path::new("/x/s.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("'f1' is not a metric"), "{e}");
}
