//! `furnace data generate`: synthetic datasets.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct GenerateArgs {}

pub fn run(_a: GenerateArgs) -> Result<()> {
    bail!("furnace data generate is not implemented yet")
}
