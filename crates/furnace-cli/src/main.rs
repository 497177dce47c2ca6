//! `furnace`: the command-line front end. Thin by design: this file parses the command
//! line and dispatches; each command lives in its own file under `commands/`, turns its
//! arguments into library options and calls into the library crates.

use clap::{Parser, Subcommand};

mod args;
mod commands;
mod human;
mod interrupt;
mod models;
mod stages;

use commands::{
    adapters, bench, chat, conversations, data, doctor, embed, eval, generate, index, merge, model, ops, pipeline, results, run, runs,
    serve, tokenize, train, ui,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hyperparallel LLM fine-tuning and evaluation, in one binary.
#[derive(Parser)]
#[command(name = "furnace", version, about, long_about = None)]
struct Cli {
    /// Compute threads (default: physical cores). Fixed once at start.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Parses a command line as `furnace` would, without running it (`furnace pipeline` checks
/// its stages' flags with it before anything runs).
pub(crate) fn check_args(argv: Vec<String>) -> Result<(), clap::Error> {
    Cli::try_parse_from(argv).map(|_| ())
}

#[derive(Subcommand)]
enum Command {
    /// Fetch and list models in the local cache ($FURNACE_HOME).
    Model {
        #[command(subcommand)]
        cmd: model::ModelCmd,
    },
    /// Print the token ids of a text (like llama.cpp's llama-tokenize).
    Tokenize(tokenize::TokenizeArgs),
    /// Generate a reply to one prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Chat interactively with a model (type /exit to quit, /reset to clear the history).
    Chat(chat::ChatArgs),
    /// Train one LoRA configuration from a spec (TOML): a one-run experiment (see `furnace
    /// runs`) whose run folder holds metrics.jsonl, checkpoints and the final adapter.
    Train(train::TrainArgs),
    /// Dataset tools: `stats` (rows, forms, bad rows, token lengths, what would be cut),
    /// `prepare` (split, filter, deduplicate, convert), `generate` (synthetic examples).
    Data(data::DataArgs),
    /// Merge LoRA adapters into their base and export it (an HF directory or a GGUF file),
    /// or combine several adapters into one (linear, cat, ties, dare, svd).
    Merge(merge::MergeArgs),
    /// The adapter registry: every adapter trained here, and foreign PEFT adapters
    /// registered by path; names resolve wherever an adapter is accepted.
    Adapters(adapters::AdaptersArgs),
    /// Run a stage pipeline (prepare, train, merge, eval, ...) from a spec: each stage in its
    /// own folder, finished stages skipped, an interrupted one resumed.
    Pipeline(pipeline::PipelineArgs),
    /// Evaluate a model (optionally with a LoRA adapter) on a dataset: perplexity of the
    /// completions and metrics of greedy answers, written to <run>/eval/.
    Eval(eval::EvalArgs),
    /// Run an experiment: every config of a spec (knobs, [[group]]s) trains together in
    /// fused passes, chunk by chunk, with live control and an HTTP API. Continues an
    /// interrupted experiment from its checkpoints. A spec with `mode = "evals"` runs
    /// pipelines (retrieval, prompt, generator) over a question set shard by shard, with
    /// confidence intervals (docs/evals.md).
    Run(run::RunArgs),
    /// List the runs of an experiment (default: the newest): status, progress, losses;
    /// for evals, shards and the primary metric with its interval.
    Runs(runs::RunsArgs),
    /// Print the metrics of every run at every step (table, csv or json); for evals,
    /// each metric with its interval.
    Results(results::ResultsArgs),
    /// Steer a running experiment: stop, resume, delete or clone-modify a run.
    Ops(ops::OpsArgs),
    /// Serve the dashboard over a runs folder: watch and steer experiments in the browser
    /// and start new ones from it (they train here, one after another).
    Ui(ui::UiArgs),
    /// Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /// /v1/embeddings, /v1/models): one resident base, its adapters (--adapter NAME=DIR,
    /// --experiment NAME) batched together, embedding models; the dashboard on the same port
    Serve(serve::ServeArgs),
    /// List or export the conversations `furnace serve` logged (with their ratings from
    /// POST /v1/feedback) as training data for `furnace train`.
    Conversations(conversations::ConversationsArgs),
    /// Print sentence vectors of texts (a BERT-family encoder such as all-minilm-l6-v2).
    Embed(embed::EmbedArgs),
    /// Build and manage retrieval indexes of documents (split, embed, store).
    Index {
        #[command(subcommand)]
        cmd: index::IndexCmd,
    },
    /// Search an index: similarity, threshold or MMR, hybrid with BM25, metadata filters,
    /// cross-encoder reranking.
    Search(index::SearchArgs),
    /// Report CPU features, threads, cached models and versions.
    Doctor,
    /// Measure speed (prints tokens/s).
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
}

/// mimalloc reads its options once, before `main`. Keeping freed pages instead of returning
/// them to the OS (purge delay -1) avoids re-faulting and re-zeroing the large activation
/// buffers of every forward pass; it was measured to matter (PRODUCT.md). When the variable
/// is unset, set it and re-execute ourselves once.
#[cfg(unix)]
fn keep_allocator_pages() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(VAR, "-1").exec();
    // exec only returns on failure: carry on with the default allocator settings.
    eprintln!("note: could not re-execute with {VAR}=-1: {err}");
}

#[cfg(not(unix))]
fn keep_allocator_pages() {}

/// Exits quietly when stdout is a closed pipe (`furnace ... | head`), instead of reporting
/// the failed write as a crash.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    // `furnace` started as a chat-template render worker (furnace_text::sandbox): a template
    // that comes with a model renders there, so a crafted one cannot abort or exhaust furnace.
    if std::env::args_os().nth(1).is_some_and(|a| a == furnace_text::sandbox::WORKER_ARG) {
        std::process::exit(furnace_text::sandbox::serve_worker());
    }
    if let Ok(exe) = std::env::current_exe() {
        furnace_text::sandbox::install(exe);
    }
    keep_allocator_pages();
    quiet_broken_pipe();
    // Clones of evals pipelines are checked when recorded (`furnace ops`, the API).
    furnace_evals::experiment::register();
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(furnace_model::threads::physical_cores);
    furnace_model::threads::configure_threads(threads);
    let result = match cli.command {
        Command::Model { cmd } => model::run(cmd),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Index { cmd } => index::run(cmd),
        Command::Search(a) => index::search(a),
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Data(a) => data::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Adapters(a) => adapters::run(a),
        Command::Pipeline(a) => pipeline::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Train(a) => train::run(a),
        Command::Run(a) => run::run(a),
        Command::Runs(a) => runs::run(a),
        Command::Results(a) => results::run(a),
        Command::Ops(a) => ops::run(a),
        Command::Ui(a) => ui::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Conversations(a) => conversations::run(a),
        Command::Doctor => doctor::run(threads),
        Command::Bench { cmd } => bench::run(cmd),
    };
    if let Err(e) = result {
        if let Some(i) = e.downcast_ref::<interrupt::Interrupted>() {
            eprintln!("{i}");
            std::process::exit(interrupt::EXIT_CODE);
        }
        let broken_pipe =
            e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe));
        if broken_pipe {
            std::process::exit(141);
        }
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// already ends with (library errors often print their source in their own message too).
fn error_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.is_empty() {
            msg = text;
        } else if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}
