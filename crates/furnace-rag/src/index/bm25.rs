//! Okapi BM25 keyword search with the definitions of `rank_bm25`'s `BM25Okapi`:
//!
//! - `idf(t) = ln(N − df(t) + 0.5) − ln(df(t) + 0.5)`, and a term whose idf is negative (in
//!   more than half the documents) gets `epsilon × (mean idf over the vocabulary)` instead;
//! - `score(d, q) = Σ_{t ∈ q} idf(t) · tf(t, d)·(k1 + 1) / (tf(t, d) + k1·(1 − b + b·|d| / avgdl))`,
//!   summed over the query's tokens as given (a repeated token counts twice);
//! - `k1 = 1.5`, `b = 0.75`, `epsilon = 0.25`.
//!
//! Documents can be added and deleted at any time; the statistics always describe the live
//! documents only, as if the index had been built from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::hit::{Hit, TopK};
use super::persist::{self, Reader, Writer};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"FRAGBM25";
const VERSION: u32 = 1;
/// The file a [`Bm25`] index is saved to inside its folder.
pub const BM25_FILE: &str = "bm25.bin";

/// Lowercases `text` and splits it on every character that is not alphanumeric (Unicode).
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// BM25 constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bm25Params {
    /// Term-frequency saturation. Default 1.5.
    pub k1: f64,
    /// Length normalisation. Default 0.75.
    pub b: f64,
    /// The floor for negative idfs, as a fraction of the mean idf. Default 0.25.
    pub epsilon: f64,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Bm25Params { k1: 1.5, b: 0.75, epsilon: 0.25 }
    }
}

impl Bm25Params {
    fn validate(&self) -> Result<()> {
        let ok = self.k1.is_finite() && self.k1 >= 0.0 && (0.0..=1.0).contains(&self.b) && self.epsilon.is_finite();
        if !ok {
            return Err(Error::Invalid(format!("BM25 needs k1 >= 0, 0 <= b <= 1 and a finite epsilon, not {self:?}")));
        }
        Ok(())
    }
}

/// A document's slot.
#[derive(Debug, Clone)]
struct Doc {
    /// Token count.
    len: u32,
    /// (term id, frequency) for each distinct term, by term id.
    terms: Vec<(u32, u32)>,
}

/// A BM25 index over tokenised documents.
#[derive(Debug)]
pub struct Bm25 {
    params: Bm25Params,
    vocab: HashMap<String, u32>,
    terms: Vec<String>,
    /// For each term: (document, frequency), by document id.
    postings: Vec<Vec<(u32, u32)>>,
    /// `None` once deleted.
    docs: Vec<Option<Doc>>,
    live: usize,
    total_len: u64,
    /// The mean idf over the live vocabulary, computed on first use after a change.
    mean_idf: Mutex<Option<f64>>,
}

impl Bm25 {
    /// An empty index.
    pub fn new(params: Bm25Params) -> Result<Self> {
        params.validate()?;
        Ok(Bm25 {
            params,
            vocab: HashMap::new(),
            terms: Vec::new(),
            postings: Vec::new(),
            docs: Vec::new(),
            live: 0,
            total_len: 0,
            mean_idf: Mutex::new(None),
        })
    }

    /// Live documents.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no live document is left.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Tokenises `text` with [`tokenize`] and adds it; returns its id.
    pub fn add(&mut self, text: &str) -> Result<u32> {
        self.add_tokens(&tokenize(text))
    }

    /// Adds an already tokenised document; returns its id.
    pub fn add_tokens<S: AsRef<str>>(&mut self, tokens: &[S]) -> Result<u32> {
        if self.docs.len() >= u32::MAX as usize {
            return Err(Error::Invalid("the index is full (2^32 - 1 documents)".into()));
        }
        let len = u32::try_from(tokens.len()).map_err(|_| Error::Invalid("a document has more than 2^32 - 1 tokens".into()))?;
        let id = self.docs.len() as u32;
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for t in tokens {
            let t = t.as_ref();
            let tid = match self.vocab.get(t) {
                Some(&tid) => tid,
                None => {
                    let tid = self.terms.len() as u32;
                    self.vocab.insert(t.to_owned(), tid);
                    self.terms.push(t.to_owned());
                    self.postings.push(Vec::new());
                    tid
                }
            };
            *counts.entry(tid).or_insert(0) += 1;
        }
        let mut terms: Vec<(u32, u32)> = counts.into_iter().collect();
        terms.sort_unstable();
        for &(tid, tf) in &terms {
            self.postings[tid as usize].push((id, tf));
        }
        self.docs.push(Some(Doc { len, terms }));
        self.live += 1;
        self.total_len += u64::from(len);
        *self.mean_idf.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(id)
    }

    /// Deletes a document; the statistics are updated as if it had never been added.
    pub fn delete(&mut self, id: u32) -> Result<()> {
        let doc = self.docs.get_mut(id as usize).and_then(Option::take).ok_or(Error::UnknownId(id))?;
        for (tid, _) in doc.terms {
            let list = &mut self.postings[tid as usize];
            if let Ok(pos) = list.binary_search_by_key(&id, |p| p.0) {
                list.remove(pos);
            }
        }
        self.live -= 1;
        self.total_len -= u64::from(doc.len);
        *self.mean_idf.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn raw_idf(&self, df: usize) -> f64 {
        let n = self.live as f64;
        let df = df as f64;
        (n - df + 0.5).ln() - (df + 0.5).ln()
    }

    fn mean_idf(&self) -> f64 {
        let mut cache = self.mean_idf.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = *cache {
            return v;
        }
        let (mut sum, mut count) = (0.0f64, 0usize);
        for p in &self.postings {
            if !p.is_empty() {
                sum += self.raw_idf(p.len());
                count += 1;
            }
        }
        let mean = if count == 0 { 0.0 } else { sum / count as f64 };
        *cache = Some(mean);
        mean
    }

    /// The idf of a token (0 for a token no live document holds).
    pub fn idf(&self, token: &str) -> f64 {
        let df = self.vocab.get(token).map_or(0, |&t| self.postings[t as usize].len());
        if df == 0 {
            return 0.0;
        }
        let idf = self.raw_idf(df);
        if idf < 0.0 {
            self.params.epsilon * self.mean_idf()
        } else {
            idf
        }
    }

    /// Every slot's score for the tokens (deleted slots score 0), like `get_scores`.
    pub fn scores<S: AsRef<str>>(&self, tokens: &[S]) -> Vec<f64> {
        let mut scores = vec![0.0f64; self.docs.len()];
        self.accumulate(tokens, |doc, s| scores[doc as usize] += s);
        scores
    }

    fn accumulate<S: AsRef<str>, F: FnMut(u32, f64)>(&self, tokens: &[S], mut add: F) {
        if self.live == 0 || self.total_len == 0 {
            return;
        }
        let avgdl = self.total_len as f64 / self.live as f64;
        let Bm25Params { k1, b, .. } = self.params;
        for t in tokens {
            let Some(&tid) = self.vocab.get(t.as_ref()) else { continue };
            let list = &self.postings[tid as usize];
            if list.is_empty() {
                continue;
            }
            let idf = self.idf(t.as_ref());
            for &(doc, tf) in list {
                let Some(d) = &self.docs[doc as usize] else { continue };
                let tf = f64::from(tf);
                add(doc, idf * (tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * f64::from(d.len) / avgdl))));
            }
        }
    }

    /// The best `k` documents for `query` (tokenised with [`tokenize`]), best first. Only
    /// documents holding at least one query token are returned.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        self.search_tokens(&tokenize(query), k)
    }

    /// [`Bm25::search`] for an already tokenised query.
    pub fn search_tokens<S: AsRef<str>>(&self, tokens: &[S], k: usize) -> Result<Vec<Hit>> {
        if k == 0 {
            return Err(Error::ZeroK);
        }
        if self.live == 0 {
            return Err(Error::EmptyIndex);
        }
        let mut scores: HashMap<u32, f64> = HashMap::new();
        self.accumulate(tokens, |doc, s| *scores.entry(doc).or_insert(0.0) += s);
        let mut top = TopK::new(k);
        for (doc, s) in scores {
            top.push(doc, s as f32);
        }
        Ok(top.into_sorted())
    }

    /// Saves to `dir/bm25.bin` (atomically) and returns the file's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let mut w = Writer::new();
        w.f64(self.params.k1);
        w.f64(self.params.b);
        w.f64(self.params.epsilon);
        w.len(self.terms.len());
        for t in &self.terms {
            w.str(t);
        }
        w.len(self.docs.len());
        for d in &self.docs {
            match d {
                None => w.u8(0),
                Some(d) => {
                    w.u8(1);
                    w.u32(d.len);
                    w.len(d.terms.len());
                    for &(t, f) in &d.terms {
                        w.u32(t);
                        w.u32(f);
                    }
                }
            }
        }
        persist::save(dir, BM25_FILE, MAGIC, VERSION, w)
    }

    /// Loads what [`Bm25::save`] wrote to `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(BM25_FILE);
        let payload = persist::load(&path, MAGIC, VERSION)?;
        let mut r = Reader::new(&payload, &path);
        let params = Bm25Params { k1: r.f64()?, b: r.f64()?, epsilon: r.f64()? };
        params.validate().map_err(|e| r.corrupt(e.to_string()))?;
        let mut index = Bm25::new(params)?;
        let nterms = r.len(8)?;
        for i in 0..nterms {
            let t = r.string()?;
            if index.vocab.insert(t.clone(), i as u32).is_some() {
                return Err(r.corrupt(format!("term {t:?} appears twice")));
            }
            index.terms.push(t);
            index.postings.push(Vec::new());
        }
        let ndocs = r.len(1)?;
        for id in 0..ndocs {
            match r.u8()? {
                0 => index.docs.push(None),
                1 => {
                    let len = r.u32()?;
                    let n = r.len(8)?;
                    let mut terms = Vec::with_capacity(n);
                    let mut total = 0u64;
                    for _ in 0..n {
                        let (t, f) = (r.u32()?, r.u32()?);
                        let sorted = terms.last().is_none_or(|&(p, _): &(u32, u32)| p < t);
                        if t as usize >= nterms || f == 0 || !sorted {
                            return Err(r.corrupt("a document's term list is out of range or unsorted"));
                        }
                        total += u64::from(f);
                        terms.push((t, f));
                        index.postings[t as usize].push((id as u32, f));
                    }
                    if total != u64::from(len) {
                        return Err(r.corrupt("a document's length disagrees with its term counts"));
                    }
                    index.docs.push(Some(Doc { len, terms }));
                    index.live += 1;
                    index.total_len += u64::from(len);
                }
                other => return Err(r.corrupt(format!("document tag {other}"))),
            }
        }
        r.finish()?;
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Query {
        tokens: Vec<String>,
        scores: Vec<f64>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        corpus: Vec<String>,
        tokens: Vec<Vec<String>>,
        queries: Vec<Query>,
        deleted: Vec<u32>,
        after_delete: Vec<Query>,
    }

    fn fixture() -> Fixture {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/bm25_rank_bm25.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn close(ours: &[f64], theirs: &[f64]) {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs) {
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{ours:?} vs {theirs:?}");
        }
    }

    #[test]
    fn scores_equal_rank_bm25() {
        let fx = fixture();
        let mut idx = Bm25::new(Bm25Params::default()).unwrap();
        for (text, tokens) in fx.corpus.iter().zip(&fx.tokens) {
            assert_eq!(&tokenize(text), tokens);
            idx.add(text).unwrap();
        }
        for q in &fx.queries {
            close(&idx.scores(&q.tokens), &q.scores);
        }
        for &d in &fx.deleted {
            idx.delete(d).unwrap();
        }
        for q in &fx.after_delete {
            let ours: Vec<f64> =
                idx.scores(&q.tokens).iter().enumerate().filter(|(i, _)| !fx.deleted.contains(&(*i as u32))).map(|(_, s)| *s).collect();
            close(&ours, &q.scores);
            for hit in idx.search_tokens(&q.tokens, 100).unwrap() {
                assert!(!fx.deleted.contains(&hit.id));
            }
        }
        // Adding the deleted documents back (as new ids) restores the original statistics.
        for &d in &fx.deleted {
            idx.add(&fx.corpus[d as usize]).unwrap();
        }
        let q = &fx.queries[0];
        let mut a = idx.scores(&q.tokens);
        a.retain(|s| *s != 0.0);
        let mut b = q.scores.clone();
        b.retain(|s| *s != 0.0);
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        close(&a, &b);
    }

    #[test]
    fn search_ranks_and_round_trips() {
        let fx = fixture();
        let mut idx = Bm25::new(Bm25Params::default()).unwrap();
        for text in &fx.corpus {
            idx.add(text).unwrap();
        }
        idx.delete(1).unwrap();
        let q = &fx.queries[0].tokens;
        let hits = idx.search_tokens(q, 3).unwrap();
        let scores = idx.scores(q);
        let mut want: Vec<(usize, f64)> = scores.iter().copied().enumerate().filter(|(i, s)| *i != 1 && *s != 0.0).collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(hits.iter().map(|h| h.id as usize).collect::<Vec<_>>(), want.iter().take(3).map(|w| w.0).collect::<Vec<_>>());

        let dir = tempfile::tempdir().unwrap();
        let path = idx.save(dir.path()).unwrap();
        let back = Bm25::load(dir.path()).unwrap();
        assert_eq!(back.scores(q), scores);
        assert_eq!(back.len(), idx.len());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(Bm25::load(dir.path()), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn tokenizer_and_bad_input() {
        assert_eq!(tokenize("Hello, WORLD!  foo_bar 42x Straße café"), vec!["hello", "world", "foo", "bar", "42x", "straße", "café"]);
        assert!(tokenize(" ,;- ").is_empty());
        let mut idx = Bm25::new(Bm25Params::default()).unwrap();
        assert!(matches!(idx.search("x", 1), Err(Error::EmptyIndex)));
        idx.add("a b").unwrap();
        assert!(matches!(idx.search("a", 0), Err(Error::ZeroK)));
        assert!(matches!(idx.delete(5), Err(Error::UnknownId(5))));
        assert!(idx.search("zzz", 3).unwrap().is_empty());
        assert!(Bm25::new(Bm25Params { b: 2.0, ..Bm25Params::default() }).is_err());
    }
}
