//! `furnace runs`: the runs of an experiment.

use crate::args::{existing_store, RunsDir};
use crate::human::print_runs;
use anyhow::Result;
use clap::Args;
use furnace_exp::experiment;

#[derive(Args)]
pub struct RunsArgs {
    /// Experiment name (default: the newest).
    experiment: Option<String>,
    /// Include deleted runs.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    dir: RunsDir,
}

pub fn run(a: RunsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let exp = experiment::find(&store, a.experiment.as_deref())?;
    println!("experiment {} ({}, {})", exp.name, exp.mode, exp.status);
    print_runs(&store, &store.runs(exp.id)?, a.all)
}
