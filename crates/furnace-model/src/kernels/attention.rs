//! Rotary embeddings and single-query attention on plain slices. A decode step attends one
//! new token per sequence over that sequence's cache; doing it here instead of through a
//! dozen small tensor ops per sequence and layer is what makes batched decoding cheap.

/// Rotates `heads` consecutive head vectors of width `hd` in place, using the cos/sin row
/// (`hd / 2` values) of one position.
pub fn rope_inplace(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        if interleaved {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        } else {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// `y += a * x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `e^x` for `x <= 0` (softmax after subtracting the max), vectorizable: 2^(x log2 e) split
/// into an integer power of two and a degree-7 polynomial of 2^f for f in [-1/2, 1/2);
/// relative error < 1e-6 for x >= -10, < 1e-5 below (f32 range reduction).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let t = (x * std::f32::consts::LOG2_E).max(-125.0);
    let fl = (t + 0.5).floor();
    let f = t - fl;
    // Taylor series of e^(f ln 2), Horner form; |f ln 2| <= 0.35 keeps it accurate.
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355_8 + f * (0.000_154_035_3 + f * 0.000_015_252_73))))));
    // The power of two from the float bits of `fl + 1.5 * 2^23`, whose low mantissa bits
    // are the integer `fl` (an `as i32` cast's saturating semantics would keep LLVM scalar):
    // equal bit for bit to `((fl as i32 + 127) as u32) << 23` for every clamped `fl`.
    let bits = (fl + 12_582_912.0).to_bits().wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// Attention of one query token (`q: [nh * hd]`) over `len` cached tokens, written to
/// `out: [nh * hd]`. Keys are dimension-major (`kt: [nkv * hd][stride]`, token axis last),
/// values token-major (`v: [len, nkv * hd]`). Query head `h` reads key/value head
/// `h / (nh / nkv)` (grouped-query attention). Every inner loop runs along a contiguous
/// axis with no horizontal sums, so it vectorizes.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(q: &[f32], kt: &[f32], stride: usize, v: &[f32], len: usize, nh: usize, nkv: usize, hd: usize, out: &mut [f32]) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let width = nkv * hd;
    let mut scores = vec![0f32; rep * len];
    for g in 0..nkv {
        scores.fill(0.0);
        for d in 0..hd {
            let krow = &kt[(g * hd + d) * stride..(g * hd + d) * stride + len];
            for r in 0..rep {
                let qd = q[(g * rep + r) * hd + d] * scale;
                axpy(qd, krow, &mut scores[r * len..(r + 1) * len]);
            }
        }
        for r in 0..rep {
            let row = &mut scores[r * len..(r + 1) * len];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            for s in row.iter_mut() {
                *s = exp_nonpositive(*s - max);
                total += *s;
            }
            let inv = 1.0 / total;
            row.iter_mut().for_each(|s| *s *= inv);
        }
        let og = &mut out[g * rep * hd..(g + 1) * rep * hd];
        og.fill(0.0);
        for j in 0..len {
            let vj = &v[j * width + g * hd..j * width + (g + 1) * hd];
            for r in 0..rep {
                axpy(scores[r * len + j], vj, &mut og[r * hd..(r + 1) * hd]);
            }
        }
    }
}
