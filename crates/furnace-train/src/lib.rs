//! LoRA training for furnace.
//!
//! Data flow: [`load_dataset`] turns rows into token ids and labels; [`FrozenBase`] is the
//! frozen model in the form the training pass multiplies with (bf16 kernels forward and
//! backward, or exact f32); [`TrainableLora`] holds an adapter's factors as plain buffers;
//! [`engine::train_pass`] runs a ragged batch of sequences (each naming its adapter, so
//! several adapters can train in one pass) forward and backward with hand-written ops and
//! returns losses and factor gradients; [`Trainer`] turns those into optimizer steps,
//! checkpoints and resumes.
#![deny(missing_docs)]

pub mod data;
pub mod dpo;
pub mod engine;
pub mod error;
pub mod grpo;
pub mod hooks;
pub mod knobs;
pub mod lora;
pub mod optim;
pub mod policy;
pub mod rewards;
pub mod spec;
pub mod trainer;

pub use data::{load_dataset, Columns, DataKind, DataOptions, Dataset, Example, Sequence};
pub use engine::{train_pass, AdapterRef, FrozenBase, PassResult, SeqRef, IGNORE_INDEX};
pub use error::{Error, Result};
pub use lora::{sweep_partials, LoraInit, LoraPair, TrainableLora};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule, ScheduleKind};
pub use spec::Spec;
pub use trainer::{eval_loss, fused_step, fused_step_with, DataPosition, Objective, StepMetrics, TrainConfig, Trainer, FUSED_MAX_ROWS};
