//! A search result ([`Hit`]), the bounded best-k collector every index uses, and the
//! [`VectorIndex`] trait shared by the exact store and HNSW.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde_json::{Map, Value};

use super::filter::Filter;
use crate::Result;

/// One search result: an entry's id and its score. Higher scores are better for every
/// metric (for L2 the score is the negated squared distance).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The entry's id (the slot returned when it was added).
    pub id: u32,
    /// The score; higher is better.
    pub score: f32,
}

impl Hit {
    /// Orders hits best first: higher score, then lower id (a stable tie-break).
    pub fn better_first(a: &Hit, b: &Hit) -> Ordering {
        b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
    }
}

/// A hit ordered so that the *worst* hit is the greatest (the top of a max-heap).
#[derive(Debug, Clone, Copy)]
struct Worst(Hit);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        Hit::better_first(&self.0, &other.0)
    }
}

/// Keeps the best `k` hits pushed into it.
#[derive(Debug, Clone)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub(crate) fn new(k: usize) -> Self {
        TopK { k, heap: BinaryHeap::with_capacity(k.saturating_add(1).min(1 << 16)) }
    }

    /// The score a new hit must beat once full (`-inf` until then).
    #[inline]
    pub(crate) fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.score)
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, id: u32, score: f32) {
        if self.k == 0 {
            return;
        }
        let hit = Worst(Hit { id, score });
        if self.heap.len() < self.k {
            self.heap.push(hit);
        } else if let Some(mut top) = self.heap.peek_mut() {
            if hit < *top {
                *top = hit;
            }
        }
    }

    pub(crate) fn extend(&mut self, other: TopK) {
        for w in other.heap {
            self.push(w.0.id, w.0.score);
        }
    }

    /// The hits, best first.
    pub(crate) fn into_sorted(self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(Hit::better_first);
        v
    }
}

/// What the exact store and HNSW both offer, so that MMR, hybrid search and callers can
/// work with either.
pub trait VectorIndex {
    /// The vectors' dimension.
    fn dim(&self) -> usize;
    /// The best `k` live entries for `query`, best first.
    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>>;
    /// The best `k` live entries whose metadata matches `filter`, best first.
    fn search_filtered(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>>;
    /// The stored vector of a live entry (normalised for the cosine metric).
    fn vector(&self, id: u32) -> Option<&[f32]>;
    /// The metadata of a live entry, if it was given any.
    fn metadata(&self, id: u32) -> Option<&Map<String, Value>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_k_in_order() {
        let mut t = TopK::new(3);
        for (i, s) in [0.5f32, 0.1, 0.9, 0.7, 0.9, -1.0].iter().enumerate() {
            t.push(i as u32, *s);
        }
        let ids: Vec<u32> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![2, 4, 3]);
    }
}
