#!/usr/bin/env python3
"""Reference fixtures for furnace's perplexity / held-out NLL evaluation.

Writes (paths relative to the repository root):

  testdata/ppl_eval.jsonl   the evaluation set: 6 short rows in prompt/completion form ({"prompt", "completion"},
                            one row also has "system").
  testdata/ppl_cases.json   the reference, computed in float32 on the CPU with HF transformers (+ PEFT):
      {
        "versions": {"torch", "transformers", "peft", "python"},
        "model_path": "testdata/tiny-llama", "adapter_path": "testdata/tiny-llama-pref-lora",
        "dataset": "testdata/ppl_eval.jsonl",
        "rows": [{"ids": [...], "labels": [...], "masked": n}, ...],   one per dataset row, in order
        "base":    {"completion": M, "all_tokens": M},   testdata/tiny-llama alone
        "adapter": {"completion": M, "all_tokens": M},   with the PEFT adapter testdata/tiny-llama-pref-lora
      }
    where M = {"nll_sum": [per row summed NLL (nats)], "tokens": [per row token count],
               "row_mean_nll": [nll_sum / tokens per row],
               "mean_nll": token-weighted mean NLL over all rows (sum nll_sum / sum tokens),
               "ppl": exp(mean_nll)}.

Token ids are built the way furnace's SFT data loader does: messages = [system (if any), user=prompt];
prompt_text = apply_chat_template(messages, add_generation_prompt=True, tokenize=False);
full_text = apply_chat_template(messages + [assistant=completion], add_generation_prompt=False, tokenize=False);
ids = tokenizer(full_text, add_special_tokens=False).input_ids (prompt ids likewise); masked = length of the common
prefix of ids and prompt ids; labels = ids with the first `masked` positions set to -100.

Modes: "completion" scores the label positions != -100 with transformers' shift (position t predicted from the
logits at t-1); "all_tokens" uses labels = ids, i.e. every position after the first. Each row is run alone
(batch of one, no padding), model loaded with attn_implementation="eager" in float32.

Run from anywhere, with a venv holding torch, transformers and peft:

    <venv>/bin/python scripts/make_ppl_fixtures.py
"""
import json
import math
import os
import platform
import sys

import torch
import transformers
import peft
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_REL = "testdata/tiny-llama"
ADAPTER_REL = "testdata/tiny-llama-pref-lora"
DATA_REL = "testdata/ppl_eval.jsonl"
CASES_REL = "testdata/ppl_cases.json"

ROWS = [
    {"prompt": "What is 3 plus 4?", "completion": "The answer is 7."},
    {"prompt": "Name a primary color.", "completion": "Red."},
    {
        "system": "You are a terse assistant that answers in one sentence.",
        "prompt": "Why is the sky blue?",
        "completion": "Air molecules scatter short blue wavelengths of sunlight more than the longer red ones.",
    },
    {"prompt": "Translate 'good morning' into French.", "completion": "Good morning in French is bonjour."},
    {
        "prompt": "Describe a cat in a few words.",
        "completion": "A small furry animal with whiskers, sharp claws, soft paws, and a long curious tail "
        "that loves naps.",
    },
    {"prompt": "What is the capital of Japan?", "completion": "Tokyo is the capital city of Japan."},
]


def encode(tok, row):
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    messages.append({"role": "user", "content": row["prompt"]})
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(
        messages + [{"role": "assistant", "content": row["completion"]}], add_generation_prompt=False, tokenize=False
    )
    ids = tok(full_text, add_special_tokens=False).input_ids
    prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
    masked = 0
    while masked < min(len(ids), len(prompt_ids)) and ids[masked] == prompt_ids[masked]:
        masked += 1
    labels = [-100] * masked + list(ids[masked:])
    return list(ids), labels, masked


@torch.no_grad()
def score(model, encoded):
    out = {}
    for mode in ("completion", "all_tokens"):
        sums, counts = [], []
        for ids, labels, _ in encoded:
            lab = labels if mode == "completion" else list(ids)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits.float()[0]  # [T, V]
            shift_logits = logits[:-1]
            shift_labels = torch.tensor(lab[1:])
            nll = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            sums.append(float(nll))
            counts.append(int((shift_labels != -100).sum()))
        total = sum(sums) / sum(counts)
        out[mode] = {
            "nll_sum": sums,
            "tokens": counts,
            "row_mean_nll": [s / c for s, c in zip(sums, counts)],
            "mean_nll": total,
            "ppl": math.exp(total),
        }
    return out


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model_dir = os.path.join(ROOT, MODEL_REL)
    adapter_dir = os.path.join(ROOT, ADAPTER_REL)

    with open(os.path.join(ROOT, DATA_REL), "w") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")

    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = [encode(tok, row) for row in ROWS]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    base = score(model, encoded)

    pmodel = PeftModel.from_pretrained(model, adapter_dir)
    pmodel.eval()
    adapter = score(pmodel, encoded)

    cases = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "model_path": MODEL_REL,
        "adapter_path": ADAPTER_REL,
        "dataset": DATA_REL,
        "rows": [{"ids": ids, "labels": labels, "masked": masked} for ids, labels, masked in encoded],
        "base": base,
        "adapter": adapter,
    }
    with open(os.path.join(ROOT, CASES_REL), "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")

    print(f"wrote {DATA_REL} ({len(ROWS)} rows) and {CASES_REL}")
    for i, (ids, labels, masked) in enumerate(encoded):
        print(f"row {i}: len={len(ids)} masked={masked} completion_tokens={len(ids) - masked}")
    for name, res in (("base", base), ("adapter", adapter)):
        for mode in ("completion", "all_tokens"):
            r = res[mode]
            print(
                f"{name:8s} {mode:11s} tokens={sum(r['tokens']):4d} mean_nll={r['mean_nll']:.6f} ppl={r['ppl']:.4f}"
                f"  nll_sum={[round(s, 4) for s in r['nll_sum']]}"
            )


if __name__ == "__main__":
    sys.exit(main())
