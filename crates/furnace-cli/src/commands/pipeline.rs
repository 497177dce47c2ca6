//! `furnace pipeline`: stage pipelines.

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct PipelineArgs {}

pub fn run(_a: PipelineArgs) -> Result<()> {
    bail!("furnace pipeline is not implemented yet")
}
