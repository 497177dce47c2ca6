#!/usr/bin/env python3
"""Builds the 1B-class benchmark model: TinyLlama-1.1B's llama shapes with random weights.

The model of issue 17's 1B targets (LoRA training, QLoRA memory, decode and prefill against
llama.cpp): a `LlamaForCausalLM` with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632,
22 layers, 32 attention heads, 4 key/value heads, RoPE theta 10000, RMSNorm eps 1e-5, untied
LM head) and seeded random weights drawn as transformers initialises them (normal, std 0.02;
norms at 1). Random weights make the speed and memory figures of a real 1.1B model without
downloading one; the outputs are of course meaningless.

The tokenizer is SmolLM2's byte-level BPE (extracted from the SmolLM2-135M-Instruct GGUF by
`furnace merge` without an adapter), so the vocabulary is 49152 entries where TinyLlama's
SentencePiece one has 32000: 1.17B parameters instead of 1.10B (embedding and LM head are
2 x 100.7M instead of 2 x 65.5M). A byte-level BPE vocabulary is what furnace's GGUF exporter
writes from an HF directory, and it keeps the model loadable by furnace, transformers and
llama.cpp alike.

Writes under --out (default target/bench-1b, never committed):
  hf/                    the HF directory (config.json, model.safetensors in --dtype, tokenizer)
  model.f16.gguf         furnace's GGUF export of hf/ with f16 weights (LoRA training base)
  model.q4_0.gguf        ... q4_0 (QLoRA base; decode/prefill against llama.cpp)
  model.q4_k_m.gguf      ... q4_k_m
and prints each file's size.

usage: python scripts/make_1b_model.py [--out DIR] [--furnace BIN] [--seed 0] [--dtype bf16|f32]
                                       [--quant f16 --quant q4_0 ...] [--tokenizer-from MODEL]
                                       [--skip-check] [--force]
Needs torch, transformers (>= 4.50) and safetensors; `furnace` is target/release/furnace (or
$CARGO_TARGET_DIR's) unless --furnace names it. About 2 minutes on 2 cores; peak RAM ~8 GB
(transformers builds the model in f32, furnace's exporter loads it in f32).
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# TinyLlama-1.1B's shapes (its config.json), with SmolLM2's vocabulary size.
SHAPES = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def find_furnace(given: str | None) -> str:
    if given:
        return given
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    for cand in [target / "release" / "furnace", REPO / "target" / "release" / "furnace"]:
        if cand.is_file():
            return str(cand)
    found = shutil.which("furnace")
    if found:
        return found
    sys.exit("no furnace binary: build it (cargo build --release -p furnace-cli) or pass --furnace")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def extract_tokenizer(furnace: str, source: str, work: Path) -> dict:
    """SmolLM2's tokenizer files, written by a plain `furnace merge` export of `source` (its
    GGUF's tokenizer metadata turned back into tokenizer.json); returns its config.json."""
    if work.exists():
        shutil.rmtree(work)
    run([furnace, "merge", "--base", source, "--format", "hf", "--dtype", "bf16", "--out", str(work)])
    return json.loads((work / "config.json").read_text())


def build_hf(out: Path, tok_dir: Path, tok_cfg: dict, seed: int, dtype: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tok_cfg["vocab_size"],
        bos_token_id=tok_cfg.get("bos_token_id"),
        eos_token_id=tok_cfg.get("eos_token_id"),
        pad_token_id=tok_cfg.get("pad_token_id"),
        **SHAPES,
    )
    torch.manual_seed(seed)
    t = time.time()
    # Built in f32 so the draws are transformers' own initialisation, then cast.
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.3f}B parameters in {time.time() - t:.0f} s (seed {seed})", flush=True)
    model = model.to(getattr(torch, {"bf16": "bfloat16", "f32": "float32"}[dtype]))
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")
    del model
    gc.collect()
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, out / f)
    return n_params


def check_hf(out: Path) -> None:
    """transformers loads the directory and its forward is finite; the tokenizer round-trips."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The furnace heats the 1B model.", return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "The furnace heats the 1B model.", "tokenizer round trip"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all(), "non-finite logits"
    print(f"transformers loads {out}: logits {tuple(logits.shape)}, std {logits.float().std():.3f}", flush=True)
    del model
    gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "target" / "bench-1b"))
    ap.add_argument("--furnace", default=None, help="the furnace binary (default: the release build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="safetensors dtype of hf/")
    ap.add_argument("--quant", action="append", choices=["f16", "q8_0", "q4_0", "q4_k_m"], help="GGUF files to write (repeat; default f16, q4_0, q4_k_m)")
    ap.add_argument("--tokenizer-from", default="smollm2-135m-instruct", help="furnace model whose tokenizer is used")
    ap.add_argument("--skip-check", action="store_true", help="do not load hf/ back with transformers")
    ap.add_argument("--force", action="store_true", help="rebuild files that exist")
    a = ap.parse_args()
    quants = a.quant or ["f16", "q4_0", "q4_k_m"]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    furnace = find_furnace(a.furnace)
    hf = out / "hf"

    if a.force or not (hf / "config.json").is_file():
        tok_dir = out / "tokenizer-src"
        tok_cfg = extract_tokenizer(furnace, a.tokenizer_from, tok_dir)
        build_hf(hf, tok_dir, tok_cfg, a.seed, a.dtype)
        shutil.rmtree(tok_dir)
    else:
        print(f"{hf} exists (pass --force to rebuild)")
    if not a.skip_check:
        check_hf(hf)

    files = [("hf/", dir_size(hf))]
    for q in quants:
        path = out / f"model.{q}.gguf"
        if a.force or not path.is_file():
            run([furnace, "merge", "--base", str(hf), "--format", "gguf", "--quant", q, "--out", str(path), "--force"])
        files.append((path.name, path.stat().st_size))
    print(f"\nmodel files under {out}:")
    for name, size in files:
        print(f"  {name:<20} {human(size):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
