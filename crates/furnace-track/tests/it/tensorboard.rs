//! TensorBoard's own reader (EventAccumulator, from pip) reads our event files back with
//! the store's values.

use crate::common::{experiment, fit, log_sink, py_json, store_metrics};
use furnace_track::{TrackOptions, Tracker};
use std::time::Duration;

const READ: &str = r#"
import json, os, struct, sys
bits = lambda v: struct.unpack("<Q", struct.pack("<d", v))[0]  # exact through JSON
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
root = sys.argv[1]
out = {}
for run in sorted(os.listdir(root)):
    ea = EventAccumulator(os.path.join(root, run), size_guidance={"scalars": 0})
    ea.Reload()
    out[run] = {tag: [[e.step, bits(e.value)] for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
print(json.dumps(out))
"#;

#[test]
fn tensorboard_reads_every_value_back() {
    let dir = tempfile::tempdir().unwrap();
    let (store, exp) = experiment(dir.path());
    let tb = dir.path().join("tb");
    let (log, lines) = log_sink();
    let opts = TrackOptions { tensorboard: Some(tb.clone()), poll: Duration::from_millis(200), ..Default::default() };
    let tracker = Tracker::start(store.path(), &exp.name, opts.clone(), log).unwrap();
    fit(&store, &exp);
    let report = tracker.finish(Duration::from_secs(10)).unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert!(lines.lock().unwrap().is_empty(), "{:?}", lines.lock().unwrap());

    // Tracked again (a restarted furnace run): nothing is written twice.
    let (log, _) = log_sink();
    Tracker::start(store.path(), &exp.name, opts, log).unwrap().finish(Duration::from_secs(10)).unwrap();

    let got = py_json(READ, &[tb.join(&exp.name).to_str().unwrap()]);
    let want = store_metrics(&store, &exp);
    let runs = got.as_object().unwrap();
    // The failed run logged nothing, so it has no folder; every other run has one.
    assert_eq!(runs.len(), want.len(), "{got}");
    let mut values = 0;
    for (run, series) in &want {
        let tags = &got[format!("run-{run}")];
        assert_eq!(tags.as_object().unwrap().len(), series.len(), "run {run}: {tags}");
        for (name, steps) in series {
            let read: Vec<(i64, f64)> =
                tags[name].as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), f64::from_bits(p[1].as_u64().unwrap()))).collect();
            let expect: Vec<(i64, f64)> = steps.iter().map(|(s, v)| (*s, *v as f32 as f64)).collect();
            assert_eq!(read, expect, "run {run} {name}");
            values += read.len();
        }
    }
    assert!(values > 40, "{values} values");
}
