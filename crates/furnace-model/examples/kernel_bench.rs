//! Micro-benchmark of the bf16 matmul kernel: `cargo run --release -p furnace-model --example kernel_bench`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use furnace_model::kernels::{matmul_nt, Bf16Matrix};
use std::time::Instant;

fn main() {
    for &(m, n, k) in &[(1usize, 1536usize, 576usize), (16, 1536, 576), (256, 1536, 576), (16, 49152, 576), (1, 49152, 576)] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let wb = Bf16Matrix::from_f32(&w, n, k);
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).clamp(3.0, 2000.0) as usize;
        let _ = matmul_nt(&x, m, &wb);
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(matmul_nt(&x, m, &wb));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("bf16 m={m:4} n={n:6} k={k}: {:8.1} us  {:6.1} GFLOP/s", s * 1e6, 2.0 * (m * n * k) as f64 / s / 1e9);
    }
}
