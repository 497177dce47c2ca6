//! `furnace ops`: steer the runs of an experiment (stop, resume, delete, clone-modify).

use crate::args::{existing_store, RunsDir};
use anyhow::Result;
use clap::{Args, Subcommand};
use furnace_exp::{experiment, ops, OpKind};

#[derive(Subcommand)]
pub enum OpsCmd {
    /// Take a run out of training (its state is kept; resume brings it back).
    Stop { run: i64 },
    /// Put a stopped run back into training.
    Resume { run: i64 },
    /// Remove a run from views and scheduling (its files are kept).
    Delete { run: i64 },
    /// A new run from RUN's config with changed settings.
    Clone {
        run: i64,
        /// A changed setting, section.key=value (repeatable): --set lora.r=64
        /// --set trainer.learning_rate=1e-4; for an evals pipeline the rag, prompt,
        /// generator and judge sections: --set rag.chunk_size=256 --set rag.k=8
        #[arg(long = "set")]
        set: Vec<String>,
        /// Start from the parent's adapter, optimizer state and data position (same rank
        /// and targets); without it the clone starts from scratch.
        #[arg(long)]
        warm: bool,
    },
    /// List the ops of an experiment (default: the newest).
    List { experiment: Option<String> },
}

#[derive(Args)]
pub struct OpsArgs {
    #[command(subcommand)]
    cmd: OpsCmd,
    #[command(flatten)]
    dir: RunsDir,
}

pub fn run(a: OpsArgs) -> Result<()> {
    let store = existing_store(&a.dir)?;
    let (run, kind) = match a.cmd {
        OpsCmd::Stop { run } => (run, OpKind::Stop),
        OpsCmd::Resume { run } => (run, OpKind::Resume),
        OpsCmd::Delete { run } => (run, OpKind::Delete),
        OpsCmd::Clone { run, set, warm } => (run, OpKind::Clone { set, warm }),
        OpsCmd::List { experiment } => {
            let exp = experiment::find(&store, experiment.as_deref())?;
            println!("{:>4}  {:>4}  {:<7}  {:<6}  {:<8}  {:>5}  message", "op", "run", "op", "source", "status", "step");
            for o in store.ops(exp.id)? {
                let extra = match &o.kind {
                    OpKind::Clone { set, warm } => format!("  [--set {}{}]", set.join(" --set "), if *warm { " --warm" } else { "" }),
                    _ => String::new(),
                };
                println!(
                    "{:>4}  {:>4}  {:<7}  {:<6}  {:<8}  {:>5}  {}{extra}",
                    o.id,
                    o.run_id,
                    o.kind.name(),
                    o.source,
                    o.status,
                    o.applied_step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    o.message.unwrap_or_default()
                );
            }
            return Ok(());
        }
    };
    let id = ops::submit(&store, run, &kind, "cli")?;
    let exp = store.experiment_by_id(store.run(run)?.experiment_id)?;
    let when = if exp.status == "running" {
        "it takes effect at the run's next optimizer step"
    } else {
        "the experiment is not running; it takes effect when `furnace run --experiment` continues it"
    };
    println!("op {id} ({} run {run}) recorded: {when}", kind.name());
    Ok(())
}
