//! Stage pipelines (`furnace pipeline`): the spec, the stage folders and their state, and
//! how a stage is wired to the ones before it (the furnace command it runs, the inputs
//! whose hashes decide whether it runs again, the outputs later stages take).
//!
//! Layout: `<runs>/pipelines/<name>/<stage>/attempt-N/` holds `stage.json` (status, command
//! line, input hashes, outputs, times, exit code) and `log.txt` (the command's stdout and
//! stderr); `<runs>/pipelines/<name>/<stage>/latest` names the newest attempt, as
//! `furnace train`'s `latest` names its newest run.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The stage kinds, each a furnace command.
pub const KINDS: &str = "prepare, train, merge, eval, serve";

/// What a stage runs.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Kind {
    /// `furnace data prepare INPUT --out DIR`: train/val split and cleaning.
    Prepare,
    /// `furnace train SPEC --runs-dir DIR`: one LoRA run.
    Train,
    /// `furnace merge --base M --adapter A --out OUT`: the adapter merged into its base.
    Merge,
    /// `furnace eval --model M [--adapter A] --data FILE --out DIR`.
    Eval,
    /// `furnace serve --model M`: in the foreground, never finished.
    Serve,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "prepare" => Self::Prepare,
            "train" => Self::Train,
            "merge" => Self::Merge,
            "eval" => Self::Eval,
            "serve" => Self::Serve,
            _ => return None,
        })
    }

    /// The kind's name, as the spec writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Train => "train",
            Self::Merge => "merge",
            Self::Eval => "eval",
            Self::Serve => "serve",
        }
    }

    /// Table keys the pipeline sets itself (a spec that sets them is refused).
    fn reserved(self) -> &'static [&'static str] {
        match self {
            Self::Prepare => &["out"],
            Self::Train => &["runs_dir", "resume"],
            Self::Merge => &["out"],
            Self::Eval => &["out"],
            Self::Serve => &[],
        }
    }

    /// Table keys that name files or folders, read relative to the pipeline spec's folder
    /// (`input`, `spec`, `data` always; the others when such a path exists, else they are
    /// model aliases).
    fn path_keys(self) -> &'static [&'static str] {
        match self {
            Self::Prepare => &["input", "model"],
            Self::Train => &["spec"],
            Self::Merge => &["base", "adapter"],
            Self::Eval => &["data", "model", "adapter"],
            Self::Serve => &["model"],
        }
    }
}

/// One stage of a pipeline.
pub struct Stage {
    /// Its name in `stages` (its folder's name).
    pub name: String,
    /// What it runs.
    pub kind: Kind,
    /// Its table, as written (less `kind`).
    pub table: toml::Table,
}

/// A pipeline spec: `[pipeline] name, stages, runs_dir` and one table per stage.
pub struct PipelineSpec {
    /// The spec file.
    pub path: PathBuf,
    /// The spec file's folder: relative paths in the spec are read from there.
    pub dir: PathBuf,
    /// The pipeline's name (its folder under `<runs>/pipelines/`).
    pub name: String,
    /// `[pipeline] runs_dir`, resolved against the spec's folder.
    pub runs_dir: Option<PathBuf>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

/// A name used as a folder name: letters, digits, `-`, `_`, `.`, not `.` or `..`.
fn check_folder_name(what: &str, name: &str) -> Result<()> {
    let ok =
        !name.is_empty() && name != "." && name != ".." && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("{what} '{name}' must be a folder name: letters, digits, '-', '_', '.'");
    }
    Ok(())
}

impl PipelineSpec {
    /// Reads and checks a spec: every stage has a table and a known kind, no table is left
    /// over, no reserved key is set, and each stage can be wired to the ones before it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the pipeline spec {}", path.display()))?;
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let Some(toml::Value::Table(head)) = doc.remove("pipeline") else {
            bail!("{}: no [pipeline] table (it names the stages: [pipeline] stages = [\"train\", \"eval\"])", path.display());
        };
        for k in head.keys() {
            if !["name", "stages", "runs_dir"].contains(&k.as_str()) {
                bail!("{}: pipeline.{k}: unknown key (known: name, stages, runs_dir)", path.display());
            }
        }
        let name = match head.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => bail!("{}: pipeline.name must be a string", path.display()),
            None => path.file_stem().and_then(|s| s.to_str()).unwrap_or("pipeline").to_string(),
        };
        check_folder_name("pipeline.name", &name)?;
        let runs_dir = match head.get("runs_dir") {
            Some(toml::Value::String(s)) => Some(dir.join(s)),
            Some(_) => bail!("{}: pipeline.runs_dir must be a string", path.display()),
            None => None,
        };
        let Some(toml::Value::Array(list)) = head.get("stages") else {
            bail!("{}: pipeline.stages must be a list of stage names, e.g. [\"prepare\", \"train\", \"merge\", \"eval\"]", path.display());
        };
        if list.is_empty() {
            bail!("{}: pipeline.stages is empty", path.display());
        }
        let mut stages: Vec<Stage> = Vec::new();
        for v in list {
            let Some(name) = v.as_str() else { bail!("{}: pipeline.stages: {v} is not a stage name (a string)", path.display()) };
            check_folder_name("stage name", name)?;
            if stages.iter().any(|s| s.name == name) {
                bail!(
                    "{}: pipeline.stages names '{name}' twice (give a second stage of a kind its own name and `kind = ...`)",
                    path.display()
                );
            }
            let mut table = match doc.remove(name) {
                Some(toml::Value::Table(t)) => t,
                Some(_) => bail!("{}: '{name}' must be a table ([{name}])", path.display()),
                None => bail!("{}: stage '{name}' has no [{name}] table: add one with its options (see docs/pipeline.md)", path.display()),
            };
            let kind_name = match table.remove("kind") {
                Some(toml::Value::String(k)) => k,
                Some(_) => bail!("{}: {name}.kind must be a string (one of {KINDS})", path.display()),
                None => name.to_string(),
            };
            let Some(kind) = Kind::parse(&kind_name) else {
                bail!(
                    "{}: stage '{name}': unknown stage kind '{kind_name}' (kinds: {KINDS}); name the stage after its kind or set {name}.kind",
                    path.display()
                );
            };
            for k in kind.reserved() {
                if table.contains_key(*k) {
                    bail!("{}: {name}.{k}: the pipeline sets this itself (remove it)", path.display());
                }
            }
            if let Some(serve) = stages.iter().find(|s| s.kind == Kind::Serve) {
                bail!("{}: stage '{}' serves in the foreground until stopped: it must be the last stage", path.display(), serve.name);
            }
            stages.push(Stage { name: name.to_string(), kind, table });
        }
        if let Some(extra) = doc.keys().next() {
            bail!(
                "{}: [{extra}] is not a stage of pipeline.stages ({})",
                path.display(),
                stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        let spec = Self { path: path.to_path_buf(), dir, name, runs_dir, stages };
        spec.check_wiring()?;
        Ok(spec)
    }

    /// Checks that every stage gets what it needs from its table or an earlier stage.
    fn check_wiring(&self) -> Result<()> {
        let p = self.path.display();
        for (i, s) in self.stages.iter().enumerate() {
            let before = |k: Kind| self.stages[..i].iter().any(|e| e.kind == k);
            let has = |k: &str| s.table.contains_key(k);
            let n = &s.name;
            match s.kind {
                Kind::Prepare if !has("input") => bail!("{p}: {n}.input: the dataset to prepare is missing"),
                Kind::Train if !has("spec") => bail!("{p}: {n}.spec: the training spec (TOML) is missing"),
                Kind::Merge => {
                    if before(Kind::Train) && has("adapter") {
                        bail!("{p}: {n}.adapter: the pipeline merges the adapter of the train stage (remove it)");
                    }
                    if !(before(Kind::Train) || (has("adapter") && has("base"))) {
                        bail!("{p}: stage '{n}' has nothing to merge: put a train stage before it, or set {n}.base and {n}.adapter");
                    }
                }
                Kind::Eval | Kind::Serve => {
                    let wired = before(Kind::Merge) || before(Kind::Train);
                    if wired && (has("model") || has("adapter")) {
                        bail!("{p}: {n}: the pipeline sets model and adapter from the stages before it (remove them)");
                    }
                    if !wired && !has("model") {
                        bail!(
                            "{p}: stage '{n}' has no model to {}: put a train or merge stage before it, or set {n}.model",
                            s.kind.as_str()
                        );
                    }
                    if s.kind == Kind::Eval && !has("data") && !before(Kind::Prepare) && !before(Kind::Train) {
                        bail!("{p}: stage '{n}' has no data: set {n}.data, or put a prepare stage before it");
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The stage's position, or an error naming the stages.
    pub fn position(&self, name: &str) -> Result<usize> {
        self.stages.iter().position(|s| s.name == name).with_context(|| {
            format!("--from {name}: no such stage (stages: {})", self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "))
        })
    }

    /// A path the spec names, read from the spec's folder.
    fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }

    /// A model or adapter the spec names: a path when one exists there, else an alias
    /// (or a registry name) left as written.
    fn resolve_model(&self, p: &str) -> String {
        let r = self.resolve(p);
        if r.exists() {
            r.display().to_string()
        } else {
            p.to_string()
        }
    }
}

/// Where a stage's attempts live.
pub fn stage_dir(root: &Path, stage: &str) -> PathBuf {
    root.join(stage)
}

/// An attempt's folder.
pub fn attempt_dir(root: &Path, stage: &str, attempt: u32) -> PathBuf {
    stage_dir(root, stage).join(format!("attempt-{attempt}"))
}

/// The state of an attempt.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Started and not ended (or its pipeline was killed).
    Running,
    /// Ended with success.
    Done,
    /// Ended with an error.
    Failed,
    /// Stopped by Ctrl-C / SIGTERM.
    Interrupted,
    /// A serve stage that was stopped.
    Stopped,
}

impl Status {
    /// As `stage.json` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
            Self::Stopped => "stopped",
        }
    }
}

/// What a stage read: the hash of its table, of its input files, and the attempts of the
/// earlier stages whose outputs it takes.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Inputs {
    /// sha256 of the stage's table (keys sorted).
    pub table: String,
    /// Input file (or folder) → sha256.
    pub files: BTreeMap<String, String>,
    /// Earlier stage → `attempt-N:<its inputs hash>`.
    pub upstream: BTreeMap<String, String>,
}

impl Inputs {
    /// One hash over all of it.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.table.as_bytes());
        for (k, v) in self.files.iter().chain(self.upstream.iter()) {
            h.update([0]);
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
        }
        hex(&h.finalize())
    }

    /// What differs from `old`, in words.
    pub fn changes(&self, old: &Inputs) -> String {
        let mut out = Vec::new();
        if self.table != old.table {
            out.push("its table changed".to_string());
        }
        for (k, v) in &self.files {
            match old.files.get(k) {
                Some(o) if o == v => {}
                Some(_) => out.push(format!("{k} changed")),
                None => out.push(format!("{k} is new")),
            }
        }
        for (k, v) in &self.upstream {
            if old.upstream.get(k) != Some(v) {
                out.push(format!("stage {k} ran again"));
            }
        }
        if out.is_empty() {
            out.push("its inputs changed".into());
        }
        out.join(", ")
    }
}

/// `stage.json`: an attempt's record.
#[derive(Clone, Serialize, Deserialize, Debug)]
pub struct StageState {
    /// The stage's name.
    pub stage: String,
    /// Its kind.
    pub kind: String,
    /// The attempt's number.
    pub attempt: u32,
    /// Where it stands.
    pub status: Status,
    /// The furnace command line it runs (without the program).
    pub command: Vec<String>,
    /// What it read.
    pub inputs: Inputs,
    /// `inputs.digest()`.
    pub inputs_sha256: String,
    /// What it wrote (name → path), for later stages.
    pub outputs: BTreeMap<String, String>,
    /// Unix seconds of its first start.
    pub started_unix: u64,
    /// Unix seconds of its end.
    pub finished_unix: Option<u64>,
    /// The command's exit code (negative: killed by that signal).
    pub exit_code: Option<i32>,
    /// The `furnace pipeline` process that ran it.
    pub pipeline_pid: u32,
    /// The stage's process.
    pub child_pid: Option<u32>,
    /// How many times it was resumed in place after an interruption.
    #[serde(default)]
    pub resumed: u32,
}

impl StageState {
    /// Reads an attempt's `stage.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("stage.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a stage record", p.display()))
    }

    /// Writes `stage.json` whole (beside it, then renamed).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_whole(&dir.join("stage.json"), &serde_json::to_string_pretty(self)?)
    }
}

/// The newest attempt of a stage (`latest`), if any.
pub fn latest(root: &Path, stage: &str) -> Result<Option<StageState>> {
    let pointer = stage_dir(root, stage).join("latest");
    let Ok(rel) = std::fs::read_to_string(&pointer) else { return Ok(None) };
    let dir = stage_dir(root, stage).join(rel.trim());
    if !dir.join("stage.json").is_file() {
        return Ok(None);
    }
    StageState::read(&dir).map(Some)
}

impl StageState {
    /// An output the attempt recorded that is gone since (a deleted adapter or model).
    pub fn missing_output(&self) -> Option<(&str, &str)> {
        self.outputs
            .iter()
            .find(|(k, p)| matches!(k.as_str(), "model" | "metrics" | "train" | "adapter") && !Path::new(p.as_str()).exists())
            .map(|(k, p)| (k.as_str(), p.as_str()))
    }
}

/// The newest attempt of a stage that finished with inputs hashing to `digest` and still has
/// its outputs (inputs that went back to what an earlier attempt ran on reuse that attempt).
pub fn finished_with(root: &Path, stage: &str, digest: &str) -> Result<Option<StageState>> {
    for n in (1..next_attempt(root, stage)).rev() {
        let dir = attempt_dir(root, stage, n);
        if !dir.join("stage.json").is_file() {
            continue;
        }
        let s = StageState::read(&dir)?;
        if s.status == Status::Done && s.inputs_sha256 == digest && s.missing_output().is_none() {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

/// The number a new attempt of a stage gets (one past the highest there).
pub fn next_attempt(root: &Path, stage: &str) -> u32 {
    let Ok(rd) = std::fs::read_dir(stage_dir(root, stage)) else { return 1 };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("attempt-")).and_then(|n| n.parse::<u32>().ok()))
        .max()
        .unwrap_or(0)
        + 1
}

/// Points the stage's `latest` at an attempt.
pub fn set_latest(root: &Path, stage: &str, attempt: u32) -> Result<()> {
    write_whole(&stage_dir(root, stage).join("latest"), &format!("attempt-{attempt}\n"))
}

/// Writes a file whole: beside it first, then renamed into place.
pub fn write_whole(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, or of a folder (its files' relative names and contents, in order).
pub fn hash_path(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files = Vec::new();
        collect_files(path, path, &mut files)?;
        files.sort();
        for rel in files {
            h.update(rel.as_bytes());
            h.update([0]);
            hash_file_into(&path.join(&rel), &mut h)?;
        }
    } else {
        hash_file_into(path, &mut h)?;
    }
    Ok(hex(&h.finalize()))
}

fn hash_file_into(path: &Path, h: &mut Sha256) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// A TOML value as text with its keys sorted (what the table hash covers).
fn canonical(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            let inner: Vec<String> = keys.iter().map(|k| format!("{k:?}={}", canonical(&t[k.as_str()]))).collect();
            format!("{{{}}}", inner.join(","))
        }
        toml::Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        toml::Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// The finished attempt of an earlier stage, as a later stage sees it.
#[derive(Clone)]
pub struct Upstream {
    /// Its name.
    pub stage: String,
    /// Its attempt.
    pub attempt: u32,
    /// Its inputs hash.
    pub inputs_sha256: String,
    /// What it wrote.
    pub outputs: BTreeMap<String, String>,
}

impl Upstream {
    /// From an attempt's record.
    pub fn of(s: &StageState) -> Self {
        Self { stage: s.stage.clone(), attempt: s.attempt, inputs_sha256: s.inputs_sha256.clone(), outputs: s.outputs.clone() }
    }

    fn id(&self) -> String {
        format!("attempt-{}:{}", self.attempt, self.inputs_sha256)
    }

    fn out(&self, key: &str) -> Result<&str> {
        self.outputs.get(key).map(String::as_str).with_context(|| {
            format!("stage {} (attempt-{}) recorded no {key} output: run it again with --from {}", self.stage, self.attempt, self.stage)
        })
    }
}

/// Checks every stage's table against its command's flags before anything runs, so a
/// mistyped key (`max_token`) or a bad value fails now and not after hours of training.
/// `parse` is the binary's own argument parser; only a missing required argument — one the
/// pipeline wires in when the stage runs — is not an error here.
pub fn check_flags(spec: &PipelineSpec, parse: &dyn Fn(Vec<String>) -> std::result::Result<(), clap::Error>) -> Result<()> {
    for stage in &spec.stages {
        let words: &[&str] = match stage.kind {
            Kind::Prepare => &["data", "prepare", "input.jsonl"],
            Kind::Train => &["train", "spec.toml"],
            Kind::Merge => &["merge"],
            Kind::Eval => &["eval"],
            Kind::Serve => &["serve"],
        };
        // The keys the pipeline turns into wiring are checked when the stage is wired.
        let wired = ["input", "spec", "base", "adapter", "model", "data"];
        let mut argv: Vec<String> = std::iter::once("furnace").chain(words.iter().copied()).map(String::from).collect();
        argv.extend(flags(&stage.name, &stage.table, &wired, spec, stage.kind)?);
        if let Err(e) = parse(argv) {
            if e.kind() != clap::error::ErrorKind::MissingRequiredArgument {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or_default().trim_start_matches("error: ");
                let command = words.iter().filter(|w| !w.contains('.')).copied().collect::<Vec<_>>().join(" ");
                bail!(
                    "{}: [{}]: {first} (a stage's keys are the flags of `furnace {command} --help`, with _ for -)",
                    spec.path.display(),
                    stage.name
                );
            }
        }
    }
    Ok(())
}

/// The nearest earlier finished stage of each kind.
pub type Upstreams = BTreeMap<Kind, Upstream>;

/// A stage's command line, given its attempt folder.
type ArgsFn = Box<dyn Fn(&Path) -> Vec<String>>;
/// A stage's outputs known before it runs, given its attempt folder.
type OutputsFn = Box<dyn Fn(&Path) -> BTreeMap<String, String>>;
/// Files to write into an attempt folder before the stage runs.
type FilesFn = Box<dyn Fn(&Path) -> Result<Vec<(PathBuf, String)>>>;

/// A stage wired to its table and the stages before it: what it reads and the command.
pub struct Wired {
    /// What it read (hashes).
    pub inputs: Inputs,
    /// The command line, given the attempt folder.
    args: ArgsFn,
    /// Outputs known before running, given the attempt folder.
    outputs: OutputsFn,
    /// Files to write into the attempt folder before running (the effective train spec).
    files: FilesFn,
    /// A train stage's experiment name (its run is `<attempt>/runs/<name>/latest`).
    pub experiment: Option<String>,
}

impl Wired {
    /// The command line (without the program) for an attempt folder.
    pub fn args(&self, dir: &Path) -> Vec<String> {
        (self.args)(dir)
    }

    /// The outputs known before running.
    pub fn outputs(&self, dir: &Path) -> BTreeMap<String, String> {
        (self.outputs)(dir)
    }

    /// Files to write into the attempt folder first.
    pub fn files(&self, dir: &Path) -> Result<Vec<(PathBuf, String)>> {
        (self.files)(dir)
    }
}

/// The table's options as flags: `key = v` → `--key v` (`_` → `-`), a list → the flag
/// once per item, `true` → the flag alone, `false` → nothing. `skip`: keys the pipeline
/// handles itself.
fn flags(stage: &str, table: &toml::Table, skip: &[&str], spec: &PipelineSpec, kind: Kind) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (k, v) in table {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let flag = format!("--{}", k.replace('_', "-"));
        let is_path = kind.path_keys().contains(&k.as_str());
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) if is_path => spec.resolve_model(s),
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Datetime(d) => d.to_string(),
                _ => bail!("{}: {stage}.{k}: a list or table cannot be a flag's value", spec.path.display()),
            })
        };
        match v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(item)?);
                }
            }
            toml::Value::Table(_) => bail!("{}: {stage}.{k}: a table cannot be a command-line option", spec.path.display()),
            other => {
                out.push(flag);
                out.push(scalar(other)?);
            }
        }
    }
    Ok(out)
}

/// A string key of a stage's table.
fn str_key<'t>(spec: &PipelineSpec, stage: &'t Stage, key: &str) -> Result<Option<&'t str>> {
    match stage.table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(_) => bail!("{}: {}.{key} must be a string", spec.path.display(), stage.name),
    }
}

/// Whether a dataset file exists with rows (a JSONL file: a non-blank line; another
/// form: not empty).
fn has_rows(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| !l.trim().is_empty()));
    }
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// Makes a relative path string under `table.key` absolute against `base`.
fn anchor(table: &mut toml::Table, key: &str, base: &Path) {
    if let Some(toml::Value::String(s)) = table.get_mut(key) {
        if Path::new(s.as_str()).is_relative() && !s.is_empty() {
            *s = base.join(s.as_str()).display().to_string();
        }
    }
}

fn sub<'t>(t: &'t mut toml::Table, key: &str) -> Option<&'t mut toml::Table> {
    t.get_mut(key).and_then(|v| v.as_table_mut())
}

/// Wires stage `i` to its table and the finished stages before it (`ups`).
pub fn wire(spec: &PipelineSpec, i: usize, ups: &Upstreams) -> Result<Wired> {
    let stage = &spec.stages[i];
    let name = stage.name.clone();
    let mut inputs =
        Inputs { table: hex(&Sha256::digest(canonical(&toml::Value::Table(stage.table.clone())).as_bytes())), ..Default::default() };
    let mut hash_file = |label: &str, p: &Path| -> Result<()> {
        if !p.exists() {
            bail!("{}: {name}.{label}: {} does not exist", spec.path.display(), p.display());
        }
        inputs.files.insert(p.display().to_string(), hash_path(p)?);
        Ok(())
    };
    let mut experiment = None;
    let mut used: Vec<&Upstream> = Vec::new();
    let no_files: FilesFn = Box::new(|_| Ok(Vec::new()));
    let wired = match stage.kind {
        Kind::Prepare => {
            let listed: Vec<String> = match stage.table.get("input") {
                Some(toml::Value::String(s)) => vec![s.clone()],
                Some(toml::Value::Array(a)) if !a.is_empty() && a.iter().all(|v| v.is_str()) => {
                    a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
                }
                _ => bail!("{}: {name}.input must be a path or a list of paths", spec.path.display()),
            };
            let mut input = Vec::new();
            for p in &listed {
                let p = spec.resolve(p);
                hash_file("input", &p)?;
                input.push(p.display().to_string());
            }
            let ext = str_key(spec, stage, "format")?.unwrap_or("jsonl").to_string();
            let rest = flags(&name, &stage.table, &["input"], spec, stage.kind)?;
            (
                Box::new(move |dir: &Path| {
                    let mut a = vec!["data".to_string(), "prepare".into()];
                    a.extend(input.iter().cloned());
                    a.extend(["--out".into(), dir.join("out").display().to_string()]);
                    a.extend(rest.iter().cloned());
                    a
                }) as ArgsFn,
                Box::new(move |dir: &Path| {
                    BTreeMap::from([
                        ("train".to_string(), dir.join(format!("out/train.{ext}")).display().to_string()),
                        ("val".to_string(), dir.join(format!("out/val.{ext}")).display().to_string()),
                    ])
                }) as OutputsFn,
                no_files,
            )
        }
        Kind::Train => {
            let spec_path = spec.resolve(str_key(spec, stage, "spec")?.unwrap_or_default());
            hash_file("spec", &spec_path)?;
            let text = std::fs::read_to_string(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
            let mut doc: toml::Table = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", spec_path.display()))?;
            let base_dir = spec_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
            let base_dir = base_dir.canonicalize().unwrap_or(base_dir);
            // The effective spec lives in the attempt folder: the paths it names are made
            // absolute, and a prepare stage's split replaces its data.
            let data = sub(&mut doc, "data").with_context(|| format!("{}: no [data] table", spec_path.display()))?;
            anchor(data, "train", &base_dir);
            anchor(data, "eval", &base_dir);
            if let Some(prep) = ups.get(&Kind::Prepare) {
                data.insert("train".into(), toml::Value::String(prep.out("train")?.to_string()));
                let val = prep.out("val")?.to_string();
                if has_rows(Path::new(&val)) {
                    data.insert("eval".into(), toml::Value::String(val));
                } else {
                    data.remove("eval");
                }
                used.push(prep);
            } else {
                for key in ["train", "eval"] {
                    if let Some(toml::Value::String(p)) = data.get(key) {
                        let p = PathBuf::from(p);
                        hash_file(&format!("spec's data.{key}"), &p)?;
                    }
                }
            }
            let eval_data = data.get("eval").and_then(|v| v.as_str()).map(str::to_string);
            if let Some(t) = sub(&mut doc, "tracking") {
                anchor(t, "tensorboard", &base_dir);
            }
            if let Some(t) = sub(&mut doc, "trainer") {
                anchor(t, "reference_adapter", &base_dir);
            }
            if let Some(toml::Value::Array(rewards)) = doc.get_mut("reward") {
                for r in rewards.iter_mut().filter_map(|r| r.as_table_mut()) {
                    anchor(r, "schema", &base_dir);
                    if let Some(toml::Value::Array(prog)) = r.get_mut("program") {
                        if let Some(toml::Value::String(p)) = prog.first_mut() {
                            if p.contains('/') && Path::new(p.as_str()).is_relative() {
                                *p = base_dir.join(p.as_str()).display().to_string();
                            }
                        }
                    }
                }
            }
            let exp_name = doc
                .get("experiment")
                .and_then(|e| e.get("name"))
                .and_then(|n| n.as_str())
                .with_context(|| format!("{}: experiment.name is missing", spec_path.display()))?
                .to_string();
            experiment = Some(exp_name);
            let base = doc.get("model").and_then(|m| m.get("base")).and_then(|b| b.as_str()).unwrap_or_default().to_string();
            let base = if base.is_empty() {
                crate::args::DEFAULT_MODEL.to_string()
            } else if Path::new(&base).exists() {
                // A model folder named relative to where furnace runs: absolute in the
                // effective spec, so a resume from another folder reads the same model.
                let abs = Path::new(&base).canonicalize().map(|p| p.display().to_string()).unwrap_or(base);
                if let Some(m) = sub(&mut doc, "model") {
                    m.insert("base".into(), toml::Value::String(abs.clone()));
                }
                abs
            } else {
                base
            };
            let effective = toml::to_string(&doc).context("writing the effective train spec")?;
            let rest = flags(&name, &stage.table, &["spec"], spec, stage.kind)?;
            (
                Box::new(move |dir: &Path| {
                    let mut a = vec![
                        "train".to_string(),
                        dir.join("spec.toml").display().to_string(),
                        "--runs-dir".into(),
                        dir.join("runs").display().to_string(),
                    ];
                    a.extend(rest.iter().cloned());
                    a
                }) as ArgsFn,
                Box::new(move |dir: &Path| {
                    let mut m = BTreeMap::from([
                        ("base".to_string(), base.clone()),
                        ("spec".to_string(), dir.join("spec.toml").display().to_string()),
                    ]);
                    if let Some(e) = &eval_data {
                        m.insert("eval_data".into(), e.clone());
                    }
                    m
                }) as OutputsFn,
                Box::new(move |dir: &Path| Ok(vec![(dir.join("spec.toml"), effective.clone())])) as FilesFn,
            )
        }
        Kind::Merge => {
            let mut pre: Vec<String> = vec!["merge".into()];
            let mut skip = vec![];
            let base_out;
            if let Some(train) = ups.get(&Kind::Train) {
                let base = match str_key(spec, stage, "base")? {
                    Some(b) => spec.resolve_model(b),
                    None => train.out("base")?.to_string(),
                };
                pre.extend(["--base".into(), base.clone(), "--adapter".into(), train.out("adapter")?.to_string()]);
                skip.push("base");
                base_out = Some(base);
                used.push(train);
            } else {
                for key in ["base", "adapter"] {
                    if let Some(toml::Value::String(p)) = stage.table.get(key) {
                        let r = spec.resolve(p);
                        if r.exists() {
                            hash_file(key, &r)?;
                        }
                    }
                }
                base_out = str_key(spec, stage, "base")?.map(|b| spec.resolve_model(b));
            }
            let format = str_key(spec, stage, "format")?.unwrap_or("hf").to_string();
            let (out_name, out_key) = match format.as_str() {
                "gguf" => ("out/model.gguf", "model"),
                "adapter" => ("out/adapter", "adapter"),
                _ => ("out/merged", "model"),
            };
            let rest = flags(&name, &stage.table, &skip, spec, stage.kind)?;
            (
                Box::new(move |dir: &Path| {
                    let mut a = pre.clone();
                    a.extend(["--out".into(), dir.join(out_name).display().to_string()]);
                    a.extend(rest.iter().cloned());
                    a
                }) as ArgsFn,
                Box::new(move |dir: &Path| {
                    let mut m = BTreeMap::from([(out_key.to_string(), dir.join(out_name).display().to_string())]);
                    if let Some(b) = &base_out {
                        m.insert("base".into(), b.clone());
                    }
                    m
                }) as OutputsFn,
                no_files,
            )
        }
        Kind::Eval | Kind::Serve => {
            let mut pre: Vec<String> = vec![stage.kind.as_str().to_string()];
            let mut skip = vec![];
            if let Some(merge) = ups.get(&Kind::Merge) {
                match merge.outputs.get("model") {
                    Some(m) => pre.extend(["--model".into(), m.clone()]),
                    // `format = "adapter"`: a combined adapter, evaluated on its base.
                    None => {
                        pre.extend(["--model".into(), merge.out("base")?.to_string()]);
                        let adapter = merge.out("adapter")?.to_string();
                        let adapter = if stage.kind == Kind::Eval { adapter } else { format!("{}={adapter}", merge.stage) };
                        pre.extend(["--adapter".into(), adapter]);
                    }
                }
                used.push(merge);
            } else if let Some(train) = ups.get(&Kind::Train) {
                pre.extend(["--model".into(), train.out("base")?.to_string()]);
                let adapter = train.out("adapter")?.to_string();
                if stage.kind == Kind::Eval {
                    pre.extend(["--adapter".into(), adapter]);
                } else {
                    let exp = train.outputs.get("experiment").cloned().unwrap_or_else(|| train.stage.clone());
                    pre.extend(["--adapter".into(), format!("{exp}={adapter}")]);
                }
                used.push(train);
            } else {
                for key in ["model", "adapter"] {
                    if let Some(toml::Value::String(p)) = stage.table.get(key) {
                        let r = spec.resolve(p);
                        if r.exists() {
                            hash_file(key, &r)?;
                        }
                    }
                }
            }
            if stage.kind == Kind::Eval {
                match str_key(spec, stage, "data")? {
                    Some(d) => {
                        let d = spec.resolve(d);
                        hash_file("data", &d)?;
                        pre.extend(["--data".into(), d.display().to_string()]);
                        skip.push("data");
                    }
                    None => {
                        let from_prep = ups.get(&Kind::Prepare).map(|p| p.out("val").map(|v| (p, v.to_string()))).transpose()?;
                        let from_train = ups.get(&Kind::Train).and_then(|t| t.outputs.get("eval_data").map(|v| (t, v.clone())));
                        let (up, data) = match (from_prep, from_train) {
                            (Some((p, v)), _) if has_rows(Path::new(&v)) => (p, v),
                            (_, Some(t)) => t,
                            _ => bail!(
                                "{}: stage '{name}' has no data: the stages before it give no validation split; set {name}.data",
                                spec.path.display()
                            ),
                        };
                        if !used.iter().any(|u| u.stage == up.stage) {
                            used.push(up);
                        }
                        pre.extend(["--data".into(), data]);
                    }
                }
            }
            let kind = stage.kind;
            let rest = flags(&name, &stage.table, &skip, spec, stage.kind)?;
            (
                Box::new(move |dir: &Path| {
                    let mut a = pre.clone();
                    if kind == Kind::Eval {
                        a.extend(["--out".into(), dir.display().to_string()]);
                    }
                    a.extend(rest.iter().cloned());
                    a
                }) as ArgsFn,
                Box::new(move |dir: &Path| {
                    if kind == Kind::Eval {
                        BTreeMap::from([
                            ("metrics".to_string(), dir.join("eval/metrics.json").display().to_string()),
                            ("predictions".to_string(), dir.join("eval/predictions.jsonl").display().to_string()),
                        ])
                    } else {
                        BTreeMap::new()
                    }
                }) as OutputsFn,
                no_files,
            )
        }
    };
    for u in used {
        inputs.upstream.insert(u.stage.clone(), u.id());
    }
    Ok(Wired { inputs, args: wired.0, outputs: wired.1, files: wired.2, experiment })
}

/// After a train stage: its run folder and adapter (`<attempt>/runs/<name>/latest`).
pub fn train_outputs(dir: &Path, experiment: &str) -> Result<BTreeMap<String, String>> {
    let pointer = dir.join("runs").join(experiment);
    let rel = std::fs::read_to_string(pointer.join("latest"))
        .with_context(|| format!("the train stage left no {}", pointer.join("latest").display()))?;
    let run = pointer.join(rel.trim());
    let run = run.canonicalize().unwrap_or(run);
    let adapter = run.join("adapter");
    if !adapter.join("adapter_config.json").is_file() {
        bail!("the train stage's run {} has no adapter", run.display());
    }
    Ok(BTreeMap::from([
        ("run".to_string(), run.display().to_string()),
        ("adapter".to_string(), adapter.display().to_string()),
        ("experiment".to_string(), experiment.to_string()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("p.toml");
        std::fs::write(&p, body).unwrap_or_default();
        p
    }

    #[test]
    fn flags_follow_the_table() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = write(dir.path(), "[pipeline]\nstages = [\"eval\"]\n[eval]\nmodel = \"m\"\ndata = \"d.jsonl\"\nmetrics = [\"ppl\", \"exact_match\"]\nmax_tokens = 8\nall_tokens = true\nx = false\n");
        let spec = PipelineSpec::load(&p).unwrap_or_else(|e| panic!("{e}"));
        let f = flags("eval", &spec.stages[0].table, &["data"], &spec, Kind::Eval).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f, ["--all-tokens", "--max-tokens", "8", "--metrics", "ppl", "--metrics", "exact_match", "--model", "m"]);
    }
}
