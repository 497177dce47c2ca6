//! The serving engine: one thread owns the model and the running batch; any number of
//! cloneable [`EngineHandle`]s drive it over std channels, from any thread, without an
//! async runtime.
//!
//! - [`EngineHandle::submit`] queues a [`Request`] with a *sink*, a `Send` callback that
//!   receives the request's [`Event`]s (tokens as they are sampled, then exactly one
//!   [`Event::Finished`]) on the engine thread. A server wraps its own channel in the sink.
//!   Errors of the request itself (bad parameters, a prompt too long, an unknown adapter)
//!   come back from `submit`, before any compute; `submit` waits for the engine to take the
//!   request, which is at most one step.
//! - [`EngineHandle::abort`] ends a request: it leaves the batch before the next step and
//!   its sink gets [`FinishReason::Abort`].
//! - Adapters are registered by name from PEFT directories ([`EngineHandle::load_adapter`]),
//!   unloaded, listed, and selected per request ([`Request::adapter`]). At most
//!   [`ServiceOptions::max_adapters`] are resident in the model at once: making another one
//!   resident evicts the least recently used adapter that no queued or running request uses
//!   (it stays registered and is read again from its directory when a request names it).
//! - The engine caches the KV of prompt prefixes ([`crate::prefix`]); cached prefixes of an
//!   adapter that leaves the model are dropped. [`EngineHandle::prefix_stats`] reads the
//!   cache's counters (for a server's metrics).
//! - The thread stops on [`EngineHandle::shutdown`] or when every handle has been dropped.
//!   Nothing ends silently: every request still queued or running gets
//!   [`FinishReason::Abort`]. If a step fails (or panics), the sequences in it get
//!   [`FinishReason::Error`] and the engine goes on with the queue.
//!
//! Each step is [`crate::Engine`]'s step: the thread runs the same batch logic over the
//! model it owns, and takes commands between steps (blocking while there is no work).

use crate::engine::{Batch, EngineOptions, Event, FinishReason, Request, SeqId};
use crate::error::{Error, Result};
use crate::prefix::PrefixStats;
use furnace_model::{load_adapter, AdapterId, Llama};
use furnace_text::Tokenizer;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Identifies a request submitted to the service (unique for the service's life).
pub type RequestId = SeqId;

/// Receives one request's events on the engine thread. It should return quickly (hand the
/// event to a channel): the whole batch waits for it. A sink that panics is dropped and its
/// request aborted; the engine goes on.
pub type Sink = Box<dyn FnMut(Event) + Send>;

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Batching settings.
    pub engine: EngineOptions,
    /// Most adapters resident in the model at once (at least 1).
    pub max_adapters: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self { engine: EngineOptions::default(), max_adapters: 8 }
    }
}

/// A registered adapter, as [`EngineHandle::adapters`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// The name requests select it by.
    pub name: String,
    /// The PEFT directory it is read from.
    pub dir: PathBuf,
    /// Whether its factors are in the model now.
    pub resident: bool,
    /// Queued and running requests that use it.
    pub requests: usize,
}

enum Command {
    Submit { request: Request, sink: Sink, reply: Sender<Result<RequestId>> },
    SubmitAll { requests: Vec<(Request, Sink)>, reply: Sender<Result<Vec<RequestId>>> },
    Abort(RequestId),
    LoadAdapter { name: String, dir: PathBuf, reply: Sender<Result<()>> },
    UnloadAdapter { name: String, reply: Sender<Result<()>> },
    ListAdapters { reply: Sender<Vec<AdapterInfo>> },
    PrefixStats { reply: Sender<PrefixStats> },
    Shutdown,
}

/// A handle on the engine thread. Clones share the thread; it stops when the last handle is
/// dropped or on [`EngineHandle::shutdown`].
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl EngineHandle {
    /// Starts the engine thread, which takes ownership of `model`; the tokenizer decodes
    /// text and knows the end-of-sequence ids.
    pub fn spawn(model: Llama, tokenizer: &Tokenizer, opts: ServiceOptions) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            batch: Batch::new(tokenizer, opts.engine),
            model,
            sinks: Sinks::default(),
            registry: Registry::new(opts.max_adapters),
        };
        let thread = std::thread::Builder::new().name("furnace-engine".into()).spawn(move || worker.run(rx)).map_err(Error::Spawn)?;
        Ok(Self { tx, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Sends a command that answers, and waits for the answer.
    fn call<T>(&self, command: impl FnOnce(Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = mpsc::channel();
        self.tx.send(command(reply)).map_err(|_| Error::Stopped)?;
        answer.recv().map_err(|_| Error::Stopped)
    }

    /// Queues a request; its events go to `sink`. Returns its id, or why it was rejected
    /// (then the sink is dropped unused).
    pub fn submit(&self, request: Request, sink: Sink) -> Result<RequestId> {
        self.call(|reply| Command::Submit { request, sink, reply })?
    }

    /// Queues several requests at once, so that they join the batch at the same step (the
    /// choices of one API request); all or none: if one is rejected, those queued before it
    /// are aborted (their sinks get [`FinishReason::Abort`]) and its error is returned.
    pub fn submit_all(&self, requests: Vec<(Request, Sink)>) -> Result<Vec<RequestId>> {
        self.call(|reply| Command::SubmitAll { requests, reply })?
    }

    /// Ends a request before the next step; its sink gets [`FinishReason::Abort`]. Ids that
    /// are not queued or running (finished, unknown) are ignored.
    pub fn abort(&self, id: RequestId) -> Result<()> {
        self.tx.send(Command::Abort(id)).map_err(|_| Error::Stopped)
    }

    /// Registers the PEFT LoRA adapter in `dir` as `name` and makes it resident (reading
    /// and checking it against the model now). A name already registered is replaced,
    /// unless requests use it.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        self.call(|reply| Command::LoadAdapter { name: name.to_string(), dir: dir.to_path_buf(), reply })?
    }

    /// Removes the adapter registered as `name`; an error while requests use it.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        self.call(|reply| Command::UnloadAdapter { name: name.to_string(), reply })?
    }

    /// The registered adapters, by name.
    pub fn adapters(&self) -> Result<Vec<AdapterInfo>> {
        self.call(|reply| Command::ListAdapters { reply })
    }

    /// Counters of the engine's prefix cache (hits, misses, reused tokens, bytes held); see
    /// [`crate::prefix`].
    pub fn prefix_stats(&self) -> Result<PrefixStats> {
        self.call(|reply| Command::PrefixStats { reply })
    }

    /// Stops the engine thread for every handle (queued and running requests get
    /// [`FinishReason::Abort`]) and waits for it to end.
    pub fn shutdown(&self) -> Result<()> {
        // A send error means the thread is already gone; joining tells how it ended.
        let _ = self.tx.send(Command::Shutdown);
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match thread.map(JoinHandle::join) {
            Some(Err(_)) => Err(Error::Panicked),
            _ => Ok(()),
        }
    }
}

/// The sinks of queued and running requests.
#[derive(Default)]
struct Sinks {
    by_request: HashMap<RequestId, Sink>,
    /// Requests whose sink panicked (it has been dropped); they are aborted after the step.
    broken: Vec<RequestId>,
}

impl Sinks {
    /// Hands an event to its request's sink; a `Finished` event is the sink's last.
    fn send(&mut self, event: Event) {
        let (seq, last) = match &event {
            Event::Token { seq, .. } => (*seq, false),
            Event::Finished { seq, .. } => (*seq, true),
        };
        let Some(mut sink) = self.by_request.remove(&seq) else { return };
        if catch_unwind(AssertUnwindSafe(|| sink(event))).is_err() {
            self.broken.push(seq);
        } else if !last {
            self.by_request.insert(seq, sink);
        }
    }
}

/// Adapters registered by name; some are resident in the model.
struct Registry {
    budget: usize,
    entries: BTreeMap<String, Entry>,
    /// Advances at every use; an entry's `last_used` orders evictions.
    clock: u64,
}

struct Entry {
    dir: PathBuf,
    resident: Option<AdapterId>,
    last_used: u64,
}

impl Registry {
    fn new(budget: usize) -> Self {
        Self { budget: budget.max(1), entries: BTreeMap::new(), clock: 0 }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Evicts least recently used, unused adapters until one more fits the budget.
    fn make_room(&mut self, model: &mut Llama, batch: &Batch) -> Result<()> {
        loop {
            let resident = self.entries.values().filter(|e| e.resident.is_some()).count();
            if resident < self.budget {
                return Ok(());
            }
            let victim = self
                .entries
                .values_mut()
                .filter(|e| e.resident.is_some_and(|id| batch.adapter_users(id) == 0))
                .min_by_key(|e| e.last_used)
                .ok_or(Error::AdapterBudget { budget: self.budget })?;
            if let Some(id) = victim.resident.take() {
                model.remove_adapter(id);
            }
        }
    }

    /// Reads the adapter in `dir` and adds it to the model, evicting another if needed.
    fn make_resident(&mut self, dir: &Path, model: &mut Llama, batch: &Batch) -> Result<AdapterId> {
        let adapter = load_adapter(dir)?;
        self.make_room(model, batch)?;
        Ok(model.add_adapter(&adapter)?)
    }

    fn load(&mut self, name: &str, dir: PathBuf, model: &mut Llama, batch: &Batch) -> Result<()> {
        if let Some(old) = self.entries.get_mut(name) {
            if let Some(id) = old.resident {
                let requests = batch.adapter_users(id);
                if requests > 0 {
                    return Err(Error::AdapterInUse { name: name.to_string(), requests });
                }
                model.remove_adapter(id);
                old.resident = None;
            }
        }
        // On failure a replaced adapter stays registered with its old directory.
        let id = self.make_resident(&dir, model, batch)?;
        let last_used = self.tick();
        self.entries.insert(name.to_string(), Entry { dir, resident: Some(id), last_used });
        Ok(())
    }

    /// The id of the adapter named `name`, made resident if it is not.
    fn acquire(&mut self, name: &str, model: &mut Llama, batch: &Batch) -> Result<AdapterId> {
        let last_used = self.tick();
        let entry = self.entries.get_mut(name).ok_or_else(|| Error::UnknownAdapter(name.to_string()))?;
        entry.last_used = last_used;
        if let Some(id) = entry.resident {
            return Ok(id);
        }
        let dir = entry.dir.clone();
        let id = self.make_resident(&dir, model, batch)?;
        if let Some(entry) = self.entries.get_mut(name) {
            entry.resident = Some(id);
        }
        Ok(id)
    }

    fn unload(&mut self, name: &str, model: &mut Llama, batch: &Batch) -> Result<()> {
        let entry = self.entries.get(name).ok_or_else(|| Error::UnknownAdapter(name.to_string()))?;
        if let Some(id) = entry.resident {
            let requests = batch.adapter_users(id);
            if requests > 0 {
                return Err(Error::AdapterInUse { name: name.to_string(), requests });
            }
            model.remove_adapter(id);
        }
        self.entries.remove(name);
        Ok(())
    }

    fn list(&self, batch: &Batch) -> Vec<AdapterInfo> {
        self.entries
            .iter()
            .map(|(name, e)| AdapterInfo {
                name: name.clone(),
                dir: e.dir.clone(),
                resident: e.resident.is_some(),
                requests: e.resident.map_or(0, |id| batch.adapter_users(id)),
            })
            .collect()
    }
}

/// The engine thread's state.
struct Worker {
    model: Llama,
    batch: Batch,
    sinks: Sinks,
    registry: Registry,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        'serve: loop {
            // Idle: wait for a command. Busy: take the commands that arrived during the step.
            if !self.batch.has_work() {
                match rx.recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            break 'serve;
                        }
                    }
                    Err(_) => break 'serve,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            break 'serve;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'serve,
                }
            }
            self.step();
        }
        let sinks = &mut self.sinks;
        self.batch.end_all(true, FinishReason::Abort, &mut |e| sinks.send(e));
    }

    /// Carries out a command; false for shutdown.
    fn handle(&mut self, command: Command) -> bool {
        // A reply that cannot be delivered means the caller is gone: nothing to do.
        match command {
            Command::Submit { request, sink, reply } => {
                let _ = reply.send(self.submit(request, sink));
            }
            Command::SubmitAll { requests, reply } => {
                let mut ids = Vec::with_capacity(requests.len());
                let mut result = Ok(());
                for (request, sink) in requests {
                    match self.submit(request, sink) {
                        Ok(id) => ids.push(id),
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                if let Err(e) = result {
                    for id in ids {
                        let sinks = &mut self.sinks;
                        self.batch.abort(id, &mut |ev| sinks.send(ev));
                    }
                    let _ = reply.send(Err(e));
                } else {
                    let _ = reply.send(Ok(ids));
                }
            }
            Command::Abort(id) => {
                let sinks = &mut self.sinks;
                self.batch.abort(id, &mut |e| sinks.send(e));
            }
            Command::LoadAdapter { name, dir, reply } => {
                let _ = reply.send(self.registry.load(&name, dir, &mut self.model, &self.batch));
            }
            Command::UnloadAdapter { name, reply } => {
                let _ = reply.send(self.registry.unload(&name, &mut self.model, &self.batch));
            }
            Command::ListAdapters { reply } => {
                let _ = reply.send(self.registry.list(&self.batch));
            }
            Command::PrefixStats { reply } => {
                let _ = reply.send(self.batch.prefix_stats());
            }
            Command::Shutdown => return false,
        }
        // Adapters may have left the model (unloaded, replaced, evicted): their cached
        // prefixes go too.
        self.batch.forget_adapters(&self.model);
        true
    }

    fn submit(&mut self, request: Request, sink: Sink) -> Result<RequestId> {
        // Check the request before its adapter can evict another.
        self.batch.check(&self.model, &request)?;
        let adapter = match &request.adapter {
            Some(name) => Some(self.registry.acquire(name, &mut self.model, &self.batch)?),
            None => None,
        };
        let id = self.batch.add(&self.model, request, adapter)?;
        self.sinks.by_request.insert(id, sink);
        Ok(id)
    }

    fn step(&mut self) {
        let sinks = &mut self.sinks;
        let mut send = |e| sinks.send(e);
        // A step that fails, or panics (a bug), costs its sequences, not the engine.
        let stepped = catch_unwind(AssertUnwindSafe(|| self.batch.step(&self.model, &mut send)));
        if let Err(e) = stepped.unwrap_or(Err(Error::Panicked)) {
            // The pass may have left the running sequences' caches half-written: end them.
            self.batch.end_all(false, FinishReason::Error(e.to_string()), &mut send);
        }
        for id in std::mem::take(&mut sinks.broken) {
            self.batch.abort(id, &mut |e| sinks.send(e));
        }
        // Outputs are not kept: the sinks had every event.
        self.batch.take_finished();
    }
}
