//! Trainable LoRA factors as plain f32 buffers, initialised as PEFT does or copied from an
//! existing adapter, and saved in PEFT's format.

use crate::error::{Error, Result};
use furnace_model::lora::{peft_key, LoraConfig, TARGETS};
use furnace_model::{Llama, PeftAdapter};
use std::collections::HashMap;

/// The factors of one adapted projection (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `A: [r, inp]`.
    pub a: Vec<f32>,
    /// `B: [out, r]`.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// Input width of the projection.
    pub inp: usize,
    /// Output width of the projection.
    pub out: usize,
}

/// Projections per layer, in [`TARGETS`] order (q, k, v, o, gate, up, down).
pub const PROJ: usize = TARGETS.len();

/// How new LoRA factors start (B is always zero, so training starts from the base model).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: A ~ Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    KaimingUniform,
    /// A ~ N(0, 1/r).
    Gaussian,
}

/// The trainable factors of one adapter: per layer, per projection (in [`TARGETS`] order),
/// the pair if that projection is targeted.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableLora {
    /// Configuration.
    pub config: LoraConfig,
    /// `alpha / r` (or rsLoRA's `alpha / sqrt(r)`).
    pub scale: f32,
    /// `layers[l][p]`.
    pub layers: Vec<[Option<LoraPair>; PROJ]>,
}

fn proj_index(name: &str) -> Option<usize> {
    TARGETS.iter().position(|t| *t == name)
}

impl TrainableLora {
    fn empty(model: &Llama, config: LoraConfig) -> Result<Self> {
        config.validate()?;
        if !(0.0..1.0).contains(&config.lora_dropout) {
            return Err(Error::Input(format!("lora dropout {} must be in [0, 1)", config.lora_dropout)));
        }
        let scale = config.scale() as f32;
        Ok(Self { config, scale, layers: (0..model.layers.len()).map(|_| Default::default()).collect() })
    }

    /// Fresh factors for `config`, initialised as PEFT does, from `seed`.
    pub fn new(model: &Llama, config: LoraConfig, init: LoraInit, seed: u64) -> Result<Self> {
        let mut rng = furnace_model::rng::Rng::new(seed);
        let mut this = Self::empty(model, config)?;
        let targets = this.config.targets();
        let r = this.config.r;
        for (li, layer) in model.layers.iter().enumerate() {
            for name in &targets {
                let (Some(lin), Some(pi)) = (layer.projection(name), proj_index(name)) else {
                    return Err(Error::Input(format!("the model has no module {name}")));
                };
                let (inp, out) = (lin.in_features, lin.out_features);
                let a: Vec<f32> = match init {
                    LoraInit::KaimingUniform => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        (0..r * inp).map(|_| rng.uniform(-bound, bound) as f32).collect()
                    }
                    LoraInit::Gaussian => {
                        let std = 1.0 / r as f64;
                        (0..r * inp).map(|_| (rng.normal() * std) as f32).collect()
                    }
                };
                this.layers[li][pi] = Some(LoraPair { a, b: vec![0f32; out * r], r, inp, out });
            }
        }
        Ok(this)
    }

    /// The factors of a PEFT adapter, checked against `model`'s shapes.
    pub fn from_adapter(model: &Llama, adapter: &PeftAdapter) -> Result<Self> {
        let mut this = Self::empty(model, adapter.config.clone())?;
        let r = this.config.r;
        for (li, layer) in model.layers.iter().enumerate() {
            for name in this.config.targets() {
                let (Some(lin), Some(pi)) = (layer.projection(&name), proj_index(&name)) else {
                    return Err(Error::Input(format!("the model has no module {name}")));
                };
                let get = |f: &str| -> Result<(Vec<usize>, Vec<f32>)> {
                    let k = peft_key(li, &name, f);
                    let t = adapter.tensors.get(&k).ok_or_else(|| Error::Input(format!("adapter lacks '{k}'")))?;
                    Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1()?))
                };
                let ((da, a), (db, b)) = (get("A")?, get("B")?);
                let (inp, out) = (lin.in_features, lin.out_features);
                if da != [r, inp] || db != [out, r] {
                    return Err(Error::Input(format!(
                        "layer {li} {name}: lora_A {da:?} / lora_B {db:?} do not fit a {out}x{inp} layer with r={r}"
                    )));
                }
                this.layers[li][pi] = Some(LoraPair { a, b, r, inp, out });
            }
        }
        Ok(this)
    }

    /// Zero factors of the same shapes (a gradient buffer).
    pub fn zeros_like(&self) -> Self {
        let mut z = self.clone();
        for p in z.layers.iter_mut().flatten().flatten() {
            p.a.iter_mut().for_each(|v| *v = 0.0);
            p.b.iter_mut().for_each(|v| *v = 0.0);
        }
        z
    }

    /// `(PEFT key, shape, values)` of every factor, A then B per adapted projection, layer by
    /// layer in [`TARGETS`] order (the optimizer's parameter order).
    pub fn named(&self) -> Vec<(String, [usize; 2], &[f32])> {
        let mut out = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            for (pi, p) in layer.iter().enumerate() {
                if let Some(p) = p {
                    out.push((peft_key(li, TARGETS[pi], "A"), [p.r, p.inp], p.a.as_slice()));
                    out.push((peft_key(li, TARGETS[pi], "B"), [p.out, p.r], p.b.as_slice()));
                }
            }
        }
        out
    }

    /// Every factor's values, mutable, in the order of [`TrainableLora::named`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = Vec::new();
        for p in self.layers.iter_mut().flatten().flatten() {
            out.push(&mut p.a);
            out.push(&mut p.b);
        }
        out
    }

    /// Adds `other` (same shapes) into these factors.
    pub fn add(&mut self, other: &Self) {
        for (d, s) in self.tensors_mut().into_iter().zip(other.named()) {
            d.iter_mut().zip(s.2).for_each(|(a, b)| *a += b);
        }
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.named().iter().map(|(_, _, v)| v.len()).sum()
    }

    /// The adapter as candle tensors by PEFT key (for the runtime or for saving).
    pub fn to_adapter(&self) -> Result<PeftAdapter> {
        let mut tensors = HashMap::new();
        for (k, shape, v) in self.named() {
            tensors.insert(k, candle_core::Tensor::from_slice(v, (shape[0], shape[1]), &candle_core::Device::Cpu)?);
        }
        Ok(PeftAdapter { config: self.config.clone(), tensors })
    }

    /// Writes the adapter in PEFT's format (`adapter_config.json` +
    /// `adapter_model.safetensors`), which PEFT's `PeftModel.from_pretrained` loads. The
    /// directory is replaced as a whole: files are written to a sibling temp directory first,
    /// so a crash never leaves a half-written adapter under `dir`.
    pub fn save_peft(&self, dir: &std::path::Path, base_model: &str) -> Result<()> {
        self.write_peft(dir, base_model, false)
    }

    /// [`TrainableLora::save_peft`]; `fresh`: `dir` is inside a folder being written
    /// (synced and renamed by its writer), so the files go straight into it.
    pub(crate) fn write_peft(&self, dir: &std::path::Path, base_model: &str, fresh: bool) -> Result<()> {
        let mut cfg = serde_json::to_value(&self.config).map_err(|e| Error::Input(e.to_string()))?;
        if let Some(obj) = cfg.as_object_mut() {
            // PEFT expands `all-linear` when it builds a model and saves the expanded list;
            // loading a config that still says `all-linear` fails in PEFT.
            obj.insert("target_modules".into(), self.config.targets().into());
            obj.insert("task_type".into(), "CAUSAL_LM".into());
            obj.insert("bias".into(), "none".into());
            obj.insert("inference_mode".into(), true.into());
            obj.insert("init_lora_weights".into(), true.into());
            obj.insert("base_model_name_or_path".into(), base_model.into());
            obj.insert("modules_to_save".into(), serde_json::Value::Null);
            obj.insert("lora_bias".into(), false.into());
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Input(e.to_string()))?;
        let tensors = self.to_adapter()?.tensors;
        let write = |tmp: &std::path::Path| -> Result<()> {
            std::fs::write(tmp.join("adapter_config.json"), &text)
                .map_err(|e| Error::Input(format!("writing adapter to {}: {e}", dir.display())))?;
            candle_core::safetensors::save(&tensors, tmp.join("adapter_model.safetensors"))?;
            Ok(())
        };
        if fresh {
            // Inside a folder being written (a checkpoint's): no old one to replace.
            std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
            return write(dir);
        }
        replace_dir(dir, "adapter", write)
    }
}

fn io_err<'a>(what: &str, path: &'a std::path::Path) -> impl Fn(std::io::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| Error::Input(format!("{what} {}: {e}", path.display()))
}

/// Flushes every file under `dir`, then the folders themselves (so their entries are
/// durable before a rename names them).
fn sync_tree(dir: &std::path::Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io_err("reading", dir))? {
        let entry = entry.map_err(io_err("reading", dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io_err("reading", &path))?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io_err("syncing", &path))?;
        }
    }
    sync_dir(dir)
}

/// Flushes a folder's entries (a no-op where folders cannot be opened as files).
fn sync_dir(dir: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err("syncing", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes a new folder `dir` (which must not exist) with what `fill` writes into
/// `<dir>.partial-<pid>`: every file and folder is synced, then it is renamed to `dir`
/// and the parent synced, so `dir` either does not exist or is complete, even after a
/// crash or power loss. `what` names its crash-injection points
/// ([`furnace_hub::failpoint`]): `<what>.files_written` (not synced), `.before_rename`
/// (synced), `.after_rename` (parent not synced yet).
pub(crate) fn write_new_dir(dir: &std::path::Path, what: &str, fill: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        return Err(Error::Input(format!("writing {}: it exists already (a folder is never overwritten)", dir.display())));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = dir.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    let tmp = parent.join(format!("{name}.partial-{}", std::process::id()));
    fill_synced(&tmp, what, fill)?;
    std::fs::rename(&tmp, dir).map_err(io_err("renaming into", dir))?;
    point(what, "after_rename");
    sync_dir(parent)
}

/// Writes a fresh directory `tmp` with `fill` and syncs it (files and folders); on an
/// error it is removed. Passes `<what>.files_written` (not synced) and `.before_rename`
/// (synced), for the caller's rename that follows.
fn fill_synced(tmp: &std::path::Path, what: &str, fill: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(io_err("creating", tmp))?;
    let written = fill(tmp).and_then(|()| {
        point(what, "files_written");
        sync_tree(tmp)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    point(what, "before_rename");
    Ok(())
}

/// The crash-injection point `<what>.<when>` ([`furnace_hub::failpoint`]).
fn point(what: &str, when: &str) {
    if furnace_hub::failpoint::active() {
        furnace_hub::failpoint::hit(&format!("{what}.{when}"));
    }
}

/// Replaces `dir` as a whole with what `fill` writes into a sibling temp directory (synced
/// before it is renamed in), so a crash never leaves a half-written directory under that
/// name. Between the two renames the old one is at `.<name>.old-<pid>`; [`sweep_partials`]
/// puts it back when a crash left `dir` missing. `what` names its crash-injection points:
/// `<what>.files_written`, `.before_rename` (synced), `.between_renames` (the old one moved
/// aside), `.after_rename` (the new one in place), `.old_removed`.
pub(crate) fn replace_dir(dir: &std::path::Path, what: &str, fill: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let parent = dir.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    fill_synced(&tmp, what, fill)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_err("renaming", dir))?;
        point(what, "between_renames");
    }
    std::fs::rename(&tmp, dir).map_err(io_err("renaming into", dir))?;
    point(what, "after_rename");
    sync_dir(parent)?;
    let _ = std::fs::remove_dir_all(&old);
    point(what, "old_removed");
    Ok(())
}

/// Cleans up after a crash in `dir` (a run folder, a checkpoints folder): removes the
/// `*.partial-*` folders a write left behind, and for each `.<name>.old-*` folder puts it
/// back as `<name>` when that is missing (a crash between [`replace_dir`]'s renames), or
/// removes it. A missing `dir` is fine.
pub fn sweep_partials(dir: &std::path::Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.contains(".partial-") {
            std::fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
            furnace_hub::failpoint::hit("sweep.removed_partial");
        } else if let Some((live, _)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".old-")) {
            let target = dir.join(live);
            if target.exists() {
                std::fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
            } else {
                std::fs::rename(&path, &target).map_err(io_err("renaming into", &target))?;
                furnace_hub::failpoint::hit("sweep.restored_old");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_folder_never_overwrites_and_a_sweep_cleans_up_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("step-2");
        write_new_dir(&dir, "test", |tmp| std::fs::write(tmp.join("f"), "one").map_err(|e| Error::Input(e.to_string()))).unwrap();
        assert!(write_new_dir(&dir, "test", |tmp| std::fs::write(tmp.join("f"), "two").map_err(|e| Error::Input(e.to_string()))).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "one");
        // A kill while writing, and one between replace_dir's renames.
        std::fs::create_dir_all(d.path().join("step-4.partial-7")).unwrap();
        std::fs::create_dir_all(d.path().join(".adapter.old-7")).unwrap();
        std::fs::write(d.path().join(".adapter.old-7/f"), "old").unwrap();
        sweep_partials(d.path()).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["adapter", "step-2"]);
        assert_eq!(std::fs::read_to_string(d.path().join("adapter/f")).unwrap(), "old");
    }
}
