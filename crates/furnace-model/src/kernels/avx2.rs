//! AVX2 + FMA micro-kernel over the packed bf16 weights, for CPUs without AVX512-BF16
//! (AMD Zen 2-4 EPYCs, Intel before Sapphire Rapids): each 32-bit lane of the packed panel
//! holds a pair of bf16 weights along `k`, widened exactly to two f32 vectors by a shift
//! (the even one) and a mask (the odd one), then multiplied in f32 with FMA. The products
//! of bf16 values are exact in f32, so it computes what [`super::simd::gemm_block`] does up
//! to the order of the f32 sums. Callers check [`available`] first.
//!
//! Safety argument: [`gemm_block`] asserts every slice length it reads or writes before any
//! raw-pointer access; the tile reads weights only inside the panels those assertions
//! cover (whole 32-column panels, padded), reads activations from its own stack buffer and
//! writes only the `cols` valid outputs of each row, through a bounded copy.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::bf16::{bf16_to_f32, PANEL};

/// Rows of one register tile: 4 rows x 16 columns = 8 accumulators, 4 widened weight
/// vectors, 2 broadcasts and the mask: 15 of the 16 vector registers.
const R: usize = 4;

/// Columns of one register tile (two 8-lane vectors, half a panel).
const NC: usize = 16;

/// Reduction values widened to f32 per pass (`R x KS` f32 = 4 KiB on the stack).
const KS: usize = 256;

/// Whether the CPU has AVX2 and FMA.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// For `m` rows of `x` (bf16 `[m, kp]`, row stride `kp`) and the packed panels of `w` from
/// panel `p` on (the whole packed weight, `[panels][kp / 2][32][2]`), over the reduction
/// range `k0..k1` (even bounds): writes, or with `accumulate` adds to,
/// `out[i * ldo + c] (+)= sum_{k0 <= kk < k1} x[i, kk] w[p * 32 + c, kk]` for the `cols`
/// valid columns `c`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_block(
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
    assert!(kp.is_multiple_of(2) && k0.is_multiple_of(2) && k1.is_multiple_of(2) && k0 <= k1 && k1 <= kp);
    assert!(x.len() >= m * kp);
    assert!(w.len() >= (p + cols.div_ceil(PANEL)) * PANEL * kp);
    assert!(m == 0 || cols == 0 || out.len() >= (m - 1) * ldo + cols);
    assert!(available(), "avx2::gemm_block called without AVX2 and FMA");
    if m == 0 || cols == 0 {
        return;
    }
    let mut xf = [[0f32; KS]; R];
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(R);
        // One pass per block of KS reduction values; at least one, so an empty reduction
        // still writes zeros (or leaves the sums) as the other kernels do.
        let mut ka = k0;
        loop {
            let kb = (ka + KS).min(k1);
            for (r, buf) in xf.iter_mut().enumerate().take(rows) {
                let src = &x[(i + r) * kp + ka..(i + r) * kp + kb];
                buf[..kb - ka].iter_mut().zip(src).for_each(|(d, &s)| *d = bf16_to_f32(s));
            }
            let acc = accumulate || ka > k0;
            let mut c = 0;
            while c < cols {
                let nc = (cols - c).min(NC);
                // Half `c / 16 % 2` of panel `p + c / 32`, from pair `ka / 2` on.
                let w_off = (p + c / PANEL) * PANEL * kp + ka * PANEL + (c % PANEL) * 2;
                let mut tile = [[0f32; NC]; R];
                for (r, t) in tile.iter_mut().enumerate().take(rows) {
                    if acc {
                        t[..nc].copy_from_slice(&out[(i + r) * ldo + c..(i + r) * ldo + c + nc]);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the weight reads are pairs ka/2..kb/2 of 16 columns of one panel,
                // w[w_off + k2 * 64 .. + 32] with w_off + (kb - ka) / 2 * 64 <= (p + c/32 + 1) * 32 * kp
                // (asserted above); xf and tile are local arrays of the sizes the tile uses;
                // CPU features checked by `available`.
                unsafe {
                    tile_r(rows, &xf, (kb - ka) / 2, w.as_ptr().add(w_off), &mut tile);
                }
                for (r, t) in tile.iter().enumerate().take(rows) {
                    out[(i + r) * ldo + c..(i + r) * ldo + c + nc].copy_from_slice(&t[..nc]);
                }
                c += nc;
            }
            ka = kb;
            if ka >= k1 {
                break;
            }
        }
        i += rows;
    }
}

/// Dispatches [`tile`] on the row count.
///
/// # Safety
/// As [`tile`].
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn tile_r(rows: usize, xf: &[[f32; KS]; R], k2n: usize, w: *const u16, acc: &mut [[f32; NC]; R]) {
    match rows {
        4 => tile::<4>(xf, k2n, w, acc),
        3 => tile::<3>(xf, k2n, w, acc),
        2 => tile::<2>(xf, k2n, w, acc),
        _ => tile::<1>(xf, k2n, w, acc),
    }
}

/// `RR` rows of widened activations against 16 columns over `k2n` pairs of the reduction,
/// adding to `acc`.
///
/// # Safety
/// `w` is valid for reads of `k2n * 64 - 32` values past it in steps of 64 (32 per pair);
/// `k2n * 2 <= KS`; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const RR: usize>(xf: &[[f32; KS]; R], k2n: usize, w: *const u16, acc: &mut [[f32; NC]; R]) {
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut a = [[_mm256_setzero_ps(); 2]; RR];
    for (ai, src) in a.iter_mut().zip(acc.iter()) {
        ai[0] = _mm256_loadu_ps(src.as_ptr());
        ai[1] = _mm256_loadu_ps(src.as_ptr().add(8));
    }
    for k2 in 0..k2n {
        let r0 = _mm256_loadu_si256(w.add(k2 * 2 * PANEL) as *const __m256i);
        let r1 = _mm256_loadu_si256(w.add(k2 * 2 * PANEL + 16) as *const __m256i);
        let e0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r0));
        let o0 = _mm256_castsi256_ps(_mm256_and_si256(r0, hi));
        let e1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r1));
        let o1 = _mm256_castsi256_ps(_mm256_and_si256(r1, hi));
        for (ai, xr) in a.iter_mut().zip(xf.iter()) {
            let xe = _mm256_broadcast_ss(&xr[2 * k2]);
            let xo = _mm256_broadcast_ss(&xr[2 * k2 + 1]);
            ai[0] = _mm256_fmadd_ps(xe, e0, ai[0]);
            ai[1] = _mm256_fmadd_ps(xe, e1, ai[1]);
            ai[0] = _mm256_fmadd_ps(xo, o0, ai[0]);
            ai[1] = _mm256_fmadd_ps(xo, o1, ai[1]);
        }
    }
    for (ai, dst) in a.iter().zip(acc.iter_mut()) {
        _mm256_storeu_ps(dst.as_mut_ptr(), ai[0]);
        _mm256_storeu_ps(dst.as_mut_ptr().add(8), ai[1]);
    }
}
