//! The eval set: rows read from JSONL/JSON/CSV/Parquet into questions, reference answers
//! and relevant document ids, and cut into shards by a seeded permutation (never
//! contiguous slices: a file sorted by topic or difficulty would bias every early
//! estimate).

use crate::error::{Error, Result};
use crate::spec::DataSection;
use serde_json::Value;

/// One question of the eval set.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Its position in the file (0-based).
    pub index: usize,
    /// Its id (the id column, else the row number).
    pub id: String,
    /// The question.
    pub question: String,
    /// Reference answers (may be empty).
    pub answers: Vec<String>,
    /// Relevant document ids (may be empty).
    pub relevant: Vec<String>,
    /// The whole row (templates see it as `row`).
    pub row: Value,
}

/// The eval set.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// Whether every row has reference answers.
    pub has_answers: bool,
    /// Whether every row has relevant ids.
    pub has_relevant: bool,
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Number(n) => Some(vec![n.to_string()]),
        Value::Bool(b) => Some(vec![b.to_string()]),
        Value::Array(a) => a.iter().map(|x| strings(x).and_then(|mut v| if v.len() == 1 { v.pop() } else { None })).collect(),
        Value::Null => Some(Vec::new()),
        Value::Object(_) => None,
    }
}

/// A CSV cell holding a JSON list (`["a.md", "b.md"]`) reads as that list.
fn maybe_json_list(v: &Value) -> Value {
    if let Value::String(s) = v {
        if s.trim_start().starts_with('[') {
            if let Ok(parsed) = serde_json::from_str::<Value>(s) {
                return parsed;
            }
        }
    }
    v.clone()
}

/// Reads the eval set the `[data]` section names.
pub fn load(d: &DataSection) -> Result<EvalSet> {
    let rows = furnace_train::data::read_rows(&d.path).map_err(|e| Error::Invalid(e.to_string()))?;
    let limit = d.limit.unwrap_or(usize::MAX);
    let mut examples = Vec::new();
    let at = |line: usize| format!("{}:{line}", d.path.display());
    for (line, row) in rows.into_iter().take(limit) {
        let row = row.map_err(|m| Error::Invalid(format!("{}: {m}", at(line))))?;
        let Value::Object(obj) = &row else {
            return Err(Error::Invalid(format!("{}: a row must be an object with a '{}' column", at(line), d.question)));
        };
        let question = match obj.get(&d.question) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(_) => return Err(Error::Invalid(format!("{}: '{}' must be a non-empty string", at(line), d.question))),
            None => {
                let cols: Vec<&String> = obj.keys().collect();
                return Err(Error::Invalid(format!(
                    "{}: no '{}' column (columns: {cols:?}); set [data] question = \"<column>\"",
                    at(line),
                    d.question
                )));
            }
        };
        let column = |given: &Option<String>, defaults: &[&str]| -> Result<Option<Vec<String>>> {
            let name = match given {
                Some(n) => Some(n.as_str()),
                None => defaults.iter().copied().find(|c| obj.contains_key(*c)),
            };
            let Some(name) = name else { return Ok(None) };
            match obj.get(name) {
                None => Err(Error::Invalid(format!("{}: no '{name}' column", at(line)))),
                Some(v) => strings(&maybe_json_list(v))
                    .map(Some)
                    .ok_or_else(|| Error::Invalid(format!("{}: '{name}' must be a string or a list of strings", at(line)))),
            }
        };
        let answers = column(&d.answers, &["answers", "answer"])?;
        let relevant = column(&d.relevant, &["relevant"])?;
        let id = match &d.id {
            Some(c) => match obj.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err(Error::Invalid(format!("{}: no string or number '{c}' column for the id", at(line)))),
            },
            None => match obj.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => format!("row-{}", examples.len()),
            },
        };
        examples.push((
            answers,
            relevant,
            Example { index: examples.len(), id, question, answers: Vec::new(), relevant: Vec::new(), row: row.clone() },
        ));
    }
    if examples.is_empty() {
        return Err(Error::Invalid(format!("{}: the eval set has no rows", d.path.display())));
    }
    let has_answers = examples.iter().all(|(a, _, _)| a.as_ref().is_some_and(|a| !a.is_empty()));
    let has_relevant = examples.iter().all(|(_, r, _)| r.is_some());
    let mut seen = std::collections::HashSet::new();
    let examples: Vec<Example> = examples
        .into_iter()
        .map(|(a, r, mut ex)| {
            ex.answers = a.unwrap_or_default();
            ex.relevant = r.unwrap_or_default();
            ex
        })
        .collect();
    for ex in &examples {
        if !seen.insert(ex.id.as_str()) {
            return Err(Error::Invalid(format!("{}: the id '{}' appears twice; ids must be unique", d.path.display(), ex.id)));
        }
    }
    Ok(EvalSet { examples, has_answers, has_relevant })
}

/// The shards of `n` examples: a seeded permutation cut into `num_shards` parts whose
/// sizes differ by at most one (fewer shards when there are fewer examples).
pub fn shards(n: usize, num_shards: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = furnace_model::rng::Rng::new(seed ^ 0x5EED_E7A1_5000_0000);
    // Fisher-Yates.
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let parts = num_shards.clamp(1, n.max(1));
    let (base, extra) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for s in 0..parts {
        let len = base + usize::from(s < extra);
        out.push(order[start..start + len].to_vec());
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_a_balanced_seeded_permutation() {
        let s = shards(103, 8, 7);
        assert_eq!(s.len(), 8);
        let sizes: Vec<usize> = s.iter().map(Vec::len).collect();
        assert!(sizes.iter().all(|&l| l == 12 || l == 13), "{sizes:?}");
        let mut all: Vec<usize> = s.concat();
        all.sort_unstable();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(s, shards(103, 8, 7));
        assert_ne!(s, shards(103, 8, 8));
        // Not contiguous slices of the file.
        assert_ne!(s[0], (0..13).collect::<Vec<_>>());
        assert_eq!(shards(3, 8, 1).len(), 3);
    }
}
