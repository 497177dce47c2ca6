#!/usr/bin/env python3
"""Reference fixtures and checks for combining LoRA adapters (PEFT's add_weighted_adapter).

Two modes:

  make_combine_fixtures.py
      Builds three small random LoRA adapters on testdata/tiny-llama (fixed seeds, nonzero B):
        a: r=4, alpha=8,  all seven projections
        b: r=4, alpha=16, all seven projections
        c: r=8, alpha=8,  q/v/o/gate only (a different rank and fewer targets)
      saved as PEFT adapter directories testdata/combine/adapter_{a,b,c}; then runs PEFT's
      add_weighted_adapter for every case of CASES and writes
        testdata/combine/cases.json          each case: adapters, weights, method, options and
                                             PEFT's resulting r / lora_alpha / target_modules
        testdata/combine/expected.safetensors  "<case>/<PEFT key>": the combined factors of
                                             layer 0 (layer 1 is covered by --check; this
                                             keeps the fixtures small)
        testdata/combine/masks.safetensors     "<case>/<module>.<part>.<adapter index>": the
                                             Bernoulli keep-masks torch drew for DARE (uint8,
                                             np.packbits, MSB first; "<key>#len" holds the length)
      torch.bernoulli cannot be reproduced outside torch, so the masks are recorded by wrapping
      peft.utils.merge_utils.random_pruning while PEFT runs.

  make_combine_fixtures.py --check DIR
      DIR holds furnace-combined adapters, one sub-directory per case (the Rust test
      `combine::every_method_matches_peft` writes them when FURNACE_COMBINE_CHECK_DIR is set). Each is
      loaded with PEFT on tiny-llama and its logits compared with PEFT's own combination
      (same torch seed, hence the same DARE masks). Exits non-zero when a max abs diff exceeds
      --tol (default 1e-4). Cases with svd_clamp are reported but not compared: the clamp's
      quantile depends on singular-vector signs, which LAPACK and furnace choose differently.

Run with the torch environment's python, from the repository root.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from peft.utils.save_and_load import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "testdata")
BASE = os.path.join(TESTDATA, "tiny-llama")
OUT = os.path.join(TESTDATA, "combine")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = {
    "a": dict(r=4, alpha=8, targets=ALL, seed=1),
    "b": dict(r=4, alpha=16, targets=ALL, seed=2),
    "c": dict(r=8, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj"], seed=3),
}


def case(name, adapters, weights, method, density=None, svd_rank=None, svd_clamp=None, sign="total"):
    return dict(
        name=name, adapters=adapters, weights=weights, method=method, density=density,
        svd_rank=svd_rank, svd_clamp=svd_clamp, majority_sign_method=sign,
    )


AB, W = ["a", "b"], [0.7, 0.3]
CASES = [
    case("linear", AB, W, "linear"),
    case("linear_negative", AB, [1.0, -0.5], "linear"),
    case("cat", AB, W, "cat"),
    case("ties", AB, W, "ties", density=0.5),
    case("ties_frequency", AB, W, "ties", density=0.5, sign="frequency"),
    case("ties_negative", AB, [0.8, -0.6], "ties", density=0.3),
    case("dare_linear", AB, W, "dare_linear", density=0.5),
    case("dare_ties", AB, W, "dare_ties", density=0.5),
    case("dare_ties_frequency", AB, W, "dare_ties", density=0.7, sign="frequency"),
    case("magnitude_prune", AB, W, "magnitude_prune", density=0.5),
    case("svd", AB, W, "svd"),
    case("ties_svd", AB, W, "ties_svd", density=0.5),
    case("dare_linear_svd", AB, W, "dare_linear_svd", density=0.5),
    case("magnitude_prune_svd", AB, W, "magnitude_prune_svd", density=0.5),
    case("cat_ranks", ["a", "c"], W, "cat"),
    case("svd_ranks", ["a", "c"], W, "svd"),
    case("svd_rank6_clamp", ["a", "c"], W, "svd", svd_rank=6, svd_clamp=0.9),
    case("cat_three", ["a", "b", "c"], [0.5, 0.3, 0.2], "cat"),
    case("svd_three", ["a", "b", "c"], [0.5, 0.3, -0.2], "svd", svd_rank=12),
    case("single", ["c"], [0.6], "svd"),
]

PROMPTS = ["Hello, world! The quick brown fox", "def add(a, b):\n    return a + b"]


def make_adapters(base_model):
    """Random factors (both nonzero) under a fixed seed, saved with PEFT."""
    for name, spec in ADAPTERS.items():
        base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"], lora_dropout=0.0,
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for mod_name, mod in model.named_modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    a = mod.lora_A["default"].weight
                    b = mod.lora_B["default"].weight
                    a.copy_(torch.randn(a.shape, generator=g) * 0.2)
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        d = os.path.join(OUT, f"adapter_{name}")
        model.save_pretrained(d)
        if os.path.exists(os.path.join(d, "README.md")):
            os.remove(os.path.join(d, "README.md"))
        # A path relative to the repository (never this machine's).
        cfg_path = os.path.join(d, "adapter_config.json")
        with open(cfg_path) as f:
            c = json.load(f)
        c["base_model_name_or_path"] = "testdata/tiny-llama"
        with open(cfg_path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")


def load_all():
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(base, os.path.join(OUT, f"adapter_{names[0]}"), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(os.path.join(OUT, f"adapter_{n}"), adapter_name=n)
    model.eval()
    return model


class MaskRecorder:
    """Wraps merge_utils.random_pruning and the two per-module PEFT helpers so that each mask
    torch draws is recorded under "<module>.<part>.<adapter index>"."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.masks = {}
        self.ctx = None
        self.calls = 0
        self.orig_rp = merge_utils.random_pruning
        lora_model = model.base_model
        self.lora_model = lora_model
        self.orig_gen = lora_model._generalized_task_arithmetic_weighted_adapter
        self.orig_svd = lora_model._svd_generalized_task_arithmetic_weighted_adapter
        self.case_adapters = None

    def install(self, case_adapters):
        self.case_adapters = case_adapters
        rec = self

        def random_pruning(tensor, density, rescale):
            mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density))
            module, valid, parts = rec.ctx
            i = rec.calls
            rec.calls += 1
            part = parts[i // len(valid)]
            adapter = rec.case_adapters.index(valid[i % len(valid)])
            rec.masks[f"{module}.{part}.{adapter}"] = mask.to(torch.uint8)
            pruned = tensor * mask
            if rescale:
                pruned = pruned / density
            return pruned

        def gen(combination_type, adapters, weights, target, *args, **kwargs):
            valid = [a for a in adapters if a in target.lora_A]
            rec.ctx = (rec.names[id(target)], valid, ["lora_A", "lora_B"])
            rec.calls = 0
            return rec.orig_gen(combination_type, adapters, weights, target, *args, **kwargs)

        def svd(combination_type, adapters, weights, new_rank, target, *args, **kwargs):
            valid = [a for a in adapters if a in target.lora_A]
            rec.ctx = (rec.names[id(target)], valid, ["delta"])
            rec.calls = 0
            return rec.orig_svd(combination_type, adapters, weights, new_rank, target, *args, **kwargs)

        merge_utils.random_pruning = random_pruning
        self.lora_model._generalized_task_arithmetic_weighted_adapter = gen
        self.lora_model._svd_generalized_task_arithmetic_weighted_adapter = svd


def run_case(model, c, recorder=None):
    torch.manual_seed(1234)
    if recorder is not None:
        recorder.masks = {}
        recorder.install(c["adapters"])
    model.add_weighted_adapter(
        adapters=c["adapters"], weights=c["weights"], adapter_name=c["name"], combination_type=c["method"],
        svd_rank=c["svd_rank"], svd_clamp=c["svd_clamp"], density=c["density"],
        majority_sign_method=c["majority_sign_method"],
    )


def make():
    os.makedirs(OUT, exist_ok=True)
    make_adapters(None)
    model = load_all()
    recorder = MaskRecorder(model)
    expected, masks, cases = {}, {}, []
    for c in CASES:
        run_case(model, c, recorder)
        sd = get_peft_model_state_dict(model, adapter_name=c["name"])
        for k, v in sd.items():
            if ".layers.0." not in k:
                continue
            expected[f"{c['name']}/{k}"] = v.detach().float().contiguous()
        for k, m in recorder.masks.items():
            flat = m.flatten().numpy().astype(bool)
            masks[f"{c['name']}/{k}"] = torch.from_numpy(np.packbits(flat))
            masks[f"{c['name']}/{k}#len"] = torch.tensor([flat.size], dtype=torch.int64)
        cfg = model.peft_config[c["name"]]
        cases.append(dict(c, expected_r=cfg.r, expected_lora_alpha=cfg.lora_alpha,
                          expected_target_modules=sorted(cfg.target_modules),
                          masks=len(recorder.masks)))
        print(f"{c['name']}: r={cfg.r} alpha={cfg.lora_alpha} masks={len(recorder.masks)}")
    save_file(expected, os.path.join(OUT, "expected.safetensors"))
    save_file(masks, os.path.join(OUT, "masks.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(dict(peft_version=__import__("peft").__version__, cases=cases), f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


def logits(model, tok):
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0])
    return out


def check(dir_, tol):
    tok = AutoTokenizer.from_pretrained(BASE)
    model = load_all()
    worst, failed = 0.0, []
    for c in CASES:
        d = os.path.join(dir_, c["name"])
        if not os.path.isdir(d):
            print(f"{c['name']}: no furnace adapter in {d}, skipped")
            continue
        run_case(model, c)
        model.set_adapter(c["name"])
        ref = logits(model, tok)
        model.load_adapter(d, adapter_name=f"furnace_{c['name']}")
        model.set_adapter(f"furnace_{c['name']}")
        got = logits(model, tok)
        model.set_adapter(c["name"])
        # Against the base, so a no-op adapter would be noticed.
        with model.disable_adapter():
            base = logits(model, tok)
        diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
        effect = max((r - b).abs().max().item() for r, b in zip(ref, base))
        if c["svd_clamp"] is None:
            worst = max(worst, diff)
        if c["svd_clamp"] is not None:
            # The clamp's quantile depends on the singular vectors' signs, which LAPACK and
            # furnace choose differently (the Rust test aligns them and compares exactly).
            status = "sign-dependent (svd_clamp): reported, not compared"
        elif diff <= tol:
            status = "ok"
        else:
            status = "MISMATCH"
            failed.append(c["name"])
        print(f"{c['name']:>22}: max |logit diff| = {diff:.3e} (adapter effect {effect:.3e}) {status}")
    print(f"worst {worst:.3e}; {len(failed)} mismatches")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="DIR")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.check:
        sys.exit(check(args.check, args.tol))
    make()


if __name__ == "__main__":
    main()
