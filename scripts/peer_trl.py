"""Peer baseline of `furnace bench dpo` / `furnace bench grpo`: TRL's own DPOTrainer and
GRPOTrainer with PEFT LoRA on PyTorch (CPU), on the same GGUF model (transformers
dequantizes it, as ../shared/bench/peer_torch.py does), the same rows, batch, lengths,
LoRA (r, alpha = 2r, all seven projections), optimizer settings and thread count.

usage:
  python peer_trl.py dpo  --gguf PATH --data train.jsonl [--pairs 64] [--batch 4]
                          [--max-length 96] [--beta 0.1] [--steps 14] [--warmup 2]
                          [--ref precompute|per-step] [--dtype bfloat16|float32]
                          [--rank 16] [--threads N]
  python peer_trl.py grpo --gguf PATH --data train.jsonl [--prompts 2] [--generations 4]
                          [--max-completion 32] [--temperature 1.0] [--steps 8]
                          [--warmup 1] [--dtype bfloat16|float32] [--rank 16] [--threads N]

Step times are the intervals between TRL's `on_step_end` callbacks (data collation,
generation, reward scoring, forward, backward and the optimizer step all inside); the
first `--warmup` steps are not counted. DPO tokens are the non-padding tokens of each
collated batch (prompt + chosen and prompt + rejected); GRPO completion tokens are TRL's
`completions/mean_length` x completions. With `--ref precompute` (the default) TRL's
`precompute_ref_log_probs=True` computes the reference log-probabilities once before
training, timed apart as `ref_s`; `--ref per-step` is TRL's default (a reference forward,
the adapter disabled, inside every step).

Prints one line starting with RESULT (key=value figures, peak_rss_gb being this
process's VmHWM), as peer_torch.py does.
Needs: torch, transformers, peft, trl, gguf in the Python that runs it (point
`furnace bench dpo|grpo --peer-python` or $FURNACE_PEER_PYTHON at a virtualenv that has them).
"""
import argparse, json, os, re, resource, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["dpo", "grpo"])
ap.add_argument("--gguf", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--threads", type=int, default=os.cpu_count())
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--steps", type=int, default=None, help="timed steps")
ap.add_argument("--warmup", type=int, default=None, help="untimed first steps")
# DPO
ap.add_argument("--pairs", type=int, default=64)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--max-length", type=int, default=96)
ap.add_argument("--beta", type=float, default=0.1)
ap.add_argument("--ref", default="precompute", choices=["precompute", "per-step"])
# GRPO
ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
ap.add_argument("--generations", type=int, default=4)
ap.add_argument("--max-completion", type=int, default=32)
ap.add_argument("--temperature", type=float, default=1.0)
a = ap.parse_args()
if a.steps is None:
    a.steps = 14 if a.mode == "dpo" else 7
if a.warmup is None:
    a.warmup = 2 if a.mode == "dpo" else 1

import torch

torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

dtype = getattr(torch, a.dtype)
d, f = os.path.split(os.path.abspath(a.gguf))
t_load = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
# transformers dequantizes the GGUF into plain `dtype` tensors but marks the model as
# GGUF-quantized, which its Trainer refuses to train: unmark it (the weights are dense).
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
load_s = time.perf_counter() - t_load
peft_cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

with open(a.data) as fh:
    rows = [json.loads(l) for l in fh if l.strip()]


class Clock(TrainerCallback):
    """Step intervals (between on_step_end calls) and the logged metrics of each step."""

    def __init__(self):
        self.ends, self.logs, self.start = [], [], None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())
        prev = self.ends[-2] if len(self.ends) > 1 else self.start
        print(f"step {len(self.ends) - 1} ms {(self.ends[-1] - prev) * 1e3:.0f}", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))

    def intervals(self):
        t = [self.start] + self.ends
        return [t[i + 1] - t[i] for i in range(len(self.ends))]


common = dict(
    output_dir=tempfile.mkdtemp(prefix="peer-trl-"), learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
    max_steps=a.warmup + a.steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=a.seed,
    data_seed=a.seed, max_grad_norm=1.0, disable_tqdm=True, dataloader_num_workers=0, gradient_accumulation_steps=1,
    bf16=False, fp16=False,
)
clock = Clock()

if a.mode == "dpo":
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[: a.pairs]])
    cfg = DPOConfig(per_device_train_batch_size=a.batch, max_length=a.max_length, beta=a.beta, loss_type=["sigmoid"],
                    precompute_ref_log_probs=a.ref == "precompute", **common)
    ref_s = 0.0
    orig = DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kw):
        global ref_s
        t = time.perf_counter()
        out = orig(self, *args, **kw)
        ref_s += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[clock])
    tokens = []
    collate = trainer.data_collator

    def counting(features):
        out = collate(features)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counting
    trainer.train()
    dts = clock.intervals()[a.warmup:]
    toks = tokens[a.warmup:a.warmup + len(dts)]
    secs = sum(dts)
    losses = [l["loss"] for l in clock.logs]
    print(f"RESULT dpo peer=trl dtype={a.dtype} threads={a.threads} pairs={a.pairs} batch={a.batch} "
          f"max_length={a.max_length} ref={a.ref} steps={len(dts)} load_s={load_s:.1f} ref_s={ref_s:.2f} "
          f"ms_per_step={1e3 * secs / max(len(dts), 1):.0f} tokens_per_step={sum(toks) / max(len(toks), 1):.1f} "
          f"tokens_per_s={sum(toks) / secs:.1f} first_loss={losses[0] if losses else float('nan'):.4f} "
          f"last_loss={losses[-1] if losses else float('nan'):.4f} "
          f"peak_rss_gb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f}", flush=True)
else:
    from trl import GRPOConfig, GRPOTrainer

    pattern = re.compile(r"\d")

    def has_digit(completions, **kw):
        """1.0 when the completion holds a digit (furnace's kind = "regex", pattern '\\d')."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if pattern.search(t) else 0.0 for t in texts]

    n_prompts = a.prompts * (a.warmup + a.steps)
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:n_prompts]])
    cfg = GRPOConfig(per_device_train_batch_size=a.prompts * a.generations, num_generations=a.generations,
                     max_completion_length=a.max_completion, temperature=a.temperature, top_p=1.0, top_k=0,
                     beta=0.0, loss_type="dapo", num_iterations=1, epsilon=0.2, scale_rewards="group", **common)
    trainer = GRPOTrainer(model=model, reward_funcs=[has_digit], args=cfg, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[clock])
    trainer.train()
    dts = clock.intervals()[a.warmup:]
    logs = clock.logs[a.warmup:a.warmup + len(dts)]
    secs = sum(dts)
    comp = sum(l.get("completions/mean_length", float("nan")) * a.prompts * a.generations for l in logs)
    rewards = [l.get("reward", float("nan")) for l in logs]
    print(f"RESULT grpo peer=trl dtype={a.dtype} threads={a.threads} prompts={a.prompts} generations={a.generations} "
          f"max_completion={a.max_completion} steps={len(dts)} load_s={load_s:.1f} "
          f"ms_per_step={1e3 * secs / max(len(dts), 1):.0f} prompts_per_s={a.prompts * len(dts) / secs:.3f} "
          f"completion_tokens_per_step={comp / max(len(logs), 1):.1f} completion_tokens_per_s={comp / secs:.1f} "
          f"mean_reward={sum(rewards) / max(len(rewards), 1):.3f} "
          f"peak_rss_gb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f}", flush=True)
