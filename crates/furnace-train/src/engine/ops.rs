//! The differentiable primitives of the training pass, on row-major f32 slices, each with a
//! hand-written backward: RMSNorm, half-split RoPE, causal grouped-query attention over
//! ragged sequences (each sequence attends only to itself: the padding-free form of a
//! padding mask), SwiGLU and cross-entropy with ignored rows.
//!
//! They save exactly what their backward needs (RMSNorm its reciprocal RMS, attention its
//! probabilities) and nothing else; every one has a finite-difference test in
//! `tests/ops_grad.rs`. Work is spread over rows (or sequence x head blocks) with rayon.

use furnace_model::kernels::attention::exp_nonpositive;
use rayon::prelude::*;

/// Sum with [`LANES`] independent accumulators (vectorizes; plain `sum` of f32 does not).
pub fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for t in 0..LANES {
            acc[t] += c[t];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `softmax` of a row in place (max subtracted, fast exp).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    row.iter_mut().for_each(|s| *s = exp_nonpositive(*s - max));
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// Rows per rayon task for row-wise ops.
const ROWS_PER_TASK: usize = 16;

/// `y = x * rstd * w` per row of width `w.len()`, with `rstd = 1 / sqrt(mean(x^2) + eps)`;
/// returns `(y, rstd)`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let rows = x.len() / h;
    let mut y = vec![0f32; x.len()];
    let mut rstd = vec![0f32; rows];
    y.par_chunks_mut(h * ROWS_PER_TASK).zip(rstd.par_chunks_mut(ROWS_PER_TASK)).zip(x.par_chunks(h * ROWS_PER_TASK)).for_each(
        |((ys, rs), xs)| {
            for ((yr, r), xr) in ys.chunks_mut(h).zip(rs.iter_mut()).zip(xs.chunks(h)) {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * *r * g;
                }
            }
        },
    );
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
    dx.par_chunks_mut(h).zip(x.par_chunks(h)).zip(dy.par_chunks(h)).zip(rstd.par_iter()).for_each(|(((dxr, xr), dyr), &r)| {
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

/// Lanes of the register blocks below (one AVX-512 vector of f32).
const LANES: usize = 16;

#[inline(always)]
fn block(s: &[f32], at: usize) -> &[f32; LANES] {
    s[at..at + LANES].try_into().unwrap_or(&[0f32; LANES])
}

/// Rows handled together by the attention tiles: each loaded value feeds `TILE` FMAs.
const TILE: usize = 4;

/// `out[r * ldo + j] = sum_d xs[r * ldx + d] * mt[d * ld + j]` for rows `r < R`, `j < n`,
/// `d < k`: `R` rows against the columns of a transposed matrix, each loaded block of `mt`
/// shared by the `R` rows (register tile `R x LANES`).
#[allow(clippy::too_many_arguments)]
fn dots_tile<const R: usize>(out: &mut [f32], ldo: usize, xs: &[f32], ldx: usize, k: usize, mt: &[f32], ld: usize, n: usize) {
    let mut j0 = 0;
    while j0 + LANES <= n {
        let mut acc = [[0f32; LANES]; R];
        for d in 0..k {
            let m = block(mt, d * ld + j0);
            for (r, a) in acc.iter_mut().enumerate() {
                let x = xs[r * ldx + d];
                for t in 0..LANES {
                    a[t] = x.mul_add(m[t], a[t]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[r * ldo + j0..r * ldo + j0 + LANES].copy_from_slice(a);
        }
        j0 += LANES;
    }
    for r in 0..R {
        for j in j0..n {
            out[r * ldo + j] = (0..k).map(|d| xs[r * ldx + d] * mt[d * ld + j]).sum();
        }
    }
}

/// `out[r * ldo + c] += sum_j ws[r * ldw + j] * rows[j * dim + c]` for rows `r < R`,
/// `j < n`, `c < dim`: `R` weighted sums of the same rows, each loaded block shared.
#[allow(clippy::too_many_arguments)]
fn combo_tile<const R: usize>(out: &mut [f32], ldo: usize, ws: &[f32], ldw: usize, n: usize, rows: &[f32], dim: usize) {
    let mut c0 = 0;
    while c0 + LANES <= dim {
        let mut acc = [[0f32; LANES]; R];
        for j in 0..n {
            let v = block(rows, j * dim + c0);
            for (r, a) in acc.iter_mut().enumerate() {
                let w = ws[r * ldw + j];
                for t in 0..LANES {
                    a[t] = w.mul_add(v[t], a[t]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (o, x) in out[r * ldo + c0..r * ldo + c0 + LANES].iter_mut().zip(a) {
                *o += x;
            }
        }
        c0 += LANES;
    }
    for r in 0..R {
        for c in c0..dim {
            out[r * ldo + c] += (0..n).map(|j| ws[r * ldw + j] * rows[j * dim + c]).sum::<f32>();
        }
    }
}

/// Runs `f(first row, rows in tile)` over `0..len` in tiles of [`TILE`] rows.
fn tiles(len: usize, mut f: impl FnMut(usize, usize)) {
    let mut i0 = 0;
    while i0 < len {
        let r = (len - i0).min(TILE);
        f(i0, r);
        i0 += r;
    }
}

/// [`dots_tile`] for a tile of `r <= TILE` rows.
#[allow(clippy::too_many_arguments)]
fn dots_rows(r: usize, out: &mut [f32], ldo: usize, xs: &[f32], ldx: usize, k: usize, mt: &[f32], ld: usize, n: usize) {
    match r {
        4 => dots_tile::<4>(out, ldo, xs, ldx, k, mt, ld, n),
        3 => dots_tile::<3>(out, ldo, xs, ldx, k, mt, ld, n),
        2 => dots_tile::<2>(out, ldo, xs, ldx, k, mt, ld, n),
        _ => dots_tile::<1>(out, ldo, xs, ldx, k, mt, ld, n),
    }
}

/// [`combo_tile`] for a tile of `r <= TILE` rows.
#[allow(clippy::too_many_arguments)]
fn combo_rows(r: usize, out: &mut [f32], ldo: usize, ws: &[f32], ldw: usize, n: usize, rows: &[f32], dim: usize) {
    match r {
        4 => combo_tile::<4>(out, ldo, ws, ldw, n, rows, dim),
        3 => combo_tile::<3>(out, ldo, ws, ldw, n, rows, dim),
        2 => combo_tile::<2>(out, ldo, ws, ldw, n, rows, dim),
        _ => combo_tile::<1>(out, ldo, ws, ldw, n, rows, dim),
    }
}

/// Splits `buf` into consecutive mutable blocks of the given sizes.
fn split_blocks(mut buf: &mut [f32], sizes: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut out = Vec::new();
    for n in sizes {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(a);
        buf = b;
    }
    out
}

/// Causal grouped-query attention over ragged sequences `seqs` (`(first row, length)`;
/// each attends only within itself) for `q: [rows, heads.q * dim]` and `k, v: [rows,
/// heads.kv * dim]`, with scale `1 / sqrt(dim)`. Returns the output `[rows, heads.q * dim]`
/// and the saved probabilities for [`attention_backward`] (one `[len, len]` block per
/// sequence and head; above the diagonal they are zero).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], seqs: &[(usize, usize)], heads: Heads) -> (Vec<f32>, Vec<f32>) {
    let (dim, qw, kw) = (heads.dim, heads.q * heads.dim, heads.kv * heads.dim);
    let rows = q.len() / qw.max(1);
    let rep = heads.q / heads.kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let (_, total) = prob_offsets(seqs, heads);
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads.q).map(move |h| (s, h))).collect();
    let mut probs = vec![0f32; total];
    let blocks = split_blocks(&mut probs, tasks.iter().map(|&(s, _)| seqs[s].1 * seqs[s].1));
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .zip(blocks)
        .map(|(&(s, h), p)| {
            let (start, len) = seqs[s];
            let qh = gather_head(q, qw, start, len, h, dim);
            let kt = transpose(&gather_head(k, kw, start, len, h / rep, dim), len, dim);
            let vh = gather_head(v, kw, start, len, h / rep, dim);
            let mut o = vec![0f32; len * dim];
            tiles(len, |i0, r| {
                // Scores of rows i0..i0+r against keys 0..i0+r (the causal part of the tile).
                let n = i0 + r;
                dots_rows(r, &mut p[i0 * len..], len, &qh[i0 * dim..], dim, dim, &kt, len, n);
                for i in i0..i0 + r {
                    let row = &mut p[i * len..i * len + n];
                    row[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                    let live = &mut row[..i + 1];
                    live.iter_mut().for_each(|x| *x *= scale);
                    softmax_in_place(live);
                }
                combo_rows(r, &mut o[i0 * dim..], dim, &p[i0 * len..], len, n, &vh, dim);
            });
            o
        })
        .collect();
    let mut out = vec![0f32; rows * qw];
    for (&(s, h), o) in tasks.iter().zip(outs) {
        let (start, len) = seqs[s];
        for i in 0..len {
            out[(start + i) * qw + h * dim..(start + i) * qw + (h + 1) * dim].copy_from_slice(&o[i * dim..(i + 1) * dim]);
        }
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
            let vt = transpose(&gather_head(v, kw, start, len, g, dim), len, dim);
            let mut dk = vec![0f32; len * dim];
            let mut dv = vec![0f32; len * dim];
            let mut dqs = Vec::with_capacity(rep);
            // dS by rows, and dS and P transposed ([j][i]) so that dk_j and dv_j are weighted
            // sums of rows. Entries above the diagonal (below it, transposed) stay zero.
            let mut ds = vec![0f32; len * len];
            let mut dst = vec![0f32; len * len];
            let mut pt = vec![0f32; len * len];
            for h in g * rep..(g + 1) * rep {
                let qh = gather_head(q, qw, start, len, h, dim);
                let doh = gather_head(dout, qw, start, len, h, dim);
                let p = &probs[offsets[s * heads.q + h]..offsets[s * heads.q + h] + len * len];
                let mut dq = vec![0f32; len * dim];
                tiles(len, |i0, r| {
                    let n = i0 + r;
                    // dP of the tile's rows, into ds.
                    dots_rows(r, &mut ds[i0 * len..], len, &doh[i0 * dim..], dim, dim, &vt, len, n);
                    for i in i0..i0 + r {
                        let pi = &p[i * len..i * len + i + 1];
                        let dsi = &mut ds[i * len..i * len + n];
                        let dsum: f32 = pi.iter().zip(dsi.iter()).map(|(a, b)| a * b).sum();
                        for j in 0..=i {
                            let d = pi[j] * (dsi[j] - dsum) * scale;
                            dsi[j] = d;
                            dst[j * len + i] = d;
                            pt[j * len + i] = pi[j];
                        }
                        dsi[i + 1..].iter_mut().for_each(|x| *x = 0.0);
                    }
                    combo_rows(r, &mut dq[i0 * dim..], dim, &ds[i0 * len..], len, n, &kh, dim);
                });
                // dk_j = sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} P_ij do_i.
                tiles(len, |j0, r| {
                    let n = len - j0;
                    combo_rows(r, &mut dk[j0 * dim..], dim, &dst[j0 * len + j0..], len, n, &qh[j0 * dim..], dim);
                    combo_rows(r, &mut dv[j0 * dim..], dim, &pt[j0 * len + j0..], len, n, &doh[j0 * dim..], dim);
                });
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

/// Logistic function through the fast exp of `-|x|` (no overflow, vectorizes).
#[inline]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    if x >= 0.0 {
        r
    } else {
        e * r
    }
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
    dg.par_chunks_mut(4096).zip(du.par_chunks_mut(4096)).zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(da.par_chunks(4096))).for_each(
        |((dg, du), ((g, u), da))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = da[i] * g[i] * s;
                dg[i] = da[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        },
    );
    (dg, du)
}

/// Cross-entropy of rows of logits `[rows, vocab]` against `targets`: returns each row's
/// loss `logsumexp(z) - z[t]`. The logits are consumed: with `grad` they are overwritten with the gradient
/// `weight * (softmax(z) - onehot(t))` of `sum_i weight_i * loss_i`.
pub fn cross_entropy(logits: &mut [f32], vocab: usize, targets: &[u32], weights: &[f32], grad: bool) -> Vec<f64> {
    let mut losses = vec![0f64; targets.len()];
    logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(targets.par_iter().zip(weights.par_iter())).for_each(
        |((z, loss), (&t, &w))| {
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let zt = z[t as usize];
            // exp(z - max) in place, summed in blocks of f32 lanes accumulated in f64.
            z.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
            let sum: f64 = z.chunks(1024).map(|c| lane_sum(c) as f64).sum();
            *loss = max as f64 + sum.ln() - zt as f64;
            if grad {
                let f = (w as f64 / sum) as f32;
                z.iter_mut().for_each(|v| *v *= f);
                z[t as usize] -= w;
            }
        },
    );
    losses
}

/// Rows per rayon task of the LoRA ops.
const LORA_ROWS: usize = 64;

/// `sum_i u_i (x) v_i` over rows `i`: `[uw, vw]` from `u: [n, uw]` and `v: [n, vw]`
/// (a `U^T V` product with a short `uw`), accumulated per task and then added up.
fn sum_outer(u: &[f32], uw: usize, v: &[f32], vw: usize) -> Vec<f32> {
    u.par_chunks(uw * LORA_ROWS)
        .zip(v.par_chunks(vw * LORA_ROWS))
        .fold(
            || vec![0f32; uw * vw],
            |mut acc, (us, vs)| {
                // acc += us^T vs, [TILE] rows of us^T at a time in registers.
                let nc = us.len() / uw;
                let ut = transpose(us, nc, uw);
                tiles(uw, |k0, r| combo_rows(r, &mut acc[k0 * vw..], vw, &ut[k0 * nc..], nc, nc, vs, vw));
                acc
            },
        )
        .reduce(
            || vec![0f32; uw * vw],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// LoRA's down projection `p = z A^T` for `z: [n, inp]`, `A: [r, inp]`; returns `[n, r]`.
pub fn lora_down(z: &[f32], inp: usize, a: &[f32], r: usize) -> Vec<f32> {
    let at = transpose(a, r, inp);
    let mut p = vec![0f32; z.len() / inp.max(1) * r];
    p.par_chunks_mut(r * LORA_ROWS).zip(z.par_chunks(inp * LORA_ROWS)).for_each(|(ps, zs)| {
        tiles(zs.len() / inp, |i0, t| dots_rows(t, &mut ps[i0 * r..], r, &zs[i0 * inp..], inp, inp, &at, r, r));
    });
    p
}

/// LoRA's up projection added to the base output: `y += s p B^T` for `p: [n, r]`,
/// `B: [out, r]`, `y: [n, out]`.
pub fn lora_up_add(y: &mut [f32], out: usize, p: &[f32], r: usize, b: &[f32], s: f32) {
    let bt = transpose(b, out, r);
    y.par_chunks_mut(out * LORA_ROWS).zip(p.par_chunks(r * LORA_ROWS)).for_each(|(ys, ps)| {
        let w: Vec<f32> = ps.iter().map(|&v| s * v).collect();
        tiles(ps.len() / r, |i0, t| combo_rows(t, &mut ys[i0 * out..], out, &w[i0 * r..], r, r, &bt, out));
    });
}

/// Gradients of `y = s (z A^T) B^T` given `dy`, from the saved `p = z A^T`: returns
/// `(dA [r, inp], dB [out, r], dz [n, inp])`.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    z: &[f32],
    inp: usize,
    a: &[f32],
    r: usize,
    b: &[f32],
    out: usize,
    s: f32,
    p: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = p.len() / r.max(1);
    // dp = s dy B: [n, r] (B is already the [out][r] "transposed" operand of `dots`).
    let mut dp = vec![0f32; n * r];
    dp.par_chunks_mut(r * LORA_ROWS).zip(dy.par_chunks(out * LORA_ROWS)).for_each(|(dps, dys)| {
        tiles(dps.len() / r, |i0, t| dots_rows(t, &mut dps[i0 * r..], r, &dys[i0 * out..], out, out, b, r, r));
        dps.iter_mut().for_each(|v| *v *= s);
    });
    // dz = dp A.
    let mut dz = vec![0f32; n * inp];
    dz.par_chunks_mut(inp * LORA_ROWS).zip(dp.par_chunks(r * LORA_ROWS)).for_each(|(dzs, dps)| {
        tiles(dps.len() / r, |i0, t| combo_rows(t, &mut dzs[i0 * inp..], inp, &dps[i0 * r..], r, r, a, inp));
    });
    let da = sum_outer(&dp, r, z, inp);
    let dbt = sum_outer(p, r, dy, out);
    let mut db = transpose(&dbt, r, out);
    db.iter_mut().for_each(|v| *v *= s);
    (da, db, dz)
}
