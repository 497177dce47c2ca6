//! Singular value decompositions in f64 without LAPACK (candle has none), sized for LoRA
//! deltas (a few thousand rows by a few hundred columns).
//!
//! Three building blocks:
//! - [`jacobi_svd`]: one-sided (Hestenes) Jacobi. Each sweep orthogonalises every column pair
//!   of the working matrix with a plane rotation until all pairs are orthogonal to machine
//!   precision. Singular values come out with high *relative* accuracy (Demmel–Veselić), so
//!   it is the reference method; its cost, O(sweeps · n² · m), suits small matrices: the
//!   `R × R` cores of [`low_rank_truncated_svd`] and tests.
//! - [`symmetric_eigen`]: Householder tridiagonalisation followed by the implicit QL
//!   algorithm with Wilkinson shifts (EISPACK `tred2`/`tql2`, as in JAMA), O(n³). Eigenvalues
//!   are accurate to about `1e-16 · ‖G‖`.
//! - [`truncated_svd`]: the general case through the Gram matrix of the smaller side,
//!   `G = Δᵀ Δ` (or `Δ Δᵀ`), and [`symmetric_eigen`]. Forming `G` squares the condition
//!   number, so a singular value `σᵢ` is accurate to about `1e-16 · σ₁² / σᵢ` in absolute
//!   terms: the leading singular triplets that a truncation keeps are accurate to near machine
//!   precision, while the ones far below `1e-8 · σ₁` are not (they are dropped or carry a
//!   negligible part of `Δ`). `U·S` is computed as `Δ V` without dividing by `σ`. Cost: about
//!   1 s for a 1536 × 576 delta in the test profile (Gram 0.2 s, `tred2` 0.5 s, `tql2` 0.3 s),
//!   so the pruned `*_svd` combinations of two SmolLM2-135M adapters take minutes on two cores.
//! - [`low_rank_truncated_svd`]: `Δ = P Q` given as factors (the weighted sum of LoRA deltas
//!   is `[w₁s₁B₁ | w₂s₂B₂] · [A₁; A₂]`): thin QR of `P` and `Qᵀ` (modified Gram–Schmidt,
//!   applied twice), then [`jacobi_svd`] of the small core `R_P R_Qᵀ`. Exact up to rounding,
//!   O((m + n) R²): combining two SmolLM2 adapters this way takes milliseconds per module.

/// A dense row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f64>,
}

impl Mat {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// The identity.
    pub fn eye(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// The value at `(r, c)`.
    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    /// A mutable reference to the value at `(r, c)`.
    pub fn at_mut(&mut self, r: usize, c: usize) -> &mut f64 {
        &mut self.data[r * self.cols + c]
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f64] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        out
    }

    /// `self · other` (i-k-j loop order: contiguous inner loop).
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let orow = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                if a == 0.0 {
                    continue;
                }
                for (o, b) in orow.iter_mut().zip(other.row(k)) {
                    *o += a * b;
                }
            }
        }
        out
    }

    /// The Frobenius norm.
    pub fn norm(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }
}

/// A thin SVD `A = U diag(s) Vᵀ` with `k = min(m, n)` singular values in descending order.
#[derive(Debug, Clone)]
pub struct Svd {
    /// `m × k`, orthonormal columns (a column whose singular value is zero is zero).
    pub u: Mat,
    /// The `k` singular values, descending.
    pub s: Vec<f64>,
    /// `k × n`, orthonormal rows.
    pub vt: Mat,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One-sided Jacobi SVD of any `m × n` matrix (see the module docs).
pub fn jacobi_svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        // A = U S Vᵀ  ⇔  Aᵀ = V S Uᵀ.
        let t = jacobi_svd(&a.t());
        return Svd { u: t.vt.t(), s: t.s, vt: t.u.t() };
    }
    let (m, n) = (a.rows, a.cols);
    // Columns of the working matrix W = A V and of V, stored contiguously.
    let at = a.t();
    let mut w: Vec<Vec<f64>> = (0..n).map(|j| at.row(j).to_vec()).collect();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    let eps = f64::EPSILON;
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha = dot(&w[p], &w[p]);
                let beta = dot(&w[q], &w[q]);
                let gamma = dot(&w[p], &w[q]);
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut w, p, q, c, s);
                rotate(&mut v, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = w.iter().enumerate().map(|(j, col)| (dot(col, col).sqrt(), j)).collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut u = Mat::zeros(m, n);
    let mut vt = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (k, &(sigma, j)) in order.iter().enumerate() {
        s.push(sigma);
        if sigma > 0.0 {
            for (i, x) in w[j].iter().enumerate() {
                *u.at_mut(i, k) = x / sigma;
            }
        }
        vt.data[k * n..(k + 1) * n].copy_from_slice(&v[j]);
    }
    Svd { u, s, vt }
}

/// Rotates columns `p < q`: `(x_p, x_q) ← (c x_p − s x_q, s x_p + c x_q)`.
fn rotate(cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64) {
    let (lo, hi) = cols.split_at_mut(q);
    for (xp, xq) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
        let (a, b) = (*xp, *xq);
        *xp = c * a - s * b;
        *xq = s * a + c * b;
    }
}

/// Eigen-decomposition of a symmetric `n × n` matrix: eigenvalues in descending order and
/// the matching orthonormal eigenvectors as the *rows* of the returned matrix.
pub fn symmetric_eigen(g: &Mat) -> (Vec<f64>, Mat) {
    assert_eq!(g.rows, g.cols, "symmetric_eigen needs a square matrix");
    let n = g.rows;
    if n == 0 {
        return (Vec::new(), Mat::zeros(0, 0));
    }
    let mut v = g.clone();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    // tred2 runs on the transpose (the same symmetric input) so that its inner loops walk
    // rows; it leaves the transform transposed, eigenvectors as rows, as tql2 wants them.
    tred2(n, &mut v, &mut d, &mut e);
    let mut z = v;
    tql2(n, &mut z, &mut d, &mut e);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[b].total_cmp(&d[a]));
    let mut vecs = Mat::zeros(n, n);
    let mut vals = Vec::with_capacity(n);
    for (k, &j) in order.iter().enumerate() {
        vals.push(d[j]);
        vecs.data[k * n..(k + 1) * n].copy_from_slice(z.row(j));
    }
    (vals, vecs)
}

/// Householder reduction of the symmetric `v` to tridiagonal form (EISPACK `tred2`, written
/// on the transposed storage: every `V[a][b]` of the original is `v[b][a]` here, so the hot
/// loops are contiguous): on return `d` holds the diagonal, `e[1..]` the subdiagonal, `v` the
/// orthogonal transform, transposed.
#[allow(clippy::needless_range_loop)]
fn tred2(n: usize, v: &mut Mat, d: &mut [f64], e: &mut [f64]) {
    for j in 0..n {
        d[j] = v.at(j, n - 1);
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v.at(j, i - 1);
                *v.at_mut(j, i) = 0.0;
                *v.at_mut(i, j) = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for j in 0..i {
                e[j] = 0.0;
            }
            for j in 0..i {
                f = d[j];
                *v.at_mut(i, j) = f;
                g = e[j] + v.at(j, j) * f;
                let row = &v.data[j * n + j + 1..j * n + i];
                for ((x, dk), ek) in row.iter().zip(&d[j + 1..i]).zip(&mut e[j + 1..i]) {
                    g += x * dk;
                    *ek += x * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                let row = &mut v.data[j * n + j..j * n + i];
                for ((x, ek), dk) in row.iter_mut().zip(&e[j..i]).zip(&d[j..i]) {
                    *x -= f * ek + g * dk;
                }
                d[j] = v.at(j, i - 1);
                *v.at_mut(j, i) = 0.0;
            }
        }
        d[i] = h;
    }
    for i in 0..n - 1 {
        *v.at_mut(i, n - 1) = v.at(i, i);
        *v.at_mut(i, i) = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v.at(i + 1, k) / h;
            }
            let (head, tail) = v.data.split_at_mut((i + 1) * n);
            let pivot = &tail[..=i];
            for j in 0..=i {
                let row = &mut head[j * n..j * n + i + 1];
                let g = dot(pivot, row);
                row.iter_mut().zip(&d[..=i]).for_each(|(x, dk)| *x -= g * dk);
            }
        }
        for k in 0..=i {
            *v.at_mut(i + 1, k) = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v.at(j, n - 1);
        *v.at_mut(j, n - 1) = 0.0;
    }
    *v.at_mut(n - 1, n - 1) = 1.0;
    e[0] = 0.0;
}

/// Implicit QL with shifts on the tridiagonal `(d, e)` (EISPACK `tql2`); `z` holds the
/// transform's columns as rows and receives the eigenvectors (rows), `d` the eigenvalues.
fn tql2(n: usize, z: &mut Mat, d: &mut [f64], e: &mut [f64]) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            for _iter in 0..200 {
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    // Rotate eigenvector rows i and i+1.
                    let (lo, hi) = z.data.split_at_mut((i + 1) * n);
                    let zi = &mut lo[i * n..];
                    let zi1 = &mut hi[..n];
                    for (a, b) in zi.iter_mut().zip(zi1.iter_mut()) {
                        let hb = *b;
                        *b = s * *a + c * hb;
                        *a = c * *a - s * hb;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
}

/// The best rank-`k` approximation of `delta` split as PEFT splits it: `us = U_k diag(S_k)`
/// (`m × k`) and `vt = V_kᵀ` (`k × n`), with the `k` leading singular values. Needs
/// `k <= min(m, n)`. General path (Gram matrix of the smaller side, see the module docs).
pub fn truncated_svd(delta: &Mat, k: usize) -> (Mat, Mat, Vec<f64>) {
    let (m, n) = (delta.rows, delta.cols);
    let k = k.min(m.min(n));
    if n <= m {
        // G = Δᵀ Δ = V S² Vᵀ; U S = Δ V.
        let g = gram_cols(delta);
        let (vals, vecs) = symmetric_eigen(&g);
        let mut vt = Mat::zeros(k, n);
        vt.data.copy_from_slice(&vecs.data[..k * n]);
        let us = delta.matmul(&vt.t());
        let s = vals[..k].iter().map(|x| x.max(0.0).sqrt()).collect();
        (us, vt, s)
    } else {
        // G = Δ Δᵀ = U S² Uᵀ; Vᵀ = S⁻¹ Uᵀ Δ.
        let g = gram_cols(&delta.t());
        let (vals, vecs) = symmetric_eigen(&g);
        let s: Vec<f64> = vals[..k].iter().map(|x| x.max(0.0).sqrt()).collect();
        let mut ut = Mat::zeros(k, m);
        ut.data.copy_from_slice(&vecs.data[..k * m]);
        let mut vt = ut.matmul(delta);
        let tiny = s.first().copied().unwrap_or(0.0) * 1e-13;
        let mut us = ut.t();
        for (i, &sigma) in s.iter().enumerate() {
            let row = &mut vt.data[i * n..(i + 1) * n];
            if sigma > tiny {
                row.iter_mut().for_each(|x| *x /= sigma);
            } else {
                // A (numerically) zero singular value: its B column is zero, so the product
                // does not depend on this row; it is replaced by an orthonormal completion.
                row.iter_mut().for_each(|x| *x = 0.0);
            }
            for r in 0..m {
                *us.at_mut(r, i) *= sigma;
            }
        }
        complete_rows(&mut vt);
        (us, vt, s)
    }
}

/// Replaces the zero rows of `vt` (`k × n`, `k <= n`, its other rows orthonormal) with unit
/// vectors orthogonal to all other rows, so `vt` has orthonormal rows as LAPACK's `Vh` does.
pub fn complete_rows(vt: &mut Mat) {
    let (k, n) = (vt.rows, vt.cols);
    let mut candidate = 0;
    for i in 0..k {
        if vt.row(i).iter().any(|&x| x != 0.0) {
            continue;
        }
        while candidate < n {
            let mut v = vec![0.0; n];
            v[candidate] = 1.0;
            candidate += 1;
            for _pass in 0..2 {
                for j in 0..k {
                    if j == i {
                        continue;
                    }
                    let c = dot(vt.row(j), &v);
                    v.iter_mut().zip(vt.row(j)).for_each(|(a, b)| *a -= c * b);
                }
            }
            let norm = dot(&v, &v).sqrt();
            if norm > 0.5 {
                v.iter_mut().for_each(|a| *a /= norm);
                vt.data[i * n..(i + 1) * n].copy_from_slice(&v);
                break;
            }
        }
    }
}

/// Fixes the sign of each singular pair (SVD leaves it free): the entry of largest magnitude
/// of each `vt` row is made positive, the matching `us` column flipped with it.
pub fn canonical_signs(us: &mut Mat, vt: &mut Mat) {
    for i in 0..vt.rows {
        let row = vt.row(i);
        let big = row.iter().copied().fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            vt.data[i * vt.cols..(i + 1) * vt.cols].iter_mut().for_each(|x| *x = -*x);
            for r in 0..us.rows {
                *us.at_mut(r, i) = -us.at(r, i);
            }
        }
    }
}

/// `Xᵀ X` for `X: m × n` (an `n × n` symmetric matrix).
fn gram_cols(x: &Mat) -> Mat {
    let n = x.cols;
    let mut g = Mat::zeros(n, n);
    for r in 0..x.rows {
        let row = x.row(r);
        for (i, &a) in row.iter().enumerate() {
            if a == 0.0 {
                continue;
            }
            let grow = &mut g.data[i * n..(i + 1) * n];
            for (gv, &b) in grow[i..].iter_mut().zip(&row[i..]) {
                *gv += a * b;
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            g.data[i * n + j] = g.data[j * n + i];
        }
    }
    g
}

/// Thin QR of `x: m × r` (`m >= r` not required) by modified Gram–Schmidt applied twice:
/// `x = Q R` with `Q: m × r`, `R: r × r` upper triangular. A column that is (numerically)
/// dependent on the previous ones gets a zero `Q` column and a zero `R` diagonal.
fn thin_qr(x: &Mat) -> (Mat, Mat) {
    let (m, r) = (x.rows, x.cols);
    let xt = x.t();
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(r);
    let mut rr = Mat::zeros(r, r);
    for j in 0..r {
        let mut v = xt.row(j).to_vec();
        let norm0 = dot(&v, &v).sqrt();
        for _pass in 0..2 {
            for (i, qi) in q.iter().enumerate() {
                let c = dot(qi, &v);
                *rr.at_mut(i, j) += c;
                v.iter_mut().zip(qi).for_each(|(a, b)| *a -= c * b);
            }
        }
        let norm = dot(&v, &v).sqrt();
        if norm > 1e-13 * norm0 && norm > 0.0 {
            *rr.at_mut(j, j) = norm;
            v.iter_mut().for_each(|a| *a /= norm);
        } else {
            v.iter_mut().for_each(|a| *a = 0.0);
        }
        q.push(v);
    }
    let mut qm = Mat::zeros(m, r);
    for (j, col) in q.iter().enumerate() {
        for (i, x) in col.iter().enumerate() {
            *qm.at_mut(i, j) = *x;
        }
    }
    (qm, rr)
}

/// [`truncated_svd`] of `Δ = p · q` (`p: m × R`, `q: R × n`) without forming `Δ`: thin QR
/// of both factors and a Jacobi SVD of the `R × R` core (see the module docs).
pub fn low_rank_truncated_svd(p: &Mat, q: &Mat, k: usize) -> (Mat, Mat, Vec<f64>) {
    assert_eq!(p.cols, q.rows, "low_rank_truncated_svd shapes");
    let (qp, rp) = thin_qr(p);
    let (qq, rq) = thin_qr(&q.t());
    let core = rp.matmul(&rq.t());
    let svd = jacobi_svd(&core);
    let k = k.min(svd.s.len());
    let rank = p.cols;
    // U_k S_k = Qp Uc_k S_k; V_kᵀ = (Qq Vc_k)ᵀ = Vc_kᵀ Qqᵀ.
    let mut uc_s = Mat::zeros(rank, k);
    for i in 0..rank {
        for j in 0..k {
            *uc_s.at_mut(i, j) = svd.u.at(i, j) * svd.s[j];
        }
    }
    let us = qp.matmul(&uc_s);
    let mut vct = Mat::zeros(k, rank);
    vct.data.copy_from_slice(&svd.vt.data[..k * rank]);
    let vt = vct.matmul(&qq.t());
    (us, vt, svd.s[..k].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random matrix in [-1, 1).
    fn rand_mat(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = furnace_model::rng::Rng::new(seed);
        Mat { rows, cols, data: (0..rows * cols).map(|_| rng.uniform(-1.0, 1.0)).collect() }
    }

    /// A random `n × k` matrix with orthonormal columns (QR of a random one).
    fn orthonormal(n: usize, k: usize, seed: u64) -> Mat {
        thin_qr(&rand_mat(n, k, seed)).0
    }

    fn max_abs_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn assert_orthonormal_rows(m: &Mat, tol: f64) {
        let g = m.matmul(&m.t());
        let err = max_abs_diff(&g, &Mat::eye(m.rows));
        assert!(err < tol, "rows not orthonormal: {err}");
    }

    /// `U diag(s) Vᵀ` from known singular values.
    fn with_singular_values(m: usize, n: usize, s: &[f64], seed: u64) -> Mat {
        let u = orthonormal(m, s.len(), seed);
        let v = orthonormal(n, s.len(), seed + 1);
        let mut us = u.clone();
        for i in 0..m {
            for (j, sj) in s.iter().enumerate() {
                *us.at_mut(i, j) *= sj;
            }
        }
        us.matmul(&v.t())
    }

    #[test]
    fn jacobi_reconstructs_and_is_orthogonal() {
        for &(m, n) in &[(40, 12), (12, 40), (25, 25), (1, 7), (7, 1)] {
            let a = rand_mat(m, n, (m * 100 + n) as u64);
            let svd = jacobi_svd(&a);
            let mut us = svd.u.clone();
            for i in 0..us.rows {
                for j in 0..us.cols {
                    *us.at_mut(i, j) *= svd.s[j];
                }
            }
            let err = max_abs_diff(&us.matmul(&svd.vt), &a);
            assert!(err < 1e-12, "{m}x{n}: reconstruction error {err}");
            assert_orthonormal_rows(&svd.u.t(), 1e-12);
            assert_orthonormal_rows(&svd.vt, 1e-12);
            assert!(svd.s.windows(2).all(|w| w[0] >= w[1]), "descending");
        }
    }

    #[test]
    fn known_singular_values() {
        let s = [9.0, 5.5, 3.0, 1.0, 1e-3, 1e-7];
        let a = with_singular_values(60, 20, &s, 7);
        let j = jacobi_svd(&a);
        for (got, want) in j.s.iter().zip(&s) {
            assert!((got - want).abs() < 1e-12 * 9.0, "jacobi {got} vs {want}");
        }
        assert!(j.s[s.len()..].iter().all(|x| x.abs() < 1e-12));
        let (_, _, gs) = truncated_svd(&a, 6);
        for (got, want) in gs.iter().zip(&s[..4]) {
            assert!((got - want).abs() < 1e-10, "gram {got} vs {want}");
        }
        // 2×2 by hand: [[3, 0], [4, 5]] has singular values √45 and √5.
        let b = Mat { rows: 2, cols: 2, data: vec![3.0, 0.0, 4.0, 5.0] };
        let j = jacobi_svd(&b);
        assert!((j.s[0] - 45f64.sqrt()).abs() < 1e-14 && (j.s[1] - 5f64.sqrt()).abs() < 1e-14);
    }

    #[test]
    fn symmetric_eigen_of_known_matrices() {
        let (vals, vecs) = symmetric_eigen(&Mat { rows: 2, cols: 2, data: vec![2.0, 1.0, 1.0, 2.0] });
        assert!((vals[0] - 3.0).abs() < 1e-14 && (vals[1] - 1.0).abs() < 1e-14);
        assert_orthonormal_rows(&vecs, 1e-14);
        // A random symmetric matrix: G v = λ v for every pair.
        let x = rand_mat(50, 50, 3);
        let g = x.matmul(&x.t());
        let (vals, vecs) = symmetric_eigen(&g);
        assert_orthonormal_rows(&vecs, 1e-12);
        for (k, lambda) in vals.iter().enumerate() {
            let v = Mat { rows: 50, cols: 1, data: vecs.row(k).to_vec() };
            let gv = g.matmul(&v);
            let err = gv.data.iter().zip(&v.data).map(|(a, b)| (a - lambda * b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-10 * vals[0], "eigenpair {k}: {err}");
        }
        // Repeated eigenvalues and a diagonal input.
        let (vals, _) = symmetric_eigen(&Mat { rows: 3, cols: 3, data: vec![1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 1.0] });
        assert_eq!(vals.iter().map(|v| (v * 1e12).round() / 1e12).collect::<Vec<_>>(), vec![5.0, 1.0, 1.0]);
    }

    /// The best rank-k approximation error equals the dropped singular values (Eckart–Young),
    /// and both paths agree on the product.
    #[test]
    fn truncation_paths_agree() {
        let p = rand_mat(150, 12, 11);
        let q = rand_mat(12, 48, 12);
        let delta = p.matmul(&q);
        let full = jacobi_svd(&delta);
        for k in [4, 8, 12] {
            let (us1, vt1, s1) = truncated_svd(&delta, k);
            let (us2, vt2, s2) = low_rank_truncated_svd(&p, &q, k);
            let (us3, vt3, _) = truncated_svd(&delta.t(), k);
            let r1 = us1.matmul(&vt1);
            let r2 = us2.matmul(&vt2);
            let r3 = us3.matmul(&vt3).t();
            let scale = delta.norm();
            assert!(max_abs_diff(&r1, &r2) < 1e-10 * scale, "k={k}: paths differ");
            assert!(max_abs_diff(&r1, &r3) < 1e-10 * scale, "k={k}: wide path differs");
            assert_orthonormal_rows(&vt1, 1e-12);
            assert_orthonormal_rows(&vt2, 1e-12);
            for i in 0..k {
                assert!((s1[i] - full.s[i]).abs() < 1e-10 * full.s[0]);
                assert!((s2[i] - full.s[i]).abs() < 1e-12 * full.s[0]);
            }
            let mut resid = delta.clone();
            resid.data.iter_mut().zip(&r2.data).for_each(|(a, b)| *a -= b);
            let dropped: f64 = full.s[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((resid.norm() - dropped).abs() < 1e-9 * scale, "Eckart–Young");
        }
    }

    #[test]
    fn rank_deficient_factors() {
        // Duplicate and zero columns in P: the product must still be reproduced exactly.
        let mut p = rand_mat(30, 6, 5);
        for i in 0..30 {
            *p.at_mut(i, 3) = p.at(i, 1);
            *p.at_mut(i, 5) = 0.0;
        }
        let q = rand_mat(6, 20, 6);
        let delta = p.matmul(&q);
        let (us, vt, s) = low_rank_truncated_svd(&p, &q, 6);
        assert!(max_abs_diff(&us.matmul(&vt), &delta) < 1e-12 * delta.norm());
        assert!(s[4].abs() < 1e-12 * s[0] && s[5].abs() < 1e-12 * s[0]);
        let (us, vt, _) = truncated_svd(&delta, 6);
        assert!(max_abs_diff(&us.matmul(&vt), &delta) < 1e-10 * delta.norm());
    }
}
