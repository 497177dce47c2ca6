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

fn furnace_crashing_at(point: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).env("FURNACE_FAILPOINT", point).args(args).output().expect("run furnace")
}

fn index_ids(root: &str) -> Vec<String> {
    let list: serde_json::Value = serde_json::from_str(&ok(&furnace(&["index", "list", "--root", root, "--json"]))).unwrap();
    list.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

fn top_doc(root: &str, id: &str, query: &str) -> String {
    let res: serde_json::Value =
        serde_json::from_str(&ok(&furnace(&["search", "--index", id, "--root", root, "--json", "-k", "1", query]))).unwrap();
    res["hits"][0]["chunk"]["doc_id"].as_str().unwrap().to_string()
}

#[test]
fn a_crash_at_any_index_write_leaves_the_previous_index_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    write_corpus(&docs);
    let (docs_s, root_s) = (docs.to_str().unwrap(), root.to_str().unwrap());
    let build = ["index", "build", "--docs", docs_s, "--root", root_s];

    // Killed before the finished build is renamed into place: no index at all.
    let o = furnace_crashing_at("index.build.before_rename", &build);
    assert!(String::from_utf8_lossy(&o.stderr).contains("failpoint index.build.before_rename hit"), "{o:?}");
    assert!(index_ids(root_s).is_empty());
    // Killed right after: the index is whole.
    std::fs::remove_dir_all(&root).ok();
    furnace_crashing_at("index.build.after_rename", &build);
    let ids = index_ids(root_s);
    assert_eq!(ids.len(), 1);
    assert_eq!(top_doc(root_s, &ids[0], "capital of France"), "paris.txt");
    // A crashed build's leftovers are swept by the next build, which finds the index.
    std::fs::remove_dir_all(&root).ok();
    furnace_crashing_at("index.build.before_rename", &build);
    let again = ok(&furnace(&build));
    assert!(again.contains("built index"), "{again}");
    assert!(std::fs::read_dir(&root).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with(".partial")));
    let id = index_ids(root_s).remove(0);

    // Edits: killed before the new version is made current, the old one answers; killed
    // after, the new one does.
    let extra = tmp.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("rome.txt"), "Rome is the capital of Italy.").unwrap();
    let add = ["index", "add", &id, "--docs", extra.to_str().unwrap(), "--root", root_s];
    let o = furnace_crashing_at("index.version.before_current", &add);
    assert!(!o.status.success());
    assert_ne!(top_doc(root_s, &id, "capital of Italy"), "rome.txt");
    let o = furnace_crashing_at("index.edit.before_removing_old", &add);
    assert!(!o.status.success());
    assert_eq!(top_doc(root_s, &id, "capital of Italy"), "rome.txt");
    // The next edit removes every version but the current one.
    ok(&furnace(&["index", "delete", &id, "--doc", "rome.txt", "--root", root_s]));
    assert_ne!(top_doc(root_s, &id, "capital of Italy"), "rome.txt");
    let versions = std::fs::read_dir(root.join(&id)).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert_eq!(versions, 1);
}

#[test]
fn a_bf16_index_is_searched_with_bf16_vectors() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    write_corpus(&docs);
    let root_s = root.to_str().unwrap();
    ok(&furnace(&["index", "build", "--docs", docs.to_str().unwrap(), "--root", root_s, "--dtype", "bf16"]));
    let id = index_ids(root_s).remove(0);
    // No --dtype: the index's own is used (an f32 query encoder would be refused).
    assert_eq!(top_doc(root_s, &id, "capital of France"), "paris.txt");
    let e = err(&furnace(&["search", "--index", &id, "--root", root_s, "--dtype", "f32", "x"]));
    assert!(e.contains("was built with"), "{e}");
}
