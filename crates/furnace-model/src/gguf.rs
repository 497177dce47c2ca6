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
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// An opened GGUF file: parsed header and a reader for its tensors.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    file_len: u64,
}

impl GgufFile {
    /// Opens and parses the header; checks that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_len = file.metadata().map_err(io_err(path))?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::Gguf { path: path.to_path_buf(), msg: e.to_string() })?;
        let this = Self { path: path.to_path_buf(), content, reader, file_len };
        for (name, info) in &this.content.tensor_infos {
            let elems = info.shape.elem_count();
            let bs = info.ggml_dtype.block_size();
            if elems % bs != 0 {
                return Err(this.err(format!("tensor '{name}' has {elems} elements, not a multiple of its block size {bs}")));
            }
            let bytes = (elems / bs) as u64 * info.ggml_dtype.type_size() as u64;
            let end = this.content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(this.err(format!("truncated: tensor '{name}' ends at byte {end} but the file has {file_len} bytes")));
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
        if !self.has_tensor(name) {
            return Err(Error::MissingWeight(name.to_string()));
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
                Some(i) => i.shape.dims()[0],
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
