//! Times the training ops on the shapes of `furnace bench train` (SmolLM2-135M, 4 x 256
//! tokens, r = 16): `cargo run --release -p furnace-train --example ops_bench`. `BATCH` and
//! `SEQ` change the batch (e.g. `BATCH=1 SEQ=2048` for long-sequence attention).
use furnace_train::engine::ops::{self, Heads};
use std::time::Instant;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = furnace_model::rng::Rng::new(seed);
    (0..n).map(|_| r.normal() as f32).collect()
}

fn time(name: &str, reps: usize, mut f: impl FnMut()) {
    let only = std::env::var("ONLY").unwrap_or_default();
    if !name.contains(only.as_str()) {
        return;
    }
    let reps = reps * std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    println!("{name:>20}: {:8.3} ms", t.elapsed().as_secs_f64() * 1e3 / reps as f64);
}

fn main() {
    let heads = Heads { q: 9, kv: 3, dim: 64 };
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (batch, seq) = (env("BATCH", 4), env("SEQ", 256));
    let seqs: Vec<(usize, usize)> = (0..batch).map(|i| (i * seq, seq)).collect();
    let rows = batch * seq;
    let q = randn(rows * 576, 1);
    let k = randn(rows * 192, 2);
    let v = randn(rows * 192, 3);
    let dout = randn(rows * 576, 4);
    let (out, lse) = ops::attention(&q, &k, &v, &seqs, heads);
    time("attention fwd", 5, || {
        std::hint::black_box(ops::attention(&q, &k, &v, &seqs, heads));
    });
    time("attention bwd", 5, || {
        std::hint::black_box(ops::attention_backward(&q, &k, &v, &out, &lse, &dout, &seqs, heads));
    });
    let (inp, out, r) = (576, 1536, 16);
    let z = randn(rows * inp, 5);
    let a = randn(r * inp, 6);
    let b = randn(out * r, 7);
    let dy = randn(rows * out, 8);
    let p = ops::lora_down(&z, inp, &a, r);
    time("lora down", 10, || {
        std::hint::black_box(ops::lora_down(&z, inp, &a, r));
    });
    let mut y = vec![0f32; rows * out];
    time("lora up", 10, || ops::lora_up_add(&mut y, out, &p, r, &b, 2.0));
    time("lora backward", 10, || {
        std::hint::black_box(ops::lora_backward(&z, inp, &a, r, &b, out, 2.0, &p, &dy));
    });
    let g = randn(rows * 1536, 9);
    let u = randn(rows * 1536, 10);
    time("swiglu", 10, || {
        std::hint::black_box(ops::swiglu(&g, &u));
    });
    time("swiglu bwd", 10, || {
        std::hint::black_box(ops::swiglu_backward(&g, &u, &dy));
    });
    let w = randn(576, 11);
    time("rms_norm", 10, || {
        std::hint::black_box(ops::rms_norm(&z, &w, 1e-5));
    });
    let mut logits = randn(64 * 49152, 12);
    let targets = vec![5u32; 64];
    let weights = vec![1e-3f32; 64];
    time("cross_entropy 64", 10, || {
        std::hint::black_box(ops::cross_entropy(&mut logits, 49152, &targets, &weights, true));
    });
}
