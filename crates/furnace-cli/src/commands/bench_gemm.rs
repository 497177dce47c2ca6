//! `furnace bench gemm`: furnace's bf16 kernels on the training shapes (forward `x Wᵀ`,
//! backward `dy W`, LoRA products) in GFLOP/s, against `torch.matmul` in bf16 on the same
//! shapes (`scripts/peer_gemm.py`), and the peak of the dot-product instruction.

use anyhow::Result;
use clap::Args;

#[derive(Args, Clone)]
pub struct GemmBenchArgs {}

pub fn run(_a: GemmBenchArgs) -> Result<()> {
    anyhow::bail!("furnace bench gemm is not built yet")
}
