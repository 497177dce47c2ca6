//! The evals scheduler, on the caller's (dedicated) thread: shard by shard, round-robin
//! (no pipeline starts shard k+1 before every active pipeline finished shard k), each
//! round's pipelines on one base model generating in one continuous batch (adapters mixed),
//! retrieval indexes built once per distinct index on a builder thread while pipelines
//! that need none (or whose index is ready) go on, ops applied and the race policy decided
//! at shard boundaries, every shard recorded in one store transaction.

use crate::dataset::{self, EvalSet, Example};
use crate::error::{Error, Result};
use crate::generator::{GenOutput, GenRequest, Message, Sampling};
use crate::interval::IntervalOptions;
use crate::openai::OpenAiGenerator;
use crate::prompt::{Renderer, ShotPool};
use crate::score::{estimates, parse_judge_score, Scorer};
use crate::spec::{EvalSpec, GeneratorSpec, RagSection};
use furnace_exp::{Estimate, Event, EventSender, ExampleRecord, ExperimentRow, OpKind, OpRow, RunRow, RunStatus, Store};
use furnace_generate::{Engine, EngineOptions, Event as GenEvent, Request, SamplingParams};
use furnace_model::lora::AdapterId;
use furnace_model::{LoadedModel, WeightDType};
use furnace_rag::collection::{BuildSettings, Index, SearchKind, SearchOptions, VectorKind};
use furnace_rag::split::{LengthUnit, SplitKind, SplitterConfig};
use furnace_rag::{CrossEncoder, SentenceEncoder};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

/// Loads a base model by name with the given weights (the CLI's shows pull progress).
pub type Loader<'a> = dyn FnMut(&str, WeightDType) -> furnace_exp::Result<LoadedModel> + 'a;

/// How [`run_evals`] runs.
#[derive(Clone)]
pub struct EvalOptions {
    /// Set to stop at the next step of generation; the shard under way is not recorded
    /// and is done again when the experiment continues.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where retrieval indexes are kept (default: `indexes/` next to the store).
    pub index_root: Option<PathBuf>,
    /// Most sequences in one generation step.
    pub max_batch: usize,
    /// Generate for one pipeline at a time instead of batching a round's pipelines
    /// together (the baseline of `furnace bench evals`).
    pub sequential: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { cancel: None, index_root: None, max_batch: 64, sequential: false }
    }
}

/// What [`run_evals`] did.
#[derive(Debug)]
pub struct EvalSummary {
    /// Every pipeline (run) of the experiment, as stored at the end.
    pub runs: Vec<RunRow>,
    /// Whether it ended because it was cancelled.
    pub cancelled: bool,
}

/// A pipeline's spec from a run's stored config.
pub fn pipeline_spec(run: &RunRow) -> Result<EvalSpec> {
    let spec: EvalSpec = serde_json::from_value(run.config.clone())
        .map_err(|e| Error::Invalid(format!("run {}: its stored config is not an evals pipeline: {e}", run.id)))?;
    spec.validate()?;
    Ok(spec)
}

/// What identifies an index: the documents, the splitter and the encoder.
fn index_key(r: &RagSection) -> String {
    serde_json::json!([r.documents, r.splitter, r.chunk_size, r.chunk_overlap, r.length, r.embedding_model, r.vectors]).to_string()
}

/// How an index of this retrieval section is built.
pub fn build_settings(r: &RagSection) -> BuildSettings {
    let splitter = SplitterConfig {
        kind: if r.splitter == "markdown" { SplitKind::Markdown } else { SplitKind::Recursive },
        chunk_size: r.chunk_size,
        chunk_overlap: r.chunk_overlap,
        length: if r.length == "tokens" { LengthUnit::Tokens } else { LengthUnit::Chars },
        ..SplitterConfig::default()
    };
    let vectors = if r.vectors == "hnsw" {
        let p = furnace_rag::index::HnswParams::default();
        VectorKind::Hnsw { m: p.m, ef_construction: p.ef_construction, ef_search: p.ef_search }
    } else {
        VectorKind::Exact
    };
    BuildSettings { splitter, load: Default::default(), vectors }
}

fn search_options(r: &RagSection) -> SearchOptions {
    let kind = match r.search.as_str() {
        "mmr" => SearchKind::Mmr { fetch_k: r.fetch_k, lambda_mult: r.lambda_mult },
        "threshold" => SearchKind::Threshold(r.threshold.unwrap_or(0.0)),
        _ => SearchKind::Similarity,
    };
    SearchOptions { k: r.k, kind, hybrid: r.hybrid, top_n: r.reranker.as_ref().and(r.top_n), ..Default::default() }
}

fn dtype_of(g: &GeneratorSpec) -> WeightDType {
    match g.quantize.as_deref() {
        Some("none" | "f32") => WeightDType::F32,
        Some("q8" | "q4") => WeightDType::Quantized,
        _ => WeightDType::Bf16,
    }
}

fn model_key(g: &GeneratorSpec) -> String {
    format!("{}|{:?}", g.model, dtype_of(g))
}

/// A resident base model and the adapters registered in it.
struct LocalModel {
    loaded: LoadedModel,
    adapters: HashMap<PathBuf, (AdapterId, String)>,
}

/// What the rounds share: models, encoders, indexes, API clients.
struct Resources {
    models: HashMap<String, LocalModel>,
    encoders: HashMap<String, SentenceEncoder>,
    rerankers: HashMap<String, CrossEncoder>,
    indexes: HashMap<String, std::result::Result<Index, String>>,
    requested: HashSet<String>,
    shots: HashMap<String, ShotPool>,
    apis: HashMap<String, OpenAiGenerator>,
}

impl Resources {
    fn encoder(&mut self, name: &str) -> Result<&SentenceEncoder> {
        if !self.encoders.contains_key(name) {
            let enc =
                SentenceEncoder::load(name, &mut |_| {}).map_err(|e| Error::Invalid(format!("loading the embedding model {name}: {e}")))?;
            self.encoders.insert(name.to_string(), enc);
        }
        self.encoders.get(name).ok_or_else(|| Error::Invalid(format!("embedding model {name} not loaded")))
    }

    fn reranker(&mut self, name: &str) -> Result<()> {
        if !self.rerankers.contains_key(name) {
            let ce = CrossEncoder::load(name, &mut |_| {}).map_err(|e| Error::Invalid(format!("loading the reranker {name}: {e}")))?;
            self.rerankers.insert(name.to_string(), ce);
        }
        Ok(())
    }

    fn model(&mut self, g: &GeneratorSpec, loader: &mut Loader<'_>, log: &dyn Fn(String)) -> Result<&mut LocalModel> {
        let key = model_key(g);
        if !self.models.contains_key(&key) {
            log(format!("loading {} ({:?})", g.model, dtype_of(g)));
            let loaded = loader(&g.model, dtype_of(g))?;
            self.models.insert(key.clone(), LocalModel { loaded, adapters: HashMap::new() });
        }
        let lm = self.models.get_mut(&key).ok_or_else(|| Error::Invalid("model not loaded".into()))?;
        if let Some(dir) = &g.adapter {
            if !lm.adapters.contains_key(dir) {
                let a = furnace_model::load_adapter(dir).map_err(|e| Error::Invalid(format!("generator.adapter: {e}")))?;
                let id =
                    lm.loaded.model.add_adapter(&a).map_err(|e| Error::Invalid(format!("generator.adapter {}: {e}", dir.display())))?;
                let name = format!("adapter-{}", lm.adapters.len());
                lm.adapters.insert(dir.clone(), (id, name));
            }
        }
        Ok(lm)
    }

    fn api(&mut self, section: &str, g: &GeneratorSpec) -> Result<&OpenAiGenerator> {
        let cfg = crate::spec::openai_config(section, g)?;
        let key = serde_json::to_string(g).unwrap_or_default();
        if !self.apis.contains_key(&key) {
            self.apis.insert(key.clone(), OpenAiGenerator::new(cfg)?);
        }
        self.apis.get(&key).ok_or_else(|| Error::Invalid("client not made".into()))
    }
}

/// One pipeline in memory.
struct Pipe {
    run: RunRow,
    spec: EvalSpec,
    scorers: Vec<Scorer>,
    renderer: Renderer,
    done: Vec<ExampleRecord>,
    wall: f64,
    cost: Option<f64>,
    last: Vec<Estimate>,
    /// The extra columns `prompt.preprocess` returned for the shard under way.
    columns: serde_json::Map<String, serde_json::Value>,
    /// The metric names each function metric (by scorer index) returned so far.
    fn_names: BTreeMap<usize, Vec<String>>,
}

impl Pipe {
    fn new(run: RunRow, store: &Store) -> Result<Self> {
        let mut spec = pipeline_spec(&run)?;
        // A clone may name a training run (`--set generator.run=EXP/run-N`).
        for g in [Some(&mut spec.generator), spec.judge.as_mut()].into_iter().flatten() {
            if let Some(r) = g.run.take() {
                g.adapter = Some(crate::experiment::run_adapter(store, &r)?);
            }
        }
        let scorers = Scorer::all(&spec)?;
        // Every user function must be registered before the pipeline starts.
        if let Some(h) = &spec.prompt.preprocess {
            crate::userfn::require(h, "prompt.preprocess")?;
        }
        if let Some(h) = &spec.generator.postprocess {
            crate::userfn::require(h, "generator.postprocess")?;
        }
        for (i, m) in spec.metrics.iter().enumerate() {
            for (h, k) in [(&m.compute, "compute"), (&m.accumulate, "accumulate")] {
                if let Some(h) = h {
                    crate::userfn::require(h, &format!("metric[{i}].{k}"))?;
                }
            }
        }
        let rag = spec.rag.as_ref();
        let renderer = Renderer::new(&spec.prompt, rag.map(|r| r.document_template.as_str()), rag.map(|r| r.separator.as_str()))?;
        let done = store.eval_examples(run.id)?;
        Ok(Pipe {
            run,
            spec,
            scorers,
            renderer,
            done,
            wall: 0.0,
            cost: None,
            last: Vec::new(),
            columns: serde_json::Map::new(),
            fn_names: BTreeMap::new(),
        })
    }

    fn primary_bounds(&self) -> Option<(f64, f64, bool)> {
        let (name, higher) = self.spec.primary()?;
        let e = self.last.iter().find(|e| e.name == name)?;
        let (lo, hi) = e.bounds?;
        Some((lo, hi, higher))
    }
}

/// One question of one pipeline in a round.
struct Job {
    pipe: usize,
    example: usize,
    messages: Vec<Message>,
    /// The prompt as user functions see it (`prompt.preprocess`'s, else the messages).
    prompt: serde_json::Value,
    retrieved: Vec<String>,
    context: String,
    out: Option<std::result::Result<GenOutput, String>>,
}

struct Driver<'a, 'l> {
    store: Store,
    exp: ExperimentRow,
    events: &'a EventSender,
    loader: &'a mut Loader<'l>,
    opts: &'a EvalOptions,
    set: EvalSet,
    shards: Vec<Vec<usize>>,
    res: Resources,
    pipes: BTreeMap<i64, Pipe>,
    index_tx: mpsc::Sender<(String, RagSection)>,
    index_rx: mpsc::Receiver<(String, std::result::Result<Index, String>)>,
}

fn cancelled(opts: &EvalOptions) -> bool {
    opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Runs the unfinished pipelines of an evals experiment to their end (or until
/// cancelled); ops recorded meanwhile (stop, resume, delete, clone) take effect at shard
/// boundaries. A pipeline's failure (a template that does not render, an adapter that
/// does not load, an API that answers nothing) fails that run only.
pub fn run_evals(
    store: &Store,
    exp: &ExperimentRow,
    loader: &mut Loader<'_>,
    opts: &EvalOptions,
    events: &EventSender,
) -> Result<EvalSummary> {
    let store = store.reopen()?;
    store.set_experiment_status(exp.id, "running")?;
    let runs = store.runs(exp.id)?;
    let first = runs.first().ok_or_else(|| Error::Invalid(format!("experiment {} has no pipelines", exp.name)))?;
    let spec0 = pipeline_spec(first)?;
    let set = dataset::load(&spec0.data)?;
    let seed = spec0.data.seed.unwrap_or(spec0.experiment.seed);
    let shards = dataset::shards(set.examples.len(), spec0.data.num_shards, seed);
    let index_root = match &opts.index_root {
        Some(r) => r.clone(),
        None => store.path().parent().map(|p| p.join("indexes")).unwrap_or_else(|| PathBuf::from("indexes")),
    };
    let (index_tx, req_rx) = mpsc::channel::<(String, RagSection)>();
    let (res_tx, index_rx) = mpsc::channel();
    let ev = events.clone();
    let exp_name = exp.name.clone();
    // The index builder: its own encoders, one index at a time, in request order.
    let builder = std::thread::Builder::new()
        .name("furnace-evals-index".into())
        .spawn(move || {
            let mut encoders: HashMap<String, SentenceEncoder> = HashMap::new();
            for (key, rag) in req_rx {
                let started = Instant::now();
                let result = (|| -> std::result::Result<Index, String> {
                    if !encoders.contains_key(&rag.embedding_model) {
                        let e = SentenceEncoder::load(&rag.embedding_model, &mut |_| {}).map_err(|e| e.to_string())?;
                        encoders.insert(rag.embedding_model.clone(), e);
                    }
                    let enc = encoders.get(&rag.embedding_model).ok_or("encoder missing")?;
                    let report = furnace_rag::collection::build(&index_root, &rag.documents, &build_settings(&rag), enc, &mut |_| {})
                        .map_err(|e| e.to_string())?;
                    Ok(report.index)
                })();
                let msg = match &result {
                    Ok(i) => format!(
                        "index {} ready: {} chunks (chunk_size {}, {}) in {:.1}s",
                        i.id(),
                        i.manifest().chunks,
                        rag.chunk_size,
                        rag.embedding_model,
                        started.elapsed().as_secs_f64()
                    ),
                    Err(e) => format!("index for chunk_size {} failed: {e}", rag.chunk_size),
                };
                let _ = ev.send(Event::Log { experiment: exp_name.clone(), message: msg });
                if res_tx.send((key, result)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Error::Invalid(format!("starting the index builder: {e}")))?;
    let res = Resources {
        models: HashMap::new(),
        encoders: HashMap::new(),
        rerankers: HashMap::new(),
        indexes: HashMap::new(),
        requested: HashSet::new(),
        shots: HashMap::new(),
        apis: HashMap::new(),
    };
    let mut d = Driver { store, exp: exp.clone(), events, loader, opts, set, shards, res, pipes: BTreeMap::new(), index_tx, index_rx };
    let out = d.run();
    drop(d.index_tx);
    let _ = builder.join();
    let summary = out?;
    let done = summary.runs.iter().all(|r| !r.status.is_active());
    d.store.set_experiment_status(exp.id, if done && !summary.cancelled { "done" } else { "running" })?;
    Ok(summary)
}

impl Driver<'_, '_> {
    fn log(&self, message: String) {
        let _ = self.events.send(Event::Log { experiment: self.exp.name.clone(), message });
    }

    fn status(&self, run: i64, status: RunStatus, message: Option<String>) {
        let _ = self.events.send(Event::Status { experiment: self.exp.name.clone(), run_id: run, status, message });
    }

    fn fail(&mut self, run: i64, why: &str) -> Result<()> {
        self.store.set_run_status(run, RunStatus::Failed, Some(why))?;
        self.status(run, RunStatus::Failed, Some(why.to_string()));
        self.pipes.remove(&run);
        Ok(())
    }

    fn run(&mut self) -> Result<EvalSummary> {
        let total = self.shards.len() as i64;
        for r in self.store.runs(self.exp.id)? {
            if r.total_steps != total {
                self.store.set_totals(r.id, total, total)?;
            }
        }
        let mut cancelled_flag = false;
        loop {
            if cancelled(self.opts) {
                cancelled_flag = true;
                break;
            }
            self.apply_ops()?;
            let runs: Vec<RunRow> =
                self.store.runs(self.exp.id)?.into_iter().filter(|r| r.status.is_active() && r.steps_done < total).collect();
            if runs.is_empty() {
                break;
            }
            // Pipelines in memory (a crash or a clone brings new ones).
            for r in &runs {
                if !self.pipes.contains_key(&r.id) {
                    match Pipe::new(r.clone(), &self.store) {
                        Ok(p) => {
                            self.pipes.insert(r.id, p);
                        }
                        Err(e) => {
                            self.fail(r.id, &e.to_string())?;
                            continue;
                        }
                    }
                }
                if let Some(p) = self.pipes.get_mut(&r.id) {
                    p.run = r.clone();
                }
            }
            self.request_indexes();
            self.take_indexes(false);
            let k = runs.iter().map(|r| r.steps_done).min().unwrap_or(0);
            let mut cohort: Vec<i64> = runs.iter().filter(|r| r.steps_done == k && self.pipes.contains_key(&r.id)).map(|r| r.id).collect();
            let ready: Vec<i64> = cohort.iter().copied().filter(|id| self.index_ready(*id)).collect();
            if ready.is_empty() && !cohort.is_empty() {
                // Every pipeline at this shard waits for an index: wait for one.
                self.take_indexes(true);
                continue;
            }
            // Pipelines whose index is still building lag behind and catch up later.
            cohort = ready;
            if cohort.is_empty() {
                continue;
            }
            let failed: Vec<i64> = cohort.iter().copied().filter(|id| self.index_failed(*id)).collect();
            for id in failed {
                let why = self.index_error(id);
                self.fail(id, &why)?;
            }
            cohort.retain(|id| self.pipes.contains_key(id));
            if !cohort.is_empty() && !self.round(&cohort, k as usize)? {
                cancelled_flag = true;
                break;
            }
            self.race()?;
        }
        Ok(EvalSummary { runs: self.store.runs(self.exp.id)?, cancelled: cancelled_flag })
    }

    fn rag_of(&self, id: i64) -> Option<&RagSection> {
        self.pipes.get(&id).and_then(|p| p.spec.rag.as_ref())
    }

    fn index_ready(&self, id: i64) -> bool {
        self.rag_of(id).is_none_or(|r| self.res.indexes.contains_key(&index_key(r)))
    }

    fn index_failed(&self, id: i64) -> bool {
        self.rag_of(id).is_some_and(|r| matches!(self.res.indexes.get(&index_key(r)), Some(Err(_))))
    }

    fn index_error(&self, id: i64) -> String {
        match self.rag_of(id).and_then(|r| self.res.indexes.get(&index_key(r))) {
            Some(Err(e)) => format!("building its index: {e}"),
            _ => "its index is missing".into(),
        }
    }

    fn request_indexes(&mut self) {
        let wanted: Vec<(String, RagSection)> =
            self.pipes.values().filter_map(|p| p.spec.rag.as_ref()).map(|r| (index_key(r), r.clone())).collect();
        for (key, rag) in wanted {
            if self.res.requested.insert(key.clone()) {
                let _ = self.index_tx.send((key, rag));
            }
        }
    }

    fn take_indexes(&mut self, block: bool) {
        if block {
            if let Ok((k, r)) = self.index_rx.recv() {
                self.res.indexes.insert(k, r);
            }
        }
        while let Ok((k, r)) = self.index_rx.try_recv() {
            self.res.indexes.insert(k, r);
        }
    }

    /// Applies pending ops (stop, resume, delete, clone) at this shard boundary.
    fn apply_ops(&mut self) -> Result<()> {
        for op in self.store.pending_ops(self.exp.id)? {
            let run = self.store.run(op.run_id)?;
            let step = Some(run.steps_done);
            let outcome = furnace_exp::ops::check(&run, &op.kind).and_then(|()| self.apply_op(&op, &run));
            match outcome {
                Ok((message, new_run)) => {
                    self.op_event(&op, "applied", Some(message.clone()), new_run);
                    self.log(format!("op {} ({}) on run {}: {message}", op.id, op.kind.name(), op.run_id));
                }
                Err(e) => {
                    let m = e.to_string();
                    self.store.finish_op(op.id, false, Some(&m), None, step)?;
                    self.op_event(&op, "rejected", Some(m), None);
                }
            }
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &OpRow, run: &RunRow) -> furnace_exp::Result<(String, Option<i64>)> {
        let step = Some(run.steps_done);
        let (status, message) = match &op.kind {
            OpKind::Stop => (RunStatus::Stopped, format!("stopped after shard {}", run.steps_done)),
            OpKind::Resume => (RunStatus::Ongoing, format!("resumed at shard {}", run.steps_done + 1)),
            OpKind::Delete => (RunStatus::Deleted, "deleted".to_string()),
            OpKind::Clone { set, .. } => {
                let config = furnace_exp::ops::apply_eval_overrides(&run.config, set)?;
                let mut knobs = run.knobs.as_object().cloned().unwrap_or_default();
                for s in set {
                    let (section, key, value) = furnace_exp::ops::parse_set_in(s, &furnace_exp::ops::EVAL_SECTIONS)?;
                    knobs.insert(format!("{section}.{key}"), value);
                }
                let knobs = serde_json::Value::Object(knobs);
                let message = format!("clone of run {} as run {{run}} ({}), from shard 1", run.id, set.join(", "));
                let clone =
                    furnace_exp::store::NewClone { config: &config, knobs: &knobs, group: run.group, warm: None, message: &message, step };
                let new = self.store.apply_clone_op(op, &clone, &mut |_| Ok(()))?;
                let total = self.shards.len() as i64;
                self.store.set_totals(new, total, total)?;
                return Ok((message.replace("{run}", &new.to_string()), Some(new)));
            }
        };
        self.store.apply_status_op(op.id, run.id, status, &message, step)?;
        if status != RunStatus::Ongoing {
            self.pipes.remove(&run.id);
        }
        self.status(run.id, status, Some(message.clone()));
        Ok((message, None))
    }

    fn op_event(&self, op: &OpRow, status: &str, message: Option<String>, new_run_id: Option<i64>) {
        let _ = self.events.send(Event::Op {
            experiment: self.exp.name.clone(),
            op_id: op.id,
            run_id: op.run_id,
            op: op.kind.name().to_string(),
            status: status.to_string(),
            message,
            new_run_id,
        });
    }

    /// Stops pipelines whose interval on the primary metric lies wholly below (above,
    /// when lower is better) the best pipeline's.
    fn race(&mut self) -> Result<()> {
        let Some(first) = self.pipes.values().next() else { return Ok(()) };
        if first.spec.experiment.policy != "race" {
            return Ok(());
        }
        // Every pipeline with an interval, active or not (a finished pipeline still
        // bounds the best).
        let bounds: Vec<(i64, f64, f64, bool)> =
            self.pipes.iter().filter_map(|(id, p)| p.primary_bounds().map(|(lo, hi, h)| (*id, lo, hi, h))).collect();
        let Some(&(_, _, _, higher)) = bounds.first() else { return Ok(()) };
        let plain: Vec<(i64, f64, f64)> = bounds.iter().map(|b| (b.0, b.1, b.2)).collect();
        for (id, best_id, best) in separated(&plain, higher) {
            let Some(p) = self.pipes.get(&id) else { continue };
            if !p.run.status.is_active() || p.run.steps_done >= self.shards.len() as i64 {
                continue;
            }
            let (lo, hi) = plain.iter().find(|b| b.0 == id).map(|b| (b.1, b.2)).unwrap_or_default();
            let (name, _) = p.spec.primary().unwrap_or_default();
            let msg = if higher {
                format!("raced out after shard {}: {name} upper bound {hi:.4} < run {best_id}'s lower bound {best:.4}", p.run.steps_done)
            } else {
                format!("raced out after shard {}: {name} lower bound {lo:.4} > run {best_id}'s upper bound {best:.4}", p.run.steps_done)
            };
            let op = self.store.add_applied_op(id, &OpKind::Stop, "policy", p.run.steps_done, &msg, RunStatus::Stopped)?;
            let _ = self.events.send(Event::Op {
                experiment: self.exp.name.clone(),
                op_id: op,
                run_id: id,
                op: "stop".into(),
                status: "applied".into(),
                message: Some(msg.clone()),
                new_run_id: None,
            });
            self.status(id, RunStatus::Stopped, Some(msg));
            self.pipes.remove(&id);
        }
        Ok(())
    }

    /// Shard `k` of every pipeline in `cohort`; false when cancelled part-way.
    fn round(&mut self, cohort: &[i64], k: usize) -> Result<bool> {
        let started = Instant::now();
        let shard = self.shards.get(k).cloned().unwrap_or_default();
        // Prompts (retrieval, few-shot, templates), per pipeline.
        let mut jobs: Vec<Job> = Vec::new();
        let mut failed: Vec<(i64, String)> = Vec::new();
        for (pi, &id) in cohort.iter().enumerate() {
            match self.prompts(id, &shard) {
                Ok(js) => jobs.extend(js.into_iter().map(|mut j| {
                    j.pipe = pi;
                    j
                })),
                Err(e) => failed.push((id, e.to_string())),
            }
        }
        for (id, why) in failed {
            self.fail(id, &why)?;
        }
        let alive: HashSet<usize> = cohort.iter().enumerate().filter(|(_, id)| self.pipes.contains_key(id)).map(|(i, _)| i).collect();
        jobs.retain(|j| alive.contains(&j.pipe));
        // Generation: local pipelines of one base in one batch; API pipelines each on
        // their client.
        let mut by_gen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (ji, j) in jobs.iter().enumerate() {
            let id = cohort[j.pipe];
            let Some(p) = self.pipes.get(&id) else { continue };
            let key = if p.spec.generator.kind == "local" {
                if self.opts.sequential {
                    format!("local|{}|{id}", model_key(&p.spec.generator))
                } else {
                    format!("local|{}", model_key(&p.spec.generator))
                }
            } else {
                format!("api|{id}")
            };
            by_gen.entry(key).or_default().push(ji);
        }
        for (key, idx) in by_gen {
            let id = cohort[jobs[idx[0]].pipe];
            let Some(g) = self.pipes.get(&id).map(|p| p.spec.generator.clone()) else { continue };
            let seed = self.pipes.get(&id).map(|p| p.spec.experiment.seed).unwrap_or(0);
            let reqs: Vec<(GenRequest, Option<PathBuf>)> = idx
                .iter()
                .map(|&ji| {
                    let p = &self.pipes[&cohort[jobs[ji].pipe]];
                    let g = &p.spec.generator;
                    let ex = &self.set.examples[jobs[ji].example];
                    (GenRequest { messages: jobs[ji].messages.clone(), sampling: sampling(g, seed, ex.index) }, g.adapter.clone())
                })
                .collect();
            let outs = if key.starts_with("local|") {
                match self.generate_local(&g, &reqs)? {
                    Some(o) => o,
                    None => return Ok(false),
                }
            } else {
                let api = match self.res.api("generator", &g) {
                    Ok(a) => a,
                    Err(e) => {
                        self.fail(id, &e.to_string())?;
                        continue;
                    }
                };
                let plain: Vec<GenRequest> = reqs.into_iter().map(|(r, _)| r).collect();
                let outs = api.generate(&plain, &mut |_| {});
                let cost: Option<f64> = outs.iter().filter_map(|o| o.as_ref().ok()).map(|o| api.cost(o)).sum();
                if let Some(p) = self.pipes.get_mut(&id) {
                    if let Some(c) = cost {
                        p.cost = Some(p.cost.unwrap_or(0.0) + c);
                    }
                }
                outs.into_iter().map(|o| o.map_err(|e| e.to_string())).collect()
            };
            for (ji, out) in idx.into_iter().zip(outs) {
                jobs[ji].out = Some(out);
            }
        }
        // An API pipeline whose every request failed fails (a wrong URL or key is not a
        // score of 0).
        for (pi, &id) in cohort.iter().enumerate() {
            let mine: Vec<&Job> = jobs.iter().filter(|j| j.pipe == pi).collect();
            if !mine.is_empty() && mine.iter().all(|j| matches!(j.out, Some(Err(_)))) {
                let why = match &mine[0].out {
                    Some(Err(e)) => format!("every request of shard {} failed: {e}", k + 1),
                    _ => String::new(),
                };
                if self.pipes.contains_key(&id) {
                    self.fail(id, &why)?;
                }
            }
        }
        let wall = started.elapsed().as_secs_f64();
        // Scores, judge and command metrics, then one transaction per pipeline.
        for (pi, &id) in cohort.iter().enumerate() {
            if !self.pipes.contains_key(&id) {
                continue;
            }
            let mine: Vec<&Job> = jobs.iter().filter(|j| j.pipe == pi).collect();
            if let Err(e) = self.finish_shard(id, k, &mine, wall) {
                match e {
                    Error::Store(s) => return Err(Error::Store(s)),
                    other => self.fail(id, &other.to_string())?,
                }
            }
        }
        Ok(true)
    }

    /// The prompts of one pipeline for the examples of a shard.
    fn prompts(&mut self, id: i64, shard: &[usize]) -> Result<Vec<Job>> {
        let spec = self.pipes.get(&id).map(|p| p.spec.clone()).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
        let fewshot_encoder = spec
            .prompt
            .fewshot_embedding_model
            .clone()
            .or_else(|| spec.rag.as_ref().map(|r| r.embedding_model.clone()))
            .unwrap_or_else(|| "all-minilm-l6-v2".into());
        let wants_similarity = spec.prompt.fewshot.is_some() && spec.prompt.fewshot_selector != "fixed";
        if let Some(path) = &spec.prompt.fewshot {
            let key = format!("{}|{}", path.display(), if wants_similarity { fewshot_encoder.as_str() } else { "" });
            if !self.res.shots.contains_key(&key) {
                let enc = if wants_similarity { Some(self.res.encoder(&fewshot_encoder)?) } else { None };
                let pool = ShotPool::load(path, enc)?;
                self.res.shots.insert(key.clone(), pool);
            }
        }
        if let Some(r) = &spec.rag {
            self.res.encoder(&r.embedding_model)?;
            if let Some(name) = &r.reranker {
                self.res.reranker(name)?;
            }
        }
        if wants_similarity {
            self.res.encoder(&fewshot_encoder)?;
        }
        let mut jobs = Vec::new();
        let p = self.pipes.get(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
        for &ei in shard {
            let ex: &Example = &self.set.examples[ei];
            let (context, retrieved) = match &spec.rag {
                Some(r) => {
                    let index = match self.res.indexes.get(&index_key(r)) {
                        Some(Ok(i)) => i,
                        _ => return Err(Error::Invalid("its index is not ready".into())),
                    };
                    let enc = self.res.encoders.get(&r.embedding_model).ok_or_else(|| Error::Invalid("encoder missing".into()))?;
                    let rr = r.reranker.as_ref().and_then(|n| self.res.rerankers.get(n));
                    let hits = index
                        .search(enc, &ex.question, &search_options(r), rr)
                        .map_err(|e| Error::Invalid(format!("searching for '{}': {e}", ex.question)))?
                        .hits;
                    (p.renderer.context(&hits)?, hits.iter().map(|h| h.chunk.doc_id.clone()).collect())
                }
                None => (String::new(), Vec::new()),
            };
            let shots = match &spec.prompt.fewshot {
                Some(path) => {
                    let key = format!("{}|{}", path.display(), if wants_similarity { fewshot_encoder.as_str() } else { "" });
                    let pool = self.res.shots.get(&key).ok_or_else(|| Error::Invalid("few-shot pool missing".into()))?;
                    pool.select(&spec.prompt, &ex.question, self.res.encoders.get(&fewshot_encoder))?
                }
                None => Vec::new(),
            };
            let messages = p.renderer.messages(ex, &context, &shots)?;
            let prompt = serde_json::to_value(&messages).map_err(|e| Error::Invalid(e.to_string()))?;
            jobs.push(Job { pipe: 0, example: ei, messages, prompt, retrieved, context, out: None });
        }
        let mut columns = serde_json::Map::new();
        if let Some(name) = &spec.prompt.preprocess {
            let examples: Vec<serde_json::Value> = match &spec.prompt.fewshot {
                Some(path) => {
                    let key = format!("{}|{}", path.display(), if wants_similarity { fewshot_encoder.as_str() } else { "" });
                    let pool = self.res.shots.get(&key).map(|p| p.shots.as_slice()).unwrap_or_default();
                    pool.iter().map(|s| serde_json::json!({"question": s.question, "answer": s.answer})).collect()
                }
                None => Vec::new(),
            };
            let arg = serde_json::json!({
                "rows": jobs.iter().map(|j| self.set.examples[j.example].row.clone()).collect::<Vec<_>>(),
                "questions": jobs.iter().map(|j| self.set.examples[j.example].question.clone()).collect::<Vec<_>>(),
                "contexts": contexts_of(&spec, &jobs),
                "messages": jobs.iter().map(|j| j.prompt.clone()).collect::<Vec<_>>(),
                "instructions": spec.prompt.system,
                "examples": examples,
            });
            let pre = crate::userfn::preprocess(name, arg, jobs.len())?;
            for (j, (prompt, messages)) in jobs.iter_mut().zip(pre.prompts) {
                j.prompt = prompt;
                j.messages = messages;
            }
            columns = pre.columns;
        }
        if let Some(p) = self.pipes.get_mut(&id) {
            p.columns = columns;
        }
        Ok(jobs)
    }

    /// Generates on a local model, every request in one continuous batch; `None` when
    /// cancelled.
    fn generate_local(
        &mut self,
        g: &GeneratorSpec,
        reqs: &[(GenRequest, Option<PathBuf>)],
    ) -> Result<Option<Vec<std::result::Result<GenOutput, String>>>> {
        let events = self.events.clone();
        let exp_name = self.exp.name.clone();
        let log = move |m: String| {
            let _ = events.send(Event::Log { experiment: exp_name.clone(), message: m });
        };
        // Adapters of every request registered first (the engine borrows the model).
        for (_, adapter) in reqs {
            let mut gg = g.clone();
            gg.adapter = adapter.clone();
            self.res.model(&gg, self.loader, &log)?;
        }
        let lm = self.res.model(g, self.loader, &log)?;
        let loaded = &lm.loaded;
        let opts = EngineOptions { max_batch: self.opts.max_batch, ..Default::default() };
        let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, opts);
        for (id, name) in lm.adapters.values() {
            engine.name_adapter(name.clone(), *id).map_err(|e| Error::Generator(e.to_string()))?;
        }
        let mut outs: Vec<Option<std::result::Result<GenOutput, String>>> = vec![None; reqs.len()];
        let mut seq_of = HashMap::new();
        let started = Instant::now();
        for (i, (req, adapter)) in reqs.iter().enumerate() {
            let ids = match prompt_ids(loaded, &req.messages) {
                Ok(ids) => ids,
                Err(e) => {
                    outs[i] = Some(Err(e.to_string()));
                    continue;
                }
            };
            let s = &req.sampling;
            let params = SamplingParams {
                temperature: s.temperature as f32,
                top_p: s.top_p as f32,
                seed: s.seed,
                max_tokens: s.max_tokens,
                stop: s.stop.clone(),
                ..SamplingParams::default()
            };
            let adapter = adapter.as_ref().and_then(|a| lm.adapters.get(a)).map(|(_, n)| n.clone());
            let prompt_len = ids.len();
            match engine.add(Request { prompt: ids, params, adapter, constraint: None }) {
                Ok(seq) => {
                    seq_of.insert(seq, (i, prompt_len));
                }
                Err(e) => outs[i] = Some(Err(e.to_string())),
            }
        }
        let mut latency: HashMap<usize, f64> = HashMap::new();
        while engine.has_work() {
            if cancelled(self.opts) {
                return Ok(None);
            }
            let mut finished = Vec::new();
            engine
                .step(&mut |ev| {
                    if let GenEvent::Finished { seq, .. } = ev {
                        finished.push(seq);
                    }
                })
                .map_err(|e| Error::Generator(e.to_string()))?;
            for seq in finished {
                if let Some((i, _)) = seq_of.get(&seq) {
                    latency.insert(*i, started.elapsed().as_secs_f64());
                }
            }
        }
        let order: Vec<usize> = {
            let mut v: Vec<(furnace_generate::SeqId, usize)> = seq_of.iter().map(|(s, (i, _))| (*s, *i)).collect();
            v.sort_by_key(|(s, _)| *s);
            v.into_iter().map(|(_, i)| i).collect()
        };
        for (o, i) in engine.take_finished().into_iter().zip(order) {
            outs[i] = Some(Ok(GenOutput {
                text: o.text.clone(),
                prompt_tokens: o.prompt_ids.len(),
                completion_tokens: o.new_ids.len(),
                latency: latency.get(&i).copied().unwrap_or(0.0),
                finish_reason: format!("{:?}", o.finish_reason).to_lowercase(),
            }));
        }
        Ok(Some(outs.into_iter().map(|o| o.unwrap_or_else(|| Err("no answer".into()))).collect()))
    }

    /// Scores one pipeline's answers of shard `k` and records the shard.
    fn finish_shard(&mut self, id: i64, k: usize, jobs: &[&Job], wall: f64) -> Result<()> {
        let (scorers_batched, judge, spec) = {
            let p = self.pipes.get(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
            (p.scorers.iter().any(Scorer::is_batched), p.spec.judge.clone(), p.spec.clone())
        };
        let mut records: Vec<ExampleRecord> = Vec::with_capacity(jobs.len());
        let mut outputs: Vec<(String, (usize, usize, f64), String)> = jobs
            .iter()
            .map(|j| match &j.out {
                Some(Ok(o)) => (o.text.trim().to_string(), (o.prompt_tokens, o.completion_tokens, o.latency), o.finish_reason.clone()),
                Some(Err(e)) => (String::new(), (0, 0, 0.0), format!("error: {e}")),
                None => (String::new(), (0, 0, 0.0), "error: no answer".into()),
            })
            .collect();
        // The batch user functions see: postprocess rewrites the answers that are scored.
        let mut batch = serde_json::Map::new();
        batch.insert("rows".into(), jobs.iter().map(|j| self.set.examples[j.example].row.clone()).collect());
        batch.insert("prompts".into(), jobs.iter().map(|j| j.prompt.clone()).collect());
        batch.insert("generated_text".into(), outputs.iter().map(|o| serde_json::Value::from(o.0.clone())).collect());
        batch.insert("contexts".into(), contexts_of(&spec, jobs));
        if let Some(p) = self.pipes.get(&id) {
            for (k, v) in &p.columns {
                if !crate::userfn::BATCH_KEYS.contains(&k.as_str()) {
                    batch.insert(k.clone(), v.clone());
                }
            }
        }
        if let Some(name) = &spec.generator.postprocess {
            let (merged, texts) = crate::userfn::postprocess(name, batch, jobs.len())?;
            for (o, t) in outputs.iter_mut().zip(texts) {
                o.0 = t;
            }
            batch = merged;
        }
        {
            let p = self.pipes.get(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
            for (j, (prediction, usage, reason)) in jobs.iter().zip(outputs) {
                let ex = &self.set.examples[j.example];
                let mut scores = BTreeMap::new();
                for s in p.scorers.iter().filter(|s| !s.is_batched() && !s.is_function()) {
                    scores.insert(s.name.clone(), s.score(ex, &prediction, &j.retrieved));
                }
                records.push(ExampleRecord {
                    example_id: ex.id.clone(),
                    index: ex.index,
                    prediction,
                    retrieved: j.retrieved.clone(),
                    scores,
                    prompt_tokens: usage.0,
                    completion_tokens: usage.1,
                    latency: usage.2,
                    finish_reason: reason,
                });
            }
        }
        if scorers_batched {
            self.batched_scores(id, &spec, judge.as_ref(), jobs, &mut records)?;
        }
        self.function_scores(id, &batch, &mut records)?;
        let shard_sizes: Vec<usize> = self.shards.iter().take(k + 1).map(Vec::len).collect();
        let p = self.pipes.get_mut(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
        p.wall += wall;
        let mut all = p.done.clone();
        all.extend(records.iter().cloned());
        let opts = IntervalOptions {
            method: spec.experiment.interval,
            confidence: spec.experiment.confidence,
            fpc: spec.experiment.fpc,
            population: Some(self.set.examples.len()),
        };
        let mut est = estimates(&p.scorers, &all, &opts, p.wall, p.cost)?;
        let fn_est = function_estimates(p, &all, &shard_sizes, self.shards.len(), &opts)?;
        let at = p.scorers.iter().filter(|s| !s.is_function()).count();
        est.splice(at..at, fn_est);
        if cancelled(self.opts) {
            // A judge or command may have been cut short: the shard is done again when the
            // experiment continues.
            return Ok(());
        }
        self.store.record_shard(id, k as i64, &records, &est)?;
        p.done = all;
        p.last = est.clone();
        p.run.steps_done = k as i64 + 1;
        let primary = p.spec.primary().map(|(n, _)| n);
        let step = k as i64 + 1;
        let total = self.shards.len() as i64;
        for e in &est {
            let _ = self.events.send(Event::Metric {
                experiment: self.exp.name.clone(),
                run_id: id,
                step,
                name: e.name.clone(),
                value: e.value,
            });
            if let Some((lower, upper)) = e.bounds {
                let _ = self.events.send(Event::Interval {
                    experiment: self.exp.name.clone(),
                    run_id: id,
                    step,
                    name: e.name.clone(),
                    value: e.value,
                    lower,
                    upper,
                    primary: primary.as_deref() == Some(e.name.as_str()),
                });
            }
        }
        let _ = self.events.send(Event::Progress {
            experiment: self.exp.name.clone(),
            run_id: id,
            steps_done: step,
            total_steps: total,
            chunks_done: step,
        });
        if step >= total {
            self.store.set_run_status(id, RunStatus::Completed, None)?;
            self.status(id, RunStatus::Completed, None);
        }
        Ok(())
    }

    /// Function metrics of one pipeline's shard: each `compute` gets the (postprocessed)
    /// batch; each metric it returns is stored on every example of the shard (its value)
    /// and, on the shard's first example, the dict's other numeric fields as
    /// `metric/field` (what `accumulate` gets back for earlier shards).
    fn function_scores(
        &mut self,
        id: i64,
        batch: &serde_json::Map<String, serde_json::Value>,
        records: &mut [ExampleRecord],
    ) -> Result<()> {
        let p = self.pipes.get_mut(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
        let mut taken: Vec<String> = p.scorers.iter().filter(|s| !s.is_function()).map(|s| s.name.clone()).collect();
        taken.extend(crate::score::USAGE_METRICS.iter().map(|s| s.to_string()));
        for (si, s) in p.scorers.iter().enumerate() {
            let Some(compute) = s.spec.compute.as_deref().filter(|_| s.is_function()) else { continue };
            let values = crate::userfn::compute(compute, batch, &taken)?;
            let names = p.fn_names.entry(si).or_default();
            for v in values {
                for r in records.iter_mut() {
                    r.scores.insert(v.metric.clone(), v.value);
                }
                if let Some(first) = records.first_mut() {
                    for (field, x) in &v.extra {
                        first.scores.insert(format!("{}/{field}", v.metric), *x);
                    }
                }
                taken.push(v.metric.clone());
                if !names.contains(&v.metric) {
                    names.push(v.metric);
                }
            }
        }
        Ok(())
    }

    /// Command and judge metrics of one pipeline's shard.
    fn batched_scores(
        &mut self,
        id: i64,
        spec: &EvalSpec,
        judge: Option<&GeneratorSpec>,
        jobs: &[&Job],
        records: &mut [ExampleRecord],
    ) -> Result<()> {
        let scorers: Vec<(String, crate::spec::MetricSpec, (f64, f64), bool)> = {
            let p = self.pipes.get(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
            p.scorers.iter().filter(|s| s.is_batched()).map(|s| (s.name.clone(), s.spec.clone(), s.range(), s.spec.info().2)).collect()
        };
        for (name, ms, range, ratio) in scorers {
            if ms.kind == "command" {
                let items: Vec<serde_json::Value> = jobs
                    .iter()
                    .zip(records.iter())
                    .map(|(j, r)| {
                        let ex = &self.set.examples[j.example];
                        serde_json::json!({
                            "id": ex.id, "question": ex.question, "prediction": r.prediction, "answers": ex.answers,
                            "relevant": ex.relevant, "retrieved": r.retrieved, "context": j.context, "row": ex.row,
                        })
                    })
                    .collect();
                let batch = ms.batch_size.unwrap_or(64);
                let p = self.pipes.get(&id).ok_or_else(|| Error::Invalid("pipeline gone".into()))?;
                let scorer = p.scorers.iter().find(|s| s.name == name).ok_or_else(|| Error::Invalid("metric gone".into()))?;
                if ratio {
                    let mut pairs = Vec::new();
                    for chunk in items.chunks(batch) {
                        pairs.extend(scorer.score_command_ratio(chunk)?);
                    }
                    for (r, (num, den)) in records.iter_mut().zip(pairs) {
                        r.scores.insert(format!("{name}/num"), num);
                        r.scores.insert(format!("{name}/den"), den);
                    }
                } else {
                    let mut scores = Vec::new();
                    for chunk in items.chunks(batch) {
                        scores.extend(scorer.score_command(chunk)?);
                    }
                    for (r, v) in records.iter_mut().zip(scores) {
                        if !(v.is_finite() && v >= range.0 && v <= range.1) {
                            return Err(Error::Metric {
                                metric: name.clone(),
                                msg: format!("the program scored {v}, outside the metric's range [{}, {}]", range.0, range.1),
                            });
                        }
                        r.scores.insert(name.clone(), v);
                    }
                }
            } else if let (Some(jg), "judge") = (judge, ms.kind.as_str()) {
                let rubric = ms.rubric.clone().unwrap_or_default();
                let mut env = minijinja::Environment::new();
                env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
                env.add_template_owned("rubric", rubric).map_err(|e| Error::Metric { metric: name.clone(), msg: e.to_string() })?;
                let t = env.get_template("rubric").map_err(|e| Error::Metric { metric: name.clone(), msg: e.to_string() })?;
                let reqs: Vec<(GenRequest, Option<PathBuf>)> = jobs
                    .iter()
                    .zip(records.iter())
                    .map(|(j, r)| {
                        let ex = &self.set.examples[j.example];
                        let text = t
                            .render(furnace_text::json_to_value(&serde_json::json!({
                                "question": ex.question, "prediction": r.prediction, "answers": ex.answers,
                                "answer": ex.answers.first(), "context": j.context,
                            })))
                            .map_err(|e| Error::Metric { metric: name.clone(), msg: format!("rendering the rubric: {e}") })?;
                        let msgs = vec![Message { role: "user".into(), content: text }];
                        Ok((GenRequest { messages: msgs, sampling: sampling(jg, spec.experiment.seed, ex.index) }, jg.adapter.clone()))
                    })
                    .collect::<Result<_>>()?;
                let outs = if jg.kind == "local" {
                    self.generate_local(jg, &reqs)?.unwrap_or_default()
                } else {
                    let api = self.res.api("judge", jg)?;
                    let plain: Vec<GenRequest> = reqs.into_iter().map(|(r, _)| r).collect();
                    api.generate(&plain, &mut |_| {}).into_iter().map(|o| o.map_err(|e| e.to_string())).collect()
                };
                let mut unreadable = 0;
                for (r, o) in records.iter_mut().zip(outs) {
                    let v = o.ok().and_then(|o| parse_judge_score(&o.text, range));
                    if v.is_none() {
                        unreadable += 1;
                    }
                    // An answer that gives no score in range counts as the lowest score.
                    r.scores.insert(name.clone(), v.unwrap_or(range.0));
                }
                if unreadable > 0 {
                    self.log(format!(
                        "run {id}: the judge gave no score in [{}, {}] for {unreadable} of {} answers (counted as {})",
                        range.0,
                        range.1,
                        records.len(),
                        range.0
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The pipelines a race stops: those whose interval `(id, lower, upper)` lies wholly below
/// the best lower bound (above the best upper bound when lower is better), each with the
/// best pipeline and its bound. Valid at every shard because the intervals are
/// anytime-valid (with per-look intervals, stopping on them inflates the error rate).
pub fn separated(bounds: &[(i64, f64, f64)], higher_is_better: bool) -> Vec<(i64, i64, f64)> {
    let best = if higher_is_better {
        bounds.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|b| (b.0, b.1))
    } else {
        bounds.iter().min_by(|a, b| a.2.total_cmp(&b.2)).map(|b| (b.0, b.2))
    };
    let Some((best_id, bound)) = best else { return Vec::new() };
    bounds
        .iter()
        .filter(|b| b.0 != best_id && if higher_is_better { b.2 < bound } else { b.1 > bound })
        .map(|b| (b.0, best_id, bound))
        .collect()
}

/// The retrieval contexts of a pipeline's jobs, as user functions get them (null without
/// `[rag]`).
fn contexts_of(spec: &EvalSpec, jobs: &[impl std::borrow::Borrow<Job>]) -> serde_json::Value {
    jobs.iter()
        .map(|j| match spec.rag {
            Some(_) => serde_json::Value::from(j.borrow().context.clone()),
            None => serde_json::Value::Null,
        })
        .collect()
}

/// The estimates of a pipeline's function metrics over the examples scored so far,
/// `all`, whose shards have the sizes `shard_sizes` (in order).
fn function_estimates(
    p: &Pipe,
    all: &[ExampleRecord],
    shard_sizes: &[usize],
    total_shards: usize,
    opts: &IntervalOptions,
) -> Result<Vec<Estimate>> {
    let mut out = Vec::new();
    let mut taken: Vec<String> = p.scorers.iter().filter(|s| !s.is_function()).map(|s| s.name.clone()).collect();
    taken.extend(crate::score::USAGE_METRICS.iter().map(|s| s.to_string()));
    taken.extend(p.fn_names.values().flatten().cloned());
    for (si, s) in p.scorers.iter().enumerate() {
        if !s.is_function() {
            continue;
        }
        let names = p.fn_names.get(&si).cloned().unwrap_or_default();
        let metrics: Vec<crate::userfn::Shards<'_>> = names
            .iter()
            .map(|metric| {
                let mut batches = Vec::new();
                let mut rest = all;
                for (i, &size) in shard_sizes.iter().enumerate() {
                    let (shard, tail) = rest.split_at(size.min(rest.len()));
                    rest = tail;
                    if let Some(d) = shard.first().and_then(|r| crate::userfn::stored_dict(metric, &r.scores)) {
                        batches.push((i, d, shard.len()));
                    }
                }
                crate::userfn::Shards { metric, batches }
            })
            .collect();
        if metrics.is_empty() {
            continue;
        }
        out.extend(crate::userfn::estimates(s.spec.accumulate.as_deref(), &metrics, &taken, total_shards, opts)?);
    }
    Ok(out)
}

/// Sampling of one request: the generator's settings, seeded per example so answers do
/// not depend on batching or order.
fn sampling(g: &GeneratorSpec, seed: u64, example: usize) -> Sampling {
    Sampling {
        max_tokens: g.max_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        seed: Some(g.seed.unwrap_or(seed).wrapping_add(example as u64)),
        stop: g.stop.clone(),
    }
}

/// The prompt ids of chat messages on a local model (its chat template, or the contents
/// joined when it has none).
pub fn prompt_ids(loaded: &LoadedModel, messages: &[Message]) -> Result<Vec<u32>> {
    let tok = &loaded.tokenizer;
    let text = match &loaded.chat_template {
        Some(t) => {
            let msgs: Vec<furnace_text::ChatMessage> =
                messages.iter().map(|m| furnace_text::ChatMessage { role: m.role.clone(), content: m.content.clone() }).collect();
            t.render(&msgs, true, tok.bos_token(), tok.eos_token()).map_err(|e| Error::Generator(format!("chat template: {e}")))?
        }
        None => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"),
    };
    tok.encode(&text, loaded.chat_template.is_none()).map_err(|e| Error::Generator(format!("tokenizing: {e}")))
}

#[cfg(test)]
mod tests {
    use super::separated;

    #[test]
    fn a_race_stops_only_separated_pipelines() {
        // 1 is best (lower 0.6); 2 overlaps it (upper 0.65); 3 lies below (upper 0.55);
        // 4 touches (upper exactly 0.6) and stays.
        let b = [(1, 0.6, 0.9), (2, 0.3, 0.65), (3, 0.2, 0.55), (4, 0.4, 0.6)];
        assert_eq!(separated(&b, true), vec![(3, 1, 0.6)]);
        // Lower is better: the best has the lowest upper bound (0.55, run 3); runs whose
        // lower bound exceeds it stop.
        assert_eq!(separated(&b, false), vec![(1, 3, 0.55)]);
        // Overlapping intervals: nobody stops.
        assert!(separated(&[(1, 0.4, 0.6), (2, 0.5, 0.7)], true).is_empty());
        assert!(separated(&[], true).is_empty());
    }
}
