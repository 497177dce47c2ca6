//! CPU kernels that candle lacks or runs slowly: a bf16 matmul with f32 accumulation
//! (AVX512-BF16 `vdpbf16ps` over a packed weight layout), and single-token attention over
//! the KV cache.
//!
//! This is the one module where `unsafe` is allowed, and only in `simd`: SIMD intrinsics
//! behind a runtime CPU-feature check, reading through raw pointers whose bounds the safe
//! wrapper asserts. Every SIMD routine has a portable twin that the tests compare it with.

pub mod attention;
pub mod bf16;
#[allow(unsafe_code)]
mod simd;

pub use bf16::{bf16_to_f32, f32_to_bf16, Bf16Matrix, PANEL};

use rayon::prelude::*;

/// Panels handled by one task.
const PANELS_PER_TASK: usize = 2;

/// Whether this CPU runs the AVX512-BF16 path.
pub fn has_bf16_simd() -> bool {
    simd::available()
}

/// `y = x W^T` for `x: [m, k]` (f32) and packed `W: [n, k]`; returns `y: [m, n]` (f32).
/// Activations are rounded to bf16; products are accumulated in f32.
pub fn matmul_nt(x: &[f32], m: usize, w: &Bf16Matrix) -> Vec<f32> {
    matmul_nt_with(x, m, w, has_bf16_simd())
}

/// [`matmul_nt`] with the SIMD path switched on or off (for tests).
pub fn matmul_nt_with(x: &[f32], m: usize, w: &Bf16Matrix, use_simd: bool) -> Vec<f32> {
    matmul_nt_many_with(x, m, &[w], use_simd).pop().unwrap_or_default()
}

/// `y_i = x W_i^T` for several weights sharing the input width (q/k/v, gate/up): the input
/// is converted once and all products run in one parallel region.
pub fn matmul_nt_many(x: &[f32], m: usize, ws: &[&Bf16Matrix]) -> Vec<Vec<f32>> {
    matmul_nt_many_with(x, m, ws, has_bf16_simd())
}

/// [`matmul_nt_many`] with the SIMD path switched on or off (for tests).
pub fn matmul_nt_many_with(x: &[f32], m: usize, ws: &[&Bf16Matrix], use_simd: bool) -> Vec<Vec<f32>> {
    let Some(first) = ws.first() else {
        return Vec::new();
    };
    let (k, kp) = (first.k, first.k_pad);
    assert!(ws.iter().all(|w| w.k == k), "matmul_nt_many: weights differ in input width");
    assert_eq!(x.len(), m * k, "matmul_nt: x has {} values, expected {m} x {k}", x.len());
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    if m == 0 {
        return ys;
    }
    let mut xb = vec![0u16; m * kp];
    for (row, src) in xb.chunks_mut(kp).zip(x.chunks(k)) {
        for (d, &s) in row.iter_mut().zip(src) {
            *d = f32_to_bf16(s);
        }
    }
    let per_task = PANELS_PER_TASK * PANEL;
    let tasks: Vec<(usize, usize)> =
        ws.iter().enumerate().flat_map(|(wi, w)| (0..w.n.div_ceil(per_task)).map(move |t| (wi, t * per_task))).collect();
    // Each task computes a block of output columns for all rows into its own buffer
    // ([m, cols]); the blocks are then copied into their outputs.
    let blocks: Vec<(usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(wi, j0)| {
            let w = ws[wi];
            let cols = (w.n - j0).min(per_task);
            let mut buf = vec![0f32; m * cols];
            let mut jp = 0;
            while jp < cols {
                let p = (j0 + jp) / PANEL;
                let pc = (cols - jp).min(PANEL);
                let panel = &w.data[p * PANEL * kp..(p + 1) * PANEL * kp];
                if use_simd {
                    simd::gemm_panel(&xb, m, kp, panel, &mut buf[jp..], cols, pc);
                } else {
                    gemm_panel_portable(&xb, m, kp, panel, &mut buf[jp..], cols, pc);
                }
                jp += PANEL;
            }
            (wi, j0, cols, buf)
        })
        .collect();
    for (wi, j0, cols, buf) in blocks {
        let n = ws[wi].n;
        let y = &mut ys[wi];
        for i in 0..m {
            y[i * n + j0..i * n + j0 + cols].copy_from_slice(&buf[i * cols..(i + 1) * cols]);
        }
    }
    ys
}

/// Portable twin of the SIMD panel kernel.
fn gemm_panel_portable(x: &[u16], m: usize, kp: usize, panel: &[u16], out: &mut [f32], ldo: usize, cols: usize) {
    for i in 0..m {
        let xi = &x[i * kp..(i + 1) * kp];
        for c in 0..cols {
            let mut s = 0f32;
            for k2 in 0..kp / 2 {
                let w0 = panel[k2 * PANEL * 2 + c * 2];
                let w1 = panel[k2 * PANEL * 2 + c * 2 + 1];
                s += bf16_to_f32(xi[2 * k2]) * bf16_to_f32(w0) + bf16_to_f32(xi[2 * k2 + 1]) * bf16_to_f32(w1);
            }
            out[i * ldo + c] = s;
        }
    }
}
