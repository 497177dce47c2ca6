"""What user functions written in Python cost training: the same experiments with the logic
built in and in Python, wall time, medians of repeats, on the default model.

  SFT:  the shipped extraction rows as furnace reads them  vs  the rows in other columns
        and a Python formatting_func (plus a Python compute_metrics at every evaluation,
        reported as its share of the wall time: fit mode has no built-in equivalent).
  GRPO: furnace's built-in `json` reward  vs  the same check as a Python reward function.

Run with a Python that has the furnace package built in release mode:
    (cd python && maturin build --release --out ../target/wheels) && pip install target/wheels/furnace-*.whl
    python scripts/bench_python_functions.py [--repeat 3] [--rows 64]
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from furnace import Experiment
from furnace import _hooks
from furnace.automl import List, RFGridSearch, RFGRPOConfig, RFLoraConfig, RFModelConfig, RFSFTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rows(name):
    with open(ROOT / "data" / "extract" / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def formatting(row):
    return {"system": row["instruction"], "prompt": row["sentence"], "completion": row["json"]}


def exact(eval_preds):
    predictions, labels = eval_preds
    return {"exact": sum(p.strip() == l.strip() for p, l in zip(predictions, labels)) / len(labels)}


def json_reward(prompts, completions, **_):
    out = []
    for c in completions:
        try:
            json.loads(c)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def frozen_dtype():
    """bf16 where the CPU has AVX512-BF16 (furnace's bf16 kernels), else f32 ("none"):
    without it the bf16 path is portable scalar code and would swamp what is measured."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "bf16" if "avx512_bf16" in f.read() else "none"
    except OSError:
        return "none"


QUANTIZE = "none"


def sft(model, fmt, metrics, steps):
    return RFGridSearch(
        {
            "model_config": RFModelConfig(
                model_name=model,
                peft_config=RFLoraConfig(r=List([8, 16]), lora_alpha=16),
                training_args=RFSFTConfig(learning_rate=1e-3, per_device_train_batch_size=4, max_length=128, max_steps=steps),
                model_kwargs={"quantize": QUANTIZE},
                formatting_func=fmt,
                compute_metrics=metrics,
                generation_config={"max_new_tokens": 32},
            )
        },
        trainer_type="SFT",
    )


def grpo(model, reward, steps):
    return RFGridSearch(
        {
            "model_config": RFModelConfig(
                model_name=model,
                peft_config=RFLoraConfig(r=8, lora_alpha=16),
                training_args=RFGRPOConfig(
                    learning_rate=1e-4, per_device_train_batch_size=4, num_generations=4, max_completion_length=32, max_steps=steps
                ),
                model_kwargs={"quantize": QUANTIZE},
                reward_funcs=[reward],
            )
        },
        trainer_type="GRPO",
    )


def timed(name, config, train, ev, chunks):
    d = tempfile.mkdtemp(prefix="furnace-bench-py-")
    _hooks.TIMINGS.clear()
    exp = Experiment(name, mode="fit", experiments_path=d)
    t = time.perf_counter()
    info = exp.run_fit(config, train_dataset=train, eval_dataset=ev, num_chunks=chunks, display=False)
    wall = time.perf_counter() - t
    bad = info[info.status != "completed"]
    if len(bad):
        sys.exit(f"{name}: runs did not complete: {bad[['run_id', 'status', 'error']].to_dict('records')}")
    in_python = sum(v[0] for v in _hooks.TIMINGS.values())
    return wall, in_python


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--grpo-steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quantize", default=None, help="the frozen base: none, bf16, q8, q4 (default: bf16 with AVX512-BF16, else none)")
    a = p.parse_args()
    global QUANTIZE
    QUANTIZE = a.quantize or frozen_dtype()
    print(f"frozen base: {QUANTIZE}", file=sys.stderr)
    train, ev = rows("train.jsonl")[: a.rows], rows("eval.jsonl")[:8]
    mine = [{"instruction": r["system"], "sentence": r["prompt"], "json": r["completion"]} for r in train]
    mine_ev = [{"instruction": r["system"], "sentence": r["prompt"], "json": r["completion"]} for r in ev]
    prompts = [{"system": r["system"], "prompt": r["prompt"]} for r in train[:16]]
    cases = [
        ("sft built-in columns", lambda: timed("a", sft(a.model, None, None, a.steps), train, ev, 4)),
        ("sft Python formatting_func", lambda: timed("b", sft(a.model, formatting, None, a.steps), mine, mine_ev, 4)),
        ("sft + Python compute_metrics", lambda: timed("c", sft(a.model, formatting, exact, a.steps), mine, mine_ev, 4)),
        ("grpo built-in json reward", lambda: timed("d", grpo(a.model, {"kind": "json", "name": "json"}, a.grpo_steps), prompts, None, 1)),
        ("grpo Python json reward", lambda: timed("e", grpo(a.model, json_reward, a.grpo_steps), prompts, None, 1)),
    ]
    results = {}
    for r in range(a.repeat):
        for name, run in cases:
            wall, py = run()
            results.setdefault(name, []).append((wall, py))
            print(f"repeat {r + 1}: {name}: {wall:.2f} s ({py:.3f} s in Python)", file=sys.stderr)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(p for _, p in v)) for k, v in results.items()}
    print(f"{'case':32} {'wall s':>8} {'in Python s':>12} {'vs built-in':>12}")
    base = {"sft": med["sft built-in columns"][0], "grpo": med["grpo built-in json reward"][0]}
    for k, (w, py) in med.items():
        ratio = w / base[k.split()[0]]
        print(f"{k:32} {w:8.2f} {py:12.3f} {ratio:11.3f}x")


if __name__ == "__main__":
    main()
