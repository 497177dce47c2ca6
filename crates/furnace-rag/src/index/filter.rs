//! Metadata filters: every condition must hold (AND). A condition is an equality
//! (`{"lang": "en"}`, or `{"lang": {"$eq": "en"}}`) or a membership test
//! (`{"lang": {"$in": ["en", "de"]}}`). A key missing from an entry's metadata never
//! matches. Numbers compare by value (`1` equals `1.0`).

use serde_json::{Map, Value};

use crate::{Error, Result};

/// One condition on a metadata key.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The value equals this one.
    Eq(Value),
    /// The value equals one of these.
    In(Vec<Value>),
}

/// A conjunction of conditions on metadata keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    conditions: Vec<(String, Condition)>,
}

impl Filter {
    /// A filter that matches everything.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Adds a condition (builder style).
    pub fn with(mut self, key: impl Into<String>, condition: Condition) -> Self {
        self.conditions.push((key.into(), condition));
        self
    }

    /// Whether the filter has no condition.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Parses the JSON form: an object of `key: value` or `key: {"$eq"|"$in": ...}`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(Error::Filter(format!("a filter is a JSON object, not {value}")));
        };
        let mut conditions = Vec::with_capacity(map.len());
        for (key, v) in map {
            if key.starts_with('$') {
                return Err(Error::Filter(format!("unsupported top-level operator {key:?} (keys are metadata fields)")));
            }
            let cond = match v {
                Value::Object(ops) if ops.keys().any(|k| k.starts_with('$')) => {
                    if ops.len() != 1 {
                        return Err(Error::Filter(format!("{key:?}: give exactly one operator ($eq or $in)")));
                    }
                    let Some((op, arg)) = ops.iter().next() else {
                        return Err(Error::Filter(format!("{key:?}: empty operator object")));
                    };
                    match (op.as_str(), arg) {
                        ("$eq", a) => Condition::Eq(a.clone()),
                        ("$in", Value::Array(items)) => Condition::In(items.clone()),
                        ("$in", other) => return Err(Error::Filter(format!("{key:?}: $in takes an array, not {other}"))),
                        (other, _) => return Err(Error::Filter(format!("{key:?}: unsupported operator {other:?} (use $eq or $in)"))),
                    }
                }
                other => Condition::Eq(other.clone()),
            };
            conditions.push((key.clone(), cond));
        }
        Ok(Filter { conditions })
    }

    /// Whether `metadata` satisfies every condition (no metadata matches only the empty filter).
    pub fn matches(&self, metadata: Option<&Map<String, Value>>) -> bool {
        self.conditions.iter().all(|(key, cond)| {
            let Some(v) = metadata.and_then(|m| m.get(key)) else {
                return false;
            };
            match cond {
                Condition::Eq(want) => values_equal(v, want),
                Condition::In(items) => items.iter().any(|want| values_equal(v, want)),
            }
        })
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(p), Some(q), _, _) => p == q,
            (_, _, Some(p), Some(q)) => p == q,
            _ => x.as_f64() == y.as_f64(),
        },
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn equality_and_in_list() {
        let en = meta(json!({"lang": "en", "year": 2020}));
        let fr = meta(json!({"lang": "fr", "year": 2020.0}));
        let f = Filter::from_json(&json!({"lang": "en"})).unwrap();
        assert!(f.matches(Some(&en)) && !f.matches(Some(&fr)) && !f.matches(None));
        let f = Filter::from_json(&json!({"lang": {"$in": ["en", "de"]}, "year": 2020})).unwrap();
        assert!(f.matches(Some(&en)) && !f.matches(Some(&fr)));
        let f = Filter::from_json(&json!({"year": {"$eq": 2020}})).unwrap();
        assert!(f.matches(Some(&en)) && f.matches(Some(&fr)));
        assert!(Filter::all().matches(None));
        assert!(!Filter::from_json(&json!({"missing": 1})).unwrap().matches(Some(&en)));
        // An object without operators is a plain value to compare.
        let f = Filter::from_json(&json!({"a": {"b": 1}})).unwrap();
        assert!(f.matches(Some(&meta(json!({"a": {"b": 1}})))));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            json!([1]),
            json!({"lang": {"$in": "en"}}),
            json!({"lang": {"$gt": 1}}),
            json!({"$or": []}),
            json!({"x": {"$eq": 1, "$in": []}}),
        ] {
            assert!(matches!(Filter::from_json(&bad), Err(Error::Filter(_))), "{bad}");
        }
    }
}
