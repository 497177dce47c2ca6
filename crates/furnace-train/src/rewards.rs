//! Reward functions of GRPO training: the `[[reward]]` tables of a spec.
//!
//! Each table names a `kind`, an optional `name` (logged as `rewards/<name>/mean`; default:
//! the kind, made unique by [`Rewards::compile`] as `numeric`, `numeric_2`, ...; letters,
//! digits, `_`, `-` and `.` only) and a `weight` (default 1.0, TRL's `reward_weights`).
//! [`Rewards::score`] gives one number per reward and completion; `NaN` means "does not
//! apply to this item" (TRL's `None`).
//!
//! # Kinds
//!
//! * `regex`: fields `pattern` (required), `full` (default false), `value` (default 1.0).
//!   Reward = `value` when `pattern` (Rust `regex` syntax) matches somewhere in the
//!   completion (with `full = true`: matches the whole completion, `\A(?:pattern)\z`),
//!   else 0.
//! * `xml_format`: fields `strict` (default false), `value` (default 0.5), `tags` (default
//!   `["reasoning", "answer"]`). The format rewards of the GSM8K GRPO tutorial. With
//!   `strict = true`: `value` when the completion matches Python's
//!   `re.match(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", text)`,
//!   else 0; with `strict = false`: `value` when
//!   `re.match(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", text)` matches (at
//!   the start only; the rest may be anything), else 0. As in Python, `.` does not match a
//!   newline (so the soft form needs each tag pair's content on one line), and `$` matches
//!   at the end or before a final newline. `tags` renames the two tags.
//! * `xml_count`: field `tags`. The tutorial's `count_xml`, with `<r>`/`<a>` the two tags,
//!   counts of non-overlapping occurrences and lengths in characters:
//!   `+0.125` if `count("<r>\n") == 1`; `+0.125` if `count("\n</r>\n") == 1`;
//!   `+0.125 - 0.001 * len(text.split("\n</a>\n")[-1])` if `count("\n<a>\n") == 1`;
//!   `+0.125 - 0.001 * (len(text.split("\n</a>")[-1]) - 1)` if `count("\n</a>") == 1`.
//!   (The maximum, 0.5, is a completion that ends right after `\n</a>\n`.)
//! * `exact`: fields `column` (required), `extract` (default `answer_tag`),
//!   `case_sensitive` (default false), `value` (default 1.0). Reward = `value` when the
//!   extracted answer, trimmed, equals the row's `column` (a string, a number as JSON
//!   writes it, or a bool), trimmed (compared lowercased unless `case_sensitive`), else 0.
//!   `NaN` when the row lacks the column or it is `null`.
//! * `numeric`: fields `column` (required), `extract` (default `answer_tag`), `tolerance`
//!   (default 1e-6), `value` (default 1.0). Reward = `value` when the extracted answer is a
//!   number `x` and `|x - y| <= tolerance`, with `y` the column's number (a JSON number or a
//!   numeric string), else 0. `NaN` when the column is missing or `null`. Numbers: an
//!   optional sign, an optional `$`, digits with optional `,` thousands separators
//!   (`1,234,567`), optional decimals, an optional exponent and an optional trailing `.`
//!   (`-$1,234.50`, `72.`, `1e3`).
//! * `integer`: fields `extract` (default `answer_tag`), `value` (default 0.5, the
//!   tutorial's `int_reward_func`). Reward = `value` when the extracted answer is one or
//!   more ASCII digits and nothing else, else 0.
//! * `json`: fields `extract` (default `none`), `object` (default false), `value` (default
//!   1.0). Reward = `value` when the extracted answer parses as JSON (with `object = true`:
//!   a JSON object), else 0.
//! * `json_schema`: fields `schema` (required), `extract` (default `none`), `value`
//!   (default 1.0). Reward = `value` when the extracted answer parses as JSON and is valid
//!   against `schema`, else 0. `schema` is an inline TOML table (converted to JSON) or a
//!   path to a `.json` file (relative to the spec's folder). Supported keywords: `type`
//!   (a name or a list of names; `integer` is a number without a fractional part),
//!   `properties`, `required`, `additionalProperties` (true/false only), `items` (one
//!   schema), `enum`, `const`, `minimum`, `maximum`, `minLength`, `maxLength` (in
//!   characters), `minItems`, `maxItems`, `pattern` (a regex searched in the string), and
//!   the annotations `$schema`, `$id`, `$comment`, `title`, `description`, `default`,
//!   `examples` (no effect on validation). `true`/`false` are schemas too. Any other
//!   keyword is an error at compile time, never ignored.
//! * `length`: fields `max_length` or `target_length` (exactly one), `penalty` (default
//!   1.0). With `len` the completion's length in tokens: `max_length = N` gives 0 when
//!   `len <= N`, else `-penalty * (len - N) / N`; `target_length = T` gives
//!   `-penalty * |len - T| / T`.
//! * `command`: fields `program` (required: argv, e.g. `["python3", "score.py"]`; its first
//!   element is resolved against the spec's folder when it is relative and holds a `/`),
//!   `timeout_s` (default 60). The program runs once per [`Rewards::score`] call; its stdin
//!   gets one JSON object per line and item, `{"prompt": ..., "completion": ..., "row":
//!   {...}}`, and it must print exactly one line per item, in order: a number, or `null`
//!   (`NaN`). It is killed after `timeout_s`; a non-zero exit, a wrong number of lines or a
//!   line that is not a number is an error.
//! * `function`: field `function` (required: a user function, `"python:NAME"`, that the
//!   host program registered, [`crate::hooks`]). Called once per [`Rewards::score_at`]
//!   call with `{"prompts": [text...], "completions": [text...], "completion_ids":
//!   [[id...]...], "columns": {"col": [value...], ...}, "step": n}` (one entry per
//!   completion; `columns` holds every column of the rows except `prompt`, `null` where a
//!   row lacks it); it returns a list of numbers (or `null`, `NaN`: no score), one per
//!   completion, in order. Its
//!   failure (the traceback), a missing function, or a result of another shape is an error
//!   naming the function.
//!
//! # Extraction
//!
//! `extract` of `exact`, `numeric`, `integer`, `json` and `json_schema`:
//! * `answer_tag`: the tutorial's `extract_xml_answer`,
//!   `text.split("<answer>")[-1].split("</answer>")[0].strip()`: the text after the last
//!   `<answer>` up to the next `</answer>`, trimmed (the whole completion, trimmed, when it
//!   has no `<answer>`).
//! * `last_number`: the last number in the completion (`-?\$?\d+(,\d{3})*(\.\d+)?`).
//! * `none`: the whole completion, trimmed.
//! * `regex:<pattern>`: the first capture group of the first match (the whole match when
//!   the pattern has no group), trimmed.
//!
//! When `last_number` or `regex:` finds nothing, the reward is 0.

use crate::data::json_kind;
use crate::error::{Error, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The reward kinds, as `kind = "..."` names them.
pub const KINDS: [&str; 11] =
    ["regex", "xml_format", "xml_count", "exact", "numeric", "integer", "json", "json_schema", "length", "command", "function"];

fn default_weight() -> f64 {
    1.0
}

/// One `[[reward]]` table of a GRPO spec. See the [module docs](self) for what each kind
/// does and which fields it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// The kind: one of [`KINDS`].
    pub kind: String,
    /// Logged as `rewards/<name>/mean`; default: the kind (made unique).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Weight of this reward in the total (TRL's `reward_weights`), default 1.0.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The reward when the check passes (`regex`, `xml_format`, `exact`, `numeric`,
    /// `integer`, `json`, `json_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `regex`: the pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `regex`: the whole completion must match (default false: a search).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<bool>,
    /// `xml_format`: the strict form (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    /// `xml_format`, `xml_count`: the two tag names (default `["reasoning", "answer"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// `exact`, `numeric`: the dataset column holding the reference answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// `exact`, `numeric`, `integer`, `json`, `json_schema`: how the answer is taken from
    /// the completion: `answer_tag`, `last_number`, `none` or `regex:<pattern>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<String>,
    /// `exact`: compare case-sensitively (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_sensitive: Option<bool>,
    /// `numeric`: the largest absolute difference that still counts as equal (default 1e-6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// `json`: the answer must be a JSON object (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<bool>,
    /// `json_schema`: an inline schema (a table) or the path of a `.json` schema file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// `length`: completions longer than this many tokens are penalized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// `length`: completions are penalized by their distance to this many tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_length: Option<usize>,
    /// `length`: the scale of the penalty (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalty: Option<f64>,
    /// `command`: the program and its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<Vec<String>>,
    /// `command`: seconds before the program is killed (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// `function`: the user function (`"python:NAME"`, [`crate::hooks`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
}

impl RewardSpec {
    /// Checks the table; `key` is its place, e.g. `reward[0]` (errors name
    /// `reward[0].pattern`). A schema file or program path is checked by
    /// [`Rewards::compile`], which knows the spec's folder.
    pub fn validate(&self, key: &str) -> Result<()> {
        self.build(key, None).map(|_| ())
    }

    /// The optional fields and whether each is set.
    fn fields(&self) -> [(&'static str, bool); 17] {
        [
            ("value", self.value.is_some()),
            ("pattern", self.pattern.is_some()),
            ("full", self.full.is_some()),
            ("strict", self.strict.is_some()),
            ("tags", self.tags.is_some()),
            ("column", self.column.is_some()),
            ("extract", self.extract.is_some()),
            ("case_sensitive", self.case_sensitive.is_some()),
            ("tolerance", self.tolerance.is_some()),
            ("object", self.object.is_some()),
            ("schema", self.schema.is_some()),
            ("max_length", self.max_length.is_some()),
            ("target_length", self.target_length.is_some()),
            ("penalty", self.penalty.is_some()),
            ("program", self.program.is_some()),
            ("timeout_s", self.timeout_s.is_some()),
            ("function", self.function.is_some()),
        ]
    }

    /// Checks and compiles the table; `base_dir` `None` skips what needs the spec's folder.
    fn build(&self, key: &str, base_dir: Option<&Path>) -> Result<Kind> {
        let k = |field: &str| format!("{key}.{field}");
        let used: &[&str] = match self.kind.as_str() {
            "regex" => &["pattern", "full", "value"],
            "xml_format" => &["strict", "value", "tags"],
            "xml_count" => &["tags"],
            "exact" => &["column", "extract", "case_sensitive", "value"],
            "numeric" => &["column", "extract", "tolerance", "value"],
            "integer" => &["extract", "value"],
            "json" => &["extract", "object", "value"],
            "json_schema" => &["schema", "extract", "value"],
            "length" => &["max_length", "target_length", "penalty"],
            "command" => &["program", "timeout_s"],
            "function" => &["function"],
            other => return Err(invalid(&k("kind"), format!("unknown kind {other:?}; one of: {}", KINDS.join(", ")))),
        };
        for (field, set) in self.fields() {
            if set && !used.contains(&field) {
                return Err(invalid(&k(field), format!("not used by kind = {:?} (it takes: {})", self.kind, used.join(", "))));
            }
        }
        if !self.weight.is_finite() {
            return Err(invalid(&k("weight"), "must be a finite number"));
        }
        if let Some(name) = &self.name {
            check_name(name).map_err(|msg| invalid(&k("name"), msg))?;
        }
        let value = |default: f64| -> Result<f64> {
            match self.value {
                Some(v) if !v.is_finite() => Err(invalid(&k("value"), "must be a finite number")),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let extract = |default: Extract| -> Result<Extract> {
            match &self.extract {
                None => Ok(default),
                Some(s) => Extract::parse(s).map_err(|msg| invalid(&k("extract"), msg)),
            }
        };
        let column = || -> Result<String> {
            match &self.column {
                None => Err(invalid(&k("column"), format!("required by kind = {:?}: the dataset column with the answer", self.kind))),
                Some(c) if c.is_empty() => Err(invalid(&k("column"), "must not be empty")),
                Some(c) => Ok(c.clone()),
            }
        };
        Ok(match self.kind.as_str() {
            "regex" => {
                let Some(pattern) = &self.pattern else {
                    return Err(invalid(&k("pattern"), "required by kind = \"regex\""));
                };
                let full = self.full.unwrap_or(false);
                let source = if full { format!(r"\A(?:{pattern})\z") } else { pattern.clone() };
                let re = Regex::new(&source).map_err(|e| invalid(&k("pattern"), format!("invalid regex {pattern:?}: {e}")))?;
                Kind::Regex { re, value: value(1.0)? }
            }
            "xml_format" => {
                let (r, a) = self.tags(key)?;
                let (r, a) = (regex::escape(&r), regex::escape(&a));
                // Python's `$` without MULTILINE: the end, or before a final newline.
                let source = if self.strict.unwrap_or(false) {
                    format!(r"\A<{r}>\n.*?\n</{r}>\n<{a}>\n.*?\n</{a}>\n\n?\z")
                } else {
                    format!(r"\A<{r}>.*?</{r}>\s*<{a}>.*?</{a}>")
                };
                let re = Regex::new(&source).map_err(|e| invalid(&k("tags"), format!("bad tags: {e}")))?;
                Kind::XmlFormat { re, value: value(0.5)? }
            }
            "xml_count" => {
                let (r, a) = self.tags(key)?;
                Kind::XmlCount {
                    open_r: format!("<{r}>\n"),
                    close_r: format!("\n</{r}>\n"),
                    open_a: format!("\n<{a}>\n"),
                    close_a: format!("\n</{a}>"),
                }
            }
            "exact" => Kind::Exact {
                column: column()?,
                extract: extract(Extract::AnswerTag)?,
                case_sensitive: self.case_sensitive.unwrap_or(false),
                value: value(1.0)?,
            },
            "numeric" => {
                let tolerance = self.tolerance.unwrap_or(1e-6);
                if !tolerance.is_finite() || tolerance < 0.0 {
                    return Err(invalid(&k("tolerance"), "must be a finite number >= 0"));
                }
                Kind::Numeric { column: column()?, extract: extract(Extract::AnswerTag)?, tolerance, value: value(1.0)? }
            }
            "integer" => Kind::Integer { extract: extract(Extract::AnswerTag)?, value: value(0.5)? },
            "json" => Kind::Json { extract: extract(Extract::Whole)?, object: self.object.unwrap_or(false), value: value(1.0)? },
            "json_schema" => {
                let Some(schema) = &self.schema else {
                    return Err(invalid(&k("schema"), "required by kind = \"json_schema\": an inline table or a .json file"));
                };
                let schema = match schema {
                    Value::String(path) => {
                        // Without the spec's folder (validate) the file is checked later.
                        let Some(base) = base_dir else {
                            return Ok(Kind::JsonSchema { schema: Box::default(), extract: extract(Extract::Whole)?, value: value(1.0)? });
                        };
                        let path = base.join(path);
                        let text = std::fs::read_to_string(&path)
                            .map_err(|e| invalid(&k("schema"), format!("cannot read schema file {}: {e}", path.display())))?;
                        let json: Value = serde_json::from_str(&text)
                            .map_err(|e| invalid(&k("schema"), format!("schema file {} is not valid JSON: {e}", path.display())))?;
                        Schema::compile(&json, "").map_err(|msg| invalid(&k("schema"), format!("{}: {msg}", path.display())))?
                    }
                    Value::Object(_) | Value::Bool(_) => Schema::compile(schema, "").map_err(|msg| invalid(&k("schema"), msg))?,
                    _ => return Err(invalid(&k("schema"), "must be a table (an inline schema) or a string (a .json file)")),
                };
                Kind::JsonSchema { schema: Box::new(schema), extract: extract(Extract::Whole)?, value: value(1.0)? }
            }
            "length" => {
                let penalty = self.penalty.unwrap_or(1.0);
                if !penalty.is_finite() || penalty < 0.0 {
                    return Err(invalid(&k("penalty"), "must be a finite number >= 0"));
                }
                match (self.max_length, self.target_length) {
                    (Some(_), Some(_)) => return Err(invalid(&k("target_length"), "give max_length or target_length, not both")),
                    (None, None) => return Err(invalid(&k("max_length"), "kind = \"length\" needs max_length or target_length")),
                    (Some(0), None) => return Err(invalid(&k("max_length"), "must be > 0")),
                    (None, Some(0)) => return Err(invalid(&k("target_length"), "must be > 0")),
                    (Some(n), None) => Kind::Length { n, target: false, penalty },
                    (None, Some(t)) => Kind::Length { n: t, target: true, penalty },
                }
            }
            "command" => {
                let Some(program) = &self.program else {
                    return Err(invalid(&k("program"), "required by kind = \"command\": argv, e.g. [\"python3\", \"score.py\"]"));
                };
                let Some(first) = program.first().filter(|p| !p.is_empty()) else {
                    return Err(invalid(&k("program"), "must start with a non-empty program name"));
                };
                let timeout_s = self.timeout_s.unwrap_or(60.0);
                if !timeout_s.is_finite() || timeout_s <= 0.0 || timeout_s > 1e6 {
                    return Err(invalid(&k("timeout_s"), "must be a number of seconds > 0"));
                }
                let mut argv: Vec<PathBuf> = program.iter().map(PathBuf::from).collect();
                if let (Some(base), true) = (base_dir, Path::new(first).is_relative()) {
                    if first.contains('/') {
                        argv[0] = base.join(first);
                    }
                }
                // Without the spec's folder (validate) a relative path is checked later.
                if first.contains('/') && (base_dir.is_some() || Path::new(first).is_absolute()) && !argv[0].is_file() {
                    return Err(invalid(&k("program"), format!("{} is not a file", argv[0].display())));
                }
                Kind::Command { argv, timeout: Duration::from_secs_f64(timeout_s) }
            }
            "function" => {
                let Some(function) = &self.function else {
                    return Err(invalid(&k("function"), "required by kind = \"function\": a user function, \"python:NAME\""));
                };
                if !crate::hooks::is_hook_name(function) || function.len() > 256 {
                    return Err(invalid(
                        &k("function"),
                        format!(
                            "{function:?} is not a user function name: \"<scheme>:<name>\" (\"python:my_reward\"), at most 256 characters"
                        ),
                    ));
                }
                Kind::Function { function: function.clone() }
            }
            _ => return Err(invalid(&k("kind"), format!("unknown kind {:?}", self.kind))),
        })
    }

    fn tags(&self, key: &str) -> Result<(String, String)> {
        match self.tags.as_deref() {
            None => Ok(("reasoning".into(), "answer".into())),
            Some([r, a]) => {
                for t in [r, a] {
                    if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c == '<' || c == '>' || c == '/') {
                        return Err(invalid(&format!("{key}.tags"), format!("{t:?} is not a tag name (no spaces, <, > or /)")));
                    }
                }
                Ok((r.clone(), a.clone()))
            }
            Some(_) => Err(invalid(&format!("{key}.tags"), "must be two tag names, e.g. [\"reasoning\", \"answer\"]")),
        }
    }
}

fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Spec { key: key.into(), msg: msg.into() }
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err(format!("{name:?} must be 1 to 64 letters, digits, '_', '-' or '.'"));
    }
    Ok(())
}

/// What one completion is scored on.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// The prompt as the model saw it.
    pub prompt: &'a str,
    /// The generated completion.
    pub completion: &'a str,
    /// The dataset row the prompt came from.
    pub row: &'a Value,
    /// The completion's length in tokens.
    pub completion_tokens: usize,
    /// The completion's tokens (`function` rewards get them).
    pub completion_ids: &'a [u32],
}

/// How the answer is taken from a completion.
#[derive(Debug, Clone)]
enum Extract {
    AnswerTag,
    LastNumber,
    Whole,
    Regex(Regex),
}

fn last_number_re() -> Result<Regex> {
    Regex::new(r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?").map_err(|e| Error::Input(format!("internal regex: {e}")))
}

fn number_re() -> Result<Regex> {
    Regex::new(r"\A[+-]?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\z")
        .map_err(|e| Error::Input(format!("internal regex: {e}")))
}

impl Extract {
    fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "answer_tag" => Ok(Self::AnswerTag),
            "last_number" => Ok(Self::LastNumber),
            "none" => Ok(Self::Whole),
            _ => match s.strip_prefix("regex:") {
                Some(p) => Regex::new(p).map(Self::Regex).map_err(|e| format!("invalid regex {p:?}: {e}")),
                None => Err(format!("unknown extract {s:?}; one of: answer_tag, last_number, none, regex:<pattern>")),
            },
        }
    }

    /// The answer, or `None` when there is none.
    fn apply<'t>(&self, text: &'t str, last_number: &Regex) -> Option<&'t str> {
        match self {
            Self::AnswerTag => {
                let after = text.rsplit("<answer>").next().unwrap_or(text);
                Some(after.split("</answer>").next().unwrap_or(after).trim())
            }
            Self::LastNumber => last_number.find_iter(text).last().map(|m| m.as_str()),
            Self::Whole => Some(text.trim()),
            Self::Regex(re) => {
                let caps = re.captures(text)?;
                let m = if caps.len() > 1 { caps.get(1)? } else { caps.get(0)? };
                Some(m.as_str().trim())
            }
        }
    }
}

/// A compiled reward.
#[derive(Debug)]
enum Kind {
    Regex { re: Regex, value: f64 },
    XmlFormat { re: Regex, value: f64 },
    XmlCount { open_r: String, close_r: String, open_a: String, close_a: String },
    Exact { column: String, extract: Extract, case_sensitive: bool, value: f64 },
    Numeric { column: String, extract: Extract, tolerance: f64, value: f64 },
    Integer { extract: Extract, value: f64 },
    Json { extract: Extract, object: bool, value: f64 },
    JsonSchema { schema: Box<Schema>, extract: Extract, value: f64 },
    Length { n: usize, target: bool, penalty: f64 },
    Command { argv: Vec<PathBuf>, timeout: Duration },
    Function { function: String },
}

/// Compiled rewards of one run.
#[derive(Debug)]
pub struct Rewards {
    names: Vec<String>,
    weights: Vec<f64>,
    kinds: Vec<Kind>,
    last_number: Regex,
    number: Regex,
}

impl Rewards {
    /// Validates and compiles every table (regexes compiled once; relative program/schema
    /// paths resolved against `base_dir`, the spec file's folder). Tables are keyed
    /// `reward[i]` in errors.
    pub fn compile(specs: &[RewardSpec], base_dir: &Path) -> Result<Self> {
        let mut kinds = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            kinds.push(spec.build(&format!("reward[{i}]"), Some(base_dir))?);
        }
        let mut names: Vec<Option<String>> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if let Some(name) = &spec.name {
                if names.iter().flatten().any(|n| n == name) {
                    return Err(invalid(&format!("reward[{i}].name"), format!("{name:?} is already the name of another reward")));
                }
            }
            names.push(spec.name.clone());
        }
        let mut taken: Vec<String> = names.iter().flatten().cloned().collect();
        let names: Vec<String> = names
            .into_iter()
            .zip(specs)
            .map(|(name, spec)| {
                name.unwrap_or_else(|| {
                    let mut candidate = spec.kind.clone();
                    let mut n = 2;
                    while taken.contains(&candidate) {
                        candidate = format!("{}_{n}", spec.kind);
                        n += 1;
                    }
                    taken.push(candidate.clone());
                    candidate
                })
            })
            .collect();
        Ok(Self { names, weights: specs.iter().map(|s| s.weight).collect(), kinds, last_number: last_number_re()?, number: number_re()? })
    }

    /// The rewards' names, in spec order (logged as `rewards/<name>/mean`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The rewards' weights, in spec order.
    pub fn weights(&self) -> Vec<f64> {
        self.weights.clone()
    }

    /// Scores a batch: `result[r][i]` = reward `r` of item `i`. `NaN` means "does not apply
    /// to this item" (TRL's `None`), e.g. a numeric reward whose column is null in that row.
    /// [`Rewards::score_at`] at step 0.
    pub fn score(&self, items: &[Scored<'_>]) -> Result<Vec<Vec<f64>>> {
        self.score_at(items, 0)
    }

    /// Scores a batch sampled at optimizer step `step` (which `function` rewards get), as
    /// [`Rewards::score`].
    pub fn score_at(&self, items: &[Scored<'_>], step: usize) -> Result<Vec<Vec<f64>>> {
        self.kinds.iter().zip(&self.names).map(|(kind, name)| self.score_one(kind, name, items, step)).collect()
    }

    fn score_one(&self, kind: &Kind, name: &str, items: &[Scored<'_>], step: usize) -> Result<Vec<f64>> {
        match kind {
            Kind::Command { argv, timeout } => run_command(name, argv, *timeout, items),
            Kind::Function { function } => call_function(name, function, items, step),
            _ => items.iter().map(|it| self.score_item(kind, name, it)).collect(),
        }
    }

    fn score_item(&self, kind: &Kind, name: &str, it: &Scored<'_>) -> Result<f64> {
        let hit = |ok: bool, value: f64| if ok { value } else { 0.0 };
        let text = it.completion;
        Ok(match kind {
            Kind::Regex { re, value } | Kind::XmlFormat { re, value } => hit(re.is_match(text), *value),
            Kind::XmlCount { open_r, close_r, open_a, close_a } => count_xml(text, open_r, close_r, open_a, close_a),
            Kind::Exact { column, extract, case_sensitive, value } => {
                let Some(want) = column_value(it.row, column) else { return Ok(f64::NAN) };
                let want = match want {
                    Value::String(s) => s.trim().to_string(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(Error::Input(format!(
                            "reward {name}: column {column:?} holds {}, not a string or number",
                            json_kind(other)
                        )))
                    }
                };
                match extract.apply(text, &self.last_number) {
                    Some(got) if *case_sensitive => hit(got == want, *value),
                    Some(got) => hit(got.to_lowercase() == want.to_lowercase(), *value),
                    None => 0.0,
                }
            }
            Kind::Numeric { column, extract, tolerance, value } => {
                let Some(want) = column_value(it.row, column) else { return Ok(f64::NAN) };
                let want = match want {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => self.parse_number(s.trim()),
                    _ => None,
                };
                let Some(want) = want else {
                    return Err(Error::Input(format!("reward {name}: column {column:?} is not a number: {}", it.row[column.as_str()])));
                };
                match extract.apply(text, &self.last_number).and_then(|s| self.parse_number(s)) {
                    Some(got) => hit((got - want).abs() <= *tolerance, *value),
                    None => 0.0,
                }
            }
            Kind::Integer { extract, value } => {
                let got = extract.apply(text, &self.last_number).unwrap_or("");
                hit(!got.is_empty() && got.bytes().all(|b| b.is_ascii_digit()), *value)
            }
            Kind::Json { extract, object, value } => {
                let parsed = extract.apply(text, &self.last_number).and_then(|s| serde_json::from_str::<Value>(s).ok());
                hit(parsed.is_some_and(|v| !*object || v.is_object()), *value)
            }
            Kind::JsonSchema { schema, extract, value } => {
                let parsed = extract.apply(text, &self.last_number).and_then(|s| serde_json::from_str::<Value>(s).ok());
                hit(parsed.is_some_and(|v| schema.accepts(&v)), *value)
            }
            Kind::Length { n, target, penalty } => {
                let (len, n) = (it.completion_tokens as f64, *n as f64);
                if *target {
                    -penalty * (len - n).abs() / n
                } else if len <= n {
                    0.0
                } else {
                    -penalty * (len - n) / n
                }
            }
            Kind::Command { .. } | Kind::Function { .. } => return Err(Error::Input(format!("reward {name}: not compiled"))),
        })
    }

    /// A number as answers write it (`-$1,234.50`, `72.`); `None` when it is not one.
    fn parse_number(&self, s: &str) -> Option<f64> {
        // A sentence's full stop after decimals (`72.5.`).
        let s = s.strip_suffix('.').filter(|rest| rest.ends_with(|c: char| c.is_ascii_digit())).unwrap_or(s);
        if !self.number.is_match(s) {
            return None;
        }
        let clean: String = s.chars().filter(|&c| c != ',' && c != '$').collect();
        clean.parse::<f64>().ok().filter(|x| x.is_finite())
    }
}

/// The column's value; `None` when the row lacks it or it is `null`.
fn column_value<'v>(row: &'v Value, column: &str) -> Option<&'v Value> {
    row.get(column).filter(|v| !v.is_null())
}

/// The tutorial's `count_xml`, operation for operation (so the floats agree with Python's).
fn count_xml(text: &str, open_r: &str, close_r: &str, open_a: &str, close_a: &str) -> f64 {
    let chars_after_last = |sep: &str| text.rsplit(sep).next().unwrap_or(text).chars().count() as f64;
    let mut count = 0.0;
    if text.matches(open_r).count() == 1 {
        count += 0.125;
    }
    if text.matches(close_r).count() == 1 {
        count += 0.125;
    }
    if text.matches(open_a).count() == 1 {
        count += 0.125;
        count -= chars_after_last(&format!("{close_a}\n")) * 0.001;
    }
    if text.matches(close_a).count() == 1 {
        count += 0.125;
        count -= (chars_after_last(close_a) - 1.0) * 0.001;
    }
    count
}

/// Scores a batch with a `function` reward's user function (the module docs give the
/// call's shape).
fn call_function(name: &str, function: &str, items: &[Scored<'_>], step: usize) -> Result<Vec<f64>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let what = format!("reward {name}");
    crate::hooks::require(function, &what)?;
    // Every column of the rows but the prompt, one value per completion (null where a row
    // lacks it), in the order the columns first appear.
    let mut names: Vec<&str> = Vec::new();
    for it in items {
        if let Some(o) = it.row.as_object() {
            for k in o.keys() {
                if k != "prompt" && !names.contains(&k.as_str()) {
                    names.push(k);
                }
            }
        }
    }
    let columns: serde_json::Map<String, Value> = names
        .iter()
        .map(|&c| (c.to_string(), Value::Array(items.iter().map(|it| it.row.get(c).cloned().unwrap_or(Value::Null)).collect())))
        .collect();
    let arg = serde_json::json!({
        "prompts": items.iter().map(|it| it.prompt).collect::<Vec<_>>(),
        "completions": items.iter().map(|it| it.completion).collect::<Vec<_>>(),
        "completion_ids": items.iter().map(|it| it.completion_ids).collect::<Vec<_>>(),
        "columns": columns,
        "step": step,
    });
    let result = crate::hooks::call(function, &what, arg)?;
    let shape = |msg: String| Error::Hook { name: function.to_string(), msg: format!("{what}: {msg}") };
    let Value::Array(list) = result else {
        return Err(shape(format!("must return a list of numbers (one per completion), not {}", json_kind(&result))));
    };
    if list.len() != items.len() {
        return Err(shape(format!("returned {} numbers for {} completions (one per completion, in order)", list.len(), items.len())));
    }
    list.iter()
        .enumerate()
        // `null` (Python's None) is "no score for this completion", as TRL takes it.
        .map(|(i, v)| match v {
            Value::Null => Ok(f64::NAN),
            _ => v.as_f64().ok_or_else(|| shape(format!("item {} of its result is {}, not a number or null", i + 1, json_kind(v)))),
        })
        .collect()
}

/// Runs a `command` reward's program over a batch.
fn run_command(name: &str, argv: &[PathBuf], timeout: Duration, items: &[Scored<'_>]) -> Result<Vec<f64>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let fail = |msg: String| Error::Input(format!("reward {name}: {msg}"));
    let shown = argv.first().map(|p| p.display().to_string()).unwrap_or_default();
    let mut input = String::new();
    for it in items {
        input.push_str(&serde_json::json!({"prompt": it.prompt, "completion": it.completion, "row": it.row}).to_string());
        input.push('\n');
    }
    let Some((program, args)) = argv.split_first() else {
        return Err(fail("no program".into()));
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {shown}: {e}")))?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(fail("no pipes to the program".into()));
    };
    // Each pipe has its own thread, so a program that writes before it reads cannot
    // deadlock with us; results come back on channels so that a pipe a leftover
    // grandchild holds open cannot hang us either.
    let (tx_in, rx_in) = mpsc::channel();
    std::thread::spawn(move || {
        let r = stdin.write_all(input.as_bytes());
        drop(stdin);
        let _ = tx_in.send(r);
    });
    let (tx_out, rx_out) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = stdout.read_to_end(&mut buf).map(|_| buf);
        let _ = tx_out.send(r);
    });
    let (tx_err, rx_err) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = stderr.read_to_end(&mut buf).map(|_| buf);
        let _ = tx_err.send(r);
    });
    let stderr_tail = |wait: Duration| -> String {
        match rx_err.recv_timeout(wait) {
            Ok(Ok(buf)) => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end();
                let start = text.char_indices().rev().nth(1999).map_or(0, |(i, _)| i);
                text[start..].to_string()
            }
            _ => String::new(),
        }
    };
    let start = Instant::now();
    let deadline = start + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    let tail = stderr_tail(Duration::from_millis(200));
                    return Err(fail(format!(
                        "{shown} timed out after {:.1} s and was killed{}",
                        timeout.as_secs_f64(),
                        stderr_note(&tail)
                    )));
                }
                let pause = if now - start < Duration::from_millis(100) { 1 } else { 10 };
                std::thread::sleep(Duration::from_millis(pause).min(deadline - now));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("waiting for {shown}: {e}")));
            }
        }
    };
    let grace = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    if !status.success() {
        let tail = stderr_tail(grace);
        return Err(fail(format!("{shown} failed ({status}){}", stderr_note(&tail))));
    }
    let out = match rx_out.recv_timeout(grace) {
        Ok(Ok(buf)) => buf,
        Ok(Err(e)) => return Err(fail(format!("reading the output of {shown}: {e}"))),
        Err(_) => return Err(fail(format!("{shown} exited but its output stayed open (a background process left running?)"))),
    };
    if let Ok(Err(e)) = rx_in.recv_timeout(Duration::from_millis(100)) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(fail(format!("writing the input of {shown}: {e}")));
        }
    }
    let out = String::from_utf8(out).map_err(|_| fail(format!("the output of {shown} is not UTF-8")))?;
    let mut lines: Vec<&str> = out.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    if lines.len() != items.len() {
        return Err(fail(format!(
            "{shown} printed {} lines for {} items (one number or null per line, in order)",
            lines.len(),
            items.len()
        )));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let line = line.trim();
            if line == "null" {
                return Ok(f64::NAN);
            }
            line.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| fail(format!("line {} of the output of {shown}: {line:?} is not a number or null", i + 1)))
        })
        .collect()
}

fn stderr_note(tail: &str) -> String {
    if tail.is_empty() {
        " (no stderr)".into()
    } else {
        format!("; end of its stderr:\n{tail}")
    }
}

/// The JSON types of `type`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum JType {
    Null,
    Boolean,
    Object,
    Array,
    Number,
    Integer,
    String,
}

impl JType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "null" => Self::Null,
            "boolean" => Self::Boolean,
            "object" => Self::Object,
            "array" => Self::Array,
            "number" => Self::Number,
            "integer" => Self::Integer,
            "string" => Self::String,
            _ => return None,
        })
    }

    fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (Self::Null, Value::Null) | (Self::Boolean, Value::Bool(_)) | (Self::Object, Value::Object(_)) => true,
            (Self::Array, Value::Array(_)) | (Self::Number, Value::Number(_)) | (Self::String, Value::String(_)) => true,
            (Self::Integer, Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|x| x.is_finite() && x.fract() == 0.0),
            _ => false,
        }
    }
}

/// A compiled JSON schema (the subset the module docs list).
#[derive(Debug, Default)]
struct Schema {
    /// `Some(b)`: the schema is the literal `true`/`false`.
    literal: Option<bool>,
    types: Option<Vec<JType>>,
    properties: Vec<(String, Schema)>,
    required: Vec<String>,
    additional: bool,
    items: Option<Box<Schema>>,
    enumeration: Option<Vec<Value>>,
    constant: Option<Value>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    min_length: Option<usize>,
    max_length: Option<usize>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    pattern: Option<Regex>,
}

const SCHEMA_KEYWORDS: [&str; 15] = [
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "(and annotations)",
];
const SCHEMA_ANNOTATIONS: [&str; 7] = ["$schema", "$id", "$comment", "title", "description", "default", "examples"];

impl Schema {
    /// Compiles `v`; `at` is its JSON pointer, for messages.
    fn compile(v: &Value, at: &str) -> std::result::Result<Self, String> {
        let here = if at.is_empty() { "the schema".to_string() } else { format!("schema at {at}") };
        let map = match v {
            Value::Bool(b) => return Ok(Self { literal: Some(*b), ..Self::default() }),
            Value::Object(map) => map,
            other => return Err(format!("{here} must be an object or a boolean, not {}", json_kind(other))),
        };
        let mut s = Self { additional: true, ..Self::default() };
        let count = |key: &str, v: &Value| -> std::result::Result<usize, String> {
            v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| format!("{here}: {key} must be an integer >= 0"))
        };
        let number = |key: &str, v: &Value| -> std::result::Result<f64, String> {
            v.as_f64().ok_or_else(|| format!("{here}: {key} must be a number"))
        };
        for (key, value) in map {
            match key.as_str() {
                "type" => {
                    let names: Vec<&Value> = match value {
                        Value::Array(list) => list.iter().collect(),
                        one => vec![one],
                    };
                    let mut types = Vec::new();
                    for name in names {
                        let t = name.as_str().and_then(JType::parse).ok_or_else(|| {
                            format!("{here}: type {name} is not one of null, boolean, object, array, number, integer, string")
                        })?;
                        types.push(t);
                    }
                    s.types = Some(types);
                }
                "properties" => {
                    let Value::Object(props) = value else {
                        return Err(format!("{here}: properties must be an object"));
                    };
                    for (name, sub) in props {
                        s.properties.push((name.clone(), Self::compile(sub, &format!("{at}/properties/{name}"))?));
                    }
                }
                "required" => {
                    let list = value.as_array().ok_or_else(|| format!("{here}: required must be a list of names"))?;
                    for name in list {
                        let name = name.as_str().ok_or_else(|| format!("{here}: required must be a list of names"))?;
                        s.required.push(name.to_string());
                    }
                }
                "additionalProperties" => {
                    s.additional = value
                        .as_bool()
                        .ok_or_else(|| format!("{here}: additionalProperties must be true or false (schemas there are not supported)"))?;
                }
                "items" => {
                    if value.is_array() {
                        return Err(format!("{here}: items must be one schema (the list form is not supported)"));
                    }
                    s.items = Some(Box::new(Self::compile(value, &format!("{at}/items"))?));
                }
                "enum" => s.enumeration = Some(value.as_array().ok_or_else(|| format!("{here}: enum must be a list"))?.clone()),
                "const" => s.constant = Some(value.clone()),
                "minimum" => s.minimum = Some(number(key, value)?),
                "maximum" => s.maximum = Some(number(key, value)?),
                "minLength" => s.min_length = Some(count(key, value)?),
                "maxLength" => s.max_length = Some(count(key, value)?),
                "minItems" => s.min_items = Some(count(key, value)?),
                "maxItems" => s.max_items = Some(count(key, value)?),
                "pattern" => {
                    let p = value.as_str().ok_or_else(|| format!("{here}: pattern must be a string"))?;
                    s.pattern = Some(Regex::new(p).map_err(|e| format!("{here}: invalid pattern {p:?}: {e}"))?);
                }
                k if SCHEMA_ANNOTATIONS.contains(&k) => {}
                k => {
                    return Err(format!(
                        "{here}: unsupported keyword {k:?} (supported: {})",
                        SCHEMA_KEYWORDS.iter().chain(&SCHEMA_ANNOTATIONS).copied().collect::<Vec<_>>().join(", ")
                    ))
                }
            }
        }
        Ok(s)
    }

    fn accepts(&self, v: &Value) -> bool {
        if let Some(b) = self.literal {
            return b;
        }
        if let Some(types) = &self.types {
            if !types.iter().any(|t| t.accepts(v)) {
                return false;
            }
        }
        if let Some(list) = &self.enumeration {
            if !list.iter().any(|e| json_eq(e, v)) {
                return false;
            }
        }
        if let Some(c) = &self.constant {
            if !json_eq(c, v) {
                return false;
            }
        }
        match v {
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                self.minimum.is_none_or(|m| x >= m) && self.maximum.is_none_or(|m| x <= m)
            }
            Value::String(text) => {
                let len = text.chars().count();
                !(self.min_length.is_some_and(|m| len < m)
                    || self.max_length.is_some_and(|m| len > m)
                    || self.pattern.as_ref().is_some_and(|re| !re.is_match(text)))
            }
            Value::Array(list) => {
                !(self.min_items.is_some_and(|m| list.len() < m)
                    || self.max_items.is_some_and(|m| list.len() > m)
                    || self.items.as_ref().is_some_and(|s| !list.iter().all(|x| s.accepts(x))))
            }
            Value::Object(map) => {
                self.required.iter().all(|r| map.contains_key(r))
                    && map.iter().all(|(k, x)| match self.properties.iter().find(|(name, _)| name == k) {
                        Some((_, s)) => s.accepts(x),
                        None => self.additional,
                    })
            }
            Value::Null | Value::Bool(_) => true,
        }
    }
}

/// JSON equality as JSON Schema defines it (`1 == 1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Tables {
        reward: Vec<RewardSpec>,
    }

    fn specs(toml_text: &str) -> Vec<RewardSpec> {
        toml::from_str::<Tables>(toml_text).unwrap().reward
    }

    fn compile(toml_text: &str) -> Rewards {
        Rewards::compile(&specs(toml_text), Path::new(".")).unwrap()
    }

    /// The one reward of `r` on each completion (row and token count shared).
    fn scores(r: &Rewards, completions: &[&str], row: &Value) -> Vec<f64> {
        let items: Vec<Scored<'_>> =
            completions.iter().map(|c| Scored { prompt: "p", completion: c, row, completion_tokens: 0, completion_ids: &[] }).collect();
        let mut out = r.score(&items).unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    fn spec_err(result: Result<Rewards>) -> (String, String) {
        match result {
            Err(Error::Spec { key, msg }) => (key, msg),
            other => panic!("expected a spec error, got {other:?}"),
        }
    }

    fn compile_err(toml_text: &str) -> (String, String) {
        spec_err(Rewards::compile(&specs(toml_text), Path::new(".")))
    }

    const STRICT_OK: &str = "<reasoning>\nHe has 3 apples.\n</reasoning>\n<answer>\n3\n</answer>\n";
    const TRAILING: &str = "<reasoning>\nHe has 3 apples.\n</reasoning>\n<answer>\n3\n</answer>\nThanks é!";
    const NO_FINAL_NL: &str = "<reasoning>\nHe has 3 apples.\n</reasoning>\n<answer>\n3\n</answer>";
    const TWO_NL: &str = "<reasoning>\nHe has 3 apples.\n</reasoning>\n<answer>\n3\n</answer>\n\n";
    const ONE_LINE: &str = "<reasoning>He has 3 apples.</reasoning> <answer>3</answer> trailing\nmore";
    const MULTI_LINE: &str = "<reasoning>\na\nb\n</reasoning>\n<answer>\n3\n</answer>\n";
    const PLAIN: &str = "The answer is 3.";
    const TWO_ANSWERS: &str = "<reasoning>\nx\n</reasoning>\n<answer>\n3\n</answer>\n<answer>\n4\n</answer>\n";

    #[test]
    fn regex_searches_or_matches_the_whole_completion() {
        let r = compile("[[reward]]\nkind = \"regex\"\npattern = 'answer is \\d+'\n[[reward]]\nkind = \"regex\"\npattern = '\\d+'\nfull = true\nvalue = 2.5");
        let row = json!({});
        let items: Vec<Scored<'_>> = ["so the answer is 42.", "42", "no number"]
            .iter()
            .map(|c| Scored { prompt: "", completion: c, row: &row, completion_tokens: 0, completion_ids: &[] })
            .collect();
        assert_eq!(r.score(&items).unwrap(), vec![vec![1.0, 0.0, 0.0], vec![0.0, 2.5, 0.0]]);
        assert_eq!(r.names(), ["regex", "regex_2"]);
        assert_eq!(r.weights(), [1.0, 1.0]);
    }

    #[test]
    fn xml_format_matches_pythons_re_match_on_the_tutorial_strings() {
        // Expected values from Python's re.match with the tutorial's two patterns.
        let all = [STRICT_OK, TRAILING, NO_FINAL_NL, TWO_NL, ONE_LINE, MULTI_LINE, PLAIN, TWO_ANSWERS];
        let strict = compile("[[reward]]\nkind = \"xml_format\"\nstrict = true");
        assert_eq!(scores(&strict, &all, &json!({})), [0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]);
        let soft = compile("[[reward]]\nkind = \"xml_format\"\nvalue = 1.0");
        assert_eq!(scores(&soft, &all, &json!({})), [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        let renamed = compile("[[reward]]\nkind = \"xml_format\"\nstrict = true\ntags = [\"think\", \"final\"]");
        assert_eq!(scores(&renamed, &["<think>\nx\n</think>\n<final>\n3\n</final>\n", STRICT_OK], &json!({})), [0.5, 0.0]);
    }

    #[test]
    fn xml_count_equals_the_tutorials_count_xml() {
        // Values printed by the tutorial's count_xml in Python (lengths in characters: é is one).
        let all = [STRICT_OK, TRAILING, NO_FINAL_NL, TWO_NL, ONE_LINE, MULTI_LINE, PLAIN, TWO_ANSWERS];
        let r = compile("[[reward]]\nkind = \"xml_count\"");
        assert_eq!(scores(&r, &all, &json!({})), [0.5, 0.482, 0.439, 0.498, 0.0, 0.5, 0.0, 0.25]);
        let renamed = compile("[[reward]]\nkind = \"xml_count\"\ntags = [\"think\", \"final\"]");
        assert_eq!(scores(&renamed, &["<think>\nx\n</think>\n<final>\n3\n</final>\n", STRICT_OK], &json!({})), [0.5, 0.0]);
    }

    #[test]
    fn exact_compares_the_answer_with_the_column() {
        let r = compile("[[reward]]\nkind = \"exact\"\ncolumn = \"answer\"");
        let row = json!({"answer": " Paris "});
        assert_eq!(scores(&r, &["<answer> paris </answer>", "<answer>Lyon</answer>", "PARIS"], &row), [1.0, 0.0, 1.0]);
        // Numbers are compared as JSON writes them; missing or null columns do not apply.
        assert_eq!(scores(&r, &["<answer>42</answer>", "<answer>42.0</answer>"], &json!({"answer": 42})), [1.0, 0.0]);
        assert!(scores(&r, &["<answer>42</answer>"], &json!({"answer": null}))[0].is_nan());
        assert!(scores(&r, &["<answer>42</answer>"], &json!({"other": 42}))[0].is_nan());
        assert!(r
            .score(&[Scored { prompt: "", completion: "x", row: &json!({"answer": [1]}), completion_tokens: 0, completion_ids: &[] }])
            .is_err());
        let cs = compile(
            "[[reward]]\nkind = \"exact\"\ncolumn = \"answer\"\ncase_sensitive = true\nextract = 'regex:final: (\\w+)'\nvalue = 3.0",
        );
        assert_eq!(scores(&cs, &["final: Paris", "final: paris", "Paris"], &json!({"answer": "Paris"})), [3.0, 0.0, 0.0]);
    }

    #[test]
    fn numeric_parses_answers_as_people_write_them() {
        let r = compile("[[reward]]\nkind = \"numeric\"\ncolumn = \"answer\"");
        let row = json!({"answer": 1234});
        let got = scores(
            &r,
            &[
                "<answer>$1,234.</answer>",
                "<answer>1234.0000001</answer>",
                "<answer>1,23,4</answer>",
                "<answer>1235</answer>",
                PLAIN,
                "<answer>1.234e3</answer>",
            ],
            &row,
        );
        assert_eq!(got, [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        // A numeric string column; a negative money amount.
        assert_eq!(
            scores(&r, &["<answer>-$72.50</answer>", "<answer>72.5</answer>", "<answer>-72.5.</answer>"], &json!({"answer": "-72.5"})),
            [1.0, 0.0, 1.0]
        );
        assert!(scores(&r, &["<answer>3</answer>"], &json!({"answer": null}))[0].is_nan());
        assert!(scores(&r, &["<answer>3</answer>"], &json!({}))[0].is_nan());
        let err = r
            .score(&[Scored { prompt: "", completion: "3", row: &json!({"answer": "three"}), completion_tokens: 0, completion_ids: &[] }])
            .unwrap_err();
        assert!(err.to_string().contains("reward numeric") && err.to_string().contains("not a number"), "{err}");
        let last = compile("[[reward]]\nkind = \"numeric\"\ncolumn = \"y\"\nextract = \"last_number\"\ntolerance = 0.1");
        assert_eq!(scores(&last, &["5 apples, then 3.05", "3 then 5", "none"], &json!({"y": 3})), [1.0, 0.0, 0.0]);
    }

    #[test]
    fn integer_wants_ascii_digits_only() {
        let r = compile("[[reward]]\nkind = \"integer\"");
        assert_eq!(
            scores(&r, &["<answer>\n72\n</answer>", "<answer>7.2</answer>", "<answer></answer>", "<answer>-3</answer>", "٣"], &json!({})),
            [0.5, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn json_parses_the_completion() {
        let r = compile("[[reward]]\nkind = \"json\"");
        assert_eq!(scores(&r, &[" {\"a\": 1} ", "[1, 2]", "{a: 1}", "```json\n{}\n```"], &json!({})), [1.0, 1.0, 0.0, 0.0]);
        let obj = compile("[[reward]]\nkind = \"json\"\nobject = true\nextract = 'regex:```json\\n((?s).*?)```'");
        assert_eq!(scores(&obj, &["```json\n{\"a\": 1}\n```", "```json\n[1]\n```", "{}"], &json!({})), [1.0, 0.0, 0.0]);
    }

    #[test]
    fn json_schema_validates_inline_and_file_schemas() {
        let r = compile(
            r#"
[[reward]]
kind = "json_schema"
value = 2.0
[reward.schema]
type = "object"
required = ["name", "age"]
additionalProperties = false
[reward.schema.properties.name]
type = "string"
minLength = 2
pattern = "^[A-Z]"
[reward.schema.properties.age]
type = "integer"
minimum = 0
maximum = 150
[reward.schema.properties.tags]
type = "array"
items = { enum = ["a", "b"] }
maxItems = 2
[reward.schema.properties.kind]
const = 1
"#,
        );
        let row = json!({});
        let ok = r#"{"name": "Ann", "age": 30, "tags": ["a", "b"], "kind": 1.0}"#;
        let cases = [
            ok,
            r#"{"name": "Ann", "age": 30.0}"#,
            r#"{"name": "Ann"}"#,
            r#"{"name": "ann", "age": 30}"#,
            r#"{"name": "A", "age": 30}"#,
            r#"{"name": "Ann", "age": 30.5}"#,
            r#"{"name": "Ann", "age": 151}"#,
            r#"{"name": "Ann", "age": 30, "extra": 1}"#,
            r#"{"name": "Ann", "age": 30, "tags": ["c"]}"#,
            r#"{"name": "Ann", "age": 30, "tags": ["a", "a", "a"]}"#,
            r#"{"name": "Ann", "age": 30, "kind": 2}"#,
            "not json",
        ];
        assert_eq!(scores(&r, &cases, &row), [2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s.json"), r#"{"type": ["string", "null"], "maxLength": 3}"#).unwrap();
        let file = Rewards::compile(&specs("[[reward]]\nkind = \"json_schema\"\nschema = \"s.json\""), dir.path()).unwrap();
        assert_eq!(scores(&file, &["\"abc\"", "null", "\"abcd\"", "3"], &row), [1.0, 1.0, 0.0, 0.0]);
        let missing = Rewards::compile(&specs("[[reward]]\nkind = \"json_schema\"\nschema = \"nope.json\""), dir.path());
        let (key, msg) = spec_err(missing);
        assert_eq!(key, "reward[0].schema");
        assert!(msg.contains("nope.json"), "{msg}");

        let (key, msg) = compile_err("[[reward]]\nkind = \"json_schema\"\n[reward.schema]\ntype = \"object\"\nproperties = { d = { type = \"string\", format = \"date\" } }");
        assert_eq!(key, "reward[0].schema");
        assert!(msg.contains("\"format\"") && msg.contains("/properties/d"), "{msg}");
        let (_, msg) = compile_err("[[reward]]\nkind = \"json_schema\"\nschema = { additionalProperties = { type = \"string\" } }");
        assert!(msg.contains("additionalProperties"), "{msg}");
        let (_, msg) = compile_err("[[reward]]\nkind = \"json_schema\"\nschema = { type = \"int\" }");
        assert!(msg.contains("\"int\""), "{msg}");
    }

    #[test]
    fn length_penalizes_long_or_off_target_completions() {
        let r =
            compile("[[reward]]\nkind = \"length\"\nmax_length = 100\npenalty = 2.0\n[[reward]]\nkind = \"length\"\ntarget_length = 50");
        let row = json!({});
        let items: Vec<Scored<'_>> = [40, 100, 150]
            .iter()
            .map(|&n| Scored { prompt: "", completion: "", row: &row, completion_tokens: n, completion_ids: &[] })
            .collect();
        assert_eq!(r.score(&items).unwrap(), vec![vec![0.0, 0.0, -1.0], vec![-0.2, -1.0, -2.0]]);
        assert_eq!(r.names(), ["length", "length_2"]);
    }

    fn command(script: &str, timeout_s: f64) -> Rewards {
        let spec = RewardSpec {
            kind: "command".into(),
            name: Some("judge".into()),
            weight: 1.0,
            value: None,
            pattern: None,
            full: None,
            strict: None,
            tags: None,
            column: None,
            extract: None,
            case_sensitive: None,
            tolerance: None,
            object: None,
            schema: None,
            max_length: None,
            target_length: None,
            penalty: None,
            program: Some(vec!["sh".into(), "-c".into(), script.into()]),
            timeout_s: Some(timeout_s),
            function: None,
        };
        Rewards::compile(&[spec], Path::new(".")).unwrap()
    }

    fn run(r: &Rewards, completions: &[&str]) -> Result<Vec<f64>> {
        let row = json!({"answer": "x"});
        let items: Vec<Scored<'_>> = completions
            .iter()
            .map(|c| Scored { prompt: "p", completion: c, row: &row, completion_tokens: 1, completion_ids: &[] })
            .collect();
        r.score(&items).map(|mut v| v.remove(0))
    }

    #[test]
    fn command_scores_each_line_in_order() {
        let r = command(
            r#"while read -r l; do case "$l" in *'"completion":"a"'*) echo 1;; *'"completion":"b"'*) echo null;; *'"answer":"x"'*) echo " -0.25 ";; esac; done"#,
            10.0,
        );
        let got = run(&r, &["b", "c", "a"]).unwrap();
        assert!(got[0].is_nan());
        assert_eq!(&got[1..], [-0.25, 1.0]);
        // No items: the program is not run at all (this one would fail).
        assert_eq!(command("exit 1", 10.0).score(&[]).unwrap(), vec![Vec::<f64>::new()]);
    }

    #[test]
    fn command_that_writes_before_reading_does_not_deadlock() {
        // 200 kB on stderr before reading 300 kB of input: both pipes overflow unless each
        // has its own thread.
        let r = command("yes x | head -c 200000 >&2; while read -r l; do echo 0.5; done", 30.0);
        let long = "y".repeat(1000);
        let items = vec![long.as_str(); 300];
        assert_eq!(run(&r, &items).unwrap(), vec![0.5; 300]);
    }

    #[test]
    fn command_errors_name_the_reward_and_the_problem() {
        let err = run(&command("cat >/dev/null; echo 1", 10.0), &["a", "b"]).unwrap_err().to_string();
        assert!(err.contains("reward judge") && err.contains("printed 1 lines for 2 items"), "{err}");
        let err = run(&command("cat >/dev/null; echo 1; echo abc", 10.0), &["a", "b"]).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("\"abc\""), "{err}");
        let err = run(&command("cat >/dev/null; echo 1; echo inf", 10.0), &["a", "b"]).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = run(&command("cat >/dev/null; echo starting >&2; echo 'boom: bad input' >&2; exit 3", 10.0), &["a"]).unwrap_err();
        assert!(matches!(err, Error::Input(_)));
        let err = err.to_string();
        assert!(err.contains("reward judge") && err.contains("boom: bad input") && err.contains('3'), "{err}");
        let start = Instant::now();
        let err = run(&command("exec sleep 20", 1.0), &["a"]).unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    }

    #[cfg(unix)]
    #[test]
    fn command_program_paths_are_relative_to_the_spec_folder() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let script = dir.path().join("bin/score.sh");
        std::fs::write(&script, "#!/bin/sh\nwhile read -r l; do echo 0.75; done\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = specs("[[reward]]\nkind = \"command\"\nprogram = [\"bin/score.sh\"]");
        s[0].validate("reward[0]").unwrap();
        let r = Rewards::compile(&s, dir.path()).unwrap();
        let row = json!({});
        assert_eq!(
            r.score(&[Scored { prompt: "", completion: "", row: &row, completion_tokens: 0, completion_ids: &[] }]).unwrap(),
            vec![vec![0.75]]
        );
        let (key, msg) = spec_err(Rewards::compile(&specs("[[reward]]\nkind = \"command\"\nprogram = [\"bin/nope.sh\"]"), dir.path()));
        assert_eq!(key, "reward[0].program");
        assert!(msg.contains("nope.sh"), "{msg}");
    }

    #[test]
    fn validation_names_the_key() {
        let cases: [(&str, &str, &str); 19] = [
            ("kind = \"bleu\"", "reward[0].kind", "xml_count"),
            ("kind = \"numeric\"\ncolumn = \"a\"\npattern = \"x\"", "reward[0].pattern", "not used by kind = \"numeric\""),
            ("kind = \"regex\"", "reward[0].pattern", "required"),
            ("kind = \"regex\"\npattern = \"(unclosed\"", "reward[0].pattern", "(unclosed"),
            ("kind = \"exact\"", "reward[0].column", "required"),
            ("kind = \"numeric\"", "reward[0].column", "required"),
            ("kind = \"numeric\"\ncolumn = \"a\"\ntolerance = -1.0", "reward[0].tolerance", ">= 0"),
            ("kind = \"command\"", "reward[0].program", "required"),
            ("kind = \"command\"\nprogram = []", "reward[0].program", "non-empty"),
            ("kind = \"json_schema\"", "reward[0].schema", "required"),
            ("kind = \"length\"", "reward[0].max_length", "max_length or target_length"),
            ("kind = \"length\"\nmax_length = 5\ntarget_length = 5", "reward[0].target_length", "not both"),
            ("kind = \"xml_count\"\nweight = inf", "reward[0].weight", "finite"),
            ("kind = \"integer\"\nextract = \"regex:[\"", "reward[0].extract", "invalid regex"),
            ("kind = \"integer\"\nextract = \"first\"", "reward[0].extract", "answer_tag"),
            ("kind = \"xml_format\"\ntags = [\"a\"]", "reward[0].tags", "two tag names"),
            ("kind = \"function\"", "reward[0].function", "required"),
            ("kind = \"function\"\nfunction = \"score\"", "reward[0].function", "not a user function name"),
            ("kind = \"command\"\nprogram = [\"x\"]\nfunction = \"python:f\"", "reward[0].function", "not used by kind = \"command\""),
        ];
        for (body, want_key, want_msg) in cases {
            let text = format!("[[reward]]\nkind = \"integer\"\n[[reward]]\n{body}");
            let (key, msg) = compile_err(&format!("[[reward]]\n{body}"));
            assert_eq!(key, want_key, "{body}");
            assert!(msg.contains(want_msg), "{body}: {msg}");
            // validate() agrees, with the caller's key.
            let s = specs(&format!("[[reward]]\n{body}"));
            match s[0].validate("reward[3]") {
                Err(Error::Spec { key, .. }) => assert_eq!(key, want_key.replace("[0]", "[3]")),
                other => panic!("{body}: {other:?}"),
            }
            // The table's index is the one in the spec.
            let (key, _) = compile_err(&text);
            assert_eq!(key, want_key.replace("[0]", "[1]"), "{body}");
        }
        assert!(toml::from_str::<Tables>("[[reward]]\nkind = \"regex\"\npatern = \"x\"").is_err());
    }

    #[test]
    fn names_default_to_the_kind_and_are_unique() {
        let r = compile("[[reward]]\nkind = \"numeric\"\ncolumn = \"a\"\n[[reward]]\nkind = \"numeric\"\ncolumn = \"b\"\nweight = 0.5\n[[reward]]\nkind = \"xml_count\"\nname = \"numeric_2\"");
        assert_eq!(r.names(), ["numeric", "numeric_3", "numeric_2"]);
        assert_eq!(r.weights(), [1.0, 0.5, 1.0]);
        let (key, msg) = compile_err("[[reward]]\nkind = \"xml_count\"\nname = \"fmt\"\n[[reward]]\nkind = \"integer\"\nname = \"fmt\"");
        assert_eq!(key, "reward[1].name");
        assert!(msg.contains("\"fmt\""), "{msg}");
        let (key, _) = compile_err("[[reward]]\nkind = \"xml_count\"\nname = \"a/b\"");
        assert_eq!(key, "reward[0].name");
    }

    #[test]
    fn specs_round_trip_through_toml_and_rewards_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Rewards>();
        let s = specs("[[reward]]\nkind = \"json_schema\"\nweight = 2\nschema = { type = \"object\", required = [\"a\"] }\n[[reward]]\nkind = \"length\"\nmax_length = 9");
        assert_eq!(s[0].weight, 2.0);
        assert_eq!(s[1].weight, 1.0);
        let text = toml::to_string(&Tables2 { reward: s.clone() }).unwrap();
        assert_eq!(specs(&text), s);
    }

    #[test]
    fn function_rewards_get_the_batch_and_return_one_number_per_completion() {
        use std::sync::{Arc, Mutex};
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let log = seen.clone();
        crate::hooks::register(
            "test:reward_len_plus_answer",
            Arc::new(move |arg: Value| {
                log.lock().unwrap().push(arg.clone());
                let completions = arg["completions"].as_array().cloned().unwrap_or_default();
                let answers = arg["columns"]["answer"].as_array().cloned().unwrap_or_default();
                let step = arg["step"].as_f64().unwrap_or(-1.0);
                Ok(Value::Array(
                    completions
                        .iter()
                        .zip(&answers)
                        .map(|(c, a)| json!(c.as_str().unwrap_or("").len() as f64 + a.as_f64().unwrap_or(0.0) + step))
                        .collect(),
                ))
            }),
        );
        let r = compile("[[reward]]\nkind = \"function\"\nfunction = \"test:reward_len_plus_answer\"\nname = \"fn\"\nweight = 2");
        assert_eq!((r.names(), r.weights()), (&["fn".to_string()][..], vec![2.0]));
        let rows = [json!({"prompt": "p1", "answer": 10, "level": "a"}), json!({"prompt": "p2", "answer": 20})];
        let ids: [&[u32]; 2] = [&[5, 6], &[7]];
        let items: Vec<Scored<'_>> = [("abc", 0), ("de", 1)]
            .iter()
            .map(|&(c, i)| Scored {
                prompt: if i == 0 { "P1" } else { "P2" },
                completion: c,
                row: &rows[i],
                completion_tokens: ids[i].len(),
                completion_ids: ids[i],
            })
            .collect();
        assert_eq!(r.score_at(&items, 7).unwrap(), vec![vec![20.0, 29.0]]);
        let arg = seen.lock().unwrap().pop().unwrap();
        assert_eq!(
            arg,
            json!({
                "prompts": ["P1", "P2"],
                "completions": ["abc", "de"],
                "completion_ids": [[5, 6], [7]],
                "columns": {"answer": [10, 20], "level": ["a", null]},
                "step": 7,
            })
        );
        // One call per batch; none for an empty batch.
        assert_eq!(r.score_at(&[], 7).unwrap(), vec![Vec::<f64>::new()]);
        assert!(seen.lock().unwrap().is_empty());
        crate::hooks::unregister("test:reward_len_plus_answer");
        // null is "no score" (NaN), as TRL takes a reward function's None.
        crate::hooks::register("test:reward_none", Arc::new(|_| Ok(json!([null, 1.5]))));
        let r = compile("[[reward]]\nkind = \"function\"\nfunction = \"test:reward_none\"\nname = \"none\"");
        let got = r.score_at(&items, 0).unwrap().remove(0);
        assert!(got[0].is_nan() && got[1] == 1.5, "{got:?}");
        crate::hooks::unregister("test:reward_none");
    }

    #[test]
    fn function_reward_errors_name_the_function() {
        let row = json!({"prompt": "p"});
        let items = |n: usize| -> Vec<Scored<'_>> {
            (0..n).map(|_| Scored { prompt: "p", completion: "c", row: &row, completion_tokens: 0, completion_ids: &[] }).collect()
        };
        let err = |name: &str, f: crate::hooks::HookFn| -> String {
            crate::hooks::register(name, f);
            let r = compile(&format!("[[reward]]\nkind = \"function\"\nfunction = \"{name}\""));
            let e = r.score_at(&items(2), 1).unwrap_err();
            crate::hooks::unregister(name);
            assert!(matches!(e, Error::Hook { .. }), "{e:?}");
            e.to_string()
        };
        let e = err("test:reward_short", std::sync::Arc::new(|_| Ok(json!([1.0]))));
        assert!(e.contains("test:reward_short") && e.contains("returned 1 numbers for 2 completions"), "{e}");
        let e = err("test:reward_text", std::sync::Arc::new(|_| Ok(json!([1.0, "x"]))));
        assert!(e.contains("item 2") && e.contains("a string, not a number"), "{e}");
        let e = err("test:reward_dict", std::sync::Arc::new(|_| Ok(json!({"a": 1}))));
        assert!(e.contains("must return a list of numbers"), "{e}");
        let e = err("test:reward_raises", std::sync::Arc::new(|_| Err("Traceback (most recent call last):\nKeyError: 'answer'".into())));
        assert!(e.contains("KeyError: 'answer'") && e.contains("reward function"), "{e}");
        // Not registered: require()'s message.
        let r = compile("[[reward]]\nkind = \"function\"\nfunction = \"test:reward_never_registered\"");
        let e = r.score_at(&items(1), 0).unwrap_err().to_string();
        assert!(e.contains("not registered") && e.contains("test:reward_never_registered"), "{e}");
    }

    #[derive(Serialize)]
    struct Tables2 {
        reward: Vec<RewardSpec>,
    }
}
