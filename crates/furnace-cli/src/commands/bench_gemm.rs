//! `furnace bench gemm`: furnace's bf16 kernels on the training shapes (forward `x Wᵀ`,
//! backward `dy W`, LoRA products) in GFLOP/s, against `torch.matmul` in bf16 on the same
//! shapes (`scripts/peer_gemm.py`), and the peak of the dot-product instruction.
//!
//! Each shape is timed the way the training pass calls it: the frozen groups through
//! [`FrozenGroup`] (q/k/v and gate/up as one grouped call, the LM head in the pass's
//! 64-row chunks), the LoRA products through the engine's ops. The peer multiplies the
//! same products one `torch.matmul` each, in bf16, on the same number of threads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_model::{kernels, WeightDType};
use furnace_train::engine::ops;
use furnace_train::engine::FrozenGroup;

use super::bench::median;
use crate::args::DEFAULT_MODEL;
use crate::models::load;

#[derive(Args, Clone)]
pub struct GemmBenchArgs {
    /// Model whose shapes are measured (hidden, intermediate, heads, kv heads, vocab are
    /// read from its config; the weights of its first layer and LM head are multiplied):
    /// alias, .gguf file or HF directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    model: String,
    /// Rows of every product: batch x sequence length of a training step.
    #[arg(long, default_value_t = 1024)]
    rows: usize,
    /// LoRA rank of the adapter products.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Rows of one LM-head chunk (the training pass projects the labelled rows 64 at a time).
    #[arg(long, default_value_t = 64)]
    head_chunk: usize,
    /// Timed repeats per shape (the median is reported); one untimed warm-up runs first.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// The Python that runs the peer (needs torch); default $FURNACE_PEER_PYTHON. Without
    /// either, only furnace is measured.
    #[arg(long)]
    peer_python: Option<PathBuf>,
    /// The peer script.
    #[arg(long, default_value = "scripts/peer_gemm.py")]
    peer_script: PathBuf,
    /// Only these shapes (comma-separated names as printed, e.g. `fwd.qkv,bwd.down`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// One product of a shape, as the peer runs it: `nt` is `A[m,k] Bᵀ` with `B[n,k]`, `nn`
/// is `A[m,k] B[k,n]`, `tn` is `Aᵀ B` with `A[k,m]`, `B[k,n]`. `2 m n k` FLOP.
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    n: usize,
    k: usize,
    kind: &'static str,
}

impl Product {
    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }
}

/// A measured shape: its products (with a repeat count) and furnace's call.
struct Shape<'a> {
    name: String,
    products: Vec<(Product, usize)>,
    run: Box<dyn Fn() -> Result<()> + 'a>,
}

/// One adapter's operands: input `x [m, inp]`, factors `A [r, inp]`, `B [out, r]`, saved
/// `p = x Aᵀ [m, r]` and output gradient `dy [m, out]` (also the base output `y`).
type LoraOperands = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 20_001) as f32 / 10_000.0 - 1.0) * 0.1
        })
        .collect()
}

fn p(m: usize, n: usize, k: usize, kind: &'static str) -> Product {
    Product { m, n, k, kind }
}

pub fn run(a: GemmBenchArgs) -> Result<()> {
    if a.rows == 0 || a.rank == 0 || a.repeat == 0 || a.head_chunk == 0 {
        bail!("--rows, --rank, --repeat and --head-chunk must be at least 1");
    }
    match kernels::Bf16Kernel::best() {
        kernels::Bf16Kernel::Avx512Bf16 => {}
        kernels::Bf16Kernel::Avx2Fma => {
            eprintln!("note: this CPU lacks AVX512-BF16; furnace runs its AVX2 + FMA kernel (bf16 widened to f32)")
        }
        kernels::Bf16Kernel::Portable => {
            eprintln!("note: this CPU has neither AVX512-BF16 nor AVX2 + FMA; furnace runs its portable kernel")
        }
    }
    let loaded = load(&a.model, WeightDType::Bf16)?;
    let model = &loaded.model;
    let c = &model.config;
    let (m, r, h, inter, vocab) = (a.rows, a.rank, c.hidden_size, c.intermediate_size, c.vocab_size);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let threads = kernels::threads();
    println!(
        "model {} hidden {h} intermediate {inter} heads {} kv heads {} head dim {} vocab {vocab}; rows {m}, rank {r}, {threads} threads",
        a.model, c.num_heads, c.num_kv_heads, c.head_dim
    );
    let layer = model.layers.first().context("the model has no layers")?;
    let (at, mlp) = (&layer.self_attn, &layer.mlp);
    let qkv = FrozenGroup::new(&[&at.q_proj, &at.k_proj, &at.v_proj])?;
    let o = FrozenGroup::new(&[&at.o_proj])?;
    let gate_up = FrozenGroup::new(&[&mlp.gate_proj, &mlp.up_proj])?;
    let down = FrozenGroup::new(&[&mlp.down_proj])?;
    let head = FrozenGroup::new(&[&model.lm_head])?;
    if !qkv.is_bf16() {
        bail!(
            "the frozen groups of {} are not bf16 (bf16 GEMMs need a CPU with AVX512-BF16 or AVX2 + FMA; without them training keeps f32 copies)",
            a.model
        );
    }

    let x_h = pseudo(m * h, 1);
    let x_q = pseudo(m * qd, 2);
    let x_i = pseudo(m * inter, 3);
    let dy_q = pseudo(m * qd, 4);
    let dy_kv = pseudo(m * kvd, 5);
    let dy_h = pseudo(m * h, 6);
    let dy_i = pseudo(m * inter, 7);
    let hc = a.head_chunk.min(m);
    let chunks = m.div_ceil(hc);
    let x_head = pseudo(hc * h, 8);
    let dy_head = pseudo(hc * vocab, 9);

    // LoRA products of one adapter on each projection: forward `p = x Aᵀ`, `y += s p Bᵀ`;
    // backward `dp = s dy B`, `dx = dp A`, `dA = dpᵀ x`, `dB = s dyᵀ p`.
    let lora_dims: Vec<(&str, usize, usize)> =
        vec![("q", h, qd), ("k", h, kvd), ("v", h, kvd), ("o", qd, h), ("gate", h, inter), ("up", h, inter), ("down", inter, h)];
    let mut lora_data: HashMap<&str, LoraOperands> = HashMap::new();
    for (i, &(name, inp, out)) in lora_dims.iter().enumerate() {
        let s = 10 + 5 * i as u64;
        lora_data.insert(
            name,
            (pseudo(m * inp, s), pseudo(r * inp, s + 1), pseudo(out * r, s + 2), pseudo(m * r, s + 3), pseudo(m * out, s + 4)),
        );
    }
    let mut shapes: Vec<Shape> = vec![
        Shape {
            name: "fwd.qkv".into(),
            products: vec![(p(m, qd, h, "nt"), 1), (p(m, kvd, h, "nt"), 2)],
            run: Box::new(|| qkv.forward(&x_h, m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "fwd.o".into(),
            products: vec![(p(m, h, qd, "nt"), 1)],
            run: Box::new(|| o.forward(&x_q, m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "fwd.gate_up".into(),
            products: vec![(p(m, inter, h, "nt"), 2)],
            run: Box::new(|| gate_up.forward(&x_h, m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "fwd.down".into(),
            products: vec![(p(m, h, inter, "nt"), 1)],
            run: Box::new(|| down.forward(&x_i, m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: format!("fwd.lm_head({chunks}x{hc})"),
            products: vec![(p(hc, vocab, h, "nt"), chunks)],
            run: Box::new(|| {
                for _ in 0..chunks {
                    head.forward(&x_head, hc)?;
                }
                Ok(())
            }),
        },
        Shape {
            name: "bwd.qkv".into(),
            products: vec![(p(m, h, qd, "nn"), 1), (p(m, h, kvd, "nn"), 2)],
            run: Box::new(|| qkv.backward(&[&dy_q, &dy_kv, &dy_kv], m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "bwd.o".into(),
            products: vec![(p(m, qd, h, "nn"), 1)],
            run: Box::new(|| o.backward(&[&dy_h], m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "bwd.gate_up".into(),
            products: vec![(p(m, h, inter, "nn"), 2)],
            run: Box::new(|| gate_up.backward(&[&dy_i, &dy_i], m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: "bwd.down".into(),
            products: vec![(p(m, inter, h, "nn"), 1)],
            run: Box::new(|| down.backward(&[&dy_h], m).map(drop).map_err(Into::into)),
        },
        Shape {
            name: format!("bwd.lm_head({chunks}x{hc})"),
            products: vec![(p(hc, h, vocab, "nn"), chunks)],
            run: Box::new(|| {
                for _ in 0..chunks {
                    head.backward(&[&dy_head], hc)?;
                }
                Ok(())
            }),
        },
    ];
    for &(name, inp, out) in &lora_dims {
        let (x, la, lb, pp, dy) = &lora_data[name];
        shapes.push(Shape {
            name: format!("lora.{name}.fwd"),
            products: vec![(p(m, r, inp, "nt"), 1), (p(m, out, r, "nt"), 1)],
            run: Box::new(move || {
                let pr = ops::lora_down(x, inp, la, r);
                let mut y = dy.clone();
                ops::lora_up_add(&mut y, out, &pr, r, lb, 2.0);
                std::hint::black_box(y);
                Ok(())
            }),
        });
        shapes.push(Shape {
            name: format!("lora.{name}.bwd"),
            products: vec![(p(m, r, out, "nn"), 1), (p(m, inp, r, "nn"), 1), (p(r, inp, m, "tn"), 1), (p(out, r, m, "tn"), 1)],
            run: Box::new(move || {
                std::hint::black_box(ops::lora_backward(x, inp, la, r, lb, out, 2.0, pp, dy));
                Ok(())
            }),
        });
    }
    if !a.only.is_empty() {
        shapes.retain(|s| a.only.iter().any(|o| s.name == *o || s.name.starts_with(&format!("{o}("))));
        if shapes.is_empty() {
            bail!("--only matched no shape");
        }
    }

    let peak = kernels::peak_bf16_gflops();
    match peak {
        Some(pk) => println!("peak of vdpbf16ps on {threads} threads: {pk:.1} GFLOP/s"),
        None => println!("peak: this CPU has no AVX512-BF16 dot product"),
    }

    let mut ours: Vec<f64> = Vec::new();
    for s in &shapes {
        (s.run)()?;
        let mut ts = Vec::with_capacity(a.repeat);
        for _ in 0..a.repeat {
            let t = Instant::now();
            (s.run)()?;
            ts.push(t.elapsed().as_secs_f64());
        }
        ours.push(median(ts));
    }

    let python = a.peer_python.clone().or_else(|| std::env::var_os("FURNACE_PEER_PYTHON").map(PathBuf::from));
    let peer: Option<HashMap<String, f64>> = match python {
        Some(py) => Some(run_peer(&py, &a.peer_script, &shapes, threads, a.repeat)?),
        None => None,
    };

    println!("{:<22} {:>8} {:>10} {:>9} {:>7} {:>10} {:>7}", "shape", "MFLOP", "ms", "GFLOP/s", "%peak", "torch", "ratio");
    for (s, &t) in shapes.iter().zip(&ours) {
        let flops: f64 = s.products.iter().map(|(pr, n)| pr.flops() * *n as f64).sum();
        let g = flops / t / 1e9;
        let pct = peak.map(|pk| 100.0 * g / pk);
        let tg = peer.as_ref().and_then(|pm| pm.get(&s.name)).map(|&pt| flops / pt / 1e9);
        let ratio = tg.map(|tg| g / tg);
        let f = |v: Option<f64>, d: usize| v.map(|v| format!("{v:.d$}")).unwrap_or_else(|| "-".into());
        println!("{:<22} {:>8.1} {:>10.3} {:>9.1} {:>7} {:>10} {:>7}", s.name, flops / 1e6, t * 1e3, g, f(pct, 1), f(tg, 1), f(ratio, 2));
        println!(
            "RESULT gemm shape={} rows={m} mflop={:.1} ms={:.3} gflops={g:.1} peak_gflops={} pct_peak={} torch_gflops={} ratio={}",
            s.name,
            flops / 1e6,
            t * 1e3,
            f(peak, 1),
            f(pct, 1),
            f(tg, 1),
            f(ratio, 2)
        );
    }
    Ok(())
}

/// Runs the peer on the same products; returns its median seconds per shape name.
fn run_peer(python: &PathBuf, script: &PathBuf, shapes: &[Shape], threads: usize, repeat: usize) -> Result<HashMap<String, f64>> {
    let spec = serde_json::json!({
        "threads": threads,
        "repeat": repeat,
        "shapes": shapes.iter().map(|s| serde_json::json!({
            "name": s.name,
            "products": s.products.iter().map(|(pr, n)| serde_json::json!([pr.m, pr.n, pr.k, pr.kind, n])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shapes.json");
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(&path)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running the peer {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!("the peer {} failed ({})", script.display(), out.status);
    }
    let mut res = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if let (Some(n), Some(s)) = (v["name"].as_str(), v["seconds"].as_f64()) {
                res.insert(n.to_string(), s);
            }
        }
    }
    Ok(res)
}
