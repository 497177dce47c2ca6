//! `furnace embed`: sentence vectors of texts.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_rag::SentenceEncoder;

#[derive(Args)]
pub struct EmbedArgs {
    /// The encoder: an alias (`all-minilm-l6-v2`, fetched when missing) or a
    /// sentence-transformers / Hugging Face BERT folder.
    #[arg(long, short, default_value = "all-minilm-l6-v2")]
    model: String,
    /// Read texts from a file, one per line (`-` for standard input), instead of arguments.
    #[arg(long, short, conflicts_with = "texts")]
    file: Option<PathBuf>,
    /// Print one JSON object per text (`{"index", "text", "vector"}`) instead of lines of
    /// numbers.
    #[arg(long)]
    json: bool,
    /// How the encoder's weights are held: f32 (exact) or bf16 (faster on CPUs with bf16
    /// dot products).
    #[arg(long, default_value = "f32")]
    dtype: furnace_model::WeightDType,
    /// Texts per forward pass.
    #[arg(long, default_value_t = furnace_rag::encoder::DEFAULT_BATCH)]
    batch_size: usize,
    /// The texts to embed.
    texts: Vec<String>,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let texts = match &a.file {
        Some(path) if path.as_os_str() == "-" => read_lines(std::io::stdin().lock()).context("reading standard input")?,
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            read_lines(std::io::BufReader::new(file)).with_context(|| format!("reading {}", path.display()))?
        }
        None => a.texts.clone(),
    };
    if texts.is_empty() {
        bail!("nothing to embed: give texts as arguments or --file FILE (one text per line)");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let enc = SentenceEncoder::load_with(&a.model, a.dtype, &mut |line| eprintln!("{line}"))?.with_batch_size(a.batch_size);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let out = enc.embed(&refs)?;
    for &i in &out.truncated {
        eprintln!(
            "warning: text {} is longer than {}'s {} tokens; its vector is of the first {} only",
            i + 1,
            enc.name(),
            enc.max_seq_length(),
            enc.max_seq_length()
        );
    }
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for (i, (text, v)) in texts.iter().zip(&out.vectors).enumerate() {
        if a.json {
            serde_json::to_writer(&mut w, &serde_json::json!({ "index": i, "text": text, "vector": v }))?;
            writeln!(w)?;
        } else {
            let line: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            writeln!(w, "{}", line.join(" "))?;
        }
    }
    w.flush()?;
    Ok(())
}

fn read_lines(r: impl BufRead) -> std::io::Result<Vec<String>> {
    r.lines().filter(|l| !matches!(l, Ok(s) if s.trim().is_empty())).collect()
}
