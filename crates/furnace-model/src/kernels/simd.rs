//! AVX512-BF16 matmul micro-kernel. Callers check [`available`] first.
//!
//! Safety argument: [`gemm_panel`] asserts every slice length it reads or writes before any
//! raw-pointer access, and every offset computed inside stays below those lengths.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::bf16::PANEL;

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

/// For one packed panel (`[kp / 2][32][2]` bf16) and all `m` rows of `x` (bf16 `[m, kp]`),
/// writes `out[i * ldo + c] = <x_i, w_c>` for the `cols` (<= 32) valid columns `c`.
pub fn gemm_panel(x: &[u16], m: usize, kp: usize, panel: &[u16], out: &mut [f32], ldo: usize, cols: usize) {
    assert!(kp.is_multiple_of(2) && x.len() >= m * kp && panel.len() >= kp * PANEL && cols <= PANEL);
    assert!(m == 0 || out.len() >= (m - 1) * ldo + cols);
    assert!(available(), "gemm_panel called without AVX512-BF16");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: lengths asserted above; CPU features checked by `available`.
    unsafe {
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(8);
            let xp = x.as_ptr().add(i * kp);
            let op = out.as_mut_ptr().add(i * ldo);
            match mr {
                8 => rows::<8>(xp, kp, panel.as_ptr(), op, ldo, cols),
                7 => rows::<7>(xp, kp, panel.as_ptr(), op, ldo, cols),
                6 => rows::<6>(xp, kp, panel.as_ptr(), op, ldo, cols),
                5 => rows::<5>(xp, kp, panel.as_ptr(), op, ldo, cols),
                4 => rows::<4>(xp, kp, panel.as_ptr(), op, ldo, cols),
                3 => rows::<3>(xp, kp, panel.as_ptr(), op, ldo, cols),
                2 => rows::<2>(xp, kp, panel.as_ptr(), op, ldo, cols),
                _ => rows::<1>(xp, kp, panel.as_ptr(), op, ldo, cols),
            }
            i += mr;
        }
    }
}

/// `MR` rows of x against one panel: 2 x MR accumulators of 16 outputs each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn rows<const MR: usize>(x: *const u16, kp: usize, w: *const u16, out: *mut f32, ldo: usize, cols: usize) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for k2 in 0..kp / 2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(k2 * 64) as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(k2 * 64 + 32) as *const __m512i));
        for (i, a) in acc.iter_mut().enumerate() {
            let pair = (x.add(i * kp + 2 * k2) as *const u32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            a[0] = _mm512_dpbf16_ps(a[0], av, b0);
            a[1] = _mm512_dpbf16_ps(a[1], av, b1);
        }
    }
    if cols == PANEL {
        for (i, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(i * ldo), a[0]);
            _mm512_storeu_ps(out.add(i * ldo + 16), a[1]);
        }
    } else {
        let m0: __mmask16 = if cols >= 16 { 0xFFFF } else { ((1u32 << cols) - 1) as u16 };
        let m1: __mmask16 = if cols <= 16 { 0 } else { ((1u32 << (cols - 16)) - 1) as u16 };
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * ldo), m0, a[0]);
            _mm512_mask_storeu_ps(out.add(i * ldo + 16), m1, a[1]);
        }
    }
}
