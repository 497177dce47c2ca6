//! Arguments several commands share, and their conversion into library options
//! (low-level args → high-level options: `SamplingArgs → SamplingParams`, `RunsDir → Store`).

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_exp::Store;
use furnace_generate::SamplingParams;
use std::path::PathBuf;

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Args)]
pub struct ModelArg {
    /// Model: an alias (pulled on first use), a .gguf file, or an HF model directory.
    #[arg(long, short, default_value = DEFAULT_MODEL)]
    pub model: String,
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
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_at_eos: !self.ignore_eos,
            ..SamplingParams::default()
        }
    }
}

/// Where the store and experiment folders live.
#[derive(Args, Clone)]
pub struct RunsDir {
    /// Folder holding the store (furnace.db) and one folder per experiment.
    #[arg(long, default_value = "runs", global = true)]
    pub runs_dir: PathBuf,
}

/// A size such as `8G`, `512M` or `1000000` in bytes.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = match t.trim_end_matches('B').chars().last() {
        Some('K') => (&t[..t.trim_end_matches('B').len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 20),
        Some('G') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 30),
        Some('T') => (&t[..t.trim_end_matches('B').len() - 1], 1 << 40),
        _ => (t.trim_end_matches('B'), 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size like 8G, 512M or 1000000"))?;
    if v.is_nan() || v <= 0.0 {
        return Err(format!("'{s}' must be > 0"));
    }
    Ok((v * mult as f64) as u64)
}

/// The store in the runs folder (created if missing).
pub fn open_store(dir: &RunsDir) -> Result<Store> {
    Store::open_in(&dir.runs_dir).with_context(|| format!("opening the store in {}", dir.runs_dir.display()))
}

/// The store of an existing runs folder (the views and ops never create one).
pub fn existing_store(dir: &RunsDir) -> Result<Store> {
    let db = dir.runs_dir.join(furnace_exp::store::DB_FILE);
    if !db.exists() {
        bail!(
            "no experiments in {} (no {}): start one with `furnace run spec.toml`, or point --runs-dir at its folder",
            dir.runs_dir.display(),
            db.display()
        );
    }
    open_store(dir)
}

/// Where and how the HTTP server (API and dashboard) listens: `furnace run` and
/// `furnace ui` share these.
#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Address of the server (API and dashboard).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port of the server (0: any free port).
    #[arg(long, default_value_t = furnace_server::DEFAULT_PORT)]
    pub port: u16,
    /// Bearer token the API and the dashboard's login require (needed to bind anything but
    /// loopback). Shows in `ps`: prefer --token-file or FURNACE_TOKEN. Precedence: --token,
    /// --token-file, FURNACE_TOKEN.
    #[arg(long)]
    pub token: Option<String>,
    /// Read the token from this file (surrounding whitespace dropped).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Let specs, clones and the playground reached through the server name any model
    /// path as the base (by default only built-in model aliases, so a request cannot make
    /// furnace read a file of its choice).
    #[arg(long)]
    pub allow_model_paths: bool,
    /// Let web pages of this origin (https://app.example.com) call the server from a
    /// browser: they get CORS headers (repeat for more). None by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
}

impl ServerArgs {
    /// The server's options (the token from the flags or the environment), checked.
    pub fn options(&self) -> Result<furnace_server::ServerOptions> {
        let env = match std::env::var(furnace_server::TOKEN_ENV) {
            Ok(t) => Some(t),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => bail!("{} is not valid UTF-8", furnace_server::TOKEN_ENV),
        };
        let token = furnace_server::resolve_token(self.token.clone(), self.token_file.as_deref(), env)?;
        let opts = furnace_server::ServerOptions {
            addr: std::net::SocketAddr::new(self.host, self.port),
            token,
            allow_model_paths: self.allow_model_paths,
            cors_origins: self.cors_origins.clone(),
            ..Default::default()
        };
        furnace_server::check_options(&opts)?;
        Ok(opts)
    }
}

/// Resolves what a user gave as an adapter: a PEFT adapter directory (one holding
/// adapter_config.json), else a name in the adapter registry of `runs_dir` (`furnace
/// adapters`), else a tag that names one registered adapter. Errors say what was tried,
/// the closest registered names and how to register.
pub fn resolve_adapter(given: &str, runs_dir: &RunsDir) -> Result<std::path::PathBuf> {
    let path = std::path::Path::new(given);
    if path.join("adapter_config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let db = runs_dir.runs_dir.join(furnace_exp::store::DB_FILE);
    let folder_note = if path.is_dir() {
        format!("{given} is a folder without adapter_config.json, so not a PEFT adapter directory; ")
    } else {
        String::new()
    };
    if !db.exists() {
        bail!(
            "{folder_note}no adapter directory or registered adapter '{given}': no registry in {} yet (point --runs-dir at the runs folder, \
             or register a PEFT directory with `furnace adapters register PATH --name NAME`)",
            runs_dir.runs_dir.display()
        );
    }
    let store = open_store(runs_dir)?;
    let rec = furnace_exp::registry::resolve(&store, given).map_err(|e| anyhow::anyhow!("{folder_note}{e}"))?;
    if !rec.path.join("adapter_config.json").is_file() {
        bail!(
            "adapter '{}' is registered at {}, which holds no adapter_config.json any more: register it again, or `furnace adapters rm {}`",
            rec.name,
            rec.path.display(),
            rec.name
        );
    }
    Ok(rec.path)
}
