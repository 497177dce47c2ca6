//! Training data: JSONL, JSON (a list or `{"data": [...]}`) and CSV files whose rows are in
//! chat form (`messages`), prompt/completion form, or instruction form (`input`/`output`,
//! optional `instruction` and `system`), with a column mapping. Rows are formatted with the
//! model's chat template and tokenized; the loss covers the completion (the last assistant
//! message) only unless `completion_only` is off. A bad row is an error naming the file and
//! line, or is skipped and counted when `skip_bad_rows` is on.
//!
//! [`DataOptions::kind`] picks what rows hold:
//! - SFT ([`encode_row`]): the forms above.
//! - Preference, for DPO ([`encode_preference_row`]): TRL's forms, a prompt with a chosen
//!   and a rejected answer. With a `prompt` column (text, or a list of messages) the answers
//!   are texts or lists of assistant messages; without one, `chosen` and `rejected` are whole
//!   conversations and the prompt is their longest common prefix of messages. Both answers
//!   are learned (labels on the answer only), prompt + answer cut to `max_seq_len`.
//! - Prompt, for GRPO ([`encode_prompt_row`]): a `prompt` (text or messages) rendered with
//!   the generation prompt; the whole row is kept for the rewards.

use crate::engine::IGNORE_INDEX;
use crate::error::{Error, Result};

/// A result whose error is a message about one row (its file and line are added later).
pub type RowResult<T> = std::result::Result<T, String>;
use furnace_text::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::Value;
use std::path::Path;

pub mod minhash;
mod parquet_pages;
pub mod prepare;

/// Column names of the row forms (defaults are the usual names).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Columns {
    /// Chat form: a list of `{role, content}`.
    pub messages: String,
    /// Prompt/completion form: the prompt.
    pub prompt: String,
    /// Prompt/completion form: the completion.
    pub completion: String,
    /// Instruction form: the optional instruction.
    pub instruction: String,
    /// Instruction form: the input.
    pub input: String,
    /// Instruction form: the output.
    pub output: String,
    /// Optional system message (prompt/completion and instruction forms).
    pub system: String,
    /// Preference form (DPO): the preferred answer (text or assistant messages).
    pub chosen: String,
    /// Preference form (DPO): the dispreferred answer.
    pub rejected: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            messages: "messages".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

/// What a training row holds, by trainer kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// A conversation or prompt + completion to imitate (SFT).
    #[default]
    Sft,
    /// A prompt with a chosen and a rejected answer (DPO).
    Preference,
    /// A prompt alone, plus any columns the rewards read (GRPO).
    Prompt,
}

/// How rows become training examples.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// What the rows hold.
    pub kind: DataKind,
    /// Column mapping.
    pub columns: Columns,
    /// Longest example in tokens; longer ones are truncated (an example whose completion
    /// would be cut away entirely is a bad row).
    pub max_seq_len: usize,
    /// Loss on completion tokens only (prompt labels are -100).
    pub completion_only: bool,
    /// Skip and count bad rows instead of failing.
    pub skip_bad_rows: bool,
    /// A user function (`"python:NAME"`, [`crate::hooks`]) that rewrites the rows before
    /// they are encoded ([`format_rows`]).
    pub formatting: Option<String>,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            kind: DataKind::Sft,
            columns: Columns::default(),
            max_seq_len: 512,
            completion_only: true,
            skip_bad_rows: false,
            formatting: None,
        }
    }
}

/// One tokenized example.
///
/// - SFT: `ids`/`labels` are the conversation.
/// - Preference (DPO): `ids`/`labels` are the prompt + the chosen answer, `rejected` the
///   prompt + the rejected answer (labels on the answers only).
/// - Prompt (GRPO): `ids` is the rendered prompt (the generation prompt included), `labels`
///   are all [`IGNORE_INDEX`], `row` the row's columns that rewards read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels (`-100` where no loss is taken).
    pub labels: Vec<i64>,
    /// DPO: the rejected sequence.
    pub rejected: Option<Box<Sequence>>,
    /// GRPO: the row as read (its columns).
    pub row: Option<std::sync::Arc<Value>>,
    /// DPO: the reference model's log-probabilities of (chosen, rejected), summed over their
    /// answer tokens; computed once and shared by every run and epoch that uses this
    /// example (the dataset is shared by the runs of one base and reference).
    pub reference: std::sync::OnceLock<(f64, f64)>,
    /// SFT: the tokens of the prompt (the conversation before the completion, rendered
    /// with the generation prompt) at the start of `ids`; 0 when not known (an example
    /// not made by [`encode_row`]).
    pub prompt_len: usize,
}

impl Example {
    /// SFT: the prompt's tokens (what a completion is generated from): the first
    /// `prompt_len` ids, or without it those before the first labelled token.
    pub fn prompt_ids(&self) -> &[u32] {
        let n = if self.prompt_len > 0 {
            self.prompt_len
        } else {
            self.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(self.ids.len())
        };
        &self.ids[..n.min(self.ids.len())]
    }

    /// SFT: the reference completion's tokens: those after the prompt that carry a label.
    pub fn completion_ids(&self) -> Vec<u32> {
        let start = self.prompt_ids().len();
        self.ids.iter().zip(&self.labels).skip(start).filter(|(_, &l)| l != IGNORE_INDEX).map(|(&t, _)| t).collect()
    }
}

/// A token sequence with its labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels (`-100` where no loss is taken).
    pub labels: Vec<i64>,
}

/// A loaded dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Rows skipped as bad (only with `skip_bad_rows`).
    pub skipped: usize,
    /// Examples that were truncated to `max_seq_len`.
    pub truncated: usize,
}

/// A raw row with its line number; a JSONL line that is not JSON is an `Err` row, so that
/// `skip_bad_rows` can skip it like any other bad row.
pub type RawRow = (usize, std::result::Result<Value, String>);

/// Reads raw rows (JSON objects) with their line numbers.
pub fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let file_err = |msg: String| Error::DataFile { path: path.to_path_buf(), msg };
    let bytes = std::fs::read(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    read_rows_from_bytes(bytes, path)
}

/// Reads raw rows from the bytes of a dataset file, as [`read_rows`] reads the file at
/// `path` (whose extension picks the format, and which names the file in errors).
pub fn read_rows_from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Vec<RawRow>> {
    let file_err = |msg: String| Error::DataFile { path: path.to_path_buf(), msg };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "parquet" {
        return read_parquet(bytes::Bytes::from(bytes), path);
    }
    let text = String::from_utf8(bytes).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let rows = match ext.as_str() {
        "jsonl" => {
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                rows.push((i + 1, serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))));
            }
            rows
        }
        "json" => {
            let v: Value = serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))?;
            let list = match v {
                Value::Array(a) => a,
                Value::Object(mut o) => match o.remove("data") {
                    Some(Value::Array(a)) => a,
                    _ => return Err(file_err("expected a JSON list of rows or {\"data\": [...]}".into())),
                },
                _ => return Err(file_err("expected a JSON list of rows or {\"data\": [...]}".into())),
            };
            list.into_iter().enumerate().map(|(i, v)| (i + 1, Ok(v))).collect()
        }
        "csv" => {
            let mut r = csv::Reader::from_reader(text.as_bytes());
            let headers = r.headers().map_err(|e| file_err(format!("invalid CSV header: {e}")))?.clone();
            let mut rows = Vec::new();
            for (i, rec) in r.records().enumerate() {
                let row = rec.map_err(|e| format!("invalid CSV: {e}")).map(|rec| {
                    let obj: serde_json::Map<String, Value> =
                        headers.iter().zip(rec.iter()).map(|(h, v)| (h.to_string(), Value::String(v.to_string()))).collect();
                    Value::Object(obj)
                });
                rows.push((i + 2, row));
            }
            rows
        }
        other => return Err(file_err(format!("unsupported extension '.{other}' (expected .jsonl, .json, .csv or .parquet)"))),
    };
    if rows.is_empty() {
        return Err(file_err("the dataset is empty".into()));
    }
    Ok(rows)
}

/// The most rows a Parquet dataset may declare.
pub const MAX_PARQUET_ROWS: u64 = 100_000_000;

/// The fewest bytes a row group takes in a Parquet file (its column chunk metadata alone
/// is larger), which bounds how many row groups a footer may declare.
const MIN_ROW_GROUP_BYTES: u64 = 8;

/// Rows of a Parquet file as JSON objects (row index + 1 as the line). Nested columns
/// (a `messages` list of structs) become JSON lists and objects.
///
/// The `parquet` crate asserts on some corrupt files instead of returning an error (found
/// by furnace-fuzz: page sizes past the buffer, a dictionary page missing, negative column
/// offsets, definition levels past the schema); such a panic is contained here and
/// becomes an error naming the file.
fn read_parquet(bytes: bytes::Bytes, path: &Path) -> Result<Vec<RawRow>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_parquet_unguarded(bytes, path))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(Error::DataFile { path: path.to_path_buf(), msg: format!("not a readable Parquet file: the reader failed ({msg})") })
        }
    }
}

fn read_parquet_unguarded(bytes: bytes::Bytes, path: &Path) -> Result<Vec<RawRow>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file_err = |msg: String| Error::DataFile { path: path.to_path_buf(), msg };
    let len = bytes.len() as u64;
    let reader = SerializedFileReader::new(bytes.clone()).map_err(|e| file_err(format!("not a readable Parquet file: {e}")))?;
    // The footer's counts are the file's word: bound them before reading, since the row
    // reader trusts them (a crafted footer declaring many row groups or rows runs for hours).
    let meta = reader.metadata();
    let groups = meta.num_row_groups() as u64;
    if groups > len / MIN_ROW_GROUP_BYTES {
        return Err(file_err(format!("the footer declares {groups} row groups, more than a {len}-byte file can hold")));
    }
    let mut declared = 0u64;
    for (i, g) in meta.row_groups().iter().enumerate() {
        let n = u64::try_from(g.num_rows()).map_err(|_| file_err(format!("row group {i} declares {} rows", g.num_rows())))?;
        declared = declared.saturating_add(n);
    }
    if declared > MAX_PARQUET_ROWS {
        return Err(file_err(format!("the footer declares {declared} rows, more than the {MAX_PARQUET_ROWS} a dataset may have")));
    }
    // Page headers are trusted too: the reader allocates a page's declared size before
    // decompressing it (1.4 GiB from a 1 KiB file), so check them all against the bytes.
    parquet_pages::check_page_headers(meta, &bytes).map_err(file_err)?;
    let iter = reader.get_row_iter(None).map_err(|e| file_err(format!("cannot read rows: {e}")))?;
    let mut rows: Vec<RawRow> = Vec::new();
    for (i, row) in iter.enumerate() {
        if i as u64 >= declared {
            return Err(file_err(format!("more rows than the {declared} the footer declares")));
        }
        rows.push((i + 1, row.map(|r| r.to_json_value()).map_err(|e| format!("unreadable row: {e}"))));
    }
    if rows.is_empty() {
        return Err(file_err("the dataset is empty".into()));
    }
    Ok(rows)
}

fn text_field(row: &Value, key: &str) -> Option<String> {
    match row.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// A list of `{role, content}` messages (the value of column `col`). A list given as JSON text (a CSV or Parquet string column) counts as the list.
fn parse_messages(v: &Value, col: &str) -> RowResult<Vec<ChatMessage>> {
    let parsed;
    let v = match v {
        Value::String(s) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("'{col}' must be a list of {{role, content}}; it is a text that is not JSON ({e})"))?;
            &parsed
        }
        v => v,
    };
    let list = v.as_array().ok_or_else(|| format!("'{col}' must be a list of {{role, content}}"))?;
    let mut msgs = Vec::with_capacity(list.len());
    for m in list {
        let role = m.get("role").and_then(Value::as_str).ok_or("a message lacks 'role'")?;
        let content = m.get("content").and_then(Value::as_str).ok_or("a message lacks string 'content'")?;
        msgs.push(ChatMessage::new(role, content));
    }
    Ok(msgs)
}

/// The keys of a row, for error messages.
fn row_keys(row: &Value) -> Vec<&str> {
    row.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default()
}

/// The conversation of an SFT row (chat, prompt/completion or instruction form): everything
/// before the completion, and the completion. A prompt/completion row's prompt may be a list
/// of messages (a multi-turn conversation up to the last assistant turn).
pub fn row_messages(row: &Value, c: &Columns) -> RowResult<(Vec<ChatMessage>, String)> {
    if !row.is_object() {
        return Err("a row must be a JSON object".into());
    }
    if let Some(ms) = row.get(&c.messages).filter(|v| !v.is_null()) {
        let mut msgs = parse_messages(ms, &c.messages)?;
        let last = msgs.pop().ok_or("'messages' is empty")?;
        if last.role != "assistant" {
            return Err("the last message must be the assistant's (the completion to learn)".into());
        }
        return Ok((msgs, last.content));
    }
    let mut msgs = Vec::new();
    if let Some(s) = text_field(row, &c.system).filter(|s| !s.is_empty()) {
        msgs.push(ChatMessage::new("system", s));
    }
    if let (Some(p), Some(comp)) = (row.get(&c.prompt).filter(|v| !v.is_null()), text_field(row, &c.completion)) {
        // A text prompt (after the system column's message) or a list of messages.
        return Ok((prompt_messages(row, p, c)?, comp));
    }
    if let (Some(inp), Some(out)) = (text_field(row, &c.input), text_field(row, &c.output)) {
        let user = match text_field(row, &c.instruction).filter(|s| !s.is_empty()) {
            Some(ins) if !inp.is_empty() => format!("{ins}\n\n{inp}"),
            Some(ins) => ins,
            None => inp,
        };
        msgs.push(ChatMessage::new("user", user));
        return Ok((msgs, out));
    }
    let keys = row_keys(row);
    Err(format!(
        "missing columns: expected '{}', or '{}' + '{}', or '{}' + '{}' (the row has {keys:?})",
        c.messages, c.prompt, c.completion, c.input, c.output
    ))
}

/// Tokenizes one row into an example.
pub fn encode_row(row: &Value, tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> RowResult<(Example, bool)> {
    let (mut msgs, completion) = row_messages(row, &opts.columns)?;
    let (bos, eos) = (tok.bos_token(), tok.eos_token());
    let prompt_text = template.render(&msgs, true, bos, eos).map_err(|e| e.to_string())?;
    msgs.push(ChatMessage::new("assistant", completion));
    let full_text = template.render(&msgs, false, bos, eos).map_err(|e| e.to_string())?;
    let mut ids = tok.encode(&full_text, false).map_err(|e| e.to_string())?;
    let prompt_ids = tok.encode(&prompt_text, false).map_err(|e| e.to_string())?;
    // The prompt's tokens are a prefix of the full text's when the template renders the
    // prompt as a prefix; otherwise mask by the longest common prefix.
    let masked = ids.iter().zip(&prompt_ids).take_while(|(a, b)| a == b).count();
    if masked >= ids.len() {
        return Err("the completion is empty after formatting".into());
    }
    let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    if opts.completion_only {
        labels[..masked].iter_mut().for_each(|l| *l = IGNORE_INDEX);
    }
    let truncated = ids.len() > opts.max_seq_len;
    if truncated {
        ids.truncate(opts.max_seq_len);
        labels.truncate(opts.max_seq_len);
        // Labels are shifted by one in the loss: position 0's label is never used.
        if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            return Err(format!(
                "the prompt alone has {masked} tokens, so max_seq_len = {} leaves no completion tokens to learn from",
                opts.max_seq_len
            ));
        }
    }
    let prompt_len = masked.min(ids.len());
    Ok((Example { ids, labels, prompt_len, ..Default::default() }, truncated))
}

/// The prompt of a preference, prompt or prompt/completion row, from the value of the prompt
/// column: a text (a user message, after the system column's message if the row has one) or
/// a list of messages (also as JSON text, as CSV and Parquet string columns hold it; the
/// system column's message is put first when the list has no system message of its own).
/// A conversational prompt must not end with an assistant message.
fn prompt_messages(row: &Value, value: &Value, c: &Columns) -> RowResult<Vec<ChatMessage>> {
    let system = text_field(row, &c.system).filter(|s| !s.is_empty());
    match value {
        v if v.is_array() || v.as_str().is_some_and(looks_like_message_list) => {
            let mut msgs = parse_messages(value, &c.prompt)?;
            let last = msgs.last().ok_or_else(|| format!("the prompt '{}' is an empty list of messages", c.prompt))?;
            if last.role == "assistant" {
                return Err(format!("the prompt '{}' ends with an assistant message; it must end with the message to answer", c.prompt));
            }
            if let Some(s) = system {
                if msgs[0].role == "system" {
                    return Err(format!(
                        "the row has both a '{}' column and a system message in '{}'; give one of them",
                        c.system, c.prompt
                    ));
                }
                msgs.insert(0, ChatMessage::new("system", s));
            }
            Ok(msgs)
        }
        Value::Object(_) => Err(format!("'{}' must be a text or a list of {{role, content}}", c.prompt)),
        other => {
            let text = match other {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let mut msgs = Vec::with_capacity(2);
            if let Some(s) = system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", text));
            Ok(msgs)
        }
    }
}

/// Whether a text is a JSON list of `{role, ...}` objects (a conversational prompt written to
/// a CSV or Parquet string column), rather than a prompt to take as text.
fn looks_like_message_list(s: &str) -> bool {
    let t = s.trim_start();
    t.starts_with('[')
        && serde_json::from_str::<Value>(t)
            .is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|m| m.get("role").is_some_and(Value::is_string))))
}

/// An answer of a preference row (column `col`): a text (one assistant message) or a
/// non-empty list of assistant messages.
fn answer_messages(value: &Value, col: &str) -> RowResult<Vec<ChatMessage>> {
    match value {
        Value::Array(_) => {
            let msgs = parse_messages(value, col)?;
            if msgs.is_empty() {
                return Err(format!("'{col}' is an empty list of messages"));
            }
            if let Some(m) = msgs.iter().find(|m| m.role != "assistant") {
                return Err(format!("'{col}' must hold assistant messages only (it has a '{}' message)", m.role));
            }
            Ok(msgs)
        }
        Value::Object(_) => Err(format!("'{col}' must be a text or a list of {{role, content}}")),
        Value::String(s) => Ok(vec![ChatMessage::new("assistant", s.clone())]),
        v => Ok(vec![ChatMessage::new("assistant", v.to_string())]),
    }
}

/// A preference row as (prompt, chosen answer, rejected answer) messages.
///
/// With a prompt column, the answers are texts or lists of assistant messages. Without one,
/// `chosen` and `rejected` are whole conversations: the prompt is their longest common
/// prefix of messages, and what follows it in each must be assistant messages.
fn preference_messages(row: &Value, c: &Columns) -> RowResult<(Vec<ChatMessage>, Vec<ChatMessage>, Vec<ChatMessage>)> {
    if !row.is_object() {
        return Err("a row must be a JSON object".into());
    }
    let present = |col: &str| row.get(col).filter(|v| !v.is_null());
    let (Some(chosen), Some(rejected)) = (present(&c.chosen), present(&c.rejected)) else {
        return Err(format!(
            "missing columns: expected '{}' + '{}', with an optional '{}' (the row has {:?})",
            c.chosen,
            c.rejected,
            c.prompt,
            row_keys(row)
        ));
    };
    if let Some(prompt) = present(&c.prompt) {
        let prompt = prompt_messages(row, prompt, c)?;
        let chosen = answer_messages(chosen, &c.chosen)?;
        let rejected = answer_messages(rejected, &c.rejected)?;
        if chosen == rejected {
            return Err("chosen and rejected are the same".into());
        }
        return Ok((prompt, chosen, rejected));
    }
    // Implicit prompt: two whole conversations.
    if !chosen.is_array() || !rejected.is_array() {
        return Err(format!(
            "no '{}' column: without a prompt, '{}' and '{}' must both be conversations (lists of {{role, content}}) \
             sharing the prompt; for text answers give the prompt in a '{}' column",
            c.prompt, c.chosen, c.rejected, c.prompt
        ));
    }
    let mut chosen = parse_messages(chosen, &c.chosen)?;
    let mut rejected = parse_messages(rejected, &c.rejected)?;
    if chosen == rejected {
        return Err("chosen and rejected are the same".into());
    }
    let common = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return Err(format!(
            "'{}' and '{}' share no first message, so there is no prompt; give it in a '{}' column",
            c.chosen, c.rejected, c.prompt
        ));
    }
    let chosen_answer = chosen.split_off(common);
    let rejected_answer = rejected.split_off(common);
    for (answer, col) in [(&chosen_answer, &c.chosen), (&rejected_answer, &c.rejected)] {
        if answer.is_empty() {
            return Err(format!("'{col}' has no answer after the prompt the two conversations share"));
        }
        if let Some(m) = answer.iter().find(|m| m.role != "assistant") {
            return Err(format!(
                "after the prompt the two conversations share, '{col}' must hold assistant messages only (it has a '{}' message)",
                m.role
            ));
        }
    }
    Ok((chosen, chosen_answer, rejected_answer))
}

/// The prompt + `answer` tokenized with labels on the answer only, truncated to
/// `max_seq_len`; `which` names the answer in errors. Returns the sequence and whether it
/// was truncated.
fn encode_answer(
    prompt: &[ChatMessage],
    prompt_ids: &[u32],
    answer: &[ChatMessage],
    which: &str,
    tok: &Tokenizer,
    template: &ChatTemplate,
    max_seq_len: usize,
) -> RowResult<(Sequence, bool)> {
    let msgs: Vec<ChatMessage> = prompt.iter().chain(answer).cloned().collect();
    let full_text = template.render(&msgs, false, tok.bos_token(), tok.eos_token()).map_err(|e| e.to_string())?;
    let mut ids = tok.encode(&full_text, false).map_err(|e| e.to_string())?;
    let masked = ids.iter().zip(prompt_ids).take_while(|(a, b)| a == b).count();
    if masked >= ids.len() {
        return Err(format!("the {which} answer is empty after formatting"));
    }
    let mut labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i < masked { IGNORE_INDEX } else { t as i64 }).collect();
    let truncated = ids.len() > max_seq_len;
    if truncated {
        ids.truncate(max_seq_len);
        labels.truncate(max_seq_len);
        // Labels are shifted by one in the loss: position 0's label is never used.
        if labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            return Err(format!(
                "the {which} answer has no tokens left to learn from: the prompt alone has {masked} tokens and max_seq_len = {max_seq_len}"
            ));
        }
    }
    Ok((Sequence { ids, labels }, truncated))
}

/// Tokenizes one preference row (DPO) into an example: `ids`/`labels` are the prompt + the
/// chosen answer, `rejected` the prompt + the rejected answer, labels on the answers only
/// (always: `completion_only` does not apply). The flag says whether either was truncated.
pub fn encode_preference_row(row: &Value, tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> RowResult<(Example, bool)> {
    let (prompt, chosen, rejected) = preference_messages(row, &opts.columns)?;
    let prompt_text = template.render(&prompt, true, tok.bos_token(), tok.eos_token()).map_err(|e| e.to_string())?;
    let prompt_ids = tok.encode(&prompt_text, false).map_err(|e| e.to_string())?;
    let (c, tc) = encode_answer(&prompt, &prompt_ids, &chosen, "chosen", tok, template, opts.max_seq_len)?;
    let (r, tr) = encode_answer(&prompt, &prompt_ids, &rejected, "rejected", tok, template, opts.max_seq_len)?;
    if c == r {
        return Err("chosen and rejected are the same after formatting and truncation".into());
    }
    let ex = Example { ids: c.ids, labels: c.labels, rejected: Some(Box::new(r)), ..Default::default() };
    Ok((ex, tc || tr))
}

/// Tokenizes one prompt row (GRPO): `ids` is the prompt rendered with the generation prompt,
/// `labels` are all [`IGNORE_INDEX`], `row` the whole row (for the rewards). A prompt longer
/// than `max_seq_len` is a bad row (prompts are never truncated).
pub fn encode_prompt_row(row: &Value, tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> RowResult<Example> {
    let c = &opts.columns;
    if !row.is_object() {
        return Err("a row must be a JSON object".into());
    }
    let Some(value) = row.get(&c.prompt).filter(|v| !v.is_null()) else {
        return Err(format!("missing column: expected '{}' (the row has {:?})", c.prompt, row_keys(row)));
    };
    let msgs = prompt_messages(row, value, c)?;
    let text = template.render(&msgs, true, tok.bos_token(), tok.eos_token()).map_err(|e| e.to_string())?;
    let ids = tok.encode(&text, false).map_err(|e| e.to_string())?;
    if ids.len() > opts.max_seq_len {
        return Err(format!("the prompt has {} tokens, more than max_seq_len = {}", ids.len(), opts.max_seq_len));
    }
    let labels = vec![IGNORE_INDEX; ids.len()];
    Ok(Example { ids, labels, row: Some(std::sync::Arc::new(row.clone())), ..Default::default() })
}

/// Rows per call of a formatting function ([`format_rows`]).
pub const FORMAT_BATCH: usize = 256;

/// What a formatting function is, in its errors.
const FORMATTING: &str = "trainer.formatting";

/// Rewrites `rows` with the formatting function `name` ([`crate::hooks`]): one call per
/// batch of at most [`FORMAT_BATCH`] rows, in order, with `{"rows": [row, ...]}`; the
/// function returns `{"rows": [row, ...]}`, as many rows, each a JSON object (a row in
/// any form furnace reads). Its failure, or a result of another shape, is an error naming
/// the function.
pub fn format_rows(name: &str, rows: Vec<Value>) -> Result<Vec<Value>> {
    crate::hooks::require(name, FORMATTING)?;
    let shape = |msg: String| Error::Hook { name: name.to_string(), msg: format!("{FORMATTING}: {msg}") };
    let mut out = Vec::with_capacity(rows.len());
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let batch: Vec<Value> = rows.by_ref().take(FORMAT_BATCH).collect();
        let n = batch.len();
        let first = out.len();
        let result = crate::hooks::call(name, FORMATTING, serde_json::json!({ "rows": batch }))?;
        let got = match result {
            Value::Object(mut o) => match o.remove("rows") {
                Some(Value::Array(a)) => a,
                _ => return Err(shape("must return {\"rows\": [row, ...]}: the result has no list 'rows'".into())),
            },
            other => return Err(shape(format!("must return {{\"rows\": [row, ...]}}, not {}", json_kind(&other)))),
        };
        if got.len() != n {
            return Err(shape(format!(
                "returned {} rows for the {n} rows of rows {}..{} (one row per row, in order)",
                got.len(),
                first + 1,
                first + n
            )));
        }
        if let Some((i, r)) = got.iter().enumerate().find(|(_, r)| !r.is_object()) {
            return Err(shape(format!("row {} of its result is {}, not an object (a row)", first + i + 1, json_kind(r))));
        }
        out.extend(got);
    }
    Ok(out)
}

/// A JSON value's kind, for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The rows of `path` ([`read_rows`]), rewritten by `opts.formatting` when it names a
/// function (rows that are not JSON stay bad rows, unformatted).
fn read_formatted_rows(path: &Path, opts: &DataOptions) -> Result<Vec<RawRow>> {
    let mut rows = read_rows(path)?;
    let Some(name) = opts.formatting.as_deref() else { return Ok(rows) };
    let good: Vec<usize> = rows.iter().enumerate().filter(|(_, (_, r))| r.is_ok()).map(|(i, _)| i).collect();
    let values: Vec<Value> = good.iter().map(|&i| std::mem::replace(&mut rows[i].1, Ok(Value::Null)).unwrap_or_default()).collect();
    let formatted = format_rows(name, values).map_err(|e| match e {
        Error::Hook { name, msg } => Error::Hook { name, msg: format!("{msg} (formatting {})", path.display()) },
        e => e,
    })?;
    for (i, v) in good.into_iter().zip(formatted) {
        rows[i].1 = Ok(v);
    }
    Ok(rows)
}

/// Loads and tokenizes a dataset file; `opts.kind` says what its rows hold (SFT
/// conversations, preference pairs, or prompts). With `opts.formatting` the rows are
/// rewritten by that function first ([`format_rows`]).
pub fn load_dataset(path: &Path, tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> Result<Dataset> {
    let encode = |row: &Value| match opts.kind {
        DataKind::Sft => encode_row(row, tok, template, opts),
        DataKind::Preference => encode_preference_row(row, tok, template, opts),
        DataKind::Prompt => encode_prompt_row(row, tok, template, opts).map(|ex| (ex, false)),
    };
    let mut examples = Vec::new();
    let (mut skipped, mut truncated) = (0, 0);
    for (line, row) in read_formatted_rows(path, opts)? {
        match row.and_then(|row| encode(&row)) {
            Ok((ex, t)) => {
                truncated += t as usize;
                examples.push(ex);
            }
            Err(_) if opts.skip_bad_rows => skipped += 1,
            Err(msg) => return Err(Error::DataRow { path: path.to_path_buf(), line, msg }),
        }
    }
    if examples.is_empty() {
        return Err(Error::DataFile { path: path.to_path_buf(), msg: format!("no usable rows ({skipped} bad rows skipped)") });
    }
    Ok(Dataset { examples, skipped, truncated })
}

/// What `furnace data stats` reports of a dataset file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DataStats {
    /// Rows read (good and bad).
    pub rows: usize,
    /// Rows per form found: `chat`, `prompt_completion`, `instruction`, `preference`,
    /// `prompt`, `unknown`.
    pub forms: std::collections::BTreeMap<String, usize>,
    /// Rows that do not make an example of the asked kind: (line, why), in file order.
    pub bad: Vec<(usize, String)>,
    /// Tokens of each good example before truncation (a preference pair: chosen + rejected).
    pub lengths: Vec<usize>,
    /// Tokens that carry a loss (completions), after truncation.
    pub completion_tokens: usize,
    /// All tokens, after truncation.
    pub tokens: usize,
    /// Examples longer than `max_seq_len` (cut at the end when training).
    pub truncated: usize,
}

/// The form of a row, by the columns it has.
fn row_form(row: &Value, c: &Columns) -> &'static str {
    let has = |k: &str| row.get(k).is_some_and(|v| !v.is_null());
    if has(&c.chosen) && has(&c.rejected) {
        "preference"
    } else if has(&c.messages) {
        "chat"
    } else if has(&c.prompt) && has(&c.completion) {
        "prompt_completion"
    } else if has(&c.input) && has(&c.output) {
        "instruction"
    } else if has(&c.prompt) {
        "prompt"
    } else {
        "unknown"
    }
}

/// Reads every row of `path` as `opts.kind` asks and counts what `furnace train` would
/// see: forms, bad rows (not fatal here: each is listed with its line), token lengths
/// before truncation, completion tokens and truncated examples.
pub fn stats(path: &Path, tok: &Tokenizer, template: &ChatTemplate, opts: &DataOptions) -> Result<DataStats> {
    let mut s = DataStats::default();
    // Lengths before truncation: encode with no limit, then count what the limit cuts.
    let full = DataOptions { max_seq_len: usize::MAX, skip_bad_rows: false, ..opts.clone() };
    for (line, row) in read_formatted_rows(path, opts)? {
        s.rows += 1;
        let row = match row {
            Ok(r) => r,
            Err(msg) => {
                *s.forms.entry("unknown".into()).or_default() += 1;
                s.bad.push((line, msg));
                continue;
            }
        };
        *s.forms.entry(row_form(&row, &opts.columns).into()).or_default() += 1;
        let seqs: RowResult<Vec<(Vec<u32>, Vec<i64>)>> = match opts.kind {
            DataKind::Sft => encode_row(&row, tok, template, &full).map(|(e, _)| vec![(e.ids, e.labels)]),
            DataKind::Preference => encode_preference_row(&row, tok, template, &full).map(|(e, _)| {
                let r = e.rejected.map(|r| (r.ids, r.labels)).unwrap_or_default();
                vec![(e.ids, e.labels), r]
            }),
            DataKind::Prompt => encode_prompt_row(&row, tok, template, &full).map(|e| vec![(e.ids, e.labels)]),
        };
        let seqs = match seqs {
            Ok(v) => v,
            Err(msg) => {
                s.bad.push((line, msg));
                continue;
            }
        };
        s.lengths.push(seqs.iter().map(|(ids, _)| ids.len()).sum());
        if seqs.iter().any(|(ids, _)| ids.len() > opts.max_seq_len) {
            s.truncated += 1;
        }
        for (ids, labels) in &seqs {
            let n = ids.len().min(opts.max_seq_len);
            s.tokens += n;
            s.completion_tokens += labels[..n].iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        }
    }
    if s.rows == 0 {
        return Err(Error::DataFile { path: path.to_path_buf(), msg: "no rows".into() });
    }
    Ok(s)
}
