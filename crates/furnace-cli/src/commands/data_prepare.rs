//! `furnace data prepare`: dataset preparation.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct PrepareArgs {}

pub fn run(_a: PrepareArgs) -> Result<()> {
    bail!("furnace data prepare is not implemented yet")
}
