#!/usr/bin/env python3
"""Reference fixtures and checks for `furnace merge` (PEFT's merge_and_unload).

Two modes:

  make_merge_fixtures.py
      PEFT merge_and_unload() of testdata/tiny-llama + testdata/tiny-llama-pref-lora in f32;
      writes the merged weights of every targeted projection to
      testdata/merge_tiny_llama_pref.safetensors (what the Rust tests compare with).

  make_merge_fixtures.py --check DIR [--base DIR | --gguf-base FILE] [--adapter DIR]
      Loads a furnace-merged HF directory DIR with transformers (AutoModelForCausalLM +
      AutoTokenizer), builds PEFT's merged model of the same base and adapter (a GGUF base is
      loaded by transformers with gguf_file=, dequantized), and compares logits (max abs diff
      must be <= --tol, default 1e-4) and tokenizer ids on a few strings, the chat template
      included. Exits non-zero on a mismatch.

Run with the torch environment's python, from the repository root.
"""

import argparse
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "testdata")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs   of spaces",
    "tabs\tand\nnewlines\n\n",
    "Ünïcödé façade naïve café 日本語",
    "<|im_start|>user\nHi<|im_end|>",
    "The quick brown fox jumps over the lazy dog 1234567",
]
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def load_base(base, gguf_base):
    if gguf_base:
        d, f = os.path.split(os.path.abspath(gguf_base))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        return model, tok
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), AutoTokenizer.from_pretrained(base)


def peft_merged(base, gguf_base, adapter, probe=None):
    """PEFT's merged model and the base's tokenizer; with `probe` (a function of the model
    and tokenizer), also what it returns on the base before the merge."""
    model, tok = load_base(base, gguf_base)
    model.eval()
    before = probe(model, tok) if probe else None
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    return model, tok, before


def make_fixtures():
    base = os.path.join(TESTDATA, "tiny-llama")
    adapter = os.path.join(TESTDATA, "tiny-llama-pref-lora")
    model, _, _ = peft_merged(base, None, adapter)
    sd = model.state_dict()
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items() if any(f".{t}." in k for t in TARGETS)}
    path = os.path.join(TESTDATA, "merge_tiny_llama_pref.safetensors")
    save_file(out, path, metadata={"format": "pt", "source": "peft merge_and_unload of testdata/tiny-llama + testdata/tiny-llama-pref-lora, f32"})
    print(f"wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def check(args):
    ok = True

    def prompt_ids(tok):
        prompts = TEXTS + [tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)]
        return [tok(text, return_tensors="pt").input_ids for text in prompts]

    def logits(model, tok):
        with torch.no_grad():
            return [model(ids).logits for ids in prompt_ids(tok)]

    ref, ref_tok, base_logits = peft_merged(args.base, args.gguf_base, args.adapter, probe=logits)
    got = AutoModelForCausalLM.from_pretrained(args.check, dtype=torch.float32)
    got.eval()
    got_tok = AutoTokenizer.from_pretrained(args.check)

    # Logits on real text (ids from the reference tokenizer) and on a chat.
    ref_logits = logits(ref, ref_tok)
    got_logits = logits(got, ref_tok)
    worst = max((a - b).abs().max().item() for a, b in zip(ref_logits, got_logits))
    effect = max((a - b).abs().max().item() for a, b in zip(ref_logits, base_logits))
    print(f"max abs logit diff vs PEFT merge_and_unload: {worst:.3e} (tol {args.tol:g}); the adapter itself moves logits by up to {effect:.3e}")
    if worst > args.tol:
        ok = False

    # Tokenizer ids: plain encoding, and the chat template rendered and encoded.
    mismatches = 0
    for text in TEXTS:
        a = ref_tok(text).input_ids
        b = got_tok(text).input_ids
        if a != b:
            mismatches += 1
            print(f"token ids differ on {text!r}:\n  ref {a}\n  got {b}")
    for gen in (False, True):
        a = ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        b = got_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        if a != b:
            mismatches += 1
            print(f"chat template renders differ (add_generation_prompt={gen}):\n  ref {a!r}\n  got {b!r}")
        elif ref_tok(a).input_ids != got_tok(b).input_ids:
            mismatches += 1
            print("chat template token ids differ")
    for attr in ("bos_token_id", "eos_token_id"):
        if getattr(ref_tok, attr) != getattr(got_tok, attr):
            print(f"note: tokenizer {attr}: ref {getattr(ref_tok, attr)} got {getattr(got_tok, attr)}")
    print(f"tokenizer: {len(TEXTS)} strings + chat template, {mismatches} mismatches")
    if mismatches:
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", metavar="DIR", help="a furnace-merged HF directory to check")
    p.add_argument("--base", default=os.path.join(TESTDATA, "tiny-llama"), help="HF base directory (default testdata/tiny-llama)")
    p.add_argument("--gguf-base", metavar="FILE", help="a GGUF base instead of --base")
    p.add_argument("--adapter", default=None, help="PEFT adapter (default: tiny-llama-pref-lora, or lora_adapter with --gguf-base)")
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()
    if args.adapter is None:
        args.adapter = os.path.join(TESTDATA, "lora_adapter" if args.gguf_base else "tiny-llama-pref-lora")
    if args.check:
        sys.exit(check(args))
    make_fixtures()


if __name__ == "__main__":
    main()
