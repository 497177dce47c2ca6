//! GGUF reading: metadata → [`LlamaConfig`] and tokenizer spec, tensors by name with bounds
//! checks, so a truncated or corrupt file is an error and never a panic.

use crate::config::{LlamaConfig, RopeScaling, RopeStyle};
use crate::error::{io_err, Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use furnace_text::GgufTokenizerSpec;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What a GGUF file is read from: a buffered file, or bytes in memory.
trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// An opened GGUF file: parsed header and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Box<dyn ReadSeek>,
    file_len: u64,
}

impl GgufFile {
    /// Opens and parses the header; checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        Self::from_reader(path, Box::new(BufReader::new(file)), file_len)
    }

    /// Parses GGUF bytes held in memory, exactly as [`GgufFile::open`] parses a file;
    /// `path` only names them in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let file_len = bytes.len() as u64;
        Self::from_reader(path, Box::new(Cursor::new(bytes)), file_len)
    }

    fn from_reader(path: &Path, mut reader: Box<dyn ReadSeek>, file_len: u64) -> Result<Self> {
        let gguf_err = |msg: String| Error::Gguf { path: path.to_path_buf(), msg };
        // candle divides by `general.alignment` (a panic when it is 0), so look first.
        if scan_alignment(&mut reader, file_len).map_err(|e| gguf_err(e.to_string()))? == Some(0) {
            return Err(gguf_err("general.alignment is 0 (it must be a positive number of bytes)".into()));
        }
        reader.seek(SeekFrom::Start(0)).map_err(|e| gguf_err(e.to_string()))?;
        let content = Content::read(&mut reader).map_err(|e| gguf_err(e.to_string()))?;
        let this = Self { path: path.to_path_buf(), content, reader, file_len };
        for (name, info) in &this.content.tensor_infos {
            let dims = info.shape.dims();
            // Checked: a crafted shape's element count or byte size may not fit in 64 bits.
            let too_big = || this.err(format!("tensor '{name}' of shape {dims:?} is larger than any file"));
            let elems = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or_else(too_big)?;
            let bs = info.ggml_dtype.block_size() as u64;
            if bs == 0 || elems % bs != 0 {
                return Err(this.err(format!("tensor '{name}' has {elems} elements, not a multiple of its block size {bs}")));
            }
            let bytes = (elems / bs).checked_mul(info.ggml_dtype.type_size() as u64).ok_or_else(too_big)?;
            let end = this.content.tensor_data_offset.checked_add(info.offset).and_then(|s| s.checked_add(bytes)).ok_or_else(too_big)?;
            if end > file_len {
                return Err(this.err(format!("truncated: tensor '{name}' ends at byte {end} but the file has {file_len} bytes")));
            }
            if usize::try_from(elems).is_err() {
                return Err(too_big());
            }
        }
        Ok(this)
    }

    fn err(&self, msg: String) -> Error {
        Error::Gguf { path: self.path.clone(), msg }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Raw metadata.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        self.str_key("general.architecture")
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn str_key(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.err(format!("metadata '{key}' is not a string"))),
            None => Err(self.err(format!("metadata '{key}' is missing"))),
        }
    }

    fn num_key(&self, key: &str) -> Option<f64> {
        Some(match self.get(key)? {
            Value::U8(v) => *v as f64,
            Value::I8(v) => *v as f64,
            Value::U16(v) => *v as f64,
            Value::I16(v) => *v as f64,
            Value::U32(v) => *v as f64,
            Value::I32(v) => *v as f64,
            Value::U64(v) => *v as f64,
            Value::I64(v) => *v as f64,
            Value::F32(v) => *v as f64,
            Value::F64(v) => *v,
            Value::Bool(b) => *b as u8 as f64,
            _ => return None,
        })
    }

    fn usize_key(&self, key: &str) -> Result<usize> {
        self.num_key(key).map(|v| v as usize).ok_or_else(|| self.err(format!("metadata '{key}' is missing or not a number")))
    }

    fn bool_key(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => self.num_key(key).map(|v| v != 0.0),
        }
    }

    fn str_array(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            Some(Value::Array(vs)) => vs
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.err(format!("metadata '{key}' holds a non-string"))),
                })
                .collect(),
            Some(_) => Err(self.err(format!("metadata '{key}' is not an array"))),
            None => Ok(Vec::new()),
        }
    }

    fn num_array(&self, key: &str) -> Vec<f64> {
        match self.get(key) {
            Some(Value::Array(vs)) => vs
                .iter()
                .filter_map(|v| match v {
                    Value::I32(x) => Some(*x as f64),
                    Value::U32(x) => Some(*x as f64),
                    Value::F32(x) => Some(*x as f64),
                    Value::I8(x) => Some(*x as f64),
                    Value::U8(x) => Some(*x as f64),
                    Value::I64(x) => Some(*x as f64),
                    Value::F64(x) => Some(*x),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Names, shapes (row-major, outermost first) and types of all tensors.
    pub fn tensor_infos(&self) -> impl Iterator<Item = (&str, &[usize], GgmlDType)> {
        self.content.tensor_infos.iter().map(|(n, i)| (n.as_str(), i.shape.dims(), i.ggml_dtype))
    }

    /// Whether a tensor exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor as stored.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(Error::MissingWeight(name.to_string()));
        };
        // candle views an empty buffer through a dangling, unaligned pointer, which aborts
        // the process (debug) or is undefined behaviour (release): no weight is empty.
        if info.shape.dims().contains(&0) {
            return Err(self.err(format!("tensor '{name}' of shape {:?} has no elements", info.shape.dims())));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| Error::Gguf { path: self.path.clone(), msg: format!("tensor '{name}': {e}") })
    }

    /// The architecture hyperparameters.
    pub fn config(&mut self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(Error::UnknownArchitecture(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = self.usize_key(&k("embedding_length"))?;
        let num_heads = self.usize_key(&k("attention.head_count"))?;
        let num_kv_heads = self.usize_key(&k("attention.head_count_kv")).unwrap_or(num_heads);
        let head_dim = self
            .usize_key(&k("attention.key_length"))
            .or_else(|_| self.usize_key(&k("rope.dimension_count")))
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match self.usize_key(&k("vocab_size")) {
            Ok(v) => v,
            Err(_) => match self.content.tensor_infos.get("token_embd.weight") {
                Some(i) => i.shape.dims().first().copied().ok_or_else(|| self.err("token_embd.weight has no dimensions".into()))?,
                None => return Err(Error::MissingWeight("token_embd.weight".into())),
            },
        };
        let mut rope_scaling = match self.get(&k("rope.scaling.type")) {
            Some(Value::String(t)) if t == "linear" => {
                RopeScaling::Linear { factor: self.num_key(&k("rope.scaling.factor")).unwrap_or(1.0) }
            }
            Some(Value::String(t)) if t != "none" => return Err(self.err(format!("rope scaling '{t}' is not supported"))),
            _ => RopeScaling::None,
        };
        if self.has_tensor("rope_freqs.weight") {
            let t = self.tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?;
            rope_scaling = RopeScaling::Factors(t.flatten_all()?.to_vec1::<f32>()?);
        }
        let cfg = LlamaConfig {
            intermediate_size: self.usize_key(&k("feed_forward_length"))?,
            num_layers: self.usize_key(&k("block_count"))?,
            rms_norm_eps: self.num_key(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope_theta: self.num_key(&k("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: self.usize_key(&k("context_length")).unwrap_or(4096),
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            // llama.cpp permutes the q/k rows of llama-style models for its interleaved
            // RoPE; qwen2 keeps HF's layout and uses the NEOX (half-split) form.
            rope_style: if arch == "qwen2" { RopeStyle::HalfSplit } else { RopeStyle::Interleaved },
            architecture: arch,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rope_scaling,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The tokenizer metadata, for [`furnace_text::Tokenizer::from_gguf`].
    pub fn tokenizer_spec(&self) -> Result<GgufTokenizerSpec> {
        let model =
            self.str_key("tokenizer.ggml.model").map_err(|_| self.err("it holds no tokenizer (tokenizer.ggml.model is missing)".into()))?;
        let id = |key: &str| self.num_key(key).map(|v| v as u32);
        Ok(GgufTokenizerSpec {
            model,
            pre: self.str_key("tokenizer.ggml.pre").ok(),
            tokens: self.str_array("tokenizer.ggml.tokens")?,
            token_types: self.num_array("tokenizer.ggml.token_type").into_iter().map(|v| v as i32).collect(),
            merges: self.str_array("tokenizer.ggml.merges")?,
            scores: self.num_array("tokenizer.ggml.scores").into_iter().map(|v| v as f32).collect(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            unk_id: id("tokenizer.ggml.unknown_token_id"),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: self.bool_key("tokenizer.ggml.add_bos_token").unwrap_or(false),
            add_space_prefix: self.bool_key("tokenizer.ggml.add_space_prefix").unwrap_or(true),
        })
    }

    /// `tokenizer.chat_template`, if present.
    pub fn chat_template(&self) -> Option<String> {
        match self.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// `general.name`, if present.
    pub fn name(&self) -> Option<String> {
        self.str_key("general.name").ok()
    }
}

/// Maps an HF weight name to its GGUF name (llama.cpp's naming).
pub(crate) fn gguf_name(hf: &str) -> String {
    let map_leaf = |leaf: &str| -> String {
        match leaf {
            "input_layernorm.weight" => "attn_norm.weight".into(),
            "post_attention_layernorm.weight" => "ffn_norm.weight".into(),
            "self_attn.q_proj.weight" => "attn_q.weight".into(),
            "self_attn.k_proj.weight" => "attn_k.weight".into(),
            "self_attn.v_proj.weight" => "attn_v.weight".into(),
            "self_attn.o_proj.weight" => "attn_output.weight".into(),
            "self_attn.q_proj.bias" => "attn_q.bias".into(),
            "self_attn.k_proj.bias" => "attn_k.bias".into(),
            "self_attn.v_proj.bias" => "attn_v.bias".into(),
            "mlp.gate_proj.weight" => "ffn_gate.weight".into(),
            "mlp.up_proj.weight" => "ffn_up.weight".into(),
            "mlp.down_proj.weight" => "ffn_down.weight".into(),
            other => other.into(),
        }
    };
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            if let Some(rest) = hf.strip_prefix("model.layers.") {
                if let Some((idx, leaf)) = rest.split_once('.') {
                    return format!("blk.{idx}.{}", map_leaf(leaf));
                }
            }
            hf.to_string()
        }
    }
}

/// The integer `general.alignment` of a GGUF header (the types candle reads it from), found
/// by walking the metadata without allocating more than one key; `None` when absent or
/// when the header is malformed (candle's parser then names the problem).
fn scan_alignment<R: Read + Seek>(r: &mut R, file_len: u64) -> std::io::Result<Option<u64>> {
    fn u32_of<R: Read>(r: &mut R) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_of<R: Read>(r: &mut R) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn len_of<R: Read>(r: &mut R, v1: bool) -> std::io::Result<u64> {
        if v1 {
            u32_of(r).map(u64::from)
        } else {
            u64_of(r)
        }
    }
    /// Skips one value of type `t`; `false` when it does not fit in the file.
    fn skip<R: Read + Seek>(r: &mut R, t: u32, v1: bool, file_len: u64, depth: usize) -> std::io::Result<bool> {
        let fixed = |n: u64, r: &mut R| -> std::io::Result<bool> {
            let pos = r.stream_position()?;
            if n > file_len.saturating_sub(pos) {
                return Ok(false);
            }
            r.seek(SeekFrom::Current(n as i64))?;
            Ok(true)
        };
        match t {
            0 | 1 | 7 => fixed(1, r),
            2 | 3 => fixed(2, r),
            4..=6 => fixed(4, r),
            10..=12 => fixed(8, r),
            8 => {
                let n = len_of(r, v1)?;
                fixed(n, r)
            }
            9 if depth < 64 => {
                let et = u32_of(r)?;
                let n = len_of(r, v1)?;
                let size = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    _ => 0,
                };
                if size > 0 {
                    return fixed(n.saturating_mul(size), r);
                }
                for _ in 0..n {
                    if !skip(r, et, v1, file_len, depth + 1)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    let Ok(magic) = u32_of(r) else { return Ok(None) };
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Ok(None);
    }
    let Ok(version) = u32_of(r) else { return Ok(None) };
    let v1 = version == 1;
    let (Ok(_tensors), Ok(kvs)) = (len_of(r, v1), len_of(r, v1)) else { return Ok(None) };
    const KEY: &[u8] = b"general.alignment";
    // candle keeps the last of duplicate keys.
    let mut found = None;
    for _ in 0..kvs {
        let Ok(key_len) = len_of(r, v1) else { return Ok(found) };
        let pos = r.stream_position()?;
        if key_len > file_len.saturating_sub(pos) {
            return Ok(found);
        }
        let is_key = key_len == KEY.len() as u64 && {
            let mut key = [0u8; KEY.len()];
            r.read_exact(&mut key)?;
            key == KEY
        };
        if key_len != KEY.len() as u64 {
            r.seek(SeekFrom::Current(key_len as i64))?;
        }
        let Ok(t) = u32_of(r) else { return Ok(found) };
        if is_key && t <= 5 {
            let mut b = [0u8; 4];
            let n = 1 << (t / 2);
            if r.read_exact(&mut b[..n]).is_err() {
                return Ok(found);
            }
            // Signed types (odd): candle ignores a negative value (the default applies).
            let negative = t % 2 == 1 && b[n - 1] & 0x80 != 0;
            found = if negative { None } else { Some(u64::from(u32::from_le_bytes(b))) };
            continue;
        }
        if is_key {
            found = None;
        }
        if !skip(r, t, v1, file_len, 0).unwrap_or(false) {
            return Ok(found);
        }
    }
    Ok(found)
}
