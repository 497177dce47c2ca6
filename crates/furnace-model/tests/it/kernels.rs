//! The CPU kernels against plain f32 references, SIMD path against the portable one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_model::kernels::attention::{decode_attention, rope_inplace};
use furnace_model::kernels::{bf16_to_f32, f32_to_bf16, matmul_nt_many_with, matmul_nt_with, Bf16Kernel, Bf16Matrix};

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 20_001) as f32 / 10_000.0) - 1.0
        })
        .collect()
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(f32_to_bf16(1.0), 0x3F80);
    // 1 + 2^-8 is exactly between two bf16 values: ties go to even (1.0).
    assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
    // 1 + 3 * 2^-8 is between 1+2^-7 (odd) and 1+2^-6 (even): goes to even.
    assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
    assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    for &v in &[0.0f32, -2.5, 1e30, -1e-30, 3.140625] {
        let r = bf16_to_f32(f32_to_bf16(v));
        assert!((r - v).abs() <= v.abs() / 128.0, "{v} -> {r}");
    }
}

#[test]
fn packed_matrix_round_trips() {
    let (n, k) = (37, 19);
    let w = pseudo(n * k, 1);
    let p = Bf16Matrix::from_f32(&w, n, k);
    assert_eq!((p.n_pad, p.k_pad), (64, 20));
    let back = p.to_f32();
    for (a, b) in w.iter().zip(&back) {
        assert_eq!(bf16_to_f32(f32_to_bf16(*a)), *b);
    }
}

fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    // Inputs rounded to bf16 exactly as the kernel does; f64 accumulation.
    let r = |v: f32| bf16_to_f32(f32_to_bf16(v)) as f64;
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|kk| r(x[i * k + kk]) * r(w[j * k + kk])).sum::<f64>() as f32;
        }
    }
    y
}

#[test]
fn matmul_matches_reference_for_awkward_shapes() {
    for &(m, n, k) in &[(1, 1, 1), (1, 32, 64), (3, 33, 7), (8, 64, 576), (9, 100, 130), (17, 31, 32), (16, 96, 576)] {
        let x = pseudo(m * k, 2 + m as u64);
        let w = pseudo(n * k, 3 + n as u64);
        let p = Bf16Matrix::from_f32(&w, n, k);
        let want = reference(&x, m, &w, n, k);
        for simd in Bf16Kernel::all_available() {
            let got = matmul_nt_with(&x, m, &p, simd);
            assert_eq!(got.len(), m * n);
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()) * (k as f32).sqrt(), "{simd:?} ({m},{n},{k}) at {idx}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn matmul_matches_reference_on_tile_and_block_edges() {
    // Rows around the 6-row register tile and the row-split threshold (96), columns around
    // the 64-column tile and 32-column panel, reductions odd and across 128-value blocks.
    let shapes = [
        (1, 64, 257),
        (5, 65, 129),
        (7, 130, 3),
        (13, 96, 256),
        (95, 63, 131),
        (96, 64, 128),
        (97, 129, 385),
        (200, 33, 7),
        (120, 0, 16),
        (5, 0, 16),
        (1, 1, 513),
        (101, 200, 1),
    ];
    let paths = Bf16Kernel::all_available();
    for &(m, n, k) in &shapes {
        let x = pseudo(m * k, 40 + m as u64);
        let w = pseudo(n * k, 41 + n as u64);
        let p = Bf16Matrix::from_f32(&w, n, k);
        let want = reference(&x, m, &w, n, k);
        for &simd in &paths {
            let got = matmul_nt_with(&x, m, &p, simd);
            assert_eq!(got.len(), m * n);
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()) * (k as f32).sqrt(), "{simd:?} ({m},{n},{k}) at {idx}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn grouped_matmul_matches_single_products() {
    // q/k/v-like group of different widths, on both the row-split and column-split paths.
    for &m in &[3usize, 130] {
        let k = 70;
        let x = pseudo(m * k, 50 + m as u64);
        let ws: Vec<(usize, Vec<f32>)> = [96usize, 32, 40].iter().enumerate().map(|(i, &n)| (n, pseudo(n * k, 60 + i as u64))).collect();
        let packed: Vec<Bf16Matrix> = ws.iter().map(|(n, w)| Bf16Matrix::from_f32(w, *n, k)).collect();
        let refs: Vec<&Bf16Matrix> = packed.iter().collect();
        for simd in Bf16Kernel::all_available() {
            let ys = matmul_nt_many_with(&x, m, &refs, simd);
            for ((n, w), y) in ws.iter().zip(&ys) {
                let want = reference(&x, m, w, *n, k);
                for (a, b) in y.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()) * (k as f32).sqrt(), "{simd:?} m={m} n={n}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn rope_rotates_pairs_and_preserves_norm() {
    let hd = 8;
    let x = pseudo(2 * hd, 9);
    let (cos, sin): (Vec<f32>, Vec<f32>) = (0..hd / 2).map(|i| ((i as f32 * 0.3).cos(), (i as f32 * 0.3).sin())).unzip();
    for interleaved in [false, true] {
        let mut y = x.clone();
        rope_inplace(&mut y, hd, &cos, &sin, interleaved);
        for h in 0..2 {
            for i in 0..hd / 2 {
                let (a, b) = if interleaved { (h * hd + 2 * i, h * hd + 2 * i + 1) } else { (h * hd + i, h * hd + i + hd / 2) };
                assert!((y[a] - (x[a] * cos[i] - x[b] * sin[i])).abs() < 1e-6);
                assert!((y[b] - (x[b] * cos[i] + x[a] * sin[i])).abs() < 1e-6);
            }
        }
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }
}

#[test]
fn decode_attention_matches_naive_softmax_attention() {
    let (nh, nkv, hd, len) = (6, 2, 8, 11);
    let q = pseudo(nh * hd, 4);
    let k = pseudo(len * nkv * hd, 5);
    let v = pseudo(len * nkv * hd, 6);
    let mut out = vec![0f32; nh * hd];
    // Keys dimension-major with a stride larger than len (spare capacity).
    let stride = len + 5;
    let mut kt = vec![f32::NAN; nkv * hd * stride];
    for j in 0..len {
        for c in 0..nkv * hd {
            kt[c * stride + j] = k[j * nkv * hd + c];
        }
    }
    decode_attention(&q, &kt, stride, &v, len, nh, nkv, hd, &mut out);
    for h in 0..nh {
        let g = h / (nh / nkv);
        let scores: Vec<f64> = (0..len)
            .map(|j| (0..hd).map(|d| q[h * hd + d] as f64 * k[(j * nkv + g) * hd + d] as f64).sum::<f64>() / (hd as f64).sqrt())
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            let want: f64 = (0..len).map(|j| e[j] / z * v[(j * nkv + g) * hd + d] as f64).sum();
            assert!((out[h * hd + d] as f64 - want).abs() < 1e-5, "head {h} dim {d}");
        }
    }
}

#[test]
fn fast_exp_is_accurate_on_the_softmax_range() {
    use furnace_model::kernels::attention::exp_nonpositive;
    let mut worst = 0f64;
    for i in 0..160_000 {
        let x = -(i as f32) * 0.0005; // 0 .. -80 (below, results are ~1e-35 and clamp)
        let want = (x as f64).exp();
        let got = exp_nonpositive(x) as f64;
        let rel = ((got - want) / want).abs();
        // Near zero the range reduction in f32 limits accuracy; those weights are negligible
        // next to the max's (which is exp(0) = 1) in a softmax.
        let bound = if x >= -10.0 { 1e-6 } else { 1e-5 };
        assert!(rel < bound, "exp({x}): relative error {rel}");
        worst = worst.max(rel);
    }
    assert!(worst > 0.0);
    assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-1000.0).abs());
    assert!(exp_nonpositive(-1000.0) < 1e-37);
    assert_eq!(exp_nonpositive(0.0), 1.0);
}
