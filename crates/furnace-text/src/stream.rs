//! Streaming detokenization: [`IncrementalDecoder`].
//!
//! Decoding each new token on its own is wrong in general: byte-level tokens can
//! split a UTF-8 character, and decoders strip or join spaces depending on the
//! neighbouring tokens. The decoder keeps two offsets into the ids seen so far (as
//! Hugging Face's text-generation-inference does): it re-decodes a short window
//! of recent ids and emits only the text that the newest ids added, holding text
//! back while the window ends in an incomplete character (U+FFFD).

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Turns token ids pushed one at a time into text, never splitting a character.
///
/// Concatenating every [`push`](Self::push) result and the final
/// [`flush`](Self::flush) gives the same text as decoding all ids at once.
#[derive(Clone, Debug)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the window whose text has already been emitted (context for the decoder).
    prefix_offset: usize,
    /// End of the emitted part of the window.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder over `tokenizer`; `skip_special` leaves special tokens out.
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        IncrementalDecoder { tokenizer, skip_special, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one token id and returns the text it completes (possibly empty).
    ///
    /// Never returns half a UTF-8 character: while the decoded window ends in
    /// U+FFFD the text is held back until later ids complete it (or `flush`).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.window_texts()?;
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let added = suffix_after(&new_text, &prefix_text);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(added)
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever text is still held back and resets the window; call it once
    /// the sequence has ended.
    pub fn flush(&mut self) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.window_texts()?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(suffix_after(&new_text, &prefix_text))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text of the already-emitted part of the window and of the whole window.
    fn window_texts(&self) -> Result<(String, String)> {
        let prefix = &self.ids[self.prefix_offset..self.read_offset];
        let prefix_text = self.tokenizer.decode(prefix, self.skip_special)?;
        let window = &self.ids[self.prefix_offset..];
        let new_text = self.tokenizer.decode(window, self.skip_special)?;
        Ok((prefix_text, new_text))
    }
}

/// The part of `text` after `prefix`; when `prefix` is not literally a prefix (a
/// decoder changed earlier text), everything after their common prefix.
fn suffix_after(text: &str, prefix: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = text
        .char_indices()
        .zip(prefix.chars())
        .find(|((_, a), b)| a != b)
        .map(|((at, _), _)| at)
        .unwrap_or_else(|| prefix.len().min(text.len()));
    text.get(common..).unwrap_or_default().to_string()
}
