//! A real MLflow tracking server receives the experiment: params, every metric step,
//! statuses and tags, read back through MLflow's REST API; a server that is down or
//! hangs while the experiment trains slows nothing and gets everything once it is up.

use crate::common::{experiment, fit, free_port, log_sink, py_json, store_metrics, MlflowServer};
use furnace_exp::{ExperimentRow, RunRow, RunStatus, Store};
use furnace_track::mlflow::params_of;
use furnace_track::{TrackOptions, Tracker};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Everything MLflow holds for an experiment, through its REST API (urllib only).
const READ: &str = r#"
import json, struct, sys, urllib.parse, urllib.request
bits = lambda v: struct.unpack("<Q", struct.pack("<d", v))[0]  # exact through JSON
base = sys.argv[1] + "/api/2.0/mlflow/"
def get(path, **q):
    with urllib.request.urlopen(base + path + "?" + urllib.parse.urlencode(q), timeout=30) as r:
        return json.load(r)
def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)
exp = get("experiments/get-by-name", experiment_name=sys.argv[2])["experiment"]
runs = post("runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000, "run_view_type": "ALL"}).get("runs", [])
out = []
for r in runs:
    info, data = r["info"], r["data"]
    metrics = {}
    for m in data.get("metrics", []):
        h = get("metrics/get-history", run_id=info["run_id"], metric_key=m["key"], max_results=25000)["metrics"]
        metrics[m["key"]] = sorted([x["step"], bits(x["value"]), x["timestamp"]] for x in h)
    out.append({
        "id": info["run_id"], "name": info.get("run_name"), "status": info["status"],
        "end_time": info.get("end_time"),
        "params": {p["key"]: p["value"] for p in data.get("params", [])},
        "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
        "metrics": metrics,
    })
print(json.dumps(out))
"#;

/// Asserts MLflow holds exactly the store's experiment; returns the status by furnace run.
fn check(url: &str, store: &Store, exp: &ExperimentRow) -> BTreeMap<i64, String> {
    let got = py_json(READ, &[url, &exp.name]);
    let runs: Vec<RunRow> = store.runs(exp.id).unwrap();
    let by_run: BTreeMap<i64, &serde_json::Value> =
        got.as_array().unwrap().iter().map(|r| (r["tags"]["furnace.run_id"].as_str().unwrap().parse().unwrap(), r)).collect();
    assert_eq!(got.as_array().unwrap().len(), runs.len(), "one MLflow run per furnace run, no duplicates: {got}");
    assert_eq!(by_run.len(), runs.len());
    let metrics = store_metrics(store, exp);
    let mut statuses = BTreeMap::new();
    for run in &runs {
        let m = by_run[&run.id];
        assert_eq!(m["name"], format!("run-{}", run.id));
        // Params: the resolved config, so every knob with the value it took.
        let params: BTreeMap<String, String> = serde_json::from_value(m["params"].clone()).unwrap();
        assert_eq!(params, params_of(&run.config), "run {}", run.id);
        for (k, v) in run.knobs.as_object().unwrap() {
            assert_eq!(params[k], v.to_string(), "run {} knob {k}", run.id);
        }
        // Tags: lineage and progress.
        let tags = &m["tags"];
        assert_eq!(tags["furnace.warm"], run.warm.to_string());
        assert_eq!(tags["furnace.chunks_done"], run.chunks_done.to_string());
        assert_eq!(tags["furnace.total_chunks"], run.total_chunks.to_string());
        assert_eq!(tags["furnace.status"], run.status.as_str());
        match run.parent_id {
            Some(p) => {
                assert_eq!(tags["furnace.parent_run"], p.to_string());
                assert_eq!(tags["mlflow.parentRunId"], by_run[&p]["id"]);
            }
            None => assert!(tags.get("furnace.parent_run").is_none()),
        }
        // Every metric at every step, with the store's value, once.
        let want = metrics.get(&run.id).cloned().unwrap_or_default();
        let have = m["metrics"].as_object().unwrap();
        assert_eq!(have.len(), want.len(), "run {}: {have:?}", run.id);
        for (name, steps) in &want {
            let h: Vec<(i64, f64)> =
                have[name].as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), f64::from_bits(p[1].as_u64().unwrap()))).collect();
            let w: Vec<(i64, f64)> = steps.iter().map(|(s, v)| (*s, *v)).collect();
            assert_eq!(h, w, "run {} {name}", run.id);
        }
        let status = m["status"].as_str().unwrap().to_string();
        if status != "RUNNING" {
            assert!(m["end_time"].as_i64().is_some(), "run {} ended without end_time", run.id);
        }
        statuses.insert(run.id, status);
    }
    statuses
}

fn expected_statuses(store: &Store, exp: &ExperimentRow) -> BTreeMap<i64, String> {
    let want = |s: RunStatus| match s {
        RunStatus::Completed => "FINISHED",
        RunStatus::Failed => "FAILED",
        _ => "KILLED",
    };
    store.runs(exp.id).unwrap().iter().map(|r| (r.id, want(r.status).to_string())).collect()
}

fn assert_statuses(store: &Store, exp: &ExperimentRow, got: &BTreeMap<i64, String>) {
    assert_eq!(got, &expected_statuses(store, exp));
    let mut kinds: Vec<&str> = got.values().map(String::as_str).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, ["FAILED", "FINISHED", "KILLED"], "the experiment covers every closing status");
}

#[test]
fn an_mlflow_server_receives_the_whole_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = MlflowServer::start(dir.path(), free_port());
    let (store, exp) = experiment(dir.path());
    server.wait_ready();
    let (log, lines) = log_sink();
    let opts = TrackOptions { mlflow: Some(server.url.clone()), poll: Duration::from_millis(200), ..Default::default() };
    let tracker = Tracker::start(store.path(), &exp.name, opts.clone(), log).unwrap();
    let (runs, _) = fit(&store, &exp);
    assert_eq!(runs.len(), 4, "3 runs and a warm clone");
    let report = tracker.finish(Duration::from_secs(30)).unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert!(lines.lock().unwrap().is_empty(), "{:?}", lines.lock().unwrap());
    let statuses = check(&server.url, &store, &exp);
    assert_statuses(&store, &exp, &statuses);

    // A restarted tracker sends nothing twice; one that lost its state file finds its runs
    // by tag and sends the same values with the same timestamps, which MLflow keeps once.
    for lose_state in [false, true] {
        if lose_state {
            std::fs::remove_file(exp.dir.join(furnace_track::state::STATE_FILE)).unwrap();
        }
        let (log, _) = log_sink();
        let report = Tracker::start(store.path(), &exp.name, opts.clone(), log).unwrap().finish(Duration::from_secs(30)).unwrap();
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(check(&server.url, &store, &exp), statuses);
    }
}

/// Accepts connections and never answers (a hung server), until dropped.
struct Hung {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hung {
    fn start(port: u16) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((c, _)) = listener.accept() {
                    held.push(c);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_backend_that_hangs_or_is_down_slows_nothing_and_gets_everything_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    // Reference: the same experiment with no tracker.
    let ref_dir = tempfile::tempdir().unwrap();
    let (ref_store, ref_exp) = experiment(ref_dir.path());
    let (_, alone) = fit(&ref_store, &ref_exp);

    let port = free_port();
    let hung = Hung::start(port);
    let (store, exp) = experiment(dir.path());
    let (log, lines) = log_sink();
    let opts = TrackOptions {
        mlflow: Some(format!("http://127.0.0.1:{port}")),
        poll: Duration::from_millis(100),
        timeout: Duration::from_secs(3),
        max_backoff: Duration::from_secs(2),
        ..Default::default()
    };
    let tracker = Tracker::start(store.path(), &exp.name, opts, log).unwrap();
    let (runs, tracked) = fit(&store, &exp);
    eprintln!("fit alone {alone:.1} s, with a hung tracking server {tracked:.1} s");
    assert!(runs.len() == 4 && tracked < alone * 2.0 + 5.0, "training waited for the tracker: {tracked:.1} s vs {alone:.1} s");
    // The store holds the same values either way.
    assert_eq!(store_metrics(&store, &exp).len(), store_metrics(&ref_store, &ref_exp).len());

    // Now nobody listens (connection refused), then a real server comes up on that port.
    drop(hung);
    std::thread::sleep(Duration::from_secs(3));
    let mut server = MlflowServer::start(dir.path(), port);
    server.wait_ready();
    let t0 = Instant::now();
    let report = tracker.finish(Duration::from_secs(60)).unwrap();
    eprintln!("delivered {:.1} s after the server came up", t0.elapsed().as_secs_f64());
    assert!(report.is_complete(), "{report:?}");
    let lines = lines.lock().unwrap().clone();
    let down: Vec<&String> = lines.iter().filter(|l| l.contains("unreachable")).collect();
    assert_eq!(down.len(), 1, "the failure is reported once: {lines:?}");
    assert!(down[0].contains(&format!("mlflow at http://127.0.0.1:{port}")) && down[0].contains("sent when it is back"));
    assert_eq!(lines.iter().filter(|l| l.contains(" is back: ")).count(), 1, "{lines:?}");
    let statuses = check(&server.url, &store, &exp);
    assert_statuses(&store, &exp, &statuses);
}

#[test]
fn a_server_that_never_comes_back_costs_at_most_the_final_wait_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (store, exp) = experiment(dir.path());
    let port = free_port();
    let (log, lines) = log_sink();
    let opts = TrackOptions { mlflow: Some(format!("http://127.0.0.1:{port}")), poll: Duration::from_millis(100), ..Default::default() };
    let tracker = Tracker::start(store.path(), &exp.name, opts, log).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let report = tracker.finish(Duration::from_secs(2)).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(report.unsent.len(), 1, "{report:?}");
    assert!(report.unsent[0].contains("furnace run --experiment tracked"), "{report:?}");
    assert_eq!(lines.lock().unwrap().iter().filter(|l| l.contains("unreachable")).count(), 1);
}
