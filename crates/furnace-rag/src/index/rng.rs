//! A small seeded PRNG (SplitMix64): HNSW's level draws and the benchmark's random
//! vectors are reproducible for a seed.

/// SplitMix64 (Steele, Lea and Flood): 64-bit state, one add and a mix per draw.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub(crate) fn state(&self) -> u64 {
        self.state
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never zero, so its logarithm is finite.
    pub(crate) fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box–Muller).
    pub(crate) fn next_gaussian(&mut self) -> f64 {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// `n` random unit vectors of dimension `dim` (row-major), the same for a seed on every
/// machine.
pub fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let row: Vec<f64> = (0..dim).map(|_| rng.next_gaussian()).collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
        out.extend(row.iter().map(|x| (x / norm) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_unit() {
        assert_eq!(random_unit_vectors(3, 5, 7), random_unit_vectors(3, 5, 7));
        assert_ne!(random_unit_vectors(3, 5, 7), random_unit_vectors(3, 5, 8));
        let v = random_unit_vectors(4, 33, 1);
        for row in v.chunks(33) {
            let n: f32 = row.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
        let mut r = SplitMix64::new(0);
        assert!((0..1000).all(|_| {
            let u = r.next_open01();
            u > 0.0 && u <= 1.0
        }));
    }
}
