//! sentence-transformers' pooling: how token states become one sentence vector
//! (`1_Pooling/config.json`), and whether it is L2-normalised (`2_Normalize` in
//! `modules.json`).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::encoder::bert::l2_normalize;
use crate::error::{Error, Result};

/// How token states are pooled into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolingMode {
    /// The mean of the real tokens' states.
    Mean,
    /// The first token's state (`[CLS]`).
    Cls,
    /// The last real token's state (decoder models used as embedders).
    LastToken,
    /// The element-wise maximum over the real tokens.
    Max,
    /// The sum of the real tokens' states divided by the square root of their count.
    MeanSqrtLen,
}

/// Pooling and normalisation of a sentence encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Pooling {
    /// How token states are pooled.
    pub mode: PoolingMode,
    /// Whether the pooled vector is L2-normalised.
    pub normalize: bool,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type", default)]
    kind: String,
}

impl Pooling {
    /// The pooling a sentence-transformers folder declares; a plain HF folder (no
    /// `modules.json`) pools by mean, without normalisation, as sentence-transformers does
    /// for it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        if !modules_path.is_file() {
            return Ok(Pooling { mode: PoolingMode::Mean, normalize: false });
        }
        let modules: Vec<Module> = read_json(&modules_path)?;
        let mut mode = PoolingMode::Mean;
        let mut normalize = false;
        for m in &modules {
            if m.kind.ends_with(".Pooling") {
                let file = dir.join(&m.path).join("config.json");
                mode = Self::mode_from(&read_json(&file)?, &file)?;
            } else if m.kind.ends_with(".Normalize") {
                normalize = true;
            } else if !m.kind.ends_with(".Transformer") {
                return Err(Error::Invalid(format!(
                    "{}: module {:?} is not supported (furnace runs Transformer, Pooling and Normalize)",
                    modules_path.display(),
                    m.kind
                )));
            }
        }
        Ok(Pooling { mode, normalize })
    }

    fn mode_from(p: &PoolingFile, file: &Path) -> Result<PoolingMode> {
        let modes = [
            (p.pooling_mode_mean_tokens, PoolingMode::Mean),
            (p.pooling_mode_cls_token, PoolingMode::Cls),
            (p.pooling_mode_lasttoken, PoolingMode::LastToken),
            (p.pooling_mode_max_tokens, PoolingMode::Max),
            (p.pooling_mode_mean_sqrt_len_tokens, PoolingMode::MeanSqrtLen),
        ];
        let on: Vec<PoolingMode> = modes.iter().filter(|(b, _)| *b).map(|(_, m)| *m).collect();
        match on.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::Invalid(format!("{}: no pooling mode is enabled", file.display()))),
            _ => Err(Error::Invalid(format!("{}: several pooling modes at once ({on:?}) are not supported", file.display()))),
        }
    }

    /// Pools `[batch, len, hidden]` states where row `i` has `lens[i]` real tokens, and
    /// normalises when asked. Returns `[batch, hidden]`.
    pub fn apply(&self, hidden: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (batch, len, dim) = hidden.dims3()?;
        let mut rows = Vec::with_capacity(batch);
        for (b, &l) in lens.iter().enumerate() {
            let l = l.clamp(1, len);
            let row = hidden.get(b)?;
            let pooled = match self.mode {
                PoolingMode::Mean => row.narrow(0, 0, l)?.mean(0)?,
                PoolingMode::Cls => row.get(0)?,
                PoolingMode::LastToken => row.get(l - 1)?,
                PoolingMode::Max => row.narrow(0, 0, l)?.max(0)?,
                PoolingMode::MeanSqrtLen => (row.narrow(0, 0, l)?.sum(0)? / (l as f64).sqrt())?,
            };
            rows.push(pooled.reshape((1, dim))?);
        }
        let out = Tensor::cat(&rows, 0)?;
        if self.normalize {
            l2_normalize(&out)
        } else {
            Ok(out)
        }
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}
