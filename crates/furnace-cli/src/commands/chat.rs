//! `furnace chat`: an interactive chat in the terminal, on the serving engine (the same as
//! `furnace generate`'s).

use crate::args::{resolve_adapter, ModelArg, RunsDir, SamplingArgs};
use crate::commands::generate::{prompt_ids, start_engine, stream};
use crate::models::load;
use anyhow::Result;
use clap::Args;
use furnace_generate::Request;
use furnace_model::WeightDType;
use furnace_text::ChatMessage;
use std::io::{BufRead, Write};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// How weights are held: f32, bf16, quantized.
    #[arg(long, default_value = "quantized")]
    dtype: WeightDType,
    /// Chat with a LoRA adapter: a PEFT directory, or a name or tag in the adapter
    /// registry of --runs-dir (`furnace adapters list`).
    #[arg(long, value_name = "DIR|NAME")]
    adapter: Option<String>,
    #[command(flatten)]
    dir: RunsDir,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let adapter_dir = a.adapter.as_deref().map(|g| resolve_adapter(g, &a.dir)).transpose()?;
    let loaded = load(&a.model.model, a.dtype)?;
    let (engine, adapter) = start_engine(&loaded, adapter_dir.as_deref())?;
    let mut history: Vec<ChatMessage> = Vec::new();
    let reset = |h: &mut Vec<ChatMessage>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(ChatMessage::new("system", s.clone()));
        }
    };
    reset(&mut history);
    eprintln!("chatting with {} (/exit to quit, /reset to start over)", a.model.model);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                reset(&mut history);
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        let ids = prompt_ids(&loaded, &history, None)?;
        let request = Request { prompt: ids, params: a.sampling.params(), adapter: adapter.clone(), constraint: None };
        let reply = match stream(&engine, request, &mut |text| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }) {
            Ok(o) => o.text,
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
                continue;
            }
        };
        println!();
        history.push(ChatMessage::new("assistant", reply));
    }
    engine.shutdown()?;
    Ok(())
}
