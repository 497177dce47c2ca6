//! The [`Tokenizer`]: text to token ids and back, with the model's special tokens.
//!
//! A tokenizer is loaded from a Hugging Face `tokenizer.json` (optionally with the
//! neighbouring `tokenizer_config.json` and `generation_config.json`), or built from
//! GGUF metadata ([`GgufTokenizerSpec`]). Either way the work is done by the
//! Hugging Face `tokenizers` library, so the ids match `transformers` exactly.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gguf::GgufTokenizerSpec;
use crate::stream::IncrementalDecoder;

/// A text tokenizer with its special-token configuration.
///
/// Cheap to clone (the state is shared behind an [`Arc`]) and `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    pad_id: Option<u32>,
    /// Whether the model wants BOS in front of the text when special tokens are added.
    add_bos: bool,
    /// Whether `tokenizer.json`'s post-processor runs when special tokens are added
    /// (true for Hugging Face files; GGUF tokenizers have none).
    use_post_processor: bool,
    /// Whether that post-processor already puts BOS in front.
    post_processor_adds_bos: bool,
    special_ids: HashSet<u32>,
}

/// The parts of a tokenizer that do not come from `tokenizer.json` itself.
#[derive(Default)]
struct SpecialConfig {
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    pad_id: Option<u32>,
    add_bos: bool,
    use_post_processor: bool,
    extra_special: Vec<u32>,
}

impl Tokenizer {
    fn build(hf: tokenizers::Tokenizer, config: SpecialConfig) -> Result<Self> {
        let mut special_ids: HashSet<u32> =
            hf.get_added_tokens_decoder().into_iter().filter(|(_, token)| token.special).map(|(id, _)| id).collect();
        special_ids.extend(config.bos_id);
        special_ids.extend(config.eos_ids.iter().copied());
        special_ids.extend(config.pad_id);
        special_ids.extend(config.extra_special);
        let post_processor_adds_bos = match (config.use_post_processor, config.bos_id) {
            (true, Some(bos)) => {
                let encoding = hf.encode("", true).map_err(Error::Tokenizer)?;
                encoding.get_ids().first() == Some(&bos)
            }
            _ => false,
        };
        let bos_token = config.bos_token.or_else(|| config.bos_id.and_then(|id| hf.id_to_token(id)));
        let eos_token = config.eos_token.or_else(|| config.eos_ids.first().and_then(|&id| hf.id_to_token(id)));
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                hf,
                bos_id: config.bos_id,
                bos_token,
                eos_ids: config.eos_ids,
                eos_token,
                pad_id: config.pad_id,
                add_bos: config.add_bos,
                use_post_processor: config.use_post_processor,
                post_processor_adds_bos,
                special_ids,
            }),
        })
    }

    /// Builds the tokenizer described by GGUF metadata, equivalent to the
    /// `tokenizer.json` that Hugging Face's GGUF converter produces.
    ///
    /// Control tokens (type 3) become special added tokens and user-defined tokens
    /// (type 4) plain added tokens; both are matched when they appear in the text.
    pub fn from_gguf(spec: &GgufTokenizerSpec) -> Result<Self> {
        let json = spec.to_tokenizer_json()?;
        let hf = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(Error::Tokenizer)?;
        let config = SpecialConfig {
            bos_id: spec.bos_id,
            bos_token: None,
            eos_ids: spec.eos_id.into_iter().collect(),
            eos_token: None,
            pad_id: spec.pad_id,
            add_bos: spec.add_bos,
            use_post_processor: false,
            extra_special: spec.unk_id.into_iter().collect(),
        };
        Self::build(hf, config)
    }

    /// Loads a `tokenizer.json` file. No BOS/EOS information is available this way;
    /// use [`Tokenizer::from_hf_dir`] for a model directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Loads `tokenizer.json` text as [`Tokenizer::from_file`] does; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let hf = parse_tokenizer_json(text, path)?;
        let config = SpecialConfig { use_post_processor: true, ..SpecialConfig::default() };
        Self::build(hf, config)
    }

    /// Loads the tokenizer of a Hugging Face model directory: `tokenizer.json`, plus
    /// `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `add_bos_token`)
    /// and `generation_config.json` (`eos_token_id`, a number or a list) when present;
    /// `config.json` supplies BOS/EOS ids that neither of those gives.
    ///
    /// Fails with [`Error::MissingTokenizer`] when the directory has no `tokenizer.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::MissingTokenizer(dir.to_path_buf()));
        }
        let hf = load_tokenizer_json(&tokenizer_path)?;
        let tokenizer_config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_optional_json(&dir.join("generation_config.json"))?;
        let model_config = read_optional_json(&dir.join("config.json"))?;
        let tc = |key: &str| tokenizer_config.as_ref().and_then(|c| c.get(key));
        let gc = |key: &str| generation_config.as_ref().and_then(|c| c.get(key));
        let mc = |key: &str| model_config.as_ref().and_then(|c| c.get(key));

        let bos_token = tc("bos_token").and_then(token_content);
        let bos_id = bos_token
            .as_deref()
            .and_then(|t| hf.token_to_id(t))
            .or_else(|| gc("bos_token_id").and_then(|v| id_list(v).first().copied()))
            .or_else(|| mc("bos_token_id").and_then(|v| id_list(v).first().copied()));

        let eos_token = tc("eos_token").and_then(token_content);
        let mut eos_ids: Vec<u32> = eos_token.as_deref().and_then(|t| hf.token_to_id(t)).into_iter().collect();
        let generation_eos = gc("eos_token_id").or_else(|| mc("eos_token_id")).map(id_list).unwrap_or_default();
        for id in generation_eos {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }

        let pad_id = tc("pad_token")
            .and_then(token_content)
            .and_then(|t| hf.token_to_id(&t))
            .or_else(|| gc("pad_token_id").and_then(|v| id_list(v).first().copied()));
        let unk_id = tc("unk_token").and_then(token_content).and_then(|t| hf.token_to_id(&t));
        let add_bos = tc("add_bos_token").and_then(Value::as_bool).unwrap_or(false);

        let config = SpecialConfig {
            bos_id,
            bos_token,
            eos_ids,
            eos_token,
            pad_id,
            add_bos,
            use_post_processor: true,
            extra_special: unk_id.into_iter().collect(),
        };
        Self::build(hf, config)
    }

    /// Encodes text into token ids.
    ///
    /// Special and added tokens written in the text (`<|im_start|>`, ...) are matched
    /// as single tokens. With `add_special`, the tokenizer's post-processor runs (for
    /// `tokenizer.json` files) and BOS is prepended when the model wants it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let inner = &self.inner;
        // tokenizers panics on some crafted but well-formed tokenizer.json files (found by
        // furnace-fuzz: a post-processor naming a special token it lacks, BPE prefixes);
        // such a panic is contained here and becomes an error.
        let encode = || inner.hf.encode(text, add_special && inner.use_post_processor);
        let encoding = std::panic::catch_unwind(std::panic::AssertUnwindSafe(encode))
            .map_err(|p| Error::Tokenizer(format!("the tokenizer failed: {}", panic_message(&p)).into()))?
            .map_err(Error::Tokenizer)?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special && inner.add_bos && !inner.post_processor_adds_bos {
            if let Some(bos) = inner.bos_id {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes token ids into text; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.hf.decode(ids, skip_special).map_err(Error::Tokenizer)
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.hf.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.hf.token_to_id(token)
    }

    /// The token string of an id, if the id is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    /// The beginning-of-sequence token id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    /// All ids that end generation: EOS first, then e.g. the extra ids of
    /// `generation_config.json`'s `eos_token_id` list.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.inner.eos_ids.contains(&id)
    }

    /// The beginning-of-sequence token string (for chat templates' `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    /// The end-of-sequence token string (for chat templates' `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// The padding token id, if the model defines one.
    pub fn pad_id(&self) -> Option<u32> {
        self.inner.pad_id
    }

    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos || self.inner.post_processor_adds_bos
    }

    /// Whether `id` is a special token (special added tokens, BOS, EOS, PAD, UNK):
    /// the tokens `decode(.., skip_special = true)` leaves out or that never appear
    /// in ordinary text.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }

    /// A streaming decoder that turns ids pushed one at a time into text.
    pub fn incremental_decoder(&self, skip_special: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), skip_special)
    }

    /// The underlying Hugging Face `tokenizers` tokenizer.
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner.hf
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.inner.bos_id)
            .field("eos_ids", &self.inner.eos_ids)
            .field("add_bos", &self.add_bos())
            .finish_non_exhaustive()
    }
}

fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_tokenizer_json(&text, path)
}

fn parse_tokenizer_json(text: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    // tokenizers 0.22 panics (`expect("Helper")`) when its `decoder` section fails to
    // buffer: a syntax error, a number out of range, nesting past serde_json's limit. So
    // the text is parsed into a JSON value first (where those are errors), and the
    // tokenizer built from the value, which buffers without failing.
    let value: Value = serde_json::from_str(text).map_err(|e| Error::json(path, e))?;
    let build = || serde_json::from_value(value);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
        .map_err(|p| Error::LoadTokenizer {
            path: path.to_path_buf(),
            source: format!("tokenizers panicked: {}", panic_message(&p)).into(),
        })?
        .map_err(|e| Error::LoadTokenizer { path: path.to_path_buf(), source: Box::new(e) })
}

/// The message of a caught panic.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic".to_string(),
    }
}

/// Parses a JSON file, or `None` when it does not exist.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::json(path, e))
}

/// A special token given as `"<s>"` or as an added-token object `{"content": "<s>", ..}`.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A token id given as a number or a list of numbers.
fn id_list(value: &Value) -> Vec<u32> {
    let as_id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Value::Array(items) => items.iter().filter_map(as_id).collect(),
        other => as_id(other).into_iter().collect(),
    }
}
