//! Dataset loading: file formats, row forms, completion-only masks, truncation, bad rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use furnace_text::{ChatTemplate, Tokenizer};
use furnace_train::{load_dataset, Columns, DataKind, DataOptions, Error, IGNORE_INDEX};
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

fn pref_opts() -> DataOptions {
    DataOptions { kind: DataKind::Preference, ..DataOptions::default() }
}

fn prompt_opts() -> DataOptions {
    DataOptions { kind: DataKind::Prompt, ..DataOptions::default() }
}

/// `(chosen answer, rejected answer)` as the decoded labelled tokens of a preference example.
fn answers(tok: &Tokenizer, ex: &furnace_train::Example) -> (String, String) {
    let r = ex.rejected.as_ref().expect("a rejected sequence");
    (completion_text(tok, &ex.ids, &ex.labels), completion_text(tok, &r.ids, &r.labels))
}

/// A Parquet file of string columns, one row per entry of `rows`.
fn write_parquet_strings(path: &std::path::Path, columns: &[&str], rows: &[&[&str]]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let fields: String = columns.iter().map(|c| format!("REQUIRED BYTE_ARRAY {c} (UTF8); ")).collect();
    let schema = Arc::new(parse_message_type(&format!("message m {{ {fields}}}")).unwrap());
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut column = 0;
    while let Some(mut col) = group.next_column().unwrap() {
        let v: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r[column])).collect();
        col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
        col.close().unwrap();
        column += 1;
    }
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn preference_forms_give_the_same_pairs() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let opts = pref_opts();
    // Explicit prompt, standard (text) form.
    let std_text = write(
        &dir,
        "text.jsonl",
        "{\"system\": \"Be terse.\", \"prompt\": \"Capital of France?\", \"chosen\": \"Paris.\", \"rejected\": \"London.\"}\n",
    );
    let a = load_dataset(&std_text, &tok, &tpl, &opts).unwrap();
    assert_eq!((a.examples.len(), a.skipped, a.truncated), (1, 0, 0));
    let ex = &a.examples[0];
    assert_eq!(answers(&tok, ex), ("Paris.<|im_end|>\n".to_string(), "London.<|im_end|>\n".to_string()));
    let rej = ex.rejected.as_ref().unwrap();
    assert_eq!(ex.ids.len(), ex.labels.len());
    assert_eq!(rej.ids.len(), rej.labels.len());
    // Both share the prompt, which is not learned.
    let n_prompt = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    assert_eq!(n_prompt, rej.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count());
    assert_eq!(ex.ids[..n_prompt], rej.ids[..n_prompt]);
    assert!(tok.decode(&ex.ids[..n_prompt], false).unwrap().ends_with("Capital of France?<|im_end|>\n<|im_start|>assistant\n"));
    assert!(ex.row.is_none() && ex.reference.get().is_none());
    // prompt + chosen is the SFT example of prompt + completion.
    let sft = write(&dir, "sft.jsonl", "{\"system\": \"Be terse.\", \"prompt\": \"Capital of France?\", \"completion\": \"Paris.\"}\n");
    let s = load_dataset(&sft, &tok, &tpl, &DataOptions::default()).unwrap();
    assert_eq!((&s.examples[0].ids, &s.examples[0].labels), (&ex.ids, &ex.labels));
    // The other forms and files give the same pair.
    let conv = r#"{"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "London."}]}"#;
    let implicit = r#"{"chosen": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}], "rejected": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "London."}]}"#;
    let mixed = r#"{"system": "Be terse.", "prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "London."}"#;
    let files = [
        write(&dir, "conv.jsonl", &format!("{conv}\n")),
        write(&dir, "implicit.jsonl", &format!("\n{implicit}\n")),
        write(&dir, "mixed.json", &format!("[{mixed}]")),
        write(&dir, "rows.csv", "prompt,chosen,rejected,system\nCapital of France?,Paris.,London.,Be terse.\n"),
    ];
    let pq = dir.path().join("rows.parquet");
    write_parquet_strings(&pq, &["system", "prompt", "chosen", "rejected"], &[&["Be terse.", "Capital of France?", "Paris.", "London."]]);
    for p in files.iter().chain([&pq]) {
        assert_eq!(load_dataset(p, &tok, &tpl, &opts).unwrap().examples, a.examples, "{}", p.display());
    }
    // completion_only does not apply: only the answers are learned.
    let all = load_dataset(&std_text, &tok, &tpl, &DataOptions { completion_only: false, ..opts.clone() }).unwrap();
    assert_eq!(all.examples, a.examples);
    // A column mapping.
    let mapped = write(
        &dir,
        "mapped.jsonl",
        "{\"q\": \"Capital of France?\", \"good\": \"Paris.\", \"bad\": \"London.\", \"sys\": \"Be terse.\"}\n",
    );
    let cols = Columns { prompt: "q".into(), chosen: "good".into(), rejected: "bad".into(), system: "sys".into(), ..Columns::default() };
    assert_eq!(load_dataset(&mapped, &tok, &tpl, &DataOptions { columns: cols, ..opts.clone() }).unwrap().examples, a.examples);
}

#[test]
fn preference_conversations_learn_every_answer_message() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    // A multi-turn implicit prompt: the shared turns are the prompt, the last turns differ.
    let row = r#"{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}], "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5."}, {"role": "assistant", "content": "Sorry, 4."}]}"#;
    let p = write(&dir, "multi.jsonl", &format!("{row}\n"));
    let d = load_dataset(&p, &tok, &tpl, &pref_opts()).unwrap();
    let ex = &d.examples[0];
    assert_eq!(answers(&tok, ex), ("4.<|im_end|>\n".to_string(), "5.<|im_end|>\n<|im_start|>assistant\nSorry, 4.<|im_end|>\n".to_string()));
    let n_prompt = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    assert!(tok.decode(&ex.ids[..n_prompt], false).unwrap().contains("Hello.<|im_end|>\n<|im_start|>user\n2+2?"));
}

#[test]
fn preference_bad_rows_name_file_line_and_reason() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let opts = pref_opts();
    let good = "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}";
    let u = |c: &str| format!("{{\"role\": \"user\", \"content\": \"{c}\"}}");
    let a = |c: &str| format!("{{\"role\": \"assistant\", \"content\": \"{c}\"}}");
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing", "{\"prompt\": \"a\", \"chosen\": \"b\"}".into(), "missing columns: expected 'chosen' + 'rejected'"),
        ("same", "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}".into(), "chosen and rejected are the same"),
        (
            "same_conv",
            format!("{{\"chosen\": [{}, {}], \"rejected\": [{}, {}]}}", u("q"), a("b"), u("q"), a("b")),
            "chosen and rejected are the same",
        ),
        ("implicit_text", "{\"chosen\": \"Q: a A: b\", \"rejected\": \"Q: a A: c\"}".into(), "give the prompt in a 'prompt' column"),
        (
            "diverging_user",
            format!("{{\"chosen\": [{}, {}], \"rejected\": [{}, {}]}}", u("q"), a("b"), u("r"), a("b")),
            "share no first message",
        ),
        (
            "no_answer",
            format!("{{\"chosen\": [{}, {}], \"rejected\": [{}, {}, {}]}}", u("q"), a("b"), u("q"), a("b"), a("c")),
            "'chosen' has no answer",
        ),
        (
            "user_in_answer",
            format!("{{\"prompt\": \"a\", \"chosen\": [{}], \"rejected\": \"c\"}}", u("b")),
            "'chosen' must hold assistant messages only",
        ),
        (
            "prompt_ends_assistant",
            format!("{{\"prompt\": [{}, {}], \"chosen\": \"b\", \"rejected\": \"c\"}}", u("q"), a("x")),
            "ends with an assistant message",
        ),
        ("empty_prompt", "{\"prompt\": [], \"chosen\": \"b\", \"rejected\": \"c\"}".into(), "empty list of messages"),
        (
            "bad_message",
            "{\"prompt\": \"a\", \"chosen\": [{\"role\": \"assistant\"}], \"rejected\": \"c\"}".into(),
            "lacks string 'content'",
        ),
    ];
    let mut all = format!("{good}\n");
    for (name, row, why) in &cases {
        let p = write(&dir, &format!("{name}.jsonl"), &format!("{good}\n{row}\n"));
        let e = load_dataset(&p, &tok, &tpl, &opts).unwrap_err();
        assert!(matches!(e, Error::DataRow { line: 2, .. }), "{name}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("{name}.jsonl:2: ")) && msg.contains(why), "{name}: {msg}");
        all.push_str(row);
        all.push('\n');
    }
    all.push_str("not json\n");
    let p = write(&dir, "all.jsonl", &all);
    let d = load_dataset(&p, &tok, &tpl, &DataOptions { skip_bad_rows: true, ..opts.clone() }).unwrap();
    assert_eq!((d.examples.len(), d.skipped), (1, cases.len() + 1));
    // An SFT file read as preference rows.
    let sft = write(&dir, "sft.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    assert!(load_dataset(&sft, &tok, &tpl, &opts).unwrap_err().to_string().contains("(the row has [\"prompt\", \"completion\"])"));
}

#[test]
fn preference_pairs_are_truncated_unless_an_answer_has_nothing_left() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "long.jsonl",
        "{\"prompt\": \"Count\", \"chosen\": \"one two three four five six seven eight nine ten\", \"rejected\": \"two one\"}\n",
    );
    let full = load_dataset(&p, &tok, &tpl, &pref_opts()).unwrap();
    let ex = &full.examples[0];
    let (n_chosen, n_rejected) = (ex.ids.len(), ex.rejected.as_ref().unwrap().ids.len());
    let prompt_len = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
    assert!(n_chosen > n_rejected && n_rejected > prompt_len + 1);
    // Only the long chosen answer is cut.
    let cut = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: n_rejected, ..pref_opts() }).unwrap();
    assert_eq!(cut.truncated, 1);
    assert_eq!(cut.examples[0].ids, ex.ids[..n_rejected]);
    assert_eq!(cut.examples[0].labels, ex.labels[..n_rejected]);
    assert_eq!(cut.examples[0].rejected, ex.rejected);
    // Both cut, each keeps one answer token.
    let both = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: prompt_len + 1, ..pref_opts() }).unwrap();
    assert_eq!(both.truncated, 1);
    let r = both.examples[0].rejected.as_ref().unwrap();
    assert_eq!((both.examples[0].ids.len(), r.ids.len()), (prompt_len + 1, prompt_len + 1));
    // Answers that start alike are the same when cut to their first token: no preference left.
    let alike = write(&dir, "alike.jsonl", "{\"prompt\": \"Count\", \"chosen\": \"one two three four\", \"rejected\": \"one two\"}\n");
    let e = load_dataset(&alike, &tok, &tpl, &DataOptions { max_seq_len: prompt_len + 1, ..pref_opts() }).unwrap_err();
    assert!(e.to_string().contains("alike.jsonl:1: chosen and rejected are the same after formatting and truncation"), "{e}");
    // Nothing left to learn.
    let e = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: prompt_len, ..pref_opts() }).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("long.jsonl:1") && msg.contains("chosen answer") && msg.contains("max_seq_len"), "{msg}");
    let skipped = load_dataset(&p, &tok, &tpl, &DataOptions { max_seq_len: prompt_len, skip_bad_rows: true, ..pref_opts() });
    assert!(matches!(skipped, Err(Error::DataFile { ref msg, .. }) if msg.contains("1 bad rows skipped")), "{skipped:?}");
}

#[test]
fn prompt_rows_keep_the_row_and_end_with_the_generation_prompt() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let opts = prompt_opts();
    let conv = r#"{"prompt": [{"role": "system", "content": "Answer in <answer></answer>."}, {"role": "user", "content": "What is 2+3?"}], "answer": "5"}"#;
    let p = write(&dir, "conv.jsonl", &format!("{conv}\n"));
    let d = load_dataset(&p, &tok, &tpl, &opts).unwrap();
    let ex = &d.examples[0];
    assert_eq!(ex.labels, vec![IGNORE_INDEX; ex.ids.len()]);
    assert!(ex.rejected.is_none());
    let text = tok.decode(&ex.ids, false).unwrap();
    assert!(text.ends_with("What is 2+3?<|im_end|>\n<|im_start|>assistant\n"), "{text:?}");
    let row = ex.row.as_ref().expect("the row");
    assert_eq!(row["answer"], "5");
    assert_eq!(**row, serde_json::from_str::<serde_json::Value>(conv).unwrap());
    // The text form with a system column, CSV and a column mapping give the same ids.
    let txt = write(&dir, "text.jsonl", "{\"system\": \"Answer in <answer></answer>.\", \"prompt\": \"What is 2+3?\", \"answer\": 5}\n");
    let t = load_dataset(&txt, &tok, &tpl, &opts).unwrap();
    assert_eq!((&t.examples[0].ids, &t.examples[0].labels), (&ex.ids, &ex.labels));
    assert_eq!(t.examples[0].row.as_ref().unwrap()["answer"], 5);
    let csv = write(&dir, "rows.csv", "question,system,answer\nWhat is 2+3?,Answer in <answer></answer>.,5\n");
    let cols = Columns { prompt: "question".into(), ..Columns::default() };
    let c = load_dataset(&csv, &tok, &tpl, &DataOptions { columns: cols, ..opts.clone() }).unwrap();
    assert_eq!(c.examples[0].ids, ex.ids);
    assert_eq!(c.examples[0].row.as_ref().unwrap()["answer"], "5");
    // Without a system message the template's default one is used, and still the prompt
    // ends with the generation prompt.
    let bare = write(&dir, "bare.jsonl", "{\"prompt\": \"Hi\"}\n");
    let b = load_dataset(&bare, &tok, &tpl, &opts).unwrap();
    assert!(tok.decode(&b.examples[0].ids, false).unwrap().ends_with("Hi<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn prompt_bad_rows_name_file_line_and_reason() {
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let opts = prompt_opts();
    let good = "{\"prompt\": \"a\", \"answer\": \"1\"}";
    let cases: Vec<(&str, &str, &str)> = vec![
        (
            "missing",
            "{\"question\": \"a\", \"answer\": \"1\"}",
            "missing column: expected 'prompt' (the row has [\"question\", \"answer\"])",
        ),
        (
            "ends_assistant",
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}",
            "ends with an assistant message",
        ),
        ("empty", "{\"prompt\": []}", "empty list of messages"),
        ("object", "{\"prompt\": {\"text\": \"a\"}}", "must be a text or a list"),
        (
            "both_systems",
            "{\"system\": \"s\", \"prompt\": [{\"role\": \"system\", \"content\": \"t\"}, {\"role\": \"user\", \"content\": \"a\"}]}",
            "both a 'system' column and a system message",
        ),
    ];
    let mut all = format!("{good}\n");
    for (name, row, why) in &cases {
        let p = write(&dir, &format!("{name}.jsonl"), &format!("{good}\n{row}\n"));
        let msg = load_dataset(&p, &tok, &tpl, &opts).unwrap_err().to_string();
        assert!(msg.contains(&format!("{name}.jsonl:2: ")) && msg.contains(why), "{name}: {msg}");
        all.push_str(row);
        all.push('\n');
    }
    let p = write(&dir, "all.jsonl", &all);
    let d = load_dataset(&p, &tok, &tpl, &DataOptions { skip_bad_rows: true, ..opts.clone() }).unwrap();
    assert_eq!((d.examples.len(), d.skipped), (1, cases.len()));
    // A prompt longer than max_seq_len is a bad row, not truncated.
    let long = write(&dir, "long.jsonl", &format!("{good}\n{{\"prompt\": \"{}\"}}\n", "word ".repeat(50)));
    let n = load_dataset(&long, &tok, &tpl, &opts).unwrap().examples[1].ids.len();
    let max = d.examples[0].ids.len() + 5;
    assert!(n > max);
    let msg = load_dataset(&long, &tok, &tpl, &DataOptions { max_seq_len: max, ..opts.clone() }).unwrap_err().to_string();
    assert!(msg.contains("long.jsonl:2: ") && msg.contains(&format!("the prompt has {n} tokens, more than max_seq_len = {max}")), "{msg}");
    let ok = load_dataset(&long, &tok, &tpl, &DataOptions { max_seq_len: n, ..opts.clone() }).unwrap();
    assert_eq!((ok.examples.len(), ok.truncated), (2, 0));
}

#[test]
fn shipped_dpo_and_grpo_datasets_load_short_and_clean() {
    // data/dpo and data/grpo (scripts/make_{dpo,grpo}_dataset.py), with the SmolLM2
    // tokenizer and template of the tiny test model.
    let (tok, tpl) = text();
    let data = testdata().parent().unwrap().join("data");
    for (file, rows) in [("train.jsonl", 240), ("eval.jsonl", 40)] {
        let d = load_dataset(&data.join("dpo").join(file), &tok, &tpl, &pref_opts()).unwrap();
        assert_eq!((d.examples.len(), d.skipped, d.truncated), (rows, 0, 0), "dpo/{file}");
        let longest = d.examples.iter().map(|e| e.ids.len().max(e.rejected.as_ref().unwrap().ids.len())).max().unwrap();
        assert!(longest <= 80, "dpo/{file}: {longest} tokens");
        for ex in &d.examples {
            assert!(answers(&tok, ex).0.starts_with("The answer is "));
        }
    }
    let system =
        "Solve the problem. Think briefly inside <reasoning></reasoning>, then give only the final number inside <answer></answer>.";
    for (file, rows) in [("train.jsonl", 300), ("eval.jsonl", 50)] {
        let d = load_dataset(&data.join("grpo").join(file), &tok, &tpl, &prompt_opts()).unwrap();
        assert_eq!((d.examples.len(), d.skipped), (rows, 0), "grpo/{file}");
        assert!(d.examples.iter().map(|e| e.ids.len()).max().unwrap() <= 96, "grpo/{file}");
        for ex in &d.examples {
            let row = ex.row.as_ref().unwrap();
            assert_eq!(row["prompt"][0]["content"], system);
            let answer: u32 = row["answer"].as_str().unwrap().parse().unwrap();
            assert!(answer <= 20);
        }
    }
}

#[test]
fn stats_count_forms_bad_rows_lengths_and_truncation() {
    use furnace_train::data::{encode_row, stats, DataKind};
    let (tok, tpl) = text();
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(60);
    let body = format!(
        "{{\"prompt\": \"What is 2 plus 2?\", \"completion\": \"4\"}}\nnot json\n{{\"question\": \"x\"}}\n\
         {{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}, {{\"role\": \"assistant\", \"content\": \"{long}\"}}]}}\n\
         {{\"input\": \"a\", \"output\": \"b\"}}\n"
    );
    let p = write(&dir, "d.jsonl", &body);
    let opts = DataOptions { max_seq_len: 48, ..DataOptions::default() };
    let s = stats(&p, &tok, &tpl, &opts).unwrap();
    assert_eq!(s.rows, 5);
    assert_eq!(s.bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![2, 3]);
    assert!(s.bad[1].1.contains("missing columns"), "{:?}", s.bad);
    let forms: Vec<(&str, usize)> = s.forms.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(forms, vec![("chat", 1), ("instruction", 1), ("prompt_completion", 1), ("unknown", 2)]);
    // Lengths are before truncation; the long chat row is the one cut.
    let full = DataOptions { max_seq_len: usize::MAX, ..DataOptions::default() };
    let rows = furnace_train::data::read_rows(&p).unwrap();
    let want: Vec<usize> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter_map(|r| encode_row(r, &tok, &tpl, &full).ok())
        .map(|(e, _)| e.ids.len())
        .collect();
    assert_eq!(s.lengths, want);
    assert_eq!(s.truncated, want.iter().filter(|&&n| n > 48).count());
    assert_eq!(s.truncated, 1);
    // Tokens after truncation; the completion share is what the loss sees.
    let cut = load_dataset(&p, &tok, &tpl, &DataOptions { skip_bad_rows: true, ..opts.clone() }).unwrap();
    assert_eq!(s.tokens, cut.examples.iter().map(|e| e.ids.len()).sum::<usize>());
    let labelled: usize = cut.examples.iter().map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()).sum();
    assert_eq!(s.completion_tokens, labelled);
    // As preference pairs, every row of this file is bad.
    let pref = stats(&p, &tok, &tpl, &DataOptions { kind: DataKind::Preference, ..opts }).unwrap();
    assert_eq!(pref.bad.len(), 5);
    assert!(pref.lengths.is_empty());
}
