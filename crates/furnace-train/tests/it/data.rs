//! Dataset loading: file formats, row forms, completion-only masks, truncation, bad rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use furnace_text::{ChatTemplate, Tokenizer};
use furnace_train::{load_dataset, Columns, DataOptions, Error, IGNORE_INDEX};
use std::path::PathBuf;

fn text() -> (Tokenizer, ChatTemplate) {
    let dir = testdata().join("tiny-llama");
    (Tokenizer::from_hf_dir(&dir).unwrap(), ChatTemplate::from_hf_dir(&dir).unwrap().expect("template"))
}

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn completion_text(tok: &Tokenizer, ids: &[u32], labels: &[i64]) -> String {
    let kept: Vec<u32> = ids.iter().zip(labels).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&i, _)| i).collect();
    tok.decode(&kept, false).unwrap()
}

#[test]
fn row_forms_and_file_formats_give_the_same_examples() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let chat = write(&dir, "chat.jsonl", "{\"messages\": [{\"role\": \"system\", \"content\": \"Be terse.\"}, {\"role\": \"user\", \"content\": \"Capital of France?\"}, {\"role\": \"assistant\", \"content\": \"Paris.\"}]}\n\n");
    let pc = write(&dir, "pc.json", r#"[{"system": "Be terse.", "prompt": "Capital of France?", "completion": "Paris."}]"#);
    let ins = write(
        &dir,
        "ins.json",
        r#"{"data": [{"system": "Be terse.", "instruction": "Capital of France?", "input": "", "output": "Paris."}]}"#,
    );
    let csv = write(&dir, "rows.csv", "system,prompt,completion\nBe terse.,Capital of France?,Paris.\n");
    let opts = DataOptions::default();
    let a = load_dataset(&chat, &tok, &tpl, &opts).unwrap();
    assert_eq!(a.examples.len(), 1);
    let ex = &a.examples[0];
    assert_eq!(completion_text(&tok, &ex.ids, &ex.labels), "Paris.<|im_end|>\n");
    assert!(ex.labels[0] == IGNORE_INDEX);
    let parquet = testdata().join("parquet");
    let (pq_chat, pq_pc) = (parquet.join("chat.parquet"), parquet.join("pc_zstd.parquet"));
    for p in [&pc, &ins, &csv, &pq_chat, &pq_pc] {
        assert_eq!(load_dataset(p, &tok, &tpl, &opts).unwrap().examples, a.examples, "{}", p.display());
    }
    // Training on everything: no label is ignored.
    let all = load_dataset(&chat, &tok, &tpl, &DataOptions { completion_only: false, ..opts.clone() }).unwrap();
    assert!(all.examples[0].labels.iter().all(|&l| l != IGNORE_INDEX));
    // A column mapping.
    let mapped = write(&dir, "mapped.jsonl", "{\"q\": \"Capital of France?\", \"a\": \"Paris.\", \"sys\": \"Be terse.\"}\n");
    let cols = Columns { prompt: "q".into(), completion: "a".into(), system: "sys".into(), ..Columns::default() };
    assert_eq!(load_dataset(&mapped, &tok, &tpl, &DataOptions { columns: cols, ..opts }).unwrap().examples, a.examples);
}

#[test]
fn parquet_rows_name_their_row_when_bad() {
    let (tok, tpl) = text();
    let missing = testdata().join("parquet").join("missing.parquet");
    let opts = DataOptions::default();
    match load_dataset(&missing, &tok, &tpl, &opts) {
        Err(Error::DataRow { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected a bad row 2, got {other:?}"),
    }
    let ok = load_dataset(&missing, &tok, &tpl, &DataOptions { skip_bad_rows: true, ..opts.clone() }).unwrap();
    assert_eq!((ok.examples.len(), ok.skipped), (1, 1));
    // Not Parquet at all.
    let dir = tempfile::tempdir().unwrap();
    let fake = write(&dir, "fake.parquet", "prompt,completion\n");
    assert!(matches!(load_dataset(&fake, &tok, &tpl, &opts), Err(Error::DataFile { ref msg, .. }) if msg.contains("Parquet")));
}

#[test]
fn bad_rows_name_file_and_line_or_are_skipped() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let opts = DataOptions::default();
    let empty = write(&dir, "empty.jsonl", "\n");
    assert!(matches!(load_dataset(&empty, &tok, &tpl, &opts), Err(Error::DataFile { ref msg, .. }) if msg.contains("empty")));
    let bad = write(&dir, "bad.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"question\": \"a\"}\nnot json\n");
    match load_dataset(&bad, &tok, &tpl, &opts) {
        Err(e @ Error::DataRow { line: 2, .. }) => assert!(e.to_string().contains("bad.jsonl:2: missing columns"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    let skip = write(&dir, "skip.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"question\": \"a\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\nnot json\n");
    let e = load_dataset(&skip, &tok, &tpl, &opts).unwrap_err();
    assert!(e.to_string().contains("skip.jsonl:2"), "{e}");
    let d = load_dataset(&skip, &tok, &tpl, &DataOptions { skip_bad_rows: true, ..opts.clone() }).unwrap();
    assert_eq!((d.examples.len(), d.skipped), (1, 3));
    let json_err = write(&dir, "broken.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n{oops\n");
    assert!(load_dataset(&json_err, &tok, &tpl, &opts).unwrap_err().to_string().contains("broken.jsonl:2: invalid JSON"));
    let unsupported = write(&dir, "rows.txt", "x");
    assert!(load_dataset(&unsupported, &tok, &tpl, &opts).unwrap_err().to_string().contains(".txt"));
}

#[test]
fn long_examples_are_truncated_unless_nothing_is_left_to_learn() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "long.jsonl", "{\"prompt\": \"Hi\", \"completion\": \"one two three four five six seven eight nine ten\"}\n");
    let full = load_dataset(&p, &tok, &tpl, &DataOptions::default()).unwrap();
    let n = full.examples[0].ids.len();
    let prompt_len = full.examples[0].labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    let cut = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: prompt_len + 3, ..DataOptions::default() }).unwrap();
    assert_eq!(cut.truncated, 1);
    assert_eq!(cut.examples[0].ids, full.examples[0].ids[..prompt_len + 3]);
    assert!(n > prompt_len + 3);
    let e = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: prompt_len, ..DataOptions::default() }).unwrap_err();
    assert!(e.to_string().contains("long.jsonl:1") && e.to_string().contains("max_seq_len"), "{e}");
}

#[test]
fn parquet_that_yields_more_rows_than_declared_is_an_error_not_a_hang() {
    // Found by furnace-fuzz (a mutated chat.parquet): the row reader kept producing rows
    // past the footer's count; collecting them ran for minutes and grew without bound.
    let path = testdata().join("parquet/endless-rows.parquet");
    let start = std::time::Instant::now();
    let e = furnace_train::data::read_rows(&path).unwrap_err().to_string();
    // Its second page header is malformed (a mutated field the reader skipped over), so
    // the page header check now stops it before the row reader and its row count guard.
    assert!(e.contains("more rows than the 1 the footer declares") || e.contains("page 2: the page header is malformed"), "{e}");
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    // The same reader from bytes, as the fuzzer calls it.
    let bytes = std::fs::read(&path).unwrap();
    assert!(furnace_train::data::read_rows_from_bytes(bytes, &path).is_err());
}

#[test]
fn parquet_files_the_reader_would_panic_on_are_errors() {
    // Found by furnace-fuzz's 1M-input run: the parquet crate asserts (page sizes past the
    // buffer, a missing dictionary page, negative column offsets, definition levels past
    // the schema, a list type it does not expect) instead of returning an error.
    let files = fuzz_parquet("panic-");
    assert_eq!(files.len(), 5, "{files:?}");
    for path in files {
        let e = furnace_train::data::read_rows(&path).unwrap_err().to_string();
        // Some of them are now stopped earlier, by the page header check.
        assert!(
            (e.contains("not a readable Parquet file") || e.contains("not a valid Parquet file"))
                && e.contains(&path.display().to_string()),
            "{}: {e}",
            path.display()
        );
    }
}

/// The reproducers in `testdata/parquet/fuzz/` whose name starts with `prefix`.
fn fuzz_parquet(prefix: &str) -> Vec<std::path::PathBuf> {
    let dir = testdata().join("parquet/fuzz");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    files.sort();
    files
}

#[test]
fn parquet_pages_that_declare_huge_sizes_are_errors() {
    // Found by furnace-fuzz's seed-2027 run: page headers declaring up to 1.4 GiB
    // uncompressed (alloc-*, from files of about 1 KiB), which the parquet crate allocated
    // before decompressing, and pages whose counts kept it busy for up to 19 s (slow-*).
    // They are now rejected by the page header check, before the row reader runs.
    let files: Vec<_> = fuzz_parquet("alloc-").into_iter().chain(fuzz_parquet("slow-")).collect();
    assert_eq!(files.len(), 7, "{files:?}");
    for path in files {
        let e = furnace_train::data::read_rows(&path).unwrap_err().to_string();
        assert!(
            e.contains(", page ") && e.contains("not a valid Parquet file") && e.contains(&path.display().to_string()),
            "{}: {e}",
            path.display()
        );
        // alloc-*: a dictionary page declaring 640 MiB-1.4 GiB from a few bytes; slow-*: a
        // page header with a mangled unknown field (a collection declaring hundreds of
        // thousands of elements, more than the bytes left), on which the reader took
        // 1.7-18.5 s.
        let name = path.file_name().unwrap().to_str().unwrap();
        let why = if name.starts_with("alloc-") { " uncompressed from " } else { "the page header is malformed" };
        assert!(e.contains(why), "{}: {e}", path.display());
        let bytes = std::fs::read(&path).unwrap();
        assert!(furnace_train::data::read_rows_from_bytes(bytes, &path).is_err());
    }
}

#[test]
#[ignore = "needs FURNACE_PARQUET_DIR: a folder of real Parquet files (see docs/fuzzing.md, finding 12)"]
fn real_parquet_files_in_a_folder_load() {
    // Checks that the page header check accepts what writers produce: run it on files
    // written by pyarrow with each codec, dictionary and plain pages, v1 and v2 pages.
    let dir = std::env::var("FURNACE_PARQUET_DIR").expect("FURNACE_PARQUET_DIR");
    let mut files: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
    files.sort();
    assert!(!files.is_empty());
    let mut failed = Vec::new();
    for path in files {
        match furnace_train::data::read_rows(&path) {
            Ok(rows) => eprintln!("{}: {} rows", path.display(), rows.len()),
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                failed.push(e.to_string());
            }
        }
    }
    assert!(failed.iter().all(|e| e.contains("compressed with brotli")), "{failed:#?}");
}
