//! `run_fit`: trains the runs of an experiment chunk by chunk.
//!
//! Each round takes the runs that made the least progress (fewest chunks done) from one
//! group of runs sharing a base model and quantization, admits as many as fit the memory
//! budget, and trains them one chunk further with fused steps (one pass over the frozen
//! base for all of them). Ops recorded in the store are applied before every optimizer
//! step. At the end of its chunk each run is evaluated and checkpointed (atomically); the
//! policy (ASHA) may stop some. Groups of different bases take turns at chunk boundaries,
//! swapping the loaded model.
//!
//! Durability: metrics and progress go to the store with every step, in one transaction;
//! an op's effect and its applied mark are one transaction; a checkpoint is a new folder,
//! complete before the store names it, and the folder the store names is never
//! overwritten. After a crash, [`run_fit`] sweeps half-written folders, rewinds each
//! unfinished run to its checkpoint (dropping the later metrics, which it computes again)
//! and takes again an ASHA decision the crash cut off, so nothing is lost or doubled
//! (ARCHITECTURE.md, Invariants).
//!
//! Failures stay inside the run that failed: an error building, evaluating,
//! checkpointing or finishing one run (its data, a user function it names that fails or is
//! not registered: `trainer.formatting`, `trainer.compute_metrics`, a `function` reward),
//! a loss that becomes NaN or infinite, a stored config that does not read, or a run too
//! big for an explicit memory budget marks that run `failed` with the reason and the
//! others go on; a fused step that fails is retried with each run alone. Only errors of
//! the store itself end [`run_fit`] with an error.

use crate::asha;
use crate::error::{Error, Result};
use crate::events::{Event, EventSender};
use crate::ops::{apply_overrides, check_warm};
use crate::store::{ExperimentRow, NewClone, OpKind, OpRow, RunRow, RunStatus, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_train::policy::{self, Policy};
use furnace_train::{eval_loss, fused_step_with, load_dataset, Example, FrozenBase, Objective, Spec, StepMetrics, TrainableLora, Trainer};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Loads a base model by name (alias, `.gguf` file or HF folder) with the given weights.
pub type Loader<'a> = dyn FnMut(&str, WeightDType) -> Result<LoadedModel> + 'a;

/// Called after each optimizer step of a run with (run id, step), on the training thread.
pub type StepHook = Arc<dyn Fn(i64, i64) + Send + Sync>;

/// Settings of [`run_fit`].
#[derive(Clone, Default)]
pub struct FitOptions {
    /// Bytes the runs' own state (adapter, gradients, optimizer moments) may take at
    /// once; `None`: 70% of the memory available, measured as each base loads. A run
    /// whose own state alone exceeds a budget given here fails without training.
    pub memory_budget: Option<u64>,
    /// Set to stop after the current optimizer step (runs stay unfinished and resume from
    /// their checkpoints on the next call).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Called after every optimizer step (ops submitted from it take effect at the next).
    pub on_step: Option<StepHook>,
    /// Evaluates each new run before its first step: its `eval_loss` at step 0 (the base
    /// model's, since a new adapter adds nothing yet), the "before" of `furnace train`.
    pub eval_at_start: bool,
}

impl std::fmt::Debug for FitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FitOptions")
            .field("memory_budget", &self.memory_budget)
            .field("cancel", &self.cancel)
            .field("eval_at_start", &self.eval_at_start)
            .finish_non_exhaustive()
    }
}

/// Bytes of one run's own state: factors, gradients and two optimizer moments in f32.
pub fn run_bytes(params: usize) -> u64 {
    16 * params as u64
}

/// `bytes` for people: `1.5 MB`, `2.0 GB`.
fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// Memory available now (Linux `MemAvailable`), if known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Trainable parameters of a run's adapter on `model` (without building it).
pub fn lora_params(model: &furnace_model::Llama, spec: &Spec) -> usize {
    let cfg = spec.lora_config();
    let targets = cfg.targets();
    model
        .layers
        .iter()
        .map(|layer| {
            targets.iter().filter_map(|t| layer.projection(t)).map(|lin| cfg.r * (lin.in_features + lin.out_features)).sum::<usize>()
        })
        .sum()
}

/// The folder of a run.
pub fn run_dir(exp: &ExperimentRow, run_id: i64) -> PathBuf {
    exp.dir.join(format!("run-{run_id}"))
}

fn checkpoint_dir(exp: &ExperimentRow, run_id: i64, step: i64) -> PathBuf {
    run_dir(exp, run_id).join("checkpoints").join(format!("step-{step}"))
}

/// Writes the checkpoint of run `id` at its trainer's step as a new folder `step-N`
/// (written as `step-N.partial-*`, synced, renamed). `named` is the checkpoint step the
/// store names: that folder is never touched. A `step-N` the store does not name is a
/// leftover of a crashed attempt (training is deterministic, but the config may have
/// changed since), so it is replaced.
fn write_checkpoint(exp: &ExperimentRow, id: i64, t: &Trainer, base: &str, named: Option<i64>) -> Result<()> {
    let step = t.steps_done() as i64;
    if named == Some(step) {
        return Err(Error::Internal("the store names this checkpoint already"));
    }
    let dir = checkpoint_dir(exp, id, step);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(Error::io("removing", &dir))?;
    }
    t.save_checkpoint(&dir, base)?;
    Ok(())
}

/// Removes what a crash left half-done in an experiment's run folders: `*.partial-*`
/// folders (a checkpoint or adapter being written) and `*.old-*` ones (an adapter being
/// replaced; put back when its replacement is missing).
fn sweep(exp: &ExperimentRow) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(&exp.dir) else { return Ok(()) };
    for run in entries.flatten() {
        let path = run.path();
        if run.file_name().to_string_lossy().starts_with("run-") && path.is_dir() {
            furnace_train::sweep_partials(&path)?;
            furnace_train::sweep_partials(&path.join("checkpoints"))?;
        }
    }
    Ok(())
}

/// The base a run trains on: (model, quantization).
type GroupKey = (String, String);

fn group_key(spec: &Spec) -> GroupKey {
    (spec.model.base.clone(), spec.model.quantize.clone())
}

/// A run's training examples and eval examples (if any), shared by the runs that use
/// the same `max_seq_len`.
type Data = (Arc<Vec<Example>>, Option<Arc<Vec<Example>>>);

/// What a run's examples depend on besides the files: `max_seq_len`, the trainer kind
/// (what the rows hold), DPO's reference adapter (whose log-probabilities the examples
/// keep) and the formatting function (`trainer.formatting`) that rewrites the rows.
type DataKey = (usize, &'static str, Option<PathBuf>, Option<String>);

fn data_key(spec: &Spec) -> DataKey {
    let kind = match spec.trainer.kind.as_str() {
        "dpo" => "dpo",
        "grpo" => "grpo",
        _ => "sft",
    };
    (spec.trainer.max_seq_len, kind, spec.trainer.reference_adapter.clone(), spec.trainer.formatting.clone())
}

/// Sequences the generation engine runs at once when GRPO samples.
const SAMPLING_BATCH: usize = 64;

/// The loaded base of one group and its datasets (by [`DataKey`]).
struct Loaded {
    key: GroupKey,
    model: LoadedModel,
    frozen: FrozenBase,
    data: HashMap<DataKey, Data>,
}

impl Loaded {
    fn data(&mut self, spec: &Spec) -> Result<Data> {
        let key = data_key(spec);
        if let Some(d) = self.data.get(&key) {
            return Ok(d.clone());
        }
        let template = self.model.chat_template.clone().ok_or_else(|| Error::NoChatTemplate { model: spec.model.base.clone() })?;
        let opts = spec.data_options();
        let load = |p: &Path| -> Result<Arc<Vec<Example>>> {
            let d = load_dataset(p, &self.model.tokenizer, &template, &opts)?;
            Ok(Arc::new(d.examples))
        };
        let train = load(&spec.data.train)?;
        let eval = spec.data.eval.as_deref().map(load).transpose()?;
        self.data.insert(key, (train.clone(), eval.clone()));
        Ok((train, eval))
    }

    /// The frozen base, and what GRPO samples with (the runtime model it was made from).
    fn parts(&mut self) -> (&FrozenBase, Policy<'_>) {
        (&self.frozen, Policy { model: &mut self.model.model, tokenizer: &self.model.tokenizer, max_batch: SAMPLING_BATCH })
    }
}

/// Gives a trainer what its objective needs besides its config: GRPO's compiled rewards,
/// DPO's reference adapter.
fn equip(trainer: &mut Trainer, spec: &Spec, model: &furnace_model::Llama) -> Result<()> {
    if matches!(trainer.config.objective, Objective::Grpo(_)) {
        // Paths in the stored spec are absolute (anchored when the spec was read).
        let rewards = furnace_train::rewards::Rewards::compile(&spec.rewards, Path::new("."))?;
        trainer.rewards = Some(Arc::new(rewards));
    }
    if let Some(dir) = &spec.trainer.reference_adapter {
        let adapter = furnace_model::load_adapter(dir).map_err(furnace_train::Error::from)?;
        trainer.reference = Some(Arc::new(TrainableLora::from_adapter(model, &adapter)?));
    }
    Ok(())
}

/// The score ASHA ranks a run by (lower is better) among the metrics of one step: the
/// eval loss (SFT, DPO), minus the mean eval reward (GRPO), else the training loss or
/// minus the training reward.
pub fn rank_score(at: &dyn Fn(&str) -> Option<f64>) -> Option<f64> {
    at("eval_loss").or_else(|| at("eval_reward").map(|r| -r)).or_else(|| at("reward").map(|r| -r)).or_else(|| at("loss"))
}

/// One run as the scheduler holds it.
struct Live {
    row: RunRow,
    spec: Spec,
    trainer: Option<Trainer>,
}

/// What a fit ended with.
#[derive(Debug, Clone)]
pub struct FitSummary {
    /// Every run of the experiment, as stored at the end.
    pub runs: Vec<RunRow>,
    /// Whether it ended because it was cancelled.
    pub cancelled: bool,
}

struct Fit<'a, 'l> {
    store: Store,
    exp: ExperimentRow,
    events: &'a EventSender,
    loader: &'a mut Loader<'l>,
    opts: &'a FitOptions,
    runs: BTreeMap<i64, Live>,
    loaded: Option<Loaded>,
    budget: Option<u64>,
    /// The experiment's `[experiment]` (policy, eta, rungs, PBT settings); `None` when no
    /// run's config reads.
    policy: Option<furnace_train::spec::ExperimentSpec>,
    /// The search space of a `[search] kind = "tpe"` experiment (new trials are proposed
    /// from it as runs end).
    tpe: Option<furnace_train::knobs::Space>,
}

/// Why a step's metrics mean the run diverged (a loss or grad norm that is NaN or
/// infinite), if they do.
fn diverged(m: &StepMetrics) -> Option<String> {
    let (what, value) = if !m.loss.is_finite() {
        ("loss", m.loss)
    } else if !m.grad_norm.is_finite() {
        ("grad norm", m.grad_norm)
    } else {
        return None;
    };
    Some(format!("{what} became {value} at step {}; lower the learning rate", m.step))
}

/// The metrics of one optimizer step, as stored: loss, lr, grad norm, tokens and the
/// objective's own (DPO's rewards, GRPO's rewards, KL and clip ratios).
fn step_values(m: &StepMetrics) -> Vec<(&str, f64)> {
    let mut values = vec![("loss", m.loss), ("lr", m.lr), ("grad_norm", m.grad_norm), ("tokens", m.tokens as f64)];
    values.extend(m.extra.iter().map(|(n, v)| (n.as_str(), *v)));
    values
}

/// One fused step of `trainers` (the runs `ids`, in order): [`fused_step_with`], where tests can
/// inject a failure.
fn step_runs(
    base: &FrozenBase,
    policy: &mut Policy,
    ids: &[i64],
    trainers: &mut [&mut Trainer],
    train: &[Example],
) -> std::result::Result<Vec<StepMetrics>, furnace_train::Error> {
    let result = fused_step_with(base, Some(policy), trainers, train);
    #[cfg(test)]
    if let Some(e) = result.as_ref().ok().and_then(|m| tests::injected_failure(ids, m)) {
        return Err(e);
    }
    #[cfg(not(test))]
    let _ = ids;
    result
}

fn spec_of(row: &RunRow) -> Result<Spec> {
    serde_json::from_value(row.config.clone()).map_err(|source| Error::StoredConfig { run: row.id, source })
}

/// Trains every unfinished run of `exp` (see the module docs), applying ops as they come,
/// until no run is active or `opts.cancel` is set.
pub fn run_fit(store: &Store, exp: &ExperimentRow, loader: &mut Loader<'_>, opts: &FitOptions, events: &EventSender) -> Result<FitSummary> {
    // One driver per experiment: a second `furnace run` of it would train the same runs
    // twice. The OS drops the lock when the process dies, even by kill -9.
    std::fs::create_dir_all(&exp.dir).map_err(Error::io("creating", &exp.dir))?;
    let lock_path = exp.dir.join(".lock");
    let lock =
        std::fs::File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(Error::io("opening", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Busy { experiment: exp.name.clone() }),
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io("locking", &lock_path)(e)),
    }
    let mut store = store.reopen()?;
    store.set_experiment_status(exp.id, "running")?;
    sweep(exp)?;
    // Unfinished runs continue from their last checkpoint.
    let mut runs = BTreeMap::new();
    let rows = store.runs(exp.id)?;
    if rows.is_empty() {
        return Err(Error::NoRuns { experiment: exp.name.clone() });
    }
    for row in rows {
        // A warm clone is recorded with its checkpoint; one without (a store of an older
        // furnace that a crash cut short) is taken away and its op makes it again.
        if row.warm && row.checkpoint_step.is_none() && row.status == RunStatus::New && store.remove_unstarted_run(row.id)? {
            continue;
        }
        if matches!(row.status, RunStatus::New | RunStatus::Ongoing | RunStatus::Stopped) {
            store.rewind(row.id)?;
        }
        let row = store.run(row.id)?;
        // A config that does not read back fails its run, not the experiment: an
        // unfinished run is marked failed with the reason; a deleted, completed or failed
        // one keeps its status. Neither is scheduled.
        let spec = match spec_of(&row) {
            Ok(spec) => spec,
            Err(e) => {
                if matches!(row.status, RunStatus::New | RunStatus::Ongoing | RunStatus::Stopped) {
                    // The store reads text that is not JSON as null.
                    let msg = if row.config.is_null() {
                        format!("store: run {}: its stored config is not JSON; the run cannot train", row.id)
                    } else {
                        format!("{e}; the run cannot train")
                    };
                    store.set_run_status(row.id, RunStatus::Failed, Some(&msg))?;
                    let _ = events.send(Event::Status {
                        experiment: exp.name.clone(),
                        run_id: row.id,
                        status: RunStatus::Failed,
                        message: Some(msg),
                    });
                }
                continue;
            }
        };
        runs.insert(row.id, Live { row, spec, trainer: None });
    }
    // The policy is the experiment's: every run's spec has the same `[experiment]`.
    let policy = runs.values().next().map(|l| l.spec.experiment.clone());
    // A TPE experiment's spec was read when it was created; a stored spec that does not
    // read now (an experiment made another way: `furnace train`, the API) is not one.
    let tpe = furnace_train::knobs::Space::tpe(&exp.spec, &exp.spec_path).ok().flatten();
    let mut fit = Fit { store, exp: exp.clone(), events, loader, opts, runs, loaded: None, budget: opts.memory_budget, policy, tpe };
    let cancelled = fit.drive()?;
    drop(lock);
    let done = fit.runs.values().all(|l| !l.row.status.is_active());
    fit.store.set_experiment_status(exp.id, if done { "done" } else { "running" })?;
    Ok(FitSummary { runs: fit.store.runs(exp.id)?, cancelled })
}

impl Fit<'_, '_> {
    fn log(&self, message: String) {
        let _ = self.events.send(Event::Log { experiment: self.exp.name.clone(), message });
    }

    fn cancelled(&self) -> bool {
        self.opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn set_status(&mut self, id: i64, status: RunStatus, message: Option<String>) -> Result<()> {
        self.store.set_run_status(id, status, if status == RunStatus::Failed { message.as_deref() } else { None })?;
        self.status_set(id, status, message);
        Ok(())
    }

    /// Fails run `id` with `message` (stored as its error, sent as a Status event) and
    /// drops its state; the experiment goes on.
    fn fail(&mut self, id: i64, message: String) -> Result<()> {
        self.log(format!("run {id} failed: {message}"));
        if let Some(l) = self.runs.get_mut(&id) {
            l.trainer = None;
        }
        self.set_status(id, RunStatus::Failed, Some(message))
    }

    /// Keeps an error of one run inside that run: `Ok(Some(v))` on success; on an error
    /// of the store itself (not the run's fault) the error; otherwise the run fails with
    /// "`what`: error" and `Ok(None)`.
    fn contain<T>(&mut self, id: i64, what: &str, r: Result<T>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e @ Error::Sqlite(_)) => Err(e),
            Err(e) => {
                self.fail(id, format!("{what}: {e}"))?;
                Ok(None)
            }
        }
    }

    /// Takes a status the store already holds into the scheduler and publishes it.
    fn status_set(&mut self, id: i64, status: RunStatus, message: Option<String>) {
        if let Some(l) = self.runs.get_mut(&id) {
            l.row.status = status;
        }
        let _ = self.events.send(Event::Status { experiment: self.exp.name.clone(), run_id: id, status, message });
    }

    /// The main loop; returns whether it was cancelled.
    fn drive(&mut self) -> Result<bool> {
        loop {
            // Between rounds every resident run is at a checkpoint, so a warm clone may load
            // its parent's base here.
            self.apply_ops(true)?;
            if self.cancelled() {
                return Ok(true);
            }
            self.asha()?;
            self.pbt()?;
            self.tpe()?;
            // Least progress first: the active run with the fewest chunks done picks the
            // group, and that group's runs at the same progress train the next chunk.
            let Some(lead) = self
                .runs
                .values()
                .filter(|l| l.row.status.is_active())
                .min_by_key(|l| (l.row.chunks_done, l.row.id))
                .map(|l| (group_key(&l.spec), l.row.chunks_done))
            else {
                return Ok(false);
            };
            let (key, chunks) = lead;
            if let Err(e) = self.ensure_group(&key) {
                // A base that cannot load fails its runs, not the experiment.
                let msg = format!("loading {} ({}): {e}", key.0, key.1);
                self.log(msg.clone());
                let ids: Vec<i64> =
                    self.runs.values().filter(|l| l.row.status.is_active() && group_key(&l.spec) == key).map(|l| l.row.id).collect();
                for id in ids {
                    self.set_status(id, RunStatus::Failed, Some(msg.clone()))?;
                }
                continue;
            }
            let members: Vec<i64> = self
                .runs
                .values()
                .filter(|l| l.row.status.is_active() && group_key(&l.spec) == key && l.row.chunks_done == chunks)
                .map(|l| l.row.id)
                .collect();
            let admitted = self.admit(&members)?;
            if self.round(admitted, chunks + 1)? {
                return Ok(true);
            }
        }
    }

    /// Loads the base of `key` (swapping out another group's; its runs are at chunk
    /// boundaries and checkpointed, so only what differs — the base and the adapters —
    /// changes).
    fn ensure_group(&mut self, key: &GroupKey) -> Result<()> {
        if self.loaded.as_ref().is_some_and(|l| &l.key == key) {
            return Ok(());
        }
        if let Some(old) = self.loaded.take() {
            self.log(format!("swapping out {} ({})", old.key.0, old.key.1));
            for l in self.runs.values_mut().filter(|l| group_key(&l.spec) == old.key) {
                l.trainer = None;
            }
        }
        let spec = self
            .runs
            .values()
            .find(|l| &group_key(&l.spec) == key)
            .map(|l| l.spec.clone())
            .ok_or(Error::Internal("no run for the group"))?;
        let dtype = spec.weight_dtype()?;
        self.log(format!("loading {} ({dtype:?} base)", key.0));
        let model = (self.loader)(&key.0, dtype)?;
        let frozen = FrozenBase::new(&model.model)?;
        // Measured for each base as it loads (what another base took is given back, other
        // processes come and go); an explicit budget stays as given.
        if self.opts.memory_budget.is_none() {
            self.budget = available_memory().map(|a| a / 10 * 7);
        }
        self.loaded = Some(Loaded { key: key.clone(), model, frozen, data: HashMap::new() });
        Ok(())
    }

    fn loaded(&mut self) -> Result<&mut Loaded> {
        self.loaded.as_mut().ok_or(Error::Internal("no base loaded"))
    }

    /// Builds (or keeps) a run's trainer: from its own checkpoint, from its warm parent's
    /// state, or fresh.
    fn ensure_trainer(&mut self, id: i64) -> Result<()> {
        if self.runs.get(&id).is_some_and(|l| l.trainer.is_some()) {
            return Ok(());
        }
        let live = self.runs.get(&id).ok_or(Error::RunNotFound { run: id })?;
        let (spec, row) = (live.spec.clone(), live.row.clone());
        let exp = self.exp.clone();
        let loaded = self.loaded()?;
        let (train, _) = loaded.data(&spec)?;
        let config = spec.train_config(&train);
        let trainer = match row.checkpoint_step {
            Some(step) => {
                let mut t = Trainer::resume(&loaded.model.model, &checkpoint_dir(&exp, id, step), config.clone(), &train)?;
                // The saved adapter carries the parent's alpha/dropout for a warm clone.
                t = t.fork(config, spec.lora_config(), &train)?;
                t
            }
            None => {
                let lora = TrainableLora::new(&loaded.model.model, spec.lora_config(), spec.init(), spec.experiment.seed)?;
                Trainer::new(config, lora, &train)?
            }
        };
        let mut trainer = trainer;
        equip(&mut trainer, &spec, &loaded.model.model)?;
        let fresh = trainer.steps_done() == 0;
        self.register(id, trainer, &train)?;
        if fresh && self.opts.eval_at_start && !self.store.metrics(id)?.iter().any(|m| m.step == 0 && m.name.starts_with("eval_")) {
            if let Some(values) = self.evaluate(id)? {
                self.record_values(id, 0, 0, &values)?;
            }
        }
        Ok(())
    }

    /// A run's eval metrics now (`None` without eval data or state): `eval_loss` (SFT),
    /// DPO's `eval_loss` and `eval_rewards/...`, GRPO's `eval_reward` and
    /// `eval_rewards/...`. An eval loss or reward that is NaN or infinite is an error (the
    /// run diverged).
    fn evaluate(&mut self, id: i64) -> Result<Option<Vec<(String, f64)>>> {
        let Some(spec) = self.runs.get(&id).map(|l| l.spec.clone()) else { return Ok(None) };
        let loaded = self.loaded.as_mut().ok_or(Error::Internal("no base loaded"))?;
        let (_, eval) = loaded.data(&spec)?;
        let Some(t) = self.runs.get(&id).and_then(|l| l.trainer.as_ref()) else { return Ok(None) };
        let Some(e) = eval.as_deref().filter(|e| !e.is_empty()) else { return Ok(None) };
        let values = match &t.config.objective {
            Objective::Sft => {
                let mut values = vec![("eval_loss".to_string(), eval_loss(&loaded.frozen, Some(&t.lora), e)?)];
                // The user's metrics of the run's greedy completions (alone in their engine
                // batch, so they do not depend on the runs it trains with).
                if let Some(function) = spec.trainer.compute_metrics.as_deref() {
                    let max_new = spec.metric_completion_length();
                    values.extend(policy::compute_metrics(&mut loaded.parts().1, &t.lora, e, max_new, function)?);
                }
                values
            }
            Objective::Dpo(cfg) => policy::dpo_eval(&loaded.frozen, &t.lora, t.reference.as_deref(), cfg, e)?,
            Objective::Grpo(cfg) => {
                let rewards = t.rewards.clone().ok_or(Error::Internal("a GRPO run without rewards"))?;
                policy::grpo_eval(&mut loaded.parts().1, &t.lora, &rewards, cfg, e, spec.experiment.seed, t.steps_done())?
            }
        };
        for (name, v) in &values {
            if (name == "eval_loss" || name == "eval_reward") && !v.is_finite() {
                return Err(Error::Invalid(format!("the {name} became {v}; lower the learning rate")));
            }
        }
        Ok(Some(values.into_iter().filter(|(_, v)| v.is_finite()).collect()))
    }

    /// [`Fit::record`] for owned metric names.
    fn record_values(&mut self, id: i64, step: i64, chunks: i64, values: &[(String, f64)]) -> Result<()> {
        let refs: Vec<(&str, f64)> = values.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        self.record(id, step, chunks, &refs)
    }

    /// Stores a run's progress and metrics of one step and publishes the metrics.
    fn record(&mut self, id: i64, step: i64, chunks: i64, values: &[(&str, f64)]) -> Result<()> {
        self.store.record_step(id, step, chunks, values)?;
        for (name, value) in values {
            let _ = self.events.send(Event::Metric {
                experiment: self.exp.name.clone(),
                run_id: id,
                step,
                name: (*name).into(),
                value: *value,
            });
        }
        Ok(())
    }

    /// Makes `trainer` the state of run `id`, recording its totals and progress.
    fn register(&mut self, id: i64, trainer: Trainer, train: &[Example]) -> Result<()> {
        let per_epoch = Trainer::steps_per_epoch(&trainer.config, train).max(1);
        let epochs = trainer.total_steps().div_ceil(per_epoch).max(1);
        let total_chunks = (epochs * trainer.config.num_chunks) as i64;
        let (total, steps, chunks) = (trainer.total_steps() as i64, trainer.steps_done() as i64, trainer.chunks_done() as i64);
        self.store.set_totals(id, total, total_chunks)?;
        if let Some(l) = self.runs.get_mut(&id) {
            l.row.total_steps = total;
            l.row.total_chunks = total_chunks;
            l.row.steps_done = steps;
            l.row.chunks_done = chunks;
            l.trainer = Some(trainer);
        }
        Ok(())
    }

    /// The members that fit the memory budget, in order; the others wait and their
    /// trainers are dropped (they are checkpointed). Under a measured budget at least one
    /// is admitted; a run whose own state alone exceeds an explicit budget
    /// (`FitOptions::memory_budget`) never fits it, so it fails saying what it needs.
    fn admit(&mut self, members: &[i64]) -> Result<Vec<i64>> {
        let mut admitted = Vec::new();
        let mut used = 0u64;
        for &id in members {
            // Sizes the spec alone cannot bound: the rank against the projections and the
            // sequence length against the context of this base.
            let fits_model = match (self.runs.get(&id), self.loaded.as_ref()) {
                (Some(l), Some(b)) => {
                    l.spec.check_against(&b.model.model.config).map_err(|e| format!("{e}; the run cannot train on {}", l.spec.model.base))
                }
                _ => Ok(()),
            };
            if let Err(msg) = fits_model {
                self.fail(id, msg)?;
                continue;
            }
            let bytes = match (self.runs.get(&id), self.loaded.as_ref()) {
                (Some(l), Some(b)) => run_bytes(lora_params(&b.model.model, &l.spec)),
                _ => 0,
            };
            if let Some(budget) = self.opts.memory_budget.filter(|&b| bytes > b) {
                let msg = format!(
                    "its adapter, gradients and optimizer state need {} ({bytes} bytes), more than the memory budget of {} ({budget} bytes); \
                     raise --memory-budget or lower lora.r",
                    human_bytes(bytes),
                    human_bytes(budget)
                );
                self.fail(id, msg)?;
                continue;
            }
            if admitted.is_empty() || self.budget.is_none_or(|b| used + bytes <= b) {
                used += bytes;
                admitted.push(id);
            }
        }
        let waiting = members.len() - admitted.len();
        if waiting > 0 {
            self.log(format!("memory budget admits {} runs now ({:.1} MB); {waiting} wait their turn", admitted.len(), used as f64 / 1e6));
        }
        for l in self.runs.values_mut() {
            if !admitted.contains(&l.row.id) && l.row.checkpoint_step.is_some() {
                l.trainer = None;
            }
        }
        let mut ready = Vec::new();
        for id in admitted {
            // Bad data or a bad checkpoint fails that run only.
            let built = self.ensure_trainer(id);
            if self.contain(id, "preparing the run", built)?.is_some() {
                ready.push(id);
            }
        }
        Ok(ready)
    }

    /// Trains `members` until each has done `target` chunks (or finished, stopped, left);
    /// returns whether it was cancelled.
    fn round(&mut self, mut members: Vec<i64>, target: i64) -> Result<bool> {
        for &id in &members {
            if self.runs.get(&id).is_some_and(|l| l.row.status == RunStatus::New) {
                self.set_status(id, RunStatus::Ongoing, None)?;
            }
        }
        loop {
            // Ops take effect at the next optimizer step.
            let joined = self.apply_ops(false)?;
            for id in joined {
                if self.runs.get(&id).is_some_and(|l| l.row.chunks_done < target && l.trainer.is_some()) {
                    members.push(id);
                }
            }
            members.retain(|id| self.runs.get(id).is_some_and(|l| l.row.status.is_active() && l.trainer.is_some()));
            if self.cancelled() {
                self.stop_here(&members, target)?;
                return Ok(true);
            }
            let stepping: Vec<i64> = members
                .iter()
                .copied()
                .filter(|id| {
                    self.runs.get(id).and_then(|l| l.trainer.as_ref()).is_some_and(|t| (t.chunks_done() as i64) < target && !t.finished())
                })
                .collect();
            if stepping.is_empty() {
                break;
            }
            self.fused(&stepping, target)?;
        }
        self.end_chunk(&members)?;
        Ok(false)
    }

    /// On cancel (the first Ctrl-C), keeps the work done: the runs in `members` that ended
    /// the chunk end it (eval, checkpoint, completion) and the others are checkpointed at
    /// the step they are at, so a resume redoes nothing.
    fn stop_here(&mut self, members: &[i64], target: i64) -> Result<()> {
        let (mut ended, mut inside) = (Vec::new(), Vec::new());
        for &id in members {
            let Some(t) = self.runs.get(&id).and_then(|l| l.trainer.as_ref()) else { continue };
            if t.chunks_done() as i64 >= target || t.finished() {
                ended.push(id);
            } else {
                inside.push(id);
            }
        }
        self.end_chunk(&ended)?;
        for id in inside {
            let step = self.runs.get(&id).map(|l| l.row.steps_done).unwrap_or(0);
            let saved = self.checkpoint(id);
            self.contain(id, &format!("checkpoint at step {step}"), saved)?;
        }
        Ok(())
    }

    /// One optimizer step of each run in `ids`, fused per dataset; then the evals and
    /// checkpoints their `eval_every` / `save_every` ask for inside a chunk (those at the
    /// chunk's end are `end_chunk`'s).
    fn fused(&mut self, ids: &[i64], target: i64) -> Result<()> {
        let mut stepped = Vec::new();
        // Runs share a fused step when they share their data (length, kind, reference).
        let mut by_len: BTreeMap<DataKey, Vec<i64>> = BTreeMap::new();
        for id in ids {
            if let Some(l) = self.runs.get(id) {
                by_len.entry(data_key(&l.spec)).or_default().push(*id);
            }
        }
        for (_, group) in by_len {
            let spec = self.runs.get(&group[0]).map(|l| l.spec.clone()).ok_or(Error::RunNotFound { run: group[0] })?;
            let data = self.loaded()?.data(&spec);
            // Data that no longer loads (a formatting function that fails now) fails the
            // runs that read it, not the experiment.
            let train = match data {
                Ok((train, _)) => train,
                Err(e @ Error::Sqlite(_)) => return Err(e),
                Err(e) => {
                    for &id in &group {
                        self.fail(id, format!("loading the data: {e}"))?;
                    }
                    continue;
                }
            };
            let loaded = self.loaded.as_mut().ok_or(Error::Internal("no base loaded"))?;
            let mut taken: Vec<(i64, Trainer)> =
                group.iter().filter_map(|id| self.runs.get_mut(id).and_then(|l| l.trainer.take().map(|t| (*id, t)))).collect();
            let ids: Vec<i64> = taken.iter().map(|(id, _)| *id).collect();
            let result = {
                let mut refs: Vec<&mut Trainer> = taken.iter_mut().map(|(_, t)| t).collect();
                let (frozen, mut policy) = loaded.parts();
                step_runs(frozen, &mut policy, &ids, &mut refs, &train)
            };
            match result {
                Ok(metrics) => {
                    for ((id, t), m) in taken.into_iter().zip(metrics) {
                        self.took_step(id, t, &m, target, &mut stepped)?;
                    }
                }
                Err(e) if taken.len() == 1 => {
                    for (id, _) in taken {
                        let step = self.runs.get(&id).map(|l| l.row.steps_done + 1).unwrap_or(0);
                        self.fail(id, format!("step {step}: {e}"))?;
                    }
                }
                Err(e) => {
                    // One run's error must not fail the others: each is retried alone, and
                    // only those that fail alone fail.
                    self.log(format!("a fused step of runs {ids:?} failed ({e}); retrying each run alone"));
                    for (id, t) in taken {
                        drop(t);
                        if let Some((t, m)) = self.alone(id, &e)? {
                            self.took_step(id, t, &m, target, &mut stepped)?;
                        }
                    }
                }
            }
        }
        for (id, step) in stepped {
            let Some(t) = self.runs.get(&id).map(|l| l.spec.trainer.clone()) else { continue };
            let chunks = self.runs.get(&id).map(|l| l.row.chunks_done).unwrap_or(0);
            if t.eval_every > 0 && step % t.eval_every == 0 {
                let score = self.evaluate(id);
                match self.contain(id, &format!("evaluating at step {step}"), score)? {
                    None => continue,
                    Some(Some(values)) => self.record_values(id, step as i64, chunks, &values)?,
                    Some(None) => {}
                }
            }
            if t.save_every > 0 && step % t.save_every == 0 {
                let saved = self.checkpoint(id);
                self.contain(id, &format!("checkpoint at step {step}"), saved)?;
            }
        }
        Ok(())
    }

    /// Retries run `id`'s coming step alone (`fused_step` with its trainer only) after a
    /// fused step with other runs failed with `fused_err`. Returns its trainer and the
    /// metrics of that step, or `None` when it failed alone too (the run is failed then).
    ///
    /// `fused_step` does not leave its trainers untouched when it fails: every trainer's
    /// plan takes its micro-batches (advancing its data position) before the first pass,
    /// and the optimizer steps are applied one trainer after another, so an error leaves
    /// some trainers part-way through the step. So the run's state is not reused: it is
    /// rebuilt from its last checkpoint (or from the start), as a restart would, and
    /// replayed alone up to the step that failed (training is deterministic: the replayed
    /// steps are those already recorded, stored again as computed now).
    fn alone(&mut self, id: i64, fused_err: &furnace_train::Error) -> Result<Option<(Trainer, StepMetrics)>> {
        let Some(live) = self.runs.get_mut(&id) else { return Ok(None) };
        live.trainer = None;
        let upto = live.row.steps_done as usize + 1;
        let spec = live.spec.clone();
        let built = self.ensure_trainer(id);
        let what = format!("rebuilding the run from its checkpoint after a fused step failed ({fused_err})");
        if self.contain(id, &what, built)?.is_none() {
            return Ok(None);
        }
        let mut t = self.runs.get_mut(&id).and_then(|l| l.trainer.take()).ok_or(Error::Internal("no trainer after building it"))?;
        let data = self.loaded()?.data(&spec);
        let Some((train, _)) = self.contain(id, "loading the data", data)? else { return Ok(None) };
        let loaded = self.loaded.as_mut().ok_or(Error::Internal("no base loaded"))?;
        let (frozen, mut policy) = loaded.parts();
        let failure = loop {
            match step_runs(frozen, &mut policy, &[id], &mut [&mut t], &train) {
                Ok(metrics) => {
                    let m = metrics.into_iter().next().ok_or(Error::Internal("no metrics of a step"))?;
                    if m.step >= upto {
                        return Ok(Some((t, m)));
                    }
                    if let Some(msg) = diverged(&m) {
                        break msg;
                    }
                    let values = step_values(&m);
                    self.store.record_step(id, m.step as i64, t.chunks_done() as i64, &values)?;
                }
                Err(e) => break format!("step {upto} failed in a fused step ({fused_err}) and alone: {e}"),
            }
        };
        drop(t);
        self.fail(id, failure)?;
        Ok(None)
    }

    /// Takes run `id`'s step `m` (its trainer `t` after it): a loss or grad norm that is
    /// not finite fails the run (nothing of that step is stored: SQLite keeps no NaN and
    /// JSON has no infinity); otherwise the metrics and progress are recorded and
    /// published and `(id, step)` joins `stepped` when the chunk goes on.
    fn took_step(&mut self, id: i64, t: Trainer, m: &StepMetrics, target: i64, stepped: &mut Vec<(i64, usize)>) -> Result<()> {
        if let Some(msg) = diverged(m) {
            drop(t);
            return self.fail(id, msg);
        }
        let chunks = t.chunks_done() as i64;
        if chunks < target && !t.finished() {
            stepped.push((id, m.step));
        }
        let values = step_values(m);
        self.record(id, m.step as i64, chunks, &values)?;
        if let Some(hook) = &self.opts.on_step {
            hook(id, m.step as i64);
        }
        if let Some(l) = self.runs.get_mut(&id) {
            l.row.steps_done = m.step as i64;
            l.row.chunks_done = chunks;
            let _ = self.events.send(Event::Progress {
                experiment: self.exp.name.clone(),
                run_id: id,
                steps_done: l.row.steps_done,
                total_steps: l.row.total_steps,
                chunks_done: chunks,
            });
            l.trainer = Some(t);
        }
        Ok(())
    }

    /// The end of a chunk for `members`: eval loss, checkpoint, completion (the policy
    /// decides in the drive loop, once every run that will reach this rung has).
    fn end_chunk(&mut self, members: &[i64]) -> Result<()> {
        for &id in members {
            let Some(t) = self.runs.get(&id).and_then(|l| l.trainer.as_ref()) else { continue };
            let (step, chunks, finished) = (t.steps_done() as i64, t.chunks_done() as i64, t.finished());
            // An error of one run (its eval, its checkpoint, its adapter) fails that run.
            let score = self.evaluate(id);
            let Some(score) = self.contain(id, &format!("evaluating at step {step}"), score)? else { continue };
            // `chunk` marks the rung a step ends; ASHA reads the eval loss (or reward) there.
            let mut values = vec![("chunk".to_string(), chunks as f64)];
            values.extend(score.unwrap_or_default());
            self.record_values(id, step, chunks, &values)?;
            let saved = self.checkpoint(id);
            if self.contain(id, &format!("checkpoint at step {step}"), saved)?.is_none() {
                continue;
            }
            if finished {
                let done = self.finish(id);
                self.contain(id, "saving the adapter", done)?;
            }
        }
        Ok(())
    }

    /// ASHA as published (Li et al., "A System for Massively Parallel Hyperparameter
    /// Tuning"): a run that reaches a rung (the end of a chunk) is promoted to the next
    /// chunk if it ranks in the best `1/eta` of all runs that reached that rung, and paused
    /// otherwise; a paused run is promoted later when it ranks there (a run that reaches
    /// the rung later, such as a clone, can raise the number kept).
    ///
    /// Rungs stand at `min_chunks · eta^k` chunks ([`asha::is_rung`]); between rungs the
    /// runs train on without decisions.
    ///
    /// Decisions at a rung are taken only once no active run has fewer chunks done (least
    /// progress trains first), so every run that reaches the rung by then takes part
    /// whatever the memory budget admits at once. They are a function of the stored
    /// scores and ops, so after a crash the same decisions are taken again, once: a pause
    /// is a stop op of the policy and a promotion a resume op, each recorded with the run's
    /// status in one transaction.
    ///
    /// Spared: a run resumed at its current step (by a person, or promoted before) and a
    /// run that went on past its rung (checkpointed inside the next chunk).
    fn asha(&mut self) -> Result<()> {
        let Some((eta, min_chunks)) = self.policy.as_ref().filter(|p| p.policy == "asha").map(|p| (p.eta, p.min_chunks)) else {
            return Ok(());
        };
        let frontier = self.runs.values().filter(|l| l.row.status.is_active()).map(|l| l.row.chunks_done).min().unwrap_or(i64::MAX);
        let top = self.runs.values().map(|l| l.row.chunks_done).max().unwrap_or(0).min(frontier);
        if top < 1 {
            return Ok(());
        }
        let ops = self.store.ops(self.exp.id)?;
        for rung in asha::rungs(min_chunks, eta, top) {
            let mut reached = Vec::new();
            let mut sitting = Vec::new();
            let ids: Vec<i64> = self.runs.keys().copied().collect();
            for id in ids {
                let Some(live) = self.runs.get(&id) else { continue };
                if live.row.status == RunStatus::Deleted {
                    continue;
                }
                let (status, steps, chunks) = (live.row.status, live.row.steps_done, live.row.chunks_done);
                let Some((score, rung_step)) = self.rung_score(id, rung)? else { continue };
                reached.push((id, score));
                if chunks == rung && steps == rung_step {
                    sitting.push((id, status, steps));
                }
            }
            if sitting.is_empty() {
                continue;
            }
            let stop: HashSet<i64> = asha::to_stop(&reached, eta).into_iter().collect();
            let n = reached.len();
            for (id, status, step) in sitting {
                // The last op that set this run's status at this step, if any.
                let last = ops
                    .iter()
                    .filter(|o| o.run_id == id && o.status == "applied" && o.applied_step == Some(step))
                    .filter(|o| matches!(o.kind, OpKind::Stop | OpKind::Resume))
                    .max_by_key(|o| o.id);
                let resumed = last.is_some_and(|o| o.kind == OpKind::Resume);
                let paused_by_policy = last.is_some_and(|o| o.kind == OpKind::Stop && o.source == "policy");
                if status.is_active() && rung == frontier && stop.contains(&id) && !resumed {
                    let msg = format!(
                        "asha: paused at rung {rung}: not in the best 1/{eta} of the {n} runs that reached it \
                         (promoted if it ranks there later)"
                    );
                    self.policy_op(id, OpKind::Stop, step, msg, RunStatus::Stopped)?;
                } else if status == RunStatus::Stopped && paused_by_policy && !stop.contains(&id) {
                    let msg = format!("asha: promoted at rung {rung}: in the best 1/{eta} of the {n} runs that reached it");
                    self.policy_op(id, OpKind::Resume, step, msg, RunStatus::Ongoing)?;
                }
            }
        }
        Ok(())
    }

    /// PBT ([`crate::pbt`]): at a boundary (every `pbt_interval` chunks), once no active
    /// run has fewer chunks done, the worst `pbt_fraction` of the runs that reached it stop
    /// and warm clones of the best, with perturbed knobs, are queued (one transaction per
    /// replacement; the clone ops are applied at the top of the next loop). Runs that went
    /// past the boundary, finished, or were already replaced there are left alone; once
    /// the experiment holds `max_runs` runs (default 4 × the runs it started with) no run
    /// is replaced. A function of the stored scores and ops, so a restarted driver finds
    /// the same replacements and makes only those not yet recorded.
    fn pbt(&mut self) -> Result<()> {
        let Some(p) = self.policy.clone().filter(|p| p.policy == "pbt") else { return Ok(()) };
        let Some(frontier) = self.runs.values().filter(|l| l.row.status.is_active()).map(|l| l.row.chunks_done).min() else {
            return Ok(());
        };
        if frontier < 1 || frontier % p.pbt_interval as i64 != 0 {
            return Ok(());
        }
        let mut reached = Vec::new();
        let mut rung_steps = HashMap::new();
        let ids: Vec<i64> = self.runs.keys().copied().collect();
        for id in ids {
            if self.runs.get(&id).is_none_or(|l| l.row.status == RunStatus::Deleted) {
                continue;
            }
            if let Some((score, step)) = self.rung_score(id, frontier)? {
                reached.push((id, score));
                rung_steps.insert(id, step);
            }
        }
        let pairs = crate::pbt::plan(&reached, p.pbt_fraction);
        if pairs.is_empty() {
            return Ok(());
        }
        let ops = self.store.ops(self.exp.id)?;
        let initial = self.runs.values().filter(|l| l.row.parent_id.is_none()).count();
        let max_runs = p.max_runs.unwrap_or(4 * initial.max(1));
        let pending_clones = ops.iter().filter(|o| o.status == "pending" && matches!(o.kind, OpKind::Clone { .. })).count();
        let mut total = self.runs.len() + pending_clones;
        let n = reached.len();
        for (slot, (worst, best)) in pairs.into_iter().enumerate() {
            let Some(&step) = rung_steps.get(&worst) else { continue };
            let done = ops.iter().any(|o| {
                o.run_id == worst
                    && o.source == "policy"
                    && o.kind == OpKind::Stop
                    && o.applied_step == Some(step)
                    && o.message.as_deref().is_some_and(|m| m.starts_with(crate::pbt::STOP_PREFIX))
            });
            let Some(w) = self.runs.get(&worst) else { continue };
            let sitting = w.row.status.is_active() && w.row.chunks_done == frontier && w.row.steps_done == step;
            let Some(b) = self.runs.get(&best) else { continue };
            // A clone of a run with nothing left to train would finish at once.
            if done || !sitting || b.row.total_chunks <= frontier {
                continue;
            }
            if total >= max_runs {
                self.log(format!(
                    "pbt: run {worst} is not replaced at chunk {frontier}: the experiment holds {total} runs (max_runs {max_runs})"
                ));
                continue;
            }
            let set = crate::pbt::perturb(&b.row.config, &b.row.knobs, p.seed, frontier, slot, p.perturb);
            let checked = apply_overrides(&b.row.config, &set).and_then(|child| check_warm(&b.spec, &child));
            if let Err(e) = checked {
                self.log(format!("pbt: no clone of run {best} with {set:?}: {e}"));
                continue;
            }
            let msg = format!(
                "{} at chunk {frontier}: among the worst {:.0}% of the {n} runs that reached it; a warm clone of run {best} \
                 (the best) with {} takes its place",
                crate::pbt::STOP_PREFIX,
                100.0 * p.pbt_fraction,
                set.join(", ")
            );
            self.log(format!("run {worst}: {msg}"));
            let op = self.store.pbt_replace(worst, step, &msg, best, &set)?;
            total += 1;
            self.status_set(worst, RunStatus::Stopped, Some(msg.clone()));
            let _ = self.events.send(Event::Op {
                experiment: self.exp.name.clone(),
                op_id: op,
                run_id: best,
                op: "clone".into(),
                status: "pending".into(),
                message: Some(msg),
                new_run_id: None,
            });
        }
        Ok(())
    }

    /// TPE ([`crate::tpe`]): while fewer than `max_concurrent` runs are active and fewer
    /// than `num_runs` trials exist, the next trial is proposed from the earlier ones (the
    /// runs that are not clones, in id order; a run's score is its eval loss at its last
    /// chunk end, infinite when it failed without one; active runs count as configs only)
    /// and added to the store as a new run. The proposal depends only on the seed and the
    /// stored trials, so after a crash before the run is stored the same one is proposed.
    fn tpe(&mut self) -> Result<()> {
        let Some(space) = self.tpe.clone() else { return Ok(()) };
        loop {
            let trials: Vec<(i64, RunRow)> =
                self.runs.values().filter(|l| l.row.parent_id.is_none()).map(|l| (l.row.id, l.row.clone())).collect();
            let active = self.runs.values().filter(|l| l.row.status.is_active()).count();
            if trials.len() >= space.settings.num_runs || active >= space.settings.max_concurrent {
                return Ok(());
            }
            let mut history = Vec::new();
            for (id, row) in &trials {
                let Some(values) = crate::tpe::values_of(&space, row.group as usize, &row.knobs) else { continue };
                let score = if row.status.is_active() {
                    None
                } else {
                    let last = self.store.metrics(*id)?.iter().filter(|m| m.name == "chunk").map(|m| m.value as i64).max();
                    let score = match last {
                        Some(c) => self.rung_score(*id, c)?.map(|s| s.0),
                        None => None,
                    };
                    match score {
                        Some(s) => Some(s),
                        // Deleted before its first chunk end: no result, not a bad one.
                        None if row.status == RunStatus::Deleted => None,
                        None => Some(f64::INFINITY),
                    }
                };
                history.push(crate::tpe::Trial { group: row.group as usize, values, score });
            }
            let i = trials.len();
            let (g, values) = crate::tpe::propose(&space, i, &history);
            let mut leaf = match space.leaf(g, &values, &self.exp.spec_path) {
                Ok(leaf) => leaf,
                Err(e) => {
                    self.log(format!("tpe: trial {} cannot be made ({e}); no more trials are proposed", i + 1));
                    return Ok(());
                }
            };
            let d = &mut leaf.spec.data;
            d.train = std::path::absolute(&d.train).unwrap_or_else(|_| d.train.clone());
            d.eval = d.eval.as_deref().map(|e| std::path::absolute(e).unwrap_or_else(|_| e.to_path_buf()));
            let config = serde_json::to_value(&leaf.spec).map_err(|source| Error::Encode { what: "a run's config", source })?;
            let knobs: serde_json::Map<String, serde_json::Value> =
                leaf.knobs.iter().map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null))).collect();
            let id = self.store.add_run(self.exp.id, &config, &serde_json::Value::Object(knobs), g as i64, 0, 0, None)?;
            let row = self.store.run(id)?;
            let what = leaf.knobs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
            self.log(format!("tpe: trial {} of {} proposed as run {id}: {what}", i + 1, space.settings.num_runs));
            self.runs.insert(id, Live { row, spec: leaf.spec, trainer: None });
            self.status_set(id, RunStatus::New, Some(format!("tpe trial {}", i + 1)));
        }
    }

    /// Records an op the policy applied to run `id` with the status it sets (one
    /// transaction) and publishes both.
    fn policy_op(&mut self, id: i64, kind: OpKind, step: i64, msg: String, status: RunStatus) -> Result<()> {
        self.log(format!("run {id}: {msg}"));
        let op = self.store.add_applied_op(id, &kind, "policy", step, &msg, status)?;
        self.status_set(id, status, Some(msg.clone()));
        let _ = self.events.send(Event::Op {
            experiment: self.exp.name.clone(),
            op_id: op,
            run_id: id,
            op: kind.name().into(),
            status: "applied".into(),
            message: Some(msg),
            new_run_id: None,
        });
        Ok(())
    }

    /// A run's eval loss at the end of chunk `rung` (its training loss there without
    /// eval data) and the step that ended the chunk, if it got there.
    fn rung_score(&self, id: i64, rung: i64) -> Result<Option<(f64, i64)>> {
        let metrics = self.store.metrics(id)?;
        let Some(step) = metrics.iter().find(|m| m.name == "chunk" && m.value as i64 == rung).map(|m| m.step) else {
            return Ok(None);
        };
        let at = |name: &str| metrics.iter().find(|m| m.step == step && m.name == name).map(|m| m.value);
        // A run without a loss there (none recorded) ranks last.
        Ok(Some((rank_score(&at).unwrap_or(f64::INFINITY), step)))
    }

    /// Writes a run's checkpoint (atomically) and records it; older ones are removed,
    /// except those at a multiple of the run's `save_every` (kept, as `furnace train` keeps
    /// them).
    fn checkpoint(&mut self, id: i64) -> Result<()> {
        let Some(live) = self.runs.get(&id) else { return Ok(()) };
        let Some(t) = live.trainer.as_ref() else { return Ok(()) };
        let step = t.steps_done() as i64;
        let chunks = t.chunks_done() as i64;
        let old = live.row.checkpoint_step;
        if old == Some(step) {
            // The store names this step's checkpoint and the state has not moved since:
            // never overwrite the folder the store names.
            return Ok(());
        }
        write_checkpoint(&self.exp, id, t, &live.spec.model.base, old)?;
        let every = live.spec.trainer.save_every as i64;
        self.store.set_checkpoint(id, step, chunks)?;
        if let Some(l) = self.runs.get_mut(&id) {
            l.row.checkpoint_step = Some(step);
        }
        if let Some(o) = old.filter(|&o| o != step && (every == 0 || o % every != 0)) {
            let _ = std::fs::remove_dir_all(checkpoint_dir(&self.exp, id, o));
            furnace_hub::failpoint::hit("checkpoint.old_removed");
        }
        Ok(())
    }

    /// Marks a stop/resume/delete op applied and sets its run's status, in one
    /// transaction.
    fn status_op(&mut self, op: &OpRow, status: RunStatus, what: &str, step: Option<i64>) -> Result<()> {
        self.store.apply_status_op(op.id, op.run_id, status, what, step)?;
        self.status_set(op.run_id, status, Some(format!("{what} by op {}", op.id)));
        Ok(())
    }

    /// A run that took all its steps: its adapter is saved and registered
    /// ([`crate::registry::register_run`], as `EXP/run-N`), and it is completed.
    fn finish(&mut self, id: i64) -> Result<()> {
        if let Some(live) = self.runs.get_mut(&id) {
            if let Some(t) = live.trainer.as_ref() {
                let dir = run_dir(&self.exp, id).join("adapter");
                t.lora.save_peft(&dir, &live.spec.model.base)?;
                crate::registry::register_run(&self.store, &self.exp, &self.store.run(id)?, &dir)?;
            }
            live.trainer = None;
        }
        self.set_status(id, RunStatus::Completed, None)
    }

    /// Applies the pending ops; returns the runs that became trainable in the current
    /// round (warm clones forked from a resident parent).
    /// `between_rounds`: no run is in the middle of a chunk (a base may be swapped in).
    fn apply_ops(&mut self, between_rounds: bool) -> Result<Vec<i64>> {
        let mut joined = Vec::new();
        for op in self.store.pending_ops(self.exp.id)? {
            let step = self.runs.get(&op.run_id).map(|l| l.row.steps_done);
            // An applied op is marked in the same transaction as its effect (apply_op);
            // a rejected one here.
            let (applied, msg, new_run) = match self.apply_op(&op, between_rounds, step) {
                // Stays pending until the round ends.
                Ok(None) => continue,
                Ok(Some((msg, new_run))) => (true, msg, new_run),
                Err(e) => {
                    let msg = e.to_string();
                    self.store.finish_op(op.id, false, Some(&msg), None, step)?;
                    (false, msg, None)
                }
            };
            let outcome = if applied { "applied" } else { "rejected" };
            self.log(format!("op {} ({} run {}) {outcome}: {msg}", op.id, op.kind.name(), op.run_id));
            let _ = self.events.send(Event::Op {
                experiment: self.exp.name.clone(),
                op_id: op.id,
                run_id: op.run_id,
                op: op.kind.name().into(),
                status: outcome.into(),
                message: Some(msg),
                new_run_id: new_run,
            });
            joined.extend(new_run);
        }
        Ok(joined)
    }

    /// Applies one op: `Ok(None)` leaves it pending (a warm clone whose parent's base is
    /// not loaded, in the middle of a round).
    /// An applied op is marked applied in the transaction that records its effect.
    fn apply_op(&mut self, op: &OpRow, between_rounds: bool, step: Option<i64>) -> Result<Option<(String, Option<i64>)>> {
        let id = op.run_id;
        let status = self
            .runs
            .get(&id)
            .map(|l| l.row.status)
            .ok_or_else(|| Error::RunNotInExperiment { run: id, experiment: self.exp.name.clone() })?;
        match &op.kind {
            OpKind::Stop => {
                if !status.is_active() {
                    return Err(Error::Invalid(format!("run {id} is {}; only a new or ongoing run can stop", status.as_str())));
                }
                // Its state is kept: in memory, and on disk for a restart.
                self.checkpoint(id)?;
                self.status_op(op, RunStatus::Stopped, "stopped", step)?;
                Ok(Some(("stopped".into(), None)))
            }
            OpKind::Resume => {
                if status != RunStatus::Stopped {
                    return Err(Error::Invalid(format!("run {id} is {}; only a stopped run can resume", status.as_str())));
                }
                self.status_op(op, RunStatus::Ongoing, "resumed", step)?;
                Ok(Some(("resumed".into(), None)))
            }
            OpKind::Delete => {
                if status == RunStatus::Deleted {
                    return Err(Error::Invalid(format!("run {id} is already deleted")));
                }
                if let Some(l) = self.runs.get_mut(&id) {
                    l.trainer = None;
                }
                self.status_op(op, RunStatus::Deleted, "deleted (files kept)", step)?;
                Ok(Some(("deleted (files kept)".into(), None)))
            }
            OpKind::Clone { set, warm } => {
                if status == RunStatus::Deleted {
                    return Err(Error::Invalid(format!("run {id} is deleted; it cannot be cloned")));
                }
                let parent = self.runs.get(&id).map(|l| (l.row.clone(), l.spec.clone())).ok_or(Error::RunNotFound { run: id })?;
                let spec = apply_overrides(&parent.0.config, set)?;
                let mut knobs = parent.0.knobs.as_object().cloned().unwrap_or_default();
                for s in set {
                    let (section, key, value) = crate::ops::parse_set(s)?;
                    knobs.insert(format!("{section}.{key}"), value);
                }
                let config = serde_json::to_value(&spec).map_err(|source| Error::Encode { what: "a run's config", source })?;
                let knobs = serde_json::Value::Object(knobs);
                if !*warm {
                    // The run and the op's applied mark: one transaction.
                    let clone = NewClone {
                        config: &config,
                        knobs: &knobs,
                        group: parent.0.group,
                        warm: None,
                        message: "cold clone: run {run}",
                        step,
                    };
                    let new = self.store.apply_clone_op(op, &clone, &mut |_| Ok(()))?;
                    let row = self.store.run(new)?;
                    self.runs.insert(new, Live { row, spec, trainer: None });
                    return Ok(Some((format!("cold clone: run {new}"), Some(new))));
                }
                check_warm(&parent.1, &spec)?;
                // The parent's state is needed now, on its base: load that between rounds,
                // wait for the round's end otherwise.
                if self.loaded.as_ref().is_none_or(|l| l.key != group_key(&parent.1)) {
                    if !between_rounds {
                        return Ok(None);
                    }
                    self.ensure_group(&group_key(&parent.1))?;
                }
                self.ensure_trainer(id)?;
                let loaded = self.loaded.as_mut().ok_or(Error::Internal("no base loaded"))?;
                let (train, _) = loaded.data(&spec)?;
                let pt = self
                    .runs
                    .get(&id)
                    .and_then(|l| l.trainer.as_ref())
                    .ok_or_else(|| Error::Invalid(format!("run {id} has no state to clone")))?;
                let mut child = pt.fork(spec.train_config(&train), spec.lora_config(), &train)?;
                equip(&mut child, &spec, &loaded.model.model)?;
                let (steps, chunks) = (child.steps_done() as i64, child.chunks_done() as i64);
                // The run (ongoing, at the fork point), its checkpoint and the op's applied
                // mark: one transaction, the checkpoint written before it commits. After a
                // crash the clone resumes from the fork point, or its op makes it again.
                let msg = format!("warm clone: run {{run}} continues from step {steps} of run {id}");
                let clone =
                    NewClone { config: &config, knobs: &knobs, group: parent.0.group, warm: Some((steps, chunks)), message: &msg, step };
                let (exp, base) = (self.exp.clone(), spec.model.base.clone());
                let new = self.store.apply_clone_op(op, &clone, &mut |new| write_checkpoint(&exp, new, &child, &base, None))?;
                let row = self.store.run(new)?;
                self.runs.insert(new, Live { row, spec, trainer: None });
                self.register(new, child, &train)?;
                self.status_set(new, RunStatus::Ongoing, Some(format!("warm clone of run {id} at step {steps}")));
                Ok(Some((format!("warm clone: run {new} continues from step {steps} of run {id}"), Some(new))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// (run, step): a fused step that takes this run to this step fails, after it ran.
        static FAIL_AT: Cell<Option<(i64, usize)>> = const { Cell::new(None) };
    }

    /// The failure a test injected into the step of `ids` that gave `metrics`, if any.
    pub(super) fn injected_failure(ids: &[i64], metrics: &[StepMetrics]) -> Option<furnace_train::Error> {
        let (run, step) = FAIL_AT.with(Cell::get)?;
        let hit = ids.iter().zip(metrics).any(|(&id, m)| id == run && m.step == step);
        hit.then(|| furnace_train::Error::Input(format!("injected failure of run {run} at step {step}")))
    }

    /// An experiment over 24 rows of the extraction task on tiny-llama, two runs (r = 2, 4).
    fn experiment(dir: &Path) -> (Store, ExperimentRow) {
        let rows = |file: &str, n: usize| -> String {
            let text = std::fs::read_to_string(furnace_testutil::repo_root().join("data/extract").join(file)).unwrap();
            text.lines().take(n).map(|l| format!("{l}\n")).collect()
        };
        std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 24)).unwrap();
        std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 6)).unwrap();
        let base = furnace_testutil::testdata().join("tiny-llama").display().to_string().replace('\\', "/");
        let spec = format!(
            "[experiment]\nname = \"exp\"\nseed = 3\nnum_chunks = 2\n\n[data]\ntrain = \"train.jsonl\"\neval = \"eval.jsonl\"\n\n\
             [model]\nbase = \"{base}\"\n\n[lora]\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\"]\nr = {{ list = [2, 4] }}\n\n\
             [trainer]\nlearning_rate = 1e-2\nbatch_size = 2\ngrad_accum = 2\nmax_seq_len = 96\nschedule = \"constant\"\n"
        );
        std::fs::write(dir.join("spec.toml"), spec).unwrap();
        let store = Store::open_in(&dir.join("runs")).unwrap();
        let exp = crate::experiment::create(&store, &dir.join("spec.toml")).unwrap();
        (store, exp)
    }

    fn fit(store: &Store, exp: &ExperimentRow) -> Vec<RunRow> {
        let mut load = |name: &str, dtype| Ok(LoadedModel::load(Path::new(name), dtype)?);
        run_fit(store, exp, &mut load, &FitOptions::default(), &crate::events::channel()).unwrap().runs
    }

    fn losses(store: &Store, run: i64) -> Vec<(i64, f64)> {
        store.metrics(run).unwrap().into_iter().filter(|m| m.name == "loss").map(|m| (m.step, m.value)).collect()
    }

    #[test]
    fn a_failed_fused_step_is_retried_alone_and_fails_only_the_run_that_fails_alone() {
        let (d, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store, exp) = experiment(d.path());
        let (ref_store, ref_exp) = experiment(d1.path());
        let reference = fit(&ref_store, &ref_exp);
        let runs = store.runs(exp.id).unwrap();
        let (good, bad) = (runs[0].id, runs[1].id);
        // Step 5 of the r=4 run fails, after the fused step moved both trainers (the good
        // one's state is then one step on, which the retry must not build on).
        FAIL_AT.with(|f| f.set(Some((bad, 5))));
        let runs = fit(&store, &exp);
        FAIL_AT.with(|f| f.set(None));
        assert_eq!(runs[1].status, RunStatus::Failed, "{:?}", runs[1]);
        let msg = runs[1].error.clone().unwrap();
        assert!(msg.contains("step 5") && msg.contains("injected failure") && msg.contains("alone"), "{msg}");
        assert_eq!(runs[0].status, RunStatus::Completed, "{:?}", runs[0]);
        // The good run took exactly the steps it takes without the failure.
        let (got, want) = (losses(&store, good), losses(&ref_store, reference[0].id));
        assert_eq!(got.iter().map(|s| s.0).collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>());
        for ((step, a), (_, b)) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "step {step}: {a} vs {b}");
        }
        // The bad run's steps before the failure stay.
        assert_eq!(losses(&store, bad).iter().map(|s| s.0).collect::<Vec<_>>(), (1..=4).collect::<Vec<_>>());
    }
}
