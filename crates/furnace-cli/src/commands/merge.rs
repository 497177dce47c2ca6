//! `furnace merge`: adapters merged into their base, exported, or combined.

use crate::args::{resolve_adapter, RunsDir};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use furnace_exp::registry;
use furnace_export::combine::{
    adapter_base_model, check_same_base, combine, save_adapter_with_base, CombineMethod, CombineOptions, MajoritySign,
};
use furnace_export::gguf::{write_gguf, GgufQuant};
use furnace_export::hf::{write_hf_with, HfDType, HfOptions};
use furnace_export::merge::BaseModel;
use furnace_model::PeftAdapter;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `furnace merge --help` adds below the options.
const AFTER_HELP: &str = "\
One adapter is merged as PEFT's merge_and_unload() does (W += alpha/r * B A; rsLoRA honoured).
Several adapters are first combined into one with PEFT's add_weighted_adapter definitions
(--weight per adapter, --method), then merged, or written as an adapter with --format adapter.
A quantized GGUF base (Q4_1, Q8_0, ...) is dequantized to f32 before the merge; the output
says what precision the base held and what was written.

Examples:
  furnace merge --base smollm2-135m-instruct --adapter runs/exp/adapter --out merged/
  furnace merge --base model.gguf --adapter A --format gguf --quant q8_0 --out merged.gguf
  furnace merge --base hf-model/ --format gguf --quant q4_k_m --out model.q4_k_m.gguf   (no adapter: a plain export)
  furnace merge --adapter A --weight 0.7 --adapter B --weight 0.3 --method ties --density 0.5 --out combined/";

/// Merges LoRA adapters into their base model and writes the result.
#[derive(Args)]
#[command(after_help = AFTER_HELP)]
pub struct MergeArgs {
    /// The base model: an alias of the model cache (pulled when needed), a `.gguf` file or
    /// an HF model directory. Required for `--format hf` and `--format gguf`.
    #[arg(long)]
    base: Option<String>,
    /// A PEFT LoRA adapter directory or a registered adapter name; repeat to combine several.
    /// Without any, `--base` is exported as it is (a format conversion: GGUF to HF, HF to a
    /// quantized GGUF), e.g. to make a model built by transformers loadable by llama.cpp.
    #[arg(long = "adapter", required_unless_present = "base")]
    adapters: Vec<String>,
    /// The weight of each adapter, in the order of `--adapter` (one per adapter; default 1.0
    /// each). PEFT's `weights` of `add_weighted_adapter`.
    #[arg(long = "weight", allow_negative_numbers = true)]
    weights: Vec<f64>,
    /// How several adapters are combined (PEFT's `combination_type`, default linear):
    /// linear (weighted sum of factors, same rank), cat (factors concatenated), ties,
    /// dare_linear, dare_ties, magnitude_prune (need --density), svd (weighted sum of full
    /// deltas truncated to --svd-rank), and ties_svd, dare_linear_svd, dare_ties_svd,
    /// magnitude_prune_svd.
    #[arg(long)]
    method: Option<CombineMethod>,
    /// Fraction of each delta kept by ties, dare_*, magnitude_prune (PEFT's `density`).
    #[arg(long)]
    density: Option<f64>,
    /// Rank of the svd combinations (default: the largest input rank).
    #[arg(long)]
    svd_rank: Option<usize>,
    /// Quantile at which the svd factors are clamped (PEFT's `svd_clamp`; default none).
    #[arg(long)]
    svd_clamp: Option<f64>,
    /// TIES' sign election (PEFT's `majority_sign_method`): total or frequency.
    #[arg(long, default_value = "total")]
    majority_sign: MajoritySign,
    /// Seed of DARE's random drop.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// What to write: hf (a model directory transformers and furnace load), gguf (a file
    /// llama.cpp and furnace load), adapter (the combined adapter, without the base).
    /// Default: hf with --base, else adapter.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Weight storage of `--format gguf`.
    #[arg(long, value_enum)]
    quant: Option<QuantArg>,
    /// dtype of the safetensors of `--format hf` (default f32: the merge exactly).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Where to write: a directory (hf, adapter) or a file (gguf).
    #[arg(long)]
    out: PathBuf,
    /// Write into an existing non-empty directory, or replace an existing GGUF file.
    #[arg(long)]
    force: bool,
    /// With `--format adapter`: register the combined adapter under this name in the
    /// adapter registry of --runs-dir (source `merge`, its inputs, weights and method
    /// recorded), so `--adapter NAME` finds it everywhere.
    #[arg(long, value_name = "NAME")]
    register: Option<String>,
    #[command(flatten)]
    runs: RunsDir,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    Hf,
    Gguf,
    Adapter,
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k_m")]
    Q4KM,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl QuantArg {
    fn quant(self) -> (GgufQuant, &'static str) {
        match self {
            QuantArg::F16 => (GgufQuant::F16, "f16"),
            QuantArg::Q8_0 => (GgufQuant::Q8_0, "q8_0"),
            QuantArg::Q4_0 => (GgufQuant::Q4_0, "q4_0"),
            QuantArg::Q4KM => (GgufQuant::Q4KM, "q4_k_m"),
        }
    }
}

impl DTypeArg {
    fn dtype(self) -> HfDType {
        match self {
            DTypeArg::F32 => HfDType::F32,
            DTypeArg::Bf16 => HfDType::Bf16,
            DTypeArg::F16 => HfDType::F16,
        }
    }
}

/// The checked plan of a merge.
struct Plan {
    format: FormatArg,
    weights: Vec<f64>,
}

fn plan(a: &MergeArgs) -> Result<Plan> {
    let format = a.format.unwrap_or(if a.base.is_some() { FormatArg::Hf } else { FormatArg::Adapter });
    if format != FormatArg::Adapter && a.base.is_none() {
        bail!("--format {} needs --base: the model the adapter is merged into", if format == FormatArg::Hf { "hf" } else { "gguf" });
    }
    if format == FormatArg::Adapter && a.base.is_some() {
        bail!("--format adapter writes the combined adapter without a base: drop --base, or choose --format hf or gguf");
    }
    if a.quant.is_some() && format != FormatArg::Gguf {
        bail!("--quant applies to --format gguf only (use --dtype for --format hf)");
    }
    if a.register.is_some() && format != FormatArg::Adapter {
        bail!("--register applies to --format adapter (a merged model is not an adapter)");
    }
    if a.dtype.is_some() && format != FormatArg::Hf {
        bail!("--dtype applies to --format hf only (use --quant for --format gguf)");
    }
    if a.adapters.is_empty() && format == FormatArg::Adapter {
        bail!("--format adapter needs at least one --adapter");
    }
    if a.adapters.is_empty() && (!a.weights.is_empty() || a.method.is_some() || a.density.is_some() || a.svd_rank.is_some()) {
        bail!("--weight, --method, --density and --svd-rank apply to adapters: give --adapter, or drop them for a plain export of --base");
    }
    let weights = if a.weights.is_empty() {
        vec![1.0; a.adapters.len()]
    } else if a.weights.len() != a.adapters.len() {
        bail!(
            "{} --weight values for {} --adapter values: give one --weight per adapter, in the same order (or none for 1.0 each)",
            a.weights.len(),
            a.adapters.len()
        );
    } else {
        a.weights.clone()
    };
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weight {w} is not a finite number");
    }
    if let Some(d) = a.density {
        if !(d > 0.0 && d <= 1.0) {
            bail!("--density {d} must be in (0, 1]");
        }
    }
    if a.adapters.len() == 1 && (a.method.is_some() || a.density.is_some() || a.svd_rank.is_some() || a.svd_clamp.is_some()) {
        bail!("--method, --density, --svd-rank and --svd-clamp combine several adapters: give more than one --adapter");
    }
    if matches!(a.svd_rank, Some(0)) {
        bail!("--svd-rank must be at least 1");
    }
    let method = a.method.unwrap_or(CombineMethod::Linear);
    if a.density.is_some() && matches!(method, CombineMethod::Linear | CombineMethod::Cat | CombineMethod::Svd) {
        bail!("--density applies to ties, dare_linear, dare_ties, magnitude_prune and their _svd forms, not to --method {method}");
    }
    let svd = matches!(
        method,
        CombineMethod::Svd
            | CombineMethod::TiesSvd
            | CombineMethod::DareLinearSvd
            | CombineMethod::DareTiesSvd
            | CombineMethod::MagnitudePruneSvd
    );
    if (a.svd_rank.is_some() || a.svd_clamp.is_some()) && !svd {
        bail!("--svd-rank and --svd-clamp apply to svd and the *_svd methods, not to --method {method}");
    }
    Ok(Plan { format, weights })
}

fn spinner(msg: String) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// Refuses to clobber `out` unless `force`.
fn check_out(out: &Path, format: FormatArg, force: bool) -> Result<()> {
    match format {
        FormatArg::Gguf => {
            if out.is_dir() {
                bail!("--out {} is a directory: --format gguf writes a file (e.g. --out merged.gguf)", out.display());
            }
            if out.exists() && !force {
                bail!("--out {} exists: choose another path, or pass --force to replace it", out.display());
            }
        }
        FormatArg::Hf | FormatArg::Adapter => {
            if out.is_file() {
                bail!(
                    "--out {} is a file: --format {} writes a directory",
                    out.display(),
                    if format == FormatArg::Hf { "hf" } else { "adapter" }
                );
            }
            let non_empty = out.is_dir() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false);
            if non_empty && !force {
                bail!("--out {} exists and is not empty: choose another directory, or pass --force to write into it", out.display());
            }
        }
    }
    Ok(())
}

pub fn run(a: MergeArgs) -> Result<()> {
    let start = Instant::now();
    let plan = plan(&a)?;
    check_out(&a.out, plan.format, a.force)?;
    if let Some(name) = &a.register {
        // The name is checked before anything is written.
        registry::check_name(name)?;
        if registry::is_run_name(name) {
            bail!("--register {name}: EXPERIMENT/run-N names are kept for the adapters of training runs; choose another name");
        }
        let store = crate::args::open_store(&a.runs)?;
        if registry::get(&store, name)?.is_some() && !a.force {
            bail!("--register {name}: an adapter of that name is registered (furnace adapters show {name}); choose another name, or pass --force to replace its record");
        }
    }

    // Adapters first: they are small, and a bad path should fail before a base is loaded.
    let mut adapters: Vec<(PathBuf, PeftAdapter)> = Vec::new();
    for given in &a.adapters {
        let dir = resolve_adapter(given, &a.runs).with_context(|| format!("--adapter {given}"))?;
        let adapter = furnace_model::load_adapter(&dir).with_context(|| format!("--adapter {given}"))?;
        eprintln!(
            "adapter {}: r={} alpha={} targets {}",
            dir.display(),
            adapter.config.r,
            adapter.config.lora_alpha,
            adapter.config.targets().join(",")
        );
        adapters.push((dir, adapter));
    }

    let labelled: Vec<(String, Option<String>)> =
        adapters.iter().map(|(dir, _)| Ok((dir.display().to_string(), adapter_base_model(dir)?))).collect::<Result<_>>()?;
    let recorded_base = check_same_base(&labelled)?;
    let combined = if adapters.len() > 1 || plan.format == FormatArg::Adapter || plan.weights.first().is_some_and(|w| *w != 1.0) {
        let method = a.method.unwrap_or(CombineMethod::Linear);
        let opts = CombineOptions {
            method,
            density: a.density,
            svd_rank: a.svd_rank,
            seed: a.seed,
            svd_clamp: a.svd_clamp,
            majority_sign: a.majority_sign,
        };
        let pairs: Vec<(&PeftAdapter, f64)> = adapters.iter().map(|(_, ad)| ad).zip(plan.weights.iter().copied()).collect();
        let pb = spinner(format!("combining {} adapters ({method})", pairs.len()));
        let c = combine(&pairs, &opts).context("combining the adapters")?;
        pb.finish_and_clear();
        let ws: Vec<String> = plan.weights.iter().map(|w| format!("{w}")).collect();
        eprintln!("combined {} adapters with {method}, weights [{}]: r={}", adapters.len(), ws.join(", "), c.config.r);
        Some(c)
    } else {
        None
    };

    if plan.format == FormatArg::Adapter {
        let Some(c) = combined else { bail!("no adapter to write") };
        save_adapter_with_base(&c, &a.out, recorded_base.as_deref())
            .with_context(|| format!("writing the adapter to {}", a.out.display()))?;
        let bytes = dir_bytes(&a.out);
        println!("wrote adapter {} ({}, r={}) in {:.1} s", a.out.display(), human_bytes(bytes), c.config.r, start.elapsed().as_secs_f64());
        if let Some(name) = &a.register {
            let inputs: Vec<String> = adapters.iter().map(|(d, _)| d.display().to_string()).collect();
            let spec = serde_json::json!({
                "method": a.method.unwrap_or(CombineMethod::Linear).to_string(),
                "adapters": inputs,
                "weights": plan.weights,
                "density": a.density,
                "svd_rank": a.svd_rank,
                "seed": a.seed,
            });
            register_merged(&a, name, recorded_base.as_deref(), spec)?;
        }
        return Ok(());
    }

    let base_name = a.base.as_deref().unwrap_or_default();
    let loc = furnace_model::resolve_name(base_name, &mut |m| eprintln!("{m}")).with_context(|| format!("--base {base_name}"))?;
    let base_path = loc.path().to_path_buf();
    let pb = spinner(format!("loading base {}", base_path.display()));
    let mut base = BaseModel::load(&base_path).with_context(|| format!("loading the base {}", base_path.display()))?;
    pb.finish_and_clear();
    eprintln!(
        "base {}: {} {} layers, hidden {}, {:.1}M parameters, stored as {}",
        base_path.display(),
        base.config.architecture,
        base.config.num_layers,
        base.config.hidden_size,
        base.num_params() as f64 / 1e6,
        base.source_precision
    );
    if base.dequantized && adapters.is_empty() {
        eprintln!("note: the base is quantized; it was dequantized to f32 before writing");
    } else if base.dequantized {
        eprintln!("note: the base is quantized; it was dequantized to f32 and the adapter merged into those f32 values");
    }

    // No adapter: the base is written as it was loaded (a plain export).
    let adapter = match (&combined, adapters.first()) {
        (Some(c), _) => Some(c),
        (None, Some((_, ad))) => Some(ad),
        (None, None) => None,
    };
    if let Some(adapter) = adapter {
        let pb = spinner("merging".into());
        let report = base.merge_adapter(adapter).context("merging the adapter into the base")?;
        pb.finish_and_clear();
        eprintln!("merged {} projections (scale {})", report.modules_merged, report.scale);
    } else {
        eprintln!("no --adapter: exporting the base unchanged");
    }

    match plan.format {
        FormatArg::Hf => {
            let dtype = a.dtype.unwrap_or(DTypeArg::F32).dtype();
            let pb = spinner(format!("writing {}", a.out.display()));
            let written = write_hf_with(&base, &a.out, HfOptions { dtype, overwrite: a.force })
                .with_context(|| format!("writing the HF directory {}", a.out.display()))?;
            pb.finish_and_clear();
            for (f, n) in &written.files {
                eprintln!("  {} ({})", f.display(), human_bytes(*n));
            }
            println!(
                "wrote HF model {} ({}, weights {}; base stored as {}) in {:.1} s",
                a.out.display(),
                human_bytes(written.bytes()),
                dtype.name(),
                base.source_precision,
                start.elapsed().as_secs_f64()
            );
        }
        FormatArg::Gguf => {
            let (quant, qname) = a.quant.unwrap_or(QuantArg::F16).quant();
            let pb = spinner(format!("writing {}", a.out.display()));
            let written = write_gguf(&base, &a.out, quant).with_context(|| format!("writing the GGUF {}", a.out.display()))?;
            pb.finish_and_clear();
            println!(
                "wrote GGUF {} ({}, {} tensors, weights {qname}; base stored as {}) in {:.1} s",
                a.out.display(),
                human_bytes(written.bytes),
                written.tensors.len(),
                base.source_precision,
                start.elapsed().as_secs_f64()
            );
        }
        FormatArg::Adapter => {}
    }
    Ok(())
}

/// Registers the adapter written at `--out` as `name` (source `merge`).
fn register_merged(a: &MergeArgs, name: &str, base: Option<&str>, spec: serde_json::Value) -> Result<()> {
    let store = crate::args::open_store(&a.runs)?;
    let path = std::fs::canonicalize(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let mut peft = registry::peft_settings(&path)?;
    let from_config = peft.remove("base_model_name_or_path").and_then(|b| b.as_str().map(String::from));
    let Some(base) = base.map(String::from).or(from_config).filter(|b| !b.is_empty()) else {
        bail!("--register: the combined adapters name no base model (adapter_config.json's base_model_name_or_path); register it with `furnace adapters register {} --base MODEL`", a.out.display());
    };
    let new = registry::NewAdapter {
        name: name.to_string(),
        path,
        base,
        source: "merge".into(),
        spec,
        peft: serde_json::Value::Object(peft),
        metrics: serde_json::Value::Object(Default::default()),
        ..Default::default()
    };
    registry::register(&store, &new, a.force).with_context(|| format!("--register {name}"))?;
    println!("registered as {name} (furnace adapters show {name})");
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}
