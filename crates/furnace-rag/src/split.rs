//! Text splitters: cut a document into chunks small enough to embed.
//!
//! * [`RecursiveCharacterSplitter`] follows LangChain's `RecursiveCharacterTextSplitter`
//!   exactly (same separators, merge and overlap rules, same chunk texts and start
//!   indexes; `testdata/split_cases.jsonl`, made by `scripts/make_split_fixtures.py`, pins
//!   this). Separators are literal strings (LangChain's `is_separator_regex = false`).
//! * [`MarkdownHeaderSplitter`] follows LangChain's `MarkdownHeaderTextSplitter`: a section
//!   per header, the header path in the chunk's metadata, code fences never read as
//!   headers.
//! * [`SplitterConfig`] is the serde form that a config file names (`kind = "recursive" |
//!   "markdown" | "none"`); [`SplitterConfig::split_document`] applies it to a
//!   [`Document`].
//!
//! Lengths are measured by a pluggable [`Length`]: Unicode scalar values (Python's `len`)
//! or any function, such as the token count of a tokenizer. All offsets in chunks are in
//! characters (Unicode scalar values) of the original text, never bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::docs::{Chunk, Document};
use crate::{Error, Result};

/// LangChain's default separators: paragraphs, lines, words, characters.
pub const DEFAULT_SEPARATORS: [&str; 4] = ["\n\n", "\n", " ", ""];

/// How the length of a piece of text is measured against `chunk_size`.
#[derive(Clone, Copy)]
pub enum Length<'a> {
    /// Unicode scalar values, like Python's `len`.
    Chars,
    /// Any measure, e.g. the number of tokens a tokenizer makes of the text.
    Custom(&'a dyn Fn(&str) -> usize),
}

impl Length<'_> {
    /// The length of `text`.
    pub fn of(&self, text: &str) -> usize {
        match self {
            Length::Chars => text.chars().count(),
            Length::Custom(f) => f(text),
        }
    }
}

impl std::fmt::Debug for Length<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Length::Chars => f.write_str("Chars"),
            Length::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Where a separator goes when the text is split on it (LangChain's `keep_separator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepSeparator {
    /// Dropped; pieces are re-joined with the separator when merged (`False`).
    None,
    /// At the start of the piece that follows it (`True` or `"start"`; LangChain's default).
    #[default]
    Start,
    /// At the end of the piece that precedes it (`"end"`).
    End,
}

/// One chunk of a text with its place in that text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextChunk {
    /// The chunk's text.
    pub text: String,
    /// Its position among the text's chunks, from 0.
    pub index: usize,
    /// The first character of the chunk in the original text (in chars, not bytes).
    pub start_char: usize,
    /// One past its last character in the original text (in chars).
    pub end_char: usize,
}

/// LangChain's `RecursiveCharacterTextSplitter`: split on the first separator found in the
/// text, merge the pieces back into chunks of at most `chunk_size` with up to
/// `chunk_overlap` carried over, and split pieces that are still too long on the next
/// separator. A piece that no separator can split (a long word with `""` absent from the
/// separators) stays one chunk, longer than `chunk_size`.
#[derive(Debug, Clone)]
pub struct RecursiveCharacterSplitter<'a> {
    chunk_size: usize,
    chunk_overlap: usize,
    separators: Vec<String>,
    keep_separator: KeepSeparator,
    strip_whitespace: bool,
    length: Length<'a>,
}

/// A merged chunk before positions are assigned: its text and the byte range of the
/// original text it was made from.
struct Raw {
    text: String,
    from: usize,
    to: usize,
}

impl RecursiveCharacterSplitter<'static> {
    /// A splitter with LangChain's defaults: separators `["\n\n", "\n", " ", ""]`, the
    /// separator kept at the start of the next piece, whitespace stripped, length in chars.
    ///
    /// Errors when `chunk_size` is 0 or `chunk_overlap` is not below `chunk_size`.
    pub fn new(chunk_size: usize, chunk_overlap: usize) -> Result<Self> {
        if chunk_size == 0 {
            return Err(Error::Invalid("chunk_size must be at least 1, got 0".into()));
        }
        if chunk_overlap >= chunk_size {
            return Err(Error::Invalid(format!("chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})")));
        }
        Ok(RecursiveCharacterSplitter {
            chunk_size,
            chunk_overlap,
            separators: DEFAULT_SEPARATORS.iter().map(|s| s.to_string()).collect(),
            keep_separator: KeepSeparator::Start,
            strip_whitespace: true,
            length: Length::Chars,
        })
    }
}

impl<'a> RecursiveCharacterSplitter<'a> {
    /// Measure lengths with `length` (e.g. a tokenizer's token count) instead of chars.
    pub fn with_length<'b>(self, length: Length<'b>) -> RecursiveCharacterSplitter<'b> {
        RecursiveCharacterSplitter {
            chunk_size: self.chunk_size,
            chunk_overlap: self.chunk_overlap,
            separators: self.separators,
            keep_separator: self.keep_separator,
            strip_whitespace: self.strip_whitespace,
            length,
        }
    }

    /// Literal separators, tried in order. An empty list means the defaults (as in
    /// LangChain).
    pub fn with_separators(mut self, separators: Vec<String>) -> Self {
        if !separators.is_empty() {
            self.separators = separators;
        }
        self
    }

    /// Where separators go (default: [`KeepSeparator::Start`]).
    pub fn with_keep_separator(mut self, keep: KeepSeparator) -> Self {
        self.keep_separator = keep;
        self
    }

    /// Whether chunks are stripped of leading and trailing whitespace (default: true).
    pub fn with_strip_whitespace(mut self, strip: bool) -> Self {
        self.strip_whitespace = strip;
        self
    }

    /// The maximum chunk length.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The chunk texts, as LangChain's `split_text` returns them.
    pub fn split_text(&self, text: &str) -> Vec<String> {
        self.split_raw(text).into_iter().map(|r| r.text).collect()
    }

    /// The chunks with their positions in `text`.
    ///
    /// `start_char` is LangChain's `start_index` (`add_start_index=True`): the chunk is
    /// searched for in the text from the previous chunk's start plus its length minus
    /// `chunk_overlap`. Where LangChain finds nothing (it reports -1: the chunk is not a
    /// substring, as when `keep_separator` is off and separators were re-joined, or a token
    /// length carried more than `chunk_overlap` chars over), the span is the stretch of the
    /// original text the chunk was made from, without its outer whitespace.
    pub fn split(&self, text: &str) -> Vec<TextChunk> {
        let raws = self.split_raw(text);
        let index = CharIndex::new(text);
        let mut out = Vec::with_capacity(raws.len());
        // LangChain's bookkeeping, in chars; `prev` is -1 after a miss, as in Python.
        let mut prev: i64 = 0;
        let mut prev_len: i64 = 0;
        for (i, raw) in raws.into_iter().enumerate() {
            let len = raw.text.chars().count();
            let offset = (prev + prev_len - self.chunk_overlap as i64).max(0) as usize;
            let found = index.find(text, &raw.text, offset);
            let (start, end) = match found {
                Some(start) => {
                    prev = start as i64;
                    (start, start + len)
                }
                None => {
                    prev = -1;
                    let (from, to) = trim_range(text, raw.from, raw.to);
                    (index.char_of(from), index.char_of(to))
                }
            };
            prev_len = len as i64;
            out.push(TextChunk { text: raw.text, index: i, start_char: start, end_char: end });
        }
        out
    }

    fn split_raw(&self, text: &str) -> Vec<Raw> {
        let mut out = Vec::new();
        self.split_recursive(text, 0, &self.separators, &mut out);
        out
    }

    /// LangChain's `_split_text` on `text`, which starts at byte `base` of the original.
    fn split_recursive(&self, text: &str, base: usize, separators: &[String], out: &mut Vec<Raw>) {
        let mut separator: &str = separators.last().map(String::as_str).unwrap_or("");
        let mut rest: &[String] = &[];
        for (i, s) in separators.iter().enumerate() {
            if s.is_empty() {
                separator = s;
                break;
            }
            if text.contains(s.as_str()) {
                separator = s;
                rest = &separators[i + 1..];
                break;
            }
        }
        let splits = split_on(text, base, separator, self.keep_separator);
        let merge_sep = if self.keep_separator == KeepSeparator::None { separator } else { "" };
        let mut good: Vec<(usize, &str)> = Vec::new();
        for (at, s) in splits {
            if self.length.of(s) < self.chunk_size {
                good.push((at, s));
                continue;
            }
            if !good.is_empty() {
                self.merge(&good, merge_sep, out);
                good.clear();
            }
            if rest.is_empty() {
                out.push(Raw { text: s.to_string(), from: at, to: at + s.len() });
            } else {
                self.split_recursive(s, at, rest, out);
            }
        }
        if !good.is_empty() {
            self.merge(&good, merge_sep, out);
        }
    }

    /// LangChain's `_merge_splits`: greedily fill chunks, then drop pieces from the front
    /// until what is left fits the overlap and leaves room for the next piece.
    fn merge(&self, splits: &[(usize, &str)], separator: &str, out: &mut Vec<Raw>) {
        let sep_len = self.length.of(separator);
        // (start byte, text, length) of the pieces in the chunk being built.
        let mut current: std::collections::VecDeque<(usize, &str, usize)> = Default::default();
        let mut total = 0usize;
        for &(at, d) in splits {
            let len = self.length.of(d);
            let sep_if = |n: usize| if n > 0 { sep_len } else { 0 };
            if total + len + sep_if(current.len()) > self.chunk_size && !current.is_empty() {
                self.join(&current, separator, out);
                while !current.is_empty()
                    && (total > self.chunk_overlap || (total + len + sep_if(current.len()) > self.chunk_size && total > 0))
                {
                    let first_len = current.front().map(|c| c.2).unwrap_or(0);
                    total = total.saturating_sub(first_len + if current.len() > 1 { sep_len } else { 0 });
                    current.pop_front();
                }
            }
            current.push_back((at, d, len));
            total += len + if current.len() > 1 { sep_len } else { 0 };
        }
        self.join(&current, separator, out);
    }

    /// LangChain's `_join_docs`: join, strip, and drop an empty result.
    fn join(&self, pieces: &std::collections::VecDeque<(usize, &str, usize)>, separator: &str, out: &mut Vec<Raw>) {
        let (Some(first), Some(last)) = (pieces.front(), pieces.back()) else {
            return;
        };
        let mut text = String::new();
        for (i, (_, piece, _)) in pieces.iter().enumerate() {
            if i > 0 {
                text.push_str(separator);
            }
            text.push_str(piece);
        }
        if self.strip_whitespace {
            let stripped = py_strip(&text);
            if stripped.len() != text.len() {
                text = stripped.to_string();
            }
        }
        if !text.is_empty() {
            out.push(Raw { text, from: first.0, to: last.0 + last.1.len() });
        }
    }
}

/// Split `text` (at byte `base` of the original) on a literal separator the way Python's
/// `re.split` with LangChain's `keep_separator` does; empty pieces are dropped. An empty
/// separator splits into characters.
fn split_on<'t>(text: &'t str, base: usize, separator: &str, keep: KeepSeparator) -> Vec<(usize, &'t str)> {
    let mut cuts = vec![0usize];
    if separator.is_empty() {
        cuts.extend(text.char_indices().skip(1).map(|(i, _)| i));
        cuts.push(text.len());
        return pieces_between(text, base, &cuts);
    }
    if keep == KeepSeparator::None {
        let mut out = Vec::new();
        let mut start = 0;
        for (at, _) in text.match_indices(separator) {
            if at > start {
                out.push((base + start, &text[start..at]));
            }
            start = at + separator.len();
        }
        if start < text.len() {
            out.push((base + start, &text[start..]));
        }
        return out;
    }
    for (at, _) in text.match_indices(separator) {
        cuts.push(match keep {
            KeepSeparator::End => at + separator.len(),
            _ => at,
        });
    }
    cuts.push(text.len());
    pieces_between(text, base, &cuts)
}

fn pieces_between<'t>(text: &'t str, base: usize, cuts: &[usize]) -> Vec<(usize, &'t str)> {
    cuts.windows(2).filter(|w| w[1] > w[0]).map(|w| (base + w[0], &text[w[0]..w[1]])).collect()
}

/// Python's `str.isspace`: Rust's White_Space plus the ASCII separators U+001C..U+001F.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub(crate) fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Python's `str.isprintable` for one character, except that unassigned code points
/// (category Cn, which needs Unicode tables) count as printable here unless they are
/// noncharacters.
fn py_isprintable(c: char) -> bool {
    let u = c as u32;
    if c == ' ' {
        return true;
    }
    // Cc
    if u < 0x20 || (0x7f..=0x9f).contains(&u) {
        return false;
    }
    // Zs (other than the space), Zl, Zp
    if matches!(u, 0xa0 | 0x1680 | 0x2000..=0x200a | 0x2028 | 0x2029 | 0x202f | 0x205f | 0x3000) {
        return false;
    }
    // Cf
    if matches!(
        u,
        0xad | 0x600..=0x605
            | 0x61c
            | 0x6dd
            | 0x70f
            | 0x890..=0x891
            | 0x8e2
            | 0x180e
            | 0x200b..=0x200f
            | 0x202a..=0x202e
            | 0x2060..=0x2064
            | 0x2066..=0x206f
            | 0xfeff
            | 0xfff9..=0xfffb
            | 0x110bd
            | 0x110cd
            | 0x13430..=0x1343f
            | 0x1bca0..=0x1bca3
            | 0x1d173..=0x1d17a
            | 0xe0001
            | 0xe0020..=0xe007f
    ) {
        return false;
    }
    // Co (private use) and noncharacters (Cn)
    if matches!(u, 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd | 0xfdd0..=0xfdef) {
        return false;
    }
    (u & 0xfffe) != 0xfffe
}

/// Converts between char and byte offsets of one text.
struct CharIndex {
    /// Byte offset of each char, then the text's length.
    bytes: Vec<usize>,
}

impl CharIndex {
    fn new(text: &str) -> Self {
        let mut bytes: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        bytes.push(text.len());
        CharIndex { bytes }
    }

    fn chars(&self) -> usize {
        self.bytes.len() - 1
    }

    fn byte_of(&self, char_offset: usize) -> usize {
        self.bytes.get(char_offset).copied().unwrap_or_else(|| self.bytes.last().copied().unwrap_or(0))
    }

    /// The char offset of a byte offset (on a char boundary; otherwise the char it is in).
    fn char_of(&self, byte: usize) -> usize {
        match self.bytes.binary_search(&byte) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        }
    }

    /// Python's `text.find(needle, start)` in chars.
    fn find(&self, text: &str, needle: &str, start: usize) -> Option<usize> {
        if start > self.chars() {
            return None;
        }
        let from = self.byte_of(start);
        text[from..].find(needle).map(|b| self.char_of(from + b))
    }
}

/// The byte range `from..to` of `text` without leading and trailing (Python) whitespace.
fn trim_range(text: &str, from: usize, to: usize) -> (usize, usize) {
    let Some(slice) = text.get(from..to) else {
        return (from, to);
    };
    let lead = slice.len() - slice.trim_start_matches(py_isspace).len();
    let trimmed = py_strip(slice);
    (from + lead, from + lead + trimmed.len())
}

/// A section of a Markdown text under one header path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkdownSection {
    /// The section's text: its lines stripped, lines of one block joined by `"\n"` and
    /// blocks by `"  \n"` (as LangChain does).
    pub text: String,
    /// The header path: the name of each header level above the section mapped to that
    /// header's text.
    pub headers: BTreeMap<String, String>,
    /// The first char of the section's content in the original text.
    pub start_char: usize,
    /// One past the last char of its content in the original text.
    pub end_char: usize,
}

/// A header level to split on and the metadata key its text is stored under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderLevel {
    /// 1 for `#` through 6 for `######`.
    pub level: u8,
    /// The metadata key, e.g. `"h1"` or `"Chapter"`.
    pub name: String,
}

/// The six Markdown header levels keyed `h1` .. `h6`.
pub fn default_header_levels() -> Vec<HeaderLevel> {
    (1..=6u8).map(|level| HeaderLevel { level, name: format!("h{level}") }).collect()
}

/// LangChain's `MarkdownHeaderTextSplitter`: a section per run of lines under the same
/// header path, the headers' texts in the section's metadata, headers inside ``` or ~~~
/// code fences left alone.
#[derive(Debug, Clone)]
pub struct MarkdownHeaderSplitter {
    /// (marker such as `"##"`, metadata key), longest marker first.
    headers: Vec<(String, String)>,
    strip_headers: bool,
    return_each_line: bool,
}

/// A block of lines with one header path, before aggregation.
struct Block {
    lines: Vec<String>,
    headers: BTreeMap<String, String>,
    from: usize,
    to: usize,
}

impl MarkdownHeaderSplitter {
    /// Split on the given header levels. Errors on a level outside 1..=6, a repeated level
    /// or an empty name.
    pub fn new(levels: &[HeaderLevel]) -> Result<Self> {
        let mut seen = [false; 7];
        let mut headers = Vec::with_capacity(levels.len());
        for h in levels {
            if !(1..=6).contains(&h.level) {
                return Err(Error::Invalid(format!("markdown header level must be 1..=6, got {} (for `{}`)", h.level, h.name)));
            }
            if std::mem::replace(&mut seen[usize::from(h.level)], true) {
                return Err(Error::Invalid(format!("markdown header level {} is listed twice", h.level)));
            }
            if h.name.is_empty() {
                return Err(Error::Invalid(format!("markdown header level {} has an empty name", h.level)));
            }
            headers.push(("#".repeat(usize::from(h.level)), h.name.clone()));
        }
        Ok(Self::from_markers(headers))
    }

    /// LangChain's `headers_to_split_on`: (marker, metadata key) pairs; a marker's level is
    /// its number of `#`.
    pub fn from_markers(mut headers: Vec<(String, String)>) -> Self {
        // Stable, like Python's `sorted`.
        headers.sort_by_key(|(marker, _)| std::cmp::Reverse(marker.chars().count()));
        MarkdownHeaderSplitter { headers, strip_headers: true, return_each_line: false }
    }

    /// Keep header lines in the section text (LangChain's `strip_headers = False`).
    pub fn with_strip_headers(mut self, strip: bool) -> Self {
        self.strip_headers = strip;
        self
    }

    /// One section per line block instead of per header path (`return_each_line`).
    pub fn with_return_each_line(mut self, each: bool) -> Self {
        self.return_each_line = each;
        self
    }

    /// The sections of `text`, in order.
    pub fn split(&self, text: &str) -> Vec<MarkdownSection> {
        let mut blocks: Vec<Block> = Vec::new();
        let mut content: Vec<String> = Vec::new();
        let mut span: Option<(usize, usize)> = None;
        let mut current: BTreeMap<String, String> = BTreeMap::new();
        let mut stack: Vec<(usize, String)> = Vec::new();
        let mut initial: BTreeMap<String, String> = BTreeMap::new();
        let mut in_code = false;
        let mut fence = "";
        let mut line_start = 0usize; // chars

        for line in text.split('\n') {
            let line_chars = line.chars().count();
            let lead = line.chars().take_while(|&c| py_isspace(c)).count();
            let stripped_raw = py_strip(line);
            let line_span = (line_start + lead, line_start + lead + stripped_raw.chars().count());
            line_start += line_chars + 1;
            let stripped: String = stripped_raw.chars().filter(|&c| py_isprintable(c)).collect();

            if !in_code {
                if stripped.starts_with("```") && stripped.matches("```").count() == 1 {
                    in_code = true;
                    fence = "```";
                } else if stripped.starts_with("~~~") {
                    in_code = true;
                    fence = "~~~";
                }
            } else if stripped.starts_with(fence) {
                in_code = false;
                fence = "";
            }
            if in_code {
                push_line(&mut content, &mut span, stripped, line_span);
                continue;
            }

            let header = self.headers.iter().find(|(marker, _)| {
                stripped.starts_with(marker.as_str()) && (stripped.len() == marker.len() || stripped[marker.len()..].starts_with(' '))
            });
            match header {
                Some((marker, name)) => {
                    let level = marker.matches('#').count();
                    while stack.last().is_some_and(|(l, _)| *l >= level) {
                        if let Some((_, popped)) = stack.pop() {
                            initial.remove(&popped);
                        }
                    }
                    stack.push((level, name.clone()));
                    initial.insert(name.clone(), py_strip(&stripped[marker.len()..]).to_string());
                    flush(&mut content, &mut span, &current, &mut blocks);
                    if !self.strip_headers {
                        push_line(&mut content, &mut span, stripped, line_span);
                    }
                }
                None => {
                    if !stripped.is_empty() {
                        push_line(&mut content, &mut span, stripped, line_span);
                    } else {
                        flush(&mut content, &mut span, &current, &mut blocks);
                    }
                }
            }
            current = initial.clone();
        }
        flush(&mut content, &mut span, &current, &mut blocks);

        if self.return_each_line {
            blocks.into_iter().map(Block::into_section).collect()
        } else {
            self.aggregate(blocks)
        }
    }

    /// LangChain's `aggregate_lines_to_chunks`.
    fn aggregate(&self, blocks: Vec<Block>) -> Vec<MarkdownSection> {
        let mut out: Vec<MarkdownSection> = Vec::new();
        for block in blocks {
            if let Some(last) = out.last_mut() {
                if last.headers == block.headers {
                    last.text.push_str("  \n");
                    last.text.push_str(&block.lines.join("\n"));
                    last.end_char = block.to;
                    continue;
                }
                let last_line_is_header = last.text.rsplit('\n').next().is_some_and(|l| l.starts_with('#'));
                if last.headers.len() < block.headers.len() && last_line_is_header && !self.strip_headers {
                    last.text.push_str("  \n");
                    last.text.push_str(&block.lines.join("\n"));
                    last.end_char = block.to;
                    last.headers = block.headers;
                    continue;
                }
            }
            out.push(block.into_section());
        }
        out
    }
}

/// Adds a line to the block being built and widens its span.
fn push_line(content: &mut Vec<String>, span: &mut Option<(usize, usize)>, line: String, at: (usize, usize)) {
    content.push(line);
    *span = Some(match *span {
        Some((from, _)) => (from, at.1),
        None => at,
    });
}

/// Ends the block being built, if it has lines.
fn flush(content: &mut Vec<String>, span: &mut Option<(usize, usize)>, headers: &BTreeMap<String, String>, blocks: &mut Vec<Block>) {
    let taken = span.take();
    if !content.is_empty() {
        let (from, to) = taken.unwrap_or((0, 0));
        blocks.push(Block { lines: std::mem::take(content), headers: headers.clone(), from, to });
    }
}

impl Block {
    fn into_section(self) -> MarkdownSection {
        MarkdownSection { text: self.lines.join("\n"), headers: self.headers, start_char: self.from, end_char: self.to }
    }
}

/// What a length is counted in, in a [`SplitterConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthUnit {
    /// Unicode scalar values.
    #[default]
    Chars,
    /// Tokens of the embedding model's tokenizer (the caller passes the counter).
    Tokens,
}

/// Which splitter a [`SplitterConfig`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// [`RecursiveCharacterSplitter`].
    #[default]
    Recursive,
    /// [`MarkdownHeaderSplitter`], then each section longer than `chunk_size` through the
    /// recursive splitter (unless `split_sections` is false).
    Markdown,
    /// The whole document is one chunk.
    None,
}

/// How documents are cut into chunks: the serde form of a splitter.
///
/// ```toml
/// kind = "recursive"   # or "markdown" or "none"
/// chunk_size = 1000
/// chunk_overlap = 200
/// length = "chars"     # or "tokens"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SplitterConfig {
    /// The splitter.
    pub kind: SplitKind,
    /// The maximum chunk length, in `length` units (at least 1).
    pub chunk_size: usize,
    /// How much of a chunk's end is repeated at the next one's start (below `chunk_size`).
    pub chunk_overlap: usize,
    /// The unit of `chunk_size` and `chunk_overlap`.
    pub length: LengthUnit,
    /// Literal separators for the recursive splitter; empty means `["\n\n", "\n", " ", ""]`.
    pub separators: Vec<String>,
    /// Where the recursive splitter keeps separators.
    pub keep_separator: KeepSeparator,
    /// Whether chunks are stripped of outer whitespace.
    pub strip_whitespace: bool,
    /// Markdown: the header levels to split on and their metadata keys.
    pub headers: Vec<HeaderLevel>,
    /// Markdown: leave header lines out of the section text.
    pub strip_headers: bool,
    /// Markdown: split sections further with the recursive splitter.
    pub split_sections: bool,
}

impl Default for SplitterConfig {
    fn default() -> Self {
        SplitterConfig {
            kind: SplitKind::Recursive,
            chunk_size: 1000,
            chunk_overlap: 200,
            length: LengthUnit::Chars,
            separators: Vec::new(),
            keep_separator: KeepSeparator::Start,
            strip_whitespace: true,
            headers: default_header_levels(),
            strip_headers: true,
            split_sections: true,
        }
    }
}

impl SplitterConfig {
    /// Checks the settings without splitting anything.
    pub fn validate(&self) -> Result<()> {
        if self.kind == SplitKind::None {
            return Ok(());
        }
        if self.kind == SplitKind::Markdown {
            MarkdownHeaderSplitter::new(&self.headers)?;
            if !self.split_sections {
                return Ok(());
            }
        }
        RecursiveCharacterSplitter::new(self.chunk_size, self.chunk_overlap).map(|_| ())
    }

    fn recursive<'a>(&self, tokens: Option<&'a dyn Fn(&str) -> usize>) -> Result<RecursiveCharacterSplitter<'a>> {
        let length = match (self.length, tokens) {
            (LengthUnit::Chars, _) => Length::Chars,
            (LengthUnit::Tokens, Some(f)) => Length::Custom(f),
            (LengthUnit::Tokens, None) => {
                return Err(Error::Invalid("splitter length = \"tokens\" needs a tokenizer to count tokens; none was given".into()))
            }
        };
        Ok(RecursiveCharacterSplitter::new(self.chunk_size, self.chunk_overlap)?
            .with_length(length)
            .with_separators(self.separators.clone())
            .with_keep_separator(self.keep_separator)
            .with_strip_whitespace(self.strip_whitespace))
    }

    /// Cuts `doc` into chunks. `tokens` counts the tokens of a text; it is required when
    /// `length = "tokens"` and ignored otherwise.
    ///
    /// Each chunk carries the document's metadata; the Markdown splitter adds the header
    /// path (header key → header text). An empty (or, with `strip_whitespace`, blank)
    /// document has no chunks.
    pub fn split_document(&self, doc: &Document, tokens: Option<&dyn Fn(&str) -> usize>) -> Result<Vec<Chunk>> {
        self.validate()?;
        let make = |index: usize, text: String, start: usize, end: usize, extra: &BTreeMap<String, String>| {
            let mut metadata = doc.metadata.clone();
            for (k, v) in extra {
                metadata.insert(k.clone(), serde_json::Value::String(v.clone()));
            }
            Chunk { doc_id: doc.id.clone(), index, text, start_char: start, end_char: end, metadata }
        };
        let no_headers = BTreeMap::new();
        match self.kind {
            SplitKind::None => {
                let blank = if self.strip_whitespace { py_strip(&doc.text).is_empty() } else { doc.text.is_empty() };
                if blank {
                    return Ok(Vec::new());
                }
                Ok(vec![make(0, doc.text.clone(), 0, doc.text.chars().count(), &no_headers)])
            }
            SplitKind::Recursive => {
                let splitter = self.recursive(tokens)?;
                Ok(splitter.split(&doc.text).into_iter().map(|c| make(c.index, c.text, c.start_char, c.end_char, &no_headers)).collect())
            }
            SplitKind::Markdown => {
                let sections = MarkdownHeaderSplitter::new(&self.headers)?.with_strip_headers(self.strip_headers).split(&doc.text);
                let mut out = Vec::new();
                if !self.split_sections {
                    for s in sections {
                        out.push(make(out.len(), s.text, s.start_char, s.end_char, &s.headers));
                    }
                    return Ok(out);
                }
                let splitter = self.recursive(tokens)?;
                let index = CharIndex::new(&doc.text);
                for s in sections {
                    // Where the section's text is verbatim in the document, sub-chunk spans
                    // are exact; otherwise (lines were stripped or re-joined) a sub-chunk is
                    // looked for inside the section, and failing that gets the section's span.
                    let from = index.byte_of(s.start_char);
                    let to = index.byte_of(s.end_char);
                    let verbatim = doc.text.get(from..to) == Some(s.text.as_str());
                    for c in splitter.split(&s.text) {
                        let (start, end) = if verbatim {
                            (s.start_char + c.start_char, s.start_char + c.end_char)
                        } else {
                            match doc.text.get(from..to).and_then(|sec| sec.find(c.text.as_str())) {
                                Some(b) => {
                                    let start = index.char_of(from + b);
                                    (start, start + c.text.chars().count())
                                }
                                None => (s.start_char, s.end_char),
                            }
                        };
                        out.push(make(out.len(), c.text, start, end, &s.headers));
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn cases() -> Vec<Value> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/split_cases.jsonl");
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn words(s: &str) -> usize {
        s.split(py_isspace).filter(|w| !w.is_empty()).count()
    }

    #[test]
    fn recursive_matches_langchain() {
        let mut checked = 0;
        let mut misses = 0;
        for case in cases().iter().filter(|c| c["kind"] == "recursive") {
            let name = format!(
                "{} size={} overlap={} keep={} length={}",
                case["name"], case["chunk_size"], case["chunk_overlap"], case["keep_separator"], case["length"]
            );
            let text = case["text"].as_str().unwrap();
            let keep = match &case["keep_separator"] {
                Value::String(s) if s == "end" => KeepSeparator::End,
                Value::String(_) => KeepSeparator::Start,
                _ => KeepSeparator::None,
            };
            let seps: Vec<String> = match &case["separators"] {
                Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
                _ => Vec::new(),
            };
            let words_fn: &dyn Fn(&str) -> usize = &words;
            let length = if case["length"] == "words" { Length::Custom(words_fn) } else { Length::Chars };
            let splitter = RecursiveCharacterSplitter::new(
                case["chunk_size"].as_u64().unwrap() as usize,
                case["chunk_overlap"].as_u64().unwrap() as usize,
            )
            .unwrap()
            .with_length(length)
            .with_separators(seps)
            .with_keep_separator(keep);
            let got = splitter.split(text);
            let want = case["chunks"].as_array().unwrap();
            let got_texts: Vec<&str> = got.iter().map(|c| c.text.as_str()).collect();
            let want_texts: Vec<&str> = want.iter().map(|c| c["text"].as_str().unwrap()).collect();
            assert_eq!(got_texts, want_texts, "{name}");
            let n = text.chars().count();
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(g.index, i);
                assert!(g.start_char <= g.end_char && g.end_char <= n, "{name}: chunk {i} span out of range");
                let start = w["start"].as_i64().unwrap();
                if start >= 0 {
                    assert_eq!(g.start_char as i64, start, "{name}: start of chunk {i} {:?}", g.text);
                    assert_eq!(g.end_char - g.start_char, g.text.chars().count(), "{name}");
                } else {
                    // LangChain found nothing; the span is where the chunk was made from:
                    // the same text up to the whitespace separators that were re-joined.
                    misses += 1;
                    let dense = |s: &str| s.chars().filter(|c| !py_isspace(*c)).collect::<String>();
                    let region = char_slice(text, g.start_char, g.end_char);
                    assert_eq!(dense(&region), dense(&g.text), "{name}: chunk {i}");
                }
            }
            checked += 1;
        }
        assert!(checked > 100, "only {checked} recursive cases");
        assert!(misses > 0, "the fixtures have LangChain misses (-1); the fallback must be exercised");
    }

    #[test]
    fn markdown_matches_langchain() {
        let mut checked = 0;
        for case in cases().iter().filter(|c| c["kind"] == "markdown") {
            let headers: Vec<(String, String)> = case["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap().to_string(), h[1].as_str().unwrap().to_string()))
                .collect();
            let splitter = MarkdownHeaderSplitter::from_markers(headers)
                .with_strip_headers(case["strip_headers"].as_bool().unwrap())
                .with_return_each_line(case["return_each_line"].as_bool().unwrap());
            let text = case["text"].as_str().unwrap();
            let got = splitter.split(text);
            let want = case["chunks"].as_array().unwrap();
            let label =
                format!("{} headers={} strip={} each={}", case["name"], case["headers"], case["strip_headers"], case["return_each_line"]);
            assert_eq!(got.len(), want.len(), "{label}: {got:#?}");
            let n = text.chars().count();
            for (g, w) in got.iter().zip(want) {
                assert_eq!(g.text, w["text"].as_str().unwrap(), "{label}");
                let meta: BTreeMap<String, String> = serde_json::from_value(w["metadata"].clone()).unwrap();
                assert_eq!(g.headers, meta, "{label}: {:?}", g.text);
                assert!(g.start_char <= g.end_char && g.end_char <= n, "{label}");
            }
            checked += 1;
        }
        assert!(checked >= 10);
    }

    #[test]
    fn validation() {
        let e = RecursiveCharacterSplitter::new(0, 0).unwrap_err().to_string();
        assert!(e.contains("chunk_size"), "{e}");
        let e = RecursiveCharacterSplitter::new(10, 10).unwrap_err().to_string();
        assert!(e.contains("chunk_overlap (10)") && e.contains("chunk_size (10)"), "{e}");
        assert!(RecursiveCharacterSplitter::new(1, 0).is_ok());
        assert!(MarkdownHeaderSplitter::new(&[HeaderLevel { level: 7, name: "x".into() }]).is_err());
        assert!(
            MarkdownHeaderSplitter::new(&[HeaderLevel { level: 2, name: "a".into() }, HeaderLevel { level: 2, name: "b".into() }]).is_err()
        );
    }

    /// A small xorshift PRNG so the property tests are reproducible without a test crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_text(rng: &mut Rng) -> String {
        const ALPHABET: [&str; 14] = ["a", "bc", "é", "🔥", "中文", " ", "  ", "\n", "\n\n", "\t", "word", "x", "\u{a0}", "👩\u{200d}🔬"];
        let n = rng.below(200);
        (0..n).map(|_| ALPHABET[rng.below(ALPHABET.len())]).collect()
    }

    fn char_slice(text: &str, start: usize, end: usize) -> String {
        text.chars().skip(start).take(end - start).collect()
    }

    #[test]
    fn property_chunks_fit_and_spans_index_the_text() {
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        for round in 0..400 {
            let text = random_text(&mut rng);
            let size = 1 + rng.below(40);
            let overlap = rng.below(size);
            let keep = [KeepSeparator::Start, KeepSeparator::End, KeepSeparator::None][rng.below(3)];
            let splitter = RecursiveCharacterSplitter::new(size, overlap).unwrap().with_keep_separator(keep);
            let n = text.chars().count();
            for (i, c) in splitter.split(&text).iter().enumerate() {
                let len = c.text.chars().count();
                // With "" among the separators every piece can be split down to one char.
                assert!(len <= size, "round {round}: chunk {i} has {len} > {size} chars: {:?}", c.text);
                assert!(!c.text.is_empty());
                assert!(c.start_char <= c.end_char && c.end_char <= n, "round {round}");
                if keep != KeepSeparator::None {
                    // Every chunk is a substring of the text, and its span says where.
                    assert_eq!(char_slice(&text, c.start_char, c.end_char), c.text, "round {round}");
                }
            }
            // Without "" a word longer than chunk_size stays whole: the only chunks over the
            // size are single unsplittable pieces (no separator inside).
            let coarse = RecursiveCharacterSplitter::new(size, overlap)
                .unwrap()
                .with_separators(vec!["\n\n".into(), "\n".into(), " ".into()])
                .with_keep_separator(keep);
            for c in coarse.split(&text) {
                if c.text.chars().count() > size {
                    let inner = py_strip(&c.text);
                    assert!(!inner.contains(' ') && !inner.contains('\n'), "round {round}: {:?} could be split", c.text);
                }
                assert!(c.end_char <= n);
            }
        }
    }

    #[test]
    fn property_markdown_and_token_splits_never_panic_and_stay_in_range() {
        const PARTS: [&str; 16] =
            ["# ", "## ", "###### ", "#", "```", "~~~", "\n", "\n\n", "  ", "title", "text", "🔥", "\u{200d}", "\t", "中", "```x```"];
        let mut rng = Rng(42);
        let count: &dyn Fn(&str) -> usize = &|s: &str| s.split_whitespace().count() + s.matches('#').count();
        for round in 0..300 {
            let n = rng.below(120);
            let text: String = (0..n).map(|_| PARTS[rng.below(PARTS.len())]).collect();
            let chars = text.chars().count();
            let size = 1 + rng.below(30);
            let cfg = SplitterConfig {
                kind: [SplitKind::Markdown, SplitKind::Recursive][rng.below(2)],
                chunk_size: size,
                chunk_overlap: rng.below(size),
                length: [LengthUnit::Chars, LengthUnit::Tokens][rng.below(2)],
                strip_headers: rng.below(2) == 0,
                ..SplitterConfig::default()
            };
            let chunks = cfg.split_document(&doc(&text), Some(count)).unwrap();
            for (i, c) in chunks.iter().enumerate() {
                assert_eq!(c.index, i);
                assert!(!c.text.is_empty(), "round {round}");
                assert!(c.start_char <= c.end_char && c.end_char <= chars, "round {round}: {c:?}");
            }
            for each in [false, true] {
                for s in MarkdownHeaderSplitter::new(&default_header_levels()).unwrap().with_return_each_line(each).split(&text) {
                    assert!(s.start_char <= s.end_char && s.end_char <= chars, "round {round}");
                }
            }
        }
    }

    #[test]
    fn token_length_is_pluggable() {
        let text = "one two three four five six seven eight nine ten";
        let count: &dyn Fn(&str) -> usize = &|s: &str| s.split_whitespace().count();
        let chunks = RecursiveCharacterSplitter::new(3, 0).unwrap().with_length(Length::Custom(count)).split_text(text);
        assert_eq!(chunks, ["one two three", "four five six", "seven eight nine", "ten"]);
    }

    fn doc(text: &str) -> Document {
        let mut metadata = serde_json::Map::new();
        metadata.insert("lang".into(), "en".into());
        Document { id: "a.md".into(), source: "a.md".into(), text: text.into(), metadata }
    }

    #[test]
    fn config_applies_to_a_document() {
        let cfg: SplitterConfig =
            serde_json::from_str(r#"{"kind":"recursive","chunk_size":10,"chunk_overlap":2,"length":"chars"}"#).unwrap();
        let d = doc("alpha beta gamma delta epsilon");
        let chunks = cfg.split_document(&d, None).unwrap();
        assert!(chunks.len() > 1);
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.index, i);
            assert_eq!(c.doc_id, "a.md");
            assert_eq!(c.metadata["lang"], "en");
            assert_eq!(char_slice(&d.text, c.start_char, c.end_char), c.text);
        }

        let tokens: SplitterConfig = serde_json::from_str(r#"{"kind":"recursive","length":"tokens"}"#).unwrap();
        let e = tokens.split_document(&d, None).unwrap_err().to_string();
        assert!(e.contains("tokenizer"), "{e}");
        let count: &dyn Fn(&str) -> usize = &|s: &str| s.split_whitespace().count();
        let tokens = SplitterConfig { chunk_size: 2, chunk_overlap: 0, ..tokens };
        let chunks = tokens.split_document(&d, Some(count)).unwrap();
        assert_eq!(chunks.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(), ["alpha beta", "gamma delta", "epsilon"]);

        let none: SplitterConfig = serde_json::from_str(r#"{"kind":"none"}"#).unwrap();
        let chunks = none.split_document(&d, None).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].end_char, d.text.chars().count());
        assert!(none.split_document(&doc(""), None).unwrap().is_empty());

        assert!(serde_json::from_str::<SplitterConfig>(r#"{"kind":"nope"}"#).is_err());
        assert!(serde_json::from_str::<SplitterConfig>(r#"{"chunk_sise":3}"#).is_err());
        let bad = SplitterConfig { chunk_size: 5, chunk_overlap: 5, ..SplitterConfig::default() };
        assert!(bad.split_document(&d, None).is_err());
    }

    #[test]
    fn markdown_config_records_the_header_path_and_splits_sections() {
        let text = "# Guide\n\nIntro.\n\n## Setup\n\nInstall the thing, then configure the other thing.\n\n```\n# code\n```\n";
        let cfg: SplitterConfig = serde_json::from_str(
            r#"{"kind":"markdown","chunk_size":20,"chunk_overlap":0,"headers":[{"level":1,"name":"title"},{"level":2,"name":"section"}]}"#,
        )
        .unwrap();
        let d = doc(text);
        let chunks = cfg.split_document(&d, None).unwrap();
        assert_eq!(chunks[0].text, "Intro.");
        assert_eq!(chunks[0].metadata["title"], "Guide");
        assert!(chunks[0].metadata.get("section").is_none());
        assert_eq!(char_slice(text, chunks[0].start_char, chunks[0].end_char), "Intro.");
        let setup: Vec<&Chunk> = chunks.iter().filter(|c| c.metadata.get("section").is_some()).collect();
        assert!(setup.len() > 2);
        for c in &chunks {
            assert!(c.text.chars().count() <= 20, "{:?}", c.text);
            assert!(c.end_char <= text.chars().count());
        }
        // The code fence stays in the Setup section: `# code` is not a header.
        assert!(setup.iter().any(|c| c.text.contains("# code")));
        assert_eq!(chunks.iter().map(|c| c.index).collect::<Vec<_>>(), (0..chunks.len()).collect::<Vec<_>>());
    }

    #[test]
    fn python_whitespace_and_printable() {
        assert_eq!(py_strip("\u{1c}\u{a0} x \u{3000}"), "x");
        assert!(!py_isprintable('\u{200d}'));
        assert!(!py_isprintable('\t'));
        assert!(py_isprintable('🔥'));
        assert!(py_isprintable('中'));
    }
}
