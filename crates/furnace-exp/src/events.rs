//! Live events of a running experiment: what the trainer publishes and the server streams
//! (server-sent events) and the CLI shows.

use crate::store::RunStatus;
use serde::Serialize;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A metric value of a run.
    Metric {
        /// Experiment name.
        experiment: String,
        /// Run.
        run_id: i64,
        /// Optimizer step.
        step: i64,
        /// Metric name.
        name: String,
        /// Value.
        value: f64,
    },
    /// A metric's estimate and confidence interval after a shard (evals mode); the value
    /// also comes as a [`Event::Metric`].
    Interval {
        /// Experiment name.
        experiment: String,
        /// Run.
        run_id: i64,
        /// Shards done.
        step: i64,
        /// Metric name.
        name: String,
        /// The estimate.
        value: f64,
        /// Lower bound.
        lower: f64,
        /// Upper bound.
        upper: f64,
        /// Whether it is the experiment's primary metric (pipelines are raced by it).
        primary: bool,
    },
    /// A run changed status.
    Status {
        /// Experiment name.
        experiment: String,
        /// Run.
        run_id: i64,
        /// New status.
        status: RunStatus,
        /// Why (an error, the policy's reason).
        message: Option<String>,
    },
    /// An op was applied or rejected.
    Op {
        /// Experiment name.
        experiment: String,
        /// Op id.
        op_id: i64,
        /// Target run.
        run_id: i64,
        /// `stop`, `resume`, `delete`, `clone`.
        op: String,
        /// `applied` or `rejected`.
        status: String,
        /// What happened.
        message: Option<String>,
        /// The run a clone created.
        new_run_id: Option<i64>,
    },
    /// A line for people (loading a model, an op applied, admission).
    Log {
        /// Experiment name.
        experiment: String,
        /// The line.
        message: String,
    },
    /// A run's progress after an optimizer step.
    Progress {
        /// Experiment name.
        experiment: String,
        /// Run.
        run_id: i64,
        /// Steps done.
        steps_done: i64,
        /// Steps in all.
        total_steps: i64,
        /// Chunks done.
        chunks_done: i64,
    },
}

impl Event {
    /// The experiment it is about.
    pub fn experiment(&self) -> &str {
        match self {
            Event::Metric { experiment, .. }
            | Event::Interval { experiment, .. }
            | Event::Status { experiment, .. }
            | Event::Op { experiment, .. }
            | Event::Log { experiment, .. }
            | Event::Progress { experiment, .. } => experiment,
        }
    }
}

/// Where events go: a broadcast channel (the server subscribes to it); sending never
/// blocks and succeeds with no subscriber.
pub type EventSender = tokio::sync::broadcast::Sender<Event>;

/// A channel for events.
pub fn channel() -> EventSender {
    tokio::sync::broadcast::channel(4096).0
}
