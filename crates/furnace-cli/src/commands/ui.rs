//! `furnace ui`: the dashboard over a runs folder. It serves the stored experiments (also
//! when nothing trains) and trains the experiments started from the dashboard, one after
//! another, until Ctrl-C.

use super::launch::{dashboard_host, queue, train_experiment, TrackFlags};
use crate::args::{open_store, parse_bytes, RunsDir};
use crate::human::print_runs;
use anyhow::{bail, Result};
use clap::Args;
use furnace_server::ServerOptions;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

#[derive(Args)]
pub struct UiArgs {
    /// Address to serve the dashboard on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0: any free port).
    #[arg(long, default_value_t = furnace_server::DEFAULT_PORT)]
    port: u16,
    /// Bearer token the API and the dashboard's login require (needed to bind anything
    /// but loopback). Shows in `ps`: prefer --token-file or FURNACE_TOKEN.
    #[arg(long)]
    token: Option<String>,
    /// Read the token from this file (surrounding whitespace dropped).
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Let the dashboard's specs and clones name any model path as the base (by default
    /// only built-in model aliases).
    #[arg(long)]
    allow_model_paths: bool,
    /// Memory the runs' own state may take at once (as for furnace run).
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    dir: RunsDir,
}

pub fn run(a: UiArgs) -> Result<()> {
    let env = match std::env::var(furnace_server::TOKEN_ENV) {
        Ok(t) => Some(t),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => bail!("{} is not valid UTF-8", furnace_server::TOKEN_ENV),
    };
    let token = furnace_server::resolve_token(a.token.clone(), a.token_file.as_deref(), env)?;
    let (launcher, rx) = queue();
    let opts =
        ServerOptions { addr: SocketAddr::new(a.host, a.port), token, allow_model_paths: a.allow_model_paths, launcher: Some(launcher) };
    furnace_server::check_options(&opts)?;
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
