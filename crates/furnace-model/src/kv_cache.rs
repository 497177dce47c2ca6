//! Per-sequence key/value cache. Each sequence owns its cache, so sequences of different
//! lengths can share one forward pass (ragged batching) and leave or join at any step.
//! Keys and values are stored token-major (`[len, kv_heads * head_dim]` per layer), so an
//! append is a copy to the end and a decode step reads one contiguous slice.

use crate::error::{Error, Result};

/// The cache of one sequence across all layers.
pub struct SeqCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    max_len: usize,
    width: usize,
}

impl SeqCache {
    /// An empty cache for a model with these dimensions; `max_len` is the context length.
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            k: vec![Vec::new(); num_layers],
            v: vec![Vec::new(); num_layers],
            len: 0,
            max_len,
            width: kv_heads * head_dim,
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
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(Vec::clear);
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
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

    /// Appends keys and values of new tokens (`[t, kv_heads * head_dim]`) to `layer`.
    /// The sequence length advances only in [`SeqCache::advance`], once every layer has
    /// appended.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.k[layer].extend_from_slice(k);
        self.v[layer].extend_from_slice(v);
    }

    /// Keys and values of `layer` (`[tokens, kv_heads * head_dim]`), including tokens
    /// appended in the current pass.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Width of one token's keys (`kv_heads * head_dim`).
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Records that `t` tokens were appended to every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
