//! The differentiable primitives of the training pass, on row-major f32 slices, each with a
//! hand-written backward: RMSNorm, half-split RoPE, causal grouped-query attention over
//! ragged sequences (each sequence attends only to itself: the padding-free form of a
//! padding mask), SwiGLU and cross-entropy with ignored rows.
//!
//! They save exactly what their backward needs (RMSNorm its reciprocal RMS, attention the
//! log-sum-exp of each row's scores) and nothing else; every one has a finite-difference
//! test in `tests/ops_grad.rs`. Work is spread over rows (or sequence x head blocks) with
//! rayon.
//!
//! Attention is tiled in the way of FlashAttention-2: the forward walks `[BLOCK, BLOCK]`
//! score tiles with an online softmax and keeps only the output and one log-sum-exp per
//! head and row; the backward recomputes each probability tile from q, k and that
//! log-sum-exp. Nothing of size `len^2` is ever held (a 2048-token sequence of SmolLM2, 9
//! heads, would otherwise keep 150 MB of probabilities per layer, 4.5 GB over 30 layers),
//! so the memory of a training pass grows linearly with the sequence length. The earlier
//! form, which kept every probability, stays in `ops/reference.rs` as the reference the
//! tiled one is tested against.

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

/// Queries (rows) and keys (columns) of one attention tile. The forward and the backward
/// hold a few `[BLOCK, BLOCK]` tiles per task, never a `[len, len]` matrix; 64 x 64 f32
/// (16 KiB) keeps a tile, the key block it reads and the rows it updates in L1/L2.
const BLOCK: usize = 64;

/// Register tile of the attention products: `R` rows by `C` blocks of [`LANES`] columns,
/// `out[r * ldo + j] = sum_d xs[r * ldx + d] * mt[d * ld + j]` for `j < C * LANES`. With
/// `R = 4, C = 4` the 16 accumulators fill half the vector registers and each step of `d`
/// does 16 FMAs for 4 vector loads and 4 broadcasts (the narrower [`dots_tile`] does 4
/// FMAs for 1 load and 4 broadcasts, and is bound by the loads).
// Not inlined: inside a larger caller LLVM leaves these loops scalar (seen in the
// disassembly); alone each compiles to `R * C` vector FMAs per step.
#[inline(never)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn dots_wide<const R: usize, const C: usize>(out: &mut [f32], ldo: usize, xs: &[f32], ldx: usize, k: usize, mt: &[f32], ld: usize) {
    let mut acc = [[[0f32; LANES]; C]; R];
    let xr: [&[f32]; R] = std::array::from_fn(|r| &xs[r * ldx..r * ldx + k]);
    for d in 0..k {
        let m: [&[f32; LANES]; C] = std::array::from_fn(|c| block(mt, d * ld + c * LANES));
        for r in 0..R {
            let x = xr[r][d];
            for c in 0..C {
                for t in 0..LANES {
                    acc[r][c][t] = x.mul_add(m[c][t], acc[r][c][t]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r * ldo + c * LANES..r * ldo + (c + 1) * LANES].copy_from_slice(&acc[r][c]);
        }
    }
}

/// Register tile `R x (C * LANES)` of `out[r * ldo + c] += sum_j w(r, j) * rows[j * ldr +
/// c]` for `j < n`, with the weight `w(r, j) = ws[r * wr + j * wj]` (strides, so that a
/// tile and its transpose are read from the same buffer), the same shape of work as
/// [`dots_wide`].
// Not inlined, as `dots_wide`.
#[inline(never)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn combo_wide<const R: usize, const C: usize>(
    out: &mut [f32],
    ldo: usize,
    ws: &[f32],
    wr: usize,
    wj: usize,
    n: usize,
    rows: &[f32],
    ldr: usize,
) {
    let mut acc = [[[0f32; LANES]; C]; R];
    for j in 0..n {
        let v: [&[f32; LANES]; C] = std::array::from_fn(|c| block(rows, j * ldr + c * LANES));
        for r in 0..R {
            let w = ws[r * wr + j * wj];
            for c in 0..C {
                for t in 0..LANES {
                    acc[r][c][t] = w.mul_add(v[c][t], acc[r][c][t]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            for (o, x) in out[r * ldo + c * LANES..r * ldo + (c + 1) * LANES].iter_mut().zip(&acc[r][c]) {
                *o += x;
            }
        }
    }
}

/// [`dots_wide`] over `n` columns for `R` rows: blocks of 64, 32 and 16 columns, then the
/// last `n % 16` one by one.
#[allow(clippy::too_many_arguments)]
fn dots_cols<const R: usize>(out: &mut [f32], ldo: usize, xs: &[f32], ldx: usize, k: usize, mt: &[f32], ld: usize, n: usize) {
    let mut c0 = 0;
    while c0 + 4 * LANES <= n {
        dots_wide::<R, 4>(&mut out[c0..], ldo, xs, ldx, k, &mt[c0..], ld);
        c0 += 4 * LANES;
    }
    if c0 + 2 * LANES <= n {
        dots_wide::<R, 2>(&mut out[c0..], ldo, xs, ldx, k, &mt[c0..], ld);
        c0 += 2 * LANES;
    }
    if c0 + LANES <= n {
        dots_wide::<R, 1>(&mut out[c0..], ldo, xs, ldx, k, &mt[c0..], ld);
        c0 += LANES;
    }
    for r in 0..R {
        for j in c0..n {
            out[r * ldo + j] = (0..k).map(|d| xs[r * ldx + d] * mt[d * ld + j]).sum();
        }
    }
}

/// [`combo_wide`] over `m` output columns for `R` rows, blocked as in [`dots_cols`].
#[allow(clippy::too_many_arguments)]
fn combo_cols<const R: usize>(out: &mut [f32], ldo: usize, ws: &[f32], wr: usize, wj: usize, n: usize, rows: &[f32], ldr: usize, m: usize) {
    let mut c0 = 0;
    while c0 + 4 * LANES <= m {
        combo_wide::<R, 4>(&mut out[c0..], ldo, ws, wr, wj, n, &rows[c0..], ldr);
        c0 += 4 * LANES;
    }
    if c0 + 2 * LANES <= m {
        combo_wide::<R, 2>(&mut out[c0..], ldo, ws, wr, wj, n, &rows[c0..], ldr);
        c0 += 2 * LANES;
    }
    if c0 + LANES <= m {
        combo_wide::<R, 1>(&mut out[c0..], ldo, ws, wr, wj, n, &rows[c0..], ldr);
        c0 += LANES;
    }
    for r in 0..R {
        for c in c0..m {
            out[r * ldo + c] += (0..n).map(|j| ws[r * wr + j * wj] * rows[j * ldr + c]).sum::<f32>();
        }
    }
}

/// `s[r * BLOCK + c] = xs_r . mt_c` for the `br` rows of `xs` (`[br, dim]`) against the `bc`
/// columns of `mt` (a transposed `[dim, ld]` matrix, already offset to the tile's first
/// column).
fn tile_dots(s: &mut [f32], xs: &[f32], br: usize, dim: usize, mt: &[f32], ld: usize, bc: usize) {
    tiles(br, |r0, r| {
        let (o, x) = (&mut s[r0 * BLOCK..], &xs[r0 * dim..]);
        match r {
            4 => dots_cols::<4>(o, BLOCK, x, dim, dim, mt, ld, bc),
            3 => dots_cols::<3>(o, BLOCK, x, dim, dim, mt, ld, bc),
            2 => dots_cols::<2>(o, BLOCK, x, dim, dim, mt, ld, bc),
            _ => dots_cols::<1>(o, BLOCK, x, dim, dim, mt, ld, bc),
        }
    });
}

/// `out[r] += sum_c w(r, c) * rows[c]` for `nr` output rows and `nc` weights each (`rows:
/// [nc, dim]`, `out: [nr, dim]`), with `w(r, c) = w[r * BLOCK + c]`, or with `transposed`
/// `w[c * BLOCK + r]` (a tile's transpose read in place).
fn tile_combo(out: &mut [f32], w: &[f32], transposed: bool, nr: usize, nc: usize, rows: &[f32], dim: usize) {
    let (wr, wj) = if transposed { (1, BLOCK) } else { (BLOCK, 1) };
    tiles(nr, |r0, r| {
        let (o, ws) = (&mut out[r0 * dim..], &w[r0 * wr..]);
        match r {
            4 => combo_cols::<4>(o, dim, ws, wr, wj, nc, rows, dim, dim),
            3 => combo_cols::<3>(o, dim, ws, wr, wj, nc, rows, dim, dim),
            2 => combo_cols::<2>(o, dim, ws, wr, wj, nc, rows, dim, dim),
            _ => combo_cols::<1>(o, dim, ws, wr, wj, nc, rows, dim, dim),
        }
    });
}

/// Keys of tile row `i` (absolute, in its sequence) that are visible to it within a key
/// block starting at `j0` of `bc` keys (causal: keys `<= i`). Tiles are aligned so that
/// every row of a processed tile sees at least one key.
fn visible(i: usize, j0: usize, bc: usize) -> usize {
    (i + 1 - j0).min(bc)
}

/// Copies `[len, dim]` blocks back into the `[rows, width]` layout at head `h`, adding
/// (`add`) or overwriting.
fn scatter_head(dst: &mut [f32], width: usize, start: usize, h: usize, dim: usize, src: &[f32], add: bool) {
    for (i, row) in src.chunks_exact(dim).enumerate() {
        let at = (start + i) * width + h * dim;
        let d = &mut dst[at..at + dim];
        if add {
            d.iter_mut().zip(row).for_each(|(o, x)| *o += x);
        } else {
            d.copy_from_slice(row);
        }
    }
}

/// Causal grouped-query attention over ragged sequences `seqs` (`(first row, length)`;
/// each attends only within itself) for `q: [rows, heads.q * dim]` and `k, v: [rows,
/// heads.kv * dim]`, with scale `1 / sqrt(dim)`. Returns the output `[rows, heads.q * dim]`
/// and the log-sum-exp of each row's scaled scores, `[heads.q, rows]`, which is all
/// [`attention_backward`] needs besides the inputs and the output.
///
/// Flash-attention style: per (sequence, head), each block of [`BLOCK`] query rows walks the
/// key blocks up to its diagonal with an online softmax (running max `m` and sum `l`, the
/// output rescaled by `exp(m_old - m_new)` when the max grows), so the transient memory is
/// one `[BLOCK, BLOCK]` score tile per task whatever the length.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], seqs: &[(usize, usize)], heads: Heads) -> (Vec<f32>, Vec<f32>) {
    let (dim, qw, kw) = (heads.dim, heads.q * heads.dim, heads.kv * heads.dim);
    let rows = q.len() / qw.max(1);
    let rep = heads.q / heads.kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads.q).map(move |h| (s, h))).collect();
    let outs: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let (start, len) = seqs[s];
            let qh = gather_head(q, qw, start, len, h, dim);
            let kt = transpose(&gather_head(k, kw, start, len, h / rep, dim), len, dim);
            let vh = gather_head(v, kw, start, len, h / rep, dim);
            let mut o = vec![0f32; len * dim];
            let mut lse = vec![0f32; len];
            let mut st = vec![0f32; BLOCK * BLOCK];
            let (mut m, mut l) = ([0f32; BLOCK], [0f32; BLOCK]);
            let mut i0 = 0;
            while i0 < len {
                let br = (len - i0).min(BLOCK);
                m.fill(f32::NEG_INFINITY);
                l.fill(0.0);
                let mut j0 = 0;
                while j0 < i0 + br {
                    let bc = (i0 + br - j0).min(BLOCK);
                    tile_dots(&mut st, &qh[i0 * dim..], br, dim, &kt[j0..], len, bc);
                    for r in 0..br {
                        let i = i0 + r;
                        let (live, dead) = st[r * BLOCK..r * BLOCK + bc].split_at_mut(visible(i, j0, bc));
                        dead.fill(0.0);
                        live.iter_mut().for_each(|x| *x *= scale);
                        let m_new = live.iter().fold(m[r], |a, &x| a.max(x));
                        live.iter_mut().for_each(|x| *x = exp_nonpositive(*x - m_new));
                        let sum = lane_sum(live);
                        if m[r] == f32::NEG_INFINITY {
                            l[r] = sum;
                        } else if m_new > m[r] {
                            let alpha = exp_nonpositive(m[r] - m_new);
                            l[r] = l[r] * alpha + sum;
                            o[i * dim..(i + 1) * dim].iter_mut().for_each(|x| *x *= alpha);
                        } else {
                            l[r] += sum;
                        }
                        m[r] = m_new;
                    }
                    tile_combo(&mut o[i0 * dim..], &st, false, br, bc, &vh[j0 * dim..], dim);
                    j0 += bc;
                }
                for r in 0..br {
                    let i = i0 + r;
                    let inv = 1.0 / l[r];
                    o[i * dim..(i + 1) * dim].iter_mut().for_each(|x| *x *= inv);
                    lse[i] = m[r] + l[r].ln();
                }
                i0 += br;
            }
            (o, lse)
        })
        .collect();
    let mut out = vec![0f32; rows * qw];
    let mut lse = vec![0f32; heads.q * rows];
    for (&(s, h), (o, ls)) in tasks.iter().zip(outs) {
        let (start, len) = seqs[s];
        scatter_head(&mut out, qw, start, h, dim, &o, false);
        lse[h * rows + start..h * rows + start + len].copy_from_slice(&ls);
    }
    (out, lse)
}

/// Gradients `(dq, dk, dv)` of [`attention`] given the output gradient `dout`, from the
/// inputs (after RoPE), the output `out` and the saved log-sum-exp `lse`.
///
/// The probabilities are recomputed tile by tile, `P = exp(q k^T * scale - lse)`, with
/// `D_i = dout_i . out_i` standing for `sum_j P_ij dP_ij`, so that `dS = P * (dP - D) * scale`
/// needs no row of `P` beyond the tile. Per (sequence, query head) the key blocks are the
/// outer loop (their `dk`, `dv` rows accumulate in place) and the query blocks from the
/// diagonal down the inner one (their `dq` rows accumulate across key blocks); the query
/// heads of a group add their `dk`, `dv` at the end.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    seqs: &[(usize, usize)],
    heads: Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dim, qw, kw) = (heads.dim, heads.q * heads.dim, heads.kv * heads.dim);
    let rows = q.len() / qw.max(1);
    let rep = heads.q / heads.kv;
    let scale = 1.0 / (dim as f32).sqrt();
    let tasks: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|s| (0..heads.q).map(move |h| (s, h))).collect();
    type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
    let blocks: Vec<Grads> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let (start, len) = seqs[s];
            let g = h / rep;
            let qh = gather_head(q, qw, start, len, h, dim);
            let doh = gather_head(dout, qw, start, len, h, dim);
            let dsum: Vec<f32> = {
                let oh = gather_head(out, qw, start, len, h, dim);
                doh.chunks_exact(dim).zip(oh.chunks_exact(dim)).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum()).collect()
            };
            let lh = &lse[h * rows + start..h * rows + start + len];
            let kh = gather_head(k, kw, start, len, g, dim);
            let kt = transpose(&kh, len, dim);
            let vt = transpose(&gather_head(v, kw, start, len, g, dim), len, dim);
            let (mut dq, mut dk, mut dv) = (vec![0f32; len * dim], vec![0f32; len * dim], vec![0f32; len * dim]);
            // P and dS by rows; dk and dv read them transposed in place.
            let mut p = vec![0f32; BLOCK * BLOCK];
            let mut ds = vec![0f32; BLOCK * BLOCK];
            let mut j0 = 0;
            while j0 < len {
                let bc = (len - j0).min(BLOCK);
                let mut i0 = j0;
                while i0 < len {
                    let br = (len - i0).min(BLOCK);
                    tile_dots(&mut p, &qh[i0 * dim..], br, dim, &kt[j0..], len, bc);
                    tile_dots(&mut ds, &doh[i0 * dim..], br, dim, &vt[j0..], len, bc);
                    for r in 0..br {
                        let i = i0 + r;
                        let (li, di) = (lh[i], dsum[i]);
                        let live = visible(i, j0, bc);
                        let pr = &mut p[r * BLOCK..r * BLOCK + bc];
                        let dr = &mut ds[r * BLOCK..r * BLOCK + bc];
                        for (pv, dv) in pr[..live].iter_mut().zip(dr[..live].iter_mut()) {
                            *pv = exp_nonpositive(*pv * scale - li);
                            *dv = *pv * (*dv - di) * scale;
                        }
                        pr[live..].fill(0.0);
                        dr[live..].fill(0.0);
                    }
                    tile_combo(&mut dq[i0 * dim..], &ds, false, br, bc, &kh[j0 * dim..], dim);
                    tile_combo(&mut dv[j0 * dim..], &p, true, bc, br, &doh[i0 * dim..], dim);
                    tile_combo(&mut dk[j0 * dim..], &ds, true, bc, br, &qh[i0 * dim..], dim);
                    i0 += br;
                }
                j0 += bc;
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; rows * qw];
    let mut dk = vec![0f32; rows * kw];
    let mut dv = vec![0f32; rows * kw];
    for (&(s, h), (dqb, dkb, dvb)) in tasks.iter().zip(blocks) {
        let start = seqs[s].0;
        scatter_head(&mut dq, qw, start, h, dim, &dqb, false);
        scatter_head(&mut dk, kw, start, h / rep, dim, &dkb, true);
        scatter_head(&mut dv, kw, start, h / rep, dim, &dvb, true);
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod reference;

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
    let mut p = vec![0f32; z.len() / inp.max(1) * r];
    // Ranks of a vector or more use the register tiles over the transposed A.
    let at = if r >= LANES { transpose(a, r, inp) } else { Vec::new() };
    p.par_chunks_mut(r * LORA_ROWS).zip(z.par_chunks(inp * LORA_ROWS)).for_each(|(ps, zs)| {
        if r >= LANES {
            tiles(zs.len() / inp, |i0, t| dots_rows(t, &mut ps[i0 * r..], r, &zs[i0 * inp..], inp, inp, &at, r, r));
        } else {
            row_dots(ps, r, zs, inp, a);
        }
    });
    p
}

/// `out[i * r + j] = xs[i] . m[j]` for rows `xs: [n, k]` and `m: [r, k]`: contiguous dot
/// products. LoRA's rank `r` is narrower than a vector, so the column-tiled [`dots_rows`]
/// would fall back to scalar strided loads; here each dot runs over `k` in [`LANES`] lanes.
fn row_dots(out: &mut [f32], r: usize, xs: &[f32], k: usize, m: &[f32]) {
    if k == 0 {
        out.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    for (o, x) in out.chunks_exact_mut(r).zip(xs.chunks_exact(k)) {
        for (oj, mj) in o.iter_mut().zip(m.chunks_exact(k)) {
            let mut acc = [0f32; LANES];
            let (xb, xt) = x.split_at(k - k % LANES);
            let (mb, mt) = mj.split_at(k - k % LANES);
            for (xc, mc) in xb.chunks_exact(LANES).zip(mb.chunks_exact(LANES)) {
                for t in 0..LANES {
                    acc[t] = xc[t].mul_add(mc[t], acc[t]);
                }
            }
            let tail: f32 = xt.iter().zip(mt).map(|(a, b)| a * b).sum();
            *oj = acc.iter().sum::<f32>() + tail;
        }
    }
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
    // dp = s dy B: [n, r]. B `[out, r]` is the transposed operand of `dots_rows` (ranks of
    // a vector or more); narrower ranks take contiguous dots against B^T `[r, out]`.
    let bt = if r >= LANES { Vec::new() } else { transpose(b, out, r) };
    let mut dp = vec![0f32; n * r];
    dp.par_chunks_mut(r * LORA_ROWS).zip(dy.par_chunks(out * LORA_ROWS)).for_each(|(dps, dys)| {
        if r >= LANES {
            tiles(dps.len() / r, |i0, t| dots_rows(t, &mut dps[i0 * r..], r, &dys[i0 * out..], out, out, b, r, r));
        } else {
            row_dots(dps, r, dys, out, &bt);
        }
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
