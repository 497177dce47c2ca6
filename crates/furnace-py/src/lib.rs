//! `furnace._native`: what the furnace Python package (`python/furnace`) calls into. The
//! Python side turns RapidFire-shaped configs into a furnace spec and datasets into files;
//! this module creates or continues the experiment, trains or evaluates it on a thread of
//! its own while the calling thread waits without the GIL (live events handed to a Python
//! callback, Ctrl-C / a kernel interrupt stopping cleanly), runs user functions written in
//! Python when the engine asks (holding the GIL only while Python runs), records IC ops
//! and serves the dashboard.
//!
//! Everything crosses the boundary as JSON text: the Python side decodes it (pandas
//! frames, dicts), so this module stays small and every value keeps furnace's own
//! serialization.

use furnace_exp::{Event, EventSender, Experiment, FitOptions, OpKind, StartOptions, Store};
use furnace_model::{LoadedModel, WeightDType};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::TryRecvError;

/// A furnace error as a Python `RuntimeError` with furnace's message.
fn runtime(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(runtime)
}

/// Registers a user function under `name` (`python:...`). `trampoline(text) -> text` takes
/// one batch as JSON and returns `{"ok": result}` or `{"error": traceback}` as JSON (the
/// Python side wraps the user's function so; an exception escaping it is reported too).
#[pyfunction]
fn register_hook(name: String, trampoline: Py<PyAny>) -> PyResult<()> {
    if !furnace_train::hooks::is_hook_name(&name) {
        return Err(PyValueError::new_err(format!("'{name}' is not a user function name (expected scheme:name, e.g. python:fmt)")));
    }
    let f: furnace_train::hooks::HookFn = Arc::new(move |arg: Value| {
        let text = arg.to_string();
        // The GIL is held only while Python runs; the engine's thread waits meanwhile.
        let out: Result<String, String> = Python::attach(|py| {
            let r = trampoline.call1(py, (text,)).map_err(|e| format!("{e}"))?;
            r.extract::<String>(py).map_err(|e| format!("the function's wrapper returned no text: {e}"))
        });
        let out: Value = serde_json::from_str(&out?).map_err(|e| format!("the function's result is not JSON: {e}"))?;
        match out {
            Value::Object(mut m) => match (m.remove("ok"), m.remove("error")) {
                (_, Some(Value::String(tb))) => Err(tb),
                (Some(v), _) => Ok(v),
                _ => Err("the function's wrapper returned neither a result nor an error".into()),
            },
            _ => Err("the function's wrapper returned neither a result nor an error".into()),
        }
    });
    furnace_train::hooks::register(&name, f);
    Ok(())
}

/// Removes the user function `name`; whether it was registered.
#[pyfunction]
fn unregister_hook(name: &str) -> bool {
    furnace_train::hooks::unregister(name)
}

/// The experiment a spec file describes: the interrupted one of the same name and spec
/// when there is one (it continues, as `furnace run` does) unless `fresh`, else a new one
/// (its name made unique). Returns `(name, continued)`.
#[pyfunction]
#[pyo3(signature = (runs_dir, spec_path, fresh=false))]
fn create_experiment(runs_dir: PathBuf, spec_path: PathBuf, fresh: bool) -> PyResult<(String, bool)> {
    let store = Store::open_in(&runs_dir).map_err(runtime)?;
    let text = std::fs::read_to_string(&spec_path).map_err(|e| runtime(format!("reading {}: {e}", spec_path.display())))?;
    let evals = furnace_evals::mode_of(&text).as_deref() == Some("evals");
    let interrupted = if evals {
        furnace_evals::experiment::interrupted(&store, &spec_path).map_err(runtime)?
    } else {
        furnace_exp::experiment::interrupted(&store, &spec_path).map_err(runtime)?
    };
    if let Some(e) = interrupted.filter(|_| !fresh) {
        return Ok((e.name, true));
    }
    let row = if evals {
        furnace_evals::experiment::create(&store, &spec_path).map_err(runtime)?
    } else {
        furnace_exp::experiment::create(&store, &spec_path).map_err(runtime)?
    };
    Ok((row.name, false))
}

/// The experiment's record (name, mode, folder, status) as JSON.
#[pyfunction]
fn experiment_info(runs_dir: PathBuf, name: &str) -> PyResult<String> {
    let store = Store::open_in(&runs_dir).map_err(runtime)?;
    json(&store.experiment(name).map_err(runtime)?)
}

/// Every run of the experiment (deleted ones too) as JSON: config, knobs, status,
/// progress, lineage, error.
#[pyfunction]
fn runs(runs_dir: PathBuf, name: &str) -> PyResult<String> {
    let exp = Experiment::open(&runs_dir, name).map_err(runtime)?;
    json(&exp.runs().map_err(runtime)?)
}

/// Every metric of every run at every step as JSON, and (evals) each interval:
/// `{"metrics": [...], "bounds": [...]}`.
#[pyfunction]
fn results(runs_dir: PathBuf, name: &str) -> PyResult<String> {
    let exp = Experiment::open(&runs_dir, name).map_err(runtime)?;
    let metrics = exp.results().map_err(runtime)?;
    let bounds = exp.store().experiment_bounds(exp.row().id).map_err(runtime)?;
    json(&serde_json::json!({ "metrics": metrics, "bounds": bounds }))
}

/// The ops recorded so far, as JSON.
#[pyfunction]
fn ops(runs_dir: PathBuf, name: &str) -> PyResult<String> {
    let exp = Experiment::open(&runs_dir, name).map_err(runtime)?;
    json(&exp.ops().map_err(runtime)?)
}

/// Records an IC op (`{"op": "stop"}`, `{"op": "clone", "set": [...], "warm": true}`) for
/// a run; checked now, applied at the run's next chunk boundary. Returns the op id.
#[pyfunction]
fn submit_op(runs_dir: PathBuf, name: &str, run_id: i64, op: &str) -> PyResult<i64> {
    let kind: OpKind = serde_json::from_str(op).map_err(|e| PyValueError::new_err(format!("not an op: {e}")))?;
    let exp = Experiment::open(&runs_dir, name).map_err(runtime)?;
    exp.op(run_id, &kind).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// An event channel shared by a training loop and a dashboard (its live stream).
#[pyclass(frozen)]
struct Channel {
    sender: EventSender,
}

#[pymethods]
impl Channel {
    #[new]
    fn new() -> Self {
        Channel { sender: furnace_exp::events::channel() }
    }
}

/// A dashboard and API server over a store.
#[pyclass]
struct Dashboard {
    handle: Option<furnace_server::ServerHandle>,
    #[pyo3(get)]
    url: String,
}

#[pymethods]
impl Dashboard {
    /// Stops serving.
    fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// Serves the dashboard and API of the store in `runs_dir` on `host:port` (port 0: any
/// free one), streaming `channel`'s events live; `cors_origins` may call it from a
/// browser page (a notebook's table buttons).
#[pyfunction]
#[pyo3(signature = (runs_dir, channel, host="127.0.0.1", port=0, cors_origins=Vec::new()))]
fn serve(runs_dir: PathBuf, channel: &Channel, host: &str, port: u16, cors_origins: Vec<String>) -> PyResult<Dashboard> {
    let store = Store::open_in(&runs_dir).map_err(runtime)?;
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().map_err(|e| PyValueError::new_err(format!("{host}:{port}: {e}")))?;
    let opts = furnace_server::ServerOptions { addr, cors_origins, ..Default::default() };
    let handle = furnace_server::start(store.path().to_path_buf(), opts, channel.sender.clone()).map_err(runtime)?;
    let url = format!("http://{}", handle.addr);
    Ok(Dashboard { handle: Some(handle), url })
}

/// Loads a base for training or evals, its messages (a model pulled into the cache) sent
/// as log events.
fn loader(events: EventSender, experiment: String) -> impl FnMut(&str, WeightDType) -> furnace_exp::Result<LoadedModel> + Send {
    move |name: &str, dtype| {
        let mut say = |message: &str| {
            let _ = events.send(Event::Log { experiment: experiment.clone(), message: message.to_string() });
        };
        furnace_model::load_by_name(name, dtype, &mut say)
            .map_err(|e| furnace_exp::Error::Load { model: name.to_string(), message: e.to_string() })
    }
}

/// Trains (`fit`) or evaluates (`evals`) the experiment's unfinished runs on a thread of
/// its own until they end. Meanwhile this thread holds no GIL except to hand each event
/// (as JSON) to `on_event`, at most every `poll_ms`; a KeyboardInterrupt (Ctrl-C, a kernel
/// interrupt) stops training at the next step, waits for it, and is raised again: the
/// runs continue from their checkpoints when this is called again. Returns
/// `{"cancelled": bool, "runs": [...]}` as JSON.
#[pyfunction]
#[pyo3(signature = (runs_dir, name, channel=None, on_event=None, memory_budget=None, poll_ms=250))]
fn run(
    py: Python<'_>,
    runs_dir: PathBuf,
    name: &str,
    channel: Option<&Channel>,
    on_event: Option<Py<PyAny>>,
    memory_budget: Option<u64>,
    poll_ms: u64,
) -> PyResult<String> {
    let store = Store::open_in(&runs_dir).map_err(runtime)?;
    let row = store.experiment(name).map_err(runtime)?;
    let events = channel.map(|c| c.sender.clone()).unwrap_or_else(furnace_exp::events::channel);
    let mut rx = events.subscribe();
    let cancel = Arc::new(AtomicBool::new(false));
    let join = start(&runs_dir, &store, &row, events.clone(), cancel.clone(), memory_budget)?;
    let poll = Duration::from_millis(poll_ms.max(10));
    let mut interrupted = None;
    loop {
        // Wait for events without the GIL: the engine's thread may need it for a user function.
        let (batch, finished) = py.detach(|| {
            let until = Instant::now() + poll;
            let mut batch = Vec::new();
            loop {
                match rx.try_recv() {
                    Ok(ev) if ev.experiment() == row.name => batch.push(ev),
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                    // Finished: what was sent before the end is taken first.
                    Err(_) if join.is_finished() => return (batch, true),
                    Err(_) if Instant::now() >= until => return (batch, false),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        if let Some(cb) = &on_event {
            if !batch.is_empty() && interrupted.is_none() {
                let texts: Vec<String> = batch.iter().map(json).collect::<PyResult<_>>()?;
                if let Err(e) = cb.call1(py, (texts,)) {
                    // A broken display must not lose the training: stop cleanly, then raise.
                    cancel.store(true, Ordering::Relaxed);
                    interrupted = Some(e);
                }
            }
        }
        if finished {
            break;
        }
        if let Err(e) = py.check_signals() {
            cancel.store(true, Ordering::Relaxed);
            if interrupted.is_some() {
                // A second interrupt: stop waiting for the clean stop (a user function may
                // hang); the engine's thread still stops at its next step and checkpoints.
                return Err(e);
            }
            interrupted = Some(e);
        }
    }
    let result = py.detach(|| join.join());
    // An interrupt is what the user asked for; it is raised before any error of the stop.
    if let Some(e) = interrupted {
        return Err(e);
    }
    let (runs, cancelled) = result.map_err(|_| runtime("the training thread panicked"))?.map_err(runtime)?;
    json(&serde_json::json!({ "cancelled": cancelled, "runs": runs }))
}

type Outcome = Result<(Vec<furnace_exp::RunRow>, bool), String>;

/// Starts the experiment's driver (fit or evals) on its own thread.
fn start(
    runs_dir: &Path,
    store: &Store,
    row: &furnace_exp::ExperimentRow,
    events: EventSender,
    cancel: Arc<AtomicBool>,
    memory_budget: Option<u64>,
) -> PyResult<std::thread::JoinHandle<Outcome>> {
    let load = loader(events.clone(), row.name.clone());
    if row.mode == "evals" {
        let store = store.reopen().map_err(runtime)?;
        let row = row.clone();
        return std::thread::Builder::new()
            .name("furnace-evals".into())
            .spawn(move || {
                let opts = furnace_evals::EvalOptions { cancel: Some(cancel), ..Default::default() };
                let mut load = load;
                furnace_evals::run_evals(&store, &row, &mut load, &opts, &events).map(|s| (s.runs, s.cancelled)).map_err(|e| e.to_string())
            })
            .map_err(runtime);
    }
    let exp = Experiment::open(runs_dir, &row.name).map_err(runtime)?;
    let running = exp
        .start(StartOptions {
            fit: FitOptions { memory_budget, cancel: Some(cancel), ..Default::default() },
            loader: Box::new(load),
            events: Some(events),
        })
        .map_err(runtime)?;
    std::thread::Builder::new()
        .name("furnace-fit-wait".into())
        .spawn(move || running.wait().map(|s| (s.runs, s.cancelled)).map_err(|e| e.to_string()))
        .map_err(runtime)
}

/// furnace's version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Op checks of evals pipelines (clone overrides) come from furnace-evals.
    furnace_evals::experiment::register();
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(register_hook, m)?)?;
    m.add_function(wrap_pyfunction!(unregister_hook, m)?)?;
    m.add_function(wrap_pyfunction!(create_experiment, m)?)?;
    m.add_function(wrap_pyfunction!(experiment_info, m)?)?;
    m.add_function(wrap_pyfunction!(runs, m)?)?;
    m.add_function(wrap_pyfunction!(results, m)?)?;
    m.add_function(wrap_pyfunction!(ops, m)?)?;
    m.add_function(wrap_pyfunction!(submit_op, m)?)?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_class::<Channel>()?;
    m.add_class::<Dashboard>()?;
    Ok(())
}
