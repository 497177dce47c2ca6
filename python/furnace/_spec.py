"""RapidFire-shaped config groups to furnace spec text (TOML), the same spec a user could
give ``furnace run``: knobs become ``{ list = [...] }`` / ``{ range = [...] }``, several
configs become ``[[group]]``s, functions become names of registered user functions."""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, Iterable, List as PyList, Optional, Tuple

from ._hooks import Registry, _plain
from .automl import (
    List,
    Range,
    RFGridSearch,
    RFLangChainRagSpec,
    RFModelConfig,
    RFOpenAIAPIModelConfig,
    RFPromptManager,
    RFRandomSearch,
    RFvLLMModelConfig,
    _Config,
)


class SpecError(ValueError):
    """A config furnace cannot express; the message names the argument."""


# ---------------------------------------------------------------- TOML


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def toml_value(v: Any) -> str:
    if isinstance(v, List):
        return "{ list = [" + ", ".join(toml_value(x) for x in v.values) + "] }"
    if isinstance(v, Range):
        parts = [f"range = [{toml_value(v.start)}, {toml_value(v.end)}]"]
        if v.dtype == "int":
            parts.append('dtype = "int"')
        if v.log:
            parts.append("log = true")
        return "{ " + ", ".join(parts) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SpecError(f"{v} is not a finite number")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if hasattr(v, "item"):
        return toml_value(v.item())
    raise SpecError(f"cannot write {type(v).__name__} value {v!r} into a spec")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_str(k)


def table(name: str, values: Dict[str, Any]) -> str:
    lines = [f"[{name}]"]
    for k, v in values.items():
        if v is not None:
            lines.append(f"{_key(k)} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- knobs and functions


def _map(v: Any, f) -> Any:
    """Applies `f` to a value or to each value of a List knob."""
    if isinstance(v, List):
        return List([f(x) for x in v.values])
    return f(v)


def _fn(reg: Registry, kind: str, v: Any) -> Any:
    if v is None:
        return None
    return _map(v, lambda f: reg.add(kind, f))


def _put_fn(reg: Registry, table: Dict[str, Any], key: str, v: Any) -> None:
    """Sets ``table[key]`` to the registered name(s) of the function(s) ``v``, if any."""
    name = _fn(reg, key, v)
    if name is not None:
        table[key] = name


# ---------------------------------------------------------------- fit


_SFT_KEYS = {
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "schedule",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "logging_steps": "log_every",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "warmup_steps": "warmup_steps",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "packing": "packing",
    "group_by_length": "group_by_length",
    # DPO
    "beta": "beta",
    "loss_type": "loss_type",
    "loss_weights": "loss_weights",
    "label_smoothing": "label_smoothing",
    "reference_adapter": "reference_adapter",
    # GRPO
    "num_generations": "num_generations",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_completion_length": "max_completion_length",
    "epsilon": "epsilon",
    "epsilon_high": "epsilon_high",
    "scale_rewards": "scale_rewards",
    "num_iterations": "num_iterations",
    "reward_weights": "reward_weights",
    "use_bias_correction_kl": "use_bias_correction_kl",
}
# Accepted and without effect in furnace (devices, precision flags, reporting, output).
_IGNORED = {
    "per_device_eval_batch_size", "eval_strategy", "save_strategy", "fp16", "bf16", "optim", "seed",
    "report_to", "output_dir", "logging_strategy", "completion_only_loss", "max_prompt_length",
    "model_adapter_name", "ref_adapter_name", "task_type", "bias", "tokenizer", "tokenizer_kwargs",
    "model_type", "ref_model_name", "ref_model_type", "ref_model_kwargs",
}
_SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine"}


def _schedule(v: Any) -> Any:
    def one(s: str) -> str:
        if s not in _SCHEDULES:
            raise SpecError(f"lr_scheduler_type={s!r}: furnace has {', '.join(sorted(_SCHEDULES))}")
        return _SCHEDULES[s]

    return _map(v, one)


def _lora(cfg: Optional[_Config]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"r": 16, "alpha": 32}
    if cfg is None:
        return out
    for k, v in cfg.kwargs.items():
        if k == "r":
            out["r"] = v
        elif k == "lora_alpha":
            out["alpha"] = v
        elif k == "lora_dropout":
            out["dropout"] = v
        elif k == "target_modules":
            out["targets"] = _map(v, lambda t: [t] if isinstance(t, str) else list(t))
        elif k == "init_lora_weights":
            out["init"] = _map(v, lambda x: "kaiming" if x is True else str(x))
        elif k == "use_rslora":
            out["use_rslora"] = v
        elif k == "bias":
            if v not in ("none", None):
                raise SpecError(f"RFLoraConfig bias={v!r}: furnace trains no biases (use 'none')")
        elif k not in _IGNORED:
            raise SpecError(f"RFLoraConfig {k}: not supported by furnace")
    return out


# RFModelConfig fields whose List holds whole alternatives (configs, models): each value is
# its own group (every combination), as RapidFire's grid over them.
_EXPANDED = ("model_name", "peft_config", "training_args", "generation_config", "model_kwargs")


def _expand(mc: RFModelConfig) -> PyList[RFModelConfig]:
    out = [mc]
    for k in _EXPANDED:
        if isinstance(mc.get(k), List):
            out = [type(m)(**{**m.kwargs, k: x}) for m in out for x in mc.get(k).values]
    return out


def _epochs(v: Any) -> Any:
    def one(x: Any) -> int:
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if not isinstance(x, int) or isinstance(x, bool):
            raise SpecError(f"num_train_epochs={x!r}: furnace trains whole epochs (give max_steps for a part of one)")
        return x

    return _map(v, one)


def _reward_name(f: Any, j: int, taken: PyList[str]) -> str:
    """A reward's name in the spec (letters, digits, ``_-.``, unique): the function's own
    name when it is one, ``reward_<j>`` for a lambda or partial."""
    raw = getattr(f, "__name__", "")
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_-.") else "_" for c in raw).strip("_")[:56]
    name = name if name and raw != "<lambda>" else f"reward_{j}"
    base, n = name, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.append(name)
    return name


def fit_spec(
    name: str,
    config_group: Any,
    train_path: str,
    eval_path: Optional[str],
    num_chunks: int,
    seed: int,
    reg: Registry,
    policy: Optional[Dict[str, Any]] = None,
) -> str:
    """The spec text of a fit experiment."""
    configs, search, trainer_type = _flatten(config_group)
    kind = {"SFT": "sft", "DPO": "dpo", "GRPO": "grpo", None: "sft"}.get(
        trainer_type.upper() if isinstance(trainer_type, str) else trainer_type
    )
    if kind is None:
        raise SpecError(f"trainer_type={trainer_type!r}: expected 'SFT', 'DPO' or 'GRPO'")
    groups = []
    rewards: Optional[PyList[Dict[str, Any]]] = None
    models = []
    for i, c in enumerate(configs):
        mc = c.get("model_config") if isinstance(c, dict) else c
        if not isinstance(mc, RFModelConfig):
            raise SpecError(f"config {i}: expected {{'model_config': RFModelConfig(...)}}, got {type(mc).__name__}")
        models += _expand(mc)
    for mc in models:
        model: Dict[str, Any] = {"base": mc.get("model_name") or "smollm2-135m-instruct"}
        q = (mc.get("model_kwargs") or {}).get("quantize")
        if q is not None:
            model["quantize"] = q
        trainer: Dict[str, Any] = {"kind": kind}
        args = mc.get("training_args")
        for k, v in (args.kwargs.items() if args is not None else []):
            if k in _SFT_KEYS:
                trainer[_SFT_KEYS[k]] = _schedule(v) if k == "lr_scheduler_type" else _epochs(v) if k == "num_train_epochs" else v
            elif k not in _IGNORED:
                raise SpecError(f"{type(args).__name__} {k}: not supported by furnace (see docs/python.md)")
        # generation_config: GRPO's sampling; for SFT only the length of compute_metrics'
        # answers (furnace's SFT evaluation decodes greedily), otherwise not used.
        gen = mc.get("generation_config") or {}
        wanted = ("temperature", "top_p", "top_k", "max_new_tokens") if kind == "grpo" else ()
        if kind == "sft" and mc.get("compute_metrics") is not None:
            wanted = ("max_new_tokens",)
        for k in wanted:
            if k in gen:
                trainer["max_completion_length" if k == "max_new_tokens" else k] = gen[k]
        _put_fn(reg, trainer, "formatting", mc.get("formatting_func"))
        _put_fn(reg, trainer, "compute_metrics", mc.get("compute_metrics"))
        funcs = mc.get("reward_funcs")
        if funcs is not None:
            if isinstance(funcs, List):
                raise SpecError("reward_funcs cannot be a List knob; give one list of reward functions")
            funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
            # A dict is one of furnace's built-in rewards ({"kind": "json"}; docs/preference.md).
            taken = [str(f.get("name", f.get("kind"))) for f in funcs if isinstance(f, dict)]
            r = [
                dict(f) if isinstance(f, dict) else {"kind": "function", "name": _reward_name(f, j, taken), "function": reg.add("reward", f)}
                for j, f in enumerate(funcs)
            ]
            if rewards is not None and r != rewards:
                raise SpecError("every config of one experiment must use the same reward_funcs")
            rewards = r
        groups.append({"model": model, "lora": _lora(mc.get("peft_config")), "trainer": trainer})
    if kind == "grpo" and not rewards:
        raise SpecError("GRPO needs reward_funcs in RFModelConfig")
    exp: Dict[str, Any] = {"name": name, "seed": seed, "mode": "fit", "num_chunks": num_chunks}
    exp.update(policy or {})
    out = [table("experiment", exp), table("data", {"train": train_path, "eval": eval_path})]
    out += _sections(groups, ("model", "lora", "trainer"))
    if search is not None:
        out.append(table("search", search))
    for r in rewards or []:
        out.append("[[reward]]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in r.items()) + "\n")
    return "\n".join(out)


def _sections(groups: PyList[Dict[str, Dict[str, Any]]], names: Iterable[str]) -> PyList[str]:
    """One config: plain sections; several: one ``[[group]]`` each holding all of its sections
    (nothing at the top level, so no group inherits another's settings)."""
    names = list(names)
    if len(groups) == 1:
        return [table(n, groups[0][n]) for n in names if groups[0].get(n) is not None]
    out = []
    for g in groups:
        parts = ["[[group]]\n"] + [table(f"group.{n}", g[n]) for n in names if g.get(n) is not None]
        out.append("".join(parts))
    return out


def _flatten(config_group: Any) -> Tuple[PyList[Any], Optional[Dict[str, Any]], Optional[str]]:
    """The configs, the search settings (random) and the trainer type of a config group."""
    search = None
    trainer_type = None
    if isinstance(config_group, (RFGridSearch, RFRandomSearch)):
        trainer_type = config_group.trainer_type
        if isinstance(config_group, RFRandomSearch):
            search = {"kind": "random", "num_runs": config_group.num_runs, "seed": config_group.seed}
        return list(config_group.configs), search, trainer_type
    if isinstance(config_group, (list, tuple)):
        configs: PyList[Any] = []
        for c in config_group:
            sub, s, t = _flatten(c)
            configs += sub
            search = search or s
            trainer_type = trainer_type or t
        return configs, search, trainer_type
    return [config_group], None, None


# ---------------------------------------------------------------- evals


def _rag(spec: Optional[RFLangChainRagSpec]) -> Optional[Dict[str, Any]]:
    if spec is None:
        return None
    out: Dict[str, Any] = {}
    loader = spec.get("document_loader")
    if loader is None:
        raise SpecError("RFLangChainRagSpec needs document_loader (a DirectoryLoader or paths)")
    if isinstance(loader, _Config):
        path = loader.get("path")
        glob = loader.get("glob")
        out["documents"] = [os.path.join(os.path.abspath(path), glob) if glob else os.path.abspath(path)]
    elif isinstance(loader, (str, os.PathLike)):
        out["documents"] = [os.path.abspath(loader)]
    elif isinstance(loader, (list, tuple)):
        out["documents"] = [os.path.abspath(p) for p in loader]
    else:
        raise SpecError(f"document_loader: {type(loader).__name__} is not supported; give a DirectoryLoader or paths")
    splitter = spec.get("text_splitter")
    if splitter is not None:
        kind = splitter.get("kind") or "recursive"
        out["splitter"] = kind
        for k in ("chunk_size", "chunk_overlap", "length"):
            if splitter.get(k) is not None:
                out[k] = splitter.get(k)
    ek = spec.get("embedding_kwargs") or {}
    if ek.get("model_name"):
        out["embedding_model"] = ek["model_name"]
    st = spec.get("search_type")
    if st is not None:
        out["search"] = _map(st, lambda s: {"similarity_score_threshold": "threshold"}.get(s, s))
    sk = spec.get("search_kwargs") or {}
    for k, dst in (("k", "k"), ("fetch_k", "fetch_k"), ("lambda_mult", "lambda_mult"), ("score_threshold", "threshold")):
        if k in sk:
            out[dst] = sk[k]
    rk = spec.get("reranker_kwargs") or {}
    if rk.get("model_name"):
        out["reranker"] = rk["model_name"]
    if rk.get("top_n") is not None:
        out["top_n"] = rk["top_n"]
    tmpl = spec.get("document_template")
    if tmpl is not None:
        if callable(tmpl):
            raise SpecError("document_template: give a Jinja template text such as '{{ text }}' (a function is not supported)")
        out["document_template"] = tmpl
    return out


_SELECTORS = {
    None: "fixed", "fixed": "fixed", "similarity": "similarity", "mmr": "mmr",
    "SemanticSimilarityExampleSelector": "similarity", "MaxMarginalRelevanceExampleSelector": "mmr",
}


def _prompt(pm: Optional[RFPromptManager], work: str, write_rows) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if pm is None:
        return out
    ins = pm.get("instructions")
    if ins is None and pm.get("instructions_file_path"):
        with open(pm.get("instructions_file_path"), encoding="utf-8") as f:
            ins = f.read()
    if ins is not None:
        out["system"] = ins
    if pm.get("template") is not None:
        out["template"] = pm.get("template")
    ex = pm.get("examples")
    if ex:
        out["fewshot"] = write_rows(ex)
        sel = pm.get("example_selector_cls")
        sel = getattr(sel, "__name__", sel)
        if sel not in _SELECTORS:
            raise SpecError(f"example_selector_cls={sel!r}: furnace selects 'fixed', 'similarity' or 'mmr'")
        out["fewshot_selector"] = _SELECTORS[sel]
        out["fewshot_k"] = pm.get("k") or 3
        ek = pm.get("embedding_kwargs") or {}
        if ek.get("model_name"):
            out["fewshot_embedding_model"] = ek["model_name"]
    return out


def _generator(g: Any) -> Dict[str, Any]:
    if isinstance(g, RFvLLMModelConfig):
        mc = g.get("model_config") or {}
        sp = g.get("sampling_params") or {}
        out: Dict[str, Any] = {"kind": "local", "model": mc.get("model", "smollm2-135m-instruct")}
        for k, dst in (("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("stop", "stop")):
            if k in sp:
                out[dst] = sp[k]
        return out
    if isinstance(g, RFOpenAIAPIModelConfig):
        cc = g.get("client_config") or {}
        mc = g.get("model_config") or {}
        out = {"kind": "openai", "model": mc.get("model")}
        if cc.get("base_url"):
            out["base_url"] = cc["base_url"]
        if cc.get("api_key_env"):
            out["api_key_env"] = cc["api_key_env"]
        elif cc.get("api_key"):
            # The key never enters the spec (it is stored): it is read from the environment,
            # from a variable named after the key's hash (two keys, two variables).
            var = "FURNACE_PY_OPENAI_KEY_" + hashlib.sha256(cc["api_key"].encode()).hexdigest()[:12].upper()
            os.environ[var] = cc["api_key"]
            out["api_key_env"] = var
        if cc.get("max_retries") is not None:
            out["max_retries"] = cc["max_retries"]
        if cc.get("timeout") is not None:
            out["timeout_secs"] = cc["timeout"]
        for k, dst in (("max_completion_tokens", "max_tokens"), ("max_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
            if k in mc:
                out[dst] = mc[k]
        if g.get("rpm_limit") is not None:
            out["rpm"] = g.get("rpm_limit")
        if g.get("tpm_limit") is not None:
            out["tpm"] = g.get("tpm_limit")
        return out
    raise SpecError(f"generator: expected RFvLLMModelConfig/RFLocalModelConfig or RFOpenAIAPIModelConfig, got {type(g).__name__}")


_STRATEGIES = {"normal": "normal", "wilson": "wilson", "hoeffding": "hoeffding", "confseq": "confseq"}
# The keys of an evals config dict (RapidFire's; the generator under any of the first five).
_GENERATOR_KEYS = ("generator_config", "vllm_config", "openai_config", "model_config", "generator")
_EVALS_KEYS = set(_GENERATOR_KEYS) | {
    "rag", "prompt_manager", "preprocess_fn", "postprocess_fn", "compute_metrics_fn", "accumulate_metrics_fn",
    "online_strategy_kwargs", "metrics",
    "batch_size",  # accepted, without effect: furnace's engine batches every pipeline's requests
}


def evals_spec(
    name: str,
    config_group: Any,
    data_path: str,
    question: str,
    answers: Optional[str],
    num_shards: int,
    seed: int,
    reg: Registry,
    work: str,
    write_rows,
    policy: Optional[Dict[str, Any]] = None,
) -> str:
    """The spec text of an evals experiment."""
    configs, search, _ = _flatten(config_group)
    groups = []
    metrics: Optional[PyList[Dict[str, Any]]] = None
    exp: Dict[str, Any] = {"name": name, "mode": "evals", "seed": seed}
    for i, c in enumerate(configs):
        if not isinstance(c, dict):
            raise SpecError(f"config {i}: expected a dict with 'generator_config' (or 'model_config'), 'preprocess_fn', ...")
        unknown = sorted(set(c) - _EVALS_KEYS)
        if unknown:
            raise SpecError(f"config {i}: unknown key(s) {unknown}; an evals config takes {', '.join(sorted(_EVALS_KEYS))}")
        g = next((c[k] for k in _GENERATOR_KEYS if c.get(k) is not None), None)
        if g is None:
            raise SpecError(f"config {i}: no 'generator_config' (an RFvLLMModelConfig/RFLocalModelConfig or RFOpenAIAPIModelConfig)")
        gens = g.values if isinstance(g, List) else [g]
        for gi in gens:
            generator = _generator(gi)
            rag = _rag(c.get("rag") or gi.get("rag"))
            prompt = _prompt(c.get("prompt_manager") or gi.get("prompt_manager"), work, write_rows)
            _put_fn(reg, prompt, "preprocess", c.get("preprocess_fn"))
            _put_fn(reg, generator, "postprocess", c.get("postprocess_fn"))
            groups.append({"rag": rag, "prompt": prompt or None, "generator": generator})
        m = []
        if c.get("compute_metrics_fn") is not None:
            fn = c["compute_metrics_fn"]
            if isinstance(fn, List):
                raise SpecError("compute_metrics_fn cannot be a List knob")
            mm: Dict[str, Any] = {"kind": "function", "compute": reg.add("metric", fn)}
            if c.get("accumulate_metrics_fn") is not None:
                mm["accumulate"] = reg.add("accumulate", c["accumulate_metrics_fn"])
            m.append(mm)
        for b in c.get("metrics") or []:
            m.append({"kind": b} if isinstance(b, str) else dict(b))
        if metrics is not None and m != metrics:
            raise SpecError("every config of one experiment must use the same metrics")
        metrics = m
        osk = c.get("online_strategy_kwargs") or {}
        if "strategy_name" in osk:
            if osk["strategy_name"] not in _STRATEGIES:
                raise SpecError(f"strategy_name={osk['strategy_name']!r}: expected normal, wilson, hoeffding or confseq")
            exp["interval"] = _STRATEGIES[osk["strategy_name"]]
        if "confidence_level" in osk:
            exp["confidence"] = osk["confidence_level"]
        if "use_fpc" in osk:
            exp["fpc"] = bool(osk["use_fpc"])
    if not metrics:
        raise SpecError("no metric: give compute_metrics_fn or metrics=['exact_match', ...] in the config")
    exp.update(policy or {})
    data = {"path": data_path, "question": question, "answers": answers, "num_shards": num_shards}
    out = [table("experiment", exp), table("data", data)]
    out += _sections(groups, ("rag", "prompt", "generator"))
    if search is not None:
        out.append(table("search", search))
    for m in metrics:
        out.append("[[metric]]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in m.items()) + "\n")
    return "\n".join(out)


def write_jsonl(rows: Iterable[Dict[str, Any]], folder: str) -> str:
    """Rows to a JSONL file named by its content (so the same data makes the same spec)."""
    lines = [json.dumps(_plain(r), ensure_ascii=False, sort_keys=False) for r in rows]
    if not lines:
        raise SpecError("the dataset has no rows")
    text = "\n".join(lines) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{digest}.jsonl")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def rows_of(dataset: Any, what: str) -> PyList[Dict[str, Any]]:
    """A dataset as a list of dicts: a list of dicts, a pandas DataFrame, an HF
    ``datasets.Dataset``, or a path to a JSONL/JSON/CSV/Parquet file (read by furnace)."""
    if dataset is None:
        raise SpecError(f"{what}: no dataset")
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):
        return dataset.to_dict(orient="records")
    if hasattr(dataset, "to_list") and hasattr(dataset, "features"):
        return dataset.to_list()
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(r, dict) for r in dataset):
            raise SpecError(f"{what}: a list dataset must hold dicts (one per row)")
        return list(dataset)
    try:
        return [dict(r) for r in dataset]
    except (TypeError, ValueError):
        raise SpecError(f"{what}: expected a list of dicts, a pandas DataFrame or a datasets.Dataset, got {type(dataset).__name__}") from None
