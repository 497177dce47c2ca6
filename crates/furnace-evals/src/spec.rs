//! The evals spec (TOML): `[experiment] mode = "evals"`, `[data]`, `[rag]`, `[prompt]`,
//! `[generator]`, `[judge]` and `[[metric]]`s. Knobs (`k = { list = [2, 4] }`) and
//! `[[group]]`s may stand in `[rag]`, `[prompt]` and `[generator]`, and expand into
//! pipelines (one run each) as training specs expand into runs; every leaf is validated
//! before anything runs.

use crate::error::{Error, Result};
use crate::interval::Method;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The sections whose settings may be knobs, be overridden by a `[[group]]`, and be
/// changed by a clone.
pub const KNOB_SECTIONS: [&str; 4] = ["rag", "prompt", "generator", "judge"];
/// The most shards an eval set may be cut into.
pub const MAX_SHARDS: usize = 10_000;
/// The largest `k` of a search or a retrieval metric.
pub const MAX_K: usize = 1_000;
/// The most tokens a generator may be asked for.
pub const MAX_TOKENS: usize = 32_768;
/// The most metrics a spec may hold.
pub const MAX_METRICS: usize = 64;

fn spec_err(key: &str, msg: impl Into<String>) -> Error {
    Error::Spec { key: key.to_string(), msg: msg.into() }
}

/// One pipeline's full spec (a leaf of the expanded spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// `[experiment]`.
    pub experiment: ExperimentSection,
    /// `[data]`: the eval set.
    pub data: DataSection,
    /// `[rag]`: retrieval, or none.
    #[serde(default)]
    pub rag: Option<RagSection>,
    /// `[prompt]`.
    #[serde(default)]
    pub prompt: PromptSection,
    /// `[generator]`.
    #[serde(default)]
    pub generator: GeneratorSpec,
    /// `[judge]`: the generator LLM-as-judge metrics ask.
    #[serde(default)]
    pub judge: Option<GeneratorSpec>,
    /// `[[metric]]`s.
    #[serde(default, rename = "metric")]
    pub metrics: Vec<MetricSpec>,
}

/// `[experiment]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    /// The experiment's name.
    pub name: String,
    /// `evals`.
    pub mode: String,
    /// Seed of the shard permutation (unless `[data] seed`) and of sampling.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `none`, or `race`: stop a pipeline once its interval on the primary metric is
    /// separated from the best pipeline's.
    #[serde(default = "default_policy")]
    pub policy: String,
    /// The metric pipelines are ranked and raced by (default: the first `[[metric]]`).
    #[serde(default)]
    pub primary: Option<String>,
    /// How intervals are computed: `confseq` (anytime-valid, the default), `normal`,
    /// `wilson`, `hoeffding`.
    #[serde(default)]
    pub interval: Method,
    /// Confidence of every interval.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Finite population correction (the eval set is the whole population).
    #[serde(default = "default_true")]
    pub fpc: bool,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_seed() -> u64 {
    42
}
fn default_policy() -> String {
    "none".into()
}
fn default_confidence() -> f64 {
    0.95
}
fn default_true() -> bool {
    true
}

/// `[data]`: the eval set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL, JSON, CSV or Parquet (relative to the spec's folder).
    pub path: PathBuf,
    /// The question column.
    #[serde(default = "default_question")]
    pub question: String,
    /// The reference answer column (a string or a list of strings); default `answers`
    /// when the rows have it, else `answer`.
    #[serde(default)]
    pub answers: Option<String>,
    /// The relevant document ids column (for retrieval metrics); default `relevant`.
    #[serde(default)]
    pub relevant: Option<String>,
    /// The example id column; default `id` when the rows have it, else the row number.
    #[serde(default)]
    pub id: Option<String>,
    /// Shards the eval set is cut into (after a seeded shuffle).
    #[serde(default = "default_shards")]
    pub num_shards: usize,
    /// Seed of the shuffle (default: `[experiment] seed`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Use only the first `limit` rows of the file.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_question() -> String {
    "question".into()
}
fn default_shards() -> usize {
    8
}

/// `[rag]`: how context is retrieved for each question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RagSection {
    /// Files, folders or globs of documents (relative to the spec's folder).
    pub documents: Vec<PathBuf>,
    /// `recursive` (LangChain's RecursiveCharacterTextSplitter) or `markdown` (split at
    /// headers, then recursively).
    #[serde(default = "default_splitter")]
    pub splitter: String,
    /// Chunk length, in `length` units.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: usize,
    /// Overlap between neighbouring chunks.
    #[serde(default = "default_chunk_overlap")]
    pub chunk_overlap: usize,
    /// `chars` or `tokens` (of the embedding model).
    #[serde(default = "default_length")]
    pub length: String,
    /// The sentence encoder (an alias, a folder).
    #[serde(default = "default_embedding")]
    pub embedding_model: String,
    /// `exact` or `hnsw`.
    #[serde(default = "default_vectors")]
    pub vectors: String,
    /// `similarity`, `mmr` or `threshold`.
    #[serde(default = "default_search")]
    pub search: String,
    /// Chunks retrieved.
    #[serde(default = "default_k")]
    pub k: usize,
    /// MMR: candidates fetched first.
    #[serde(default = "default_fetch_k")]
    pub fetch_k: usize,
    /// MMR: relevance (1) against diversity (0).
    #[serde(default = "default_lambda")]
    pub lambda_mult: f32,
    /// `threshold`: the lowest similarity kept.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// Fuse vector and BM25 results (reciprocal rank fusion).
    #[serde(default)]
    pub hybrid: bool,
    /// A cross-encoder that reorders the `k` results.
    #[serde(default)]
    pub reranker: Option<String>,
    /// With a reranker: keep the best `top_n` (at most `k`).
    #[serde(default)]
    pub top_n: Option<usize>,
    /// How one retrieved chunk is written into the context (minijinja over `text`,
    /// `doc_id`, `rank`, `score`, `metadata`).
    #[serde(default = "default_document_template")]
    pub document_template: String,
    /// Between two chunks in the context.
    #[serde(default = "default_separator")]
    pub separator: String,
}

fn default_splitter() -> String {
    "recursive".into()
}
fn default_chunk_size() -> usize {
    512
}
fn default_chunk_overlap() -> usize {
    64
}
fn default_length() -> String {
    "chars".into()
}
fn default_embedding() -> String {
    "all-minilm-l6-v2".into()
}
fn default_vectors() -> String {
    "exact".into()
}
fn default_search() -> String {
    "similarity".into()
}
fn default_k() -> usize {
    4
}
fn default_fetch_k() -> usize {
    20
}
fn default_lambda() -> f32 {
    0.5
}
fn default_document_template() -> String {
    "{{ text }}".into()
}
fn default_separator() -> String {
    "\n\n".into()
}

/// `[prompt]`: the messages each question becomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSection {
    /// The system message (minijinja; none when empty).
    #[serde(default)]
    pub system: Option<String>,
    /// The user message (minijinja over `question`, `context`, `examples`, `row`).
    #[serde(default = "default_template")]
    pub template: String,
    /// Few-shot examples (JSONL/CSV/Parquet rows with `question` and `answer`).
    #[serde(default)]
    pub fewshot: Option<PathBuf>,
    /// `fixed` (the first `fewshot_k`), `similarity` or `mmr` (by the question's
    /// embedding).
    #[serde(default = "default_selector")]
    pub fewshot_selector: String,
    /// Examples per question.
    #[serde(default = "default_fewshot_k")]
    pub fewshot_k: usize,
    /// The encoder that picks examples by similarity (default: `[rag] embedding_model`,
    /// else all-minilm-l6-v2).
    #[serde(default)]
    pub fewshot_embedding_model: Option<String>,
    /// `messages`: each example is a user and an assistant turn before the question;
    /// `template`: examples are only given to the template (as `examples`).
    #[serde(default = "default_fewshot_style")]
    pub fewshot_style: String,
    /// A user function (`"python:NAME"`) that gets each shard's rows, questions,
    /// contexts and the messages furnace built, and returns the prompts the generator gets
    /// (and extra per-row columns for `generator.postprocess` and function metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<String>,
}

impl Default for PromptSection {
    fn default() -> Self {
        PromptSection {
            system: None,
            template: default_template(),
            fewshot: None,
            fewshot_selector: default_selector(),
            fewshot_k: default_fewshot_k(),
            fewshot_embedding_model: None,
            fewshot_style: default_fewshot_style(),
            preprocess: None,
        }
    }
}

fn default_template() -> String {
    "{% if context %}Context:\n{{ context }}\n\n{% endif %}Question: {{ question }}".into()
}
fn default_selector() -> String {
    "fixed".into()
}
fn default_fewshot_k() -> usize {
    2
}
fn default_fewshot_style() -> String {
    "messages".into()
}

/// `[generator]` (and `[judge]`): who answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    /// `local` (a furnace model) or `openai` (an OpenAI-compatible API).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Local: the model (an alias, a `.gguf`, an HF folder); OpenAI: the model name.
    #[serde(default = "default_model")]
    pub model: String,
    /// Local: how the base is held (`none`/`f32`, `bf16`, `q8`, `q4`; default: as stored).
    #[serde(default)]
    pub quantize: Option<String>,
    /// Local: a PEFT adapter folder (relative to the spec's folder).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Local: the adapter a training run of this store produced, `EXPERIMENT/run-N`, or a
    /// name or tag of the adapter registry (instead of `adapter`; a knob over runs compares fine-tuned adapters).
    #[serde(default)]
    pub run: Option<String>,
    /// Most tokens per answer.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus sampling.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Sampling seed (default: `[experiment] seed`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Vec<String>,
    /// OpenAI: e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// OpenAI: the environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// OpenAI: requests per minute.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// OpenAI: tokens per minute.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// OpenAI: retries of a request (429, 5xx, timeouts).
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// OpenAI: seconds per attempt.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// OpenAI: requests in flight at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// OpenAI: price per million prompt tokens (for the `cost` metric).
    #[serde(default)]
    pub input_price_per_million: Option<f64>,
    /// OpenAI: price per million completion tokens.
    #[serde(default)]
    pub output_price_per_million: Option<f64>,
    /// `[generator]` only: a user function (`"python:NAME"`) that gets each shard's
    /// generated texts and returns the ones that are scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postprocess: Option<String>,
}

impl Default for GeneratorSpec {
    fn default() -> Self {
        GeneratorSpec {
            kind: default_kind(),
            model: default_model(),
            quantize: None,
            adapter: None,
            run: None,
            max_tokens: default_max_tokens(),
            temperature: 0.0,
            top_p: default_top_p(),
            seed: None,
            stop: Vec::new(),
            base_url: None,
            api_key_env: None,
            rpm: None,
            tpm: None,
            max_retries: None,
            timeout_secs: None,
            concurrency: None,
            input_price_per_million: None,
            output_price_per_million: None,
            postprocess: None,
        }
    }
}

fn default_kind() -> String {
    "local".into()
}
fn default_model() -> String {
    "smollm2-135m-instruct".into()
}
fn default_max_tokens() -> usize {
    64
}
fn default_top_p() -> f64 {
    1.0
}

/// One `[[metric]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// `exact_match`, `contains`, `token_f1`, `rouge_l`, `bleu`, `regex`,
    /// `numeric_match`, `json_valid`, `json_field`, `precision_at_k`, `recall_at_k`,
    /// `hit_rate`, `mrr`, `ndcg_at_k`, `judge`, `command` or `function`.
    pub kind: String,
    /// Its name in results (default: the kind; a retrieval metric's without `_at_k`, with
    /// `@k` when it sets its own `k`; a function metric's `compute`, whose results are
    /// recorded under the names it returns).
    #[serde(default)]
    pub name: Option<String>,
    /// Text metrics: SQuAD's answer normalisation before comparing.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Retrieval metrics: the cutoff (default `[rag] k`).
    #[serde(default)]
    pub k: Option<usize>,
    /// `regex`: the pattern.
    #[serde(default)]
    pub pattern: Option<String>,
    /// `json_field`: a dotted path (`a.b.0`).
    #[serde(default)]
    pub field: Option<String>,
    /// `numeric_match`: relative tolerance.
    #[serde(default)]
    pub rel_tol: Option<f64>,
    /// `numeric_match`: absolute tolerance.
    #[serde(default)]
    pub abs_tol: Option<f64>,
    /// `command`: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// `command`: examples per call.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// `command`, `judge`: seconds per call.
    #[serde(default)]
    pub timeout_secs: Option<f64>,
    /// `judge`: the rubric (minijinja over `question`, `prediction`, `answers`,
    /// `context`); the judge answers with a score.
    #[serde(default)]
    pub rubric: Option<String>,
    /// The values' range `[low, high]` (built-ins know theirs; `command` and `judge`
    /// default to `[0, 1]`).
    #[serde(default)]
    pub range: Option<[f64; 2]>,
    /// `mean` (per example) or `ratio` (of sums: the command writes `{"num", "den"}`).
    #[serde(default)]
    pub aggregate: Option<String>,
    /// Whether higher is better (built-ins: yes).
    #[serde(default)]
    pub higher_is_better: Option<bool>,
    /// `function`: the user function (`"python:NAME"`) called once per shard with the
    /// shard's (postprocessed) batch; it returns `{"MetricName": {"value": x}, ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<String>,
    /// `function`: the user function that combines the per-shard values of each metric
    /// (default: their mean weighted by shard size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accumulate: Option<String>,
}

/// The retrieval metric kinds.
pub const RETRIEVAL_KINDS: [&str; 5] = ["precision_at_k", "recall_at_k", "hit_rate", "mrr", "ndcg_at_k"];
/// The text metric kinds (prediction against references).
pub const TEXT_KINDS: [&str; 9] =
    ["exact_match", "contains", "token_f1", "rouge_l", "bleu", "regex", "numeric_match", "json_valid", "json_field"];

impl MetricSpec {
    /// Whether it is computed by user functions (`kind = "function"`).
    pub fn is_function(&self) -> bool {
        self.kind == "function"
    }

    /// Whether it scores retrieved documents.
    pub fn is_retrieval(&self) -> bool {
        RETRIEVAL_KINDS.contains(&self.kind.as_str())
    }

    /// Its name in results.
    pub fn display_name(&self, rag_k: Option<usize>) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        if self.is_retrieval() {
            // Without its own k a retrieval metric is taken at each pipeline's `[rag] k`
            // and keeps one name across pipelines.
            let base = self.kind.trim_end_matches("_at_k");
            return match self.k {
                Some(k) => format!("{base}@{k}"),
                None => base.to_string(),
            };
        }
        let _ = rag_k;
        if self.is_function() {
            if let Some(c) = &self.compute {
                return c.clone();
            }
        }
        self.kind.clone()
    }

    /// Its range, whether it is a ratio of sums, and whether higher is better.
    pub fn info(&self) -> (f64, f64, bool, bool) {
        let [lo, hi] = self.range.unwrap_or([0.0, 1.0]);
        let ratio = self.aggregate.as_deref() == Some("ratio");
        (lo, hi, ratio, self.higher_is_better.unwrap_or(true))
    }
}

impl EvalSpec {
    /// Reads and validates one leaf from TOML text; relative paths are made absolute
    /// against `spec_path`'s folder.
    pub fn parse(text: &str, spec_path: &Path) -> Result<Self> {
        let mut spec: EvalSpec = toml::from_str(text).map_err(|e| Error::Invalid(format!("{}: {}", spec_path.display(), e.message())))?;
        spec.anchor(spec_path);
        spec.validate()?;
        Ok(spec)
    }

    fn anchor(&mut self, spec_path: &Path) {
        let dir = spec_path.parent().unwrap_or(Path::new("."));
        let abs = |p: &Path| -> PathBuf {
            let joined = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
            std::path::absolute(&joined).unwrap_or(joined)
        };
        self.data.path = abs(&self.data.path);
        if let Some(r) = &mut self.rag {
            r.documents = r.documents.iter().map(|d| abs(d)).collect();
        }
        if let Some(f) = &self.prompt.fewshot {
            self.prompt.fewshot = Some(abs(f));
        }
        if let Some(a) = &self.generator.adapter {
            self.generator.adapter = Some(abs(a));
        }
    }

    /// The names of its metrics, in order.
    pub fn metric_names(&self) -> Vec<String> {
        let k = self.rag.as_ref().map(|r| r.k);
        self.metrics.iter().map(|m| m.display_name(k)).collect()
    }

    /// The primary metric's name and whether higher is better.
    pub fn primary(&self) -> Option<(String, bool)> {
        let names = self.metric_names();
        let i = match &self.experiment.primary {
            Some(p) => match names.iter().position(|n| n == p) {
                Some(i) => i,
                // A name a function metric returns (known only once it ran).
                None => {
                    let f = self.metrics.iter().find(|m| m.is_function())?;
                    return Some((p.clone(), f.info().3));
                }
            },
            None => 0,
        };
        let m = self.metrics.get(i)?;
        Some((names[i].clone(), m.info().3))
    }

    /// Checks every setting; errors name the key and say what to fix.
    pub fn validate(&self) -> Result<()> {
        let e = &self.experiment;
        if e.mode != "evals" {
            return Err(spec_err("experiment.mode", format!("'{}' is not evals", e.mode)));
        }
        if e.name.trim().is_empty() || e.name.len() > 128 || e.name.contains(['/', '\\']) {
            return Err(spec_err("experiment.name", "must be 1-128 characters without slashes"));
        }
        if !["none", "race"].contains(&e.policy.as_str()) {
            return Err(spec_err("experiment.policy", format!("'{}' is not none or race", e.policy)));
        }
        if !(e.confidence > 0.0 && e.confidence < 1.0) {
            return Err(spec_err("experiment.confidence", "must be between 0 and 1 (e.g. 0.95)"));
        }
        let d = &self.data;
        if d.num_shards == 0 || d.num_shards > MAX_SHARDS {
            return Err(spec_err("data.num_shards", format!("must be between 1 and {MAX_SHARDS}")));
        }
        if d.limit == Some(0) {
            return Err(spec_err("data.limit", "must be at least 1"));
        }
        if let Some(r) = &self.rag {
            validate_rag(r)?;
        }
        validate_prompt(&self.prompt)?;
        validate_generator("generator", &self.generator)?;
        if let Some(j) = &self.judge {
            validate_generator("judge", j)?;
        }
        if self.metrics.is_empty() {
            return Err(spec_err("metric", "add at least one [[metric]] (e.g. kind = \"contains\")"));
        }
        if self.metrics.len() > MAX_METRICS {
            return Err(spec_err("metric", format!("at most {MAX_METRICS} metrics")));
        }
        let names = self.metric_names();
        for (i, m) in self.metrics.iter().enumerate() {
            self.validate_metric(i, m)?;
            if names[..i].contains(&names[i]) {
                return Err(spec_err(&format!("metric[{i}].name"), format!("'{}' is taken by an earlier metric: give a name", names[i])));
            }
        }
        if let Some(p) = &e.primary {
            if !names.contains(p) && !self.metrics.iter().any(MetricSpec::is_function) {
                return Err(spec_err("experiment.primary", format!("'{p}' is not a metric (metrics: {})", names.join(", "))));
            }
        }
        Ok(())
    }

    fn validate_metric(&self, i: usize, m: &MetricSpec) -> Result<()> {
        let key = |k: &str| format!("metric[{i}].{k}");
        let kind = m.kind.as_str();
        let known = TEXT_KINDS.contains(&kind) || m.is_retrieval() || ["judge", "command", "function"].contains(&kind);
        if !known {
            return Err(spec_err(
                &key("kind"),
                format!("'{kind}' is not a metric ({}, {}, judge, command, function)", TEXT_KINDS.join(", "), RETRIEVAL_KINDS.join(", ")),
            ));
        }
        if m.is_function() {
            let c = m.compute.as_deref().ok_or_else(|| spec_err(&key("compute"), "a function metric needs compute = \"python:NAME\""))?;
            check_hook_name(&key("compute"), c)?;
            if let Some(a) = &m.accumulate {
                check_hook_name(&key("accumulate"), a)?;
            }
            if m.range.is_some() || m.aggregate.is_some() {
                let k = if m.range.is_some() { "range" } else { "aggregate" };
                return Err(spec_err(
                    &key(k),
                    "a function metric's values come from compute (and accumulate, whose value_range gives the range)",
                ));
            }
        } else if m.compute.is_some() || m.accumulate.is_some() {
            let k = if m.compute.is_some() { "compute" } else { "accumulate" };
            return Err(spec_err(&key(k), format!("only kind = \"function\" metrics take {k}, not {kind}")));
        }
        if m.is_retrieval() {
            let Some(rag) = &self.rag else {
                return Err(spec_err(&key("kind"), format!("{kind} scores retrieved documents, but the spec has no [rag]")));
            };
            let k = m.k.unwrap_or(rag.k);
            if k == 0 || k > MAX_K {
                return Err(spec_err(&key("k"), format!("must be between 1 and {MAX_K}")));
            }
        } else if m.k.is_some() {
            return Err(spec_err(&key("k"), format!("only retrieval metrics take k, not {kind}")));
        }
        match kind {
            "regex" => {
                let p = m.pattern.as_deref().ok_or_else(|| spec_err(&key("pattern"), "a regex metric needs a pattern"))?;
                regex::Regex::new(p).map_err(|e| spec_err(&key("pattern"), format!("not a regular expression: {e}")))?;
            }
            "json_field" if m.field.as_deref().is_none_or(str::is_empty) => {
                return Err(spec_err(&key("field"), "a json_field metric needs field = \"a.b\""));
            }
            "command" if m.command.is_empty() => {
                return Err(spec_err(&key("command"), "a command metric needs command = [\"program\", \"arg\", ...]"));
            }
            "judge" => {
                if self.judge.is_none() {
                    return Err(spec_err(&key("kind"), "a judge metric needs a [judge] generator (kind = \"local\" or \"openai\")"));
                }
                if m.rubric.as_deref().is_none_or(|r| r.trim().is_empty()) {
                    return Err(spec_err(&key("rubric"), "a judge metric needs a rubric (the prompt that asks for a score)"));
                }
            }
            _ => {}
        }
        for (v, k) in [(m.rel_tol, "rel_tol"), (m.abs_tol, "abs_tol"), (m.timeout_secs, "timeout_secs")] {
            if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                return Err(spec_err(&key(k), "must be a finite number >= 0"));
            }
        }
        if let Some([lo, hi]) = m.range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return Err(spec_err(&key("range"), "must be [low, high] with low < high"));
            }
            if TEXT_KINDS.contains(&kind) || m.is_retrieval() {
                return Err(spec_err(&key("range"), format!("{kind} is in [0, 1]; only command and judge metrics take a range")));
            }
        }
        match m.aggregate.as_deref() {
            None | Some("mean") => {}
            Some("ratio") if kind == "command" => {}
            Some("ratio") => return Err(spec_err(&key("aggregate"), "only command metrics can be a ratio of sums")),
            Some(o) => return Err(spec_err(&key("aggregate"), format!("'{o}' is not mean or ratio"))),
        }
        if m.batch_size == Some(0) {
            return Err(spec_err(&key("batch_size"), "must be at least 1"));
        }
        Ok(())
    }
}

fn validate_rag(r: &RagSection) -> Result<()> {
    if r.documents.is_empty() {
        return Err(spec_err("rag.documents", "list the document files or folders"));
    }
    if !["recursive", "markdown"].contains(&r.splitter.as_str()) {
        return Err(spec_err("rag.splitter", format!("'{}' is not recursive or markdown", r.splitter)));
    }
    if r.chunk_size == 0 || r.chunk_size > 1_000_000 {
        return Err(spec_err("rag.chunk_size", "must be between 1 and 1000000"));
    }
    if r.chunk_overlap >= r.chunk_size {
        return Err(spec_err("rag.chunk_overlap", format!("must be below chunk_size ({})", r.chunk_size)));
    }
    if !["chars", "tokens"].contains(&r.length.as_str()) {
        return Err(spec_err("rag.length", format!("'{}' is not chars or tokens", r.length)));
    }
    if !["exact", "hnsw"].contains(&r.vectors.as_str()) {
        return Err(spec_err("rag.vectors", format!("'{}' is not exact or hnsw", r.vectors)));
    }
    if !["similarity", "mmr", "threshold"].contains(&r.search.as_str()) {
        return Err(spec_err("rag.search", format!("'{}' is not similarity, mmr or threshold", r.search)));
    }
    if r.k == 0 || r.k > MAX_K {
        return Err(spec_err("rag.k", format!("must be between 1 and {MAX_K}")));
    }
    if r.search == "mmr" && (r.fetch_k < r.k || r.fetch_k > 10 * MAX_K) {
        return Err(spec_err("rag.fetch_k", format!("must be at least k ({}) and at most {}", r.k, 10 * MAX_K)));
    }
    if !(0.0..=1.0).contains(&r.lambda_mult) {
        return Err(spec_err("rag.lambda_mult", "must be between 0 and 1"));
    }
    match (r.search.as_str(), r.threshold) {
        ("threshold", None) => return Err(spec_err("rag.threshold", "search = \"threshold\" needs threshold = 0.5 (a similarity)")),
        ("threshold", Some(t)) if !t.is_finite() => return Err(spec_err("rag.threshold", "must be a number")),
        (s, Some(_)) if s != "threshold" => return Err(spec_err("rag.threshold", "is used only with search = \"threshold\"")),
        _ => {}
    }
    match (r.top_n, &r.reranker) {
        (Some(n), Some(_)) if n == 0 || n > r.k => {
            return Err(spec_err("rag.top_n", format!("must be between 1 and k ({}): the reranker keeps top_n of the k retrieved", r.k)))
        }
        (Some(_), None) => return Err(spec_err("rag.top_n", "needs a reranker (rag.reranker)")),
        _ => {}
    }
    check_template("rag.document_template", &r.document_template)
}

fn validate_prompt(p: &PromptSection) -> Result<()> {
    check_template("prompt.template", &p.template)?;
    if let Some(s) = &p.system {
        check_template("prompt.system", s)?;
    }
    if !["fixed", "similarity", "mmr"].contains(&p.fewshot_selector.as_str()) {
        return Err(spec_err("prompt.fewshot_selector", format!("'{}' is not fixed, similarity or mmr", p.fewshot_selector)));
    }
    if !["messages", "template"].contains(&p.fewshot_style.as_str()) {
        return Err(spec_err("prompt.fewshot_style", format!("'{}' is not messages or template", p.fewshot_style)));
    }
    if p.fewshot_k > 64 {
        return Err(spec_err("prompt.fewshot_k", "must be at most 64"));
    }
    if let Some(h) = &p.preprocess {
        check_hook_name("prompt.preprocess", h)?;
    }
    Ok(())
}

/// Checks that a setting names a user function (`"python:NAME"`).
fn check_hook_name(key: &str, value: &str) -> Result<()> {
    if furnace_train::hooks::is_hook_name(value) {
        Ok(())
    } else {
        Err(spec_err(key, format!("'{value}' does not name a user function (\"python:NAME\")")))
    }
}

/// Checks that a minijinja template parses.
fn check_template(key: &str, source: &str) -> Result<()> {
    let env = minijinja::Environment::new();
    env.template_from_str(source).map(|_| ()).map_err(|e| spec_err(key, format!("not a valid template: {e}")))
}

fn validate_generator(section: &str, g: &GeneratorSpec) -> Result<()> {
    let key = |k: &str| format!("{section}.{k}");
    if g.max_tokens == 0 || g.max_tokens > MAX_TOKENS {
        return Err(spec_err(&key("max_tokens"), format!("must be between 1 and {MAX_TOKENS}")));
    }
    if !(g.temperature.is_finite() && (0.0..=10.0).contains(&g.temperature)) {
        return Err(spec_err(&key("temperature"), "must be between 0 and 10"));
    }
    if !(g.top_p > 0.0 && g.top_p <= 1.0) {
        return Err(spec_err(&key("top_p"), "must be in (0, 1]"));
    }
    if g.model.trim().is_empty() {
        return Err(spec_err(&key("model"), "name the model"));
    }
    if let Some(h) = &g.postprocess {
        if section != "generator" {
            return Err(spec_err(&key("postprocess"), "only [generator] answers are postprocessed"));
        }
        check_hook_name(&key("postprocess"), h)?;
    }
    let openai_keys: [(&str, bool); 9] = [
        ("base_url", g.base_url.is_some()),
        ("api_key_env", g.api_key_env.is_some()),
        ("rpm", g.rpm.is_some()),
        ("tpm", g.tpm.is_some()),
        ("max_retries", g.max_retries.is_some()),
        ("timeout_secs", g.timeout_secs.is_some()),
        ("concurrency", g.concurrency.is_some()),
        ("input_price_per_million", g.input_price_per_million.is_some()),
        ("output_price_per_million", g.output_price_per_million.is_some()),
    ];
    match g.kind.as_str() {
        "local" => {
            if let Some((k, _)) = openai_keys.iter().find(|(_, set)| *set) {
                return Err(spec_err(&key(k), "is a setting of kind = \"openai\" generators, not local ones"));
            }
            if let Some(q) = &g.quantize {
                if !["none", "f32", "bf16", "q8", "q4"].contains(&q.as_str()) {
                    return Err(spec_err(&key("quantize"), format!("'{q}' is not none, f32, bf16, q8 or q4")));
                }
            }
            if let Some(r) = &g.run {
                if g.adapter.is_some() {
                    return Err(spec_err(&key("run"), "give adapter or run, not both"));
                }
                if r.trim().is_empty() {
                    return Err(spec_err(
                        &key("run"),
                        "name a training run (EXPERIMENT/run-N, e.g. extract/run-3) or a registered adapter",
                    ));
                }
            }
        }
        "openai" => {
            if g.quantize.is_some() || g.adapter.is_some() || g.run.is_some() {
                return Err(spec_err(&key("adapter"), "quantize, adapter and run are settings of local generators"));
            }
            openai_config(section, g)?.validate()?;
        }
        o => return Err(spec_err(&key("kind"), format!("'{o}' is not local or openai"))),
    }
    Ok(())
}

/// One expanded pipeline: its spec, its knob values and its group.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Index of its `[[group]]`.
    pub group: usize,
    /// The knob values it took, by `section.key`.
    pub knobs: Vec<(String, toml::Value)>,
    /// The validated spec.
    pub spec: EvalSpec,
}

/// Expands an evals spec into its pipelines (knobs, `[[group]]`s, grid or random search),
/// each validated.
pub fn expand(text: &str, spec_path: &Path) -> Result<Vec<Pipeline>> {
    let raws = furnace_train::knobs::expand_tables(text, spec_path, &KNOB_SECTIONS).map_err(|e| match e {
        furnace_train::Error::Spec { key, msg } => Error::Spec { key, msg },
        other => Error::Invalid(other.to_string()),
    })?;
    let mut out = Vec::new();
    for raw in raws {
        let text = toml::to_string(&raw.table).map_err(|e| Error::Invalid(e.to_string()))?;
        let prefix = raw.prefix.clone();
        let spec = EvalSpec::parse(&text, spec_path).map_err(|e| match e {
            Error::Spec { key, msg } => Error::Spec { key: format!("{prefix}{key}"), msg },
            other => other,
        })?;
        out.push(Pipeline { group: raw.group, knobs: raw.knobs, spec });
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("{}: the spec expands to no pipelines", spec_path.display())));
    }
    Ok(out)
}

/// The `[experiment] mode` of spec text (`fit` when absent), without validating the rest.
pub fn mode_of(text: &str) -> Option<String> {
    let t: toml::Table = toml::from_str(text).ok()?;
    let e = t.get("experiment")?.as_table()?;
    Some(e.get("mode").and_then(|m| m.as_str()).unwrap_or("fit").to_string())
}

/// The OpenAI client settings of a `kind = "openai"` generator section.
pub fn openai_config(section: &str, g: &GeneratorSpec) -> Result<crate::openai::OpenAiConfig> {
    let mut o = serde_json::Map::new();
    o.insert("base_url".into(), g.base_url.clone().unwrap_or_default().into());
    o.insert("model".into(), g.model.clone().into());
    let mut put = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            o.insert(k.into(), v);
        }
    };
    put("api_key_env", g.api_key_env.clone().map(Into::into));
    put("rpm", g.rpm.map(Into::into));
    put("tpm", g.tpm.map(Into::into));
    put("max_retries", g.max_retries.map(Into::into));
    put("timeout_secs", g.timeout_secs.map(Into::into));
    put("concurrency", g.concurrency.map(Into::into));
    put("input_price_per_million", g.input_price_per_million.map(Into::into));
    put("output_price_per_million", g.output_price_per_million.map(Into::into));
    if g.base_url.as_deref().is_none_or(str::is_empty) {
        return Err(spec_err(&format!("{section}.base_url"), "an openai generator needs base_url (e.g. http://127.0.0.1:8000/v1)"));
    }
    serde_json::from_value(serde_json::Value::Object(o)).map_err(|e| spec_err(section, e.to_string()))
}

/// `EXPERIMENT/run-N` as (experiment, run id).
pub fn parse_run_ref(s: &str) -> Option<(&str, i64)> {
    let (exp, run) = s.rsplit_once('/')?;
    let id = run.strip_prefix("run-")?.parse().ok()?;
    (!exp.is_empty()).then_some((exp, id))
}
