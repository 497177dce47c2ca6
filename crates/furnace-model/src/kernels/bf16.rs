//! bfloat16 conversion and the packed bf16 weight layout of the matmul kernel.

/// Rounds an f32 to bf16 (round to nearest, ties to even; NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Widens a bf16 to f32 (exact).
#[inline]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Output columns per panel.
pub const PANEL: usize = 32;

/// A weight `W: [n, k]` in bf16, packed for `y = x W^T`: panels of [`PANEL`] rows of `W`
/// (output features), each stored as `[k_pad / 2][PANEL][2]`, i.e. consecutive pairs along
/// `k` of 32 outputs side by side. One 64-byte load then feeds `vdpbf16ps` for 16 outputs
/// at once, with no horizontal sums. Rows past `n` and columns past `k` are zero.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    /// Rows (output features).
    pub n: usize,
    /// Columns (input features).
    pub k: usize,
    /// `k` rounded up to even.
    pub k_pad: usize,
    /// `n` rounded up to a multiple of [`PANEL`].
    pub n_pad: usize,
    /// `n_pad * k_pad` values.
    pub data: Vec<u16>,
}

impl Bf16Matrix {
    /// Rounds a row-major f32 matrix `[n, k]` to bf16 and packs it.
    pub fn from_f32(values: &[f32], n: usize, k: usize) -> Self {
        let k_pad = k.div_ceil(2) * 2;
        let n_pad = n.div_ceil(PANEL) * PANEL;
        let mut data = vec![0u16; n_pad * k_pad];
        for j in 0..n {
            let (panel, c) = (j / PANEL, j % PANEL);
            let base = panel * PANEL * k_pad;
            for (kk, &v) in values[j * k..(j + 1) * k].iter().enumerate() {
                data[base + (kk / 2) * PANEL * 2 + c * 2 + (kk % 2)] = f32_to_bf16(v);
            }
        }
        Self { n, k, k_pad, n_pad, data }
    }

    /// The value at row `j`, column `kk`.
    #[inline]
    pub fn get(&self, j: usize, kk: usize) -> u16 {
        let (panel, c) = (j / PANEL, j % PANEL);
        self.data[panel * PANEL * self.k_pad + (kk / 2) * PANEL * 2 + c * 2 + (kk % 2)]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Back to row-major f32 `[n, k]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for j in 0..self.n {
            out.extend((0..self.k).map(|kk| bf16_to_f32(self.get(j, kk))));
        }
        out
    }
}
