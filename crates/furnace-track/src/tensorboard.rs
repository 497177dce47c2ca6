//! TensorBoard event files: `DIR/<experiment>/run-<id>/events.out.tfevents.<time>.<host>.<pid>`,
//! one file per run and tracker session, a scalar event per (step, metric), flushed and
//! synced after each batch.

use crate::error::{Error, Result};
use crate::state::Persist;
use crate::tfrecord::{file_version_event, record, scalars_event};
use crate::Snapshot;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(crate) struct Tensorboard {
    dir: PathBuf,
    key: String,
    files: BTreeMap<i64, File>,
}

fn host() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let h: String = h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(64).collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

/// A run's folder of event files.
pub fn run_dir(dir: &Path, experiment: &str, run: i64) -> PathBuf {
    dir.join(experiment).join(format!("run-{run}"))
}

impl Tensorboard {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), key: dir.display().to_string(), files: BTreeMap::new() }
    }

    pub(crate) fn name(&self) -> String {
        format!("tensorboard in {}", self.dir.display())
    }

    fn file(&mut self, experiment: &str, run: i64) -> Result<&mut File> {
        if !self.files.contains_key(&run) {
            let d = run_dir(&self.dir, experiment, run);
            std::fs::create_dir_all(&d).map_err(Error::io("creating", &d))?;
            let now = furnace_exp::store::now();
            let path = d.join(format!("events.out.tfevents.{}.{}.{}", now as u64, host(), std::process::id()));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(Error::io("creating", &path))?;
            f.write_all(&record(&file_version_event(now))).map_err(Error::io("writing", &path))?;
            self.files.insert(run, f);
        }
        self.files.get_mut(&run).ok_or(Error::ThreadGone)
    }

    pub(crate) fn sync(&mut self, snap: &Snapshot<'_>, p: &mut Persist) -> Result<()> {
        let experiment = snap.experiment.name.clone();
        for run in snap.runs.iter().filter(|r| snap.dirty.contains(&r.id)) {
            let cursors = p.state.tensorboard.get(&self.key).and_then(|s| s.runs.get(&run.id)).cloned().unwrap_or_default();
            let rows = snap.metrics.get(&run.id).map(Vec::as_slice).unwrap_or(&[]);
            let new: Vec<_> = rows.iter().filter(|m| cursors.get(&m.name).is_none_or(|&s| m.step > s)).collect();
            if new.is_empty() {
                continue;
            }
            // Rows come by step then name: one event per step.
            let mut bytes = Vec::new();
            let mut i = 0;
            while i < new.len() {
                let step = new[i].step;
                let j = new[i..].iter().position(|m| m.step != step).map_or(new.len(), |k| i + k);
                let values: Vec<(&str, f32)> = new[i..j].iter().map(|m| (m.name.as_str(), m.value as f32)).collect();
                let wall = new[i..j].iter().map(|m| m.time).fold(0.0, f64::max);
                bytes.extend_from_slice(&record(&scalars_event(wall, step, &values)));
                i = j;
            }
            let dir = run_dir(&self.dir, &experiment, run.id);
            let f = self.file(&experiment, run.id)?;
            if let Err(e) = f.write_all(&bytes).and_then(|_| f.flush()).and_then(|_| f.sync_data()) {
                // A partial record may end that file (readers stop there): the retry starts a new one.
                self.files.remove(&run.id);
                return Err(Error::io("writing", &dir)(e));
            }
            let st = p.state.tensorboard.entry(self.key.clone()).or_default();
            let c = st.runs.entry(run.id).or_default();
            for m in new {
                let s = c.entry(m.name.clone()).or_insert(m.step);
                *s = (*s).max(m.step);
            }
            p.save()?;
        }
        Ok(())
    }

    /// The highest step written of a run (None: nothing yet).
    pub(crate) fn floor(&self, run: i64, p: &Persist) -> Option<i64> {
        p.state.tensorboard.get(&self.key)?.runs.get(&run)?.values().max().copied()
    }

    pub(crate) fn unsent(&self, snap: &Snapshot<'_>, p: &Persist) -> usize {
        let st = p.state.tensorboard.get(&self.key);
        crate::mlflow::count_unsent(snap, |run| st.and_then(|s| s.runs.get(&run)))
    }
}
