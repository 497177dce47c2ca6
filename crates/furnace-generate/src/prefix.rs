//! The prefix cache of the engine (automatic prefix caching): snapshots of the KV of
//! prompts, so that a later prompt starting with the same tokens copies them instead of
//! computing them again.
//!
//! - A snapshot is taken when a sequence finishes its prompt prefill: its first
//!   `⌊len / BLOCK⌋ · BLOCK` tokens (block-aligned), with the adapter it ran with, since
//!   another adapter gives other keys and values. A snapshot whose tokens another one
//!   already holds is not taken; a longer one replaces the shorter snapshots it contains.
//! - Every block boundary of a snapshot is indexed by (adapter, hash of the tokens up to
//!   it), so one snapshot serves every block-aligned prefix of its tokens (a trie over
//!   blocks, flattened into a map). A lookup tries the longest boundary first and checks
//!   the tokens themselves, not only the hash.
//! - A lookup never takes the whole prompt: at least its last token is still run, so that
//!   the step that ends the prefill produces logits.
//! - Snapshots are evicted least recently used first to keep their bytes
//!   ([`furnace_model::SeqCache::bytes`]) within the budget; a budget of 0 turns the cache
//!   off.

use furnace_model::{AdapterId, SeqCache};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Tokens per block: prefixes are cached and reused in whole blocks.
pub const BLOCK: usize = 32;

/// Counters of the prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixStats {
    /// Sequences that started from a cached prefix.
    pub hits: u64,
    /// Sequences with a prompt longer than one block that found no cached prefix.
    pub misses: u64,
    /// Prompt tokens copied from the cache instead of computed.
    pub tokens_reused: u64,
    /// Bytes the cached snapshots hold now.
    pub bytes: usize,
    /// Snapshots cached now.
    pub entries: usize,
    /// Snapshots evicted to stay within the budget.
    pub evictions: u64,
}

struct Entry {
    adapter: Option<AdapterId>,
    /// The snapshot's tokens (a multiple of [`BLOCK`]).
    tokens: Vec<u32>,
    cache: SeqCache,
    /// Hash keys of its block boundaries, in order.
    keys: Vec<u64>,
    last_used: u64,
}

pub(crate) struct PrefixCache {
    budget: usize,
    entries: HashMap<u64, Entry>,
    /// (adapter, hash of the tokens up to a block boundary) → snapshots holding them.
    index: HashMap<(Option<AdapterId>, u64), Vec<u64>>,
    next_entry: u64,
    clock: u64,
    stats: PrefixStats,
}

/// Hashes of the block boundaries of `tokens`, for its first `blocks` blocks: entry `k` is
/// the hash of `tokens[..(k + 1) * BLOCK]`.
fn boundary_hashes(tokens: &[u32], blocks: usize) -> Vec<u64> {
    let mut h = DefaultHasher::new();
    tokens
        .chunks_exact(BLOCK)
        .take(blocks)
        .map(|b| {
            b.hash(&mut h);
            h.finish()
        })
        .collect()
}

impl PrefixCache {
    pub(crate) fn new(budget: usize) -> Self {
        Self { budget, entries: HashMap::new(), index: HashMap::new(), next_entry: 0, clock: 0, stats: PrefixStats::default() }
    }

    pub(crate) fn stats(&self) -> PrefixStats {
        self.stats
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The longest cached block-aligned prefix of `prompt` for `adapter`, shorter than the
    /// prompt: copies it into `cache` (empty) and returns its length (0 when none).
    pub(crate) fn lookup(&mut self, prompt: &[u32], adapter: Option<AdapterId>, cache: &mut SeqCache) -> usize {
        if self.budget == 0 || !cache.is_empty() {
            return 0;
        }
        let blocks = prompt.len().saturating_sub(1) / BLOCK;
        if blocks == 0 {
            return 0;
        }
        let hashes = boundary_hashes(prompt, blocks);
        for k in (1..=blocks).rev() {
            let n = k * BLOCK;
            let Some(ids) = self.index.get(&(adapter, hashes[k - 1])) else { continue };
            let found = ids.iter().copied().find(|id| self.entries.get(id).is_some_and(|e| e.tokens[..n] == prompt[..n]));
            let Some(id) = found else { continue };
            let now = self.tick();
            let Some(e) = self.entries.get_mut(&id) else { continue };
            if cache.extend_from(&e.cache, n).is_err() {
                // Not expected (same model); compute the prompt instead.
                cache.clear();
                continue;
            }
            e.last_used = now;
            self.stats.hits += 1;
            self.stats.tokens_reused += n as u64;
            return n;
        }
        self.stats.misses += 1;
        0
    }

    /// Takes a snapshot of the block-aligned prefix of a prompt whose prefill just ended
    /// (`cache` holds at least the prompt).
    pub(crate) fn insert(&mut self, prompt: &[u32], adapter: Option<AdapterId>, cache: &SeqCache) {
        let blocks = prompt.len().min(cache.len()) / BLOCK;
        if self.budget == 0 || blocks == 0 {
            return;
        }
        let n = blocks * BLOCK;
        let hashes = boundary_hashes(prompt, blocks);
        // Already held by a snapshot as long or longer: only note the use.
        let now = self.tick();
        if let Some(ids) = self.index.get(&(adapter, hashes[blocks - 1])) {
            if let Some(id) = ids.iter().copied().find(|id| self.entries.get(id).is_some_and(|e| e.tokens[..n] == prompt[..n])) {
                if let Some(e) = self.entries.get_mut(&id) {
                    e.last_used = now;
                }
                return;
            }
        }
        let snapshot = cache.prefix(n);
        let bytes = snapshot.bytes();
        if bytes > self.budget {
            return;
        }
        // Shorter snapshots this one contains are no longer needed.
        let mut contained = Vec::new();
        for (k, h) in hashes.iter().enumerate() {
            let m = (k + 1) * BLOCK;
            if let Some(ids) = self.index.get(&(adapter, *h)) {
                contained.extend(
                    ids.iter()
                        .copied()
                        .filter(|id| self.entries.get(id).is_some_and(|e| e.tokens.len() == m && e.tokens[..] == prompt[..m])),
                );
            }
        }
        for id in contained {
            self.remove(id);
        }
        while self.stats.bytes + bytes > self.budget {
            let Some(victim) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(id, _)| *id) else { break };
            self.remove(victim);
            self.stats.evictions += 1;
        }
        let id = self.next_entry;
        self.next_entry += 1;
        for h in &hashes {
            self.index.entry((adapter, *h)).or_default().push(id);
        }
        self.stats.bytes += bytes;
        self.stats.entries += 1;
        self.entries.insert(id, Entry { adapter, tokens: prompt[..n].to_vec(), cache: snapshot, keys: hashes, last_used: now });
    }

    fn remove(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else { return };
        for h in &e.keys {
            if let Some(ids) = self.index.get_mut(&(e.adapter, *h)) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.index.remove(&(e.adapter, *h));
                }
            }
        }
        self.stats.bytes -= e.cache.bytes();
        self.stats.entries -= 1;
    }

    /// Drops the snapshots computed with an adapter that is no longer in the model (a model
    /// never reuses an adapter id, so they could not be hit again).
    pub(crate) fn forget_adapters(&mut self, model: &furnace_model::Llama) {
        let ids: Vec<u64> =
            self.entries.iter().filter(|(_, e)| e.adapter.is_some_and(|a| !model.has_adapter(a))).map(|(id, _)| *id).collect();
        for id in ids {
            self.remove(id);
        }
    }
}
