//! AVX512-BF16 matmul micro-kernels and the dot-product peak loop. Callers check
//! [`available`] first.
//!
//! Safety argument: [`gemm_block`] asserts every slice length it reads or writes before any
//! raw-pointer access, and every offset computed inside stays below those lengths.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::bf16::PANEL;

/// Rows of one register tile: 6 rows x 2 panels (64 columns) = 24 accumulators, 4 weight
/// vectors and one broadcast, 29 of the 32 vector registers. Per pair of `k` it issues 24
/// `vdpbf16ps` against 4 weight loads and 6 broadcasts, so the loads never limit it.
pub const MR: usize = 6;

/// Whether the CPU has AVX-512F, AVX-512BW and AVX512-BF16.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// For `m` rows of `x` (bf16 `[m, kp]`, row stride `kp`) and `np` (1 or 2) consecutive
/// packed panels starting at panel `p` of `w` (the whole packed weight, `[panels][kp / 2][32][2]`),
/// over the reduction range `k0..k1` (even bounds): writes, or with `accumulate` adds to,
/// `out[i * ldo + c] (+)= sum_{k0 <= kk < k1} x[i, kk] w[p * 32 + c, kk]` for the `cols`
/// (<= `np * 32`) valid columns `c`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_block(
    x: &[u16],
    m: usize,
    kp: usize,
    (k0, k1): (usize, usize),
    w: &[u16],
    (p, np): (usize, usize),
    cols: usize,
    out: &mut [f32],
    ldo: usize,
    accumulate: bool,
) {
    assert!(kp.is_multiple_of(2) && k0.is_multiple_of(2) && k1.is_multiple_of(2) && k0 <= k1 && k1 <= kp);
    assert!(x.len() >= m * kp && (np == 1 || np == 2) && cols <= np * PANEL);
    assert!(w.len() >= (p + np) * PANEL * kp);
    assert!(m == 0 || cols == 0 || out.len() >= (m - 1) * ldo + cols);
    assert!(available(), "gemm_block called without AVX512-BF16");
    if m == 0 || cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: lengths asserted above (rows i < m read x[i * kp + k0 .. i * kp + k1], the
    // panels read w[(p + q) * 32 * kp + k0 * 32 .. + (k1 - k0) * 32] for q < np, row i
    // writes out[i * ldo .. i * ldo + cols]); CPU features checked by `available`.
    unsafe {
        let k2n = (k1 - k0) / 2;
        let w0 = w.as_ptr().add(p * PANEL * kp + k0 * PANEL);
        let w1 = if np == 2 { w0.add(PANEL * kp) } else { w0 };
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(MR);
            let xp = x.as_ptr().add(i * kp + k0);
            let op = out.as_mut_ptr().add(i * ldo);
            macro_rules! go {
                ($r:literal) => {
                    if np == 2 {
                        tile::<$r, 2>(xp, kp, k2n, [w0, w1], op, ldo, cols, accumulate)
                    } else {
                        tile::<$r, 1>(xp, kp, k2n, [w0, w1], op, ldo, cols, accumulate)
                    }
                };
            }
            match mr {
                6 => go!(6),
                5 => go!(5),
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
            i += mr;
        }
    }
}

/// Masks of the valid lanes of the 16-lane vectors `0..2 * NP` for `cols` valid columns.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lane_masks<const NV: usize>(cols: usize) -> [u16; NV] {
    let mut m = [0u16; NV];
    for (v, mv) in m.iter_mut().enumerate() {
        let c = cols.saturating_sub(v * 16).min(16);
        *mv = ((1u32 << c) - 1) as u16;
    }
    m
}

/// `R` rows of x against `NP` panels over `k2n` pairs of the reduction: `R x 2NP`
/// accumulators of 16 outputs each.
///
/// # Safety
/// `x` is valid for `R` rows of stride `ldx` and `2 * k2n` values each; `w[q]` for
/// `64 * k2n` values (q < NP); `out` for `R` rows of stride `ldo` and `cols` values each;
/// the CPU has AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const NP: usize>(
    x: *const u16,
    ldx: usize,
    k2n: usize,
    w: [*const u16; 2],
    out: *mut f32,
    ldo: usize,
    cols: usize,
    accumulate: bool,
) {
    let full = cols == NP * PANEL;
    let masks = lane_masks::<4>(cols);
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    if accumulate {
        for (i, a) in acc.iter_mut().enumerate() {
            for v in 0..2 * NP {
                a[v] = if full {
                    _mm512_loadu_ps(out.add(i * ldo + v * 16))
                } else {
                    _mm512_maskz_loadu_ps(masks[v], out.wrapping_add(i * ldo + v * 16))
                };
            }
        }
    }
    let mut xr = [x; R];
    for (i, p) in xr.iter_mut().enumerate() {
        *p = x.add(i * ldx);
    }
    for k2 in 0..k2n {
        let mut b = [_mm512_setzero_si512(); 4];
        for q in 0..NP {
            b[2 * q] = _mm512_loadu_si512(w[q].add(k2 * 64) as *const __m512i);
            b[2 * q + 1] = _mm512_loadu_si512(w[q].add(k2 * 64 + 32) as *const __m512i);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            let pair = (xr[i].add(2 * k2) as *const u32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            for v in 0..2 * NP {
                a[v] = _mm512_dpbf16_ps(a[v], av, std::mem::transmute::<__m512i, __m512bh>(b[v]));
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        for v in 0..2 * NP {
            if full {
                _mm512_storeu_ps(out.add(i * ldo + v * 16), a[v]);
            } else {
                _mm512_mask_storeu_ps(out.wrapping_add(i * ldo + v * 16), masks[v], a[v]);
            }
        }
    }
}

/// Runs `iters` rounds of 16 independent `vdpbf16ps` on registers only (no memory
/// operands) and returns a value depending on all of them, so the loop is not removed.
/// Each instruction is 64 FLOP (16 lanes x 2 products x multiply-add).
pub fn peak_loop(iters: usize) -> f32 {
    assert!(available(), "peak_loop called without AVX512-BF16");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: register-only intrinsics; CPU features checked by `available`.
    unsafe {
        peak_inner(iters)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        0.0
    }
}

/// Instructions per round of [`peak_loop`].
pub const PEAK_CHAINS: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn peak_inner(iters: usize) -> f32 {
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3F80_3F80u32 as i32));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3400_3400u32 as i32));
    let mut acc = [_mm512_setzero_ps(); PEAK_CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
        // Keep the compiler from folding the chains.
        std::arch::asm!("", options(nomem, nostack, preserves_flags));
    }
    let mut s = _mm512_setzero_ps();
    for c in acc {
        s = _mm512_add_ps(s, c);
    }
    _mm512_reduce_add_ps(s)
}
