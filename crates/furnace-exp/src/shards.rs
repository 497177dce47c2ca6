//! What evals mode keeps per pipeline (a run of an `evals` experiment): every scored
//! example of every shard (table `eval_examples`) and each metric's interval after each
//! shard (table `metric_bounds`, beside the estimate in `metrics`). A shard is recorded
//! in one transaction with the run's progress, so after a crash a run continues at the
//! first shard not recorded: none lost, none scored twice.

use crate::error::{Error, Result};
use crate::store::{commit, now, Store};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS eval_examples(
    run_id INTEGER NOT NULL REFERENCES runs(id), pos INTEGER NOT NULL, shard INTEGER NOT NULL,
    example_id TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY(run_id, pos));
CREATE TABLE IF NOT EXISTS metric_bounds(
    run_id INTEGER NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, name TEXT NOT NULL,
    lower REAL NOT NULL, upper REAL NOT NULL, PRIMARY KEY(run_id, step, name));
";

/// One scored example of a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleRecord {
    /// The example's id in the eval set.
    pub example_id: String,
    /// Its index in the eval set.
    pub index: usize,
    /// The generated answer.
    pub prediction: String,
    /// The retrieved document ids, best first (empty without retrieval).
    #[serde(default)]
    pub retrieved: Vec<String>,
    /// Each metric's score for it, by name (a ratio metric's `name/num` and `name/den`).
    pub scores: std::collections::BTreeMap<String, f64>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Seconds to answer.
    pub latency: f64,
    /// Why generation stopped, or the generator's error.
    pub finish_reason: String,
}

/// A metric's estimate and interval after a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Metric name.
    pub name: String,
    /// The estimate.
    pub value: f64,
    /// The interval, when the metric has one (tokens, latency and cost do not).
    pub bounds: Option<(f64, f64)>,
}

/// One metric's interval at one step ([`Store::metric_bounds`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoundRow {
    /// Run.
    pub run_id: i64,
    /// Shards done.
    pub step: i64,
    /// Metric.
    pub name: String,
    /// Lower bound.
    pub lower: f64,
    /// Upper bound.
    pub upper: f64,
}

impl Store {
    /// Records shard `shard` (0-based) of a run: its examples, each metric's estimate
    /// (and interval) at step `shard + 1`, and the run's progress, in one transaction.
    /// Refused when the run has not done exactly `shard` shards (a shard is never scored
    /// twice).
    pub fn record_shard(&self, run_id: i64, shard: i64, examples: &[ExampleRecord], estimates: &[Estimate]) -> Result<()> {
        let tx = self.write_tx()?;
        let done: Option<i64> = tx.query_row("SELECT steps_done FROM runs WHERE id = ?1", [run_id], |r| r.get(0)).optional()?;
        match done {
            None => return Err(Error::RunNotFound { run: run_id }),
            Some(d) if d != shard => {
                return Err(Error::Invalid(format!("run {run_id}: shard {} is recorded after {d} shards done", shard + 1)))
            }
            _ => {}
        }
        let first: i64 = tx.query_row("SELECT COUNT(*) FROM eval_examples WHERE run_id = ?1", [run_id], |r| r.get(0))?;
        for (i, ex) in examples.iter().enumerate() {
            let record = serde_json::to_string(ex).map_err(|source| Error::Encode { what: "an eval example", source })?;
            tx.execute(
                "INSERT INTO eval_examples(run_id, pos, shard, example_id, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![run_id, first + i as i64, shard, ex.example_id, record],
            )?;
        }
        let step = shard + 1;
        let t = now();
        for e in estimates.iter().filter(|e| e.value.is_finite()) {
            tx.execute(
                "INSERT OR REPLACE INTO metrics(run_id, step, name, value, time) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![run_id, step, e.name, e.value, t],
            )?;
            if let Some((lo, hi)) = e.bounds.filter(|(lo, hi)| lo.is_finite() && hi.is_finite()) {
                tx.execute(
                    "INSERT OR REPLACE INTO metric_bounds(run_id, step, name, lower, upper) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![run_id, step, e.name, lo, hi],
                )?;
            }
        }
        tx.execute(
            "UPDATE runs SET steps_done = ?2, chunks_done = ?2, status = CASE WHEN status = 'new' THEN 'ongoing' ELSE status END WHERE id = ?1",
            params![run_id, step],
        )?;
        commit(tx, "record_shard")
    }

    /// A run's scored examples, in the order they were scored.
    pub fn eval_examples(&self, run_id: i64) -> Result<Vec<ExampleRecord>> {
        let mut st = self.conn.prepare("SELECT pos, record FROM eval_examples WHERE run_id = ?1 ORDER BY pos")?;
        let rows = st.query_map([run_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(pos, s)| {
                serde_json::from_str(&s).map_err(|e| Error::Invalid(format!("store: run {run_id}: eval example {pos} does not read: {e}")))
            })
            .collect()
    }

    /// Every interval of an experiment's runs, by run and step.
    pub fn experiment_bounds(&self, experiment_id: i64) -> Result<Vec<BoundRow>> {
        let mut st = self.conn.prepare(
            "SELECT b.run_id, b.step, b.name, b.lower, b.upper FROM metric_bounds b JOIN runs r ON r.id = b.run_id \
             WHERE r.experiment_id = ?1 ORDER BY b.run_id, b.step, b.name",
        )?;
        let rows = st
            .query_map([experiment_id], |r| {
                Ok(BoundRow { run_id: r.get(0)?, step: r.get(1)?, name: r.get(2)?, lower: r.get(3)?, upper: r.get(4)? })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// One run's intervals of one metric, by step.
    pub fn bound_series(&self, run_id: i64, name: &str) -> Result<Vec<(i64, f64, f64)>> {
        let mut st = self.conn.prepare("SELECT step, lower, upper FROM metric_bounds WHERE run_id = ?1 AND name = ?2 ORDER BY step")?;
        let rows = st.query_map(params![run_id, name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, score: f64) -> ExampleRecord {
        ExampleRecord {
            example_id: id.into(),
            index: 0,
            prediction: "p".into(),
            retrieved: vec![],
            scores: [("em".to_string(), score)].into(),
            prompt_tokens: 3,
            completion_tokens: 2,
            latency: 0.1,
            finish_reason: "stop".into(),
        }
    }

    #[test]
    fn a_shard_is_recorded_once_with_its_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).unwrap();
        let exp = store.create_experiment("e", "evals", &dir.path().join("s.toml"), "").unwrap();
        let run = store.add_run(exp.id, &serde_json::json!({}), &serde_json::json!({}), 0, 2, 2, None).unwrap();
        let est = [Estimate { name: "em".into(), value: 0.5, bounds: Some((0.1, 0.9)) }];
        store.record_shard(run, 0, &[ex("a", 1.0), ex("b", 0.0)], &est).unwrap();
        // The same shard again, or one ahead: refused, nothing written.
        assert!(store.record_shard(run, 0, &[ex("a", 1.0)], &est).is_err());
        assert!(store.record_shard(run, 2, &[ex("c", 1.0)], &est).is_err());
        let r = store.run(run).unwrap();
        assert_eq!((r.steps_done, r.status.as_str()), (1, "ongoing"));
        assert_eq!(store.eval_examples(run).unwrap().iter().map(|e| e.example_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        store.record_shard(run, 1, &[ex("c", 1.0)], &est).unwrap();
        assert_eq!(store.eval_examples(run).unwrap().len(), 3);
        let b = store.experiment_bounds(exp.id).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!((b[1].step, b[1].lower, b[1].upper), (2, 0.1, 0.9));
        assert_eq!(store.bound_series(run, "em").unwrap(), vec![(1, 0.1, 0.9), (2, 0.1, 0.9)]);
    }
}
