//! Dataset preparation (`furnace data prepare`): read SFT rows with the training reader
//! ([`read_rows_from_bytes`], [`row_messages`]), drop bad rows or stop at the first one
//! (file:line), filter by length, deduplicate (exact, and near-duplicates by MinHash),
//! convert between row forms, split train/validation with a seed, and write JSONL, CSV or
//! Parquet that `furnace train` reads back as the same examples.
//!
//! The steps run in this order: read (and convert) → length filter → exact dedup → near
//! dedup → seeded shuffle and split → write. Deduplication keeps the first occurrence in
//! input order (inputs in the order given, rows in file order), so it happens before the
//! split and no validation row is a duplicate of a training row.
//!
//! Exact dedup compares the whole conversation (roles, system messages included) after
//! lowercasing and collapsing whitespace. Near dedup ([`super::minhash`]) compares the
//! messages other than system messages: a long system prompt shared by every row would
//! otherwise make distinct examples look alike.
//!
//! Row forms and conversion ([`RowForm`]):
//! - `chat`: `{"messages": [{role, content}, ...]}`, the last message the assistant's.
//! - `prompt_completion`: `{"prompt", "completion"}` with an optional `system`. A multi-turn
//!   conversation keeps everything before the last assistant turn as the prompt, written as
//!   a list of messages (`"prompt": [{role, content}, ...]`); a single user turn (with an
//!   optional leading system message) is written as text.
//! - `instruction`: Alpaca's `{"instruction", "input", "output"}` with an optional `system`;
//!   the user message becomes `instruction` and `input` is empty (furnace formats
//!   instruction + input as one user message, so this is the same example). A multi-turn
//!   conversation has no instruction form: such a row is a bad row.
//!
//! Converted rows use the default column names and keep the row's other columns; without a
//! conversion each row is written as read. CSV and Parquet hold one string column per key;
//! lists (messages, a conversational prompt) are written as JSON text, which the reader takes
//! back as the list.

use super::minhash::{estimated_jaccard, normalize, LshIndex, MinHasher};
use super::{encode_row, read_rows_from_bytes, row_messages, text_field, Columns, DataOptions, RowResult};
use crate::engine::{mix, IGNORE_INDEX};
use crate::error::{Error, Result};
use furnace_text::{ChatMessage, ChatTemplate, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The SFT row forms `furnace train` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowForm {
    /// `messages`: a list of `{role, content}`.
    Chat,
    /// `prompt` (text or messages) + `completion`, optional `system`.
    PromptCompletion,
    /// `instruction` + `input` + `output`, optional `system`.
    Instruction,
}

impl RowForm {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::PromptCompletion => "prompt_completion",
            Self::Instruction => "instruction",
        }
    }

    /// Parses `chat`, `prompt_completion` (or `prompt-completion`) or `instruction`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "chat" => Some(Self::Chat),
            "prompt_completion" | "prompt-completion" => Some(Self::PromptCompletion),
            "instruction" => Some(Self::Instruction),
            _ => None,
        }
    }
}

/// The file format of the written splits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per line.
    #[default]
    Jsonl,
    /// A header of keys, one string cell per key.
    Csv,
    /// One optional UTF-8 string column per key (zstd).
    Parquet,
}

impl OutputFormat {
    /// The file extension (`jsonl`, `csv`, `parquet`).
    pub fn ext(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }

    /// Parses `jsonl`, `csv` or `parquet`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jsonl" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }
}

/// Which duplicates are removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dedup {
    /// Keep every row.
    None,
    /// Rows whose whole content is the same text after lowercasing and collapsing whitespace.
    #[default]
    Exact,
    /// Exact duplicates, then rows whose MinHash-estimated Jaccard similarity with a kept row
    /// reaches the threshold (system messages left out).
    Near,
}

impl Dedup {
    /// Parses `none`, `exact` or `near`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Self::None),
            "exact" => Some(Self::Exact),
            "near" => Some(Self::Near),
            _ => None,
        }
    }
}

/// How many rows go to validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSplit {
    /// This share of the rows, rounded up (as Hugging Face's `train_test_split` does).
    Fraction(f64),
    /// This many rows.
    Count(usize),
}

/// What `prepare` does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareOptions {
    /// Column names of the input rows.
    pub columns: Columns,
    /// The validation split.
    pub val: ValSplit,
    /// Seed of the shuffle before the split (and of the MinHash functions).
    pub seed: u64,
    /// Which duplicates to remove.
    pub dedup: Dedup,
    /// Near-duplicate threshold on the estimated Jaccard similarity.
    pub near_threshold: f64,
    /// MinHash functions per signature.
    pub num_perm: usize,
    /// Characters per shingle.
    pub shingle: usize,
    /// Fewest characters of message content a row may have.
    pub min_chars: Option<usize>,
    /// Most characters of message content a row may have.
    pub max_chars: Option<usize>,
    /// Fewest tokens of the formatted row (needs a tokenizer and chat template).
    pub min_tokens: Option<usize>,
    /// Most tokens of the formatted row (needs a tokenizer and chat template).
    pub max_tokens: Option<usize>,
    /// The form to write; `None` writes each row as read.
    pub to: Option<RowForm>,
    /// The file format to write.
    pub format: OutputFormat,
    /// Count and list bad rows instead of stopping at the first.
    pub skip_bad: bool,
    /// The model whose tokenizer counted tokens, for the record.
    pub model: Option<String>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            columns: Columns::default(),
            val: ValSplit::Fraction(0.1),
            seed: 42,
            dedup: Dedup::Exact,
            near_threshold: 0.85,
            num_perm: 128,
            shingle: 5,
            min_chars: None,
            max_chars: None,
            min_tokens: None,
            max_tokens: None,
            to: None,
            format: OutputFormat::Jsonl,
            skip_bad: false,
            model: None,
        }
    }
}

/// A tokenizer and chat template, to count tokens as `furnace train` does.
#[derive(Clone, Copy)]
pub struct TextModel<'a> {
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The chat template.
    pub template: &'a ChatTemplate,
}

/// Where long steps report how far they are (the CLI draws a progress bar).
pub trait Progress: Sync {
    /// A step of `total` units starts.
    fn stage(&self, name: &str, total: usize);
    /// `n` more units of the current step are done.
    fn advance(&self, n: usize);
}

/// No progress reporting.
impl Progress for () {
    fn stage(&self, _: &str, _: usize) {}
    fn advance(&self, _: usize) {}
}

/// A bad row: its file, line and what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadRow {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (JSONL, CSV) or row number (JSON, Parquet).
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

/// A removed duplicate and the kept row it duplicates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DuplicatePair {
    /// The kept row, `file:line`.
    pub kept: String,
    /// The removed row, `file:line`.
    pub removed: String,
    /// Near duplicates: the estimated Jaccard similarity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jaccard: Option<f64>,
}

/// An input file as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputFile {
    /// The path given.
    pub path: PathBuf,
    /// SHA-256 of its bytes (hex).
    pub sha256: String,
    /// Rows read from it (good and bad).
    pub rows: usize,
}

/// Most bad rows and duplicate pairs listed in a report (all are counted).
pub const MAX_LISTED: usize = 1000;

/// What `prepare` did; written to `prepare.json` beside the splits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrepareReport {
    /// The options.
    pub options: PrepareOptions,
    /// The inputs with their SHA-256.
    pub inputs: Vec<InputFile>,
    /// Rows read (good and bad).
    pub rows_read: usize,
    /// Rows per form among the good rows (as read, before any conversion).
    pub forms: BTreeMap<String, usize>,
    /// Bad rows (skipped with `skip_bad`).
    pub bad_rows: usize,
    /// The first [`MAX_LISTED`] bad rows.
    pub bad: Vec<BadRow>,
    /// Rows shorter than `min_chars`/`min_tokens`.
    pub too_short: usize,
    /// Rows longer than `max_chars`/`max_tokens`.
    pub too_long: usize,
    /// Exact duplicates removed.
    pub exact_duplicates: usize,
    /// Near duplicates removed.
    pub near_duplicates: usize,
    /// LSH bands × rows per band used for near dedup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsh_bands: Option<(usize, usize)>,
    /// The first [`MAX_LISTED`] exact duplicate pairs.
    pub exact_pairs: Vec<DuplicatePair>,
    /// The first [`MAX_LISTED`] near duplicate pairs.
    pub near_pairs: Vec<DuplicatePair>,
    /// Rows written to the training split.
    pub train: usize,
    /// Rows written to the validation split.
    pub val: usize,
    /// The files written.
    pub outputs: Vec<PathBuf>,
}

/// One good row.
#[derive(Debug, Clone)]
struct Row {
    file: usize,
    line: usize,
    /// The whole conversation (the last message is the assistant's answer).
    messages: Vec<ChatMessage>,
    /// The row to write.
    out: Value,
}

/// The form of an SFT row, in the order [`row_messages`] tries them.
fn sft_form(row: &Value, c: &Columns) -> RowForm {
    if row.get(&c.messages).is_some_and(|v| !v.is_null()) {
        RowForm::Chat
    } else if row.get(&c.prompt).is_some_and(|v| !v.is_null()) && text_field(row, &c.completion).is_some() {
        RowForm::PromptCompletion
    } else {
        RowForm::Instruction
    }
}

/// The messages as a JSON list of `{role, content}`.
fn messages_value(msgs: &[ChatMessage]) -> Value {
    Value::Array(msgs.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect())
}

/// The conversation `msgs` (ending with the assistant's answer) as a row of form `to`, with
/// the default column names, plus the columns of `original` that no form uses.
pub fn convert(msgs: &[ChatMessage], to: RowForm, original: &Value, c: &Columns) -> RowResult<Value> {
    let d = Columns::default();
    let (prompt, answer) = match msgs.split_last() {
        Some((last, prompt)) if last.role == "assistant" => (prompt, last),
        _ => return Err("the conversation does not end with an assistant message".into()),
    };
    let mut o = Map::new();
    let single_turn = match prompt {
        [u] if u.role == "user" => Some((None, u)),
        [s, u] if s.role == "system" && u.role == "user" => Some((Some(s), u)),
        _ => None,
    };
    match to {
        RowForm::Chat => {
            o.insert(d.messages.clone(), messages_value(msgs));
        }
        RowForm::PromptCompletion => {
            match single_turn {
                Some((system, user)) => {
                    if let Some(s) = system {
                        o.insert(d.system.clone(), Value::String(s.content.clone()));
                    }
                    o.insert(d.prompt.clone(), Value::String(user.content.clone()));
                }
                None => {
                    o.insert(d.prompt.clone(), messages_value(prompt));
                }
            }
            o.insert(d.completion.clone(), Value::String(answer.content.clone()));
        }
        RowForm::Instruction => {
            let Some((system, user)) = single_turn else {
                return Err(format!(
                    "a conversation of {} messages has no instruction form (one user message, an optional system message \
                     before it, and the answer): use --to chat or --to prompt_completion",
                    msgs.len()
                ));
            };
            if let Some(s) = system {
                o.insert(d.system.clone(), Value::String(s.content.clone()));
            }
            o.insert(d.instruction.clone(), Value::String(user.content.clone()));
            o.insert(d.input.clone(), Value::String(String::new()));
            o.insert(d.output.clone(), Value::String(answer.content.clone()));
        }
    }
    // The row's other columns (an id, a source, ...) travel with it.
    let form_columns = [&c.messages, &c.prompt, &c.completion, &c.instruction, &c.input, &c.output, &c.system];
    if let Some(orig) = original.as_object() {
        for (k, v) in orig {
            if !form_columns.contains(&k) && !o.contains_key(k) {
                o.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(Value::Object(o))
}

/// The whole conversation of an SFT row, and the row to write (converted to `opts.to`). A
/// conversion is checked by reading the converted row back.
fn parse_row(v: Value, opts: &PrepareOptions) -> RowResult<(RowForm, Vec<ChatMessage>, Value)> {
    let (mut msgs, completion) = row_messages(&v, &opts.columns)?;
    let form = sft_form(&v, &opts.columns);
    msgs.push(ChatMessage::new("assistant", completion));
    let Some(to) = opts.to else { return Ok((form, msgs, v)) };
    let out = convert(&msgs, to, &v, &opts.columns)?;
    let (mut back, back_completion) = row_messages(&out, &Columns::default())?;
    back.push(ChatMessage::new("assistant", back_completion));
    if back != msgs {
        return Err(format!("the {} form of this row does not read back as the same conversation", to.name()));
    }
    Ok((form, msgs, out))
}

/// The column names of the rows to write.
fn out_columns(opts: &PrepareOptions) -> Columns {
    if opts.to.is_some() {
        Columns::default()
    } else {
        opts.columns.clone()
    }
}

/// The content of a conversation as one text (roles included), for deduplication. Exact
/// dedup compares the whole conversation; near dedup leaves system messages out
/// (`with_system` false), since a long system prompt shared by every row would make distinct
/// examples look alike.
fn content_text(msgs: &[ChatMessage], with_system: bool) -> String {
    let kept = msgs.iter().filter(|m| with_system || m.role != "system");
    kept.map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
}

fn check_options(opts: &PrepareOptions, text: Option<TextModel>) -> Result<()> {
    let bad = |msg: String| Err(Error::Input(msg));
    match opts.val {
        ValSplit::Fraction(f) if !(0.0..1.0).contains(&f) => {
            return bad(format!("--val-fraction {f}: use a share from 0 up to (not including) 1"))
        }
        _ => {}
    }
    if !(opts.near_threshold > 0.0 && opts.near_threshold <= 1.0) {
        return bad(format!("--near-threshold {}: use a similarity above 0 and at most 1", opts.near_threshold));
    }
    if opts.num_perm == 0 || opts.shingle == 0 {
        return bad("MinHash needs at least one hash function and one character per shingle".into());
    }
    if (opts.min_tokens.is_some() || opts.max_tokens.is_some()) && text.is_none() {
        return bad("--min-tokens/--max-tokens count the tokens of the formatted row: give --model (its tokenizer and chat template), \
             or filter by characters with --min-chars/--max-chars"
            .into());
    }
    if let (Some(a), Some(b)) = (opts.min_tokens, opts.max_tokens) {
        if a > b {
            return bad(format!("--min-tokens {a} is more than --max-tokens {b}"));
        }
    }
    if let (Some(a), Some(b)) = (opts.min_chars, opts.max_chars) {
        if a > b {
            return bad(format!("--min-chars {a} is more than --max-chars {b}"));
        }
    }
    Ok(())
}

/// Bad rows so far; the first one is an error unless `skip_bad`.
struct BadRows {
    skip: bool,
    count: usize,
    listed: Vec<BadRow>,
}

impl BadRows {
    fn push(&mut self, path: &Path, line: usize, msg: String) -> Result<()> {
        if !self.skip {
            return Err(Error::DataRow { path: path.to_path_buf(), line, msg });
        }
        self.count += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(BadRow { path: path.to_path_buf(), line, msg });
        }
        Ok(())
    }
}

/// The files read (with SHA-256 and row counts), the good rows and the count of each form.
type Inputs = (Vec<InputFile>, Vec<Row>, BTreeMap<String, usize>);

/// Reads every input: the files (with SHA-256 and row counts), the good rows and the forms.
fn read_inputs(inputs: &[PathBuf], opts: &PrepareOptions, bad: &mut BadRows, progress: &dyn Progress) -> Result<Inputs> {
    use sha2::{Digest, Sha256};
    let (mut files, mut rows, mut forms) = (Vec::new(), Vec::new(), BTreeMap::new());
    progress.stage("reading", inputs.len());
    for (fi, path) in inputs.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|e| Error::DataFile { path: path.clone(), msg: format!("cannot read: {e}") })?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        let raw = read_rows_from_bytes(bytes, path)?;
        files.push(InputFile { path: path.clone(), sha256, rows: raw.len() });
        for (line, row) in raw {
            match row.and_then(|v| parse_row(v, opts)) {
                Ok((form, messages, out)) => {
                    *forms.entry(form.name().to_string()).or_insert(0) += 1;
                    rows.push(Row { file: fi, line, messages, out });
                }
                Err(msg) => bad.push(path, line, msg)?,
            }
        }
        progress.advance(1);
    }
    Ok((files, rows, forms))
}

/// A seeded stream of random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0), by rejection so that no value is favoured.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// `0..n` shuffled with `seed` (Fisher–Yates).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    idx
}

/// How many of `n` rows go to validation.
pub fn val_size(n: usize, val: ValSplit) -> usize {
    match val {
        ValSplit::Fraction(f) => {
            // 0.1 × 30 is 3.0000000000000004 in floating point: that is 3 rows, not 4.
            let x = f * n as f64;
            let rows = if (x - x.round()).abs() < 1e-9 { x.round() } else { x.ceil() };
            (rows as usize).min(n)
        }
        ValSplit::Count(c) => c.min(n),
    }
}

/// Prepares `inputs` into `out_dir`: `train.<ext>`, `val.<ext>` (only when the validation
/// split has rows; a stale one is removed) and `prepare.json` (the report). `text` is
/// needed for token-length filters.
pub fn prepare(
    inputs: &[PathBuf],
    out_dir: &Path,
    opts: &PrepareOptions,
    text: Option<TextModel>,
    progress: &dyn Progress,
) -> Result<PrepareReport> {
    check_options(opts, text)?;
    if inputs.is_empty() {
        return Err(Error::Input("no input files".into()));
    }
    let ext = opts.format.ext();
    let (train_path, val_path) = (out_dir.join(format!("train.{ext}")), out_dir.join(format!("val.{ext}")));
    for input in inputs {
        let same = |p: &Path| p.exists() && std::fs::canonicalize(p).ok() == std::fs::canonicalize(input).ok();
        if same(&train_path) || same(&val_path) {
            return Err(Error::Input(format!("{}: an input would be overwritten by the output; pick another --out", input.display())));
        }
    }
    let mut bad = BadRows { skip: opts.skip_bad, count: 0, listed: Vec::new() };
    let (files, rows, forms) = read_inputs(inputs, opts, &mut bad, progress)?;
    let rows_read = files.iter().map(|f| f.rows).sum();
    let at = |r: &Row| format!("{}:{}", files[r.file].path.display(), r.line);

    // Length filters.
    let (mut too_short, mut too_long) = (0, 0);
    let mut kept: Vec<Row> = Vec::with_capacity(rows.len());
    let token_counts: Option<Vec<RowResult<usize>>> = match (text, opts.min_tokens.is_some() || opts.max_tokens.is_some()) {
        (Some(t), true) => {
            progress.stage("counting tokens", rows.len());
            let data_opts = DataOptions { columns: out_columns(opts), max_seq_len: usize::MAX, ..DataOptions::default() };
            Some(
                rows.par_iter()
                    .map(|r| {
                        let n = encode_row(&r.out, t.tokenizer, t.template, &data_opts).map(|(ex, _)| ex.ids.len());
                        progress.advance(1);
                        n
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    for (i, r) in rows.into_iter().enumerate() {
        let chars: usize = r.messages.iter().map(|m| m.content.chars().count()).sum();
        let tokens = match token_counts.as_ref().map(|c| c[i].clone()) {
            Some(Err(msg)) => {
                bad.push(&files[r.file].path, r.line, msg)?;
                continue;
            }
            Some(Ok(n)) => Some(n),
            None => None,
        };
        let short = opts.min_chars.is_some_and(|m| chars < m) || matches!((tokens, opts.min_tokens), (Some(n), Some(m)) if n < m);
        let long = opts.max_chars.is_some_and(|m| chars > m) || matches!((tokens, opts.max_tokens), (Some(n), Some(m)) if n > m);
        if short {
            too_short += 1;
        } else if long {
            too_long += 1;
        } else {
            kept.push(r);
        }
    }

    // Exact duplicates: the same normalized content.
    let (mut exact_duplicates, mut exact_pairs) = (0, Vec::new());
    if opts.dedup != Dedup::None {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut unique = Vec::with_capacity(kept.len());
        for r in kept {
            let key = normalize(&content_text(&r.messages, true));
            if let Some(&first) = seen.get(&key) {
                exact_duplicates += 1;
                if exact_pairs.len() < MAX_LISTED {
                    exact_pairs.push(DuplicatePair { kept: at(&unique[first]), removed: at(&r), jaccard: None });
                }
                continue;
            }
            seen.insert(key, unique.len());
            unique.push(r);
        }
        kept = unique;
    }

    // Near duplicates: MinHash + LSH, verified by the estimated Jaccard similarity.
    let (mut near_duplicates, mut near_pairs, mut lsh_bands) = (0, Vec::new(), None);
    if opts.dedup == Dedup::Near {
        progress.stage("MinHash signatures", kept.len());
        let hasher = MinHasher::new(opts.num_perm, opts.shingle, mix(opts.seed ^ 0x004D_494E_4841_5348));
        let sigs: Vec<Vec<u64>> = kept
            .par_iter()
            .map(|r| {
                let s = hasher.signature(&content_text(&r.messages, false));
                progress.advance(1);
                s
            })
            .collect();
        let mut index = LshIndex::for_threshold(opts.num_perm, opts.near_threshold);
        lsh_bands = Some(index.shape());
        let mut keep = vec![true; kept.len()];
        for i in 0..kept.len() {
            let best = index
                .candidates(&sigs[i])
                .into_iter()
                .map(|j| (j, estimated_jaccard(&sigs[i], &sigs[j])))
                .filter(|&(_, s)| s >= opts.near_threshold)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((j, s)) => {
                    keep[i] = false;
                    near_duplicates += 1;
                    if near_pairs.len() < MAX_LISTED {
                        near_pairs.push(DuplicatePair { kept: at(&kept[j]), removed: at(&kept[i]), jaccard: Some(s) });
                    }
                }
                None => index.insert(i, &sigs[i]),
            }
        }
        kept = kept.into_iter().zip(keep).filter_map(|(r, k)| k.then_some(r)).collect();
    }

    if kept.is_empty() {
        return Err(Error::Input(format!(
            "no rows left to write: {rows_read} read, {} bad, {too_short} too short, {too_long} too long, \
             {exact_duplicates} exact and {near_duplicates} near duplicates",
            bad.count
        )));
    }
    if opts.format != OutputFormat::Jsonl && opts.to.is_none() && forms.len() > 1 {
        let list: Vec<String> = forms.iter().map(|(k, v)| format!("{k} {v}")).collect();
        return Err(Error::Input(format!(
            "the rows are in several forms ({}); a {} file holds one form per file: pass --to chat, prompt_completion or instruction",
            list.join(", "),
            ext
        )));
    }

    // Seeded shuffle, then the first rows are the validation split.
    let n_val = val_size(kept.len(), opts.val);
    if n_val >= kept.len() {
        return Err(Error::Input(format!("the validation split would take all {} rows, leaving none to train on", kept.len())));
    }
    let order = shuffled(kept.len(), opts.seed);
    let val_rows: Vec<&Value> = order[..n_val].iter().map(|&i| &kept[i].out).collect();
    let train_rows: Vec<&Value> = order[n_val..].iter().map(|&i| &kept[i].out).collect();

    std::fs::create_dir_all(out_dir).map_err(|e| Error::DataFile { path: out_dir.to_path_buf(), msg: format!("cannot create: {e}") })?;
    progress.stage("writing", kept.len());
    let header = column_order(train_rows.iter().chain(&val_rows).copied());
    write_rows(&train_path, &train_rows, &header, opts.format)?;
    progress.advance(train_rows.len());
    let mut outputs = vec![train_path];
    if n_val > 0 {
        write_rows(&val_path, &val_rows, &header, opts.format)?;
        progress.advance(val_rows.len());
        outputs.push(val_path);
    } else if val_path.is_file() {
        // A validation split from an earlier run would be read as this one's.
        std::fs::remove_file(&val_path)
            .map_err(|e| Error::DataFile { path: val_path.clone(), msg: format!("cannot remove the stale file: {e}") })?;
    }
    let report = PrepareReport {
        options: opts.clone(),
        inputs: files,
        rows_read,
        forms,
        bad_rows: bad.count,
        bad: bad.listed,
        too_short,
        too_long,
        exact_duplicates,
        near_duplicates,
        lsh_bands,
        exact_pairs,
        near_pairs,
        train: train_rows.len(),
        val: n_val,
        outputs,
    };
    let json_path = out_dir.join("prepare.json");
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Input(format!("cannot serialize the report: {e}")))?;
    std::fs::write(&json_path, json + "\n").map_err(|e| Error::DataFile { path: json_path, msg: format!("cannot write: {e}") })?;
    Ok(report)
}

/// The keys of the rows in order of first appearance.
fn column_order<'a>(rows: impl Iterator<Item = &'a Value>) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
            if !cols.contains(k) {
                cols.push(k.clone());
            }
        }
    }
    cols
}

/// A cell of a CSV or Parquet file: texts as they are, anything else as JSON text, `None`
/// for a missing or null value.
fn cell(row: &Value, key: &str) -> Option<String> {
    match row.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    }
}

/// Rows per Parquet row group.
const ROW_GROUP: usize = 10_000;

fn write_rows(path: &Path, rows: &[&Value], header: &[String], format: OutputFormat) -> Result<()> {
    let err = |msg: String| Error::DataFile { path: path.to_path_buf(), msg };
    match format {
        OutputFormat::Jsonl => {
            let mut s = String::new();
            for r in rows {
                s.push_str(&serde_json::to_string(r).map_err(|e| err(format!("cannot serialize a row: {e}")))?);
                s.push('\n');
            }
            std::fs::write(path, s).map_err(|e| err(format!("cannot write: {e}")))
        }
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_path(path).map_err(|e| err(format!("cannot write: {e}")))?;
            w.write_record(header).map_err(|e| err(format!("cannot write: {e}")))?;
            for r in rows {
                w.write_record(header.iter().map(|k| cell(r, k).unwrap_or_default())).map_err(|e| err(format!("cannot write: {e}")))?;
            }
            w.flush().map_err(|e| err(format!("cannot write: {e}")))
        }
        OutputFormat::Parquet => write_parquet(path, rows, header).map_err(|e| err(format!("cannot write Parquet: {e}"))),
    }
}

/// One optional UTF-8 string column per key.
fn write_parquet(path: &Path, rows: &[&Value], header: &[String]) -> std::result::Result<(), parquet::errors::ParquetError> {
    use parquet::basic::{Compression, LogicalType, Repetition, Type as PhysicalType, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    use std::sync::Arc;
    let mut fields = Vec::with_capacity(header.len());
    for k in header {
        fields.push(Arc::new(
            Type::primitive_type_builder(k, PhysicalType::BYTE_ARRAY)
                .with_repetition(Repetition::OPTIONAL)
                .with_logical_type(Some(LogicalType::String))
                .build()?,
        ));
    }
    let schema = Arc::new(Type::group_type_builder("schema").with_fields(fields).build()?);
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::ZSTD(ZstdLevel::default())).build());
    let file = std::fs::File::create(path)?;
    let mut w = SerializedFileWriter::new(file, schema, props)?;
    for chunk in rows.chunks(ROW_GROUP) {
        let mut group = w.next_row_group()?;
        let mut column = 0;
        while let Some(mut col) = group.next_column()? {
            let key = &header[column];
            let cells: Vec<Option<String>> = chunk.iter().map(|r| cell(r, key)).collect();
            let defs: Vec<i16> = cells.iter().map(|c| c.is_some() as i16).collect();
            let values: Vec<ByteArray> = cells.into_iter().flatten().map(|s| ByteArray::from(s.into_bytes())).collect();
            col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None)?;
            col.close()?;
            column += 1;
        }
        group.close()?;
    }
    w.close()?;
    Ok(())
}

/// Row `n` of the inputs rendered as `furnace train` sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    /// The row, `file:line`.
    pub at: String,
    /// Its form as read.
    pub form: String,
    /// The row as it would be written (converted when asked).
    pub row: Value,
    /// The formatted prompt: tokens without loss.
    pub prompt: String,
    /// The formatted completion: tokens the loss covers.
    pub completion: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Completion tokens.
    pub completion_tokens: usize,
}

/// Row `n` (1-based, counting the rows of the inputs in order, bad rows included) converted
/// as `opts.to` asks and rendered with the chat template, split where the loss starts. A bad
/// row is an error naming its file and line.
pub fn preview(inputs: &[PathBuf], n: usize, opts: &PrepareOptions, text: TextModel) -> Result<Preview> {
    let mut seen = 0;
    for path in inputs {
        let raw = super::read_rows(path)?;
        if n == 0 || seen + raw.len() < n {
            seen += raw.len();
            continue;
        }
        let (line, row) = raw.into_iter().nth(n - seen - 1).ok_or_else(|| Error::Input(format!("no row {n}")))?;
        let row_err = |msg: String| Error::DataRow { path: path.clone(), line, msg };
        let (form, _, out) = row.and_then(|v| parse_row(v, opts)).map_err(row_err)?;
        let data_opts = DataOptions { columns: out_columns(opts), max_seq_len: usize::MAX, ..DataOptions::default() };
        let (ex, _) = encode_row(&out, text.tokenizer, text.template, &data_opts).map_err(row_err)?;
        let masked = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
        let decode = |ids: &[u32]| text.tokenizer.decode(ids, false).map_err(|e| row_err(e.to_string()));
        return Ok(Preview {
            at: format!("{}:{line}", path.display()),
            form: form.name().to_string(),
            row: out,
            prompt: decode(&ex.ids[..masked])?,
            completion: decode(&ex.ids[masked..])?,
            prompt_tokens: masked,
            completion_tokens: ex.ids.len() - masked,
        });
    }
    Err(Error::Input(format!("--preview {n}: the inputs have {seen} rows (rows count from 1)")))
}
