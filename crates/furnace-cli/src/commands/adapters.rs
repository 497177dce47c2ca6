//! `furnace adapters list|show|tag|rm|register`: the adapter registry
//! (`furnace_exp::registry`) in the store of --runs-dir. Every run's final adapter is
//! registered as `EXPERIMENT/run-N` when it is saved; foreign PEFT adapters join with
//! `register PATH`. Names and tags resolve wherever an adapter is accepted
//! (`--adapter NAME` of generate, chat, eval and serve).

use crate::args::{existing_store, open_store, RunsDir};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use furnace_exp::registry::{self, AdapterFilter};
use furnace_exp::AdapterRecord;
use std::io::Write;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum AdaptersCmd {
    /// List registered adapters, oldest first: name, base, source, rank, key metrics, tags,
    /// when registered.
    List {
        /// Only adapters of this base (the same model as an alias, a hub id such as
        /// HuggingFaceTB/SmolLM2-135M-Instruct, or a file or folder path).
        #[arg(long, value_name = "MODEL")]
        base: Option<String>,
        /// Only adapters with this tag.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Print the records as JSON (everything stored: spec, metrics, PEFT settings).
        #[arg(long)]
        json: bool,
    },
    /// Show one adapter (by name, or a tag naming one): path, base, source, run, PEFT
    /// settings, final metrics, tags.
    Show {
        /// Its name or tag.
        name: String,
        /// Print the record as JSON (with the run's spec).
        #[arg(long)]
        json: bool,
    },
    /// Add tags to an adapter (or remove them with --remove). A tag that names one adapter
    /// resolves to it like its name (`--adapter best`).
    Tag {
        /// The adapter's name.
        name: String,
        /// Tags: ASCII letters, digits and -_.:@+.
        #[arg(required = true)]
        tags: Vec<String>,
        /// Remove these tags instead.
        #[arg(long)]
        remove: bool,
    },
    /// Unregister an adapter. Its files stay unless --delete-files.
    Rm {
        /// The adapter's name.
        name: String,
        /// Delete its directory too, only when it lies inside --runs-dir (a run's adapter,
        /// or one registered from there): furnace never deletes files outside the runs
        /// folder, and refuses (changing nothing) when asked to.
        #[arg(long)]
        delete_files: bool,
    },
    /// Register a PEFT LoRA adapter directory (adapter_config.json +
    /// adapter_model.safetensors), after checking that it loads. The registry keeps its
    /// absolute path; the files stay where they are.
    Register {
        /// The adapter directory.
        path: PathBuf,
        /// Its name (default: the folder's name; its parent's for a folder called
        /// `adapter`). ASCII letters, digits and -_./:@+.
        #[arg(long)]
        name: Option<String>,
        /// Its base model (default: adapter_config.json's base_model_name_or_path).
        #[arg(long, value_name = "MODEL")]
        base: Option<String>,
        /// Tag it (repeat for more).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Replace an adapter registered under the same name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct AdaptersArgs {
    #[command(subcommand)]
    cmd: AdaptersCmd,
    #[command(flatten)]
    dir: RunsDir,
}

/// Unix seconds as `YYYY-MM-DD HH:MM` UTC.
fn when(secs: f64) -> String {
    let secs = secs as i64;
    let (y, m, d) = crate::commands::conversations::civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", s / 3600, s % 3600 / 60)
}

/// The metrics shown in the table, in this order when present.
const KEY_METRICS: [&str; 5] = ["eval_loss", "eval_reward", "eval_rewards/accuracies", "loss", "reward"];

/// Up to two key metrics, `eval_loss=1.2345 loss=0.9876`.
fn key_metrics(a: &AdapterRecord) -> String {
    let parts: Vec<String> =
        KEY_METRICS.iter().filter_map(|k| a.metrics.get(*k).and_then(|v| v.as_f64()).map(|v| format!("{k}={v:.4}"))).take(2).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn rank(a: &AdapterRecord) -> String {
    a.peft.get("r").map(|r| r.to_string()).unwrap_or_else(|| "-".into())
}

fn tags(a: &AdapterRecord) -> String {
    if a.tags.is_empty() {
        "-".into()
    } else {
        a.tags.join(",")
    }
}

fn print_table(list: &[AdapterRecord]) -> Result<()> {
    let mut rows = vec![["NAME", "BASE", "SOURCE", "RANK", "METRICS", "TAGS", "CREATED"].map(String::from)];
    for a in list {
        rows.push([a.name.clone(), a.base.clone(), a.source.clone(), rank(a), key_metrics(a), tags(a), when(a.created)]);
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = std::io::stdout().lock();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

fn print_one(a: &AdapterRecord) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "name:     {}", a.name)?;
    writeln!(out, "path:     {}", a.path.display())?;
    writeln!(out, "base:     {}", a.base)?;
    writeln!(out, "source:   {}", a.source)?;
    if let (Some(e), Some(r)) = (&a.experiment, a.run_id) {
        writeln!(out, "run:      {r} of experiment {e}")?;
    }
    writeln!(out, "created:  {} UTC", when(a.created))?;
    writeln!(out, "tags:     {}", tags(a))?;
    writeln!(out, "peft:     {}", a.peft)?;
    if let Some(m) = a.metrics.as_object().filter(|m| !m.is_empty()) {
        writeln!(out, "metrics:")?;
        for (k, v) in m {
            match v.as_f64() {
                Some(x) if v.is_f64() => writeln!(out, "  {k:<28} {x:.6}")?,
                _ => writeln!(out, "  {k:<28} {v}")?,
            }
        }
    }
    Ok(())
}

pub fn run(a: AdaptersArgs) -> Result<()> {
    match a.cmd {
        AdaptersCmd::List { base, tag, json } => {
            // No store yet: nothing registered (the listing never creates one).
            let list = if a.dir.runs_dir.join(furnace_exp::store::DB_FILE).exists() {
                registry::list(&existing_store(&a.dir)?, &AdapterFilter { base, tag })?
            } else {
                Vec::new()
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!(
                    "no adapters registered in {} (runs register theirs when they finish; `furnace adapters register PATH` adds others)",
                    a.dir.runs_dir.display()
                );
            } else {
                print_table(&list)?;
            }
        }
        AdaptersCmd::Show { name, json } => {
            let store = existing_store(&a.dir)?;
            let rec = registry::resolve(&store, &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                print_one(&rec)?;
            }
        }
        AdaptersCmd::Tag { name, tags: t, remove } => {
            let store = existing_store(&a.dir)?;
            let rec = if remove { registry::untag(&store, &name, &t)? } else { registry::tag(&store, &name, &t)? };
            println!("{}: tags {}", rec.name, tags(&rec));
        }
        AdaptersCmd::Rm { name, delete_files } => {
            let store = existing_store(&a.dir)?;
            let rec = registry::remove(&store, &name, delete_files)?;
            if delete_files {
                println!("removed {} and deleted {}", rec.name, rec.path.display());
            } else {
                println!("removed {} (its files stay in {})", rec.name, rec.path.display());
            }
        }
        AdaptersCmd::Register { path, name, base, tags: t, force } => {
            let store = open_store(&a.dir)?;
            let rec = registry::register_path(&store, &path, name.as_deref(), base.as_deref(), &t, force)
                .with_context(|| format!("registering {}", path.display()))?;
            println!("registered {} (base {}, rank {}) from {}", rec.name, rec.base, rank(&rec), rec.path.display());
        }
    }
    Ok(())
}
