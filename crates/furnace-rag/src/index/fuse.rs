//! Combining and reordering result lists: reciprocal rank fusion, maximal marginal
//! relevance and a score threshold.

use std::collections::HashMap;

use super::distance::{dot, norm};
use super::hit::{Hit, VectorIndex};
use crate::{Error, Result};

/// The usual RRF constant (Cormack, Clarke and Büttcher, 2009).
pub const RRF_K: f32 = 60.0;

/// Reciprocal rank fusion: each id scores `Σ weight_i / (k + rank_i)` over the lists that
/// hold it (ranks start at 1, as in LangChain's `EnsembleRetriever`), and the fused list is
/// sorted by that score, best first (ties: lower id first). `lists` pairs each ranked list
/// (best first) with its weight.
pub fn reciprocal_rank_fusion(lists: &[(&[Hit], f32)], k: f32) -> Result<Vec<Hit>> {
    if !(k.is_finite() && k >= 0.0) {
        return Err(Error::Invalid(format!("the RRF constant must be finite and >= 0, not {k}")));
    }
    if let Some((_, w)) = lists.iter().find(|(_, w)| !w.is_finite()) {
        return Err(Error::Invalid(format!("RRF weights must be finite, not {w}")));
    }
    let mut fused: HashMap<u32, f32> = HashMap::new();
    let mut order: Vec<u32> = Vec::new();
    for (list, weight) in lists {
        for (rank, hit) in list.iter().enumerate() {
            let add = weight / (k + rank as f32 + 1.0);
            fused.entry(hit.id).and_modify(|s| *s += add).or_insert_with(|| {
                order.push(hit.id);
                add
            });
        }
    }
    let mut out: Vec<Hit> = order.into_iter().map(|id| Hit { id, score: fused.get(&id).copied().unwrap_or(0.0) }).collect();
    out.sort_by(Hit::better_first);
    Ok(out)
}

/// Keeps the hits scoring at least `min_score` (order kept). With the L2 metric scores are
/// negated squared distances, so the threshold is `-max_distance²`.
pub fn score_threshold(hits: &[Hit], min_score: f32) -> Vec<Hit> {
    hits.iter().copied().filter(|h| h.score >= min_score).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let d = norm(a) * norm(b);
    let s = dot(a, b) / d;
    // As LangChain does, an undefined similarity (a zero vector) counts as 0.
    if s.is_finite() {
        s
    } else {
        0.0
    }
}

/// Maximal marginal relevance with LangChain's `maximal_marginal_relevance` semantics:
/// returns the indices into `candidates` of at most `k` picks. The first pick is the
/// candidate most cosine-similar to the query; each next pick maximises
/// `lambda_mult · sim(query, c) − (1 − lambda_mult) · max_{s picked} sim(c, s)` (the first
/// candidate wins ties). `lambda_mult` 1 ranks by relevance only, 0 by diversity only.
pub fn maximal_marginal_relevance(query: &[f32], candidates: &[&[f32]], lambda_mult: f32, k: usize) -> Result<Vec<usize>> {
    if !(0.0..=1.0).contains(&lambda_mult) {
        return Err(Error::Invalid(format!("lambda_mult must be between 0 and 1, not {lambda_mult}")));
    }
    if let Some(c) = candidates.iter().find(|c| c.len() != query.len()) {
        return Err(Error::DimensionMismatch { expected: query.len(), got: c.len() });
    }
    let want = k.min(candidates.len());
    if want == 0 {
        return Ok(Vec::new());
    }
    let to_query: Vec<f32> = candidates.iter().map(|c| cosine(query, c)).collect();
    let mut first = 0;
    for (i, s) in to_query.iter().enumerate() {
        if *s > to_query[first] {
            first = i;
        }
    }
    let mut picked = vec![first];
    // The highest similarity of each candidate to anything picked so far.
    let mut redundancy: Vec<f32> = candidates.iter().map(|c| cosine(c, candidates[first])).collect();
    while picked.len() < want {
        let mut best: Option<(usize, f32)> = None;
        for (i, &rel) in to_query.iter().enumerate() {
            if picked.contains(&i) {
                continue;
            }
            let score = lambda_mult * rel - (1.0 - lambda_mult) * redundancy[i];
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((i, score));
            }
        }
        let Some((next, _)) = best else { break };
        picked.push(next);
        for (i, c) in candidates.iter().enumerate() {
            redundancy[i] = redundancy[i].max(cosine(c, candidates[next]));
        }
    }
    Ok(picked)
}

/// MMR settings (LangChain's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmrParams {
    /// Results to return. Default 4.
    pub k: usize,
    /// Candidates fetched from the index before reranking. Default 20.
    pub fetch_k: usize,
    /// Relevance against diversity, in `[0, 1]`. Default 0.5.
    pub lambda_mult: f32,
}

impl Default for MmrParams {
    fn default() -> Self {
        MmrParams { k: 4, fetch_k: 20, lambda_mult: 0.5 }
    }
}

/// Fetches `fetch_k` hits from `index` and picks `k` of them with
/// [`maximal_marginal_relevance`]; the hits keep their index scores, in pick order.
pub fn mmr_search(index: &dyn VectorIndex, query: &[f32], params: MmrParams) -> Result<Vec<Hit>> {
    if params.k == 0 {
        return Err(Error::ZeroK);
    }
    if params.fetch_k < params.k {
        return Err(Error::Invalid(format!("fetch_k ({}) must be at least k ({})", params.fetch_k, params.k)));
    }
    let hits = index.search(query, params.fetch_k)?;
    let vectors: Vec<&[f32]> = hits.iter().map(|h| index.vector(h.id).ok_or(Error::UnknownId(h.id))).collect::<Result<_>>()?;
    let picks = maximal_marginal_relevance(query, &vectors, params.lambda_mult, params.k)?;
    Ok(picks.into_iter().map(|i| hits[i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{FlatIndex, Metric};

    fn h(id: u32, score: f32) -> Hit {
        Hit { id, score }
    }

    #[test]
    fn rrf_hand_checked() {
        let a = [h(1, 0.9), h(2, 0.8), h(3, 0.1)];
        let b = [h(3, 12.0), h(1, 5.0)];
        let fused = reciprocal_rank_fusion(&[(&a, 1.0), (&b, 1.0)], 60.0).unwrap();
        // 1: 1/61 + 1/62; 3: 1/63 + 1/61; 2: 1/62.
        let ids: Vec<u32> = fused.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((fused[0].score - (1.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-7);
        assert!((fused[1].score - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-7);
        assert!((fused[2].score - 1.0 / 62.0).abs() < 1e-7);
        // Weights: the second list counts three times as much, so 3 overtakes 1.
        let fused = reciprocal_rank_fusion(&[(&a, 0.25), (&b, 0.75)], 60.0).unwrap();
        assert_eq!(fused[0].id, 3);
        assert!((fused[0].score - (0.25 / 63.0 + 0.75 / 61.0)).abs() < 1e-7);
        assert!(reciprocal_rank_fusion(&[(&a, f32::NAN)], 60.0).is_err());
        assert!(reciprocal_rank_fusion(&[], 60.0).unwrap().is_empty());
    }

    #[test]
    fn mmr_hand_checked() {
        // Two near-duplicates close to the query and one different but still relevant vector.
        let q = [1.0f32, 0.0];
        let c0 = [1.0f32, 0.05];
        let c1 = [1.0f32, 0.06];
        let c2 = [0.6f32, 0.8];
        let cands: Vec<&[f32]> = vec![&c0, &c1, &c2];
        // Relevance only: c0 then c1.
        assert_eq!(maximal_marginal_relevance(&q, &cands, 1.0, 2).unwrap(), vec![0, 1]);
        // Similarities: to the query c0 0.99875, c1 0.99820, c2 0.6; cos(c0, c1) 0.99995,
        // cos(c0, c2) 0.63920. lambda 0.5 after c0: c1 scores 0.5*0.99820 - 0.5*0.99995
        // = -0.00087, c2 0.5*0.6 - 0.5*0.63920 = -0.0196, so c1 is next.
        assert_eq!(maximal_marginal_relevance(&q, &cands, 0.5, 3).unwrap(), vec![0, 1, 2]);
        // lambda 0.3: c1 0.3*0.99820 - 0.7*0.99995 = -0.4005, c2 0.18 - 0.7*0.63920 = -0.2674.
        let picks = maximal_marginal_relevance(&q, &cands, 0.3, 2).unwrap();
        assert_eq!(picks, vec![0, 2]);
        assert!(maximal_marginal_relevance(&q, &cands, 0.5, 0).unwrap().is_empty());
        assert!(maximal_marginal_relevance(&q, &[], 0.5, 3).unwrap().is_empty());
        assert!(maximal_marginal_relevance(&q, &cands, 1.5, 2).is_err());
        let short = [1.0f32];
        assert!(matches!(maximal_marginal_relevance(&q, &[&short], 0.5, 1), Err(Error::DimensionMismatch { .. })));
    }

    #[test]
    fn mmr_search_and_threshold() {
        let mut idx = FlatIndex::new(2, Metric::Cosine).unwrap();
        for v in [[1.0f32, 0.05], [1.0, 0.06], [0.6, 0.8], [-1.0, 0.0]] {
            idx.add(&v).unwrap();
        }
        // fetch_k 3 leaves out the opposite vector 3 (as in mmr_hand_checked: 0 then 2).
        let hits = mmr_search(&idx, &[1.0, 0.0], MmrParams { k: 2, fetch_k: 3, lambda_mult: 0.3 }).unwrap();
        assert_eq!(hits.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0, 2]);
        // With it fetched, diversity at lambda 0.3 picks it second: 0.3*(-1) - 0.7*cos(3, 0)
        // = -0.3 + 0.7*0.99875 = 0.399, above vector 2's -0.267.
        let hits = mmr_search(&idx, &[1.0, 0.0], MmrParams { k: 2, fetch_k: 4, lambda_mult: 0.3 }).unwrap();
        assert_eq!(hits.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0, 3]);
        assert!(mmr_search(&idx, &[1.0, 0.0], MmrParams { k: 5, fetch_k: 4, lambda_mult: 0.3 }).is_err());
        let all = idx.search(&[1.0, 0.0], 4).unwrap();
        let kept = score_threshold(&all, 0.5);
        assert_eq!(kept.iter().map(|x| x.id).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
