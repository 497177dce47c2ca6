//! Persistent indexes end to end with the real MiniLM encoder: build, reuse, incremental
//! rebuild, search kinds, hybrid, filters, reranking, edits, bad input, crash leftovers.

use std::path::Path;

use anyhow::Result;
use furnace_rag::collection::{self, BuildProgress, BuildSettings, Index, SearchKind, SearchOptions, VectorKind};
use furnace_rag::docs::LoadOptions;
use furnace_rag::index::{Condition, Filter};
use furnace_rag::split::SplitterConfig;
use furnace_rag::{CrossEncoder, SentenceEncoder};
use furnace_testutil::{minilm_dir, testdata};

fn settings(vectors: VectorKind) -> BuildSettings {
    BuildSettings {
        splitter: SplitterConfig { chunk_size: 200, chunk_overlap: 20, ..SplitterConfig::default() },
        load: LoadOptions::default(),
        vectors,
    }
}

fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir.join("geo")).unwrap();
    std::fs::write(dir.join("geo/france.txt"), "Paris is the capital of France. The Seine flows through Paris.").unwrap();
    std::fs::write(dir.join("geo/germany.txt"), "Berlin is the capital of Germany. The Spree flows through Berlin.").unwrap();
    std::fs::write(
        dir.join("cooking.md"),
        "# Bread\n\nKnead the dough for ten minutes, then let it rise for an hour.\n\n# Pasta\n\nBoil salted water and cook the spaghetti for nine minutes.",
    )
    .unwrap();
    std::fs::write(dir.join("rust.txt"), "Rust has a borrow checker that prevents data races at compile time.").unwrap();
    std::fs::write(dir.join("blob.txt"), b"\x00\x01\x02 binary").unwrap();
}

fn no_progress() -> impl FnMut(BuildProgress) {
    |_| {}
}

#[test]
fn build_search_reuse_and_edit_an_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    corpus(&docs);
    let enc = SentenceEncoder::from_dir(&minilm_dir())?;
    let built = collection::build(&root, std::slice::from_ref(&docs), &settings(VectorKind::Exact), &enc, &mut no_progress())?;
    assert!(!built.existed);
    let m = built.index.manifest().clone();
    assert_eq!(m.documents.len(), 4, "{:?}", m.documents);
    assert_eq!(m.skipped.len(), 1, "the binary file is skipped and reported");
    assert!(m.skipped[0].0.ends_with("blob.txt") && m.skipped[0].1.contains("binary"));

    // The nearest chunk of a question is the one that answers it, with its span.
    let opts = SearchOptions { k: 3, ..SearchOptions::default() };
    let res = built.index.search(&enc, "What is the capital of France?", &opts, None)?;
    assert_eq!(res.hits[0].chunk.doc_id, "geo/france.txt");
    let c = &res.hits[0].chunk;
    let text = std::fs::read_to_string(docs.join("geo/france.txt"))?;
    assert_eq!(text.chars().skip(c.start_char).take(c.end_char - c.start_char).collect::<String>(), c.text);
    assert!(res.hits.windows(2).all(|w| w[0].score >= w[1].score));

    // The same documents and settings find the same index; reopening gives the same results.
    let again = collection::build(&root, std::slice::from_ref(&docs), &settings(VectorKind::Exact), &enc, &mut no_progress())?;
    assert!(again.existed);
    assert_eq!(again.index.id(), m.id);
    let reopened = Index::open(&root, &m.id)?;
    let res2 = reopened.search(&enc, "What is the capital of France?", &opts, None)?;
    assert_eq!(res.hits.iter().map(|h| h.chunk.clone()).collect::<Vec<_>>(), res2.hits.iter().map(|h| h.chunk.clone()).collect::<Vec<_>>());

    // A changed document makes a new index that embeds only the new chunks.
    std::fs::write(docs.join("rust.txt"), "Rust's ownership rules are checked by the compiler.")?;
    let mut reused = None;
    let changed = collection::build(&root, std::slice::from_ref(&docs), &settings(VectorKind::Exact), &enc, &mut |p| {
        if let BuildProgress::Split { chunks, reused: r, .. } = p {
            reused = Some((chunks, r));
        }
    })?;
    assert!(!changed.existed);
    assert_ne!(changed.index.id(), m.id);
    let (chunks, r) = reused.unwrap();
    assert_eq!(r, chunks - 1, "every chunk but the changed one is reused");
    assert_eq!(collection::list(&root)?.len(), 2);

    // Threshold, hybrid and filters.
    let th = built.index.search(
        &enc,
        "capital of France",
        &SearchOptions { k: 4, kind: SearchKind::Threshold(0.5), ..SearchOptions::default() },
        None,
    )?;
    assert!(!th.hits.is_empty() && th.hits.iter().all(|h| h.score >= 0.5));
    let hybrid = built.index.search(&enc, "spaghetti", &SearchOptions { k: 2, hybrid: true, ..SearchOptions::default() }, None)?;
    assert!(hybrid.hits[0].chunk.text.contains("spaghetti"));
    assert!(hybrid.hits[0].bm25_score.is_some_and(|s| s > 0.0));
    let filter = Filter::all().with("path", Condition::Eq("geo/germany.txt".into()));
    let only = built.index.search(&enc, "capital of France", &SearchOptions { k: 3, filter, ..SearchOptions::default() }, None)?;
    assert!(only.hits.iter().all(|h| h.chunk.doc_id == "geo/germany.txt"), "{:?}", only.hits);
    let mmr = built.index.search(
        &enc,
        "capital city",
        &SearchOptions { k: 2, kind: SearchKind::Mmr { fetch_k: 5, lambda_mult: 0.5 }, ..SearchOptions::default() },
        None,
    )?;
    assert_eq!(mmr.hits.len(), 2);

    // Edits: add a document, delete one; both survive reopening.
    let mut index = Index::open(&root, &m.id)?;
    let extra = furnace_rag::docs::Document {
        id: "geo/italy.txt".into(),
        source: "upload".into(),
        text: "Rome is the capital of Italy.".into(),
        metadata: Default::default(),
    };
    assert_eq!(index.add_documents(&[extra], &enc)?, 1);
    assert_eq!(index.delete_document("geo/france.txt")?, 1);
    let index = Index::open(&root, &m.id)?;
    assert!(index.manifest().edited);
    let res = index.search(&enc, "What is the capital of Italy?", &opts, None)?;
    assert_eq!(res.hits[0].chunk.doc_id, "geo/italy.txt");
    assert!(res.hits.iter().all(|h| h.chunk.doc_id != "geo/france.txt"));
    let version_dirs =
        std::fs::read_dir(root.join(&m.id))?.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('v')).count();
    assert_eq!(version_dirs, 1, "old versions are removed");
    Ok(())
}

#[test]
fn hnsw_indexes_find_what_exact_ones_find_and_rerank() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    corpus(&docs);
    let enc = SentenceEncoder::from_dir(&minilm_dir())?;
    let hnsw = VectorKind::Hnsw { m: 8, ef_construction: 32, ef_search: 32 };
    let built = collection::build(&root, &[docs], &settings(hnsw), &enc, &mut no_progress())?;
    let res =
        built.index.search(&enc, "How long should bread dough be kneaded?", &SearchOptions { k: 3, ..SearchOptions::default() }, None)?;
    assert!(res.hits[0].chunk.text.contains("Knead"), "{:?}", res.hits[0]);
    // Reranked by a cross-encoder: top_n of the k, ordered by its scores.
    let ce = CrossEncoder::from_dir(&testdata().join("tiny-cross-encoder"))?;
    let opts = SearchOptions { k: 3, top_n: Some(2), ..SearchOptions::default() };
    let rr = built.index.search(&enc, "bread", &opts, Some(&ce))?;
    assert_eq!(rr.hits.len(), 2);
    let texts: Vec<&str> = rr.hits.iter().map(|h| h.chunk.text.as_str()).collect();
    let direct = ce.scores("bread", &texts)?;
    for (h, s) in rr.hits.iter().zip(direct) {
        assert!((h.score - s).abs() < 1e-6);
    }
    assert!(rr.hits[0].score >= rr.hits[1].score);
    Ok(())
}

#[test]
fn bad_requests_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (docs, root) = (tmp.path().join("docs"), tmp.path().join("indexes"));
    let enc = SentenceEncoder::from_dir(&minilm_dir())?;
    // An empty corpus.
    std::fs::create_dir_all(&docs)?;
    let err = collection::build(&root, std::slice::from_ref(&docs), &settings(VectorKind::Exact), &enc, &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no documents"), "{err}");
    corpus(&docs);
    let built = collection::build(&root, std::slice::from_ref(&docs), &settings(VectorKind::Exact), &enc, &mut no_progress())?;
    let index = built.index;
    let k0 = index.search(&enc, "x", &SearchOptions { k: 0, ..SearchOptions::default() }, None).unwrap_err().to_string();
    assert!(k0.contains("k must be at least 1"), "{k0}");
    let ce = CrossEncoder::from_dir(&testdata().join("tiny-cross-encoder"))?;
    let top =
        index.search(&enc, "x", &SearchOptions { k: 2, top_n: Some(3), ..SearchOptions::default() }, Some(&ce)).unwrap_err().to_string();
    assert!(top.contains("top_n (3) must be between 1 and k (2)"), "{top}");
    // A query longer than the encoder's 256 tokens is cut, and said so.
    let long = "capital ".repeat(400);
    assert!(index.search(&enc, &long, &SearchOptions::default(), None)?.query_truncated);
    // Querying with another model than the index's.
    let other = SentenceEncoder::from_dir(&testdata().join("tiny-bert"))?;
    let wrong = index.search(&other, "x", &SearchOptions::default(), None).unwrap_err().to_string();
    assert!(wrong.contains("was built with") && wrong.contains("same model"), "{wrong}");
    // Strict loading stops at the binary file.
    let strict = BuildSettings { load: LoadOptions { strict: true, ..LoadOptions::default() }, ..settings(VectorKind::Exact) };
    let err = collection::build(&root, std::slice::from_ref(&docs), &strict, &enc, &mut no_progress()).unwrap_err().to_string();
    assert!(err.contains("blob.txt"), "{err}");
    // A crashed build's leftovers are not an index and are swept by the next build.
    std::fs::create_dir_all(root.join(".partial-deadbeef-1"))?;
    std::fs::write(root.join(".partial-deadbeef-1/half"), "x")?;
    assert_eq!(collection::list(&root)?.len(), 1);
    collection::build(&root, &[docs], &settings(VectorKind::Exact), &enc, &mut no_progress())?;
    assert!(!root.join(".partial-deadbeef-1").exists());
    // A damaged index is an error naming it, not a panic.
    let id = index.id().to_string();
    let vdir = root.join(&id).join("v1");
    std::fs::write(vdir.join("chunks.jsonl"), "{not json\n")?;
    let err = Index::open(&root, &id).unwrap_err().to_string();
    assert!(err.contains("damaged"), "{err}");
    assert!(collection::resolve_id(&root, "zz").is_err());
    Ok(())
}
