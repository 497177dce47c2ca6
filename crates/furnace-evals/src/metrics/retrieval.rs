//! Retrieval metrics: a ranked list of retrieved ids against the set of relevant ids, with
//! binary relevance, as `ranx` defines them (`precision@k`, `recall@k`, `hit_rate@k`,
//! `mrr@k`, `ndcg@k`; `ndcg` as in trec_eval and pytrec_eval for binary relevance).
//!
//! Conventions, all ranx's:
//! - a retrieved id that appears again later in the list counts once, at its first position
//!   (ranx sees a run as unique doc ids);
//! - only the first `k` retrieved ids count; `k = 0` means the whole list;
//! - with no relevant id every metric is 0; with no retrieved id every metric is 0;
//! - precision divides by `k` even when fewer than `k` ids were retrieved (missing ones count
//!   as not relevant); with `k = 0` it divides by the number retrieved.

use std::collections::HashSet;

/// The retrieved ids without repeats (first occurrence kept), cut to the first `k` (all when
/// `k` is 0), and the set of relevant ids.
fn prepare<'a, R: AsRef<str>, S: AsRef<str>>(retrieved: &'a [R], relevant: &'a [S], k: usize) -> (Vec<&'a str>, HashSet<&'a str>) {
    let mut seen = HashSet::new();
    let mut ranked: Vec<&str> = retrieved.iter().map(AsRef::as_ref).filter(|id| seen.insert(*id)).collect();
    if k > 0 {
        ranked.truncate(k);
    }
    (ranked, relevant.iter().map(AsRef::as_ref).collect())
}

/// The number of relevant ids among the first `k` retrieved.
fn hits<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> usize {
    let (ranked, rel) = prepare(retrieved, relevant, k);
    ranked.iter().filter(|id| rel.contains(*id)).count()
}

/// The fraction of the first `k` retrieved ids that are relevant: hits over `k` (over the
/// number retrieved when `k` is 0). 0 without relevant or retrieved ids.
pub fn precision_at_k<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> f64 {
    let (ranked, _) = prepare(retrieved, relevant, 0);
    let denom = if k == 0 { ranked.len() } else { k };
    if denom == 0 {
        return 0.0;
    }
    hits(retrieved, relevant, k) as f64 / denom as f64
}

/// The fraction of the relevant ids found among the first `k` retrieved. 0 without relevant
/// ids.
pub fn recall_at_k<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> f64 {
    let rel: HashSet<&str> = relevant.iter().map(AsRef::as_ref).collect();
    if rel.is_empty() {
        return 0.0;
    }
    hits(retrieved, relevant, k) as f64 / rel.len() as f64
}

/// 1 if any of the first `k` retrieved ids is relevant, else 0 (trec_eval's `success`).
pub fn hit_rate_at_k<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> f64 {
    f64::from(u8::from(hits(retrieved, relevant, k) > 0))
}

/// The reciprocal rank of the first relevant id among the first `k` retrieved (1 at the top,
/// 1/2 second, ...), 0 if none is.
pub fn mrr_at_k<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> f64 {
    let (ranked, rel) = prepare(retrieved, relevant, k);
    ranked.iter().position(|id| rel.contains(id)).map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

/// Normalized discounted cumulative gain of the first `k` retrieved, binary gains: the sum of
/// `1 / log2(rank + 1)` over the relevant ids among them, divided by the same sum for an
/// ideal ranking (all relevant ids first, at most `k` of them). 0 without relevant ids.
pub fn ndcg_at_k<R: AsRef<str>, S: AsRef<str>>(retrieved: &[R], relevant: &[S], k: usize) -> f64 {
    let (ranked, rel) = prepare(retrieved, relevant, k);
    if rel.is_empty() {
        return 0.0;
    }
    let discount = |i: usize| 1.0 / ((i + 2) as f64).log2();
    let dcg: f64 = ranked.iter().enumerate().filter(|(_, id)| rel.contains(*id)).map(|(i, _)| discount(i)).sum();
    let ideal_n = if k == 0 { rel.len() } else { rel.len().min(k) };
    let idcg: f64 = (0..ideal_n).map(discount).sum();
    if idcg == 0.0 {
        dcg
    } else {
        dcg / idcg
    }
}
