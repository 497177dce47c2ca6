//! The differentiable primitives of the training pass, on row-major f32 slices, each with a
//! hand-written backward: RMSNorm, half-split RoPE, causal grouped-query attention over
//! ragged sequences (each sequence attends only to itself: the padding-free form of a
//! padding mask), SwiGLU and cross-entropy with ignored rows.
//!
//! They save exactly what their backward needs (RMSNorm its reciprocal RMS, attention its
//! probabilities) and nothing else; every one has a finite-difference test in
//! `tests/ops_grad.rs`. Work is spread over rows (or sequence x head blocks) with rayon.

use rayon::prelude::*;

/// Rows per rayon task for row-wise ops.
const ROWS_PER_TASK: usize = 16;

/// `y = x * rstd * w` per row of width `w.len()`, with `rstd = 1 / sqrt(mean(x^2) + eps)`;
/// returns `(y, rstd)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h;
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|((ys, rs), xs)| {
            for ((yr, r), xr) in ys.chunks_mut(h).zip(rs.iter_mut()).zip(xs.chunks(h)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * *r * g;
                }
            }
        });
    (y, rstd)
}

/// Recomputes the output of [`rms_norm`] from its saved `rstd` (cheaper than keeping it).
pub fn rms_norm_apply(x: &[f32], w: &[f32], rstd: &[f32]) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter()).for_each(|((yr, xr), &r)| {
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * r * g;
        }
    });
    y
}

/// Adds the input gradient of [`rms_norm`] to `dx`:
/// `dx += rstd * (g - x * rstd^2 * mean(g * x))` with `g = dy * w`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let h = w.len();
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(dy.par_chunks(h))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, xr), dyr), &r)| {
            let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((d, g), v)| d * g * v).sum();
            let c = r * r * dot / h as f32;
            for (((o, &d), &g), &v) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *o += r * (d * g - v * c);
            }
        });
}

/// RoPE tables for positions `0..len`: `(cos, sin)`, each `[len, half]`.
pub fn rope_tables(inv_freq: &[f32], len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(len * inv_freq.len());
    let mut sin = Vec::with_capacity(len * inv_freq.len());
    for p in 0..len {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Half-split RoPE in place on `x: [rows, heads * head_dim]`, row `i` at position
/// `pos[i]`: `(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`. With `inverse` the rotation goes
/// the other way, which is exactly the backward of the forward rotation.
pub fn rope(x: &mut [f32], pos: &[usize], head_dim: usize, tables: &(Vec<f32>, Vec<f32>), inverse: bool) {
    let half = head_dim / 2;
    let width = x.len() / pos.len().max(1);
    let (cos, sin) = tables;
    x.par_chunks_mut(width).zip(pos.par_iter()).for_each(|(row, &p)| {
        let c = &cos[p * half..(p + 1) * half];
        let s = &sin[p * half..(p + 1) * half];
        for head in row.chunks_mut(head_dim) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                let si = if inverse { -s[i] } else { s[i] };
                x1[i] = a * c[i] - b * si;
                x2[i] = b * c[i] + a * si;
            }
        }
    });
}

/// Head layout of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads.
    pub q: usize,
    /// Key/value heads (divides `q`).
    pub kv: usize,
    /// Width of one head.
    pub dim: usize,
}

/// Offsets of each (sequence, query head) probability block `[len, len]` in the saved
/// probabilities.
fn prob_offsets(seqs: &[(usize, usize)], heads: Heads) -> (Vec<usize>, usize) {
    let mut off = Vec::with_capacity(seqs.len() * heads.q);
    let mut total = 0;
    for &(_, len) in seqs {
        for _ in 0..heads.q {
            off.push(total);
            total += len * len;
        }
    }
    (off, total)
}

/// Copies head `h` of rows `start..start + len` out of `[rows, heads * dim]` into `[len, dim]`.
fn gather_head(x: &[f32], width: usize, start: usize, len: usize, h: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len * dim);
    for i in start..start + len {
        out.extend_from_slice(&x[i * width + h * dim..i * width + (h + 1) * dim]);
    }
    out
}

/// `[len, dim]` -> `[dim, len]`.
fn transpose(x: &[f32], len: usize, dim: usize) -> Vec<f32> {
    let mut t = vec![0f32; len * dim];
    for i in 0..len {
        for d in 0..dim {
            t[d * len + i] = x[i * dim + d];
        }
    }
    t
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Causal grouped-query attention over ragged sequences `seqs` (`(first row, length)`;
/// each attends only within itself) for `q: [rows, heads.q * dim]` and `k, v: [rows,
/// heads.kv * dim]`, with scale `1 / sqrt(dim)`. Returns the output `[rows, heads.q * dim]`
/// and the saved probabilities for [`attention_backward`].
pub fn attention(q: &[f32], k: &[f32], v: &[f32], seqs: &[(usize, usize)], heads: Heads) -> (Vec<f32>, Vec<f32>) {
    let (dim, qw, kw) = (heads.dim, heads.q * heads.dim, heads.kv * heads.dim);
    let rows = q.len() / qw.max(1);
    let rep = heads.q / heads.kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let (offsets, total) = prob_offsets(seqs, heads);
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads.q).map(move |h| (s, h))).collect();
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let (start, len) = seqs[s];
            let qh = gather_head(q, qw, start, len, h, dim);
            let kt = transpose(&gather_head(k, kw, start, len, h / rep, dim), len, dim);
            let vh = gather_head(v, kw, start, len, h / rep, dim);
            let mut p = vec![0f32; len * len];
            let mut o = vec![0f32; len * dim];
            for i in 0..len {
                let row = &mut p[i * len..i * len + i + 1];
                for d in 0..dim {
                    axpy(row, qh[i * dim + d], &kt[d * len..d * len + i + 1]);
                }
                let mut max = f32::NEG_INFINITY;
                for s in row.iter_mut() {
                    *s *= scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let oi = &mut o[i * dim..(i + 1) * dim];
                for (j, s) in row.iter_mut().enumerate() {
                    *s *= inv;
                    axpy(oi, *s, &vh[j * dim..(j + 1) * dim]);
                }
            }
            (o, p)
        })
        .collect();
    let mut out = vec![0f32; rows * qw];
    let mut probs = vec![0f32; total];
    for (((s, h), (o, p)), off) in tasks.iter().zip(blocks).zip(&offsets) {
        let (start, len) = seqs[*s];
        for i in 0..len {
            out[(start + i) * qw + h * dim..(start + i) * qw + (h + 1) * dim].copy_from_slice(&o[i * dim..(i + 1) * dim]);
        }
        probs[*off..*off + len * len].copy_from_slice(&p);
    }
    (out, probs)
}

/// Gradients `(dq, dk, dv)` of [`attention`] given the output gradient `dout`, from the
/// saved probabilities `probs` and the inputs (after RoPE).
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    seqs: &[(usize, usize)],
    heads: Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dim, qw, kw) = (heads.dim, heads.q * heads.dim, heads.kv * heads.dim);
    let rows = q.len() / qw.max(1);
    let rep = heads.q / heads.kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let (offsets, _) = prob_offsets(seqs, heads);
    // One task per (sequence, key/value head): it owns that head's dk and dv rows.
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads.kv).map(move |g| (s, g))).collect();
    type Block = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let blocks: Vec<Block> = tasks
        .par_iter()
        .map(|&(s, g)| {
            let (start, len) = seqs[s];
            let kh = gather_head(k, kw, start, len, g, dim);
            let vh = gather_head(v, kw, start, len, g, dim);
            let vt = transpose(&vh, len, dim);
            let mut dk = vec![0f32; len * dim];
            let mut dv = vec![0f32; len * dim];
            let mut dqs = Vec::with_capacity(rep);
            let mut dp = vec![0f32; len];
            for h in g * rep..(g + 1) * rep {
                let qh = gather_head(q, qw, start, len, h, dim);
                let doh = gather_head(dout, qw, start, len, h, dim);
                let p = &probs[offsets[s * heads.q + h]..offsets[s * heads.q + h] + len * len];
                let mut dq = vec![0f32; len * dim];
                for i in 0..len {
                    let pi = &p[i * len..i * len + i + 1];
                    let doi = &doh[i * dim..(i + 1) * dim];
                    let dpi = &mut dp[..i + 1];
                    dpi.iter_mut().for_each(|x| *x = 0.0);
                    for d in 0..dim {
                        axpy(dpi, doi[d], &vt[d * len..d * len + i + 1]);
                    }
                    let dsum: f32 = pi.iter().zip(dpi.iter()).map(|(a, b)| a * b).sum();
                    let qi = &qh[i * dim..(i + 1) * dim];
                    let dqi = &mut dq[i * dim..(i + 1) * dim];
                    for j in 0..=i {
                        let ds = pi[j] * (dpi[j] - dsum) * scale;
                        axpy(dqi, ds, &kh[j * dim..(j + 1) * dim]);
                        axpy(&mut dk[j * dim..(j + 1) * dim], ds, qi);
                        axpy(&mut dv[j * dim..(j + 1) * dim], pi[j], doi);
                    }
                }
                dqs.push(dq);
            }
            (dqs, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; rows * qw];
    let mut dk = vec![0f32; rows * kw];
    let mut dv = vec![0f32; rows * kw];
    for (&(s, g), (dqs, dkb, dvb)) in tasks.iter().zip(blocks) {
        let (start, len) = seqs[s];
        for i in 0..len {
            let r = start + i;
            dk[r * kw + g * dim..r * kw + (g + 1) * dim].copy_from_slice(&dkb[i * dim..(i + 1) * dim]);
            dv[r * kw + g * dim..r * kw + (g + 1) * dim].copy_from_slice(&dvb[i * dim..(i + 1) * dim]);
            for (hi, dqh) in dqs.iter().enumerate() {
                let h = g * rep + hi;
                dq[r * qw + h * dim..r * qw + (h + 1) * dim].copy_from_slice(&dqh[i * dim..(i + 1) * dim]);
            }
        }
    }
    (dq, dk, dv)
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU: `silu(g) * u`.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut a = vec![0f32; g.len()];
    a.par_chunks_mut(4096).zip(g.par_chunks(4096)).zip(u.par_chunks(4096)).for_each(|((a, g), u)| {
        for ((o, &x), &y) in a.iter_mut().zip(g).zip(u) {
            *o = x * sigmoid(x) * y;
        }
    });
    a
}

/// Gradients `(dg, du)` of [`swiglu`].
pub fn swiglu_backward(g: &[f32], u: &[f32], da: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(da.par_chunks(4096)))
        .for_each(|((dg, du), ((g, u), da))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = da[i] * g[i] * s;
                dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    (dg, du)
}

/// Cross-entropy of rows of logits `[rows, vocab]` against `targets`: returns each row's
/// loss `logsumexp(z) - z[t]` and, with `grad`, overwrites the logits with the gradient
/// `weight * (softmax(z) - onehot(t))` of `sum_i weight_i * loss_i`.
pub fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[u32], weights: &[f32], grad: bool) -> Vec<f64> {
    let mut losses = vec![0f64; targets.len()];
    logits
        .par_chunks_mut(vocab)
        .zip(losses.par_iter_mut())
        .zip(targets.par_iter().zip(weights.par_iter()))
        .for_each(|((z, loss), (&t, &w))| {
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            *loss = lse - z[t as usize] as f64;
            if grad {
                for v in z.iter_mut() {
                    *v = w * ((*v as f64 - lse).exp() as f32);
                }
                z[t as usize] -= w;
            }
        });
    losses
}
