//! `furnace tokenize`: the token ids of a text.

use crate::args::ModelArg;
use crate::models::load;
use anyhow::Result;
use clap::Args;
use furnace_model::WeightDType;

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print a JSON array instead of one id per line.
    #[arg(long)]
    json: bool,
    /// Add the model's special prefix (BOS) when it wants one.
    #[arg(long)]
    add_special: bool,
    /// Show each id with its token piece.
    #[arg(long)]
    show_pieces: bool,
    /// The text.
    text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let loaded = load(&a.model.model, WeightDType::Quantized)?;
    let ids = loaded.tokenizer.encode(&a.text, a.add_special)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            if a.show_pieces {
                let piece = loaded.tokenizer.decode(&[id], false)?;
                println!("{id:>6} -> {piece:?}");
            } else {
                println!("{id}");
            }
        }
    }
    Ok(())
}
