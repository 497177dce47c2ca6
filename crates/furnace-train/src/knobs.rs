//! Knobs and config groups: a spec whose `[lora]`, `[trainer]` or `[model]` values may be
//! knobs (`r = { list = [8, 32] }`, `learning_rate = { range = [1e-5, 1e-3], log = true }`,
//! `batch_size = { range = [2, 8], dtype = "int", step = 2 }`) and which may hold several
//! `[[group]]`s expands into leaf specs, each validated before anything trains.
//!
//! `[search] kind = "grid"` (the default) takes the cartesian product of the lists (a range
//! is an error); `kind = "random"` draws `num_runs` distinct configs per group from lists and
//! ranges with a seed. A `[[group]]` holds `[group.lora]`, `[group.trainer]`, `[group.model]`
//! tables whose keys override the top-level ones; errors name `group[i].section.key`.

use crate::error::{Error, Result};
use crate::spec::Spec;
use furnace_model::rng::Rng;
use std::path::Path;
use toml::{Table, Value};

/// Sections whose scalar settings may be knobs.
const KNOB_SECTIONS: [&str; 3] = ["lora", "trainer", "model"];

/// The most configs a spec may expand into (a grid's leaves, a random search's
/// `num_runs`, summed over its groups).
pub const MAX_RUNS: usize = 10_000;
/// The most values a list knob may hold.
pub const MAX_LIST_LEN: usize = 10_000;
/// The largest magnitude of a range knob's bounds and step.
pub const MAX_RANGE: f64 = 1e15;

/// A knob's values.
#[derive(Debug, Clone, PartialEq)]
enum Knob {
    List(Vec<Value>),
    Range { lo: f64, hi: f64, log: bool, int: bool, step: f64 },
}

/// One expanded configuration.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Index of its `[[group]]` (0 without groups).
    pub group: usize,
    /// The knob values it took, by `section.key`.
    pub knobs: Vec<(String, Value)>,
    /// The validated spec.
    pub spec: Spec,
}

fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Spec { key: key.into(), msg: msg.into() }
}

fn num(v: &Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

fn parse_knob(path: &str, t: &Table) -> Result<Knob> {
    if let Some(unknown) = t.keys().find(|k| !["list", "range", "log", "dtype", "step"].contains(&k.as_str())) {
        return Err(invalid(path, format!("unknown knob key '{unknown}' (expected list, or range with log, dtype, step)")));
    }
    match (t.get("list"), t.get("range")) {
        (Some(Value::Array(l)), None) if l.len() > MAX_LIST_LEN => {
            Err(invalid(path, format!("a list knob holds at most {MAX_LIST_LEN} values, not {}", l.len())))
        }
        (Some(Value::Array(l)), None) if !l.is_empty() => Ok(Knob::List(l.clone())),
        (Some(_), None) => Err(invalid(path, "a list knob needs a non-empty array: { list = [a, b] }")),
        (None, Some(Value::Array(r))) => {
            let (Some(lo), Some(hi)) = (r.first().and_then(num), r.get(1).and_then(num)) else {
                return Err(invalid(path, "a range knob needs two numbers: { range = [low, high] }"));
            };
            let bounded = |v: f64| v.is_finite() && v.abs() <= MAX_RANGE;
            if !bounded(lo) || !bounded(hi) {
                return Err(invalid(path, format!("range bounds must be finite, at most {MAX_RANGE:e} in magnitude")));
            }
            if r.len() != 2 || lo > hi {
                return Err(invalid(path, "a range needs [low, high] with low <= high"));
            }
            let log = t.get("log").and_then(Value::as_bool).unwrap_or(false);
            if log && lo <= 0.0 {
                return Err(invalid(path, "a log range needs low > 0"));
            }
            let int = match t.get("dtype").and_then(Value::as_str) {
                None | Some("float") => false,
                Some("int") => true,
                Some(o) => return Err(invalid(path, format!("dtype '{o}' is not int or float"))),
            };
            let step = t.get("step").and_then(num).unwrap_or(if int { 1.0 } else { 0.0 });
            if !bounded(step) || step < 0.0 || (int && step < 1.0) {
                return Err(invalid(path, "step must be positive (and at least 1 for ints)"));
            }
            Ok(Knob::Range { lo, hi, log, int, step })
        }
        _ => Err(invalid(path, "a knob is { list = [...] } or { range = [low, high] }")),
    }
}

impl Knob {
    /// The number of distinct values, if finite.
    fn count(&self) -> Option<usize> {
        match self {
            Knob::List(l) => Some(l.len()),
            Knob::Range { lo, hi, step, .. } if *step > 0.0 => Some((((hi - lo) / step).floor() as usize).saturating_add(1)),
            Knob::Range { .. } => None,
        }
    }

    fn sample(&self, rng: &mut Rng) -> Value {
        match self {
            Knob::List(l) => l[(rng.next_u64() % l.len() as u64) as usize].clone(),
            &Knob::Range { lo, hi, log, int, step } => {
                if step > 0.0 {
                    let n = (((hi - lo) / step).floor() as u64).saturating_add(1);
                    let v = lo + step * (rng.next_u64() % n) as f64;
                    return if int { Value::Integer(v.round() as i64) } else { Value::Float(v) };
                }
                let v = if log { rng.uniform(lo.ln(), hi.ln()).exp() } else { rng.uniform(lo, hi) };
                if int {
                    Value::Integer(v.round() as i64)
                } else {
                    Value::Float(v)
                }
            }
        }
    }
}

/// One expanded configuration before it is read as a spec: the merged TOML table.
#[derive(Debug, Clone)]
pub struct RawLeaf {
    /// Index of its `[[group]]` (0 without groups).
    pub group: usize,
    /// The knob values it took, by `section.key`.
    pub knobs: Vec<(String, Value)>,
    /// The whole spec with this leaf's knob values (and its group's overrides) in place.
    pub table: Table,
    /// `group[i].` when the spec has groups (error keys of this leaf start with it).
    pub prefix: String,
}

/// Expands spec text (from `path`, which anchors relative data paths) into its leaf specs.
pub fn expand(text: &str, path: &Path) -> Result<Vec<Leaf>> {
    let parse_err = |msg: String| Error::SpecParse { path: path.into(), msg };
    let mut leaves = Vec::new();
    for raw in expand_tables(text, path, &KNOB_SECTIONS)? {
        let text = toml::to_string(&raw.table).map_err(|e| parse_err(e.to_string()))?;
        let prefix = &raw.prefix;
        let spec = Spec::parse(&text, path).map_err(|e| match e {
            Error::Spec { key, msg } => Error::Spec { key: format!("{prefix}{key}"), msg },
            Error::SpecParse { path, msg } => Error::SpecParse { path, msg: format!("{prefix}{msg}") },
            other => other,
        })?;
        leaves.push(Leaf { group: raw.group, knobs: raw.knobs, spec });
    }
    Ok(leaves)
}

/// Expands spec text into merged tables, one per leaf: knobs may stand in the sections
/// `knob_sections` (and a `[[group]]` may override those sections only); the caller reads
/// each table as its kind of spec. Bounds ([`MAX_RUNS`], [`MAX_LIST_LEN`], [`MAX_RANGE`])
/// are checked here.
pub fn expand_tables(text: &str, path: &Path, knob_sections: &[&str]) -> Result<Vec<RawLeaf>> {
    let parse_err = |msg: String| Error::SpecParse { path: path.into(), msg };
    let names = match knob_sections {
        [] => String::new(),
        [one] => format!("[{one}]"),
        [rest @ .., last] => format!("{} and [{last}]", rest.iter().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(", ")),
    };
    let plain = knob_sections.join(", ");
    let mut root: Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
    let search = match root.remove("search") {
        Some(Value::Table(t)) => t,
        None => Table::new(),
        Some(_) => return Err(invalid("search", "must be a table")),
    };
    let kind = search.get("kind").and_then(Value::as_str).unwrap_or("grid").to_string();
    let num_runs = search.get("num_runs").and_then(Value::as_integer).unwrap_or(0);
    let seed = search.get("seed").and_then(Value::as_integer).unwrap_or(0) as u64;
    if kind != "grid" && kind != "random" {
        return Err(invalid("search.kind", format!("'{kind}' is not grid or random")));
    }
    if kind == "random" && num_runs <= 0 {
        return Err(invalid("search.num_runs", "a random search needs num_runs > 0"));
    }
    if num_runs > MAX_RUNS as i64 {
        return Err(invalid("search.num_runs", format!("must be at most {MAX_RUNS}")));
    }
    let groups: Vec<Option<Table>> = match root.remove("group") {
        None => vec![None],
        Some(Value::Array(a)) if !a.is_empty() => a
            .into_iter()
            .enumerate()
            .map(|(i, g)| match g {
                Value::Table(t) => Ok(Some(t)),
                _ => Err(invalid(&format!("group[{i}]"), "must be a table")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(invalid("group", "must be a non-empty [[group]] list")),
    };
    let grouped = groups.len() > 1 || groups[0].is_some();
    let mut leaves = Vec::new();
    for (gi, group) in groups.into_iter().enumerate() {
        let prefix = if grouped { format!("group[{gi}].") } else { String::new() };
        let mut merged = root.clone();
        for (section, v) in group.unwrap_or_default() {
            let (Value::Table(over), true) = (v, knob_sections.contains(&section.as_str())) else {
                return Err(invalid(&format!("{prefix}{section}"), format!("a group holds only these tables: {plain}")));
            };
            let base = merged.entry(section.clone()).or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(b) = base {
                b.extend(over);
            }
        }
        // Knobs, in a fixed order.
        let mut knobs: Vec<(String, String, Knob)> = Vec::new();
        for (section, v) in &merged {
            let Value::Table(t) = v else { continue };
            for (key, val) in t {
                let Value::Table(kt) = val else { continue };
                let path = format!("{prefix}{section}.{key}");
                if !knob_sections.contains(&section.as_str()) {
                    return Err(invalid(&path, format!("knobs are allowed only in {names}")));
                }
                let knob = parse_knob(&path, kt)?;
                if kind == "grid" && matches!(knob, Knob::Range { .. }) {
                    return Err(invalid(&path, "a range cannot be in a grid search: use { list = [...] } or [search] kind = \"random\""));
                }
                knobs.push((section.clone(), key.clone(), knob));
            }
        }
        let combos: Vec<Vec<Value>> = if kind == "grid" {
            // Counted before anything is built: at most MAX_RUNS leaves in all.
            let grid = knobs.iter().try_fold(1usize, |acc, (_, _, k)| acc.checked_mul(k.count().unwrap_or(1)));
            if grid.and_then(|n| n.checked_add(leaves.len())).is_none_or(|n| n > MAX_RUNS) {
                let n = grid.map(|n| n.to_string()).unwrap_or_else(|| "more than 2^64".into());
                let earlier = if leaves.is_empty() { String::new() } else { format!(" (after {} of earlier groups)", leaves.len()) };
                return Err(invalid(
                    &format!("{prefix}search"),
                    format!("the grid expands to {n} configs{earlier}; at most {MAX_RUNS} in all"),
                ));
            }
            let mut combos = vec![Vec::new()];
            for (_, _, k) in &knobs {
                let Knob::List(l) = k else { continue };
                combos = combos.into_iter().flat_map(|c| l.iter().map(move |v| [c.clone(), vec![v.clone()]].concat())).collect();
            }
            combos
        } else {
            let want = num_runs as usize;
            if want.saturating_add(leaves.len()) > MAX_RUNS {
                return Err(invalid(
                    &format!("{prefix}search.num_runs"),
                    format!("{want} runs after {} of earlier groups: at most {MAX_RUNS} in all", leaves.len()),
                ));
            }
            let finite: Option<usize> = knobs.iter().try_fold(1usize, |acc, (_, _, k)| k.count().map(|c| acc.saturating_mul(c)));
            if let Some(n) = finite {
                if n < want {
                    return Err(invalid(&format!("{prefix}search.num_runs"), format!("asks for {want} distinct configs, only {n} exist")));
                }
            }
            let mut rng = Rng::new(seed ^ (gi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut combos: Vec<Vec<Value>> = Vec::new();
            let mut tries = 0;
            while combos.len() < want {
                tries += 1;
                if tries > want * 1000 {
                    return Err(invalid(&format!("{prefix}search.num_runs"), format!("found only {} distinct configs", combos.len())));
                }
                let c: Vec<Value> = knobs.iter().map(|(_, _, k)| k.sample(&mut rng)).collect();
                if !combos.contains(&c) {
                    combos.push(c);
                }
            }
            combos
        };
        for combo in combos {
            let mut t = merged.clone();
            let mut taken = Vec::new();
            for ((section, key, _), v) in knobs.iter().zip(&combo) {
                if let Some(Value::Table(s)) = t.get_mut(section) {
                    s.insert(key.clone(), v.clone());
                }
                taken.push((format!("{section}.{key}"), v.clone()));
            }
            leaves.push(RawLeaf { group: gi, knobs: taken, table: t, prefix: prefix.clone() });
        }
    }
    Ok(leaves)
}
