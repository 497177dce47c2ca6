//! The training spec (TOML), as in PRODUCT.md: `[experiment]`, `[data]`, `[model]`,
//! `[lora]`, `[trainer]`. Unknown keys are errors; every value is checked before training
//! starts, and an error names the exact key (`lora.r: must be > 0`).

use crate::data::{Columns, DataOptions};
use crate::error::{Error, Result};
use crate::lora::LoraInit;
use crate::optim::{AdamWConfig, ScheduleKind};
use crate::trainer::{Objective, TrainConfig};
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
    /// The policy steering the runs at chunk boundaries: `none`; `asha` (at each rung,
    /// `min_chunks · eta^k` chunks, keep the best 1/eta of the runs that reached it by eval
    /// loss; docs/search.md); or `pbt` (population-based training: at every `pbt_interval`
    /// chunks the worst `pbt_fraction` of the runs stop and warm clones of the best, with
    /// perturbed knobs, take their place).
    #[serde(default = "default_policy")]
    pub policy: String,
    /// ASHA's reduction factor.
    #[serde(default = "default_eta")]
    pub eta: usize,
    /// ASHA's minimum resource: the chunks every run trains before its first rung (rungs
    /// at `min_chunks`, `min_chunks · eta`, `min_chunks · eta²`, ... chunks).
    #[serde(default = "one")]
    pub min_chunks: usize,
    /// PBT: chunks between two exploit steps.
    #[serde(default = "one")]
    pub pbt_interval: usize,
    /// PBT: the fraction of the runs at a boundary that are replaced (the worst), and
    /// the fraction whose clones replace them (the best); in (0, 0.5].
    #[serde(default = "default_pbt_fraction")]
    pub pbt_fraction: f64,
    /// PBT: how far a clone's knobs move from its parent's (each numeric knob times
    /// `1 - perturb` or `1 + perturb`, drawn with the seed); in (0, 1).
    #[serde(default = "default_perturb")]
    pub perturb: f64,
    /// PBT: the most runs the experiment may hold, clones included (default: 4 × the runs
    /// it starts with); once reached the worst runs are no longer replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runs: Option<usize>,
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
    /// `sft`, `dpo` (preference pairs) or `grpo` (prompts, sampled completions, rewards).
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
    /// DPO and GRPO: the KL / implicit-reward coefficient (DPO default 0.1, GRPO 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// DPO: `sigmoid` (default), `hinge`, `ipo`, `robust`, `sigmoid_norm`, `sft`, or a list
    /// of them combined with `loss_weights`; GRPO: `grpo`, `bnpo`, `dr_grpo`, `dapo`
    /// (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_type: Option<OneOrMany>,
    /// DPO: the weight of each loss of `loss_type` (default 1 each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// DPO: label noise of the `robust` loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// DPO: a PEFT adapter whose model is the reference (default: the base model alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_adapter: Option<PathBuf>,
    /// GRPO: completions sampled per prompt (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_generations: Option<usize>,
    /// GRPO: sampling temperature (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// GRPO: nucleus sampling (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// GRPO: top-k sampling (default 0, off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// GRPO: the longest completion in tokens (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_length: Option<usize>,
    /// GRPO: clipping of the importance ratio (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// GRPO: upper clipping bound (default: `epsilon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// GRPO: `group` (default), `batch` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_rewards: Option<String>,
    /// GRPO: optimizer steps per sampled batch (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_iterations: Option<usize>,
    /// GRPO: weights of the `[[reward]]`s, in order (default: each table's `weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_weights: Option<Vec<f64>>,
    /// GRPO: multiply the KL term by the importance ratio (default true, as TRL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bias_correction_kl: Option<bool>,
    /// A user function (`"python:NAME"`, [`crate::hooks`]) applied to the rows of the train
    /// and eval files before they are encoded: `{"rows": [...]}` in, `{"rows": [...]}` out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatting: Option<String>,
    /// SFT: a user function (`"python:NAME"`) scoring greedy completions of the eval
    /// prompts at every evaluation: `{"predictions", "labels", "prompts"}` in,
    /// `{"NAME": number, ...}` out, each stored as `eval_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_metrics: Option<String>,
}

/// A string or a list of strings (`loss_type = "sigmoid"` or `["sigmoid", "sft"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The names.
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
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
    /// `[[reward]]` (GRPO): the reward functions.
    #[serde(default, rename = "reward", skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<crate::rewards::RewardSpec>,
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
fn default_pbt_fraction() -> f64 {
    0.25
}
fn default_perturb() -> f64 {
    0.2
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
/// The longest user function name (`trainer.formatting`, `trainer.compute_metrics`).
pub const MAX_HOOK_NAME_LEN: usize = 256;
/// New tokens of each greedy eval completion of `trainer.compute_metrics` without
/// `trainer.max_completion_length`.
pub const DEFAULT_METRIC_COMPLETION_LENGTH: usize = 64;

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
        if let Some(dir) = spec.trainer.reference_adapter.as_mut() {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        for r in &mut spec.rewards {
            anchor_reward(r, base);
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
        if !["none", "asha", "pbt"].contains(&e.policy.as_str()) {
            return Err(invalid("experiment.policy", format!("'{}' is not one of none, asha, pbt", e.policy)));
        }
        if e.min_chunks == 0 {
            return Err(invalid("experiment.min_chunks", "must be >= 1 (the chunks before ASHA's first rung)"));
        }
        at_most("experiment.min_chunks", e.min_chunks, MAX_NUM_CHUNKS)?;
        if e.pbt_interval == 0 {
            return Err(invalid("experiment.pbt_interval", "must be >= 1 (chunks between two PBT exploit steps)"));
        }
        at_most("experiment.pbt_interval", e.pbt_interval, MAX_NUM_CHUNKS)?;
        if !(e.pbt_fraction > 0.0 && e.pbt_fraction <= 0.5) {
            return Err(invalid("experiment.pbt_fraction", format!("{} is not in (0, 0.5]", e.pbt_fraction)));
        }
        if !(e.perturb > 0.0 && e.perturb < 1.0) {
            return Err(invalid("experiment.perturb", format!("{} is not in (0, 1)", e.perturb)));
        }
        if e.max_runs == Some(0) {
            return Err(invalid("experiment.max_runs", "must be >= 1"));
        }
        at_most("experiment.max_runs", e.max_runs.unwrap_or(1), crate::knobs::MAX_RUNS)?;
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
        self.objective()?;
        if t.kind != "sft" && t.packing {
            return Err(invalid("trainer.packing", format!("packing is for SFT; kind = \"{}\" trains on whole sequences", t.kind)));
        }
        if t.kind == "grpo" && t.group_by_length {
            return Err(invalid("trainer.group_by_length", "GRPO's lengths are known only after sampling"));
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
        self.check_hooks()?;
        if let Some(t) = &self.tracking {
            t.validate()?;
        }
        Ok(())
    }

    /// Checks the user-function keys: `trainer.formatting` and `trainer.compute_metrics`
    /// name a function (`"python:NAME"`); compute_metrics needs eval data (its kind and
    /// `max_completion_length` are checked by [`Spec::objective`]). Whether the function is
    /// registered is known only when a run uses it (the run fails then, not the spec).
    fn check_hooks(&self) -> Result<()> {
        let t = &self.trainer;
        for (key, value) in [("trainer.formatting", &t.formatting), ("trainer.compute_metrics", &t.compute_metrics)] {
            if let Some(name) = value {
                if !crate::hooks::is_hook_name(name) || name.len() > MAX_HOOK_NAME_LEN {
                    return Err(invalid(
                        key,
                        format!("{name:?} is not a user function name: \"<scheme>:<name>\" (\"python:my_func\"), at most {MAX_HOOK_NAME_LEN} characters"),
                    ));
                }
            }
        }
        if t.compute_metrics.is_some() && self.data.eval.is_none() {
            return Err(invalid("trainer.compute_metrics", "needs eval data: give [data] eval"));
        }
        if let Some(n) = t.max_completion_length {
            if t.kind == "sft" && n == 0 {
                return Err(invalid("trainer.max_completion_length", "must be > 0"));
            }
            at_most("trainer.max_completion_length", n, MAX_SEQ_LEN)?;
        }
        Ok(())
    }

    /// SFT with `trainer.compute_metrics`: the most new tokens of each greedy eval
    /// completion (`trainer.max_completion_length`, default 64).
    pub fn metric_completion_length(&self) -> usize {
        self.trainer.max_completion_length.unwrap_or(DEFAULT_METRIC_COMPLETION_LENGTH)
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
        if let Ok(Objective::Grpo(g)) = self.objective() {
            if ctx > 0 && self.trainer.max_seq_len + g.max_completion_length > ctx {
                return Err(invalid(
                    "trainer.max_completion_length",
                    format!("max_seq_len (the longest prompt) + max_completion_length must be at most {ctx}, the model's context"),
                ));
            }
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
            formatting: self.trainer.formatting.clone(),
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
            objective: self.objective().unwrap_or_default(),
        };
        let total = t.max_steps.unwrap_or_else(|| crate::Trainer::steps_per_epoch(&cfg, examples) * t.epochs.max(1)).max(1);
        cfg.max_steps = Some(total);
        cfg.warmup_steps = if t.warmup_steps > 0 { t.warmup_steps } else { (t.warmup_ratio * total as f64).ceil() as usize };
        cfg
    }
}

/// Keys of `[trainer]` that a stored config (the spec as JSON) holds only when they were
/// given: the DPO and GRPO settings. A clone may set one its parent's config lacks.
pub const OPTIONAL_TRAINER_KEYS: [&str; 18] = [
    "beta",
    "loss_type",
    "loss_weights",
    "label_smoothing",
    "reference_adapter",
    "num_generations",
    "temperature",
    "top_p",
    "top_k",
    "max_completion_length",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "num_iterations",
    "reward_weights",
    "use_bias_correction_kl",
    "formatting",
    "compute_metrics",
];

/// Keys of `[trainer]` that only DPO uses, only GRPO uses, and both.
const DPO_KEYS: [&str; 4] = ["loss_weights", "label_smoothing", "reference_adapter", "loss_type"];
const GRPO_KEYS: [&str; 11] = [
    "use_bias_correction_kl",
    "num_generations",
    "temperature",
    "top_p",
    "top_k",
    "max_completion_length",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "num_iterations",
    "reward_weights",
];

impl Spec {
    /// The DPO/GRPO keys of `[trainer]` that were given (they are serialized only then).
    fn given_trainer_keys(&self) -> Vec<&'static str> {
        let given = serde_json::to_value(&self.trainer).unwrap_or_default();
        OPTIONAL_TRAINER_KEYS.iter().copied().filter(|k| given.get(k).is_some()).collect()
    }

    /// What the trainer optimises, from `trainer.kind` and its settings (checked: a setting
    /// of another kind, a bad value or a missing `[[reward]]` is an error naming its key).
    pub fn objective(&self) -> Result<Objective> {
        let t = &self.trainer;
        let kind = t.kind.as_str();
        let foreign = |k: &str| match (kind, k) {
            (_, "formatting") => false,
            ("sft", "compute_metrics") => false,
            (_, "compute_metrics") => true,
            // The greedy completions of compute_metrics are that long.
            ("sft", "max_completion_length") => t.compute_metrics.is_none(),
            ("sft", _) => true,
            ("dpo", _) => GRPO_KEYS.contains(&k),
            _ => DPO_KEYS.contains(&k) && k != "loss_type",
        };
        if let Some(k) = self.given_trainer_keys().into_iter().find(|k| foreign(k)) {
            let why = match k {
                "compute_metrics" => format!("is for kind = \"sft\" (its eval completions), not \"{kind}\""),
                "max_completion_length" if kind == "sft" => {
                    "is for kind = \"sft\" only with trainer.compute_metrics (the length of its eval completions)".to_string()
                }
                _ => format!("is not a setting of kind = \"{kind}\""),
            };
            return Err(invalid(&format!("trainer.{k}"), why));
        }
        if kind != "grpo" && !self.rewards.is_empty() {
            return Err(invalid("reward", format!("[[reward]] tables are for kind = \"grpo\", not \"{kind}\"")));
        }
        match kind {
            "sft" => Ok(Objective::Sft),
            "dpo" => {
                let names = t.loss_type.as_ref().map(OneOrMany::names).unwrap_or_else(|| vec!["sigmoid".into()]);
                let mut losses = Vec::new();
                for n in &names {
                    let l = crate::dpo::DpoLoss::parse(n).ok_or_else(|| {
                        invalid("trainer.loss_type", format!("'{n}' is not one of {}", crate::dpo::DpoLoss::NAMES.join(", ")))
                    })?;
                    losses.push(l);
                }
                let weights = t.loss_weights.clone().unwrap_or_else(|| vec![1.0; losses.len()]);
                if weights.len() != losses.len() {
                    return Err(invalid("trainer.loss_weights", format!("{} weights for {} loss types", weights.len(), losses.len())));
                }
                let cfg = crate::dpo::DpoConfig {
                    beta: t.beta.unwrap_or(0.1),
                    losses: losses.into_iter().zip(weights).collect(),
                    label_smoothing: t.label_smoothing.unwrap_or(0.0),
                };
                cfg.validate()?;
                Ok(Objective::Dpo(cfg))
            }
            "grpo" => {
                use crate::grpo::{GrpoConfig, GrpoLoss, ScaleRewards};
                let d = GrpoConfig::default();
                let loss = match &t.loss_type {
                    None => d.loss_type,
                    Some(OneOrMany::One(n)) => GrpoLoss::parse(n)
                        .ok_or_else(|| invalid("trainer.loss_type", format!("'{n}' is not one of {}", GrpoLoss::NAMES.join(", "))))?,
                    Some(OneOrMany::Many(_)) => return Err(invalid("trainer.loss_type", "GRPO takes one loss type")),
                };
                let scale = match &t.scale_rewards {
                    None => d.scale_rewards,
                    Some(n) => ScaleRewards::parse(n).ok_or_else(|| {
                        invalid("trainer.scale_rewards", format!("'{n}' is not one of {}", ScaleRewards::NAMES.join(", ")))
                    })?,
                };
                if self.rewards.is_empty() {
                    return Err(invalid(
                        "reward",
                        "GRPO needs at least one [[reward]] table (kind = \"numeric\", \"regex\", \"xml_format\", ...)",
                    ));
                }
                for (i, r) in self.rewards.iter().enumerate() {
                    r.validate(&format!("reward[{i}]"))?;
                }
                if let Some(w) = &t.reward_weights {
                    if w.len() != self.rewards.len() {
                        return Err(invalid(
                            "trainer.reward_weights",
                            format!("{} weights for {} [[reward]] tables", w.len(), self.rewards.len()),
                        ));
                    }
                }
                let epsilon = t.epsilon.unwrap_or(d.epsilon_low);
                let cfg = GrpoConfig {
                    num_generations: t.num_generations.unwrap_or(d.num_generations),
                    temperature: t.temperature.unwrap_or(d.temperature),
                    top_p: t.top_p.unwrap_or(d.top_p),
                    top_k: t.top_k.unwrap_or(d.top_k),
                    max_completion_length: t.max_completion_length.unwrap_or(d.max_completion_length),
                    beta: t.beta.unwrap_or(0.0),
                    epsilon_low: epsilon,
                    epsilon_high: t.epsilon_high.unwrap_or(epsilon),
                    loss_type: loss,
                    scale_rewards: scale,
                    num_iterations: t.num_iterations.unwrap_or(1),
                    reward_weights: t.reward_weights.clone(),
                    use_bias_correction_kl: t.use_bias_correction_kl.unwrap_or(true),
                };
                cfg.validate()?;
                at_most("trainer.num_generations", cfg.num_generations, 1024)?;
                at_most("trainer.max_completion_length", cfg.max_completion_length, MAX_SEQ_LEN)?;
                at_most("trainer.num_iterations", cfg.num_iterations, 1024)?;
                Ok(Objective::Grpo(cfg))
            }
            o => Err(invalid("trainer.kind", format!("'{o}' is not one of sft, dpo, grpo"))),
        }
    }
}

/// Makes a `[[reward]]`'s relative program path (one with a `/`) and schema file absolute,
/// against the spec's folder, so the spec stored with a run reads the same files later.
fn anchor_reward(r: &mut crate::rewards::RewardSpec, base: &Path) {
    let join = |p: &str| base.join(p).to_string_lossy().into_owned();
    if let Some(p) = r.program.as_mut().and_then(|p| p.first_mut()) {
        if p.contains('/') && Path::new(p.as_str()).is_relative() {
            *p = join(p);
        }
    }
    if let Some(serde_json::Value::String(p)) = r.schema.as_mut() {
        if Path::new(p.as_str()).is_relative() {
            *p = join(p);
        }
    }
}
