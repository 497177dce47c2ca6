//! Per-sequence key/value cache. Each sequence owns its cache, so sequences of different
//! lengths can share one forward pass (ragged batching) and leave or join at any step.
//! Values are stored token-major (`[len, kv_heads * head_dim]` per layer), so an append is a
//! copy to the end; keys dimension-major (`[kv_heads * head_dim][capacity]`), so the scores
//! of a query against every cached key run along the token axis.
//!
//! A cache's first tokens can be copied out ([`SeqCache::prefix`]) and into another
//! sequence's cache ([`SeqCache::extend_from`]): plain memory copies, no recompute, so a
//! shared prompt prefix (a system prompt) is computed once and reused (prefix caching).

use crate::error::{Error, Result};

/// The cache of one sequence across all layers.
pub struct SeqCache {
    /// Keys per layer, dimension-major: `[kv_heads][head_dim][capacity]`, so the scores of
    /// one query against all cached keys are vector operations along the token axis.
    k: Vec<Vec<f32>>,
    /// Values per layer, token-major: `[len][kv_heads * head_dim]`.
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    max_len: usize,
    width: usize,
}

impl SeqCache {
    /// An empty cache for a model with these dimensions; `max_len` is the context length.
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self { k: vec![Vec::new(); num_layers], v: vec![Vec::new(); num_layers], len: 0, capacity: 0, max_len, width: kv_heads * head_dim }
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
        self.v.iter_mut().for_each(Vec::clear);
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.capacity() * 4).sum()
    }

    /// A copy of the first `n` tokens (all of them when `n` is larger), with buffers sized
    /// to exactly those tokens.
    pub fn prefix(&self, n: usize) -> SeqCache {
        let n = n.min(self.len);
        let mut out = SeqCache::new(self.k.len(), 0, 0, self.max_len);
        out.width = self.width;
        out.extend_from(self, n).unwrap_or_else(|_| unreachable!("n <= len <= max_len"));
        out
    }

    /// Appends the first `n` tokens of `other` (a cache of the same model) after this
    /// cache's tokens, as if they had been computed here. It is exact only where they are
    /// the tokens this sequence would have computed, at the same positions: in practice on
    /// an empty cache, copying a prefix of a prompt computed with the same weights and
    /// adapter. Fails when the result would exceed the context, or `other` has fewer than
    /// `n` tokens or another shape.
    pub fn extend_from(&mut self, other: &SeqCache, n: usize) -> Result<()> {
        if n > other.len || other.width != self.width || other.k.len() != self.k.len() {
            return Err(Error::Cache(format!(
                "cannot copy {n} tokens from a cache of {} tokens, {} layers of width {} into one of {} layers of width {}",
                other.len,
                other.k.len(),
                other.width,
                self.k.len(),
                self.width
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.check_room(n)?;
        // Size an empty cache to exactly `n` tokens (a snapshot); otherwise grow as usual.
        if self.capacity == 0 && self.len == 0 {
            self.k.iter_mut().for_each(|k| *k = vec![0f32; self.width * n]);
            self.v.iter_mut().for_each(|v| *v = Vec::with_capacity(self.width * n));
            self.capacity = n;
        } else {
            self.reserve(n)?;
        }
        let (cap, len, ocap) = (self.capacity, self.len, other.capacity);
        for (dst, src) in self.k.iter_mut().zip(&other.k) {
            for (drow, srow) in dst.chunks_mut(cap).zip(src.chunks(ocap)) {
                drow[len..len + n].copy_from_slice(&srow[..n]);
            }
        }
        for (dst, src) in self.v.iter_mut().zip(&other.v) {
            dst.extend_from_slice(&src[..n * self.width]);
        }
        self.len += n;
        Ok(())
    }

    /// Checks that `extra` more tokens fit in the context.
    pub fn check_room(&self, extra: usize) -> Result<()> {
        if self.len + extra > self.max_len {
            return Err(Error::ContextOverflow { len: self.len + extra, max: self.max_len });
        }
        Ok(())
    }

    /// Makes room for `extra` more tokens in every layer (call before a pass appends).
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        self.check_room(extra)?;
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity * 2).max(64).min(self.max_len);
        let old = self.capacity;
        for k in self.k.iter_mut() {
            let mut grown = vec![0f32; self.width * cap];
            for (row, dst) in k.chunks(old.max(1)).zip(grown.chunks_mut(cap)) {
                dst[..self.len].copy_from_slice(&row[..self.len]);
            }
            *k = grown;
        }
        for v in self.v.iter_mut() {
            v.reserve_exact(self.width * cap - v.len());
        }
        self.capacity = cap;
        Ok(())
    }

    /// Appends keys and values of `t` new tokens (`[t, kv_heads * head_dim]`) to `layer`
    /// at positions `len..len + t`. Needs [`SeqCache::reserve`] first; the sequence length
    /// advances only in [`SeqCache::advance`], once every layer has appended.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (w, cap, len) = (self.width, self.capacity, self.len);
        let kt = &mut self.k[layer];
        for (i, row) in k.chunks_exact(w).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                kt[c * cap + len + i] = x;
            }
        }
        self.v[layer].extend_from_slice(v);
    }

    /// Keys of `layer` (`[kv_heads * head_dim][capacity]`, valid up to the tokens
    /// appended so far), and the row stride (the capacity).
    pub(crate) fn keys(&self, layer: usize) -> (&[f32], usize) {
        (&self.k[layer], self.capacity)
    }

    /// Values of `layer` (`[tokens, kv_heads * head_dim]`), including tokens appended in
    /// the current pass.
    pub(crate) fn values(&self, layer: usize) -> &[f32] {
        &self.v[layer]
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
