//! `furnace bench search`: 16 configurations (rank x learning rate x alpha) on the shipped
//! extraction task, searched exhaustively (round-robin over chunks), with ASHA, with TPE and
//! with PBT; wall time and best final eval loss of each, and the ratios.

use anyhow::Result;
use clap::Args;

#[derive(Args, Clone)]
pub struct SearchBenchArgs {}

pub fn run(_a: SearchBenchArgs) -> Result<()> {
    anyhow::bail!("furnace bench search is not built yet")
}
