#!/usr/bin/env python3
"""Reference fixtures for furnace's DPO and GRPO losses, computed with HF TRL's own trainers on a PEFT LoRA.

Writes (paths relative to the repository root):

  testdata/tiny-llama-pref-lora/      PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) on
                                      testdata/tiny-llama: r=4, alpha=8, all attention + MLP projections, with
                                      random lora_A and lora_B so the policy differs from the reference (= the
                                      base model, i.e. the adapter disabled).
  testdata/dpo_cases.jsonl            one line per DPO case: pairs, summed logps, loss and TRL's logged metrics.
  testdata/dpo_grads.safetensors      "<case name>/<PEFT parameter name>" -> gradient of the loss (f32).
  testdata/grpo_cases.jsonl           one line per GRPO case: prompts, completions, rewards, advantages, per-token
                                      logps, loss and TRL's logged metrics.
  testdata/grpo_grads.safetensors     "<case name>/<PEFT parameter name>" -> gradient of the loss (f32).

The losses are TRL's real code: `DPOTrainer._compute_loss(model, inputs, return_outputs=False)` on a batch built
by TRL's `DataCollatorForPreference`, and `GRPOTrainer._compute_loss(model, inputs)` on hand-built generation
outputs (no sampling). GRPO advantages replicate `_generate_and_score_completions` (sum_then_normalize) using
TRL's own `nanstd`. Everything is float32 on the CPU with fixed seeds.

Generated with torch 2.15.0, transformers 5.24.0, trl 1.16.0, peft 0.21.2 (each JSONL line records the versions
actually used under "versions"). Run from anywhere:

    <venv with torch, transformers, trl==1.16.0, peft>/bin/python scripts/make_pref_fixtures.py
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "testdata")
MODEL_DIR = os.path.join(TESTDATA, "tiny-llama")
LORA_DIR = os.path.join(TESTDATA, "tiny-llama-pref-lora")

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "trl": trl.__version__,
    "peft": peft.__version__,
}

SEED = 1234
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_name(name):
    return name.replace(".default", "")


def lora_config():
    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_base():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")


def build_adapter():
    """A PEFT model whose lora_A / lora_B come from a private generator (so the adapter is not a no-op)."""
    torch.manual_seed(SEED)
    model = get_peft_model(load_base(), lora_config())
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def set_adapter_weights(model, weights):
    """Loads the fixture adapter into the fresh ("default", zero-B) adapter the trainer created from peft_config."""
    n_set = 0
    with torch.no_grad():
        for n, p in lora_params(model):
            p.copy_(weights[peft_name(n)])
            n_set += 1
    assert n_set == len(weights), (n_set, len(weights))
    assert list(model.peft_config) == ["default"], list(model.peft_config)  # no "ref" adapter: ref = base model
    model.train()  # dropout is 0 everywhere (config attention_dropout 0, lora_dropout 0)


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def collect_grads(model, case_name, out):
    for n, p in lora_params(model):
        assert p.grad is not None, n
        out[f"{case_name}/{peft_name(n)}"] = p.grad.detach().clone().contiguous()


def zero_grads(model):
    for _, p in model.named_parameters():
        p.grad = None


def rand_ids(gen, n, vocab):
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def f(x):
    return float(x)


# --------------------------------------------------------------------------------------------------------------- DPO

DPO_CASES = [
    {"name": "sigmoid_b0.1", "loss_types": ["sigmoid"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0},
    {"name": "hinge_b0.1", "loss_types": ["hinge"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0},
    {"name": "ipo_b0.1", "loss_types": ["ipo"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0},
    {"name": "robust_b0.1_ls0.1", "loss_types": ["robust"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.1},
    {
        "name": "sigmoid_sft_b0.1",
        "loss_types": ["sigmoid", "sft"],
        "loss_weights": [1.0, 0.5],
        "beta": 0.1,
        "label_smoothing": 0.0,
    },
    {"name": "sigmoid_b0.5", "loss_types": ["sigmoid"], "loss_weights": None, "beta": 0.5, "label_smoothing": 0.0},
]


def make_pairs(vocab):
    gen = torch.Generator().manual_seed(SEED + 2)
    lens = [(3, 4, 2), (6, 2, 7), (4, 5, 3)]  # (prompt, chosen, rejected), chosen != rejected length per pair
    return [
        {"prompt": rand_ids(gen, p, vocab), "chosen": rand_ids(gen, c, vocab), "rejected": rand_ids(gen, r, vocab)}
        for p, c, r in lens
    ]


def plain_completion_logps(model, prompt, completion):
    """Independent check of the alignment: one unpadded sequence, ordinary logits, log_softmax at position t scores
    token t+1, so completion token j (0-based) is scored at position len(prompt)+j-1."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt)
    return torch.stack([logp[start + j - 1, tok] for j, tok in enumerate(completion)])


def run_dpo(weights, tokenizer, vocab, tmp):
    pairs = make_pairs(vocab)
    text_ds = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 3)
    lines, grads = [], {}
    for case in DPO_CASES:
        kw = dict(
            output_dir=os.path.join(tmp, "dpo"),
            report_to="none",
            loss_type=case["loss_types"],
            beta=case["beta"],
            label_smoothing=case["label_smoothing"],
            precompute_ref_log_probs=False,
            per_device_train_batch_size=3,
            gradient_accumulation_steps=1,
            use_cpu=True,
            bf16=False,
            fp16=False,
            disable_dropout=True,
            seed=SEED,
        )
        if case["loss_weights"] is not None:
            kw["loss_weights"] = case["loss_weights"]
        args = DPOConfig(**kw)
        # A fresh base model + peft_config, as a user training a new adapter would: TRL then takes the reference to be
        # the base model (adapters disabled). (Passing an already-wrapped PeftModel makes TRL add a frozen "ref" copy
        # of the adapter instead.) The fixture adapter weights are then loaded into the trainer's adapter.
        trainer = DPOTrainer(
            model=load_base(), args=args, train_dataset=text_ds, processing_class=tokenizer, peft_config=lora_config()
        )
        model = trainer.model
        set_adapter_weights(model, weights)
        collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
        inputs = collator(
            [{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]} for p in pairs]
        )
        zero_grads(model)
        loss = trainer._compute_loss(model, inputs, return_outputs=False)
        loss.backward()
        collect_grads(model, case["name"], grads)

        # Summed completion logps, recomputed the way _compute_loss does (for the fixture record).
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        mk = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        with torch.no_grad():
            pol = model(**mk, labels=labels, fused_lm_head=True).log_probs.sum(1)
            with model.disable_adapter():
                ref = model(**mk, labels=labels, fused_lm_head=True).log_probs.sum(1)
        n = len(pairs)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        lines.append(
            {
                "name": case["name"],
                "loss_types": case["loss_types"],
                "loss_weights": case["loss_weights"] or [1.0] * len(case["loss_types"]),
                "beta": case["beta"],
                "label_smoothing": case["label_smoothing"],
                "pairs": pairs,
                "policy_chosen_logps": pol[:n].tolist(),
                "policy_rejected_logps": pol[n:].tolist(),
                "ref_chosen_logps": ref[:n].tolist(),
                "ref_rejected_logps": ref[n:].tolist(),
                "loss": f(loss.detach()),
                "metrics": metrics,
                "versions": VERSIONS,
            }
        )
        # Cross-check the recorded logps against TRL's metrics and against a plain, unpadded forward
        assert abs(metrics["logps/chosen"] - pol[:n].mean().item()) < 1e-4
        for i, pair in enumerate(pairs):
            for key, row in (("chosen", i), ("rejected", n + i)):
                plain = plain_completion_logps(model, pair["prompt"], pair[key]).sum().item()
                assert abs(plain - pol[row].item()) < 1e-3, (plain, pol[row].item())
                with model.disable_adapter():
                    plain = plain_completion_logps(model, pair["prompt"], pair[key]).sum().item()
                assert abs(plain - ref[row].item()) < 1e-3, (plain, ref[row].item())
        del trainer
    return lines, grads


# -------------------------------------------------------------------------------------------------------------- GRPO

NUM_GEN = 3
MAX_COMPLETION = 8
REWARD_WEIGHTS = [1.0, 0.5]


def reward_len(completions, **kwargs):
    return [0.0] * len(completions)


def reward_zero(completions, **kwargs):
    return [0.0] * len(completions)


GRPO_CASES = [
    # name, loss_type, beta, epsilon, epsilon_high, scale_rewards, old ("none"|"perturbed"), ref
    dict(name="grpo_b0", loss_type="grpo", beta=0.0, eps=0.2, eps_high=None, scale="group", old=False),
    dict(name="bnpo_b0", loss_type="bnpo", beta=0.0, eps=0.2, eps_high=None, scale="group", old=False),
    dict(name="dr_grpo_b0", loss_type="dr_grpo", beta=0.0, eps=0.2, eps_high=None, scale="group", old=False),
    dict(name="dapo_b0", loss_type="dapo", beta=0.0, eps=0.2, eps_high=None, scale="group", old=False),
    dict(name="grpo_b0.04", loss_type="grpo", beta=0.04, eps=0.2, eps_high=None, scale="group", old=False),
    dict(name="grpo_clip", loss_type="grpo", beta=0.0, eps=0.2, eps_high=None, scale="group", old=True),
    dict(name="grpo_clip_high0.28", loss_type="grpo", beta=0.0, eps=0.2, eps_high=0.28, scale="group", old=True),
    dict(name="grpo_scale_batch", loss_type="grpo", beta=0.0, eps=0.2, eps_high=None, scale="batch", old=False),
    dict(name="grpo_scale_none", loss_type="grpo", beta=0.0, eps=0.2, eps_high=None, scale="none", old=False),
]


def grpo_data(vocab):
    gen = torch.Generator().manual_seed(SEED + 3)
    prompts = [rand_ids(gen, 3, vocab), rand_ids(gen, 5, vocab)]
    comp_lens = [2, 6, 4, 5, 3, 6]
    completions = [rand_ids(gen, n, vocab) for n in comp_lens]
    rewards_per_func = (torch.randn(len(completions), 2, generator=gen)).round(decimals=3)
    perturb = torch.randn(len(completions), max(comp_lens), generator=gen) * 0.3
    return prompts, completions, rewards_per_func, perturb


def trl_advantages(rewards_per_func, reward_weights, scale_rewards, num_generations):
    """Verbatim copy of the sum_then_normalize branch of GRPOTrainer._generate_and_score_completions (TRL 1.16)."""
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    else:
        raise ValueError(scale_rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def pad_rows(rows, value, side):
    width = max(len(r) for r in rows)
    out = []
    for r in rows:
        padding = [value] * (width - len(r))
        out.append(padding + r if side == "left" else r + padding)
    return torch.tensor(out)


def unpad(t, lens):
    return [t[i, :n].tolist() for i, n in enumerate(lens)]


def run_grpo(weights, tokenizer, vocab, tmp):
    prompts, completions, rewards_per_func, perturb = grpo_data(vocab)
    pad_id = tokenizer.pad_token_id
    prompt_rows = [prompts[i // NUM_GEN] for i in range(len(completions))]
    prompt_ids = pad_rows(prompt_rows, pad_id, "left")
    prompt_mask = pad_rows([[1] * len(p) for p in prompt_rows], 0, "left")
    completion_ids = pad_rows(completions, pad_id, "right")
    completion_mask = pad_rows([[1] * len(c) for c in completions], 0, "right")
    comp_lens = [len(c) for c in completions]
    train_ds = Dataset.from_list([{"prompt": "a"}] * 6)

    lines, grads = [], {}
    for case in GRPO_CASES:
        args = GRPOConfig(
            output_dir=os.path.join(tmp, "grpo"),
            report_to="none",
            num_generations=NUM_GEN,
            per_device_train_batch_size=6,
            gradient_accumulation_steps=1,
            max_completion_length=MAX_COMPLETION,
            loss_type=case["loss_type"],
            beta=case["beta"],
            epsilon=case["eps"],
            epsilon_high=case["eps_high"],
            scale_rewards=case["scale"],
            reward_weights=REWARD_WEIGHTS,
            use_cpu=True,
            bf16=False,
            fp16=False,
            disable_dropout=True,
            seed=SEED,
        )
        trainer = GRPOTrainer(
            model=load_base(),
            peft_config=lora_config(),
            reward_funcs=[reward_len, reward_zero],
            args=args,
            train_dataset=train_ds,
            processing_class=tokenizer,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; 1 = no accumulation
        model = trainer.model
        set_adapter_weights(model, weights)
        advantages = trl_advantages(rewards_per_func, trainer.reward_weights, trainer.scale_rewards, NUM_GEN)

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with torch.no_grad():
            cur, _, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1)
            )
            with model.disable_adapter():
                ref, _, _ = trainer._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, completion_ids.size(1)
                )

        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "num_items_in_batch": completion_mask.sum(),
        }
        old = None
        if case["old"]:
            old = (cur + perturb[:, : cur.size(1)]) * completion_mask
            inputs["old_per_token_logps"] = old
        if case["beta"] != 0.0:
            inputs["ref_per_token_logps"] = ref

        # Left padding of the prompt only shifts RoPE positions by a constant, so the logps match an unpadded forward
        for i, c in enumerate(completions):
            plain = plain_completion_logps(model, prompt_rows[i], c)
            assert torch.allclose(plain, cur[i, : len(c)], atol=1e-4), (plain, cur[i])
            assert torch.all(cur[i, len(c) :] == 0)  # padded completion positions are exactly 0

        zero_grads(model)
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        collect_grads(model, case["name"], grads)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        lines.append(
            {
                "name": case["name"],
                "loss_type": case["loss_type"],
                "beta": case["beta"],
                "epsilon_low": trainer.epsilon_low,
                "epsilon_high": trainer.epsilon_high,
                "max_completion_length": MAX_COMPLETION,
                "num_generations": NUM_GEN,
                "prompts": prompts,
                "completions": completions,
                "rewards_per_func": rewards_per_func.tolist(),
                "reward_weights": trainer.reward_weights.tolist(),
                "scale_rewards": trainer.scale_rewards,
                "advantages": advantages.tolist(),
                "old_per_token_logps": unpad(old, comp_lens) if old is not None else None,
                "ref_per_token_logps": unpad(ref, comp_lens) if case["beta"] != 0.0 else None,
                "per_token_logps": unpad(cur, comp_lens),
                "loss": f(loss.detach()),
                "metrics": metrics,
                "versions": VERSIONS,
            }
        )
        del trainer
    return lines, grads


# -------------------------------------------------------------------------------------------------------------- main


def write_jsonl(path, lines):
    with open(path, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_adapter()
    vocab = model.config.vocab_size

    if os.path.isdir(LORA_DIR):
        shutil.rmtree(LORA_DIR)
    model.save_pretrained(LORA_DIR)
    # Keep the committed config free of this machine's paths and deterministic (target_modules is a set in PEFT)
    cfg_path = os.path.join(LORA_DIR, "adapter_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["base_model_name_or_path"] = "testdata/tiny-llama"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    readme = os.path.join(LORA_DIR, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    saved = load_file(os.path.join(LORA_DIR, "adapter_model.safetensors"))
    names = sorted(peft_name(n) for n, _ in lora_params(model))
    assert sorted(saved) == names, (sorted(saved)[:3], names[:3])

    with tempfile.TemporaryDirectory() as tmp:
        dpo_lines, dpo_grads = run_dpo(saved, tokenizer, vocab, tmp)
        grpo_lines, grpo_grads = run_grpo(saved, tokenizer, vocab, tmp)

    paths = {
        "dpo_cases": os.path.join(TESTDATA, "dpo_cases.jsonl"),
        "dpo_grads": os.path.join(TESTDATA, "dpo_grads.safetensors"),
        "grpo_cases": os.path.join(TESTDATA, "grpo_cases.jsonl"),
        "grpo_grads": os.path.join(TESTDATA, "grpo_grads.safetensors"),
    }
    write_jsonl(paths["dpo_cases"], dpo_lines)
    save_file(dpo_grads, paths["dpo_grads"])
    write_jsonl(paths["grpo_cases"], grpo_lines)
    save_file(grpo_grads, paths["grpo_grads"])

    # Re-load and check
    for kind, lines, grads in (("dpo", dpo_lines, dpo_grads), ("grpo", grpo_lines, grpo_grads)):
        with open(paths[f"{kind}_cases"]) as fh:
            back = [json.loads(line) for line in fh]
        assert back == json.loads(json.dumps(lines))
        gback = load_file(paths[f"{kind}_grads"])
        assert sorted(gback) == sorted(grads)
        for k, v in grads.items():
            assert torch.equal(gback[k], v), k
        for line in back:
            gn = [gback[f"{line['name']}/{n}"].norm().item() for n in names]
            assert all(x == x for x in gn)
            print(
                f"{kind:4s} {line['name']:22s} loss={line['loss']:+.6f} grad_norm={sum(x * x for x in gn) ** 0.5:.6f}"
            )

    print("versions:", VERSIONS)
    for p in list(paths.values()) + [LORA_DIR]:
        size = (
            sum(os.path.getsize(os.path.join(p, x)) for x in os.listdir(p)) if os.path.isdir(p) else os.path.getsize(p)
        )
        print(f"wrote {os.path.relpath(p, ROOT)} ({size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
