//! Shared by the tests: the Python environment with TensorBoard and MLflow, an MLflow
//! server of our own, and a small real experiment on tiny-llama.

use furnace_exp::{experiment, ops, run_fit, ExperimentRow, FitOptions, OpKind, RunRow, Store};
use furnace_model::{LoadedModel, WeightDType};
use furnace_testutil::{repo_root, testdata};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The venv's python, made by `scripts/py-venv.sh` when missing. Fails loudly: these
/// tests are never skipped.
pub fn python() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let root = repo_root();
            let out = Command::new("bash").arg(root.join("scripts/py-venv.sh")).current_dir(&root).output().unwrap();
            assert!(
                out.status.success(),
                "scripts/py-venv.sh failed (the tracking tests need TensorBoard and MLflow from pip):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            root.join("target/py-venv/bin/python")
        })
        .clone()
}

/// Runs a Python snippet with the venv's python and parses what it prints as JSON.
pub fn py_json(code: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python()).arg("-c").arg(code).args(args).output().unwrap();
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `mlflow server` on loopback with an SQLite backend in `dir`; killed on drop.
pub struct MlflowServer {
    child: Child,
    pub url: String,
    log: PathBuf,
}

impl MlflowServer {
    pub fn start(dir: &Path, port: u16) -> Self {
        let mlflow = python().with_file_name("mlflow");
        let log = dir.join("mlflow-server.log");
        let child = Command::new(mlflow)
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--default-artifact-root")
            .arg(dir.join("artifacts"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("mlflow-server.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Self { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    /// Waits until the server answers `/health`.
    pub fn wait_ready(&mut self) {
        let t0 = Instant::now();
        let code = "import sys, urllib.request\ntry:\n    urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)\nexcept Exception:\n    sys.exit(1)";
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = std::fs::read_to_string(self.log.with_file_name("mlflow-server.err")).unwrap_or_default();
                panic!("mlflow server exited ({status}):\n{err}");
            }
            if Command::new(python()).arg("-c").arg(code).arg(&self.url).status().unwrap().success() {
                eprintln!("mlflow server ready in {:.1} s", t0.elapsed().as_secs_f64());
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "mlflow server did not answer in 180 s");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        // The whole process group (uvicorn's workers too).
        let _ = Command::new("kill").arg("--").arg(format!("-{}", self.child.id())).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use std::os::unix::process::CommandExt;

/// A spec over 24 training rows and 6 eval rows of the extraction task on tiny-llama, with
/// lora.r in {2, 4, 48}: 48 cannot factor v_proj (64 -> 32), so that run fails.
fn setup(dir: &Path) -> PathBuf {
    let rows = |file: &str, n: usize| -> String {
        let text = std::fs::read_to_string(repo_root().join("data/extract").join(file)).unwrap();
        text.lines().take(n).map(|l| format!("{l}\n")).collect()
    };
    std::fs::write(dir.join("train.jsonl"), rows("train.jsonl", 24)).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows("eval.jsonl", 6)).unwrap();
    let base = testdata().join("tiny-llama");
    let spec = format!(
        r#"
[experiment]
name = "tracked"
seed = 3
num_chunks = 2

[data]
train = "train.jsonl"
eval = "eval.jsonl"

[model]
base = "{}"

[lora]
alpha = 16
targets = ["q_proj", "v_proj"]
r = {{ list = [2, 4, 48] }}

[trainer]
learning_rate = 1e-2
batch_size = 2
grad_accum = 2
max_seq_len = 96
schedule = "constant"
"#,
        base.display().to_string().replace('\\', "/")
    );
    let path = dir.join("spec.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

/// A new experiment (3 runs) in `dir`.
pub fn experiment(dir: &Path) -> (Store, ExperimentRow) {
    let spec = setup(dir);
    let store = Store::open_in(&dir.join("runs")).unwrap();
    let exp = experiment::create(&store, &spec).unwrap();
    (store, exp)
}

/// Trains it: run 1 stopped after step 1 (stays stopped), a warm clone of run 2 at step 2,
/// run 3 failing before training. Returns the runs and the seconds the fit took.
pub fn fit(store: &Store, exp: &ExperimentRow) -> (Vec<RunRow>, f64) {
    let ids: Vec<i64> = store.runs(exp.id).unwrap().iter().map(|r| r.id).collect();
    let (a, b) = (ids[0], ids[1]);
    let s = Mutex::new(store.reopen().unwrap());
    let plan = vec![((a, 1), a, OpKind::Stop), ((b, 2), b, OpKind::Clone { set: vec!["trainer.learning_rate=3e-2".into()], warm: true })];
    let opts = FitOptions {
        on_step: Some(Arc::new(move |run, step| {
            for (when, target, op) in &plan {
                if *when == (run, step) {
                    ops::submit(&s.lock().unwrap(), *target, op, "test").unwrap();
                }
            }
        })),
        ..Default::default()
    };
    let events = furnace_exp::events::channel();
    let mut loader =
        |name: &str, dtype: WeightDType| -> furnace_exp::Result<LoadedModel> { Ok(LoadedModel::load(Path::new(name), dtype)?) };
    let t0 = Instant::now();
    let runs = run_fit(store, exp, &mut loader, &opts, &events).unwrap().runs;
    (runs, t0.elapsed().as_secs_f64())
}

/// run -> metric -> step -> value, from the store.
pub fn store_metrics(store: &Store, exp: &ExperimentRow) -> BTreeMap<i64, BTreeMap<String, BTreeMap<i64, f64>>> {
    let mut out: BTreeMap<i64, BTreeMap<String, BTreeMap<i64, f64>>> = BTreeMap::new();
    for m in store.experiment_metrics(exp.id).unwrap() {
        out.entry(m.run_id).or_default().entry(m.name).or_default().insert(m.step, m.value);
    }
    out
}

/// A log sink that keeps its lines.
pub fn log_sink() -> (furnace_track::LogSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    (
        Box::new(move |s: String| {
            eprintln!("tracker: {s}");
            l.lock().unwrap().push(s);
        }),
        lines,
    )
}
