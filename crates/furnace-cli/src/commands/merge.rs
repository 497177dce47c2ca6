//! `furnace merge`: adapters merged into their base, exported, or combined.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct MergeArgs {}

pub fn run(_a: MergeArgs) -> Result<()> {
    bail!("furnace merge is not implemented yet")
}
