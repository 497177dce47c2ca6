//! `furnace conversations list|export`: the chat completions `furnace serve` logged in the
//! store (with their feedback), listed or exported as training data in the chat form
//! `furnace train` reads as it is (`{"messages": [{"role", "content"}, ...]}`, the first
//! choice's text as the last, assistant, message).

use crate::args::{existing_store, RunsDir};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use furnace_exp::{ConversationFilter, ConversationRow};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ConversationsCmd {
    /// List logged conversations, newest first: id, time, model, rating, tokens, the last
    /// user message.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print the rows as JSON (everything stored, feedback included).
        #[arg(long)]
        json: bool,
    },
    /// Write logged conversations as a training file (oldest first), atomically.
    Export {
        /// The file's form: chat-jsonl, one {"messages": [...]} row per conversation, which
        /// `furnace train` takes as [data] train.
        #[arg(long, value_enum, default_value = "chat-jsonl")]
        format: ExportFormat,
        /// The file to write (replaced whole, never left half-written).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// The forms `export` writes.
#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// JSON lines `{"messages": [{"role", "content"}, ...]}`.
    ChatJsonl,
}

/// Which conversations.
#[derive(Args)]
pub struct FilterArgs {
    /// Only those rated at least N (1 worst .. 5 best); unrated ones are left out.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..=5))]
    min_rating: Option<i64>,
    /// Only those logged on or after this day (UTC), YYYY-MM-DD.
    #[arg(long, value_name = "YYYY-MM-DD", value_parser = parse_day)]
    since: Option<i64>,
    /// Only those whose request named this model (the base's name or an adapter's).
    #[arg(long, value_name = "NAME")]
    model: Option<String>,
    /// At most N (the newest).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

impl FilterArgs {
    fn filter(&self) -> ConversationFilter {
        ConversationFilter { min_rating: self.min_rating, since: self.since, model: self.model.clone(), limit: self.limit }
    }
}

#[derive(Args)]
pub struct ConversationsArgs {
    #[command(subcommand)]
    cmd: ConversationsCmd,
    #[command(flatten)]
    dir: RunsDir,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The date of a day number (the inverse of [`days_from_civil`]).
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD` as the Unix seconds of its midnight, UTC.
fn parse_day(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("'{s}' is not a date like 2026-01-31 (YYYY-MM-DD)");
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [y, m, d] = parts.as_slice() else { return Err(bad()) };
    let (y, m, d): (i64, i64, i64) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, d.parse().map_err(|_| bad())?);
    if y.to_string().len() != 4 || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return Err(format!("'{s}' is not a day of the calendar"));
    }
    Ok(days * 86400)
}

/// Unix seconds as `YYYY-MM-DD HH:MM` UTC.
fn when(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", s / 3600, s % 3600 / 60)
}

/// The last user message of a conversation, on one line, cut to `max` characters.
fn last_user(row: &ConversationRow, max: usize) -> String {
    let text = row
        .record
        .messages
        .as_array()
        .and_then(|ms| ms.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &one_line[..i]),
        None => one_line,
    }
}

pub fn run(a: ConversationsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    match a.cmd {
        ConversationsCmd::List { filter, json } => {
            let rows = store.conversations(&filter.filter())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                eprintln!("no conversations match (furnace serve logs each chat completion unless --no-log)");
                return Ok(());
            }
            println!(
                "{:<33}  {:<16}  {:<20}  {:>6}  {:>6}  {:>6}  last user message",
                "id", "created (UTC)", "model", "rating", "prompt", "output"
            );
            for r in &rows {
                println!(
                    "{:<33}  {:<16}  {:<20}  {:>6}  {:>6}  {:>6}  {}",
                    r.record.id,
                    when(r.record.created),
                    r.record.model,
                    r.rating.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                    r.record.prompt_tokens,
                    r.record.completion_tokens,
                    last_user(r, 60)
                );
            }
            Ok(())
        }
        ConversationsCmd::Export { format: ExportFormat::ChatJsonl, out, filter } => {
            let mut rows = store.conversations(&filter.filter())?;
            rows.reverse();
            let mut text = String::new();
            let (mut written, mut skipped) = (0usize, Vec::new());
            for r in &rows {
                match r.training_row() {
                    Some(line) => {
                        text += &serde_json::to_string(&line)?;
                        text.push('\n');
                        written += 1;
                    }
                    None => skipped.push(r.record.id.as_str()),
                }
            }
            write_atomically(&out, text.as_bytes())?;
            eprintln!("wrote {written} conversation{} to {}", if written == 1 { "" } else { "s" }, out.display());
            if !skipped.is_empty() {
                eprintln!(
                    "left out {} with no text answer (a tool call only) or a message without string content: {}",
                    skipped.len(),
                    skipped.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// Writes `out` whole or not at all: a temporary file beside it, synced, renamed over it.
fn write_atomically(out: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if out.is_dir() {
        bail!("--out {} is a folder; give a file", out.display());
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".furnace-export-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(out).map_err(|e| e.error).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_parse_and_print_back() {
        assert_eq!(parse_day("1970-01-01"), Ok(0));
        assert_eq!(parse_day("2023-11-14"), Ok(1_699_920_000));
        assert_eq!(when(1_699_920_000 + 3600 + 120), "2023-11-14 01:02");
        assert_eq!(parse_day("2024-02-29").map(when).as_deref(), Ok("2024-02-29 00:00"));
        assert!(parse_day("2023-02-29").is_err());
        assert!(parse_day("2023-13-01").is_err());
        assert!(parse_day("23-1-1").is_err());
        assert!(parse_day("yesterday").is_err());
    }
}
