//! `furnace ui`: the dashboard over a runs folder. It serves the stored experiments (also
//! when nothing trains) and trains the experiments started from the dashboard, one after
//! another, until Ctrl-C.

use super::launch::{dashboard_host, queue, train_experiment, TrackFlags};
use crate::args::{open_store, parse_bytes, RunsDir, ServerArgs};
use crate::human::print_runs;
use anyhow::Result;
use clap::Args;
use furnace_server::ServerOptions;
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

#[derive(Args)]
pub struct UiArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Memory the runs' own state may take at once (as for furnace run).
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    dir: RunsDir,
}

pub fn run(a: UiArgs) -> Result<()> {
    let (launcher, rx) = queue();
    let opts = ServerOptions { launcher: Some(launcher), ..a.server.options()? };
    let store = open_store(&a.dir)?;
    let events = furnace_exp::events::channel();
    let server = furnace_server::start(store.path().to_path_buf(), opts, events.clone())?;
    eprintln!("dashboard on http://{}/ (runs in {}; Ctrl-C to stop)", dashboard_host(server.addr), a.dir.runs_dir.display());
    let cancel = crate::interrupt::install()?;
    loop {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let name = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(n) => n,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        eprintln!("training experiment {name} (started from the dashboard)");
        match train_experiment(&store, &a.dir.runs_dir, &name, a.memory_budget, cancel.clone(), &events, &TrackFlags::default()) {
            Ok(summary) => {
                print_runs(&store, &summary.runs, false)?;
                if summary.cancelled {
                    eprintln!("interrupted; continue it with: furnace run --experiment {name}");
                }
            }
            // One experiment's failure does not stop the dashboard.
            Err(e) => eprintln!("experiment {name}: {e:#}"),
        }
    }
    server.shutdown();
    Ok(())
}
