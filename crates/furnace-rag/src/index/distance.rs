//! Distance kernels and the [`Metric`] type. The kernels run over `chunks_exact(16)` with
//! sixteen independent accumulators so that the compiler vectorises them (no `unsafe`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How two vectors are compared. Every metric is turned into a score where higher is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The dot product.
    InnerProduct,
    /// Cosine similarity: vectors (and queries) are normalised to unit length on the way in,
    /// then compared by dot product.
    Cosine,
    /// Squared Euclidean distance; the score is its negation (`-‖a − b‖²`).
    L2,
}

impl Metric {
    pub(crate) fn code(self) -> u8 {
        match self {
            Metric::InnerProduct => 0,
            Metric::Cosine => 1,
            Metric::L2 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Metric> {
        match code {
            0 => Some(Metric::InnerProduct),
            1 => Some(Metric::Cosine),
            2 => Some(Metric::L2),
            _ => None,
        }
    }

    /// The score of `b` for `a` (higher is better). Both must have the same length.
    #[inline]
    pub fn score(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::InnerProduct | Metric::Cosine => dot(a, b),
            Metric::L2 => -l2_squared(a, b),
        }
    }
}

const LANES: usize = 16;

/// The dot product of two equally long slices (the shorter length is used otherwise).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    reduce(acc) + tail
}

/// The squared Euclidean distance of two equally long slices.
#[inline]
pub fn l2_squared(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        let d = x - y;
        tail += d * d;
    }
    reduce(acc) + tail
}

/// The scores of one row against four queries at once (each row chunk is loaded once for
/// all four); bit-for-bit what [`Metric::score`] gives for each.
#[inline]
pub(crate) fn score4(metric: Metric, row: &[f32], q: [&[f32]; 4]) -> [f32; 4] {
    if q.iter().any(|x| x.len() != row.len()) {
        return q.map(|x| metric.score(x, row));
    }
    match metric {
        Metric::L2 => kernel4::<true>(row, q).map(|s| -s),
        Metric::InnerProduct | Metric::Cosine => kernel4::<false>(row, q),
    }
}

/// Four dot products (or, with `L2`, squared distances) of equally long slices.
#[inline]
fn kernel4<const L2: bool>(row: &[f32], q: [&[f32]; 4]) -> [f32; 4] {
    #[inline(always)]
    fn term<const L2: bool>(x: f32, y: f32) -> f32 {
        if L2 {
            let t = x - y;
            t * t
        } else {
            x * y
        }
    }
    let n = row.len();
    let body = n - n % LANES;
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let rows = row[..body].chunks_exact(LANES);
    let q0 = q[0][..body].chunks_exact(LANES);
    let q1 = q[1][..body].chunks_exact(LANES);
    let q2 = q[2][..body].chunks_exact(LANES);
    let q3 = q[3][..body].chunks_exact(LANES);
    for ((((r, x0), x1), x2), x3) in rows.zip(q0).zip(q1).zip(q2).zip(q3) {
        for i in 0..LANES {
            a0[i] += term::<L2>(x0[i], r[i]);
            a1[i] += term::<L2>(x1[i], r[i]);
            a2[i] += term::<L2>(x2[i], r[i]);
            a3[i] += term::<L2>(x3[i], r[i]);
        }
    }
    let mut out = [reduce(a0), reduce(a1), reduce(a2), reduce(a3)];
    for (j, o) in out.iter_mut().enumerate() {
        let mut tail = 0.0f32;
        for (x, y) in q[j][body..].iter().zip(&row[body..]) {
            tail += term::<L2>(*x, *y);
        }
        *o += tail;
    }
    out
}

#[inline]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut half = [0.0f32; LANES / 2];
    for i in 0..LANES / 2 {
        half[i] = acc[i] + acc[i + LANES / 2];
    }
    half.iter().sum()
}

/// The Euclidean norm.
#[inline]
pub fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

/// Checks that `v` has `dim` finite components.
pub(crate) fn check_vector(v: &[f32], dim: usize) -> Result<()> {
    if v.len() != dim {
        return Err(Error::DimensionMismatch { expected: dim, got: v.len() });
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::BadVector { what: format!("component {i} of the vector is {} (NaN and infinities are refused)", v[i]) });
    }
    Ok(())
}

/// Checks `v` and returns it as stored for `metric` (unit length for cosine).
pub(crate) fn prepare(v: &[f32], dim: usize, metric: Metric) -> Result<Vec<f32>> {
    check_vector(v, dim)?;
    let mut out = v.to_vec();
    if metric == Metric::Cosine {
        let n = norm(&out);
        if !(n.is_finite() && n > 0.0) {
            return Err(Error::BadVector { what: "a zero-length vector has no direction for the cosine metric".into() });
        }
        for x in &mut out {
            *x /= n;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_naive_sums_for_every_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let l: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            assert!((dot(&a, &b) - d).abs() < 1e-4, "{n}");
            assert!((l2_squared(&a, &b) - l).abs() < 1e-4, "{n}");
        }
    }

    #[test]
    fn score4_equals_four_single_scores() {
        for n in [1usize, 15, 16, 17, 64, 100] {
            let row: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let qs: Vec<Vec<f32>> = (0..4).map(|j| (0..n).map(|i| ((i + j) as f32 * 0.7).cos()).collect()).collect();
            for metric in [Metric::InnerProduct, Metric::Cosine, Metric::L2] {
                let got = score4(metric, &row, [&qs[0], &qs[1], &qs[2], &qs[3]]);
                for j in 0..4 {
                    assert_eq!(got[j], metric.score(&qs[j], &row), "{n} {metric:?}");
                }
            }
        }
    }

    #[test]
    fn prepare_refuses_bad_vectors() {
        assert!(matches!(prepare(&[1.0, 2.0], 3, Metric::L2), Err(Error::DimensionMismatch { expected: 3, got: 2 })));
        assert!(matches!(prepare(&[1.0, f32::NAN], 2, Metric::L2), Err(Error::BadVector { .. })));
        assert!(matches!(prepare(&[0.0, 0.0], 2, Metric::Cosine), Err(Error::BadVector { .. })));
        let v = prepare(&[3.0, 4.0], 2, Metric::Cosine).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }
}
