//! Every hand-written backward of the training ops against central finite differences of
//! its forward (in f64 sums of f32 ops), on random inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_model::rng::Rng;
use furnace_train::engine::ops::{self, Heads};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

/// `sum(f(x) * c)` for a fixed random `c`, so the gradient of the scalar is `c` pulled back.
fn dot(y: &[f32], c: &[f32]) -> f64 {
    y.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Checks `grad` (analytic d(sum f(x) c)/dx) against finite differences at a few indices.
fn check(name: &str, x: &[f32], grad: &[f32], f: &dyn Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), grad.len());
    let eps = 1e-2f32;
    let picks = [0, 1, x.len() / 3, x.len() / 2, x.len() - 2, x.len() - 1];
    for &i in &picks {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let mut xm = x.to_vec();
        xm[i] -= eps;
        let fd = (f(&xp) - f(&xm)) / (2.0 * eps as f64);
        let an = grad[i] as f64;
        assert!((fd - an).abs() <= 2e-3 + 1e-2 * fd.abs().max(an.abs()), "{name}[{i}]: finite difference {fd} vs backward {an}");
    }
}

#[test]
fn rms_norm_backward() {
    let (rows, h) = (5, 24);
    let x = randn(rows * h, 1);
    let w = randn(h, 2);
    let c = randn(rows * h, 3);
    let (y, rstd) = ops::rms_norm(&x, &w, 1e-5);
    assert_eq!(ops::rms_norm_apply(&x, &w, &rstd), y);
    let mut dx = vec![0.5f32; x.len()];
    ops::rms_norm_backward(&x, &w, &rstd, &c, &mut dx);
    dx.iter_mut().for_each(|v| *v -= 0.5); // it accumulates into dx
    check("rms_norm", &x, &dx, &|x| dot(&ops::rms_norm(x, &w, 1e-5).0, &c));
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    let (heads, dim) = (3, 8);
    let pos = [0usize, 1, 2, 7, 3];
    let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / dim as f32)).collect();
    let tables = ops::rope_tables(&inv, 8);
    let x = randn(pos.len() * heads * dim, 4);
    let c = randn(x.len(), 5);
    let f = |x: &[f32]| {
        let mut y = x.to_vec();
        ops::rope(&mut y, &pos, dim, &tables, false);
        dot(&y, &c)
    };
    let mut g = c.clone();
    ops::rope(&mut g, &pos, dim, &tables, true);
    check("rope", &x, &g, &f);
    // Forward then inverse is the identity; position 0 is no rotation.
    let mut y = x.clone();
    ops::rope(&mut y, &pos, dim, &tables, false);
    assert_eq!(&y[..heads * dim], &x[..heads * dim]);
    ops::rope(&mut y, &pos, dim, &tables, true);
    assert!(y.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
}

#[test]
fn attention_backward_over_ragged_sequences() {
    // Grouped-query (4 query heads over 2 kv heads), two sequences of different lengths,
    // one longer than a register block so both the blocked and the tail paths run.
    let heads = Heads { q: 4, kv: 2, dim: 16 };
    let seqs = [(0usize, 19usize), (19, 3)];
    let rows = 22;
    let q = randn(rows * 64, 6);
    let k = randn(rows * 32, 7);
    let v = randn(rows * 32, 8);
    let c = randn(rows * 64, 9);
    let (out, lse) = ops::attention(&q, &k, &v, &seqs, heads);
    let (dq, dk, dv) = ops::attention_backward(&q, &k, &v, &out, &lse, &c, &seqs, heads);
    check("attention dq", &q, &dq, &|x| dot(&ops::attention(x, &k, &v, &seqs, heads).0, &c));
    check("attention dk", &k, &dk, &|x| dot(&ops::attention(&q, x, &v, &seqs, heads).0, &c));
    check("attention dv", &v, &dv, &|x| dot(&ops::attention(&q, &k, x, &seqs, heads).0, &c));
    // Causal and per sequence: changing the last row of the first sequence changes none of
    // the earlier rows, and nothing of the second sequence.
    let mut k2 = k.clone();
    k2[18 * 32..19 * 32].iter_mut().for_each(|x| *x += 1.0);
    let (out2, _) = ops::attention(&q, &k2, &v, &seqs, heads);
    assert_eq!(out[..18 * 64], out2[..18 * 64]);
    assert_eq!(out[19 * 64..], out2[19 * 64..]);
    assert_ne!(out[18 * 64..19 * 64], out2[18 * 64..19 * 64]);
}

#[test]
fn swiglu_backward() {
    let g = randn(40, 10);
    let u = randn(40, 11);
    let c = randn(40, 12);
    let (dg, du) = ops::swiglu_backward(&g, &u, &c);
    check("swiglu dg", &g, &dg, &|x| dot(&ops::swiglu(x, &u), &c));
    check("swiglu du", &u, &du, &|x| dot(&ops::swiglu(&g, x), &c));
}

#[test]
fn cross_entropy_backward_and_values() {
    let vocab = 50;
    let z = randn(3 * vocab, 13);
    let targets = [3u32, 0, 49];
    let weights = [0.5f32, 1.0, 0.25];
    let f = |x: &[f32]| -> f64 {
        let mut l = x.to_vec();
        let losses = ops::cross_entropy(&mut l, vocab, &targets, &weights, false);
        losses.iter().zip(&weights).map(|(a, &w)| a * w as f64).sum()
    };
    let mut g = z.clone();
    let losses = ops::cross_entropy(&mut g, vocab, &targets, &weights, true);
    check("cross_entropy", &z, &g, &f);
    // The value is logsumexp - target logit.
    for (r, &t) in targets.iter().enumerate() {
        let row = &z[r * vocab..(r + 1) * vocab];
        let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((losses[r] - (lse - row[t as usize] as f64)).abs() < 1e-5);
    }
}

#[test]
fn frozen_projections_backward_in_f32_and_bf16() -> anyhow::Result<()> {
    use furnace_model::{LoadedModel, WeightDType};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
    for dt in [WeightDType::F32, WeightDType::Bf16] {
        let m = LoadedModel::load(&dir, dt)?;
        let b = &m.model.layers[0];
        // Two projections sharing an input, as gate/up do: dx = dg Wg + du Wu.
        let g = furnace_train::engine::FrozenGroup::new(&[&b.mlp.gate_proj, &b.mlp.up_proj])?;
        // bf16 weights are multiplied in bf16 only where the CPU has AVX512-BF16 (else f32).
        assert_eq!(g.is_bf16(), dt == WeightDType::Bf16 && furnace_model::kernels::has_bf16_simd());
        let rows = 3;
        let x = randn(rows * g.inp, 14);
        let c: Vec<Vec<f32>> = g.outs.iter().enumerate().map(|(i, &n)| randn(rows * n, 15 + i as u64)).collect();
        let f = |x: &[f32]| -> f64 { g.forward(x, rows).unwrap().iter().zip(&c).map(|(y, c)| dot(y, c)).sum() };
        let cs: Vec<&[f32]> = c.iter().map(|v| v.as_slice()).collect();
        let dx = g.backward(&cs, rows)?;
        if dt == WeightDType::F32 {
            check("frozen f32", &x, &dx, &f);
        } else {
            // bf16 rounds the output gradients: compare with f32 products of the same
            // (bf16-stored) weights.
            let mut want = vec![0f32; rows * g.inp];
            for (w, cc) in [(&b.mlp.gate_proj, &c[0]), (&b.mlp.up_proj, &c[1])] {
                let furnace_model::LinearWeight::Bf16(p) = &w.weight else { panic!("bf16 weights expected") };
                let dense = p.to_f32();
                for r in 0..rows {
                    for o in 0..w.out_features {
                        for i in 0..w.in_features {
                            want[r * g.inp + i] += cc[r * w.out_features + o] * dense[o * w.in_features + i];
                        }
                    }
                }
            }
            let fd_free = want;
            let err: f32 = dx.iter().zip(&fd_free).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            let scale: f32 = fd_free.iter().map(|v| v.abs()).fold(0.0, f32::max);
            assert!(err < 1e-2 * scale, "bf16 backward off by {err} (scale {scale})");
        }
    }
    Ok(())
}

/// The LoRA products against naive f64 loops on odd shapes: ranks narrower and wider than
/// a vector, row counts that leave partial row blocks and widths that leave lane tails.
#[test]
fn lora_products_match_naive_reference() {
    for &(n, inp, out, r) in &[(1, 3, 5, 1), (67, 37, 53, 8), (130, 96, 21, 16), (65, 19, 70, 17)] {
        let (z, a, b) = (randn(n * inp, 1), randn(r * inp, 2), randn(out * r, 3));
        let (y0, dy, s) = (randn(n * out, 4), randn(n * out, 5), 0.75f32);
        let p_ref: Vec<f64> = (0..n * r).map(|i| (0..inp).map(|d| z[i / r * inp + d] as f64 * a[i % r * inp + d] as f64).sum()).collect();
        let close = |name: &str, got: &[f32], want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{name} length");
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{name}: {g} vs {w} ({n},{inp},{out},{r})");
            }
        };
        let p = ops::lora_down(&z, inp, &a, r);
        close("lora_down", &p, &p_ref);
        let mut y = y0.clone();
        ops::lora_up_add(&mut y, out, &p, r, &b, s);
        let y_ref: Vec<f64> = (0..n * out)
            .map(|i| {
                let (row, o) = (i / out, i % out);
                y0[i] as f64 + s as f64 * (0..r).map(|j| p[row * r + j] as f64 * b[o * r + j] as f64).sum::<f64>()
            })
            .collect();
        close("lora_up_add", &y, &y_ref);
        let (da, db, dz) = ops::lora_backward(&z, inp, &a, r, &b, out, s, &p, &dy);
        let dp: Vec<f64> =
            (0..n * r).map(|i| s as f64 * (0..out).map(|o| dy[i / r * out + o] as f64 * b[o * r + i % r] as f64).sum::<f64>()).collect();
        let dz_ref: Vec<f64> = (0..n * inp).map(|i| (0..r).map(|j| dp[i / inp * r + j] * a[j * inp + i % inp] as f64).sum()).collect();
        let da_ref: Vec<f64> =
            (0..r * inp).map(|i| (0..n).map(|row| dp[row * r + i / inp] * z[row * inp + i % inp] as f64).sum()).collect();
        let db_ref: Vec<f64> = (0..out * r)
            .map(|i| s as f64 * (0..n).map(|row| dy[row * out + i / r] as f64 * p[row * r + i % r] as f64).sum::<f64>())
            .collect();
        close("lora dz", &dz, &dz_ref);
        close("lora dA", &da, &da_ref);
        close("lora dB", &db, &db_ref);
    }
}
