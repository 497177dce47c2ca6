//! `furnace generate`: one reply to one prompt, streamed to stdout.

use crate::args::{ModelArg, SamplingArgs};
use crate::models::load_with_adapter;
use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_generate::{Engine, EngineOptions, Event, Request};
use furnace_model::{LoadedModel, WeightDType};
use furnace_text::ChatMessage;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// System message (chat template only).
    #[arg(long)]
    system: Option<String>,
    /// Do not apply the chat template: the prompt is fed as-is.
    #[arg(long)]
    raw: bool,
    /// How weights are held: f32 (reproduces the reference exactly), bf16, quantized (fastest).
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Print {"prompt_ids", "new_ids", "text"} as JSON instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Apply a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    prompt: String,
}

/// The prompt ids for a user message: chat template (with optional system message) unless
/// `raw`.
pub fn prompt_ids(loaded: &LoadedModel, history: &[ChatMessage], raw_text: Option<&str>) -> Result<Vec<u32>> {
    if let Some(text) = raw_text {
        return Ok(loaded.tokenizer.encode(text, true)?);
    }
    let Some(template) = &loaded.chat_template else {
        bail!("this model has no chat template: use --raw to feed the prompt as-is");
    };
    let rendered = template.render(
        history,
        true,
        loaded.tokenizer.bos_token(),
        loaded.tokenizer.eos_token(),
    )?;
    Ok(loaded.tokenizer.encode(&rendered, false)?)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let loaded = load_with_adapter(&a.model.model, a.dtype, a.adapter.as_ref())?;
    let mut history = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new("system", s.clone()));
    }
    history.push(ChatMessage::new("user", a.prompt.clone()));
    let ids = prompt_ids(&loaded, &history, a.raw.then_some(a.prompt.as_str()))?;
    let mut engine = Engine::new(&loaded.model, &loaded.tokenizer, EngineOptions::default());
    engine.add(Request {
        prompt: ids,
        params: a.sampling.params(),
    })?;
    let json = a.json;
    let mut out = std::io::stdout();
    let outputs = engine.run(&mut |ev| {
        if json {
            return;
        }
        let text = match &ev {
            Event::Token { text, .. } => text,
            Event::Finished { text, .. } => text,
        };
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    })?;
    let o = outputs.into_iter().next().context("no output")?;
    if json {
        println!(
            "{}",
            serde_json::json!({"prompt_ids": o.prompt_ids, "new_ids": o.new_ids, "text": o.text, "finish_reason": o.finish_reason})
        );
    } else {
        println!();
    }
    Ok(())
}
