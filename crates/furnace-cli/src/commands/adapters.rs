//! `furnace adapters`: the adapter registry.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct AdaptersArgs {}

pub fn run(_a: AdaptersArgs) -> Result<()> {
    bail!("furnace adapters is not implemented yet")
}
