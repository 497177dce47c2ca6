//! HF model directories: `config.json` plus single or sharded `*.safetensors`.

use crate::config::LlamaConfig;
use crate::error::{io_err, Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Reads and validates `config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path, source })?;
    LlamaConfig::from_hf_json(&v)
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json` when present, else every `*.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: index.clone(), source })?;
        let map =
            v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config(format!("{}: no weight_map", index.display())))?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotAModel(dir.to_path_buf()));
    }
    Ok(files)
}

/// Loads all tensors of the directory into memory.
pub fn load_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in safetensors_files(dir)? {
        if !f.exists() {
            return Err(Error::Io { path: f, source: std::io::Error::new(std::io::ErrorKind::NotFound, "shard is missing") });
        }
        let bytes = std::fs::read(&f).map_err(io_err(&f))?;
        all.extend(read_safetensors(&bytes, &f)?);
    }
    Ok(all)
}

/// The tensors of one safetensors file held in memory (`path` names it in errors).
pub fn read_safetensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
        .map_err(|e| Error::Config(format!("{}: cannot read safetensors: {e}", path.display())))
}
