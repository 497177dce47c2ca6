//! Rendering chat templates in worker processes, so that a crafted template cannot take the
//! program down.
//!
//! A chat template comes with the model, and a crafted model can carry a template the template
//! engine does not bound: `~` doubling a string forty times asks for a terabyte in a few
//! instructions, and a namespace stored inside itself recurses without end when printed (a
//! stack overflow aborts the whole process). The instruction fuel and the output cap of
//! [`ChatTemplate`](crate::ChatTemplate) stop endless loops and long prints in-process; these
//! two can only be contained.
//!
//! A program that calls [`install`] at startup renders every template in a worker: the same
//! executable started with [`WORKER_ARG`] as its first argument, whose `main` hands over to
//! [`serve_worker`]. A worker caps its own address space at [`WORKER_MEMORY`] and serves renders
//! over its stdin and stdout, one JSON line each way, keeping the templates it has compiled. A
//! worker that dies (out of memory, stack overflow) or runs past [`RENDER_TIMEOUT`] fails that
//! render with an error saying so, and the next render starts a fresh one. Idle workers are
//! kept for reuse, one per thread that renders at the same time; they exit when the program
//! does (their stdin closes). Without [`install`] templates render in-process.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The first argument that makes a program that called [`install`] act as a render worker.
pub const WORKER_ARG: &str = "__furnace-template-worker";

/// The address space a worker may use: far beyond what rendering a real template needs (the
/// prompt itself is capped at 64 MiB), small enough that a template that doubles a string
/// without end fails in a second instead of exhausting the machine.
pub const WORKER_MEMORY: u64 = 2 << 30;

/// The longest one render may take in a worker. The instruction fuel ends any loop well
/// within a second; this catches what fuel does not count (one instruction building a huge
/// string).
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(10);

/// The executable renders are sent to, once [`install`]ed.
static WORKER_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Idle workers, ready for the next render.
static IDLE: Mutex<Vec<Worker>> = Mutex::new(Vec::new());

/// From now on, every chat template of this process renders in a worker process running
/// `exe` (normally `std::env::current_exe()`), whose `main` must call [`serve_worker`] when its
/// first argument is [`WORKER_ARG`]. Calling it again has no effect.
pub fn install(exe: PathBuf) {
    let _ = WORKER_EXE.set(exe);
}

/// Whether renders go to worker processes ([`install`] was called).
pub fn installed() -> bool {
    WORKER_EXE.get().is_some()
}

/// One render, as sent to a worker.
#[derive(Serialize, Deserialize)]
struct Request {
    /// The template's id within the sending process.
    template: u64,
    /// The template's source, sent the first time a worker sees the id.
    source: Option<String>,
    context: serde_json::Value,
}

/// A worker's answer.
#[derive(Serialize, Deserialize)]
enum Response {
    Rendered(String),
    /// The template called `raise_exception` with this message.
    Raised(String),
    Failed(String),
}

/// A running worker process.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    /// The templates this worker has compiled.
    known: HashSet<u64>,
}

impl Worker {
    fn spawn(exe: &PathBuf) -> Result<Worker> {
        let mut child = Command::new(exe)
            .arg(WORKER_ARG)
            // Its stderr is read for the first line of a crash report only.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Template(format!("cannot start the template renderer {}: {e}", exe.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Template("the template renderer has no pipes".to_string()));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("template-worker-reader".to_string())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::Template(format!("cannot start a thread for the template renderer: {e}")))?;
        Ok(Worker { child, stdin, lines, known: HashSet::new() })
    }

    /// Sends a request; `Err` when the worker is gone.
    fn send(&mut self, template: u64, source: &str, context: &serde_json::Value) -> std::io::Result<()> {
        let request = Request { template, source: (!self.known.contains(&template)).then(|| source.to_string()), context: context.clone() };
        let mut line = serde_json::to_vec(&request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.stdin.write_all(&line)?;
        self.stdin.flush()
    }

    /// Ends the worker and says how it ended (with the last of what it wrote to stderr).
    fn end(mut self) -> String {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| format!("unknown status ({e})"));
        let mut stderr = String::new();
        if let Some(err) = self.child.stderr.take() {
            let _ = err.take(4096).read_to_string(&mut stderr);
        }
        let stderr = stderr.trim();
        if stderr.is_empty() {
            status
        } else {
            format!("{status} ({})", stderr.lines().next().unwrap_or(stderr))
        }
    }
}

/// Renders `context` with the template `source` (whose process-wide id is `template`) in a
/// worker.
pub(crate) fn render(template: u64, source: &str, context: &serde_json::Value) -> Result<String> {
    let Some(exe) = WORKER_EXE.get() else {
        return Err(Error::Template("no template renderer is installed".to_string()));
    };
    let idle = IDLE.lock().ok().and_then(|mut idle| idle.pop());
    let mut worker = match idle {
        Some(w) => w,
        None => Worker::spawn(exe)?,
    };
    if worker.send(template, source, context).is_err() {
        // An idle worker that died in the meantime: one retry with a fresh one.
        drop(worker.end());
        worker = Worker::spawn(exe)?;
        if let Err(e) = worker.send(template, source, context) {
            let how = worker.end();
            return Err(Error::Template(format!("cannot send the render to the template renderer ({e}; it ended with {how})")));
        }
    }
    match worker.lines.recv_timeout(RENDER_TIMEOUT) {
        Ok(Ok(line)) => {
            let response: Response = match serde_json::from_str(&line) {
                Ok(r) => r,
                Err(e) => {
                    drop(worker.end());
                    return Err(Error::Template(format!("the template renderer answered garbage: {e}")));
                }
            };
            worker.known.insert(template);
            if let Ok(mut idle) = IDLE.lock() {
                idle.push(worker);
            }
            match response {
                Response::Rendered(text) => Ok(text),
                Response::Raised(message) => Err(Error::TemplateRaised(message)),
                Response::Failed(message) => Err(Error::Template(message)),
            }
        }
        Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
            let how = worker.end();
            Err(Error::Template(format!(
                "the chat template crashed its renderer, which ended with {how}: it used over {} GiB of memory \
                 (a string doubled without end?) or recursed without end (a value stored inside itself?); \
                 the template comes with the model: fix or replace it",
                WORKER_MEMORY >> 30
            )))
        }
        Err(RecvTimeoutError::Timeout) => {
            drop(worker.end());
            Err(Error::Template(format!(
                "the chat template ran for over {} s and was stopped; the template comes with the model: fix or replace it",
                RENDER_TIMEOUT.as_secs()
            )))
        }
    }
}

/// The render loop of a worker process: caps the process's address space at
/// [`WORKER_MEMORY`], then answers each request line on stdin with a response line on stdout
/// until stdin closes. A binary calls it when its first argument is [`WORKER_ARG`] and exits
/// with the code it returns.
pub fn serve_worker() -> i32 {
    limit_memory();
    // A panic is answered as an error; its message must not fill the unread stderr pipe.
    std::panic::set_hook(Box::new(|_| {}));
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let mut templates: std::collections::HashMap<u64, crate::ChatTemplate> = std::collections::HashMap::new();
    for line in stdin.lock().lines() {
        let Ok(line) = line else {
            return 1;
        };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(&mut templates, request),
            Err(e) => Response::Failed(format!("bad request to the template renderer: {e}")),
        };
        let Ok(mut out) = serde_json::to_vec(&response) else {
            return 1;
        };
        out.push(b'\n');
        if stdout.write_all(&out).and_then(|()| stdout.flush()).is_err() {
            return 0;
        }
    }
    0
}

fn answer(templates: &mut std::collections::HashMap<u64, crate::ChatTemplate>, request: Request) -> Response {
    let template = match (templates.get(&request.template), request.source) {
        (Some(t), _) => t.clone(),
        (None, Some(source)) => match crate::ChatTemplate::new(&source) {
            Ok(t) => {
                templates.insert(request.template, t.clone());
                t
            }
            Err(e) => return Response::Failed(message_of(e)),
        },
        (None, None) => return Response::Failed(format!("the template renderer does not know template {}", request.template)),
    };
    // A panic inside the engine (an allocation too large to even ask for) is an error, not
    // the end of the worker.
    let context = request.context;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| template.render_in_process(&context))) {
        Ok(Ok(text)) => Response::Rendered(text),
        Ok(Err(Error::TemplateRaised(message))) => Response::Raised(message),
        Ok(Err(e)) => Response::Failed(message_of(e)),
        Err(_) => Response::Failed("the template engine panicked while rendering".to_string()),
    }
}

/// The message of a template error, without the prefix the sending side adds again.
fn message_of(error: Error) -> String {
    match error {
        Error::Template(message) => message,
        other => other.to_string(),
    }
}

#[cfg(unix)]
fn limit_memory() {
    use nix::sys::resource::{setrlimit, Resource};
    // Best effort: a system that refuses still renders, only without the cap.
    let _ = setrlimit(Resource::RLIMIT_AS, WORKER_MEMORY, WORKER_MEMORY);
}

#[cfg(not(unix))]
fn limit_memory() {}
