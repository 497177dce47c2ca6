//! Document ingestion: turn files, folders and glob patterns into [`Document`]s.
//!
//! Supported: `.txt`, `.md`/`.markdown`, `.html`/`.htm` (the visible text), `.pdf` (the
//! text of each page), and tables where each row is a document: `.jsonl`, `.csv`,
//! `.parquet` (a text column, optional id column, metadata columns).
//!
//! A file that cannot be read (binary, not UTF-8, a broken PDF, a bad row, too large) is
//! skipped and reported in [`LoadReport::skipped`] with the reason, unless
//! [`LoadOptions::strict`] is set, in which case it is an error. Folders are walked
//! recursively in sorted order, so the same inputs always give the same documents in the
//! same order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One document of the corpus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// A stable, unique id: the file's path relative to its input root (with `/`), or for
    /// a table row the id column's value or `<relative path>#<row>`.
    pub id: String,
    /// The file the document came from, as it was found from the inputs.
    pub source: String,
    /// The text.
    pub text: String,
    /// Metadata: `path` and `format` for every document, `row` and the metadata columns for
    /// table rows, `title` and `pages` where the format has them.
    pub metadata: Map<String, Value>,
}

impl Document {
    /// SHA-256 (lowercase hex) of the text, a NUL byte, and the metadata as JSON: equal
    /// hashes mean the document's chunks and their metadata need not be rebuilt.
    pub fn content_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.text.as_bytes());
        h.update([0u8]);
        h.update(Value::Object(self.metadata.clone()).to_string().as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A piece of a document, the unit that is embedded and retrieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// The [`Document::id`] it comes from.
    pub doc_id: String,
    /// Its position among the document's chunks, from 0.
    pub index: usize,
    /// The text.
    pub text: String,
    /// The first char of the chunk in the document's text (chars, not bytes).
    pub start_char: usize,
    /// One past its last char in the document's text.
    pub end_char: usize,
    /// The document's metadata plus what the splitter adds (Markdown header path).
    pub metadata: Map<String, Value>,
}

/// The file types [`load_documents`] reads, by extension.
pub const SUPPORTED_EXTENSIONS: [&str; 9] = ["txt", "md", "markdown", "html", "htm", "pdf", "jsonl", "csv", "parquet"];

/// How [`load_documents`] reads files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadOptions {
    /// Fail on the first unreadable file or row instead of skipping it.
    pub strict: bool,
    /// Files larger than this are skipped without being read (default 256 MiB).
    pub max_file_bytes: u64,
    /// Tables with more data rows than this are skipped (default 10 million).
    pub max_rows: usize,
    /// The column holding a row's text (default `"text"`).
    pub text_column: String,
    /// The column holding a row's id; without it a row's id is `<relative path>#<row>`.
    pub id_column: Option<String>,
    /// The columns copied into a row's metadata; by default every other scalar column.
    pub metadata_columns: Option<Vec<String>>,
    /// Also read files and folders whose names start with `.` while walking folders.
    pub include_hidden: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: false,
            max_file_bytes: 256 * 1024 * 1024,
            max_rows: 10_000_000,
            text_column: "text".into(),
            id_column: None,
            metadata_columns: None,
            include_hidden: false,
        }
    }
}

/// What [`load_documents`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The documents, in input order (folders sorted, table rows in order).
    pub documents: Vec<Document>,
    /// Files (or rows of a file) that were not loaded, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// A file to read and the id its documents get.
struct Found {
    path: PathBuf,
    rel: String,
}

/// Reads every supported file named by `inputs`: a file, a folder (walked recursively, in
/// sorted order) or a glob pattern (`docs/**/*.md`).
///
/// A file named directly with an unsupported extension is skipped with that reason; such
/// files met while walking a folder or matching a glob are ignored. Errors when an input
/// does not exist, a pattern is malformed, in strict mode on the first unreadable file, and
/// when no document at all was found.
pub fn load_documents<P: AsRef<Path>>(inputs: &[P], opts: &LoadOptions) -> Result<LoadReport> {
    if opts.max_rows == 0 {
        return Err(Error::Invalid("max_rows must be at least 1".into()));
    }
    if opts.text_column.is_empty() {
        return Err(Error::Invalid("text_column must not be empty".into()));
    }
    let mut report = LoadReport::default();
    let mut first_source: HashMap<String, PathBuf> = HashMap::new();
    for input in inputs {
        let input = input.as_ref();
        for found in expand(input, opts, &mut report)? {
            let docs = match read_file(&found, opts) {
                Ok(Loaded { docs, bad_rows }) => {
                    for (what, reason) in bad_rows {
                        skip(&mut report, opts, &found.path, format!("{what}: {reason}"))?;
                    }
                    docs
                }
                Err(reason) => {
                    skip(&mut report, opts, &found.path, reason)?;
                    continue;
                }
            };
            for doc in docs {
                if let Some(first) = first_source.get(&doc.id) {
                    let reason = format!("duplicate document id `{}` (first from {})", doc.id, first.display());
                    skip(&mut report, opts, &found.path, reason)?;
                    continue;
                }
                first_source.insert(doc.id.clone(), found.path.clone());
                report.documents.push(doc);
            }
        }
    }
    if report.documents.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.as_ref().display().to_string()).collect();
        let mut msg = format!(
            "no documents found in {}; supported: {}",
            if names.is_empty() { "(no inputs)".to_string() } else { names.join(", ") },
            SUPPORTED_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
        );
        if let Some((path, reason)) = report.skipped.first() {
            msg.push_str(&format!("; {} file(s) or row(s) skipped, the first: {}: {reason}", report.skipped.len(), path.display()));
        }
        return Err(Error::Invalid(msg));
    }
    Ok(report)
}

fn skip(report: &mut LoadReport, opts: &LoadOptions, path: &Path, reason: String) -> Result<()> {
    if opts.strict {
        return Err(Error::Unreadable { path: path.to_path_buf(), reason });
    }
    report.skipped.push((path.to_path_buf(), reason));
    Ok(())
}

fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase())
}

fn is_supported(path: &Path) -> bool {
    extension(path).is_some_and(|e| SUPPORTED_EXTENSIONS.contains(&e.as_str()))
}

/// `path` relative to `root`, with `/` between components.
fn relative(path: &Path, root: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        parts.join("/")
    }
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

fn hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// The files an input names, with their ids.
fn expand(input: &Path, opts: &LoadOptions, report: &mut LoadReport) -> Result<Vec<Found>> {
    let text = input.to_string_lossy();
    if !input.exists() && is_glob(&text) {
        // The root of the ids: the components before the first one with a wildcard.
        let root: PathBuf = input.components().take_while(|c| !is_glob(&c.as_os_str().to_string_lossy())).collect();
        // Like folder walks, wildcards skip hidden names unless asked not to.
        let options = glob::MatchOptions { require_literal_leading_dot: !opts.include_hidden, ..glob::MatchOptions::new() };
        let paths = glob::glob_with(&text, options).map_err(|e| Error::Invalid(format!("bad glob pattern `{text}`: {e}")))?;
        let mut files = Vec::new();
        for entry in paths {
            match entry {
                Ok(path) if path.is_file() && is_supported(&path) => {
                    let rel = relative(&path, &root);
                    files.push(Found { path, rel });
                }
                Ok(_) => {}
                Err(e) => {
                    let path = e.path().to_path_buf();
                    skip(report, opts, &path, format!("cannot read while matching `{text}`: {}", e.error()))?;
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        return Ok(files);
    }
    let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
    if meta.is_dir() {
        let mut files = Vec::new();
        walk(input, input, opts, report, &mut files)?;
        return Ok(files);
    }
    let rel = relative(input, input.parent().unwrap_or(Path::new("")));
    if !is_supported(input) {
        let reason = format!(
            "unsupported file type (supported: {})",
            SUPPORTED_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")
        );
        skip(report, opts, input, reason)?;
        return Ok(Vec::new());
    }
    Ok(vec![Found { path: input.to_path_buf(), rel }])
}

/// Walks `dir` depth-first in sorted order; symbolic links to folders are not followed
/// (no cycles), links to files are read.
fn walk(root: &Path, dir: &Path, opts: &LoadOptions, report: &mut LoadReport, out: &mut Vec<Found>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if dir == root => return Err(Error::io(dir, e)),
        Err(e) => return skip(report, opts, dir, format!("cannot list folder: {e}")),
    };
    let mut paths = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => paths.push(entry.path()),
            Err(e) => skip(report, opts, dir, format!("cannot list folder: {e}"))?,
        }
    }
    paths.sort();
    for path in paths {
        if !opts.include_hidden && hidden(&path) {
            continue;
        }
        let Ok(link_meta) = std::fs::symlink_metadata(&path) else { continue };
        if link_meta.is_dir() {
            walk(root, &path, opts, report, out)?;
        } else if path.is_file() && is_supported(&path) {
            let rel = relative(&path, root);
            out.push(Found { path, rel });
        }
    }
    Ok(())
}

/// The documents of one file, and the rows of it that were bad.
struct Loaded {
    docs: Vec<Document>,
    bad_rows: Vec<(String, String)>,
}

impl Loaded {
    fn one(doc: Document) -> Self {
        Loaded { docs: vec![doc], bad_rows: Vec::new() }
    }
}

/// Reads one file; `Err` is the reason it was skipped.
fn read_file(found: &Found, opts: &LoadOptions) -> std::result::Result<Loaded, String> {
    let path = &found.path;
    let size = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?.len();
    if size > opts.max_file_bytes {
        return Err(format!("file is {size} bytes, over the max_file_bytes limit of {}", opts.max_file_bytes));
    }
    let ext = extension(path).unwrap_or_default();
    match ext.as_str() {
        "parquet" => return read_parquet(found, opts),
        "jsonl" => return read_jsonl(found, opts),
        _ => {}
    }
    let bytes = read_bounded(path, opts.max_file_bytes)?;
    if ext == "pdf" {
        return read_pdf(found, &bytes).map(Loaded::one);
    }
    let text = decode_text(&bytes)?;
    match ext.as_str() {
        "csv" => read_csv(found, opts, text),
        "html" | "htm" => {
            let (text, title) = html_text(text);
            let mut doc = plain(found, "html", text)?;
            if let Some(title) = title {
                doc.metadata.insert("title".into(), Value::String(title));
            }
            Ok(Loaded::one(doc))
        }
        "md" | "markdown" => plain(found, "markdown", text.to_string()).map(Loaded::one),
        _ => plain(found, "text", text.to_string()).map(Loaded::one),
    }
}

/// Reads at most `limit` bytes (the size was checked, but a file can grow meanwhile).
fn read_bounded(path: &Path, limit: u64) -> std::result::Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("file grew over the max_file_bytes limit of {limit} while being read"));
    }
    Ok(bytes)
}

/// Binary check (a NUL byte in the first 8 KiB), then UTF-8 (a leading BOM is dropped).
fn decode_text(bytes: &[u8]) -> std::result::Result<&str, String> {
    let head = &bytes[..bytes.len().min(8192)];
    if let Some(at) = head.iter().position(|&b| b == 0) {
        return Err(format!("binary file (NUL byte at offset {at})"));
    }
    let (bom, bytes) = match bytes.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => (3, rest),
        None => (0, bytes),
    };
    std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 (invalid byte at offset {})", bom + e.valid_up_to()))
}

fn base_metadata(found: &Found, format: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("path".into(), Value::String(found.rel.clone()));
    m.insert("format".into(), Value::String(format.into()));
    m
}

fn plain(found: &Found, format: &str, text: String) -> std::result::Result<Document, String> {
    if text.trim().is_empty() {
        return Err("no text".into());
    }
    Ok(Document { id: found.rel.clone(), source: found.path.display().to_string(), text, metadata: base_metadata(found, format) })
}

/// The visible text of an HTML page and its `<title>`: no scripts, styles, templates or
/// `hidden` elements; whitespace collapsed as a browser would, except in `<pre>`; block
/// elements on their own lines, paragraphs apart by a blank line.
pub fn html_text(html: &str) -> (String, Option<String>) {
    use scraper::{ElementRef, Html, Node};

    const SKIP: [&str; 10] = ["head", "script", "style", "noscript", "template", "svg", "math", "iframe", "object", "canvas"];
    const PARAGRAPH: [&str; 22] = [
        "p",
        "div",
        "section",
        "article",
        "header",
        "footer",
        "main",
        "nav",
        "aside",
        "blockquote",
        "pre",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "ul",
        "ol",
        "table",
        "figure",
        "form",
    ];
    const LINE: [&str; 8] = ["li", "tr", "dt", "dd", "figcaption", "caption", "hr", "address"];

    enum Step<'a> {
        Open(ElementRef<'a>),
        Close(&'a str),
        Text(&'a str),
    }

    let doc = Html::parse_document(html);
    let title = doc
        .root_element()
        .descendants()
        .filter_map(ElementRef::wrap)
        .find(|e| e.value().name() == "title")
        .map(|e| collapse(&e.text().collect::<String>()).trim().to_string())
        .filter(|t| !t.is_empty());

    let mut out = String::new();
    let mut pre_depth = 0usize;
    let mut stack = vec![Step::Open(doc.root_element())];
    let brk = |out: &mut String, n: usize| {
        let have = out.chars().rev().take_while(|&c| c == '\n').count();
        if !out.is_empty() {
            for _ in have..n {
                out.push('\n');
            }
        }
    };
    while let Some(step) = stack.pop() {
        match step {
            Step::Text(t) => {
                if pre_depth > 0 {
                    out.push_str(t);
                } else {
                    let c = collapse(t);
                    let c = if out.is_empty() || out.ends_with([' ', '\n']) { c.trim_start() } else { &c };
                    out.push_str(c);
                }
            }
            Step::Close(name) => {
                if name == "pre" {
                    pre_depth = pre_depth.saturating_sub(1);
                }
                if PARAGRAPH.contains(&name) {
                    brk(&mut out, 2);
                } else if LINE.contains(&name) || name == "td" || name == "th" {
                    if name == "td" || name == "th" {
                        out.push('\t');
                    } else {
                        brk(&mut out, 1);
                    }
                }
            }
            Step::Open(el) => {
                let name = el.value().name();
                if SKIP.contains(&name) || el.value().attr("hidden").is_some() {
                    continue;
                }
                if name == "br" {
                    out.push('\n');
                    continue;
                }
                if name == "pre" {
                    pre_depth += 1;
                }
                if PARAGRAPH.contains(&name) {
                    brk(&mut out, 2);
                } else if LINE.contains(&name) {
                    brk(&mut out, 1);
                }
                stack.push(Step::Close(name));
                let children: Vec<_> = el.children().collect();
                for child in children.into_iter().rev() {
                    match child.value() {
                        Node::Text(t) => stack.push(Step::Text(t)),
                        Node::Element(_) => {
                            if let Some(e) = ElementRef::wrap(child) {
                                stack.push(Step::Open(e));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    // Trim each line's end, keep at most one blank line in a row.
    let mut text = String::with_capacity(out.len());
    let mut blank = 0;
    for line in out.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank += 1;
            continue;
        }
        if !text.is_empty() {
            text.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        text.push_str(line);
    }
    (text, title)
}

/// HTML's whitespace collapsing: runs of ASCII whitespace become one space.
fn collapse(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_ascii_whitespace() {
            if !space {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(c);
            space = false;
        }
    }
    out
}

/// Each page's text, pages apart by a blank line. A panic inside the PDF library (it has
/// had them on malformed files) skips the file instead of taking the process down.
fn read_pdf(found: &Found, bytes: &[u8]) -> std::result::Result<Document, String> {
    let (texts, pages) = catch_panic("the PDF reader", || {
        let pdf = lopdf::Document::load_mem(bytes).map_err(|e| format!("not a readable PDF: {e}"))?;
        let pages: Vec<u32> = pdf.get_pages().keys().copied().collect();
        let mut texts = Vec::with_capacity(pages.len());
        for &page in &pages {
            let text = pdf.extract_text(&[page]).map_err(|e| format!("cannot extract the text of page {page}: {e}"))?;
            texts.push(text.trim().to_string());
        }
        Ok((texts, pages.len()))
    })?;
    let text = texts.into_iter().filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n\n");
    let mut doc = plain(found, "pdf", text).map_err(|_| "no extractable text (scanned or empty PDF?)".to_string())?;
    doc.metadata.insert("pages".into(), Value::from(pages));
    Ok(doc)
}

/// Builds a row's document from its columns. `Err` is why the row was skipped.
fn row_document(
    found: &Found,
    opts: &LoadOptions,
    format: &str,
    row: usize,
    columns: &Map<String, Value>,
) -> std::result::Result<Document, String> {
    let text = match columns.get(&opts.text_column) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => return Err(format!("no `{}` value", opts.text_column)),
        Some(other) => return Err(format!("`{}` is not a string: {other}", opts.text_column)),
    };
    if text.trim().is_empty() {
        return Err(format!("empty `{}`", opts.text_column));
    }
    let id = match &opts.id_column {
        None => format!("{}#{row}", found.rel),
        Some(col) => match columns.get(col) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) if !other.is_null() => return Err(format!("id column `{col}` is not a string or number: {other}")),
            _ => return Err(format!("no `{col}` value (the id column)")),
        },
    };
    let mut metadata = base_metadata(found, format);
    metadata.insert("row".into(), Value::from(row));
    match &opts.metadata_columns {
        Some(cols) => {
            for col in cols {
                if let Some(v) = columns.get(col) {
                    metadata.insert(col.clone(), v.clone());
                }
            }
        }
        None => {
            for (k, v) in columns {
                let scalar = matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_));
                if scalar && *k != opts.text_column && Some(k) != opts.id_column.as_ref() {
                    metadata.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Ok(Document { id, source: found.path.display().to_string(), text, metadata })
}

fn too_many_rows(opts: &LoadOptions) -> String {
    format!("more than the max_rows limit of {} rows", opts.max_rows)
}

/// One JSON object per line; blank lines are ignored. A row's number is its line index
/// from 0. Read line by line, never whole.
fn read_jsonl(found: &Found, opts: &LoadOptions) -> std::result::Result<Loaded, String> {
    let file = File::open(&found.path).map_err(|e| format!("cannot open: {e}"))?;
    let mut reader = BufReader::new(file.take(opts.max_file_bytes.saturating_add(1)));
    let mut loaded = Loaded { docs: Vec::new(), bad_rows: Vec::new() };
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut rows = 0usize;
    for line_no in 0usize.. {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| format!("cannot read: {e}"))?;
        if n == 0 {
            break;
        }
        let start = offset;
        offset += n as u64;
        if offset > opts.max_file_bytes {
            return Err(format!("file grew over the max_file_bytes limit of {} while being read", opts.max_file_bytes));
        }
        let mut line = buf.as_slice();
        if line_no == 0 {
            line = line.strip_prefix(b"\xef\xbb\xbf").unwrap_or(line);
        }
        let what = format!("line {}", line_no + 1);
        let line = match std::str::from_utf8(line) {
            Ok(s) => s,
            Err(e) => {
                let at = start + e.valid_up_to() as u64;
                loaded.bad_rows.push((what, format!("not valid UTF-8 (invalid byte at offset {at})")));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        rows += 1;
        if rows > opts.max_rows {
            return Err(too_many_rows(opts));
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(columns)) => match row_document(found, opts, "jsonl", line_no, &columns) {
                Ok(doc) => loaded.docs.push(doc),
                Err(reason) => loaded.bad_rows.push((what, reason)),
            },
            Ok(_) => loaded.bad_rows.push((what, "not a JSON object".into())),
            Err(e) => loaded.bad_rows.push((what, format!("invalid JSON: {e}"))),
        }
    }
    finish_table(loaded, opts)
}

/// A table whose every row was bad is skipped as a whole, with the first row's reason.
fn finish_table(loaded: Loaded, opts: &LoadOptions) -> std::result::Result<Loaded, String> {
    if loaded.docs.is_empty() {
        return Err(match loaded.bad_rows.first() {
            Some((what, reason)) => format!("no usable rows ({} bad; {what}: {reason})", loaded.bad_rows.len()),
            None => format!("no rows with a `{}` column", opts.text_column),
        });
    }
    Ok(loaded)
}

/// A header row, then one document per record. All values are strings.
fn read_csv(found: &Found, opts: &LoadOptions, text: &str) -> std::result::Result<Loaded, String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(text.as_bytes());
    let headers: Vec<String> =
        reader.headers().map_err(|e| format!("cannot read the header row: {e}"))?.iter().map(str::to_string).collect();
    if !headers.contains(&opts.text_column) {
        return Err(format!("no `{}` column (columns: {})", opts.text_column, headers.join(", ")));
    }
    let mut loaded = Loaded { docs: Vec::new(), bad_rows: Vec::new() };
    for (row, record) in reader.records().enumerate() {
        if row >= opts.max_rows {
            return Err(too_many_rows(opts));
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                loaded.bad_rows.push((format!("row {row} (line {line})"), format!("bad CSV record: {e}")));
                continue;
            }
        };
        let columns: Map<String, Value> = headers.iter().cloned().zip(record.iter().map(|v| Value::String(v.to_string()))).collect();
        match row_document(found, opts, "csv", row, &columns) {
            Ok(doc) => loaded.docs.push(doc),
            Err(reason) => loaded.bad_rows.push((format!("row {row}"), reason)),
        }
    }
    finish_table(loaded, opts)
}

/// Parquet through the row reader, bounded by `max_rows`; a panic in the reader (it can
/// panic on corrupt files) skips the file.
fn read_parquet(found: &Found, opts: &LoadOptions) -> std::result::Result<Loaded, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let file = File::open(&found.path).map_err(|e| format!("cannot open: {e}"))?;
    let loaded = catch_panic("the Parquet reader", || {
        let reader = SerializedFileReader::new(file).map_err(|e| format!("not a readable Parquet file: {e}"))?;
        let total = reader.metadata().file_metadata().num_rows();
        if total > opts.max_rows as i64 {
            return Err(format!("{total} rows, {}", too_many_rows(opts)));
        }
        let rows = reader.get_row_iter(None).map_err(|e| format!("cannot read rows: {e}"))?;
        let mut loaded = Loaded { docs: Vec::new(), bad_rows: Vec::new() };
        for (row, record) in rows.enumerate() {
            if row >= opts.max_rows {
                return Err(too_many_rows(opts));
            }
            let record = match record {
                Ok(r) => r,
                Err(e) => return Err(format!("cannot read row {row}: {e}")),
            };
            let columns: Map<String, Value> = record.get_column_iter().map(|(name, field)| (name.clone(), field.to_json_value())).collect();
            match row_document(found, opts, "parquet", row, &columns) {
                Ok(doc) => loaded.docs.push(doc),
                Err(reason) => loaded.bad_rows.push((format!("row {row}"), reason)),
            }
        }
        Ok(loaded)
    })?;
    finish_table(loaded, opts)
}

/// Runs `f`, turning a panic in it (third-party parsers can panic on malformed input) into
/// an error that names `what` and the panic message.
fn catch_panic<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "no message".into());
            Err(format!("{what} failed (malformed file?): {message}"))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::fs;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/docs").join(name)
    }

    fn write(dir: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, bytes).unwrap();
        path
    }

    fn reasons(report: &LoadReport) -> Vec<(String, String)> {
        report.skipped.iter().map(|(p, r)| (p.file_name().unwrap().to_string_lossy().into_owned(), r.clone())).collect()
    }

    fn reason_for<'a>(r: &'a [(String, String)], name: &str) -> &'a str {
        r.iter().find(|(n, _)| n == name).map(|(_, r)| r.as_str()).unwrap_or_else(|| panic!("{name} not skipped: {r:?}"))
    }

    #[test]
    fn a_folder_is_walked_in_sorted_order_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "b.txt", b"bee");
        write(d, "a.md", b"# Title\n\nbody");
        write(d, "sub/c.txt", "\u{feff}see 🔥".as_bytes());
        write(d, "sub/deeper/d.TXT", b"dee");
        write(d, "binary.txt", b"abc\0def");
        let mut latin1 = b"\xef\xbb\xbfcaf".to_vec();
        latin1.push(0xe9);
        write(d, "latin1.txt", &latin1);
        write(d, "blank.txt", b"  \n\t");
        write(d, "big.txt", &vec![b'x'; 2000]);
        write(d, "image.png", b"\x89PNG");
        write(d, ".hidden.txt", b"secret");
        write(d, ".git/config.txt", b"nope");

        let opts = LoadOptions { max_file_bytes: 1000, ..LoadOptions::default() };
        let report = load_documents(&[d], &opts).unwrap();
        let ids: Vec<&str> = report.documents.iter().map(|doc| doc.id.as_str()).collect();
        assert_eq!(ids, ["a.md", "b.txt", "sub/c.txt", "sub/deeper/d.TXT"]);
        assert_eq!(report.documents[2].text, "see 🔥", "the BOM is dropped");
        assert_eq!(report.documents[0].metadata["format"], "markdown");
        assert_eq!(report.documents[0].metadata["path"], "a.md");

        let r = reasons(&report);
        assert_eq!(r.len(), 4, "{r:?}");
        assert_eq!(reason_for(&r, "binary.txt"), "binary file (NUL byte at offset 3)");
        assert_eq!(reason_for(&r, "latin1.txt"), "not valid UTF-8 (invalid byte at offset 6)", "a file offset, counting the BOM");
        assert!(reason_for(&r, "big.txt").contains("max_file_bytes limit of 1000"));
        assert_eq!(reason_for(&r, "blank.txt"), "no text");

        // Deterministic: the same inputs give the same documents.
        assert_eq!(load_documents(&[d], &opts).unwrap(), report);

        let hidden = LoadOptions { include_hidden: true, ..opts.clone() };
        let ids: Vec<String> = load_documents(&[d], &hidden).unwrap().documents.into_iter().map(|d| d.id).collect();
        assert!(ids.contains(&".hidden.txt".to_string()) && ids.contains(&".git/config.txt".to_string()));

        // Strict: the first unreadable file is an error naming it.
        let strict = LoadOptions { strict: true, ..opts };
        match load_documents(&[d], &strict).unwrap_err() {
            Error::Unreadable { path, reason } => {
                assert!(path.ends_with("big.txt"), "{path:?}");
                assert!(reason.contains("max_file_bytes"));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn files_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "notes/x.md", b"x");
        write(d, "notes/deep/y.md", b"y");
        write(d, "notes/z.txt", b"z");
        write(d, "notes/.draft.md", b"hidden");
        let single = load_documents(&[d.join("notes/z.txt")], &LoadOptions::default()).unwrap();
        assert_eq!(single.documents[0].id, "z.txt");
        assert_eq!(single.documents[0].source, d.join("notes/z.txt").display().to_string());

        let pattern = format!("{}/notes/**/*.md", d.display());
        let report = load_documents(&[pattern.as_str()], &LoadOptions::default()).unwrap();
        let ids: Vec<&str> = report.documents.iter().map(|doc| doc.id.as_str()).collect();
        // Ids are relative to the pattern's literal prefix.
        assert_eq!(ids, ["deep/y.md", "x.md"]);

        // An explicitly named unsupported file is reported; a missing input is an error.
        write(d, "data.bin", b"1");
        let err = load_documents(&[d.join("data.bin")], &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("no documents found") && err.contains("unsupported file type"), "{err}");
        let err = load_documents(&[d.join("missing.txt")], &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");

        // Two inputs naming the same file: the second copy is a duplicate id.
        let twice = load_documents(&[d.join("notes/z.txt"), d.join("notes/z.txt")], &LoadOptions::default()).unwrap();
        assert_eq!(twice.documents.len(), 1);
        assert!(twice.skipped[0].1.contains("duplicate document id `z.txt`"));
    }

    #[test]
    fn an_empty_corpus_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "only.png", b"png");
        let err = load_documents(&[dir.path()], &LoadOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Invalid(_)));
        assert!(msg.starts_with("no documents found in "), "{msg}");
        assert!(msg.contains("supported: .txt, .md"), "{msg}");
        let none: [&str; 0] = [];
        assert!(load_documents(&none, &LoadOptions::default()).unwrap_err().to_string().contains("(no inputs)"));
    }

    #[test]
    fn html_visible_text() {
        let report = load_documents(&[testdata("page.html")], &LoadOptions::default()).unwrap();
        let doc = &report.documents[0];
        assert_eq!(doc.id, "page.html");
        assert_eq!(doc.metadata["title"], "The Furnace Handbook");
        assert_eq!(doc.metadata["format"], "html");
        assert_eq!(
            doc.text,
            "Smelting basics\n\nOre is heated until it melts.\nSlag floats.\n\nIron & steel\nCopper — 🔥 hot\n\n\
             line one\n  indented line\n\na\tb\n\nLast paragraph."
        );
        for hidden in ["do not index", "nor me", "Enable JavaScript", "Home", "color: red"] {
            assert!(!doc.text.contains(hidden), "{hidden}");
        }
    }

    #[test]
    fn html_tag_soup_and_deep_nesting() {
        let deep = format!("{}deep text{}", "<div><span>".repeat(5000), "</span></div>".repeat(5000));
        assert_eq!(html_text(&deep).0, "deep text");
        let soup = "<p>a<b>b<i>c</p>d</b>e<table><td>f<li>g</ul>&bogus; &#xFFFFFF; <!-- x --><![CDATA[y]]>";
        let (text, title) = html_text(soup);
        assert!(title.is_none());
        for part in ["a", "b", "c", "d", "e", "f", "g"] {
            assert!(text.contains(part), "{part} in {text:?}");
        }
        assert_eq!(html_text("").0, "");
    }

    #[test]
    fn pdf_text_and_bad_pdfs() {
        let report = load_documents(&[testdata("two_pages.pdf")], &LoadOptions::default()).unwrap();
        let doc = &report.documents[0];
        assert_eq!(doc.metadata["pages"], 2);
        assert!(doc.text.contains("Hello from the furnace PDF."), "{:?}", doc.text);
        assert!(doc.text.contains("Second page: slag and iron."), "{:?}", doc.text);

        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ok.txt", b"fine");
        write(dir.path(), "broken.pdf", b"%PDF-1.4\nthis is not a pdf");
        let good = fs::read(testdata("two_pages.pdf")).unwrap();
        write(dir.path(), "truncated.pdf", &good[..good.len() / 2]);
        let report = load_documents(&[dir.path()], &LoadOptions::default()).unwrap();
        assert_eq!(report.documents.len(), 1);
        let r = reasons(&report);
        assert!(reason_for(&r, "broken.pdf").starts_with("not a readable PDF: "), "{r:?}");
        // Cut in the middle of the second page: nothing with text survives.
        assert_eq!(reason_for(&r, "truncated.pdf"), "no extractable text (scanned or empty PDF?)");
    }

    #[test]
    fn jsonl_rows() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = concat!(
            "{\"text\": \"first\", \"lang\": \"en\", \"n\": 3, \"ok\": true, \"tags\": [\"a\"], \"none\": null}\n",
            "\n",
            "{\"text\": \"third\", \"lang\": \"de\"}\n",
            "not json\n",
            "{\"body\": \"no text column\"}\n",
            "[1, 2]\n",
            "{\"text\": 5}\n",
        );
        write(dir.path(), "rows.jsonl", jsonl.as_bytes());
        let report = load_documents(&[dir.path()], &LoadOptions::default()).unwrap();
        let ids: Vec<&str> = report.documents.iter().map(|doc| doc.id.as_str()).collect();
        assert_eq!(ids, ["rows.jsonl#0", "rows.jsonl#2"]);
        let first = &report.documents[0].metadata;
        assert_eq!(first["lang"], "en");
        assert_eq!(first["n"], 3);
        assert_eq!(first["ok"], true);
        assert_eq!(first["row"], 0);
        assert!(first.get("tags").is_none() && first.get("none").is_none() && first.get("text").is_none());
        let r: Vec<&str> = report.skipped.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(r.len(), 4, "{r:?}");
        assert!(r[0].starts_with("line 4: invalid JSON"), "{r:?}");
        assert_eq!(r[1], "line 5: no `text` value");
        assert_eq!(r[2], "line 6: not a JSON object");
        assert_eq!(r[3], "line 7: `text` is not a string: 5");

        // A text column, an id column and chosen metadata columns.
        write(dir.path(), "rows.jsonl", b"{\"body\": \"hello\", \"key\": \"k1\", \"a\": 1, \"b\": 2}\n");
        let opts = LoadOptions {
            text_column: "body".into(),
            id_column: Some("key".into()),
            metadata_columns: Some(vec!["b".into()]),
            ..LoadOptions::default()
        };
        let report = load_documents(&[dir.path()], &opts).unwrap();
        let doc = &report.documents[0];
        assert_eq!((doc.id.as_str(), doc.text.as_str()), ("k1", "hello"));
        assert_eq!(doc.metadata["b"], 2);
        assert!(doc.metadata.get("a").is_none());

        let strict = LoadOptions { strict: true, ..LoadOptions::default() };
        write(dir.path(), "rows.jsonl", b"{\"text\": \"ok\"}\n{oops\n");
        let err = load_documents(&[dir.path()], &strict).unwrap_err().to_string();
        assert!(err.contains("rows.jsonl") && err.contains("line 2: invalid JSON"), "{err}");

        let few = LoadOptions { max_rows: 1, ..LoadOptions::default() };
        let err = load_documents(&[dir.path()], &few).unwrap_err().to_string();
        assert!(err.contains("max_rows limit of 1"), "{err}");
    }

    #[test]
    fn csv_rows() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t.csv", "id,text,topic\n7,\"a, quoted\nline\",iron\n8,second,slag\n9,short\n10,,x\n".as_bytes());
        let opts = LoadOptions { id_column: Some("id".into()), ..LoadOptions::default() };
        let report = load_documents(&[dir.path()], &opts).unwrap();
        let docs = &report.documents;
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].id.as_str(), docs[0].text.as_str()), ("7", "a, quoted\nline"));
        assert_eq!(docs[0].metadata["topic"], "iron");
        assert!(docs[0].metadata.get("id").is_none());
        assert_eq!(docs[1].id, "8");
        let r: Vec<&str> = report.skipped.iter().map(|(_, r)| r.as_str()).collect();
        assert!(r[0].starts_with("row 2 (line 5): bad CSV record"), "{r:?}");
        assert_eq!(r[1], "row 3: empty `text`");

        write(dir.path(), "t.csv", b"a,b\n1,2\n");
        let err = load_documents(&[dir.path()], &LoadOptions::default()).unwrap_err().to_string();
        assert!(err.contains("no `text` column (columns: a, b)"), "{err}");
    }

    fn write_parquet(path: &Path) {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let schema = Arc::new(
            parse_message_type("message m { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY source (UTF8); REQUIRED INT64 year; }")
                .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let mut column = 0;
        while let Some(mut col) = group.next_column().unwrap() {
            match column {
                0 => {
                    let v: Vec<ByteArray> = ["alpha", "beta"].iter().map(|s| ByteArray::from(*s)).collect();
                    col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
                }
                1 => {
                    let v: Vec<ByteArray> = ["wiki", "book"].iter().map(|s| ByteArray::from(*s)).collect();
                    col.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
                }
                _ => {
                    col.typed::<Int64Type>().write_batch(&[2001, 2002], None, None).unwrap();
                }
            }
            col.close().unwrap();
            column += 1;
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn parquet_rows() {
        let dir = tempfile::tempdir().unwrap();
        write_parquet(&dir.path().join("t.parquet"));
        let report = load_documents(&[dir.path()], &LoadOptions::default()).unwrap();
        let docs = &report.documents;
        assert_eq!(docs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["t.parquet#0", "t.parquet#1"]);
        assert_eq!(docs[1].text, "beta");
        assert_eq!(docs[1].metadata["source"], "book");
        assert_eq!(docs[1].metadata["year"], 2002);

        let few = LoadOptions { max_rows: 1, ..LoadOptions::default() };
        let err = load_documents(&[dir.path()], &few).unwrap_err().to_string();
        assert!(err.contains("max_rows limit of 1"), "{err}");

        let good = fs::read(dir.path().join("t.parquet")).unwrap();
        write(dir.path(), "t.parquet", &good[..good.len() - 10]);
        write(dir.path(), "ok.txt", b"fine");
        let report = load_documents(&[dir.path()], &LoadOptions::default()).unwrap();
        let r = reasons(&report);
        assert!(reason_for(&r, "t.parquet").contains("Parquet"), "{r:?}");
    }

    #[test]
    fn a_panicking_parser_becomes_a_reason() {
        let r: std::result::Result<(), String> = catch_panic("the X reader", || panic!("index out of bounds"));
        assert_eq!(r.unwrap_err(), "the X reader failed (malformed file?): index out of bounds");
        assert_eq!(catch_panic("y", || Ok(3)), Ok(3));
    }

    #[test]
    fn content_hash_tracks_text_and_metadata() {
        let mut doc = Document { id: "a".into(), source: "a".into(), text: "hello".into(), metadata: Map::new() };
        let h = doc.content_hash();
        assert_eq!(h.len(), 64);
        assert_eq!(h, doc.clone().content_hash());
        doc.source = "elsewhere".into();
        assert_eq!(h, doc.content_hash(), "the source path is not content");
        doc.metadata.insert("k".into(), "v".into());
        assert_ne!(h, doc.content_hash());
        doc.metadata.clear();
        doc.text.push('!');
        assert_ne!(h, doc.content_hash());
    }
}
