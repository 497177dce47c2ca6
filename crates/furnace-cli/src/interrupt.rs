//! Ctrl-C (SIGINT) and SIGTERM for the commands that train: the first asks the driver to
//! stop after the current optimizer step (the command then ends with [`Interrupted`],
//! exit code 130); a second exits at once with code 130. Either is safe: every durable
//! write (store transactions, checkpoint folders renamed into place) is atomic.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The exit code of an interrupted command (128 + SIGINT), as shells report it.
pub const EXIT_CODE: i32 = 130;

/// Installs the handler (once per process) and returns the flag it sets, to hand to the
/// driver as `FitOptions::cancel`.
pub fn install() -> Result<Arc<AtomicBool>> {
    install_saying("interrupting: training stops after the current step (Ctrl-C again to exit at once)")
}

/// [`install`] for a command that does something else than train: the first Ctrl-C prints
/// `first` (what the command does now).
pub fn install_saying(first: &'static str) -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    ctrlc::set_handler(move || {
        if set.swap(true, Ordering::SeqCst) {
            eprintln!("interrupted again: exiting now");
            std::process::exit(EXIT_CODE);
        }
        eprintln!("{first}");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

/// The error of a command whose training was interrupted: `main` prints it and exits with
/// [`EXIT_CODE`].
#[derive(Debug)]
pub struct Interrupted {
    /// The command line that continues the work.
    pub resume: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The driver stops between optimizer steps without writing a checkpoint there: a run
        // continues from its last one (chunk end or `save_every`), the steps after it again.
        write!(f, "interrupted; resume with: {}\n(each run continues from its last checkpoint)", self.resume)
    }
}

impl std::error::Error for Interrupted {}
