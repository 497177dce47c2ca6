//! Knobs and config groups: a spec whose `[lora]`, `[trainer]` or `[model]` values may be
//! knobs (`r = { list = [8, 32] }`, `learning_rate = { range = [1e-5, 1e-3], log = true }`,
//! `batch_size = { range = [2, 8], dtype = "int", step = 2 }`) and which may hold several
//! `[[group]]`s expands into leaf specs, each validated before anything trains.
//!
//! `[search] kind = "grid"` (the default) takes the cartesian product of the lists (a range
//! is an error); `kind = "random"` draws `num_runs` distinct configs per group from lists and
//! ranges with a seed; `kind = "tpe"` expands into its first `max_concurrent` trials (random
//! draws) and the experiment driver proposes the others from their results ([`Space`];
//! docs/search.md). A `[[group]]` holds `[group.lora]`, `[group.trainer]`, `[group.model]`
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
pub enum Knob {
    /// One of these values.
    List(Vec<Value>),
    /// A number in `[lo, hi]`: on a log scale when `log`, an integer when `int`, on a
    /// grid of `step` from `lo` when `step > 0`.
    Range {
        /// Lower bound.
        lo: f64,
        /// Upper bound.
        hi: f64,
        /// Drawn on a log scale.
        log: bool,
        /// An integer.
        int: bool,
        /// Grid step from `lo` (0: continuous).
        step: f64,
    },
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
    pub fn count(&self) -> Option<usize> {
        match self {
            Knob::List(l) => Some(l.len()),
            Knob::Range { lo, hi, step, .. } if *step > 0.0 => Some((((hi - lo) / step).floor() as usize).saturating_add(1)),
            Knob::Range { .. } => None,
        }
    }

    /// A value drawn uniformly (on the log scale for a log range).
    pub fn sample(&self, rng: &mut Rng) -> Value {
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
    let (settings, groups) = parse_space(text, path, knob_sections)?;
    let SearchSettings { kind, num_runs, seed, .. } = settings.clone();
    let num_runs = num_runs as i64;
    if kind == "tpe" {
        // The first trials (as many as train at once) are random draws; the driver
        // proposes the others from their results (furnace-exp's TPE).
        let space = Space { settings, groups };
        let mut trials: Vec<(usize, Vec<Value>)> = Vec::new();
        for i in 0..space.settings.max_concurrent.min(space.settings.num_runs) {
            let mut rng = space.trial_rng(i);
            let t = space.random_distinct(&mut rng, &trials);
            trials.push(t);
        }
        return trials.iter().map(|(g, v)| space.raw_leaf(*g, v)).collect();
    }
    let mut leaves = Vec::new();
    for (gi, GroupSpace { prefix, table: merged, dims }) in groups.into_iter().enumerate() {
        let knobs: Vec<(String, String, Knob)> = dims.into_iter().map(|d| (d.section, d.key, d.knob)).collect();
        if kind == "grid" {
            if let Some((section, key, _)) = knobs.iter().find(|(_, _, k)| matches!(k, Knob::Range { .. })) {
                return Err(invalid(
                    &format!("{prefix}{section}.{key}"),
                    "a range cannot be in a grid search: use { list = [...] } or [search] kind = \"random\" or \"tpe\"",
                ));
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

/// `[search]`: how a spec's knobs become runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSettings {
    /// `grid`, `random` or `tpe`.
    pub kind: String,
    /// Configs drawn (random, per group) or trials in all (tpe).
    pub num_runs: usize,
    /// Seed of the draws.
    pub seed: u64,
    /// TPE: trials training at once (a new one is proposed when one ends).
    pub max_concurrent: usize,
    /// TPE: the fraction of the finished trials that are "good" (l(x)); the rest are g(x).
    pub gamma: f64,
    /// TPE: candidates drawn from l(x) per proposal; the one with the best l(x)/g(x) wins.
    pub candidates: usize,
    /// TPE: trials drawn at random before the estimator proposes (at least 2 must finish
    /// before it does).
    pub startup: usize,
}

/// The keys of `[search]`.
const SEARCH_KEYS: [&str; 7] = ["kind", "num_runs", "seed", "max_concurrent", "gamma", "candidates", "startup"];
/// The most candidates a TPE proposal draws.
pub const MAX_CANDIDATES: usize = 100_000;

fn parse_search(search: &Table) -> Result<SearchSettings> {
    if let Some(k) = search.keys().find(|k| !SEARCH_KEYS.contains(&k.as_str())) {
        return Err(invalid(&format!("search.{k}"), format!("unknown key (expected one of {})", SEARCH_KEYS.join(", "))));
    }
    let int = |key: &str| -> Result<Option<i64>> {
        match search.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(*i)),
            Some(_) => Err(invalid(&format!("search.{key}"), "must be an integer")),
        }
    };
    let kind = match search.get("kind") {
        None => "grid".to_string(),
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(invalid("search.kind", "must be a string: grid, random or tpe")),
    };
    if !["grid", "random", "tpe"].contains(&kind.as_str()) {
        return Err(invalid("search.kind", format!("'{kind}' is not grid, random or tpe")));
    }
    let num_runs = int("num_runs")?.unwrap_or(0);
    if kind != "grid" && num_runs <= 0 {
        return Err(invalid("search.num_runs", format!("a {kind} search needs num_runs > 0")));
    }
    if num_runs > MAX_RUNS as i64 {
        return Err(invalid("search.num_runs", format!("must be at most {MAX_RUNS}")));
    }
    let num_runs = num_runs.max(0) as usize;
    let seed = int("seed")?.unwrap_or(0) as u64;
    let max_concurrent = int("max_concurrent")?.unwrap_or(4);
    if max_concurrent < 1 || max_concurrent > MAX_RUNS as i64 {
        return Err(invalid("search.max_concurrent", format!("must be 1 to {MAX_RUNS}")));
    }
    let max_concurrent = max_concurrent as usize;
    let gamma = match search.get("gamma") {
        None => 0.25,
        Some(v) => num(v).ok_or_else(|| invalid("search.gamma", "must be a number"))?,
    };
    if !(gamma > 0.0 && gamma < 1.0) {
        return Err(invalid("search.gamma", format!("{gamma} is not in (0, 1)")));
    }
    let candidates = int("candidates")?.unwrap_or(24);
    if candidates < 1 || candidates > MAX_CANDIDATES as i64 {
        return Err(invalid("search.candidates", format!("must be 1 to {MAX_CANDIDATES}")));
    }
    let startup = int("startup")?.unwrap_or(max_concurrent as i64);
    if startup < 1 || startup > MAX_RUNS as i64 {
        return Err(invalid("search.startup", format!("must be 1 to {MAX_RUNS}")));
    }
    if kind != "tpe" {
        for key in ["max_concurrent", "gamma", "candidates", "startup"] {
            if search.contains_key(key) {
                return Err(invalid(&format!("search.{key}"), format!("is a setting of kind = \"tpe\", not of {kind}")));
            }
        }
    }
    Ok(SearchSettings { kind, num_runs, seed, max_concurrent, gamma, candidates: candidates as usize, startup: startup as usize })
}

/// One knob of a group: where it stands and its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Dim {
    /// `lora`, `trainer` or `model`.
    pub section: String,
    /// The setting.
    pub key: String,
    /// Its values.
    pub knob: Knob,
}

impl Dim {
    /// `section.key`, as runs record their knobs.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// One `[[group]]` (or the whole spec without groups): the merged table and its knobs in
/// a fixed order.
#[derive(Debug, Clone)]
pub struct GroupSpace {
    /// `group[i].` when the spec has groups.
    pub prefix: String,
    /// The spec with the group's overrides, knobs still in place.
    pub table: Table,
    /// Its knobs.
    pub dims: Vec<Dim>,
}

/// The search space of a spec: its `[search]` and the knobs of each group.
#[derive(Debug, Clone)]
pub struct Space {
    /// `[search]`.
    pub settings: SearchSettings,
    /// The groups (one without `[[group]]`s).
    pub groups: Vec<GroupSpace>,
}

/// Reads `[search]` and each group's knobs from spec text (checking every knob).
fn parse_space(text: &str, path: &Path, knob_sections: &[&str]) -> Result<(SearchSettings, Vec<GroupSpace>)> {
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
    let settings = parse_search(&search)?;
    if settings.kind == "tpe" && knob_sections != KNOB_SECTIONS {
        return Err(invalid("search.kind", "a tpe search proposes training runs; this spec's runs are not trained"));
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
    let mut out = Vec::new();
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
        let mut dims = Vec::new();
        for (section, v) in &merged {
            let Value::Table(t) = v else { continue };
            for (key, val) in t {
                let Value::Table(kt) = val else { continue };
                let path = format!("{prefix}{section}.{key}");
                if !knob_sections.contains(&section.as_str()) {
                    return Err(invalid(&path, format!("knobs are allowed only in {names}")));
                }
                dims.push(Dim { section: section.clone(), key: key.clone(), knob: parse_knob(&path, kt)? });
            }
        }
        out.push(GroupSpace { prefix, table: merged, dims });
    }
    Ok((settings, out))
}

impl Space {
    /// The space of spec text whose `[search] kind = "tpe"`; `None` for other kinds.
    pub fn tpe(text: &str, path: &Path) -> Result<Option<Space>> {
        let (settings, groups) = parse_space(text, path, &KNOB_SECTIONS)?;
        Ok((settings.kind == "tpe").then_some(Space { settings, groups }))
    }

    /// The random generator of trial `i`: seeded by the search's seed and `i` only.
    pub fn trial_rng(&self, i: usize) -> Rng {
        Rng::new(self.settings.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A random trial (group drawn uniformly, then each knob), distinct from `earlier`
    /// when up to 4096 draws find one (cheap; only a nearly exhausted list space repeats).
    pub fn random_distinct(&self, rng: &mut Rng, earlier: &[(usize, Vec<Value>)]) -> (usize, Vec<Value>) {
        let mut t = self.random(rng);
        for _ in 0..4096 {
            if !earlier.contains(&t) {
                break;
            }
            t = self.random(rng);
        }
        t
    }

    fn random(&self, rng: &mut Rng) -> (usize, Vec<Value>) {
        let g = (rng.next_u64() % self.groups.len() as u64) as usize;
        (g, self.groups[g].dims.iter().map(|d| d.knob.sample(rng)).collect())
    }

    /// The merged table of group `g` with `values` (one per knob of the group) in place.
    pub fn raw_leaf(&self, g: usize, values: &[Value]) -> Result<RawLeaf> {
        let group = self.groups.get(g).ok_or_else(|| invalid("group", format!("no group {g}")))?;
        if values.len() != group.dims.len() {
            return Err(invalid(&format!("{}search", group.prefix), format!("{} values for {} knobs", values.len(), group.dims.len())));
        }
        let mut t = group.table.clone();
        let mut taken = Vec::new();
        for (d, v) in group.dims.iter().zip(values) {
            if let Some(Value::Table(s)) = t.get_mut(&d.section) {
                s.insert(d.key.clone(), v.clone());
            }
            taken.push((d.path(), v.clone()));
        }
        Ok(RawLeaf { group: g, knobs: taken, table: t, prefix: group.prefix.clone() })
    }

    /// The validated leaf spec of group `g` with `values` (relative data paths anchored at
    /// `path`).
    pub fn leaf(&self, g: usize, values: &[Value], path: &Path) -> Result<Leaf> {
        let raw = self.raw_leaf(g, values)?;
        let text = toml::to_string(&raw.table).map_err(|e| Error::SpecParse { path: path.into(), msg: e.to_string() })?;
        let prefix = &raw.prefix;
        let spec = Spec::parse(&text, path).map_err(|e| match e {
            Error::Spec { key, msg } => Error::Spec { key: format!("{prefix}{key}"), msg },
            other => other,
        })?;
        Ok(Leaf { group: raw.group, knobs: raw.knobs, spec })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(experiment: &str, search: &str) -> String {
        format!(
            "[experiment]\nname = \"x\"\n{experiment}\n[search]\n{search}\n[data]\ntrain = \"t.jsonl\"\n[model]\nbase = \"m\"\n\
             [lora]\nr = 4\nalpha = {{ list = [4, 8] }}\n[trainer]\nlearning_rate = {{ range = [1e-5, 1e-2], log = true }}\n"
        )
    }

    fn err(text: &str) -> String {
        expand(text, Path::new("spec.toml")).unwrap_err().to_string()
    }

    #[test]
    fn search_and_policy_keys_are_checked_naming_the_key() {
        let cases = [
            ("", "kind = \"bayes\"", "search.kind: 'bayes' is not grid, random or tpe"),
            ("", "kind = \"tpe\"", "search.num_runs: a tpe search needs num_runs > 0"),
            ("", "kind = \"tpe\"\nnum_runs = 8\ngamma = 1.5", "search.gamma: 1.5 is not in (0, 1)"),
            ("", "kind = \"tpe\"\nnum_runs = 8\nmax_concurrent = 0", "search.max_concurrent: must be 1 to 10000"),
            ("", "kind = \"tpe\"\nnum_runs = 8\ncandidates = 0", "search.candidates: must be 1 to 100000"),
            ("", "kind = \"tpe\"\nnum_runs = 8\nstartup = \"x\"", "search.startup: must be an integer"),
            ("", "kind = \"random\"\nnum_runs = 8\ngamma = 0.5", "search.gamma: is a setting of kind = \"tpe\""),
            ("", "kind = \"tpe\"\nnum_run = 8", "search.num_run: unknown key"),
            ("policy = \"hyperband\"", "kind = \"random\"\nnum_runs = 2", "experiment.policy: 'hyperband' is not one of none, asha, pbt"),
            ("policy = \"asha\"\nmin_chunks = 0", "kind = \"random\"\nnum_runs = 2", "experiment.min_chunks: must be >= 1"),
            ("policy = \"pbt\"\npbt_fraction = 0.6", "kind = \"random\"\nnum_runs = 2", "experiment.pbt_fraction: 0.6 is not in (0, 0.5]"),
            ("policy = \"pbt\"\nperturb = 1.0", "kind = \"random\"\nnum_runs = 2", "experiment.perturb: 1 is not in (0, 1)"),
            ("policy = \"pbt\"\nmax_runs = 0", "kind = \"random\"\nnum_runs = 2", "experiment.max_runs: must be >= 1"),
            ("policy = \"pbt\"\npbt_interval = 0", "kind = \"random\"\nnum_runs = 2", "experiment.pbt_interval: must be >= 1"),
            ("policy = \"pbt\"\nmax_runs = 10001", "kind = \"random\"\nnum_runs = 2", "experiment.max_runs: must be at most 10000"),
        ];
        for (experiment, search, want) in cases {
            let e = err(&spec(experiment, search));
            assert!(e.starts_with(want), "{experiment} {search}: {e}");
        }
        // Accepted: every key at a sane value.
        let ok = spec(
            "policy = \"pbt\"\npbt_fraction = 0.5\nperturb = 0.3\nmax_runs = 12\npbt_interval = 2\nmin_chunks = 2",
            "kind = \"tpe\"\nnum_runs = 8\nmax_concurrent = 3\ngamma = 0.3\ncandidates = 16\nstartup = 4\nseed = 1",
        );
        let leaves = expand(&ok, Path::new("spec.toml")).unwrap();
        assert_eq!(leaves[0].spec.experiment.min_chunks, 2);
        assert_eq!(leaves[0].spec.experiment.max_runs, Some(12));
    }

    #[test]
    fn a_tpe_spec_expands_into_its_first_concurrent_trials_seeded() {
        let text = spec("", "kind = \"tpe\"\nnum_runs = 8\nmax_concurrent = 3\nseed = 5");
        let a = expand(&text, Path::new("spec.toml")).unwrap();
        let b = expand(&text, Path::new("spec.toml")).unwrap();
        assert_eq!(a.len(), 3);
        let knobs = |l: &[Leaf]| l.iter().map(|x| x.knobs.clone()).collect::<Vec<_>>();
        assert_eq!(knobs(&a), knobs(&b));
        for leaf in &a {
            let lr = leaf.spec.trainer.learning_rate;
            assert!((1e-5..=1e-2).contains(&lr), "{lr}");
            assert!([4.0, 8.0].contains(&leaf.spec.lora.alpha));
        }
        // The space reads back; trial i's leaf is the same as expanded.
        let space = Space::tpe(&text, Path::new("spec.toml")).unwrap().unwrap();
        assert_eq!((space.settings.num_runs, space.settings.max_concurrent, space.settings.startup), (8, 3, 3));
        let mut rng = space.trial_rng(0);
        let (g, values) = space.random_distinct(&mut rng, &[]);
        let leaf = space.leaf(g, &values, Path::new("spec.toml")).unwrap();
        assert_eq!(leaf.knobs, a[0].knobs);
        assert!(Space::tpe(&spec("", "kind = \"random\"\nnum_runs = 2"), Path::new("spec.toml")).unwrap().is_none());
    }
}
