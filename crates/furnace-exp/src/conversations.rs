//! Conversations become training data: the chat completions `furnace serve` answered,
//! logged in the store with the feedback clients give them, read back filtered
//! (`furnace conversations list` / `export`).
//!
//! One row per completion id (`chatcmpl-...`) in the table `conversations`:
//!
//! | column | what |
//! |---|---|
//! | `id` | the completion id (unique: logging the same id again changes nothing) |
//! | `created` | Unix seconds |
//! | `model` | the `model` of the request, as requested (the base's name or an adapter's) |
//! | `adapter` | the adapter that answered, `NULL` for the base |
//! | `messages` | the request's messages as a JSON array, after the server's normalization (`content` a string) |
//! | `response` | a JSON array, one `{"text": ..., "tool_calls": [...]}` per choice (`tool_calls` only when present) |
//! | `rag_sources` | JSON (what retrieval added to the prompt), `NULL` when none |
//! | `prompt_tokens`, `completion_tokens`, `latency_ms` | usage and time to the finished answer |
//! | `rating`, `comment`, `feedback_time` | the latest feedback ([`Store::add_feedback`]), `NULL` before any |
//!
//! A rating is an integer from [`RATING_MIN`] (1, worst) to [`RATING_MAX`] (5, best): five
//! stars; a thumbs-up/down client sends 5 and 1. Feedback given again replaces the previous.
//!
//! The table is created on open when missing, so an older store gains it and keeps
//! everything else. Each write is one `BEGIN IMMEDIATE` transaction between the crash points
//! `store.log_conversation.before_commit` / `.after_commit` and
//! `store.add_feedback.before_commit` / `.after_commit`.

use crate::error::{Error, Result};
use crate::store::{commit, now, Store};
use rusqlite::{params, types::Value as SqlValue, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conversations(
    id TEXT PRIMARY KEY NOT NULL, created INTEGER NOT NULL, model TEXT NOT NULL, adapter TEXT,
    messages TEXT NOT NULL, response TEXT NOT NULL, rag_sources TEXT,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, latency_ms INTEGER NOT NULL,
    rating INTEGER, comment TEXT, feedback_time REAL);
CREATE INDEX IF NOT EXISTS conversations_created ON conversations(created);
";

/// The lowest rating (worst).
pub const RATING_MIN: i64 = 1;
/// The highest rating (best).
pub const RATING_MAX: i64 = 5;

/// One choice of a logged completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChoiceRecord {
    /// The generated text.
    pub text: String,
    /// The tool calls of the choice (OpenAI's `tool_calls` list), when it made any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

/// A finished chat completion to log ([`Store::log_conversation`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// The completion id (`chatcmpl-...`).
    pub id: String,
    /// When it was created (Unix seconds).
    pub created: i64,
    /// The `model` of the request, as requested.
    pub model: String,
    /// The adapter that answered (`None`: the base).
    pub adapter: Option<String>,
    /// The request's messages (a JSON array), as normalized by the server.
    pub messages: serde_json::Value,
    /// The choices, in order.
    pub response: Vec<ChoiceRecord>,
    /// What retrieval added to the prompt, if anything.
    pub rag_sources: Option<serde_json::Value>,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Generated tokens (all choices).
    pub completion_tokens: i64,
    /// Milliseconds from the request to its finished answer.
    pub latency_ms: i64,
}

/// A logged conversation with its feedback.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConversationRow {
    /// What was logged.
    #[serde(flatten)]
    pub record: ConversationRecord,
    /// The latest rating ([`RATING_MIN`]..=[`RATING_MAX`]), if any.
    pub rating: Option<i64>,
    /// The latest feedback's comment, if any.
    pub comment: Option<String>,
    /// When the latest feedback was given (Unix seconds).
    pub feedback_time: Option<f64>,
}

/// Which conversations [`Store::conversations`] returns; every field narrows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConversationFilter {
    /// Only those rated at least this (unrated ones are left out).
    pub min_rating: Option<i64>,
    /// Only those created at or after this (Unix seconds).
    pub since: Option<i64>,
    /// Only those whose requested `model` is this.
    pub model: Option<String>,
    /// At most this many (the newest).
    pub limit: Option<usize>,
}

const COLS: &str = "id, created, model, adapter, messages, response, rag_sources, prompt_tokens, completion_tokens, latency_ms, \
                    rating, comment, feedback_time";

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| Error::Encode { what, source })
}

fn decode<T: for<'de> Deserialize<'de>>(id: &str, what: &str, s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, format!("conversation {id}: stored {what}: {e}").into())
    })
}

fn row(r: &Row) -> rusqlite::Result<ConversationRow> {
    let id: String = r.get(0)?;
    let messages: String = r.get(4)?;
    let response: String = r.get(5)?;
    let rag: Option<String> = r.get(6)?;
    Ok(ConversationRow {
        record: ConversationRecord {
            created: r.get(1)?,
            model: r.get(2)?,
            adapter: r.get(3)?,
            messages: decode(&id, "messages", &messages)?,
            response: decode(&id, "response", &response)?,
            rag_sources: rag.map(|s| decode(&id, "rag_sources", &s)).transpose()?,
            prompt_tokens: r.get(7)?,
            completion_tokens: r.get(8)?,
            latency_ms: r.get(9)?,
            id,
        },
        rating: r.get(10)?,
        comment: r.get(11)?,
        feedback_time: r.get(12)?,
    })
}

impl Store {
    /// Logs a finished completion in one `IMMEDIATE` transaction. Idempotent on the id:
    /// logging an id that is already there changes nothing (its feedback stays).
    pub fn log_conversation(&self, c: &ConversationRecord) -> Result<()> {
        if !c.messages.is_array() {
            return Err(Error::Invalid(format!("conversation {}: messages must be a JSON array", c.id)));
        }
        let messages = encode("a conversation's messages", &c.messages)?;
        let response = encode("a conversation's response", &c.response)?;
        let rag = c.rag_sources.as_ref().map(|r| encode("a conversation's rag sources", r)).transpose()?;
        let tx = self.write_tx()?;
        tx.execute(
            "INSERT INTO conversations(id, created, model, adapter, messages, response, rag_sources, prompt_tokens, completion_tokens, \
             latency_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT(id) DO NOTHING",
            params![c.id, c.created, c.model, c.adapter, messages, response, rag, c.prompt_tokens, c.completion_tokens, c.latency_ms],
        )?;
        commit(tx, "log_conversation")
    }

    /// Records feedback on a logged conversation (replacing any earlier): a rating from
    /// [`RATING_MIN`] to [`RATING_MAX`] ([`Error::Invalid`] otherwise) and an optional
    /// comment. [`Error::ConversationNotFound`] when no conversation has this id.
    pub fn add_feedback(&self, id: &str, rating: i64, comment: Option<&str>) -> Result<()> {
        if !(RATING_MIN..=RATING_MAX).contains(&rating) {
            return Err(Error::Invalid(format!(
                "rating must be an integer from {RATING_MIN} (worst) to {RATING_MAX} (best), not {rating}"
            )));
        }
        let tx = self.write_tx()?;
        let n = tx.execute(
            "UPDATE conversations SET rating = ?2, comment = ?3, feedback_time = ?4 WHERE id = ?1",
            params![id, rating, comment, now()],
        )?;
        if n == 0 {
            return Err(Error::ConversationNotFound { id: id.to_string() });
        }
        commit(tx, "add_feedback")
    }

    /// One logged conversation.
    pub fn conversation(&self, id: &str) -> Result<ConversationRow> {
        self.conn
            .query_row(&format!("SELECT {COLS} FROM conversations WHERE id = ?1"), [id], row)
            .optional()?
            .ok_or_else(|| Error::ConversationNotFound { id: id.to_string() })
    }

    /// The logged conversations the filter lets through, newest first (then by id).
    pub fn conversations(&self, f: &ConversationFilter) -> Result<Vec<ConversationRow>> {
        let mut conds = Vec::new();
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(r) = f.min_rating {
            args.push(SqlValue::Integer(r));
            conds.push(format!("rating >= ?{}", args.len()));
        }
        if let Some(s) = f.since {
            args.push(SqlValue::Integer(s));
            conds.push(format!("created >= ?{}", args.len()));
        }
        if let Some(m) = &f.model {
            args.push(SqlValue::Text(m.clone()));
            conds.push(format!("model = ?{}", args.len()));
        }
        let mut sql = format!("SELECT {COLS} FROM conversations");
        if !conds.is_empty() {
            sql += &format!(" WHERE {}", conds.join(" AND "));
        }
        sql += " ORDER BY created DESC, id DESC";
        if let Some(l) = f.limit {
            args.push(SqlValue::Integer(i64::try_from(l).unwrap_or(i64::MAX)));
            sql += &format!(" LIMIT ?{}", args.len());
        }
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map(rusqlite::params_from_iter(args), row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

impl ConversationRow {
    /// The conversation as a training row in the chat form `furnace train` reads
    /// (`{"messages": [{"role", "content"}, ...]}`): the request's messages (role and
    /// string content only) and the first choice's text as the assistant's last message.
    /// `None` when the first choice has no text (a tool call only) or a message has no
    /// string role or content: nothing to learn from it as it is.
    pub fn training_row(&self) -> Option<serde_json::Value> {
        let answer = self.record.response.first().map(|c| c.text.as_str()).filter(|t| !t.trim().is_empty())?;
        let mut out = Vec::new();
        for m in self.record.messages.as_array()? {
            let role = m.get("role")?.as_str()?;
            let content = m.get("content")?.as_str()?;
            out.push(serde_json::json!({"role": role, "content": content}));
        }
        out.push(serde_json::json!({"role": "assistant", "content": answer}));
        Some(serde_json::json!({"messages": out}))
    }
}
