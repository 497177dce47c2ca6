//! The training spec (TOML), as in PRODUCT.md: `[experiment]`, `[data]`, `[model]`,
//! `[lora]`, `[trainer]`. Unknown keys are errors; every value is checked before training
//! starts, and an error names the exact key (`lora.r: must be > 0`).

use crate::data::{Columns, DataOptions};
use crate::error::{Error, Result};
use crate::lora::LoraInit;
use crate::optim::{AdamWConfig, ScheduleKind};
use crate::trainer::TrainConfig;
use furnace_model::lora::LoraConfig;
use furnace_model::LlamaConfig;
use furnace_model::WeightDType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[experiment]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Name (the run folder is `runs/<name>/...`).
    pub name: String,
    /// Seed of data order and LoRA init.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `fit` (train the runs; `evals` comes later).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Data chunks: runs advance chunk by chunk and are evaluated and checkpointed at each
    /// chunk boundary (default: 4, or fewer for a tiny dataset).
    pub num_chunks: Option<usize>,
    /// Automatic stopping: `none`, or `asha` (at each chunk boundary keep the best 1/eta
    /// of the runs that reached it by eval loss).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// ASHA's reduction factor.
    #[serde(default = "default_eta")]
    pub eta: usize,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training file (relative paths are relative to the spec file).
    pub train: PathBuf,
    /// Optional eval file.
    pub eval: Option<PathBuf>,
    /// Column mapping.
    #[serde(default)]
    pub columns: Columns,
    /// Loss on completion tokens only.
    #[serde(default = "yes")]
    pub completion_only: bool,
    /// Skip and count bad rows instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Alias, `.gguf` file or HF directory.
    pub base: String,
    /// How the frozen base is held: `none` (f32), `bf16`, `q8`/`q4` (kept quantized).
    #[serde(default = "default_quantize")]
    pub quantize: String,
}

/// `[lora]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// Alpha (scale alpha / r).
    pub alpha: f64,
    /// Dropout (must be 0 for now).
    #[serde(default)]
    pub dropout: f64,
    /// Target modules, or `["all-linear"]`.
    #[serde(default = "all_linear")]
    pub targets: Vec<String>,
    /// alpha / sqrt(r) scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// `kaiming` (PEFT's default) or `gaussian`.
    #[serde(default = "default_init")]
    pub init: String,
}

/// `[trainer]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerSpec {
    /// `sft` (dpo and grpo come later).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Passes over the data.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Optimizer steps (overrides epochs).
    pub max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[serde(default = "four")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Longest example in tokens.
    #[serde(default = "default_seq")]
    pub max_seq_len: usize,
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps (used when warmup_steps is 0).
    #[serde(default)]
    pub warmup_ratio: f64,
    /// `constant`, `linear` or `cosine`.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Gradient clipping (0 = off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Eval every N steps (0 = only at the start and the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Log every N steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Sample packing: fill each micro-batch with examples up to `batch_size x
    /// max_seq_len` tokens instead of `batch_size` examples (no padding, no attention
    /// across examples either way).
    #[serde(default)]
    pub packing: bool,
    /// Group examples of similar length into the same micro-batches.
    #[serde(default)]
    pub group_by_length: bool,
}

/// A whole spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `[experiment]`.
    pub experiment: ExperimentSpec,
    /// `[data]`.
    pub data: DataSpec,
    /// `[model]`.
    pub model: ModelSpec,
    /// `[lora]`.
    pub lora: LoraSpec,
    /// `[trainer]`.
    pub trainer: TrainerSpec,
    /// `[tracking]` (optional): where runs are also logged (MLflow, TensorBoard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<TrackingSpec>,
}

/// `[tracking]`: external trackers every run of the experiment is logged to, from the
/// store, without ever slowing training (`furnace run --mlflow URL --tensorboard DIR`
/// override it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingSpec {
    /// An MLflow tracking server, `http://host:port` (its REST API, `/api/2.0/mlflow`).
    pub mlflow: Option<String>,
    /// The MLflow experiment's name (default: the furnace experiment's).
    pub mlflow_experiment: Option<String>,
    /// A folder for TensorBoard event files (`DIR/<experiment>/run-<id>/`); relative paths
    /// are relative to the spec file.
    pub tensorboard: Option<PathBuf>,
}

/// The longest `tracking.mlflow` URL.
pub const MAX_URL_LEN: usize = 2048;
/// The longest `tracking.tensorboard` path.
pub const MAX_PATH_LEN: usize = 4096;
/// The longest `tracking.mlflow_experiment` name (MLflow's own limit is 500).
pub const MAX_TRACKING_NAME_LEN: usize = 256;

impl TrackingSpec {
    /// Checks every value: the URL is `http://` or `https://` with a host and no spaces or
    /// control characters, lengths are bounded, the folder is not empty.
    pub fn validate(&self) -> Result<()> {
        if let Some(url) = &self.mlflow {
            check_tracking_url(url)?;
        }
        if let Some(name) = &self.mlflow_experiment {
            if name.trim().is_empty() || name.len() > MAX_TRACKING_NAME_LEN || name.chars().any(char::is_control) {
                return Err(invalid(
                    "tracking.mlflow_experiment",
                    format!("must be 1 to {MAX_TRACKING_NAME_LEN} characters, no control characters"),
                ));
            }
        }
        if let Some(dir) = &self.tensorboard {
            let s = dir.as_os_str();
            if s.is_empty() || s.len() > MAX_PATH_LEN {
                return Err(invalid("tracking.tensorboard", format!("must be a folder path of 1 to {MAX_PATH_LEN} bytes")));
            }
        }
        Ok(())
    }
}

/// Checks an MLflow tracking URL (`tracking.mlflow`, `furnace run --mlflow`): `http://` or
/// `https://`, a host, at most [`MAX_URL_LEN`] characters, no whitespace, control
/// characters, query or fragment.
pub fn check_tracking_url(url: &str) -> Result<()> {
    let key = "tracking.mlflow";
    if url.len() > MAX_URL_LEN {
        return Err(invalid(key, format!("must be at most {MAX_URL_LEN} characters")));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.contains(['?', '#']) {
        return Err(invalid(key, format!("{url:?} must not hold spaces, control characters, '?' or '#'")));
    }
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    let host = rest.map(|r| r.split('/').next().unwrap_or("")).unwrap_or("");
    if host.is_empty() || host.starts_with(':') || host.contains('@') {
        return Err(invalid(key, format!("{url:?} is not an http:// or https:// URL with a host (http://127.0.0.1:5000)")));
    }
    Ok(())
}

fn default_seed() -> u64 {
    42
}
fn default_mode() -> String {
    "fit".into()
}
fn default_policy() -> String {
    "none".into()
}
fn default_eta() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn default_quantize() -> String {
    "none".into()
}
fn all_linear() -> Vec<String> {
    vec!["all-linear".into()]
}
fn default_init() -> String {
    "kaiming".into()
}
fn default_kind() -> String {
    "sft".into()
}
fn default_lr() -> f64 {
    2e-4
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn default_seq() -> usize {
    512
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_clip() -> f64 {
    1.0
}

/// The longest experiment name.
pub const MAX_NAME_LEN: usize = 64;

/// An experiment name becomes a folder name (`<runs>/<name>`, `<runs>/<name>_1`): letters,
/// digits, `-`, `_` and `.` (not first, so never `.`, `..` or a hidden folder), at most
/// [`MAX_NAME_LEN`] characters.
pub fn check_name(name: &str) -> Result<()> {
    let what = "must be 1 to 64 letters, digits, '-', '_' or '.' (not first), a folder name";
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(invalid("experiment.name", format!("{name:?} {what}")));
    }
    Ok(())
}

fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Spec { key: key.into(), msg: msg.into() }
}

/// The largest `lora.r`.
pub const MAX_LORA_R: usize = 4096;
/// The largest `trainer.max_seq_len` (2^20 tokens).
pub const MAX_SEQ_LEN: usize = 1 << 20;
/// The largest `trainer.batch_size`.
pub const MAX_BATCH_SIZE: usize = 65_536;
/// The largest `trainer.grad_accum`.
pub const MAX_GRAD_ACCUM: usize = 65_536;
/// The largest `experiment.num_chunks`.
pub const MAX_NUM_CHUNKS: usize = 100_000;
/// The largest `trainer.epochs`.
pub const MAX_EPOCHS: usize = 100_000;
/// The largest `trainer.max_steps` (and step counts: warmup, eval, log, save intervals).
pub const MAX_STEPS: usize = 100_000_000;
/// The largest `experiment.eta`.
pub const MAX_ETA: usize = 10_000;

/// `v` at most `max`, or the error `key: must be at most max`.
fn at_most(key: &str, v: usize, max: usize) -> Result<()> {
    if v > max {
        return Err(invalid(key, format!("must be at most {max}")));
    }
    Ok(())
}

impl Spec {
    /// Reads and validates a spec; relative data paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::SpecParse { path: path.into(), msg: e.to_string() })?;
        Self::parse(&text, path)
    }

    /// Parses and validates spec text read from `path` (which anchors relative data paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut spec: Spec = toml::from_str(text).map_err(|e| Error::SpecParse { path: path.into(), msg: e.to_string() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if spec.data.train.is_relative() {
            spec.data.train = base.join(&spec.data.train);
        }
        if let Some(e) = &spec.data.eval {
            if e.is_relative() {
                spec.data.eval = Some(base.join(e));
            }
        }
        if let Some(dir) = spec.tracking.as_mut().and_then(|t| t.tensorboard.as_mut()) {
            if dir.is_relative() && !dir.as_os_str().is_empty() {
                *dir = base.join(&*dir);
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.experiment.name)?;
        let e = &self.experiment;
        if e.mode != "fit" {
            let why = if e.mode == "evals" {
                "an evals spec is not a training spec: run it with `furnace run`".to_string()
            } else {
                format!("'{}' is not fit or evals", e.mode)
            };
            return Err(invalid("experiment.mode", why));
        }
        if e.num_chunks == Some(0) {
            return Err(invalid("experiment.num_chunks", "must be > 0"));
        }
        if e.policy != "none" && e.policy != "asha" {
            return Err(invalid("experiment.policy", format!("'{}' is not one of none, asha", e.policy)));
        }
        if e.eta < 2 {
            return Err(invalid("experiment.eta", "must be >= 2 (keep the best 1/eta of the runs at each rung)"));
        }
        at_most("experiment.eta", e.eta, MAX_ETA)?;
        at_most("experiment.num_chunks", e.num_chunks.unwrap_or(1), MAX_NUM_CHUNKS)?;
        self.weight_dtype()?;
        if self.lora.r == 0 {
            return Err(invalid("lora.r", "must be > 0"));
        }
        at_most("lora.r", self.lora.r, MAX_LORA_R)?;
        if self.lora.alpha.is_nan() || self.lora.alpha <= 0.0 {
            return Err(invalid("lora.alpha", "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return Err(invalid("lora.dropout", "must be in [0, 1)"));
        }
        self.lora_init()?;
        self.lora_config().validate().map_err(|e| invalid("lora.targets", e.to_string()))?;
        let t = &self.trainer;
        if t.kind != "sft" {
            return Err(invalid("trainer.kind", format!("'{}' is not available yet (sft only)", t.kind)));
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return Err(invalid("trainer.learning_rate", "must be > 0"));
        }
        for (k, v) in [
            ("trainer.batch_size", t.batch_size),
            ("trainer.grad_accum", t.grad_accum),
            ("trainer.max_seq_len", t.max_seq_len),
            ("trainer.log_every", t.log_every),
        ] {
            if v == 0 {
                return Err(invalid(k, "must be > 0"));
            }
        }
        if t.max_steps == Some(0) || (t.max_steps.is_none() && t.epochs == 0) {
            return Err(invalid("trainer.epochs", "epochs (or max_steps) must be > 0"));
        }
        for (k, v, max) in [
            ("trainer.batch_size", t.batch_size, MAX_BATCH_SIZE),
            ("trainer.grad_accum", t.grad_accum, MAX_GRAD_ACCUM),
            ("trainer.max_seq_len", t.max_seq_len, MAX_SEQ_LEN),
            ("trainer.epochs", t.epochs, MAX_EPOCHS),
            ("trainer.max_steps", t.max_steps.unwrap_or(1), MAX_STEPS),
            ("trainer.warmup_steps", t.warmup_steps, MAX_STEPS),
            ("trainer.eval_every", t.eval_every, MAX_STEPS),
            ("trainer.log_every", t.log_every, MAX_STEPS),
            ("trainer.save_every", t.save_every, MAX_STEPS),
        ] {
            at_most(k, v, max)?;
        }
        // Tokens of one optimizer step (and, packed, of one micro-batch): never overflows.
        t.batch_size
            .checked_mul(t.grad_accum)
            .and_then(|n| n.checked_mul(t.max_seq_len))
            .ok_or_else(|| invalid("trainer.batch_size", "batch_size x grad_accum x max_seq_len overflows"))?;
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(invalid("trainer.warmup_ratio", "must be in [0, 1)"));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 {
            return Err(invalid("trainer.weight_decay", "weight_decay and max_grad_norm must be >= 0"));
        }
        self.schedule()?;
        if let Some(t) = &self.tracking {
            t.validate()?;
        }
        Ok(())
    }

    /// Checks the spec against the model it trains, once that is loaded: `lora.r` at most
    /// the smaller dimension of every targeted projection, `trainer.max_seq_len` at most the
    /// model's context (`max_position_embeddings`).
    pub fn check_against(&self, model: &LlamaConfig) -> Result<()> {
        let q = model.num_heads.saturating_mul(model.head_dim);
        let kv = model.num_kv_heads.saturating_mul(model.head_dim);
        let (h, i) = (model.hidden_size, model.intermediate_size);
        for target in self.lora_config().targets() {
            let (d_in, d_out) = match target.as_str() {
                "q_proj" => (h, q),
                "k_proj" | "v_proj" => (h, kv),
                "o_proj" => (q, h),
                "gate_proj" | "up_proj" => (h, i),
                "down_proj" => (i, h),
                _ => continue,
            };
            let max = d_in.min(d_out);
            if self.lora.r > max {
                return Err(invalid(
                    "lora.r",
                    format!("must be at most {max} (the smaller dimension of {target}, {d_out}x{d_in}, in this model)"),
                ));
            }
        }
        let ctx = model.max_position_embeddings;
        if ctx > 0 && self.trainer.max_seq_len > ctx {
            return Err(invalid("trainer.max_seq_len", format!("must be at most {ctx} (the model's context, max_position_embeddings)")));
        }
        Ok(())
    }

    /// How the base weights are held.
    pub fn weight_dtype(&self) -> Result<WeightDType> {
        match self.model.quantize.as_str() {
            "none" | "f32" => Ok(WeightDType::F32),
            "bf16" => Ok(WeightDType::Bf16),
            "q8" | "q4" => Ok(WeightDType::Quantized),
            o => Err(invalid("model.quantize", format!("'{o}' is not one of none, bf16, q8, q4"))),
        }
    }

    fn lora_init(&self) -> Result<LoraInit> {
        match self.lora.init.as_str() {
            "kaiming" | "default" => Ok(LoraInit::KaimingUniform),
            "gaussian" => Ok(LoraInit::Gaussian),
            o => Err(invalid("lora.init", format!("'{o}' is not one of kaiming, gaussian"))),
        }
    }

    fn schedule(&self) -> Result<ScheduleKind> {
        match self.trainer.schedule.as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            o => Err(invalid("trainer.schedule", format!("'{o}' is not one of constant, linear, cosine"))),
        }
    }

    /// The PEFT LoRA config.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.lora.r,
            lora_alpha: self.lora.alpha,
            target_modules: self.lora.targets.clone(),
            use_rslora: self.lora.use_rslora,
            lora_dropout: self.lora.dropout,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            peft_type: "LORA".into(),
            use_dora: false,
            fan_in_fan_out: false,
        }
    }

    /// LoRA initialisation.
    pub fn init(&self) -> LoraInit {
        self.lora_init().unwrap_or(LoraInit::KaimingUniform)
    }

    /// Data options.
    pub fn data_options(&self) -> DataOptions {
        DataOptions {
            kind: match self.trainer.kind.as_str() {
                "dpo" => crate::data::DataKind::Preference,
                "grpo" => crate::data::DataKind::Prompt,
                _ => crate::data::DataKind::Sft,
            },
            columns: self.data.columns.clone(),
            max_seq_len: self.trainer.max_seq_len,
            completion_only: self.data.completion_only,
            skip_bad_rows: self.data.skip_bad_rows,
        }
    }

    /// The data chunks for `n` training examples: `experiment.num_chunks`, by default 4
    /// (or `n` when smaller).
    pub fn num_chunks(&self, n: usize) -> usize {
        self.experiment.num_chunks.unwrap_or(4.min(n.max(1)))
    }

    /// Trainer settings for a dataset of `n` examples.
    pub fn train_config(&self, examples: &[crate::Example]) -> TrainConfig {
        let t = &self.trainer;
        let mut cfg = TrainConfig {
            optimizer: AdamWConfig { lr: t.learning_rate, weight_decay: t.weight_decay, ..Default::default() },
            schedule: self.schedule().unwrap_or(ScheduleKind::Linear),
            warmup_steps: 0,
            batch_size: t.batch_size,
            grad_accum: t.grad_accum,
            max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
            epochs: t.epochs,
            max_steps: None,
            seed: self.experiment.seed,
            packing: t.packing.then_some(t.batch_size * t.max_seq_len),
            group_by_length: t.group_by_length,
            num_chunks: self.num_chunks(examples.len()),
            chunk_seed: self.experiment.seed,
        };
        let total = t.max_steps.unwrap_or_else(|| crate::Trainer::steps_per_epoch(&cfg, examples) * t.epochs.max(1)).max(1);
        cfg.max_steps = Some(total);
        cfg.warmup_steps = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };
        cfg
    }
}
