//! `furnace embed`, `furnace index ...` and `furnace search` end to end with MiniLM.

use std::path::Path;
use std::process::{Command, Output};

fn furnace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).args(args).output().expect("run furnace")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure; stdout: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn embed_prints_the_library_vectors() {
    let o = furnace(&["embed", "--json", "A man is eating food.", "Rust has a borrow checker."]);
    let lines: Vec<serde_json::Value> = ok(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    let v: Vec<f32> = lines[0]["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(v.len(), 384);
    let enc = furnace_rag::SentenceEncoder::from_dir(&furnace_testutil::minilm_dir()).unwrap();
    let want = enc.embed(&["A man is eating food."]).unwrap().vectors.remove(0);
    assert!(v.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    let e = err(&furnace(&["embed"]));
    assert!(e.contains("nothing to embed"), "{e}");
}

fn write_corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("paris.txt"), "Paris is the capital of France.").unwrap();
    std::fs::write(dir.join("bread.md"), "# Bread\n\nKnead the dough for ten minutes.").unwrap();
    std::fs::write(dir.join("rows.jsonl"), "{\"text\": \"The Spree flows through Berlin.\", \"lang\": \"en\"}\n{\"text\": \"Die Spree fliesst durch Berlin.\", \"lang\": \"de\"}\n").unwrap();
}

#[test]
fn index_build_list_show_search_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    write_corpus(&docs);
    let (docs_s, root_s) = (docs.to_str().unwrap(), root.to_str().unwrap());
    let out = ok(&furnace(&["index", "build", "--docs", docs_s, "--root", root_s, "--chunk-size", "200", "--chunk-overlap", "0"]));
    assert!(out.contains("built index "), "{out}");
    assert!(out.contains("4 documents, 4 chunks"), "{out}");
    let list: serde_json::Value = serde_json::from_str(&ok(&furnace(&["index", "list", "--root", root_s, "--json"]))).unwrap();
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["chunks"], 4);
    // Building again reuses it.
    let again = ok(&furnace(&["index", "build", "--docs", docs_s, "--root", root_s, "--chunk-size", "200", "--chunk-overlap", "0"]));
    assert!(again.contains("already exists"), "{again}");
    let show = ok(&furnace(&["index", "show", &id[..6], "--root", root_s]));
    assert!(show.contains("paris.txt") && show.contains("all-minilm-l6-v2"), "{show}");

    let res: serde_json::Value = serde_json::from_str(&ok(&furnace(&[
        "search",
        "--index",
        &id,
        "--root",
        root_s,
        "--json",
        "-k",
        "2",
        "What is the capital of France?",
    ])))
    .unwrap();
    assert_eq!(res["hits"][0]["chunk"]["doc_id"], "paris.txt");
    assert_eq!(res["hits"][0]["rank"], 1);
    let table = ok(&furnace(&["search", "--index", &id, "--root", root_s, "--hybrid", "--filter", "lang=de", "Berlin"]));
    assert!(table.contains("Die Spree") && !table.contains("The Spree"), "{table}");

    // Bad requests.
    let e = err(&furnace(&["search", "--index", &id, "--root", root_s, "-k", "0", "x"]));
    assert!(e.contains("k must be at least 1"), "{e}");
    let e = err(&furnace(&["search", "--index", &id, "--root", root_s, "--top-n", "2", "x"]));
    assert!(e.contains("--top-n needs --rerank"), "{e}");
    let e = err(&furnace(&["search", "--index", "ffff0000", "--root", root_s, "x"]));
    assert!(e.contains("no index ffff0000"), "{e}");
    let e = err(&furnace(&["index", "build", "--docs", docs_s, "--root", root_s, "--chunk-size", "10", "--chunk-overlap", "10"]));
    assert!(e.contains("overlap"), "{e}");

    ok(&furnace(&["index", "rm", &id, "--root", root_s]));
    let list = ok(&furnace(&["index", "list", "--root", root_s]));
    assert!(list.contains("no indexes"), "{list}");
}
