//! `furnace generate`: one reply to one prompt, streamed to stdout, by the serving engine
//! (`furnace_generate::EngineHandle`), which `furnace chat` uses too.

use crate::args::{resolve_adapter, ModelArg, RunsDir, SamplingArgs};
use crate::models::load;
use anyhow::{bail, Result};
use clap::Args;
use furnace_generate::{EngineHandle, Event, Output, Request, ServiceOptions};
use furnace_model::{LoadedModel, WeightDType};
use furnace_text::ChatMessage;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

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
    /// Generate with a LoRA adapter: a PEFT directory (adapter_config.json +
    /// adapter_model.safetensors), or a name or tag in the adapter registry of --runs-dir
    /// (`furnace adapters list`).
    #[arg(long, value_name = "DIR|NAME")]
    adapter: Option<String>,
    #[command(flatten)]
    dir: RunsDir,
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
    let rendered = template.render(history, true, loaded.tokenizer.bos_token(), loaded.tokenizer.eos_token())?;
    Ok(loaded.tokenizer.encode(&rendered, false)?)
}

/// Starts the serving engine over (a clone of, sharing the weights) the model; with
/// `adapter`, registers that PEFT adapter directory and returns the name requests select it
/// by.
pub fn start_engine(loaded: &LoadedModel, adapter: Option<&Path>) -> Result<(EngineHandle, Option<String>)> {
    let engine = EngineHandle::spawn(loaded.model.clone(), &loaded.tokenizer, ServiceOptions::default())?;
    let name = match adapter {
        Some(dir) => {
            let name = dir.display().to_string();
            engine.load_adapter(&name, dir)?;
            Some(name)
        }
        None => None,
    };
    Ok((engine, name))
}

/// Runs one request on the engine, handing each piece of text to `on_text` as it is
/// generated; returns the whole output.
pub fn stream(engine: &EngineHandle, request: Request, on_text: &mut dyn FnMut(&str)) -> Result<Output> {
    let (tx, rx) = mpsc::channel();
    let prompt_ids = request.prompt.clone();
    engine.submit(
        request,
        Box::new(move |ev| {
            // The receiver lives until the request finishes.
            let _ = tx.send(ev);
        }),
    )?;
    let (mut new_ids, mut text, mut logprobs) = (Vec::new(), String::new(), Vec::new());
    for ev in rx {
        let (piece, reason) = match ev {
            Event::Token { id, text, logprob, .. } => {
                new_ids.push(id);
                logprobs.extend(logprob);
                (text, None)
            }
            Event::Finished { text, reason, .. } => (text, Some(reason)),
        };
        on_text(&piece);
        text.push_str(&piece);
        if let Some(finish_reason) = reason {
            return Ok(Output { prompt_ids, new_ids, text, finish_reason, logprobs });
        }
    }
    bail!("the engine stopped before the request finished")
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let adapter_dir = a.adapter.as_deref().map(|g| resolve_adapter(g, &a.dir)).transpose()?;
    let loaded = load(&a.model.model, a.dtype)?;
    let mut history = Vec::new();
    if let Some(s) = &a.system {
        history.push(ChatMessage::new("system", s.clone()));
    }
    history.push(ChatMessage::new("user", a.prompt.clone()));
    let ids = prompt_ids(&loaded, &history, a.raw.then_some(a.prompt.as_str()))?;
    let (engine, adapter) = start_engine(&loaded, adapter_dir.as_deref())?;
    let request = Request { prompt: ids, params: a.sampling.params(), adapter, constraint: None };
    let json = a.json;
    let mut out = std::io::stdout();
    let o = stream(&engine, request, &mut |text| {
        if !json {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    })?;
    engine.shutdown()?;
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
