//! `furnace serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, `/v1/models`) over one resident base, every adapter named on the
//! command line or trained by an experiment, and embedding models; the dashboard and the
//! experiment API on the same port. Until Ctrl-C.

use crate::args::{existing_store, open_store, resolve_adapter, RunsDir, ServerArgs};
use crate::models::load;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_generate::{EngineHandle, EngineOptions, ServiceOptions};
use furnace_model::WeightDType;
use furnace_rag::SentenceEncoder;
use furnace_server::openai::{RagSettings, ServeLimits, Serving};
use furnace_server::ServerOptions;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// The base model: an alias (pulled on first use), a .gguf file, or an HF model
    /// directory. Default: the base of the --experiment, else smollm2-135m-instruct.
    #[arg(long, short)]
    model: Option<String>,
    /// The id clients give as `model` for the base (default: --model as given).
    #[arg(long)]
    name: Option<String>,
    /// How the base's weights are held: quantized (fastest decode), bf16 or f32.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Serve a LoRA adapter (repeat for more): NAME=DIR serves a PEFT directory (or a
    /// registered adapter's name or tag in place of DIR) as model NAME; a bare NAME serves
    /// the adapter registered under that name (or the one with that tag) under its
    /// registered name (`furnace adapters list`).
    #[arg(long = "adapter", value_name = "NAME[=DIR]")]
    adapters: Vec<String>,
    /// Also serve every adapter in the registry of --runs-dir whose base is the served
    /// model (the same model name: an alias, hub id or file of it), each under its
    /// registered name; one that fails to load is skipped with a note.
    #[arg(long)]
    registered: bool,
    /// Serve every completed run of this experiment (in --runs-dir) as model EXPERIMENT/run-N
    /// (repeat for more).
    #[arg(long = "experiment", value_name = "NAME")]
    experiments: Vec<String>,
    /// Serve a sentence encoder on /v1/embeddings under the name given (an alias such as
    /// all-minilm-l6-v2, or a sentence-transformers directory; repeat for more).
    #[arg(long = "embedding-model", value_name = "NAME")]
    embedding_models: Vec<String>,
    /// The sentence encoder of document collections (/v1/documents, `rag:NAME` models),
    /// loaded on first use. Collections are kept in RUNS_DIR/collections.
    #[arg(long, default_value = "all-minilm-l6-v2", value_name = "NAME")]
    rag_encoder: String,
    /// A cross-encoder for `rerank` in document queries and retrieval chats.
    #[arg(long, value_name = "NAME")]
    reranker: Option<String>,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Memory for the KV of prompt prefixes that later requests share (a system prompt, a
    /// RAG template, earlier turns), in MiB; 0 turns the prefix cache off.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    prefix_cache: usize,
    /// Most requests (choices) queued or running; beyond it requests get 429 Too Many Requests.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Most adapters resident in the model at once (others are read again when asked for).
    #[arg(long, default_value_t = 8)]
    max_adapters: usize,
    /// Seconds a request may run; past it, it ends as if it reached max_tokens.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes), which
    /// read an adapter from a path the request names.
    #[arg(long)]
    allow_adapter_loading: bool,
    /// Do not log conversations. By default every finished chat completion is stored in
    /// --runs-dir's furnace.db (id, time, model and adapter, the request's messages, each
    /// choice's text and tool calls, retrieval sources, token counts, latency) for
    /// POST /v1/feedback ratings and `furnace conversations list|export`.
    #[arg(long)]
    no_log: bool,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    dir: RunsDir,
}

/// `NAME=DIR` (DIR a PEFT directory, or a registered name or tag), or `NAME` (a registered
/// name or tag, served under its registered name).
fn parse_adapter(s: &str, dir: &RunsDir) -> Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((name, given)) if !name.is_empty() && !given.is_empty() => {
            Ok((name.to_string(), resolve_adapter(given, dir).with_context(|| format!("--adapter {s}"))?))
        }
        None if !s.is_empty() => {
            let store =
                existing_store(dir).with_context(|| format!("--adapter {s}: a bare NAME is a registered adapter; else give NAME=DIR"))?;
            let rec = furnace_exp::registry::resolve(&store, s).with_context(|| format!("--adapter {s}"))?;
            Ok((rec.name, rec.path))
        }
        _ => bail!("--adapter takes NAME=DIR (a PEFT adapter directory) or a registered adapter's NAME, got '{s}'"),
    }
}

/// The registered adapters whose base is `model`, as (name, directory), leaving out names
/// in `taken` and adapters whose files are gone (with a note).
fn registered_adapters(dir: &RunsDir, model: &str, taken: &[String]) -> Result<Adapters> {
    let store = open_store(dir)?;
    let filter = furnace_exp::registry::AdapterFilter { base: Some(model.to_string()), tag: None };
    let mut out = Vec::new();
    for rec in furnace_exp::registry::list(&store, &filter)? {
        if taken.contains(&rec.name) {
            continue;
        }
        if !rec.path.join("adapter_config.json").is_file() {
            eprintln!("note: registered adapter {} is gone from {}: skipped", rec.name, rec.path.display());
            continue;
        }
        out.push((rec.name, rec.path));
    }
    if out.is_empty() && taken.is_empty() {
        eprintln!("note: --registered: no registered adapter has base {model} (`furnace adapters list` shows their bases)");
    }
    Ok(out)
}

/// How long a stopping server answers 503 to new requests while running ones finish.
const DRAIN: Duration = Duration::from_secs(10);

/// Adapters to serve: (model name, PEFT directory).
type Adapters = Vec<(String, PathBuf)>;

/// The base and adapter directories of an experiment's completed runs, named `EXP/run-N`.
fn experiment_adapters(dir: &RunsDir, name: &str) -> Result<(Option<String>, Adapters)> {
    let store = open_store(dir)?;
    let e = store.experiment(name).with_context(|| format!("--experiment {name}"))?;
    let mut base = None;
    let mut out = Vec::new();
    for run in store.runs(e.id)? {
        if run.status != furnace_exp::RunStatus::Completed {
            continue;
        }
        let adapter = furnace_exp::fit::run_dir(&e, run.id).join("adapter");
        if !adapter.join("adapter_config.json").is_file() {
            continue;
        }
        if let Some(b) = run.config.pointer("/model/base").and_then(|b| b.as_str()) {
            match &base {
                None => base = Some(b.to_string()),
                Some(first) if first != b => {
                    bail!("experiment {name} trained on two bases ({first} and {b}): serve each with its own furnace serve")
                }
                Some(_) => {}
            }
        }
        out.push((format!("{name}/run-{}", run.id), adapter));
    }
    if out.is_empty() {
        bail!("experiment {name} has no completed run with an adapter to serve yet");
    }
    Ok((base, out))
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.max_queue == 0 || a.max_adapters == 0 {
        bail!("--max-batch, --max-queue and --max-adapters must be at least 1");
    }
    let mut adapters: Adapters = a.adapters.iter().map(|s| parse_adapter(s, &a.dir)).collect::<Result<_>>()?;
    let mut experiment_base = None;
    for name in &a.experiments {
        let (base, runs) = experiment_adapters(&a.dir, name)?;
        if let (Some(b), Some(m)) = (&base, &a.model) {
            if b != m {
                eprintln!("note: experiment {name} trained on {b}; serving its adapters on --model {m}");
            }
        }
        experiment_base = experiment_base.or(base);
        adapters.extend(runs);
    }
    let model = a.model.clone().or(experiment_base).unwrap_or_else(|| crate::args::DEFAULT_MODEL.to_string());
    let model_name = a.name.clone().unwrap_or_else(|| model.clone());
    let from_registry = if a.registered {
        let taken: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
        registered_adapters(&a.dir, &model, &taken)?
    } else {
        Vec::new()
    };
    let opts = ServerOptions { ..a.server.options()? };

    eprintln!("loading {model} ({:?})", a.dtype);
    let loaded = load(&model, a.dtype)?;
    let context_len = loaded.model.config.max_position_embeddings;
    let service = ServiceOptions {
        engine: EngineOptions { max_batch: a.max_batch, prefix_cache_bytes: a.prefix_cache << 20, ..EngineOptions::default() },
        max_adapters: a.max_adapters,
    };
    let engine = EngineHandle::spawn(loaded.model, &loaded.tokenizer, service)?;
    for (name, dir) in &adapters {
        if *name == model_name {
            bail!("adapter name {name} is the base's name: pick another");
        }
        engine.load_adapter(name, dir).with_context(|| format!("--adapter {name}={}", dir.display()))?;
        eprintln!("adapter {name} from {}", dir.display());
    }
    for (name, dir) in from_registry {
        if name == model_name {
            eprintln!("note: registered adapter {name} has the base's name: skipped");
            continue;
        }
        match engine.load_adapter(&name, &dir) {
            Ok(_) => {
                eprintln!("adapter {name} from {} (registered)", dir.display());
                adapters.push((name, dir));
            }
            Err(e) => eprintln!("note: registered adapter {name} ({}) did not load: {e}; skipped", dir.display()),
        }
    }
    let mut embedders = BTreeMap::new();
    for name in &a.embedding_models {
        let encoder = SentenceEncoder::load(name, &mut |line| eprintln!("{line}")).with_context(|| format!("--embedding-model {name}"))?;
        eprintln!("embedding model {name} ({} dimensions)", encoder.dim());
        embedders.insert(name.clone(), Arc::new(encoder));
    }
    let limits = ServeLimits {
        max_in_flight: a.max_batch + a.max_queue,
        request_timeout: Duration::from_secs(a.request_timeout.max(1)),
        allow_adapter_loading: a.allow_adapter_loading,
        log: !a.no_log,
    };
    let rag = RagSettings {
        index_root: a.dir.runs_dir.join("collections").join("indexes"),
        collections_dir: a.dir.runs_dir.join("collections"),
        encoder: a.rag_encoder.clone(),
        reranker: a.reranker.clone(),
    };
    let serving = Arc::new(
        Serving::new(model_name.clone(), engine.clone(), loaded.tokenizer, loaded.chat_template, context_len, embedders, limits)
            .with_rag(rag),
    );
    let store = open_store(&a.dir)?;
    let events = furnace_exp::events::channel();
    let server = furnace_server::start(store.path().to_path_buf(), ServerOptions { serving: Some(serving.clone()), ..opts }, events)?;
    eprintln!(
        "serving {model_name} on http://{}/v1 (OpenAI-compatible; {} adapter{}; Ctrl-C to stop)",
        super::launch::dashboard_host(server.addr),
        adapters.len(),
        if adapters.len() == 1 { "" } else { "s" }
    );
    let cancel = crate::interrupt::install_saying(
        "stopping: new requests get 503, running ones have 10 s to finish (Ctrl-C again to exit at once)",
    )?;
    while !cancel.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Drain: new requests get 503 (clients retry elsewhere) while running ones finish, for
    // up to DRAIN; then the server stops (its own grace cuts what is left).
    serving.drain();
    let drained = std::time::Instant::now();
    while serving.in_flight() > 0 && drained.elapsed() < DRAIN {
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shutdown();
    engine.shutdown()?;
    Ok(())
}
