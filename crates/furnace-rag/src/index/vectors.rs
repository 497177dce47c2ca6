//! The flat vector store: row-major `f32` vectors addressed by `u32` slots, deletes as
//! tombstones, optional JSON metadata per entry, and exact top-k search (multithreaded
//! over rows for large stores, blocked over queries for batches).

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::distance::{check_vector, prepare, score4, Metric};
use super::filter::Filter;
use super::hit::{Hit, TopK, VectorIndex};
use super::persist::{self, Reader, Writer};
use crate::{Error, Result};

/// Stores this many floats or more and a single query is scored on all threads.
const PARALLEL_FLOATS: usize = 1 << 18;
/// Rows per parallel task in a single-query search.
const ROWS_PER_TASK: usize = 4096;
/// At most this many queries share one pass over the rows in a batch search.
const QUERY_BLOCK: usize = 32;

const MAGIC: &[u8; 8] = b"FRAGFLAT";
const VERSION: u32 = 1;
/// The file a [`FlatIndex`] is saved to inside its folder.
pub const FLAT_FILE: &str = "flat.bin";

/// Batches of at least this many queries are searched as matrix products.
const GEMM_MIN_QUERIES: usize = 32;
/// Stored rows per matrix product of a batched search.
const GEMM_ROWS: usize = 8192;

/// An exact (brute-force) vector index.
#[derive(Debug, Clone)]
pub struct FlatIndex {
    dim: usize,
    metric: Metric,
    data: Vec<f32>,
    deleted: Vec<bool>,
    live: usize,
    metadata: Vec<Option<Map<String, Value>>>,
}

impl FlatIndex {
    /// An empty index of `dim`-dimensional vectors compared by `metric`.
    pub fn new(dim: usize, metric: Metric) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Invalid("the vector dimension must be at least 1".into()));
        }
        Ok(FlatIndex { dim, metric, data: Vec::new(), deleted: Vec::new(), live: 0, metadata: Vec::new() })
    }

    /// The vectors' dimension.
    pub(crate) fn dim_(&self) -> usize {
        self.dim
    }

    /// The metric.
    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Slots used so far, deleted ones included (the next id is this).
    pub fn slots(&self) -> usize {
        self.deleted.len()
    }

    /// Live (not deleted) entries.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no live entry is left.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether `id` is a live entry.
    pub fn contains(&self, id: u32) -> bool {
        self.deleted.get(id as usize).is_some_and(|d| !d)
    }

    /// Adds a vector and returns its id.
    pub fn add(&mut self, vector: &[f32]) -> Result<u32> {
        self.add_with_metadata(vector, None)
    }

    /// Adds a vector with metadata (used by filters) and returns its id.
    pub fn add_with_metadata(&mut self, vector: &[f32], metadata: Option<Map<String, Value>>) -> Result<u32> {
        let v = prepare(vector, self.dim, self.metric)?;
        self.push_prepared(&v, metadata)
    }

    /// Adds `vectors` (row-major, a multiple of the dimension) and returns the first id;
    /// the ids run on from it. Nothing is added if any row is refused.
    pub fn add_batch(&mut self, vectors: &[f32]) -> Result<u32> {
        if !vectors.len().is_multiple_of(self.dim) {
            return Err(Error::Invalid(format!("{} floats are not a whole number of {}-dimensional rows", vectors.len(), self.dim)));
        }
        let rows: Vec<Vec<f32>> = vectors.chunks_exact(self.dim).map(|r| prepare(r, self.dim, self.metric)).collect::<Result<_>>()?;
        let first = self.next_id(rows.len())?;
        for r in rows {
            self.push_prepared(&r, None)?;
        }
        Ok(first)
    }

    fn next_id(&self, extra: usize) -> Result<u32> {
        let first = self.slots();
        if first.saturating_add(extra) > u32::MAX as usize {
            return Err(Error::Invalid("the index is full (2^32 - 1 slots)".into()));
        }
        Ok(first as u32)
    }

    /// Appends an already checked (and for cosine normalised) vector.
    pub(crate) fn push_prepared(&mut self, v: &[f32], metadata: Option<Map<String, Value>>) -> Result<u32> {
        let id = self.next_id(1)?;
        self.data.extend_from_slice(v);
        self.deleted.push(false);
        self.metadata.push(metadata);
        self.live += 1;
        Ok(id)
    }

    /// Deletes an entry (a tombstone: its slot is not reused and it is never returned again).
    pub fn delete(&mut self, id: u32) -> Result<()> {
        match self.deleted.get_mut(id as usize) {
            Some(d) if !*d => {
                *d = true;
                self.live -= 1;
                self.metadata[id as usize] = None;
                Ok(())
            }
            _ => Err(Error::UnknownId(id)),
        }
    }

    /// The stored row of a slot, deleted or not (HNSW navigates through deleted nodes).
    #[inline]
    pub(crate) fn row(&self, id: u32) -> &[f32] {
        let start = id as usize * self.dim;
        &self.data[start..start + self.dim]
    }

    #[inline]
    pub(crate) fn is_deleted(&self, id: u32) -> bool {
        self.deleted.get(id as usize).copied().unwrap_or(true)
    }

    /// Checks a query and returns it as compared (normalised for cosine).
    pub(crate) fn prepare_query(&self, query: &[f32]) -> Result<Vec<f32>> {
        prepare(query, self.dim, self.metric)
    }

    pub(crate) fn check_search(&self, k: usize) -> Result<()> {
        if k == 0 {
            return Err(Error::ZeroK);
        }
        if self.live == 0 {
            return Err(Error::EmptyIndex);
        }
        Ok(())
    }

    /// The best `k` live entries for which `keep(id)` holds, best first (pre-filtering:
    /// rows that fail `keep` are never scored).
    pub fn search_with<F>(&self, query: &[f32], k: usize, keep: F) -> Result<Vec<Hit>>
    where
        F: Fn(u32) -> bool + Sync,
    {
        self.check_search(k)?;
        let q = self.prepare_query(query)?;
        Ok(self.scan(&q, k, &keep))
    }

    fn scan<F: Fn(u32) -> bool + Sync>(&self, q: &[f32], k: usize, keep: &F) -> Vec<Hit> {
        let n = self.slots();
        if self.data.len() < PARALLEL_FLOATS || rayon::current_num_threads() == 1 {
            return self.scan_rows(q, k, 0, n, keep).into_sorted();
        }
        let tasks = n.div_ceil(ROWS_PER_TASK);
        (0..tasks)
            .into_par_iter()
            .map(|t| self.scan_rows(q, k, t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n), keep))
            .reduce(
                || TopK::new(k),
                |mut a, b| {
                    a.extend(b);
                    a
                },
            )
            .into_sorted()
    }

    fn scan_rows<F: Fn(u32) -> bool>(&self, q: &[f32], k: usize, start: usize, end: usize, keep: &F) -> TopK {
        let mut top = TopK::new(k);
        let metric = self.metric;
        let rows = self.data[start * self.dim..end * self.dim].chunks_exact(self.dim);
        for (i, (row, &dead)) in rows.zip(&self.deleted[start..end]).enumerate() {
            let id = (start + i) as u32;
            if dead || !keep(id) {
                continue;
            }
            let s = metric.score(q, row);
            if s > top.threshold() {
                top.push(id, s);
            }
        }
        top
    }

    /// Searches many queries at once (row-major, a multiple of the dimension): one result
    /// list per query. Blocks of queries share each pass over the rows, in parallel.
    pub fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        self.check_search(k)?;
        if !queries.len().is_multiple_of(self.dim) {
            return Err(Error::Invalid(format!("{} floats are not a whole number of {}-dimensional queries", queries.len(), self.dim)));
        }
        let qs: Vec<Vec<f32>> = queries.chunks_exact(self.dim).map(|q| self.prepare_query(q)).collect::<Result<_>>()?;
        if qs.is_empty() {
            return Ok(Vec::new());
        }
        if qs.len() >= GEMM_MIN_QUERIES && matches!(self.metric, Metric::InnerProduct | Metric::Cosine) {
            return self.search_batch_gemm(&qs, k);
        }
        let threads = rayon::current_num_threads().max(1);
        let block = qs.len().div_ceil(threads).clamp(1, QUERY_BLOCK);
        let out: Vec<Vec<Vec<Hit>>> = qs.par_chunks(block).map(|chunk| self.scan_block(chunk, k)).collect();
        Ok(out.into_iter().flatten().collect())
    }

    /// Batched inner-product search as matrix products: blocks of `GEMM_ROWS` stored rows
    /// against all queries at once (candle's f32 GEMM), each block's scores merged into the
    /// queries' best-k lists in parallel. Measured 2026-11-30 on 100,000 × 384 with 1,000
    /// queries: several times the row-scan's queries/s.
    fn search_batch_gemm(&self, qs: &[Vec<f32>], k: usize) -> Result<Vec<Vec<Hit>>> {
        use candle_core::{Device, Tensor};
        let nq = qs.len();
        let flat: Vec<f32> = qs.iter().flatten().copied().collect();
        let q = Tensor::from_vec(flat, (nq, self.dim), &Device::Cpu)?;
        let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
        let rows = self.deleted.len();
        let mut start = 0;
        while start < rows {
            let n = GEMM_ROWS.min(rows - start);
            let block = Tensor::from_slice(&self.data[start * self.dim..(start + n) * self.dim], (n, self.dim), &Device::Cpu)?;
            let scores = q.matmul(&block.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let deleted = &self.deleted[start..start + n];
            tops.par_iter_mut().zip(scores.par_chunks_exact(n)).for_each(|(top, row)| {
                for (i, (&s, &dead)) in row.iter().zip(deleted).enumerate() {
                    if !dead && s > top.threshold() {
                        top.push((start + i) as u32, s);
                    }
                }
            });
            start += n;
        }
        Ok(tops.into_iter().map(TopK::into_sorted).collect())
    }

    fn scan_block(&self, qs: &[Vec<f32>], k: usize) -> Vec<Vec<Hit>> {
        let mut tops: Vec<TopK> = qs.iter().map(|_| TopK::new(k)).collect();
        let metric = self.metric;
        for (i, (row, &dead)) in self.data.chunks_exact(self.dim).zip(&self.deleted).enumerate() {
            if dead {
                continue;
            }
            let mut groups = qs.chunks_exact(4);
            let mut j = 0;
            for g in groups.by_ref() {
                let scores = score4(metric, row, [&g[0], &g[1], &g[2], &g[3]]);
                for s in scores {
                    let top = &mut tops[j];
                    if s > top.threshold() {
                        top.push(i as u32, s);
                    }
                    j += 1;
                }
            }
            for q in groups.remainder() {
                let s = metric.score(q, row);
                let top = &mut tops[j];
                if s > top.threshold() {
                    top.push(i as u32, s);
                }
                j += 1;
            }
        }
        tops.into_iter().map(TopK::into_sorted).collect()
    }

    /// Saves to `dir/flat.bin` (atomically) and returns the file's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let mut w = Writer::new();
        self.encode(&mut w)?;
        persist::save(dir, FLAT_FILE, MAGIC, VERSION, w)
    }

    /// Loads what [`FlatIndex::save`] wrote to `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(FLAT_FILE);
        let payload = persist::load(&path, MAGIC, VERSION)?;
        let mut r = Reader::new(&payload, &path);
        let index = FlatIndex::decode(&mut r)?;
        r.finish()?;
        Ok(index)
    }

    pub(crate) fn encode(&self, w: &mut Writer) -> Result<()> {
        w.len(self.dim);
        w.u8(self.metric.code());
        w.f32s(&self.data);
        w.bytes(&self.deleted.iter().map(|&d| u8::from(d)).collect::<Vec<u8>>());
        for m in &self.metadata {
            match m {
                None => w.u8(0),
                Some(m) => {
                    w.u8(1);
                    let json = serde_json::to_vec(m).map_err(|e| Error::Invalid(format!("cannot encode metadata: {e}")))?;
                    w.bytes(&json);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let dim = r.usize()?;
        if dim == 0 {
            return Err(r.corrupt("dimension 0"));
        }
        let code = r.u8()?;
        let metric = Metric::from_code(code).ok_or_else(|| r.corrupt(format!("unknown metric code {code}")))?;
        let data = r.f32s()?;
        let flags = r.bytes()?;
        if data.len() != flags.len().saturating_mul(dim) {
            return Err(r.corrupt(format!("{} floats for {} rows of dimension {dim}", data.len(), flags.len())));
        }
        if flags.len() > u32::MAX as usize {
            return Err(r.corrupt("more than 2^32 - 1 slots"));
        }
        let mut deleted = Vec::with_capacity(flags.len());
        for &f in flags {
            match f {
                0 => deleted.push(false),
                1 => deleted.push(true),
                other => return Err(r.corrupt(format!("tombstone flag {other}"))),
            }
        }
        if data.iter().any(|x| !x.is_finite()) {
            return Err(r.corrupt("a stored vector holds NaN or an infinity"));
        }
        let mut metadata = Vec::with_capacity(deleted.len());
        for _ in 0..deleted.len() {
            match r.u8()? {
                0 => metadata.push(None),
                1 => {
                    let bytes = r.bytes()?;
                    let m: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| r.corrupt(format!("bad metadata JSON: {e}")))?;
                    metadata.push(Some(m));
                }
                other => return Err(r.corrupt(format!("metadata tag {other}"))),
            }
        }
        let live = deleted.iter().filter(|d| !**d).count();
        Ok(FlatIndex { dim, metric, data, deleted, live, metadata })
    }
}

impl VectorIndex for FlatIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn search(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        self.search_with(query, k, |_| true)
    }

    fn search_filtered(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        self.search_with(query, k, |id| filter.matches(self.metadata[id as usize].as_ref()))
    }

    fn vector(&self, id: u32) -> Option<&[f32]> {
        self.contains(id).then(|| self.row(id))
    }

    fn metadata(&self, id: u32) -> Option<&Map<String, Value>> {
        if self.contains(id) {
            self.metadata[id as usize].as_ref()
        } else {
            None
        }
    }
}

/// Checks `v` against a dimension (for callers that hold raw vectors).
pub fn check_dim(v: &[f32], dim: usize) -> Result<()> {
    check_vector(v, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::rng::random_unit_vectors;
    use serde_json::json;

    fn naive(data: &[f32], dim: usize, q: &[f32], k: usize, metric: Metric, skip: &[u32]) -> Vec<Hit> {
        let mut all: Vec<Hit> = data
            .chunks(dim)
            .enumerate()
            .filter(|(i, _)| !skip.contains(&(*i as u32)))
            .map(|(i, r)| {
                let s = match metric {
                    Metric::L2 => -r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                    _ => r.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(),
                };
                Hit { id: i as u32, score: s }
            })
            .collect();
        all.sort_by(Hit::better_first);
        all.truncate(k);
        all
    }

    fn same(a: &[Hit], b: &[Hit]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x.score - y.score).abs() < 1e-4, "{a:?} vs {b:?}");
        }
        let ia: Vec<u32> = a.iter().map(|h| h.id).collect();
        let ib: Vec<u32> = b.iter().map(|h| h.id).collect();
        // Ties within float noise could swap; random data has none at this size.
        assert_eq!(ia, ib);
    }

    #[test]
    fn exact_search_matches_a_naive_reference() {
        // Large enough (> PARALLEL_FLOATS floats) to take the parallel path too.
        for &(n, dim) in &[(300usize, 7usize), (9000, 33)] {
            let data: Vec<f32> = random_unit_vectors(n, dim, 1).iter().map(|x| x * 3.0).collect();
            // 40 queries: the batch takes the matrix-product path for inner product and
            // cosine (over two row blocks when n = 9000), the row scan for L2.
            let queries = random_unit_vectors(40, dim, 2);
            for metric in [Metric::InnerProduct, Metric::L2, Metric::Cosine] {
                let mut idx = FlatIndex::new(dim, metric).unwrap();
                idx.add_batch(&data).unwrap();
                let stored: Vec<f32> = if metric == Metric::Cosine { random_unit_vectors(n, dim, 1) } else { data.clone() };
                let batch = idx.search_batch(&queries, 10).unwrap();
                for (qi, q) in queries.chunks(dim).enumerate() {
                    let want = naive(&stored, dim, q, 10, metric, &[]);
                    same(&idx.search(q, 10).unwrap(), &want);
                    same(&batch[qi], &want);
                }
            }
        }
    }

    #[test]
    fn deletes_are_never_returned() {
        let dim = 16;
        let data = random_unit_vectors(500, dim, 3);
        let mut idx = FlatIndex::new(dim, Metric::InnerProduct).unwrap();
        idx.add_batch(&data).unwrap();
        let q = &data[..dim];
        let first = idx.search(q, 5).unwrap();
        assert_eq!(first[0].id, 0);
        let gone: Vec<u32> = first.iter().map(|h| h.id).collect();
        for id in &gone {
            idx.delete(*id).unwrap();
        }
        assert!(matches!(idx.delete(gone[0]), Err(Error::UnknownId(_))));
        let after = idx.search(q, 50).unwrap();
        assert!(after.iter().all(|h| !gone.contains(&h.id)));
        same(&after, &naive(&data, dim, q, 50, Metric::InnerProduct, &gone));
        assert!(idx.search_batch(q, 50).unwrap()[0].iter().all(|h| !gone.contains(&h.id)));
        let many: Vec<f32> = q.repeat(40);
        for hits in idx.search_batch(&many, 50).unwrap() {
            same(&hits, &after);
        }
        assert_eq!(idx.len(), 495);
        assert_eq!(idx.search(q, 10_000).unwrap().len(), 495);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut idx = FlatIndex::new(3, Metric::Cosine).unwrap();
        assert!(matches!(idx.search(&[1.0, 0.0, 0.0], 1), Err(Error::EmptyIndex)));
        idx.add(&[1.0, 0.0, 0.0]).unwrap();
        assert!(matches!(idx.search(&[1.0, 0.0, 0.0], 0), Err(Error::ZeroK)));
        assert!(matches!(idx.search(&[1.0, 0.0], 1), Err(Error::DimensionMismatch { .. })));
        assert!(matches!(idx.search(&[f32::NAN, 0.0, 0.0], 1), Err(Error::BadVector { .. })));
        assert!(matches!(idx.add(&[f32::INFINITY, 0.0, 0.0]), Err(Error::BadVector { .. })));
        assert!(matches!(idx.add_batch(&[1.0; 4]), Err(Error::Invalid(_))));
        assert!(matches!(idx.search_batch(&[1.0; 4], 1), Err(Error::Invalid(_))));
        assert!(FlatIndex::new(0, Metric::L2).is_err());
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn filters_prefilter_rows() {
        let mut idx = FlatIndex::new(2, Metric::InnerProduct).unwrap();
        for i in 0..100 {
            let lang = ["en", "de", "fr"][i % 3];
            idx.add_with_metadata(&[i as f32, 1.0], Some(json!({"lang": lang}).as_object().unwrap().clone())).unwrap();
        }
        let f = Filter::from_json(&json!({"lang": {"$in": ["de", "fr"]}})).unwrap();
        let hits = idx.search_filtered(&[1.0, 0.0], 5, &f).unwrap();
        let ids: Vec<u32> = hits.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![98, 97, 95, 94, 92]);
        let f = Filter::from_json(&json!({"lang": "xx"})).unwrap();
        assert!(idx.search_filtered(&[1.0, 0.0], 5, &f).unwrap().is_empty());
    }

    #[test]
    fn save_load_round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let dim = 12;
        let data = random_unit_vectors(200, dim, 9);
        let mut idx = FlatIndex::new(dim, Metric::L2).unwrap();
        for (i, row) in data.chunks(dim).enumerate() {
            idx.add_with_metadata(row, Some(json!({"i": i}).as_object().unwrap().clone())).unwrap();
        }
        idx.delete(3).unwrap();
        let path = idx.save(dir.path()).unwrap();
        let back = FlatIndex::load(dir.path()).unwrap();
        for q in data.chunks(dim).take(10) {
            assert_eq!(idx.search(q, 7).unwrap(), back.search(q, 7).unwrap());
        }
        assert_eq!(back.metadata(5), idx.metadata(5));
        assert_eq!(back.len(), 199);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(matches!(FlatIndex::load(dir.path()), Err(Error::Corrupt { .. })));
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(FlatIndex::load(dir.path()), Err(Error::Corrupt { .. })));
        assert!(matches!(FlatIndex::load(&dir.path().join("nope")), Err(Error::Io { .. })));
    }
}
