//! Chat templates: [`ChatTemplate`] renders a conversation into the model's prompt format.
//!
//! Templates are Jinja2, and are rendered the way Hugging Face `transformers` renders
//! them (`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with loop
//! controls): the same whitespace handling, lenient undefined values, the
//! `raise_exception`, `strftime_now` and Python-`json.dumps` `tojson` helpers, and
//! Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::ValueKind;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::read_optional_json;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `"system"`, `"user"`, `"assistant"`, `"tool"`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The name the template is stored under in its environment (no file extension,
/// so no auto-escaping, like Hugging Face's environment).
const TEMPLATE_NAME: &str = "chat_template";

/// The instruction budget of one render: far beyond any real chat template over a long
/// conversation (a few thousand instructions per message), small enough that a template
/// that loops forever fails within a fraction of a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// The longest prompt a render may produce: far beyond any context window (a million
/// tokens is about 4 MiB of text), small enough that a template printing in a loop fails
/// instead of exhausting memory (the instruction budget does not bound what one
/// instruction prints).
pub const MAX_RENDER_BYTES: usize = 64 << 20;

/// A render's output, refusing to grow past [`MAX_RENDER_BYTES`].
struct BoundedOutput {
    bytes: Vec<u8>,
    full: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDER_BYTES {
            self.full = true;
            return Err(std::io::Error::other("the rendered prompt is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template. Cheap to clone and `Send + Sync`.
#[derive(Clone)]
pub struct ChatTemplate {
    inner: Arc<Inner>,
}

struct Inner {
    env: Environment<'static>,
    source: String,
    /// Names the template to render workers ([`crate::sandbox`]).
    id: u64,
}

/// The id of the next compiled template.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The error source that marks a failure as a `raise_exception` call.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    /// Compiles a Jinja chat template. A syntax error gives [`Error::Template`] with
    /// the template engine's message (including the line).
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        // A crafted template (`range(10**9)`, loops in loops, deep recursion) runs out of
        // fuel and fails instead of running for hours.
        env.set_fuel(Some(TEMPLATE_FUEL));
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| Error::Template(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Print booleans, none and floats the way Python does (`True`, `None`, `1e+20`).
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(minijinja::Error::from),
            ValueKind::None => out.write_str("None").map_err(minijinja::Error::from),
            ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
                Ok(f) => out.write_str(&crate::pyjson::python_float_repr(f)).map_err(minijinja::Error::from),
                Err(_) => minijinja::escape_formatter(out, state, value),
            },
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_function("raise_exception", |message: Value| {
            let message = match message.as_str() {
                Some(s) => s.to_string(),
                None => message.to_string(),
            };
            Err::<Value, _>(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
        });
        env.add_function("strftime_now", |format: &str| crate::strftime::strftime_now(format));
        env.add_filter("tojson", crate::pyjson::tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| Error::Template(describe(&e)))?;
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(ChatTemplate { inner: Arc::new(Inner { env, source: source.to_string(), id }) })
    }

    /// The chat template of a Hugging Face model directory: `chat_template.jinja`,
    /// else `tokenizer_config.json`'s `"chat_template"` (a string, or a list of
    /// `{name, template}` from which `"default"` is taken), else `chat_template.json`.
    /// `Ok(None)` when the directory has none.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(&source).map(Some);
        }
        for file in ["tokenizer_config.json", "chat_template.json"] {
            let Some(config) = read_optional_json(&dir.join(file))? else {
                continue;
            };
            if let Some(source) = config.get("chat_template").and_then(select_template) {
                return Self::new(source).map(Some);
            }
        }
        Ok(None)
    }

    /// Renders a conversation with the standard context keys `messages`,
    /// `add_generation_prompt`, `bos_token` and `eos_token` (the token keys are left
    /// undefined when `None`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String> {
        let messages: Vec<serde_json::Value> = messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
        let mut context = serde_json::Map::new();
        context.insert("messages".to_string(), serde_json::Value::from(messages));
        context.insert("add_generation_prompt".to_string(), serde_json::Value::from(add_generation_prompt));
        if let Some(bos) = bos_token {
            context.insert("bos_token".to_string(), serde_json::Value::from(bos));
        }
        if let Some(eos) = eos_token {
            context.insert("eos_token".to_string(), serde_json::Value::from(eos));
        }
        self.render_value(serde_json::Value::Object(context))
    }

    /// Renders with an arbitrary JSON object as the context (`messages` with
    /// structured content, `tools`, `documents`, extra keyword arguments, ...).
    /// Object key order is kept, so `tojson` writes keys as given.
    pub fn render_value(&self, context: serde_json::Value) -> Result<String> {
        if !context.is_object() {
            return Err(Error::Template("the template context must be a JSON object".to_string()));
        }
        if crate::sandbox::installed() {
            return crate::sandbox::render(self.inner.id, &self.inner.source, &context);
        }
        self.render_in_process(&context)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Renders in this process, whether or not a [`crate::sandbox`] is installed.
    pub(crate) fn render_in_process(&self, context: &serde_json::Value) -> Result<String> {
        let context = json_to_value(context);
        let template = self.inner.env.get_template(TEMPLATE_NAME).map_err(|e| Error::Template(describe(&e)))?;
        let mut out = BoundedOutput { bytes: Vec::new(), full: false };
        let result = template.render_captured_to(context, &mut out).map(drop);
        if out.full {
            return Err(Error::Template(format!(
                "the rendered prompt is over {} MiB: the template loops without bound or the conversation is too long",
                MAX_RENDER_BYTES >> 20
            )));
        }
        result.map_err(|e| match raised_message(&e) {
            Some(message) => Error::TemplateRaised(message),
            None => Error::Template(describe(&e)),
        })?;
        String::from_utf8(out.bytes).map_err(|e| Error::Template(format!("the rendered prompt is not UTF-8: {e}")))
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.inner.source).finish_non_exhaustive()
    }
}

/// Picks the template from `chat_template`: a string, or a list of `{name, template}`
/// where `"default"` wins (else the first entry).
fn select_template(value: &serde_json::Value) -> Option<&str> {
    match value {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(entries) => entries
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| entries.first())
            .and_then(|entry| entry.get("template"))
            .and_then(serde_json::Value::as_str),
        _ => None,
    }
}

/// The message of a `raise_exception` call somewhere in the error's chain.
fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<Raised>() {
            return Some(raised.0.clone());
        }
        source = err.source();
    }
    None
}

/// The error's message followed by its causes.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// Converts JSON into a template value, keeping object key order.
pub fn json_to_value(json: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                n.as_f64().map(Value::from).unwrap_or(Value::from(()))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => items.iter().map(json_to_value).collect(),
        J::Object(map) => Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v)))),
    }
}
