//! One target per parser: a function from bytes to an [`Outcome`] that calls the entry
//! point furnace itself uses, with its seeds, its dictionary and, where the format has a
//! structure worth crafting, a structure-aware generator.

use crate::gen;
use crate::mutate;
use crate::rng::Rng;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What one input did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Parsed (and, where the target goes on, used) without error.
    Ok,
    /// A clean error with its message.
    Err(String),
    /// Wrong behaviour that is not a panic (e.g. a 500 answer to a crafted request).
    Bug(String),
}

impl Outcome {
    /// `Ok` or `Err(message)` of a result.
    pub fn of<T, E: Display>(r: Result<T, E>) -> Self {
        match r {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::Err(e.to_string()),
        }
    }
}

/// One parser under test.
pub struct Target {
    /// The name used on the command line.
    pub name: &'static str,
    /// The furnace entry point it calls.
    pub entry: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]) -> Outcome,
    /// Valid (or nearly valid) inputs to mutate.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Structure-aware inputs, when the format has a structure worth crafting.
    pub generate: Option<fn(&mut Rng) -> Vec<u8>>,
    /// Format tokens inserted by the mutator.
    pub dict: &'static [&'static [u8]],
}

impl Target {
    /// The next input: a structure-aware one (a third of the time, when there is a
    /// generator), else a seed or a generated input mutated 1 to 8 times.
    pub fn input(&self, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
        let generate = self.generate;
        let mut data = match generate {
            Some(g) if rng.one_in(3) => {
                let d = g(rng);
                if rng.one_in(2) {
                    return d;
                }
                d
            }
            _ => rng.pick(seeds).cloned().unwrap_or_default(),
        };
        mutate::mutate(rng, &mut data, self.dict, seeds);
        data
    }
}

/// Every target, in a fixed order.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "gguf",
            entry: "GgufFile::from_bytes (= GgufFile::open) → load::gguf_info, config, tokenizer_spec → Tokenizer::from_gguf → encode; chat_template → ChatTemplate::new → render",
            run: run_gguf,
            seeds: gen::gguf_seeds,
            generate: Some(gen::gguf_crafted),
            dict: &[b"GGUF", b"general.alignment", b"llama.", b"tokenizer.ggml.", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"],
        },
        Target {
            name: "safetensors",
            entry: "load::safetensors_header_stats (furnace model inspect) and hf::read_safetensors (hf::load_tensors)",
            run: run_safetensors,
            seeds: gen::safetensors_seeds,
            generate: Some(gen::safetensors_crafted),
            dict: &[b"\"dtype\"", b"\"shape\"", b"\"data_offsets\"", b"__metadata__", b"F32", b"BF16", b"[", b"]", b","],
        },
        Target {
            name: "config-json",
            entry: "LlamaConfig::from_hf_json (hf::read_config) → config::rope_inv_freq",
            run: run_config,
            seeds: gen::config_seeds,
            generate: Some(gen::config_crafted),
            dict: JSON_DICT,
        },
        Target {
            name: "tokenizer-json",
            entry: "Tokenizer::from_json (= Tokenizer::from_file) → encode, decode",
            run: run_tokenizer,
            seeds: gen::tokenizer_seeds,
            generate: Some(gen::tokenizer_crafted),
            dict: JSON_DICT,
        },
        Target {
            name: "chat-template",
            entry: "ChatTemplate::new → render",
            run: run_template,
            seeds: gen::template_seeds,
            generate: Some(gen::template_crafted),
            dict: &[b"{%", b"%}", b"{{", b"}}", b"for ", b"endfor", b"range(", b"macro", b"loop.", b"*", b"~", b"10**9", b"|join", b"(", b")"],
        },
        Target {
            name: "spec-toml",
            entry: "knobs::expand (Experiment::create) and Spec::parse (Spec::load) → Spec::check_against, train_config",
            run: run_spec,
            seeds: gen::spec_seeds,
            generate: Some(gen::spec_crafted),
            dict: &[b"[", b"]", b"{", b"}", b"=", b"\"", b"list", b"range", b"[[group]]", b"[search]", b"\n", b"1e308", b"-1"],
        },
        Target {
            name: "dataset-jsonl",
            entry: "data::read_rows_from_bytes (= read_rows, .jsonl) → encode_row",
            run: |b| run_dataset(b, "jsonl"),
            seeds: gen::jsonl_seeds,
            generate: Some(gen::jsonl_crafted),
            dict: JSON_DICT,
        },
        Target {
            name: "dataset-json",
            entry: "data::read_rows_from_bytes (= read_rows, .json) → encode_row",
            run: |b| run_dataset(b, "json"),
            seeds: gen::json_dataset_seeds,
            generate: None,
            dict: JSON_DICT,
        },
        Target {
            name: "dataset-csv",
            entry: "data::read_rows_from_bytes (= read_rows, .csv) → encode_row",
            run: |b| run_dataset(b, "csv"),
            seeds: gen::csv_seeds,
            generate: None,
            dict: &[b",", b"\"", b"\n", b"\r\n", b"prompt", b"completion", b"messages"],
        },
        Target {
            name: "dataset-parquet",
            entry: "data::read_rows_from_bytes (= read_rows, .parquet) → encode_row",
            run: |b| run_dataset(b, "parquet"),
            seeds: gen::parquet_seeds,
            generate: None,
            dict: &[b"PAR1", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"],
        },
        Target {
            name: "http",
            entry: "furnace_server::app (the whole router: guard, auth, body limit, POST /api/ops parsing, ops::submit) via tower oneshot",
            run: run_http,
            seeds: gen::http_seeds,
            generate: Some(gen::http_crafted),
            dict: JSON_DICT,
        },
    ]
}

const JSON_DICT: &[&[u8]] =
    &[b"{", b"}", b"[", b"]", b"\"", b":", b",", b"null", b"true", b"-1", b"1e308", b"18446744073709551616", b"\\u0000", b"\\ud800"];

/// The repository's `testdata/`.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

struct Fixture {
    tokenizer: furnace_text::Tokenizer,
    template: furnace_text::ChatTemplate,
    config: furnace_model::LlamaConfig,
}

fn fixture() -> Result<&'static Fixture, String> {
    static F: OnceLock<Result<Fixture, String>> = OnceLock::new();
    F.get_or_init(|| {
        let dir = testdata().join("tiny-llama");
        let tokenizer = furnace_text::Tokenizer::from_file(&dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
        let template = furnace_text::ChatTemplate::from_hf_dir(&dir).map_err(|e| e.to_string())?.ok_or("tiny-llama has no template")?;
        let config = furnace_model::hf::read_config(&dir).map_err(|e| e.to_string())?;
        Ok(Fixture { tokenizer, template, config })
    })
    .as_ref()
    .map_err(|e| format!("fixture: {e}"))
}

fn messages() -> Vec<furnace_text::ChatMessage> {
    vec![
        furnace_text::ChatMessage::new("system", "Be brief."),
        furnace_text::ChatMessage::new("user", "Hello <s> world 123"),
        furnace_text::ChatMessage::new("assistant", "Hi!"),
    ]
}

fn run_gguf(bytes: &[u8]) -> Outcome {
    let r = (|| -> Result<(), String> {
        let mut g = furnace_model::gguf::GgufFile::from_bytes(Path::new("fuzz.gguf"), bytes.to_vec()).map_err(|e| e.to_string())?;
        let info = furnace_model::load::gguf_info(&g);
        let config = g.config();
        let spec = g.tokenizer_spec();
        let template = g.chat_template();
        info.map_err(|e| e.to_string())?;
        if let Ok(cfg) = &config {
            furnace_model::config::rope_inv_freq(cfg);
        }
        if let Some(t) = template {
            let t = furnace_text::ChatTemplate::new(&t).map_err(|e| e.to_string())?;
            t.render(&messages(), true, Some("<s>"), None).map_err(|e| e.to_string())?;
        }
        let tok = furnace_text::Tokenizer::from_gguf(&spec.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let ids = tok.encode("Hello <s> world 123", true).map_err(|e| e.to_string())?;
        tok.decode(&ids, false).map_err(|e| e.to_string())?;
        config.map_err(|e| e.to_string())?;
        Ok(())
    })();
    Outcome::of(r)
}

fn run_safetensors(bytes: &[u8]) -> Outcome {
    let path = Path::new("fuzz.safetensors");
    let stats = furnace_model::load::safetensors_header_stats(std::io::Cursor::new(bytes), bytes.len() as u64, path);
    let tensors = furnace_model::hf::read_safetensors(bytes, path);
    match (stats, tensors) {
        (Ok(_), Ok(_)) => Outcome::Ok,
        (Err(e), _) | (_, Err(e)) => Outcome::Err(e.to_string()),
    }
}

fn run_config(bytes: &[u8]) -> Outcome {
    let r = (|| -> Result<(), String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("config.json: {e}"))?;
        let cfg = furnace_model::LlamaConfig::from_hf_json(&v).map_err(|e| e.to_string())?;
        furnace_model::config::rope_inv_freq(&cfg);
        Ok(())
    })();
    Outcome::of(r)
}

fn run_tokenizer(bytes: &[u8]) -> Outcome {
    let r = (|| -> Result<(), String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("tokenizer.json: {e}"))?;
        let tok = furnace_text::Tokenizer::from_json(text, Path::new("tokenizer.json")).map_err(|e| e.to_string())?;
        let ids = tok.encode("Hello <s> world 123 héllo", true).map_err(|e| e.to_string())?;
        tok.decode(&ids, false).map_err(|e| e.to_string())?;
        tok.decode(&[0, 1, 2, 5, 1000, u32::MAX], true).map_err(|e| e.to_string())?;
        Ok(())
    })();
    Outcome::of(r)
}

fn run_template(bytes: &[u8]) -> Outcome {
    let r = (|| -> Result<(), String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("template: {e}"))?;
        let t = furnace_text::ChatTemplate::new(text).map_err(|e| e.to_string())?;
        t.render(&messages(), true, Some("<s>"), Some("</s>")).map_err(|e| e.to_string())?;
        Ok(())
    })();
    Outcome::of(r)
}

fn run_spec(bytes: &[u8]) -> Outcome {
    let r = (|| -> Result<(), String> {
        let fx = fixture()?;
        let text = std::str::from_utf8(bytes).map_err(|e| format!("spec: {e}"))?;
        let path = Path::new("specs/fuzz.toml");
        let single = furnace_train::Spec::parse(text, path);
        let leaves = furnace_train::knobs::expand(text, path).map_err(|e| e.to_string())?;
        for leaf in &leaves {
            leaf.spec.check_against(&fx.config).map_err(|e| e.to_string())?;
            leaf.spec.weight_dtype().map_err(|e| e.to_string())?;
            leaf.spec.data_options();
            leaf.spec.lora_config();
            leaf.spec.train_config(&[]);
        }
        // A spec with knobs is not a single spec: `Spec::parse` ran for its panics only.
        drop(single);
        Ok(())
    })();
    Outcome::of(r)
}

fn run_dataset(bytes: &[u8], ext: &str) -> Outcome {
    let r = (|| -> Result<(), String> {
        let fx = fixture()?;
        let path = PathBuf::from(format!("data.{ext}"));
        let rows = furnace_train::data::read_rows_from_bytes(bytes.to_vec(), &path).map_err(|e| e.to_string())?;
        let opts = furnace_train::DataOptions { max_seq_len: 64, ..Default::default() };
        let mut first_err = None;
        for (line, row) in rows.iter().take(64) {
            let res =
                row.as_ref().map_err(String::clone).and_then(|v| furnace_train::data::encode_row(v, &fx.tokenizer, &fx.template, &opts));
            if let Err(e) = res {
                if e.trim().is_empty() {
                    return Err(String::new());
                }
                first_err.get_or_insert(format!("line {line}: {e}"));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })();
    Outcome::of(r)
}

fn run_http(bytes: &[u8]) -> Outcome {
    match crate::http::call(bytes) {
        Ok(o) => o,
        Err(e) => Outcome::Bug(format!("http fixture: {e}")),
    }
}
