//! The training pass: a hand-written forward and backward of the llama family over ragged
//! batches, for one or several LoRA adapters at once.
//!
//! - A batch is a list of sequences laid end to end (no padding): every op works on rows,
//!   attention runs per sequence, positions restart at 0 in each sequence. Sample packing
//!   and padding-free batching are the same thing here, and no sequence can see another.
//! - Each sequence names the adapter it trains. The frozen GEMMs run once over all rows of
//!   all adapters; each adapter adds its low-rank update on its own rows only
//!   ([`SeqRef::adapter`]). With one adapter this is plain LoRA training; with several it
//!   is fused multi-LoRA training.
//! - The forward keeps what the backward needs (per layer: the residual inputs, the
//!   normalisers, q/k/v after RoPE, the attention output and the log-sum-exp of each of its
//!   rows, the MLP gate and up activations, each adapter's `x A^T`); normalised inputs, the
//!   SwiGLU product and the attention probabilities are recomputed (the last tile by tile,
//!   see [`ops::attention_backward`]). Everything kept is a fixed number of values per
//!   token, so memory grows linearly with sequence length: on SmolLM2-135M (r = 16) about
//!   5,900 f32 per token and layer, 0.7 MB per token over its 30 layers. The loss is
//!   computed over the LM head in row chunks, so full `[tokens, vocab]` logits never exist,
//!   and only rows with a label are projected.
//! - The backward computes input gradients only through the frozen base (no weight
//!   gradients) and factor gradients for the adapters.

pub mod base;
pub mod ops;

pub use base::{FrozenBase, FrozenGroup, FrozenLayer};

use crate::error::{Error, Result};
use crate::lora::{TrainableLora, PROJ};
use ops::Heads;
use std::borrow::Cow;

/// Label value that contributes nothing to the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Rows of logits materialised at once by the loss.
const LOSS_ROWS: usize = 64;

/// One sequence of a batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqRef<'a> {
    /// Token ids.
    pub ids: &'a [u32],
    /// Labels per position ([`IGNORE_INDEX`] = no loss); position `t` is predicted from
    /// `t - 1`, as transformers shifts them.
    pub labels: &'a [i64],
    /// Index of the adapter this sequence trains (into the adapters of the call).
    pub adapter: usize,
    /// Weight of each of its token losses in the objective (e.g. 1 / the labelled tokens of
    /// the optimizer step, for a mean).
    pub loss_weight: f32,
}

/// One adapter taking part in a pass.
#[derive(Debug, Clone, Copy)]
pub struct AdapterRef<'a> {
    /// Its factors.
    pub lora: &'a TrainableLora,
    /// Seed of this pass's dropout masks (used only when its dropout is > 0 and training).
    pub dropout_seed: u64,
}

/// What a pass returns, per adapter.
#[derive(Debug, Clone)]
pub struct PassResult {
    /// Sum of token losses (unweighted).
    pub loss_sum: Vec<f64>,
    /// Labelled tokens.
    pub tokens: Vec<usize>,
    /// Gradients of the weighted objective (empty for evaluation).
    pub grads: Vec<TrainableLora>,
}

/// Per-phase wall time of a pass, printed to stderr when `FURNACE_TRACE` is set (a
/// profiling aid; costs one clock read per phase otherwise skipped).
struct Prof {
    on: bool,
    t: std::time::Instant,
    acc: Vec<(&'static str, f64)>,
}

impl Prof {
    fn new() -> Self {
        Self { on: std::env::var_os("FURNACE_TRACE").is_some(), t: std::time::Instant::now(), acc: Vec::new() }
    }

    fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        let dt = self.t.elapsed().as_secs_f64();
        self.t = std::time::Instant::now();
        match self.acc.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += dt,
            None => self.acc.push((name, dt)),
        }
    }

    fn report(&self) {
        if self.on {
            let total: f64 = self.acc.iter().map(|e| e.1).sum();
            let parts: Vec<String> = self.acc.iter().map(|(n, t)| format!("{n} {:.0}ms", t * 1e3)).collect();
            eprintln!("[trace] pass {:.0}ms: {}", total * 1e3, parts.join(", "));
        }
    }
}

/// A contiguous run of rows trained by one adapter.
#[derive(Debug, Clone, Copy)]
struct Seg {
    adapter: usize,
    r0: usize,
    r1: usize,
}

/// What the backward of one layer needs.
struct LayerTape {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Log-sum-exp of each attention row, `[heads, rows]` (the probabilities are
    /// recomputed from it in tiles by the backward).
    lse: Vec<f32>,
    attn: Vec<f32>,
    x2: Vec<f32>,
    rstd2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    /// Per projection, per segment: `x A^T` of the adapter (None where not adapted).
    p: Vec<Vec<Option<Vec<f32>>>>,
}

/// Layout of a batch.
struct Layout {
    rows: usize,
    spans: Vec<(usize, usize)>,
    pos: Vec<usize>,
    segs: Vec<Seg>,
    max_len: usize,
}

fn layout(base: &FrozenBase, adapters: &[AdapterRef], seqs: &[SeqRef]) -> Result<Layout> {
    let c = &base.config;
    for a in adapters {
        check_adapter(base, a.lora)?;
    }
    let (mut spans, mut pos, mut segs) = (Vec::new(), Vec::new(), Vec::<Seg>::new());
    let mut rows = 0;
    for (i, s) in seqs.iter().enumerate() {
        let n = s.ids.len();
        if n == 0 {
            return Err(Error::Input(format!("sequence {i} is empty")));
        }
        if n > c.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence {i} has {n} tokens, more than the model's context of {}",
                c.max_position_embeddings
            )));
        }
        if s.labels.len() != n {
            return Err(Error::Input(format!("sequence {i}: {} labels for {n} tokens", s.labels.len())));
        }
        if let Some(&t) = s.ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Input(format!("sequence {i}: token id {t} is outside the vocabulary of {}", c.vocab_size)));
        }
        if let Some(&l) = s.labels.iter().find(|&&l| l != IGNORE_INDEX && !(0..c.vocab_size as i64).contains(&l)) {
            return Err(Error::Input(format!("sequence {i}: label {l} is outside the vocabulary of {}", c.vocab_size)));
        }
        if adapters.is_empty() {
            // The base model alone.
            spans.push((rows, n));
            pos.extend(0..n);
            rows += n;
            continue;
        }
        if s.adapter >= adapters.len() {
            return Err(Error::Input(format!("sequence {i} names adapter {} of {}", s.adapter, adapters.len())));
        }
        spans.push((rows, n));
        pos.extend(0..n);
        match segs.last_mut() {
            Some(g) if g.adapter == s.adapter => g.r1 += n,
            _ => segs.push(Seg { adapter: s.adapter, r0: rows, r1: rows + n }),
        }
        rows += n;
    }
    let max_len = spans.iter().map(|s| s.1).max().unwrap_or(0);
    Ok(Layout { rows, spans, pos, segs, max_len })
}

/// Checks that an adapter's factors fit the base's projections.
pub fn check_adapter(base: &FrozenBase, lora: &TrainableLora) -> Result<()> {
    if lora.layers.len() != base.layers.len() {
        return Err(Error::Input(format!("the adapter has {} layers, the model {}", lora.layers.len(), base.layers.len())));
    }
    for (li, (pairs, layer)) in lora.layers.iter().zip(&base.layers).enumerate() {
        let dims = [
            (layer.qkv.inp, layer.qkv.outs[0]),
            (layer.qkv.inp, layer.qkv.outs[1]),
            (layer.qkv.inp, layer.qkv.outs[2]),
            (layer.o.inp, layer.o.outs[0]),
            (layer.gate_up.inp, layer.gate_up.outs[0]),
            (layer.gate_up.inp, layer.gate_up.outs[1]),
            (layer.down.inp, layer.down.outs[0]),
        ];
        for (pi, p) in pairs.iter().enumerate() {
            if let Some(p) = p {
                if (p.inp, p.out) != dims[pi] || p.a.len() != p.r * p.inp || p.b.len() != p.out * p.r {
                    return Err(Error::Input(format!(
                        "layer {li} {}: factors of a {}x{} projection, the model's is {}x{}",
                        furnace_model::lora::TARGETS[pi],
                        p.out,
                        p.inp,
                        dims[pi].1,
                        dims[pi].0
                    )));
                }
            }
        }
    }
    Ok(())
}

/// splitmix64.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout on rows of width `w` (counted from 0): each element is kept with probability
/// `1 - p` and scaled by `1 / (1 - p)`. The mask is a pure function of (seed, row, column),
/// so the backward regenerates it instead of storing it.
fn dropout(z: &[f32], w: usize, p: f32, seed: u64) -> Vec<f32> {
    let keep_scale = 1.0 / (1.0 - p);
    let threshold = (p * 65536.0) as u64;
    let mut out = z.to_vec();
    for (i, row) in out.chunks_mut(w).enumerate() {
        let rs = mix(seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        for (c4, vals) in row.chunks_mut(4).enumerate() {
            let h = mix(rs ^ c4 as u64);
            for (j, v) in vals.iter_mut().enumerate() {
                let u = (h >> (16 * j)) & 0xFFFF;
                *v = if u < threshold { 0.0 } else { *v * keep_scale };
            }
        }
    }
    out
}

fn dropout_seed(seed: u64, li: usize, pi: usize) -> u64 {
    mix(seed ^ mix((li * PROJ + pi) as u64 + 1))
}

/// Inputs of one LoRA application.
struct LoraSite<'a> {
    li: usize,
    pi: usize,
    z: &'a [f32],
    inp: usize,
    out: usize,
}

/// The LoRA site of projection `pi` (in [`furnace_model::lora::TARGETS`] order) of layer `li`.
fn site<'a>(c: &furnace_model::LlamaConfig, li: usize, pi: usize, z: &'a [f32]) -> LoraSite<'a> {
    let (h, qd, kvd, inter) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let (inp, out) = match pi {
        0 => (h, qd),
        1 | 2 => (h, kvd),
        3 => (qd, h),
        4 | 5 => (h, inter),
        _ => (inter, h),
    };
    LoraSite { li, pi, z, inp, out }
}

fn dropped<'a>(site: &LoraSite<'a>, seg: &Seg, a: &AdapterRef, train: bool) -> Cow<'a, [f32]> {
    let zs = &site.z[seg.r0 * site.inp..seg.r1 * site.inp];
    let p = a.lora.config.lora_dropout as f32;
    if train && p > 0.0 {
        // Rows are counted from the segment start, so an adapter gets the same masks in a
        // fused pass as alone.
        Cow::Owned(dropout(zs, site.inp, p, dropout_seed(a.dropout_seed, site.li, site.pi)))
    } else {
        Cow::Borrowed(zs)
    }
}

/// Adds each adapter's `scale * drop(z) A^T B^T` to its rows of `y`; returns `drop(z) A^T`
/// per segment.
fn lora_forward(adapters: &[AdapterRef], segs: &[Seg], site: &LoraSite, y: &mut [f32], train: bool) -> Result<Vec<Option<Vec<f32>>>> {
    let mut saved = Vec::with_capacity(segs.len());
    for seg in segs {
        let a = &adapters[seg.adapter];
        let Some(pair) = &a.lora.layers[site.li][site.pi] else {
            saved.push(None);
            continue;
        };
        let zd = dropped(site, seg, a, train);
        let p = ops::lora_down(&zd, site.inp, &pair.a, pair.r);
        ops::lora_up_add(&mut y[seg.r0 * site.out..seg.r1 * site.out], site.out, &p, pair.r, &pair.b, a.lora.scale);
        saved.push(Some(p));
    }
    Ok(saved)
}

/// Backward of [`lora_forward`]: factor gradients into `grads`, input gradient added to `dz`.
fn lora_backward(
    adapters: &[AdapterRef],
    segs: &[Seg],
    site: &LoraSite,
    dy: &[f32],
    saved: &[Option<Vec<f32>>],
    grads: &mut [TrainableLora],
    dz: &mut [f32],
) -> Result<()> {
    for (seg, p) in segs.iter().zip(saved) {
        let Some(p) = p else { continue };
        let a = &adapters[seg.adapter];
        let Some(pair) = &a.lora.layers[site.li][site.pi] else { continue };
        let dys = &dy[seg.r0 * site.out..seg.r1 * site.out];
        let zd = dropped(site, seg, a, true);
        let (da, db, mut dzd) = ops::lora_backward(&zd, site.inp, &pair.a, pair.r, &pair.b, site.out, a.lora.scale, p, dys);
        let drop = a.lora.config.lora_dropout as f32;
        if drop > 0.0 {
            // The mask again (same seed): 1/(1-p) where kept, 0 where dropped.
            let ones = vec![1f32; dzd.len()];
            let mask = dropout(&ones, site.inp, drop, dropout_seed(a.dropout_seed, site.li, site.pi));
            dzd.iter_mut().zip(&mask).for_each(|(v, m)| *v *= m);
        }
        dz[seg.r0 * site.inp..seg.r1 * site.inp].iter_mut().zip(&dzd).for_each(|(o, v)| *o += v);
        if let Some(g) = &mut grads[seg.adapter].layers[site.li][site.pi] {
            g.a.iter_mut().zip(&da).for_each(|(o, v)| *o += v);
            g.b.iter_mut().zip(&db).for_each(|(o, v)| *o += v);
        }
    }
    Ok(())
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
}

/// The residual stream after all layers, and the tapes when training.
fn forward_layers(
    base: &FrozenBase,
    adapters: &[AdapterRef],
    seqs: &[SeqRef],
    lay: &Layout,
    train: bool,
    prof: &mut Prof,
) -> Result<(Vec<f32>, Vec<LayerTape>)> {
    let c = &base.config;
    let t = lay.rows;
    let heads = Heads { q: c.num_heads, kv: c.num_kv_heads, dim: c.head_dim };
    let eps = c.rms_norm_eps as f32;
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
    let idx = candle_core::Tensor::from_vec(ids, t, &candle_core::Device::Cpu)?;
    let mut x: Vec<f32> = base.embed.index_select(&idx, 0)?.flatten_all()?.to_vec1()?;
    let tables = ops::rope_tables(&base.inv_freq, lay.max_len);
    let mut tapes = Vec::new();
    let segs = &lay.segs;
    for (li, layer) in base.layers.iter().enumerate() {
        prof.lap("f.other");
        let (h1, rstd1) = ops::rms_norm(&x, &layer.ln1, eps);
        prof.lap("f.norm");
        let mut qkv = layer.qkv.forward(&h1, t)?;
        prof.lap("f.gemm");
        let mut v = qkv.pop().unwrap_or_default();
        let mut k = qkv.pop().unwrap_or_default();
        let mut q = qkv.pop().unwrap_or_default();
        let pq = lora_forward(adapters, segs, &site(c, li, 0, &h1), &mut q, train)?;
        let pk = lora_forward(adapters, segs, &site(c, li, 1, &h1), &mut k, train)?;
        let pv = lora_forward(adapters, segs, &site(c, li, 2, &h1), &mut v, train)?;
        prof.lap("f.lora");
        drop(h1);
        ops::rope(&mut q, &lay.pos, heads.dim, &tables, false);
        ops::rope(&mut k, &lay.pos, heads.dim, &tables, false);
        prof.lap("f.rope");
        let (attn, lse) = ops::attention(&q, &k, &v, &lay.spans, heads);
        prof.lap("f.attn");
        let mut o = layer.o.forward(&attn, t)?.pop().unwrap_or_default();
        prof.lap("f.gemm");
        let po = lora_forward(adapters, segs, &site(c, li, 3, &attn), &mut o, train)?;
        prof.lap("f.lora");
        let mut x2 = o;
        add_into(&mut x2, &x);
        let (h2, rstd2) = ops::rms_norm(&x2, &layer.ln2, eps);
        prof.lap("f.norm");
        let mut gu = layer.gate_up.forward(&h2, t)?;
        prof.lap("f.gemm");
        let mut u = gu.pop().unwrap_or_default();
        let mut g = gu.pop().unwrap_or_default();
        let pg = lora_forward(adapters, segs, &site(c, li, 4, &h2), &mut g, train)?;
        let pu = lora_forward(adapters, segs, &site(c, li, 5, &h2), &mut u, train)?;
        prof.lap("f.lora");
        drop(h2);
        let a = ops::swiglu(&g, &u);
        prof.lap("f.swiglu");
        let mut d = layer.down.forward(&a, t)?.pop().unwrap_or_default();
        prof.lap("f.gemm");
        let pd = lora_forward(adapters, segs, &site(c, li, 6, &a), &mut d, train)?;
        prof.lap("f.lora");
        add_into(&mut d, &x2);
        let x3 = d;
        if train {
            tapes.push(LayerTape { x, rstd1, q, k, v, lse, attn, x2, rstd2, g, u, p: vec![pq, pk, pv, po, pg, pu, pd] });
        }
        x = x3;
    }
    Ok((x, tapes))
}

/// Rows with a label: `(row, target, weight, adapter)`.
fn loss_rows(seqs: &[SeqRef], lay: &Layout) -> Vec<(usize, u32, f32, usize)> {
    let mut out = Vec::new();
    for (s, &(start, _)) in seqs.iter().zip(&lay.spans) {
        for (t, &l) in s.labels.iter().enumerate().skip(1) {
            if l != IGNORE_INDEX {
                out.push((start + t - 1, l as u32, s.loss_weight, s.adapter));
            }
        }
    }
    out
}

/// Runs the LM head and the cross-entropy over the labelled rows of `hf`, in chunks;
/// returns per-adapter loss sums and counts, and with `train` the gradient for `hf`.
fn head_loss(
    base: &FrozenBase,
    hf: &[f32],
    rows: &[(usize, u32, f32, usize)],
    n_adapters: usize,
    train: bool,
) -> Result<(Vec<f64>, Vec<usize>, Vec<f32>)> {
    let h = base.config.hidden_size;
    let mut loss = vec![0f64; n_adapters];
    let mut count = vec![0usize; n_adapters];
    let mut dhf = if train { vec![0f32; hf.len()] } else { Vec::new() };
    for chunk in rows.chunks(LOSS_ROWS) {
        let (losses, dh) = head_chunk(base, hf, chunk, false, train)?;
        for (l, c) in losses.iter().zip(chunk) {
            loss[c.3] += l;
            count[c.3] += 1;
        }
        for (i, &(r, ..)) in chunk.iter().enumerate().filter(|_| train) {
            add_into(&mut dhf[r * h..(r + 1) * h], &dh[i * h..(i + 1) * h]);
        }
    }
    Ok((loss, count, dhf))
}

/// The LM head and cross-entropy over one chunk of labelled rows: each row's loss and, with
/// `train`, the gradient for its hidden state (`[rows, hidden]`) of its weighted loss (each
/// row's weight, or 1 with `unit`).
fn head_chunk(base: &FrozenBase, hf: &[f32], chunk: &[(usize, u32, f32, usize)], unit: bool, train: bool) -> Result<(Vec<f64>, Vec<f32>)> {
    let h = base.config.hidden_size;
    let m = chunk.len();
    let mut hc = Vec::with_capacity(m * h);
    for &(r, ..) in chunk {
        hc.extend_from_slice(&hf[r * h..(r + 1) * h]);
    }
    let mut logits = base.lm_head.forward(&hc, m)?.pop().unwrap_or_default();
    let targets: Vec<u32> = chunk.iter().map(|c| c.1).collect();
    let weights: Vec<f32> = chunk.iter().map(|c| if unit { 1.0 } else { c.2 }).collect();
    let losses = ops::cross_entropy(&mut logits, base.config.vocab_size, &targets, &weights, train);
    let dh = if train { base.lm_head.backward(&[&logits], m)? } else { Vec::new() };
    Ok((losses, dh))
}

/// Forward and backward of a batch: each adapter's loss and the gradients of
/// `sum over labelled tokens of loss_weight * loss` with respect to its factors.
pub fn train_pass(base: &FrozenBase, adapters: &[AdapterRef], seqs: &[SeqRef]) -> Result<PassResult> {
    let lay = layout(base, adapters, seqs)?;
    let eps = base.config.rms_norm_eps as f32;
    let mut prof = Prof::new();
    let (x, tapes) = forward_layers(base, adapters, seqs, &lay, true, &mut prof)?;
    prof.lap("f.other");
    let (hf, rstdf) = ops::rms_norm(&x, &base.norm, eps);
    let rows = loss_rows(seqs, &lay);
    let (loss_sum, tokens, dhf) = head_loss(base, &hf, &rows, adapters.len(), true)?;
    prof.lap("head+loss");
    drop(hf);
    let grads = backward_layers(base, adapters, &lay, x, tapes, &rstdf, &dhf, &mut prof)?;
    Ok(PassResult { loss_sum, tokens, grads })
}

/// The labelled tokens' log-probabilities of each sequence of a pass, in position order
/// (the tokens whose label is not [`IGNORE_INDEX`], position 0 excluded).
pub type SeqLogps = Vec<Vec<f32>>;

/// Runs the LM head over the labelled rows: each row's log-probability of its target and,
/// with `train`, `d(-logp)/dh` per row (`[rows, hidden]`, in `rows` order).
fn head_logps(base: &FrozenBase, hf: &[f32], rows: &[(usize, u32, f32, usize)], train: bool) -> Result<(Vec<f32>, Vec<f32>)> {
    let h = base.config.hidden_size;
    let mut logps = Vec::with_capacity(rows.len());
    let mut g = if train { Vec::with_capacity(rows.len() * h) } else { Vec::new() };
    for chunk in rows.chunks(LOSS_ROWS) {
        let (losses, dh) = head_chunk(base, hf, chunk, true, train)?;
        logps.extend(losses.iter().map(|&l| -l as f32));
        g.extend(dh);
    }
    Ok((logps, g))
}

/// Splits per-row values (in [`loss_rows`] order) into one vector per sequence.
fn per_seq(seqs: &[SeqRef], flat: &[f32]) -> SeqLogps {
    let mut out = Vec::with_capacity(seqs.len());
    let mut at = 0;
    for s in seqs {
        let n = s.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    out
}

/// Forward only (no dropout): the labelled tokens' log-probabilities of each sequence
/// under its adapter (or under the base model alone when `adapters` is empty).
pub fn token_logps(base: &FrozenBase, adapters: &[AdapterRef], seqs: &[SeqRef]) -> Result<SeqLogps> {
    let (lay, hf) = forward_eval(base, adapters, seqs)?;
    let rows = loss_rows(seqs, &lay);
    let (logps, _) = head_logps(base, &hf, &rows, false)?;
    Ok(per_seq(seqs, &logps))
}

/// Forward and backward of a batch for any objective `L` of the labelled tokens'
/// log-probabilities (DPO, GRPO): the forward computes them (with each adapter's dropout
/// when training), `objective` turns them into `dL/dlogp` for every one of them (same
/// shapes), and the backward returns each adapter's factor gradients of `L`. The LM head
/// runs once: `d(-logp)/dh` of every labelled row is kept from the forward (a hidden-size
/// vector per row) and scaled by `-dL/dlogp`. The sequences' `loss_weight` is not used.
pub fn objective_pass(
    base: &FrozenBase,
    adapters: &[AdapterRef],
    seqs: &[SeqRef],
    objective: &mut dyn FnMut(&SeqLogps) -> Result<SeqLogps>,
) -> Result<Vec<TrainableLora>> {
    let lay = layout(base, adapters, seqs)?;
    let c = &base.config;
    let (h, eps) = (c.hidden_size, c.rms_norm_eps as f32);
    let mut prof = Prof::new();
    let (x, tapes) = forward_layers(base, adapters, seqs, &lay, true, &mut prof)?;
    prof.lap("f.other");
    let (hf, rstdf) = ops::rms_norm(&x, &base.norm, eps);
    let rows = loss_rows(seqs, &lay);
    let (logps, g) = head_logps(base, &hf, &rows, true)?;
    drop(hf);
    let coefs = objective(&per_seq(seqs, &logps))?;
    if coefs.len() != seqs.len()
        || coefs.iter().zip(seqs).any(|(c, s)| c.len() != s.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
    {
        return Err(Error::Input("internal: the objective's gradients do not match its log-probabilities".into()));
    }
    let mut dhf = vec![0f32; x.len()];
    for (i, (&(r, ..), &coef)) in rows.iter().zip(coefs.iter().flatten()).enumerate() {
        dhf[r * h..(r + 1) * h].iter_mut().zip(&g[i * h..(i + 1) * h]).for_each(|(o, v)| *o -= coef * v);
    }
    drop(g);
    prof.lap("head+loss");
    backward_layers(base, adapters, &lay, x, tapes, &rstdf, &dhf, &mut prof)
}

/// The backward through the final norm and every layer, from `dhf` (the gradient of the
/// final normalised hidden states): each adapter's factor gradients.
#[allow(clippy::too_many_arguments)]
fn backward_layers(
    base: &FrozenBase,
    adapters: &[AdapterRef],
    lay: &Layout,
    x: Vec<f32>,
    mut tapes: Vec<LayerTape>,
    rstdf: &[f32],
    dhf: &[f32],
    prof: &mut Prof,
) -> Result<Vec<TrainableLora>> {
    let c = &base.config;
    let t = lay.rows;
    let heads = Heads { q: c.num_heads, kv: c.num_kv_heads, dim: c.head_dim };
    let mut grads: Vec<TrainableLora> = adapters.iter().map(|a| a.lora.zeros_like()).collect();
    let mut dx = vec![0f32; x.len()];
    ops::rms_norm_backward(&x, &base.norm, rstdf, dhf, &mut dx);
    drop(x);
    let tables = ops::rope_tables(&base.inv_freq, lay.max_len);
    let segs = &lay.segs;
    for (li, layer) in base.layers.iter().enumerate().rev() {
        let Some(tp) = tapes.pop() else {
            return Err(Error::Input("internal: missing layer tape".into()));
        };
        // MLP.
        prof.lap("b.other");
        let a = ops::swiglu(&tp.g, &tp.u);
        prof.lap("b.swiglu");
        let mut da = layer.down.backward(&[&dx], t)?;
        prof.lap("b.gemm");
        lora_backward(adapters, segs, &site(c, li, 6, &a), &dx, &tp.p[6], &mut grads, &mut da)?;
        prof.lap("b.lora");
        drop(a);
        let (dg, du) = ops::swiglu_backward(&tp.g, &tp.u, &da);
        drop(da);
        prof.lap("b.swiglu");
        let h2 = ops::rms_norm_apply(&tp.x2, &layer.ln2, &tp.rstd2);
        prof.lap("b.norm");
        let mut dh2 = layer.gate_up.backward(&[&dg, &du], t)?;
        prof.lap("b.gemm");
        lora_backward(adapters, segs, &site(c, li, 4, &h2), &dg, &tp.p[4], &mut grads, &mut dh2)?;
        lora_backward(adapters, segs, &site(c, li, 5, &h2), &du, &tp.p[5], &mut grads, &mut dh2)?;
        prof.lap("b.lora");
        drop((h2, dg, du));
        let mut dx2 = dx;
        ops::rms_norm_backward(&tp.x2, &layer.ln2, &tp.rstd2, &dh2, &mut dx2);
        drop(dh2);
        prof.lap("b.norm");
        // Attention.
        let mut dattn = layer.o.backward(&[&dx2], t)?;
        prof.lap("b.gemm");
        lora_backward(adapters, segs, &site(c, li, 3, &tp.attn), &dx2, &tp.p[3], &mut grads, &mut dattn)?;
        prof.lap("b.lora");
        let (mut dq, mut dk, dv) = ops::attention_backward(&tp.q, &tp.k, &tp.v, &tp.attn, &tp.lse, &dattn, &lay.spans, heads);
        drop(dattn);
        prof.lap("b.attn");
        ops::rope(&mut dq, &lay.pos, heads.dim, &tables, true);
        ops::rope(&mut dk, &lay.pos, heads.dim, &tables, true);
        let h1 = ops::rms_norm_apply(&tp.x, &layer.ln1, &tp.rstd1);
        prof.lap("b.norm");
        let mut dh1 = layer.qkv.backward(&[&dq, &dk, &dv], t)?;
        prof.lap("b.gemm");
        lora_backward(adapters, segs, &site(c, li, 0, &h1), &dq, &tp.p[0], &mut grads, &mut dh1)?;
        lora_backward(adapters, segs, &site(c, li, 1, &h1), &dk, &tp.p[1], &mut grads, &mut dh1)?;
        lora_backward(adapters, segs, &site(c, li, 2, &h1), &dv, &tp.p[2], &mut grads, &mut dh1)?;
        prof.lap("b.lora");
        drop(h1);
        dx = dx2;
        ops::rms_norm_backward(&tp.x, &layer.ln1, &tp.rstd1, &dh1, &mut dx);
        prof.lap("b.norm");
        drop(tp);
    }
    prof.lap("b.other");
    prof.report();
    Ok(grads)
}

/// Forward without gradients: the layout and the final normalised hidden states.
fn forward_eval(base: &FrozenBase, adapters: &[AdapterRef], seqs: &[SeqRef]) -> Result<(Layout, Vec<f32>)> {
    let lay = layout(base, adapters, seqs)?;
    let (x, _) = forward_layers(base, adapters, seqs, &lay, false, &mut Prof::new())?;
    let (hf, _) = ops::rms_norm(&x, &base.norm, base.config.rms_norm_eps as f32);
    Ok((lay, hf))
}

/// Forward only (no dropout, nothing kept): each adapter's loss sum and labelled tokens.
/// With no adapters it evaluates the base model, reported as one entry.
pub fn eval_pass(base: &FrozenBase, adapters: &[AdapterRef], seqs: &[SeqRef]) -> Result<PassResult> {
    let (lay, hf) = forward_eval(base, adapters, seqs)?;
    let mut rows = loss_rows(seqs, &lay);
    if adapters.is_empty() {
        rows.iter_mut().for_each(|r| r.3 = 0);
    }
    let (loss_sum, tokens, _) = head_loss(base, &hf, &rows, adapters.len().max(1), false)?;
    Ok(PassResult { loss_sum, tokens, grads: Vec::new() })
}

/// Logits `[ids.len(), vocab]` of one sequence through the training forward (for tests and
/// checks against the runtime).
pub fn logits(base: &FrozenBase, lora: Option<&TrainableLora>, ids: &[u32]) -> Result<Vec<f32>> {
    let labels = vec![IGNORE_INDEX; ids.len()];
    let seqs = [SeqRef { ids, labels: &labels, adapter: 0, loss_weight: 0.0 }];
    let adapters: Vec<AdapterRef> = lora.map(|lora| AdapterRef { lora, dropout_seed: 0 }).into_iter().collect();
    let (_, hf) = forward_eval(base, &adapters, &seqs)?;
    Ok(base.lm_head.forward(&hf, ids.len())?.pop().unwrap_or_default())
}
