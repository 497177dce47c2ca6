//! Hyperparallel experiments: the runs (leaf configs) of an experiment train together on
//! one frozen base in fused passes, chunk by chunk, steered live by ops (stop, resume,
//! delete, clone-modify) and by a policy (ASHA, PBT) or a search (TPE); everything durable lives in a SQLite
//! store, and live [`Event`]s go out on a broadcast channel (furnace-server streams them
//! and serves the store over HTTP; this crate has no HTTP).
#![deny(missing_docs)]

pub mod asha;
pub mod audit;
pub mod conversations;
pub mod error;
pub mod events;
pub mod experiment;
pub mod fit;
pub mod ops;
pub mod pbt;
pub mod registry;
pub mod shards;
pub mod store;
pub mod tpe;

pub use conversations::{ChoiceRecord, ConversationFilter, ConversationRecord, ConversationRow, RATING_MAX, RATING_MIN};
pub use error::{Error, Result};
pub use events::{Event, EventSender};
pub use experiment::{Experiment, Running, SendLoader, StartOptions};
pub use fit::{run_fit, FitOptions, FitSummary, Loader};
pub use registry::AdapterRecord;
pub use shards::{BoundRow, Estimate, ExampleRecord};
pub use store::{ExperimentRow, MetricRow, OpKind, OpRow, RunRow, RunStatus, Store};
