//! The attention of the training pass as it was before the tiled (flash-style) form: it
//! saves every probability (`[len, len]` per sequence and head) and its backward reads
//! them. Kept, unchanged, as the exact reference the tiled [`super::attention`] and
//! [`super::attention_backward`] are tested against (see `tests` below).

use super::{combo_rows, dots_rows, gather_head, lane_sum, tiles, transpose, Heads};
use furnace_model::kernels::attention::exp_nonpositive;
use rayon::prelude::*;

/// `softmax` of a row in place (max subtracted, fast exp).
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    row.iter_mut().for_each(|s| *s = exp_nonpositive(*s - max));
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|s| *s *= inv);
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::{attention as tiled, attention_backward as tiled_backward, Heads, BLOCK};
    use furnace_model::rng::Rng;

    fn randn(n: usize, seed: u64, sd: f32) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() as f32 * sd).collect()
    }

    /// Largest difference relative to the largest magnitude of the reference.
    fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
    }

    /// The tiled forward and backward against the reference on random inputs: outputs and
    /// all three gradients within f32 rounding.
    fn agree(seqs: &[(usize, usize)], heads: Heads, sd: f32, seed: u64) {
        let rows: usize = seqs.iter().map(|s| s.1).sum();
        let (qw, kw) = (heads.q * heads.dim, heads.kv * heads.dim);
        let q = randn(rows * qw, seed, sd);
        let k = randn(rows * kw, seed + 1, sd);
        let v = randn(rows * kw, seed + 2, 1.0);
        let dout = randn(rows * qw, seed + 3, 1.0);
        let (out_ref, probs) = super::attention(&q, &k, &v, seqs, heads);
        let (dq_ref, dk_ref, dv_ref) = super::attention_backward(&q, &k, &v, &probs, &dout, seqs, heads);
        let (out, lse) = tiled(&q, &k, &v, seqs, heads);
        assert_eq!(lse.len(), heads.q * rows, "one log-sum-exp per head and row");
        let (dq, dk, dv) = tiled_backward(&q, &k, &v, &out, &lse, &dout, seqs, heads);
        // Measured: below 1e-6 of the largest magnitude on these inputs.
        let tol = 5e-6;
        for (name, got, want) in [("out", &out, &out_ref), ("dq", &dq, &dq_ref), ("dk", &dk, &dk_ref), ("dv", &dv, &dv_ref)] {
            let e = rel_err(got, want);
            assert!(e <= tol, "{name} of {seqs:?} {heads:?}: relative error {e:e}");
        }
    }

    #[test]
    fn the_vectorizing_exp_is_bitwise_the_cast_form() {
        // The kernels' exp builds its power of two from float bits; the form it replaced
        // used an `as i32` cast. Every input from -100 to 0.01 in steps of 1e-4, plus the
        // clamp region and -inf.
        fn cast_form(x: f32) -> f32 {
            let t = (x * std::f32::consts::LOG2_E).max(-125.0);
            let fl = (t + 0.5).floor();
            let f = t - fl;
            let p = 1.0
                + f * (std::f32::consts::LN_2
                    + f * (0.240_226_5
                        + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355_8 + f * (0.000_154_035_3 + f * 0.000_015_252_73))))));
            p * f32::from_bits((((fl as i32) + 127) as u32) << 23)
        }
        let xs = (0..1_000_100).map(|i| -100.0 + i as f32 * 1e-4).chain([-1e3, -87.5, -0.0, f32::NEG_INFINITY]);
        for x in xs {
            let (a, b) = (furnace_model::kernels::attention::exp_nonpositive(x), cast_form(x));
            assert_eq!(a.to_bits(), b.to_bits(), "exp({x}): {a} vs {b}");
        }
    }

    const SMOL: Heads = Heads { q: 9, kv: 3, dim: 64 };

    #[test]
    fn tiled_attention_matches_the_reference_around_tile_boundaries() {
        for len in [1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3, 317] {
            agree(&[(0, len)], SMOL, 1.0, len as u64);
        }
    }

    #[test]
    fn tiled_attention_matches_the_reference_over_ragged_sequences() {
        let lens = [5, 130, BLOCK, 1, 77];
        let mut seqs = Vec::new();
        let mut at = 0;
        for &n in &lens {
            seqs.push((at, n));
            at += n;
        }
        // Grouped-query 4 over 1, a head width with a tail past the SIMD lanes, and peaked
        // scores (larger inputs) so the running max moves between key blocks.
        agree(&seqs, Heads { q: 4, kv: 1, dim: 24 }, 2.0, 11);
        agree(&seqs, SMOL, 1.5, 12);
        agree(&seqs, Heads { q: 2, kv: 2, dim: 8 }, 3.0, 13);
    }

    #[test]
    fn tiled_attention_gradients_match_finite_differences() {
        // Two sequences, the first across three key blocks; the objective is
        // sum(out * c) in f64, differenced centrally.
        let heads = Heads { q: 4, kv: 2, dim: 16 };
        let seqs = [(0usize, 2 * BLOCK + 5), (2 * BLOCK + 5, 9)];
        let rows = 2 * BLOCK + 14;
        let (qw, kw) = (64, 32);
        let q = randn(rows * qw, 21, 1.0);
        let k = randn(rows * kw, 22, 1.0);
        let v = randn(rows * kw, 23, 1.0);
        let c = randn(rows * qw, 24, 1.0);
        let (out, lse) = tiled(&q, &k, &v, &seqs, heads);
        let (dq, dk, dv) = tiled_backward(&q, &k, &v, &out, &lse, &c, &seqs, heads);
        let obj = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            tiled(q, k, v, &seqs, heads).0.iter().zip(&c).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let eps = 1e-2f32;
        for which in 0..3 {
            let (x, grad) = match which {
                0 => (&q, &dq),
                1 => (&k, &dk),
                _ => (&v, &dv),
            };
            let n = x.len();
            for i in [0, 1, n / 3, n / 2, 2 * BLOCK * x.len() / rows + 3, n - 2, n - 1] {
                let shifted = |d: f32| {
                    let mut y = x.clone();
                    y[i] += d;
                    match which {
                        0 => obj(&y, &k, &v),
                        1 => obj(&q, &y, &v),
                        _ => obj(&q, &k, &y),
                    }
                };
                let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
                let an = grad[i] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 + 1e-2 * fd.abs().max(an.abs()),
                    "input {which}[{i}]: finite difference {fd} vs backward {an}"
                );
            }
        }
    }
}
