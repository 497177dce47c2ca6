//! MinHash signatures and LSH banding, for finding near-duplicate rows (`furnace data
//! prepare --dedup near`).
//!
//! A text is normalized ([`normalize`]: lowercase, whitespace runs made one space) and cut
//! into overlapping character shingles; each of `num_perm` seeded hash functions keeps its
//! smallest value over the shingles. The share of equal slots of two signatures estimates
//! the Jaccard similarity of their shingle sets (Broder, "On the resemblance and
//! containment of documents", 1997). Character shingles rather than word n-grams: training
//! rows are short, and one changed word moves a short text's word-5-gram Jaccard far below
//! any useful threshold while its character-shingle Jaccard stays high.
//!
//! [`LshIndex`] splits a signature into `bands` bands of `rows` slots; two texts become
//! candidates when any band is equal, and a candidate is a near-duplicate when the
//! estimated Jaccard reaches the threshold. [`LshIndex::for_threshold`] picks the band shape.

use crate::engine::mix;
use std::collections::HashMap;

/// Lowercase, with every run of whitespace made one space and the ends trimmed.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// 64-bit FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The hashes of the character shingles (`size` characters each) of `text` (already
/// normalized); a text shorter than `size` is one shingle. Duplicates are removed.
pub fn shingle_hashes(text: &str, size: usize) -> Vec<u64> {
    let size = size.max(1);
    let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let chars = starts.len() - 1;
    let mut out: Vec<u64> = if chars <= size {
        vec![fnv1a(text.as_bytes())]
    } else {
        (0..=chars - size).map(|i| fnv1a(&text.as_bytes()[starts[i]..starts[i + size]])).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// The exact Jaccard similarity of two sorted, deduplicated hash sets (as
/// [`shingle_hashes`] returns them).
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - both;
    if union == 0 {
        1.0
    } else {
        both as f64 / union as f64
    }
}

/// Seeded MinHash: `num_perm` hash functions `h_i(x) = splitmix64(x ^ seed_i)`.
#[derive(Debug, Clone)]
pub struct MinHasher {
    seeds: Vec<u64>,
    shingle: usize,
}

impl MinHasher {
    /// `num_perm` hash functions drawn from `seed`, over shingles of `shingle` characters.
    pub fn new(num_perm: usize, shingle: usize, seed: u64) -> Self {
        let seeds = (0..num_perm as u64).map(|i| mix(seed ^ mix(i.wrapping_add(0x5EED)))).collect();
        Self { seeds, shingle: shingle.max(1) }
    }

    /// Number of hash functions (signature length).
    pub fn num_perm(&self) -> usize {
        self.seeds.len()
    }

    /// The signature of `text` (normalized first).
    pub fn signature(&self, text: &str) -> Vec<u64> {
        let shingles = shingle_hashes(&normalize(text), self.shingle);
        self.seeds.iter().map(|&s| shingles.iter().map(|&h| mix(h ^ s)).min().unwrap_or(u64::MAX)).collect()
    }
}

/// The share of equal slots of two signatures: the estimated Jaccard similarity.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Locality-sensitive hashing over signature bands: finds the stored signatures that share
/// a band with a query.
#[derive(Debug, Clone)]
pub struct LshIndex {
    bands: usize,
    rows: usize,
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl LshIndex {
    /// `bands` bands of `rows` slots (`bands * rows` must not exceed the signature length).
    pub fn new(bands: usize, rows: usize) -> Self {
        Self { bands: bands.max(1), rows: rows.max(1), buckets: HashMap::new() }
    }

    /// The band shape for signatures of `num_perm` slots: the most rows per band (fewest
    /// candidate pairs to verify) for which a pair at Jaccard `threshold` still becomes a
    /// candidate with probability at least 0.99 (`1 - (1 - t^r)^b`).
    pub fn for_threshold(num_perm: usize, threshold: f64) -> Self {
        let num_perm = num_perm.max(1);
        let t = threshold.clamp(0.0, 1.0);
        let mut best = (num_perm, 1);
        for rows in 1..=num_perm {
            if !num_perm.is_multiple_of(rows) {
                continue;
            }
            let bands = num_perm / rows;
            let p = 1.0 - (1.0 - t.powi(rows as i32)).powi(bands as i32);
            if p >= 0.99 {
                best = (bands, rows);
            }
        }
        Self::new(best.0, best.1)
    }

    /// (bands, rows per band).
    pub fn shape(&self) -> (usize, usize) {
        (self.bands, self.rows)
    }

    fn band_keys<'a>(&'a self, sig: &'a [u64]) -> impl Iterator<Item = (usize, u64)> + 'a {
        sig.chunks(self.rows).take(self.bands).enumerate().map(|(b, slots)| (b, slots.iter().fold(b as u64, |h, &x| mix(h ^ x))))
    }

    /// The ids stored under any band of `sig`, each once, in the order first stored.
    pub fn candidates(&self, sig: &[u64]) -> Vec<usize> {
        let mut out: Vec<usize> = self.band_keys(sig).filter_map(|k| self.buckets.get(&k)).flatten().copied().collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Stores `id` under each band of `sig`.
    pub fn insert(&mut self, id: usize, sig: &[u64]) {
        let keys: Vec<(usize, u64)> = self.band_keys(sig).collect();
        for k in keys {
            self.buckets.entry(k).or_default().push(id);
        }
    }
}
