//! Per-sequence key/value cache. Each sequence owns its cache, so sequences of different
//! lengths can share one forward pass (ragged batching) and leave or join at any step.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of one layer: buffers `[kv_heads, capacity, head_dim]`.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence across all layers.
pub struct SeqCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl SeqCache {
    /// An empty cache for a model with these dimensions; `max_len` is the context length.
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity: 0,
            max_len,
            kv_heads,
            head_dim,
        }
    }

    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context length this cache may grow to.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Drops every cached token (the buffers are kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().count() * 2 * self.kv_heads * self.capacity * self.head_dim * 4
    }

    /// Checks that `extra` more tokens fit in the context.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.len + extra > self.max_len {
            return Err(Error::ContextOverflow {
                len: self.len + extra,
                max: self.max_len,
            });
        }
        Ok(())
    }

    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`) to `layer` and returns views of all
    /// cached keys and values (`[kv_heads, len + t, head_dim]`). The sequence length advances
    /// only in [`SeqCache::advance`], once every layer has appended.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let need = self.len + t;
        if need > self.max_len {
            return Err(Error::ContextOverflow {
                len: need,
                max: self.max_len,
            });
        }
        if need > self.capacity {
            let new_cap = (need.max(self.capacity * 2)).max(64).min(self.max_len);
            self.grow(new_cap)?;
        }
        let entry = match &mut self.layers[layer] {
            Some(e) => e,
            slot => slot.insert(LayerKv {
                k: Tensor::zeros((self.kv_heads, self.capacity, self.head_dim), DType::F32, &Device::Cpu)?,
                v: Tensor::zeros((self.kv_heads, self.capacity, self.head_dim), DType::F32, &Device::Cpu)?,
            }),
        };
        entry.k.slice_set(&k.contiguous()?, 1, self.len)?;
        entry.v.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((entry.k.narrow(1, 0, need)?, entry.v.narrow(1, 0, need)?))
    }

    /// Records that `t` tokens were appended to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    fn grow(&mut self, new_cap: usize) -> Result<()> {
        for entry in self.layers.iter_mut().flatten() {
            let k = Tensor::zeros((self.kv_heads, new_cap, self.head_dim), DType::F32, &Device::Cpu)?;
            let v = Tensor::zeros((self.kv_heads, new_cap, self.head_dim), DType::F32, &Device::Cpu)?;
            if self.len > 0 {
                k.slice_set(&entry.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&entry.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *entry = LayerKv { k, v };
        }
        self.capacity = new_cap;
        Ok(())
    }
}
