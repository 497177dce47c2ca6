//! Population-based training (Jaderberg et al., "Population Based Training of Neural
//! Networks") at chunk boundaries: every `pbt_interval` chunks, once every active run has
//! reached the boundary, the worst `pbt_fraction` of the runs that reached it (by eval
//! loss) stop ("exploit") and warm clones of the best take their places with perturbed
//! knobs ("explore": each numeric knob times `1 - perturb` or `1 + perturb`, drawn with
//! the experiment's seed).
//!
//! Durability: a replacement is one transaction — the stop of the worst run (an applied
//! op of the policy, its message naming the parent and the new knobs) and the pending
//! warm-clone op of the best (the clone op is the lineage: its run is the parent, its
//! `new_run_id` the child) — and the driver applies the clone op as any other. The plan
//! at a boundary is a function of the stored scores, so after a crash the same
//! replacements are found again and those already recorded are not made twice.

use crate::error::Result;
use crate::store::{commit, now, OpKind, RunStatus, Store};
use furnace_model::rng::Rng;
use rusqlite::params;

/// The knobs a PBT clone perturbs (those a warm clone may change and that are numbers):
/// the learning rate always, the others when the run's spec made them knobs.
pub const PERTURBED: [&str; 4] = ["trainer.learning_rate", "lora.alpha", "lora.dropout", "trainer.weight_decay"];

/// The prefix of the message of a PBT stop (how a replacement already made is found).
pub const STOP_PREFIX: &str = "pbt: replaced";

/// The replacements at one boundary among `reached` (run id, eval loss there): pairs
/// (worst, best), the worst run first paired with the best. `max(1, floor(n · fraction))`
/// pairs when at least two runs reached it (ties broken by run id; a non-finite loss ranks
/// last).
pub fn plan(reached: &[(i64, f64)], fraction: f64) -> Vec<(i64, i64)> {
    if reached.len() < 2 {
        return Vec::new();
    }
    let mut ranked = reached.to_vec();
    let key = |l: f64| if l.is_finite() { l } else { f64::INFINITY };
    ranked.sort_by(|a, b| key(a.1).total_cmp(&key(b.1)).then(a.0.cmp(&b.0)));
    let n = ((ranked.len() as f64 * fraction).floor() as usize).clamp(1, ranked.len() / 2);
    (0..n).map(|i| (ranked[ranked.len() - 1 - i].0, ranked[i].0)).collect()
}

/// The `section.key=value` overrides of the clone replacing a run at `boundary` (the
/// `slot`-th replacement there) from a parent with `config` and `knobs`: each knob of
/// [`PERTURBED`] it has times `1 - perturb` or `1 + perturb` (dropout kept below 1).
/// Depends only on the seed, the boundary, the slot and the parent.
pub fn perturb(config: &serde_json::Value, knobs: &serde_json::Value, seed: u64, boundary: i64, slot: usize, perturb: f64) -> Vec<String> {
    let mut rng =
        Rng::new(seed ^ (boundary as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (slot as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut set = Vec::new();
    for key in PERTURBED {
        let (section, name) = key.split_once('.').unwrap_or((key, ""));
        let is_knob = knobs.get(key).is_some();
        // Drawn for every key, so one knob's draw does not shift another's.
        let up = rng.next_u64() & 1 == 1;
        if key != "trainer.learning_rate" && !is_knob {
            continue;
        }
        let Some(v) = config.get(section).and_then(|s| s.get(name)).and_then(serde_json::Value::as_f64) else { continue };
        let mut new = v * if up { 1.0 + perturb } else { 1.0 - perturb };
        if name == "dropout" {
            new = new.min(0.95);
        }
        set.push(format!("{key}={new:e}"));
    }
    set
}

impl Store {
    /// Records one PBT replacement in one transaction: run `worst` stops at `step` (an
    /// applied op of the policy with `message`) and a pending warm clone of `parent` with
    /// `set` is queued. Returns the clone op's id.
    pub(crate) fn pbt_replace(&self, worst: i64, step: i64, message: &str, parent: i64, set: &[String]) -> Result<i64> {
        let tx = self.write_tx()?;
        let exp: i64 = tx.query_row("SELECT experiment_id FROM runs WHERE id = ?1", [worst], |r| r.get(0))?;
        let stop = serde_json::to_string(&OpKind::Stop).map_err(|source| crate::Error::Encode { what: "an op", source })?;
        tx.execute(
            "INSERT INTO ops(experiment_id, run_id, kind, source, status, message, applied_step, created) \
             VALUES (?1, ?2, ?3, 'policy', 'applied', ?4, ?5, ?6)",
            params![exp, worst, stop, message, step, now()],
        )?;
        tx.execute("UPDATE runs SET status = ?2, error = NULL WHERE id = ?1", params![worst, RunStatus::Stopped.as_str()])?;
        let clone = OpKind::Clone { set: set.to_vec(), warm: true };
        let clone = serde_json::to_string(&clone).map_err(|source| crate::Error::Encode { what: "an op", source })?;
        tx.execute(
            "INSERT INTO ops(experiment_id, run_id, kind, source, status, created) VALUES (?1, ?2, ?3, 'policy', 'pending', ?4)",
            params![exp, parent, clone, now()],
        )?;
        let id = tx.last_insert_rowid();
        commit(tx, "pbt_replace")?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_fraction_is_paired_with_the_best() {
        let r = [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6), (5, f64::NAN), (6, 0.4), (7, 0.8), (8, 0.3)];
        assert_eq!(plan(&r, 0.25), vec![(5, 8), (1, 6)]);
        assert_eq!(plan(&r, 0.5), vec![(5, 8), (1, 6), (7, 2), (3, 4)]);
        // At least one pair from two runs on; never a run paired with itself.
        assert_eq!(plan(&r[..3], 0.25), vec![(1, 2)]);
        assert_eq!(plan(&r[..2], 0.5), vec![(1, 2)]);
        assert!(plan(&r[..1], 0.5).is_empty());
        // Order given does not matter.
        let mut rev = r.to_vec();
        rev.reverse();
        assert_eq!(plan(&rev, 0.25), plan(&r, 0.25));
    }

    #[test]
    fn perturbations_are_seeded_and_move_by_the_factor() {
        let config = serde_json::json!({"trainer": {"learning_rate": 1e-3, "weight_decay": 0.0}, "lora": {"alpha": 16.0, "dropout": 0.1}});
        let knobs = serde_json::json!({"lora.alpha": 16});
        let a = perturb(&config, &knobs, 7, 2, 0, 0.2);
        assert_eq!(a, perturb(&config, &knobs, 7, 2, 0, 0.2));
        assert_eq!(a.len(), 2, "{a:?}");
        let lr: f64 = a[0].strip_prefix("trainer.learning_rate=").unwrap().parse().unwrap();
        assert!((lr - 8e-4).abs() < 1e-12 || (lr - 1.2e-3).abs() < 1e-12, "{lr}");
        let alpha: f64 = a[1].strip_prefix("lora.alpha=").unwrap().parse().unwrap();
        assert!(alpha == 12.8 || (alpha - 19.2).abs() < 1e-9, "{alpha}");
        // Other boundaries and slots draw differently (both directions occur).
        let ups: std::collections::HashSet<String> = (0..16).map(|s| perturb(&config, &knobs, 7, 3, s, 0.2)[0].clone()).collect();
        assert_eq!(ups.len(), 2, "{ups:?}");
    }
}
