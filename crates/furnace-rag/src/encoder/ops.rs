//! The element-wise parts of an encoder layer on CPU, vectorisable and parallel: GELU
//! (erf form) and the attention softmax with its scale and padding mask fused in. candle's
//! versions call libm's scalar `erff`/`expf` on one thread, which took about a third of a
//! MiniLM forward pass (measured with perf, 2026-11-30).

use rayon::prelude::*;

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

/// `e^x` for `x <= 0` (inputs below -87 give e^-87), to 1e-5 relative (1e-6 above -80): `x = n ln 2 + r`,
/// `e^r` by a degree-6 polynomial on `|r| <= ln2 / 2`, `2^n` built from its bits.
#[inline]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * std::f32::consts::LN_2;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-126, 0]: a normal power of two.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp_neg(-a * a);
    y.copysign(x)
}

/// `x * (1 + erf(x / sqrt 2)) / 2` in place.
pub(crate) fn gelu_erf(xs: &mut [f32]) {
    xs.par_chunks_mut(GRAIN).for_each(|c| {
        for x in c {
            *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// Attention probabilities in place: `scores` is `[batch, heads, len, len]` row-major;
/// each row becomes `softmax(scale * row + mask[batch])`, where `mask[b]` is 0 for the
/// first `lens[b]` keys and minus infinity for padding.
pub(crate) fn masked_softmax(scores: &mut [f32], heads: usize, len: usize, lens: &[usize], scale: f32) {
    let per_batch = heads * len * len;
    scores.par_chunks_mut(len * len).enumerate().for_each(|(i, block)| {
        let b = i / heads;
        let valid = lens.get(b).copied().unwrap_or(len).clamp(1, len);
        debug_assert!(block.len() == per_batch / heads);
        for row in block.chunks_exact_mut(len) {
            let (live, pad) = row.split_at_mut(valid);
            let mut max = f32::NEG_INFINITY;
            for x in live.iter_mut() {
                *x *= scale;
                max = max.max(*x);
            }
            for x in live.iter_mut() {
                *x = exp_neg(*x - max);
            }
            let inv = 1.0 / sum(live);
            for x in live.iter_mut() {
                *x *= inv;
            }
            pad.fill(0.0);
        }
    });
}

/// A sum in 16 lanes (so that it vectorises), then across them.
#[inline]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x = LayerNorm(x + residual) * w + b` over rows of `w.len()` in place (the post-LN
/// residual of a BERT layer), as `torch.nn.LayerNorm` computes it (biased variance).
pub(crate) fn add_layer_norm(x: &mut [f32], residual: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let dim = w.len();
    let rows_per_task = (GRAIN / dim.max(1)).max(1);
    x.par_chunks_mut(dim * rows_per_task).zip(residual.par_chunks(dim * rows_per_task)).for_each(|(xs, rs)| {
        for (row, res) in xs.chunks_exact_mut(dim).zip(rs.chunks_exact(dim)) {
            for (v, r) in row.iter_mut().zip(res) {
                *v += r;
            }
            let mean = sum(row) / dim as f32;
            let mut acc = [0f32; 16];
            let chunks = row.chunks_exact(16);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for c in chunks {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += (v - mean) * (v - mean);
                }
            }
            let var = (acc.iter().sum::<f32>() + tail) / dim as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        let mut worst_exp = 0f32;
        let mut worst_erf = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + 87.0 * i as f32 / 200_000.0;
            let want = x.exp();
            worst_exp = worst_exp.max(((exp_neg(x) - want) / want).abs());
            let y = -6.0 + 12.0 * i as f32 / 200_000.0;
            worst_erf = worst_erf.max((erf(y) - libm_erf(y)).abs());
        }
        assert!(worst_exp < 1e-5, "exp relative error {worst_exp}");
        assert!(worst_erf < 1e-6, "erf absolute error {worst_erf}");
        assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
    }

    fn libm_erf(x: f32) -> f32 {
        // erf through candle's reference (libm) on a one-element tensor.
        let t = candle_core::Tensor::new(&[x * std::f32::consts::SQRT_2], &candle_core::Device::Cpu).unwrap();
        let g = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap()[0];
        // gelu(z) = z (1 + erf(z / sqrt 2)) / 2 with z = x sqrt 2.
        if x == 0.0 {
            0.0
        } else {
            2.0 * g / (x * std::f32::consts::SQRT_2) - 1.0
        }
    }

    #[test]
    fn gelu_matches_candle() {
        let xs: Vec<f32> = (0..10_000).map(|i| -8.0 + 16.0 * i as f32 / 10_000.0).collect();
        let want =
            candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap().gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let mut got = xs.clone();
        gelu_erf(&mut got);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn add_layer_norm_matches_candle() {
        let (rows, dim) = (37, 40);
        let x: Vec<f32> = (0..rows * dim).map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0).collect();
        let r: Vec<f32> = (0..rows * dim).map(|i| ((i * 31) % 13) as f32 / 3.0).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 / dim as f32).collect();
        let b: Vec<f32> = (0..dim).map(|i| i as f32 / 100.0 - 0.2).collect();
        let dev = candle_core::Device::Cpu;
        let sum = (candle_core::Tensor::from_vec(x.clone(), (rows, dim), &dev).unwrap()
            + candle_core::Tensor::from_vec(r.clone(), (rows, dim), &dev).unwrap())
        .unwrap();
        let wt = candle_core::Tensor::new(w.as_slice(), &dev).unwrap();
        let bt = candle_core::Tensor::new(b.as_slice(), &dev).unwrap();
        let want = candle_nn::ops::layer_norm(&sum, &wt, &bt, 1e-12).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut got = x;
        add_layer_norm(&mut got, &r, &w, &b, 1e-12);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn masked_softmax_matches_the_definition() {
        let (heads, len, lens) = (2, 5, [3usize, 5]);
        let mut scores: Vec<f32> = (0..2 * heads * len * len).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let orig = scores.clone();
        masked_softmax(&mut scores, heads, len, &lens, 0.5);
        for (r, row) in scores.chunks(len).enumerate() {
            let b = r / (heads * len);
            let valid = lens[b];
            let src = &orig[r * len..r * len + len];
            let z: f32 = src[..valid].iter().map(|x| (0.5 * x).exp()).sum();
            for j in 0..len {
                let want = if j < valid { (0.5 * src[j]).exp() / z } else { 0.0 };
                assert!((row[j] - want).abs() < 1e-6, "row {r} col {j}: {} vs {want}", row[j]);
            }
        }
    }
}
