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

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorize without reassociation flags.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Attention of one query token (`q: [nh * hd]`) over `len` cached tokens whose keys and
/// values are stored token-major (`k, v: [len, nkv * hd]`), written to `out: [nh * hd]`.
/// Query head `h` reads key/value head `h / (nh / nkv)` (grouped-query attention).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    out: &mut [f32],
) {
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let stride = nkv * hd;
    let mut scores = vec![0f32; len];
    for h in 0..nh {
        let g = h / rep;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let kj = &k[j * stride + g * hd..j * stride + (g + 1) * hd];
            *s = dot(qh, kj) * scale;
            max = max.max(*s);
        }
        let mut total = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let inv = 1.0 / total;
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let vj = &v[j * stride + g * hd..j * stride + (g + 1) * hd];
            let w = p * inv;
            for (o, &x) in oh.iter_mut().zip(vj) {
                *o += w * x;
            }
        }
    }
}
