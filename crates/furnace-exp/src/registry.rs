//! The adapter registry: every LoRA adapter a run trained (registered when the run saves
//! its final adapter, as `EXPERIMENT/run-N`), and foreign PEFT adapters registered by path
//! (`furnace adapters register PATH`), each under a unique name with its base, spec, final
//! metrics, PEFT settings and tags. Names (and tags naming one adapter) resolve wherever
//! furnace takes an adapter directory ([`resolve`]).
//!
//! One row per name in the table `adapters` of the store:
//!
//! | column | what |
//! |---|---|
//! | `name` | unique: `EXP/run-N` for a run's adapter, any [`check_name`] name for the others |
//! | `path` | the PEFT directory: relative to the runs folder for a run's adapter (the folder can move), absolute otherwise |
//! | `base` | the base model as the spec or `adapter_config.json` names it |
//! | `source` | `run`, `registered` or `merge` |
//! | `experiment`, `run_id` | the run that trained it (`NULL` for the others) |
//! | `spec` | the run's leaf config (JSON), `NULL` for the others |
//! | `metrics` | JSON object: each metric's value at the run's last step with one (`loss`, `eval_loss`, `eval_reward`, ...), and `step` |
//! | `peft` | JSON object: `r`, `lora_alpha`, `target_modules`, `use_rslora` from `adapter_config.json` |
//! | `tags` | JSON array of strings |
//! | `created` | Unix seconds of the (last) registration |
//!
//! Registering a name again updates its row (a run's keeps its tags). The table is
//! created on open when missing, so an older store gains it and keeps everything else.

use crate::error::{Error, Result};
use crate::store::{commit, now, ExperimentRow, RunRow, Store};
use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS adapters(
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, path TEXT NOT NULL, base TEXT NOT NULL,
    source TEXT NOT NULL, experiment TEXT, run_id INTEGER, spec TEXT, metrics TEXT NOT NULL, peft TEXT NOT NULL,
    tags TEXT NOT NULL, created REAL NOT NULL);
";

/// Where a registered adapter came from.
pub const SOURCES: [&str; 3] = ["run", "registered", "merge"];

/// One registered adapter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterRecord {
    /// Id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The PEFT directory (absolute, or relative to the working folder when the runs
    /// folder is).
    pub path: PathBuf,
    /// The base model as the spec or `adapter_config.json` names it.
    pub base: String,
    /// `run`, `registered` or `merge`.
    pub source: String,
    /// The experiment of the run that trained it.
    pub experiment: Option<String>,
    /// The run that trained it.
    pub run_id: Option<i64>,
    /// The run's leaf config (JSON), `null` for the others.
    pub spec: Value,
    /// Final metrics (each metric's last value, and `step`).
    pub metrics: Value,
    /// PEFT settings: `r`, `lora_alpha`, `target_modules`, `use_rslora`.
    pub peft: Value,
    /// Tags.
    pub tags: Vec<String>,
    /// Registered (Unix seconds).
    pub created: f64,
}

/// What to register ([`register`]).
#[derive(Debug, Clone, Default)]
pub struct NewAdapter {
    /// Unique name ([`check_name`]).
    pub name: String,
    /// The PEFT directory.
    pub path: PathBuf,
    /// The base model.
    pub base: String,
    /// `run`, `registered` or `merge`.
    pub source: String,
    /// The experiment of the run that trained it.
    pub experiment: Option<String>,
    /// The run that trained it.
    pub run_id: Option<i64>,
    /// The run's leaf config.
    pub spec: Value,
    /// Final metrics.
    pub metrics: Value,
    /// PEFT settings.
    pub peft: Value,
    /// Tags.
    pub tags: Vec<String>,
}

/// Which adapters [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct AdapterFilter {
    /// Only adapters of this base ([`same_base`]).
    pub base: Option<String>,
    /// Only adapters with this tag.
    pub tag: Option<String>,
}

const COLS: &str = "id, name, path, base, source, experiment, run_id, spec, metrics, peft, tags, created";

fn json(s: Option<String>) -> Value {
    s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(Value::Null)
}

fn encode(what: &'static str, v: &impl Serialize) -> Result<String> {
    serde_json::to_string(v).map_err(|source| Error::Encode { what, source })
}

/// The folder the store lives in (run adapters' paths are relative to it).
fn runs_root(store: &Store) -> PathBuf {
    store.path().parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn record(root: &Path, r: &Row) -> rusqlite::Result<AdapterRecord> {
    let path = PathBuf::from(r.get::<_, String>(2)?);
    let tags = json(r.get(10)?);
    Ok(AdapterRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        path: if path.is_relative() { root.join(path) } else { path },
        base: r.get(3)?,
        source: r.get(4)?,
        experiment: r.get(5)?,
        run_id: r.get(6)?,
        spec: json(r.get(7)?),
        metrics: json(r.get(8)?),
        peft: json(r.get(9)?),
        tags: tags.as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect()).unwrap_or_default(),
        created: r.get(11)?,
    })
}

/// Checks an adapter name: 1 to 200 characters among ASCII letters, digits and `-_./:@+`,
/// not starting with `-`, `.` or `/`, without `..` (`EXP/run-N` is one).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['-', '.', '/'])
        && !name.contains("..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:@+".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "adapter name '{name}': use 1 to 200 ASCII letters, digits and -_./:@+ (not starting with - . or /, no ..)"
        )))
    }
}

/// Whether `name` has the form `EXPERIMENT/run-N` of a training run's adapter.
pub fn is_run_name(name: &str) -> bool {
    name.rsplit_once('/').and_then(|(_, r)| r.strip_prefix("run-")).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a tag: 1 to 100 characters among ASCII letters, digits and `-_.:@+`.
pub fn check_tag(tag: &str) -> Result<()> {
    if !tag.is_empty() && tag.len() <= 100 && tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@+".contains(c)) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("tag '{tag}': use 1 to 100 ASCII letters, digits and -_.:@+")))
    }
}

/// The PEFT settings of the adapter directory `dir` (from its `adapter_config.json`):
/// `r`, `lora_alpha`, `target_modules`, `use_rslora`, and `base_model_name_or_path`.
pub fn peft_settings(dir: &Path) -> Result<Map<String, Value>> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(Error::io("reading", &path))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}:{}: not JSON: {e}", path.display(), e.line())))?;
    let mut out = Map::new();
    for key in ["r", "lora_alpha", "target_modules", "use_rslora", "base_model_name_or_path"] {
        if let Some(v) = cfg.get(key).filter(|v| !v.is_null()) {
            out.insert(key.to_string(), v.clone());
        }
    }
    Ok(out)
}

/// Each metric of a run at the last step it has a value, and `step` (the run's steps).
pub fn final_metrics(store: &Store, run: &RunRow) -> Result<Value> {
    let mut last: BTreeMap<String, (i64, f64)> = BTreeMap::new();
    for m in store.metrics(run.id)? {
        // By step: a later value replaces an earlier one.
        last.insert(m.name, (m.step, m.value));
    }
    let mut out: Map<String, Value> = last.into_iter().map(|(k, (_, v))| (k, v.into())).collect();
    out.insert("step".into(), run.steps_done.into());
    Ok(Value::Object(out))
}

/// Registers (or updates) `a`. A name taken by another adapter is replaced only with
/// `replace`; a run's adapter registered again keeps its tags.
pub fn register(store: &Store, a: &NewAdapter, replace: bool) -> Result<AdapterRecord> {
    check_name(&a.name)?;
    if !SOURCES.contains(&a.source.as_str()) {
        return Err(Error::Invalid(format!("adapter source '{}': one of {}", a.source, SOURCES.join(", "))));
    }
    // `EXP/run-N` names belong to training runs, which register (and replace) them when they
    // finish: another adapter under such a name would be overwritten silently.
    if a.source != "run" && is_run_name(&a.name) {
        return Err(Error::Invalid(format!(
            "adapter name '{}': EXPERIMENT/run-N names are kept for the adapters of training runs; choose another name",
            a.name
        )));
    }
    for t in &a.tags {
        check_tag(t)?;
    }
    let root = runs_root(store);
    // A run's adapter is kept relative to the runs folder, so the folder can move.
    let path = match a.path.strip_prefix(&root) {
        Ok(rel) if a.source == "run" => rel.to_path_buf(),
        _ => a.path.clone(),
    };
    let path = path.to_str().ok_or_else(|| Error::Invalid(format!("adapter path {} is not UTF-8", a.path.display())))?.to_string();
    let spec = if a.spec.is_null() { None } else { Some(encode("an adapter's spec", &a.spec)?) };
    let (metrics, peft) = (encode("an adapter's metrics", &a.metrics)?, encode("an adapter's settings", &a.peft)?);
    let tx = store.write_tx()?;
    let existing: Option<(String, Option<i64>, Option<String>, String)> = tx
        .query_row("SELECT source, run_id, experiment, tags FROM adapters WHERE name = ?1", [&a.name], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let same_run = |(source, run, exp, _): &(String, Option<i64>, Option<String>, String)| {
        a.source == "run" && source == "run" && *run == a.run_id && *exp == a.experiment
    };
    let mut tags = encode("an adapter's tags", &a.tags)?;
    match &existing {
        Some(e) if same_run(e) => tags = e.3.clone(),
        Some(_) if !replace => {
            return Err(Error::Invalid(format!(
                "an adapter named '{}' is registered already: pick another --name, or replace it with --force",
                a.name
            )))
        }
        _ => {}
    }
    tx.execute(
        "INSERT INTO adapters(name, path, base, source, experiment, run_id, spec, metrics, peft, tags, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT(name) DO UPDATE SET path = excluded.path, base = excluded.base, source = excluded.source,
             experiment = excluded.experiment, run_id = excluded.run_id, spec = excluded.spec, metrics = excluded.metrics,
             peft = excluded.peft, tags = excluded.tags, created = excluded.created",
        params![a.name, path, a.base, a.source, a.experiment, a.run_id, spec, metrics, peft, tags, now()],
    )?;
    commit(tx, "register_adapter")?;
    get(store, &a.name)?.ok_or(Error::Internal("a registered adapter is not in the store"))
}

/// Registers the final adapter of run `run` of `exp` (saved in `dir`) as `EXP/run-N`, with
/// the run's base, leaf config, final metrics and PEFT settings.
pub fn register_run(store: &Store, exp: &ExperimentRow, run: &RunRow, dir: &Path) -> Result<AdapterRecord> {
    let mut peft = peft_settings(dir)?;
    let from_config = peft.remove("base_model_name_or_path").and_then(|b| b.as_str().map(String::from));
    let base = run.config.pointer("/model/base").and_then(Value::as_str).map(String::from).or(from_config).unwrap_or_default();
    let a = NewAdapter {
        name: format!("{}/run-{}", exp.name, run.id),
        path: dir.to_path_buf(),
        base,
        source: "run".into(),
        experiment: Some(exp.name.clone()),
        run_id: Some(run.id),
        spec: run.config.clone(),
        metrics: final_metrics(store, run)?,
        peft: Value::Object(peft),
        tags: Vec::new(),
    };
    register(store, &a, true)
}

/// Registers a PEFT adapter directory that furnace did not train, after checking it loads
/// ([`furnace_model::load_adapter`]). `name` defaults to the folder's name (its parent's
/// for a folder called `adapter`); `base` to `adapter_config.json`'s
/// `base_model_name_or_path`. A taken name is an error unless `replace`.
pub fn register_path(
    store: &Store,
    dir: &Path,
    name: Option<&str>,
    base: Option<&str>,
    tags: &[String],
    replace: bool,
) -> Result<AdapterRecord> {
    furnace_model::load_adapter(dir)?;
    let abs = std::fs::canonicalize(dir).map_err(Error::io("reading", dir))?;
    let mut peft = peft_settings(&abs)?;
    let from_config = peft.remove("base_model_name_or_path").and_then(|b| b.as_str().map(String::from));
    let base = match base.map(String::from).or(from_config).filter(|b| !b.is_empty()) {
        Some(b) => b,
        None => {
            return Err(Error::Invalid(format!(
                "{}: adapter_config.json names no base_model_name_or_path: give the base with --base",
                dir.display()
            )))
        }
    };
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            // The folder's name, when it makes a valid one (else --name says which).
            let folder = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
            let own = folder(&abs).unwrap_or_default();
            let n = if own == "adapter" { abs.parent().and_then(folder).unwrap_or(own) } else { own };
            check_name(&n).map_err(|e| Error::Invalid(format!("{e}; give a name with --name")))?;
            n
        }
    };
    let a = NewAdapter {
        name,
        path: abs,
        base,
        source: "registered".into(),
        peft: Value::Object(peft),
        metrics: Value::Object(Map::new()),
        tags: tags.to_vec(),
        ..Default::default()
    };
    register(store, &a, replace)
}

/// The adapter called `name`, if any.
pub fn get(store: &Store, name: &str) -> Result<Option<AdapterRecord>> {
    let root = runs_root(store);
    Ok(store.conn.query_row(&format!("SELECT {COLS} FROM adapters WHERE name = ?1"), [name], |r| record(&root, r)).optional()?)
}

/// Every adapter that passes `filter`, oldest first.
pub fn list(store: &Store, filter: &AdapterFilter) -> Result<Vec<AdapterRecord>> {
    let root = runs_root(store);
    let mut st = store.conn.prepare(&format!("SELECT {COLS} FROM adapters ORDER BY created, id"))?;
    let rows = st.query_map([], |r| record(&root, r))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter(|a| filter.base.as_deref().is_none_or(|b| same_base(&a.base, b)))
        .filter(|a| filter.tag.as_deref().is_none_or(|t| a.tags.iter().any(|x| x == t)))
        .collect())
}

fn set_tags(store: &Store, name: &str, f: impl FnOnce(&mut Vec<String>)) -> Result<AdapterRecord> {
    let mut a = get(store, name)?.ok_or_else(|| not_found(store, name))?;
    f(&mut a.tags);
    let tags = encode("an adapter's tags", &a.tags)?;
    let tx = store.write_tx()?;
    tx.execute("UPDATE adapters SET tags = ?2 WHERE name = ?1", params![name, tags])?;
    commit(tx, "tag_adapter")?;
    Ok(a)
}

/// Adds tags to adapter `name` (those it has already are kept once); returns it.
pub fn tag(store: &Store, name: &str, tags: &[String]) -> Result<AdapterRecord> {
    for t in tags {
        check_tag(t)?;
        // A name resolves before a tag: a tag equal to a name could never be used.
        if get(store, t)?.is_some() {
            return Err(Error::Invalid(format!("tag '{t}' is the name of a registered adapter: choose another tag")));
        }
    }
    set_tags(store, name, |have| {
        for t in tags {
            if !have.contains(t) {
                have.push(t.clone());
            }
        }
    })
}

/// Removes tags from adapter `name`; returns it.
pub fn untag(store: &Store, name: &str, tags: &[String]) -> Result<AdapterRecord> {
    set_tags(store, name, |have| have.retain(|t| !tags.contains(t)))
}

/// Whether `path` lies inside `dir` (both resolved; a missing path is not inside).
fn inside(path: &Path, dir: &Path) -> bool {
    match (std::fs::canonicalize(path), std::fs::canonicalize(dir)) {
        (Ok(p), Ok(d)) => p != d && p.starts_with(&d),
        _ => false,
    }
}

/// Unregisters adapter `name`; returns what it was. With `delete_files`, its directory is
/// deleted too, but only when it lies inside the runs folder (the store's folder): files
/// elsewhere (a foreign adapter registered by path) are never deleted, and asking to is
/// an error that changes nothing.
pub fn remove(store: &Store, name: &str, delete_files: bool) -> Result<AdapterRecord> {
    let a = get(store, name)?.ok_or_else(|| not_found(store, name))?;
    let root = runs_root(store);
    if delete_files && a.path.exists() && !inside(&a.path, &root) {
        return Err(Error::Invalid(format!(
            "adapter '{name}' lives outside the runs folder {} ({}): furnace never deletes files there; \
             unregister it without --delete-files and delete the folder yourself",
            root.display(),
            a.path.display()
        )));
    }
    let tx = store.write_tx()?;
    tx.execute("DELETE FROM adapters WHERE name = ?1", [name])?;
    commit(tx, "remove_adapter")?;
    if delete_files && a.path.exists() {
        std::fs::remove_dir_all(&a.path).map_err(Error::io("removing", &a.path))?;
    }
    Ok(a)
}

/// The adapter a name or a tag stands for: the adapter of that name, else the one adapter
/// with that tag. An error names the closest names (and how to register) when nothing
/// matches, and the adapters when a tag names several.
pub fn resolve(store: &Store, given: &str) -> Result<AdapterRecord> {
    if let Some(a) = get(store, given)? {
        return Ok(a);
    }
    let mut tagged = list(store, &AdapterFilter { tag: Some(given.to_string()), ..Default::default() })?;
    match tagged.len() {
        0 => Err(not_found(store, given)),
        1 => Ok(tagged.remove(0)),
        _ => Err(Error::Invalid(format!(
            "tag '{given}' names {} adapters ({}): give one of their names",
            tagged.len(),
            tagged.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// "no adapter named or tagged X" with the closest registered names.
fn not_found(store: &Store, given: &str) -> Error {
    let names: Vec<String> = list(store, &AdapterFilter::default()).map(|l| l.into_iter().map(|a| a.name).collect()).unwrap_or_default();
    let near = closest(&names, given, 3);
    let hint = if names.is_empty() {
        "the registry is empty".to_string()
    } else if near.is_empty() {
        "`furnace adapters list` shows the registered ones".to_string()
    } else {
        format!("closest: {}", near.join(", "))
    };
    Error::Invalid(format!(
        "no adapter directory, registered adapter or tag '{given}' in {} ({hint}); register a PEFT directory with \
         `furnace adapters register PATH --name NAME`",
        store.path().display()
    ))
}

/// Up to `n` of `names` closest to `given` (edit distance, case-insensitive; a name
/// containing `given` counts as close), nearest first; names too far are left out.
pub fn closest(names: &[String], given: &str, n: usize) -> Vec<String> {
    let g = given.to_lowercase();
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .map(|name| {
            let l = name.to_lowercase();
            let d = if l.contains(&g) || g.contains(&l) { 0 } else { edit_distance(&l, &g) };
            (d, name)
        })
        .filter(|(d, name)| *d <= (name.len().max(given.len()) / 2).max(2))
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, s)| s.clone()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The model a base names, for comparing bases: the last component of a path or a hub
/// repo id, lowercased, up to its first `.` (`HuggingFaceTB/SmolLM2-135M-Instruct`, the
/// alias `smollm2-135m-instruct` and `.../SmolLM2-135M-Instruct.Q4_1.gguf` are one model).
pub fn base_key(base: &str) -> String {
    let last = base.trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or(base).to_lowercase();
    match last.split_once('.') {
        Some((head, _)) if !head.is_empty() => head.to_string(),
        _ => last,
    }
}

/// Whether two bases name the same model ([`base_key`]).
pub fn same_base(a: &str, b: &str) -> bool {
    base_key(a) == base_key(b)
}
