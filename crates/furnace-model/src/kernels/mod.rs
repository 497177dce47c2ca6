//! CPU kernels that candle lacks or runs slowly: a bf16 matmul with f32 accumulation over
//! a packed weight layout (AVX512-BF16 `vdpbf16ps` where the CPU has it, else AVX2 + FMA on
//! weights widened to f32 in registers), and single-token attention over the KV cache.
//!
//! This is the one module where `unsafe` is allowed, and only in `simd` and `avx2`: SIMD
//! intrinsics behind a runtime CPU-feature check, reading through raw pointers whose bounds
//! the safe wrapper asserts. Every SIMD routine has a portable twin that the tests compare
//! it with.

pub mod attention;
#[allow(unsafe_code)]
mod avx2;
pub mod bf16;
#[allow(unsafe_code)]
mod simd;

pub use bf16::{bf16_to_f32, f32_to_bf16, Bf16Matrix, PANEL};

use rayon::prelude::*;

/// The kernel that multiplies packed bf16 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` (AVX-512F, AVX-512BW, AVX512-BF16).
    Avx512Bf16,
    /// Weights widened to f32 in registers, f32 FMA (AVX2 + FMA).
    Avx2Fma,
    /// Scalar Rust, for CPUs with neither and as the tests' reference.
    Portable,
}

impl Bf16Kernel {
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Avx512Bf16 => simd::available(),
            Self::Avx2Fma => avx2::available(),
            Self::Portable => true,
        }
    }

    /// Every kernel this CPU can run, fastest first.
    pub fn all_available() -> Vec<Self> {
        [Self::Avx512Bf16, Self::Avx2Fma, Self::Portable].into_iter().filter(|k| k.available()).collect()
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        if simd::available() {
            Self::Avx512Bf16
        } else if avx2::available() {
            Self::Avx2Fma
        } else {
            Self::Portable
        }
    }
}

/// Rows of one register tile of the SIMD kernel (the portable twin walks the same blocks).
const MR: usize = simd::MR;

/// Columns of one register tile: two packed panels.
const NR: usize = 2 * PANEL;

/// Reduction values per cache block: the two weight panels of a tile over `KC` values
/// (`64 x KC` bf16 = 32 KiB) stay in L1/L2 while all rows of a task pass over them.
/// Measured on Zen 4 (one thread, on-CPU time): 256 a little ahead of 128, both well
/// ahead of 64 and 384.
const KC: usize = 256;

/// Smallest row count split across threads by rows; below it, tasks are column blocks
/// (decode and short prompts).
const ROW_SPLIT_MIN: usize = 96;

/// Whether this CPU multiplies bf16 weights with a SIMD kernel (AVX512-BF16, or AVX2 +
/// FMA), not the portable scalar one.
pub fn has_bf16_simd() -> bool {
    Bf16Kernel::best() != Bf16Kernel::Portable
}

/// Whether this CPU has the AVX512-BF16 dot-product instruction.
pub fn has_avx512_bf16() -> bool {
    simd::available()
}

/// Threads the kernels split work over (rayon's pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Measured peak of the bf16 dot-product instruction on all threads of the rayon pool, in
/// GFLOP/s: a register-only loop of independent `vdpbf16ps` (64 FLOP each) on every thread
/// at once, best of three. `None` without AVX512-BF16.
pub fn peak_bf16_gflops() -> Option<f64> {
    if !has_avx512_bf16() {
        return None;
    }
    let iters = 20_000_000usize;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let sums = rayon::broadcast(|_| simd::peak_loop(iters));
        let s = t.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        let flops = (rayon::current_num_threads() * iters * simd::PEAK_CHAINS * 64) as f64;
        best = best.max(flops / s / 1e9);
    }
    Some(best)
}

/// `y = x W^T` for `x: [m, k]` (f32) and packed `W: [n, k]`; returns `y: [m, n]` (f32).
/// Activations are rounded to bf16; products are accumulated in f32.
pub fn matmul_nt(x: &[f32], m: usize, w: &Bf16Matrix) -> Vec<f32> {
    matmul_nt_with(x, m, w, Bf16Kernel::best())
}

/// [`matmul_nt`] with a chosen kernel (for tests; it must be [`Bf16Kernel::available`]).
pub fn matmul_nt_with(x: &[f32], m: usize, w: &Bf16Matrix, kernel: Bf16Kernel) -> Vec<f32> {
    matmul_nt_many_with(x, m, &[w], kernel).pop().unwrap_or_default()
}

/// `y_i = x W_i^T` for several weights sharing the input width (q/k/v, gate/up): the input
/// is converted once and all products run in one parallel region.
pub fn matmul_nt_many(x: &[f32], m: usize, ws: &[&Bf16Matrix]) -> Vec<Vec<f32>> {
    matmul_nt_many_with(x, m, ws, Bf16Kernel::best())
}

/// Rounds `x: [m, k]` to bf16 rows of stride `kp` (zero-padded), in parallel.
pub fn to_bf16_rows(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut xb = vec![0u16; m * kp];
    if xb.is_empty() {
        return xb;
    }
    let rows = (16384 / kp.max(1)).max(1);
    xb.par_chunks_mut(rows * kp).zip(x.par_chunks(rows * k.max(1))).for_each(|(dst, src)| {
        for (row, s) in dst.chunks_mut(kp).zip(src.chunks(k.max(1))) {
            for (d, &v) in row.iter_mut().zip(s) {
                *d = f32_to_bf16(v);
            }
        }
    });
    xb
}

/// `out[i, c] = x_i . w_c` for `m` rows of `xb` (bf16 `[m, kp]`) and all columns of `w`
/// (`out` has row stride `ldo`): tiles of [`NR`] columns, the reduction cut into [`KC`]
/// blocks, each block's weight panels reused by every row before the next.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(xb: &[u16], m: usize, kp: usize, w: &Bf16Matrix, cols: (usize, usize), out: &mut [f32], ldo: usize, kernel: Bf16Kernel) {
    let (c0, c1) = cols;
    let mut j = c0;
    while j < c1 {
        let (p, np) = (j / PANEL, if c1 - j > PANEL { 2 } else { 1 });
        let nc = (c1 - j).min(np * PANEL);
        let mut k0 = 0;
        // Outputs start zeroed, so an empty reduction (k = 0) leaves them at zero.
        while k0 < kp {
            let k1 = (k0 + KC).min(kp);
            let o = &mut out[j - c0..];
            match kernel {
                Bf16Kernel::Avx512Bf16 => simd::gemm_block(xb, m, kp, (k0, k1), &w.data, (p, np), nc, o, ldo, k0 > 0),
                Bf16Kernel::Avx2Fma => avx2::gemm_block(xb, m, kp, (k0, k1), &w.data, p, nc, o, ldo, k0 > 0),
                Bf16Kernel::Portable => gemm_block_portable(xb, m, kp, (k0, k1), &w.data, p, nc, o, ldo, k0 > 0),
            }
            k0 = k1;
        }
        j += nc;
    }
}

/// [`matmul_nt_many`] with a chosen kernel (for tests; it must be [`Bf16Kernel::available`]).
pub fn matmul_nt_many_with(x: &[f32], m: usize, ws: &[&Bf16Matrix], kernel: Bf16Kernel) -> Vec<Vec<f32>> {
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
    let xb = to_bf16_rows(x, m, k, kp);
    let threads = rayon::current_num_threads().max(1);
    if m >= ROW_SPLIT_MIN {
        // Row blocks: every task writes its own rows of every output. About eight blocks
        // per thread, a multiple of the thread count, of whole register tiles: small
        // enough that the threads finish together, large enough that each block's pass
        // over the weight is shared by many tiles.
        let tiles = m.div_ceil(MR);
        let nb = threads * tiles.div_ceil(8 * threads).max(1);
        let mc = tiles.div_ceil(nb) * MR;
        let mut blocks: Vec<Vec<&mut [f32]>> = (0..m.div_ceil(mc)).map(|_| Vec::with_capacity(ws.len())).collect();
        for (y, w) in ys.iter_mut().zip(ws) {
            if w.n == 0 {
                blocks.iter_mut().for_each(|b| b.push(&mut []));
                continue;
            }
            for (b, chunk) in blocks.iter_mut().zip(y.chunks_mut(mc * w.n)) {
                b.push(chunk);
            }
        }
        blocks.into_par_iter().enumerate().for_each(|(bi, outs)| {
            let i0 = bi * mc;
            let rows = (m - i0).min(mc);
            let xs = &xb[i0 * kp..(i0 + rows) * kp];
            for (out, w) in outs.into_iter().zip(ws) {
                gemm_rows(xs, rows, kp, w, (0, w.n), out, w.n, kernel);
            }
        });
        return ys;
    }
    // Few rows: tasks are column tiles, cut into row blocks too when there are too few
    // tiles to keep every thread busy (a narrow output with a long reduction, like the LM
    // head's input gradient); each writes its own buffer ([rows, cols]), then copied.
    let col_tiles: usize = ws.iter().map(|w| w.n.div_ceil(NR)).sum();
    let rb = (4 * threads).div_ceil(col_tiles.max(1)).clamp(1, m.div_ceil(MR));
    let mc = m.div_ceil(rb).div_ceil(MR) * MR;
    let tasks: Vec<(usize, usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(wi, w)| (0..w.n.div_ceil(NR)).flat_map(move |t| (0..m.div_ceil(mc)).map(move |b| (wi, t * NR, b * mc))))
        .collect();
    let blocks: Vec<(usize, usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(wi, j0, i0)| {
            let w = ws[wi];
            let cols = (w.n - j0).min(NR);
            let rows = (m - i0).min(mc);
            let mut buf = vec![0f32; rows * cols];
            gemm_rows(&xb[i0 * kp..(i0 + rows) * kp], rows, kp, w, (j0, j0 + cols), &mut buf, cols, kernel);
            (wi, j0, i0, cols, buf)
        })
        .collect();
    for (wi, j0, i0, cols, buf) in blocks {
        let n = ws[wi].n;
        let y = &mut ys[wi];
        for (r, src) in buf.chunks(cols).enumerate() {
            let i = i0 + r;
            y[i * n + j0..i * n + j0 + cols].copy_from_slice(src);
        }
    }
    ys
}

/// Portable twin of [`simd::gemm_block`] (panels from `p` on, `cols` columns).
#[allow(clippy::too_many_arguments)]
fn gemm_block_portable(
    x: &[u16],
    m: usize,
    kp: usize,
    (k0, k1): (usize, usize),
    w: &[u16],
    p: usize,
    cols: usize,
    out: &mut [f32],
    ldo: usize,
    accumulate: bool,
) {
    for i in 0..m {
        let xi = &x[i * kp..(i + 1) * kp];
        for c in 0..cols {
            let panel = &w[(p + c / PANEL) * PANEL * kp..];
            let cc = c % PANEL;
            let mut s = if accumulate { out[i * ldo + c] } else { 0f32 };
            for k2 in k0 / 2..k1 / 2 {
                let w0 = panel[k2 * PANEL * 2 + cc * 2];
                let w1 = panel[k2 * PANEL * 2 + cc * 2 + 1];
                s += bf16_to_f32(xi[2 * k2]) * bf16_to_f32(w0) + bf16_to_f32(xi[2 * k2 + 1]) * bf16_to_f32(w1);
            }
            out[i * ldo + c] = s;
        }
    }
}
