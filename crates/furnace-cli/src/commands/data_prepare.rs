//! `furnace data prepare`: turns raw SFT datasets into the train/validation files `furnace
//! train` reads: bad rows, length filters, exact and MinHash near-duplicate removal, row-form
//! and file-format conversion, a seeded split, and a report (`prepare.json`). The work is
//! `furnace_train::data::prepare`; this file maps flags to its options and prints.

use anyhow::{bail, Context, Result};
use clap::Args;
use furnace_hub::ModelLocation;
use furnace_text::{ChatTemplate, Tokenizer};
use furnace_train::data::prepare::{
    prepare, preview, Dedup, OutputFormat, PrepareOptions, PrepareReport, Progress, RowForm, TextModel, ValSplit,
};
use furnace_train::Columns;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
#[command(after_help = "\
Steps, in order: read (bad rows stop the run at file:line unless --skip-bad) → convert (--to) \
→ length filters → exact dedup → near dedup → seeded shuffle and split → write.

Writes OUT/train.<ext>, OUT/val.<ext> (only when the validation split has rows) and \
OUT/prepare.json (options, input SHA-256s, counts, bad rows, duplicate pairs).

Forms (--to): chat {\"messages\": [...]}; prompt_completion {\"prompt\", \"completion\", \"system\"?} \
(a multi-turn chat keeps everything before the last assistant turn as the prompt, written as a \
list of messages); instruction {\"instruction\", \"input\", \"output\", \"system\"?} (single-turn \
rows only). CSV and Parquet hold lists as JSON text, which furnace reads back as lists.

Examples:
  furnace data prepare raw.jsonl --out data/ --val-fraction 0.05 --seed 1 --dedup near
  furnace data prepare a.csv b.parquet --out data/ --to chat --format parquet
  furnace data prepare raw.jsonl --out data/ --model smollm2-135m-instruct --max-tokens 512
  furnace data prepare raw.jsonl --model smollm2-135m-instruct --preview 3")]
pub struct PrepareArgs {
    /// Input datasets (JSONL, JSON, CSV or Parquet), read in this order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The output directory (not needed with --preview).
    #[arg(long, required_unless_present = "preview")]
    out: Option<PathBuf>,
    /// Share of the rows for validation, rounded up (0 writes no val file).
    #[arg(long, default_value_t = 0.1, conflicts_with = "val_count")]
    val_fraction: f64,
    /// Number of rows for validation, instead of --val-fraction.
    #[arg(long)]
    val_count: Option<usize>,
    /// Seed of the shuffle before the split (and of the MinHash functions).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The model whose tokenizer and chat template count tokens (--min/--max-tokens) and
    /// render --preview: an alias, a .gguf file or an HF model directory. Only its tokenizer
    /// and template are read.
    #[arg(long, short)]
    model: Option<String>,
    /// Drop rows with fewer tokens (formatted with the chat template, as furnace train sees them).
    #[arg(long)]
    min_tokens: Option<usize>,
    /// Drop rows with more tokens (formatted with the chat template, as furnace train sees them).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Drop rows with fewer characters of message content (no model needed).
    #[arg(long)]
    min_chars: Option<usize>,
    /// Drop rows with more characters of message content (no model needed).
    #[arg(long)]
    max_chars: Option<usize>,
    /// Duplicates to remove: none, exact (same content after lowercasing and collapsing
    /// whitespace) or near (exact, then MinHash near-duplicates); the first occurrence stays.
    #[arg(long, default_value = "exact", value_parser = ["none", "exact", "near"])]
    dedup: String,
    /// Near duplicates: the estimated Jaccard similarity (of character 5-gram shingles of the
    /// messages, system messages left out) at which a row counts as a duplicate of a kept one.
    #[arg(long, default_value_t = 0.85)]
    near_threshold: f64,
    /// Near duplicates: MinHash functions per signature.
    #[arg(long, default_value_t = 128)]
    num_perm: usize,
    /// Near duplicates: characters per shingle.
    #[arg(long, default_value_t = 5)]
    shingle: usize,
    /// Convert every row to this form (default: write rows in the form they were read).
    #[arg(long, value_parser = ["chat", "prompt_completion", "instruction"])]
    to: Option<String>,
    /// Output file format.
    #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv", "parquet"])]
    format: String,
    /// Column mapping of the inputs, KEY=NAME (keys: messages, prompt, completion,
    /// instruction, input, output, system); repeat or separate with commas.
    #[arg(long = "column", value_delimiter = ',')]
    columns: Vec<String>,
    /// Skip bad rows (counted and listed in the report) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Print row N (counting from 1 over the inputs in order) as furnace train sees it — the
    /// chat template's prompt part (no loss) and completion part (learned) — and exit
    /// without writing. Needs --model.
    #[arg(long, value_name = "N")]
    preview: Option<usize>,
    /// Also print bad rows and duplicate pairs.
    #[arg(long, short)]
    verbose: bool,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

/// The column mapping from KEY=NAME pairs.
fn columns(pairs: &[String]) -> Result<Columns> {
    let mut c = Columns::default();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else { bail!("--column {p}: use KEY=NAME, e.g. prompt=question") };
        let slot = match k.trim() {
            "messages" => &mut c.messages,
            "prompt" => &mut c.prompt,
            "completion" => &mut c.completion,
            "instruction" => &mut c.instruction,
            "input" => &mut c.input,
            "output" => &mut c.output,
            "system" => &mut c.system,
            other => bail!("--column {p}: '{other}' is not one of messages, prompt, completion, instruction, input, output, system"),
        };
        *slot = v.trim().to_string();
    }
    Ok(c)
}

/// The tokenizer and chat template of a model, without its weights.
fn load_text(name: &str) -> Result<(Tokenizer, ChatTemplate)> {
    let loc = furnace_model::resolve_name(name, &mut |msg| eprintln!("{msg}"))?;
    let (tok, template) = match &loc {
        ModelLocation::Gguf(p) => {
            let g = furnace_model::gguf::GgufFile::open(p).with_context(|| format!("reading {}", p.display()))?;
            let tok = Tokenizer::from_gguf(&g.tokenizer_spec()?)?;
            (tok, g.chat_template().map(|s| ChatTemplate::new(&s)).transpose()?)
        }
        ModelLocation::HfDir(p) => (Tokenizer::from_hf_dir(p)?, ChatTemplate::from_hf_dir(p)?),
    };
    let Some(template) = template else { bail!("{name} has no chat template: rows are formatted with it") };
    Ok((tok, template))
}

/// Progress of the library's steps on a bar (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl Progress for Bar {
    fn stage(&self, name: &str, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.set_message(name.to_string());
    }
    fn advance(&self, n: usize) {
        self.0.inc(n as u64);
    }
}

pub fn run(a: PrepareArgs) -> Result<()> {
    for p in &a.inputs {
        if !p.is_file() {
            bail!("{}: no such file", p.display());
        }
    }
    let opts = PrepareOptions {
        columns: columns(&a.columns)?,
        val: match a.val_count {
            Some(n) => ValSplit::Count(n),
            None => ValSplit::Fraction(a.val_fraction),
        },
        seed: a.seed,
        dedup: Dedup::parse(&a.dedup).context("--dedup: use none, exact or near")?,
        near_threshold: a.near_threshold,
        num_perm: a.num_perm,
        shingle: a.shingle,
        min_chars: a.min_chars,
        max_chars: a.max_chars,
        min_tokens: a.min_tokens,
        max_tokens: a.max_tokens,
        to: a.to.as_deref().map(|s| RowForm::parse(s).context("--to: use chat, prompt_completion or instruction")).transpose()?,
        format: OutputFormat::parse(&a.format).context("--format: use jsonl, csv or parquet")?,
        skip_bad: a.skip_bad,
        model: a.model.clone(),
    };
    if opts.model.is_none() && (opts.min_tokens.is_some() || opts.max_tokens.is_some()) {
        bail!("--min-tokens/--max-tokens count tokens with a model's tokenizer and chat template: give --model, or filter by characters with --min-chars/--max-chars");
    }
    let text = a.model.as_deref().map(load_text).transpose()?;
    let text_model = text.as_ref().map(|(tokenizer, template)| TextModel { tokenizer, template });
    if let Some(n) = a.preview {
        let Some(t) = text_model else { bail!("--preview renders the row with a chat template: give --model") };
        let p = preview(&a.inputs, n, &opts, t)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
            return Ok(());
        }
        println!("row {n}: {} ({} form)", p.at, p.form);
        println!("{}", serde_json::to_string(&p.row)?);
        println!("──── prompt: {} tokens, no loss ────", p.prompt_tokens);
        println!("{}", p.prompt);
        println!("──── completion: {} tokens, learned ────", p.completion_tokens);
        println!("{}", p.completion);
        println!("──── end ────");
        return Ok(());
    }
    let Some(out) = a.out.as_ref() else { bail!("--out DIR: where to write train and val") };
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{msg:20} {bar:30} {pos}/{len}  [{elapsed_precise} < {eta_precise}]") {
        bar.set_style(style);
    }
    let progress = Bar(bar);
    let report = prepare(&a.inputs, out, &opts, text_model, &progress)?;
    progress.0.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_summary(&report, a.verbose);
    Ok(())
}

fn print_summary(r: &PrepareReport, verbose: bool) {
    let forms: Vec<String> = r.forms.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("read {} rows from {} file(s) (forms: {})", r.rows_read, r.inputs.len(), forms.join(", "));
    println!("bad rows: {}{}", r.bad_rows, if r.bad_rows > 0 { " (skipped)" } else { "" });
    println!("filtered: {} too short, {} too long", r.too_short, r.too_long);
    let lsh = r.lsh_bands.map(|(b, rows)| format!(" (LSH {b} bands x {rows} rows)")).unwrap_or_default();
    println!("duplicates removed: {} exact, {} near{lsh}", r.exact_duplicates, r.near_duplicates);
    println!("train: {} rows, val: {} rows", r.train, r.val);
    for p in &r.outputs {
        println!("wrote {}", p.display());
    }
    if let Some(dir) = r.outputs.first().and_then(|p| p.parent()) {
        println!("report: {}", dir.join("prepare.json").display());
    }
    if verbose {
        for b in &r.bad {
            println!("  bad row {}:{}: {}", b.path.display(), b.line, b.msg);
        }
        for p in &r.exact_pairs {
            println!("  exact duplicate {} of {}", p.removed, p.kept);
        }
        for p in &r.near_pairs {
            println!("  near duplicate {} of {} (Jaccard ~{:.2})", p.removed, p.kept, p.jaccard.unwrap_or(0.0));
        }
    } else if r.bad_rows + r.exact_duplicates + r.near_duplicates > 0 {
        println!("(--verbose or prepare.json lists the bad rows and duplicate pairs)");
    }
}
