//! LoRA training for furnace. This first piece is the differentiable forward pass of the
//! llama family built from candle ops that carry gradients (candle's fused RMSNorm, RoPE and
//! softmax kernels and our decode kernels have no backward), the causal-LM loss with
//! ignored labels, and trainable LoRA factors as candle `Var`s attached to a model.
//!
//! Data flow: [`TrainableLora::attach`] puts `Var`-backed LoRA factors into a
//! [`furnace_model::Llama`]'s linear layers; [`sft_loss`] runs the sequence through the
//! network and returns the mean cross-entropy; `loss.backward()` yields the gradients of
//! exactly those factors.
#![deny(missing_docs)]

pub mod data;
pub mod error;
pub mod forward;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod spec;
pub mod trainer;

pub use data::{load_dataset, Columns, DataError, DataOptions, Dataset, Example};
pub use error::{Error, Result};
pub use forward::{causal_lm_logits, sft_loss, IGNORE_INDEX};
pub use lora::{LoraInit, TrainableLora};
pub use ops::{train_linear, FrozenLinear};
pub use spec::{Spec, SpecError};
pub use trainer::{eval_loss, StepMetrics, TrainConfig, Trainer};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule, ScheduleKind};
