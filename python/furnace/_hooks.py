"""User functions written in Python, as furnace's engine calls them.

Each function is registered with the native module under a stable name (``python:`` and
its qualified name, so a notebook cell run again replaces the code behind the same name and
the experiment continues with it) together with a trampoline: the engine hands it one
batch as JSON, the trampoline calls the user's function in the form RapidFire documents
(one row, ``(predictions, labels)``, ``reward(prompts, completions, ...)``, a batch as a
dict of lists) and returns ``{"ok": result}`` or ``{"error": traceback}``. An exception
is never raised into the engine: it becomes that run's failure, with its traceback.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from . import _native

_REGISTERED: Dict[str, Callable[..., Any]] = {}
#: Seconds spent in each user function's calls (decoding, the function, encoding) and
#: the number of calls, by registered name: what Python costs the engine.
TIMINGS: Dict[str, List[float]] = {}


def _plain(v: Any) -> Any:
    """JSON-ready values: numpy scalars and arrays, tuples, NaN kept out."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():
        return v.item()
    if hasattr(v, "tolist") and callable(v.tolist):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class TrainerState(dict):
    """What a reward function gets as ``trainer_state``: TRL passes a ``TrainerState``
    object (``trainer_state.global_step``); this one also reads as a dict."""

    def __init__(self, global_step: int):
        super().__init__(global_step=global_step)
        self.global_step = global_step


def _columns(rows: List[Dict[str, Any]], extra: Optional[Dict[str, List[Any]]] = None) -> Dict[str, List[Any]]:
    """Rows as a dict of lists (RapidFire's batch form), plus extra columns."""
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    batch = {k: [r.get(k) for r in rows] for k in keys}
    for k, v in (extra or {}).items():
        batch[k] = list(v)
    return batch


class _Rag:
    """What a preprocess function receives as ``rag``: the contexts furnace retrieved for this
    batch (``get_context``), by query."""

    def __init__(self, questions: List[str], contexts: List[Optional[str]]):
        self._by_query = {q: c for q, c in zip(questions, contexts)}

    def get_context(self, batch_queries: List[str], use_reranker: bool = True, serialize: bool = True) -> List[str]:
        return [self._by_query.get(q) or "" for q in batch_queries]

    def serialize_documents(self, batch_docs: List[Any]) -> List[str]:
        return ["\n\n".join(map(str, docs)) if isinstance(docs, (list, tuple)) else str(docs) for docs in batch_docs]


class _PromptManager:
    """What a preprocess function receives as ``prompt_manager``."""

    def __init__(self, instructions: Optional[str], examples: List[Dict[str, Any]]):
        self.instructions = instructions
        self.examples = examples

    def get_instructions(self) -> Optional[str]:
        return self.instructions

    def get_fewshot_examples(self, *_: Any, **__: Any) -> List[Dict[str, Any]]:
        return self.examples


def _call(kind: str, fn: Callable[..., Any], arg: Dict[str, Any]) -> Any:
    if kind == "formatting":
        out = []
        for i, row in enumerate(arg["rows"]):
            r = fn(row)
            if not isinstance(r, dict):
                raise TypeError(f"formatting function returned {type(r).__name__} for row {i}; it must return a dict")
            out.append(r)
        return {"rows": out}
    if kind == "compute_metrics":
        r = fn((arg["predictions"], arg["labels"]))
        if not isinstance(r, dict):
            raise TypeError(f"compute_metrics returned {type(r).__name__}; it must return a dict of numbers")
        return {str(k): float(v) for k, v in r.items()}
    if kind == "reward":
        columns = dict(arg.get("columns") or {})
        columns.pop("prompts", None)
        columns.pop("completions", None)
        ids = arg.get("completion_ids")
        r = fn(
            prompts=arg["prompts"],
            completions=arg["completions"],
            completions_ids=ids,  # RapidFire's spelling
            completion_ids=ids,  # TRL's
            trainer_state=TrainerState(arg.get("step", 0)),
            **columns,
        )
        return [float("nan") if v is None else float(v) for v in r]
    if kind == "preprocess":
        rows = arg["rows"]
        batch = _columns(rows, {"context": arg.get("contexts") or [None] * len(rows)})
        batch.setdefault("question", arg.get("questions"))
        rag = _Rag(arg.get("questions") or [], arg.get("contexts") or [])
        pm = _PromptManager(arg.get("instructions"), arg.get("examples") or [])
        r = fn(batch, rag, pm)
        if not isinstance(r, dict) or "prompts" not in r:
            raise TypeError("preprocess_fn must return a dict with a 'prompts' list")
        out = {"prompts": list(r["prompts"])}
        for k, v in r.items():
            if k != "prompts" and k not in batch and isinstance(v, (list, tuple)) and len(v) == len(rows):
                out[k] = list(v)
        return out
    if kind == "postprocess":
        rows = arg.get("rows") or []
        extra = {k: v for k, v in arg.items() if k != "rows"}
        batch = _columns(rows, extra)
        r = fn(batch)
        if not isinstance(r, dict) or "generated_text" not in r:
            raise TypeError("postprocess_fn must return the batch dict with its 'generated_text'")
        return {k: list(v) for k, v in r.items() if isinstance(v, (list, tuple))}
    if kind == "metric":
        rows = arg.get("rows") or []
        extra = {k: v for k, v in arg.items() if k != "rows"}
        r = fn(_columns(rows, extra))
        if not isinstance(r, dict):
            raise TypeError("compute_metrics_fn must return {name: {'value': number}}")
        return {str(k): (v if isinstance(v, dict) else {"value": v}) for k, v in r.items()}
    if kind == "accumulate":
        r = fn(arg)
        if not isinstance(r, dict):
            raise TypeError("accumulate_metrics_fn must return {name: {'value': number, ...}}")
        return r
    raise ValueError(f"unknown user function kind {kind}")


def _trampoline(name: str, kind: str, fn: Callable[..., Any]) -> Callable[[str], str]:
    def call(text: str) -> str:
        start = time.perf_counter()
        try:
            result = _call(kind, fn, json.loads(text))
            return json.dumps({"ok": _plain(result)})
        except Exception:  # noqa: BLE001 - every user error becomes the run's failure
            return json.dumps({"error": traceback.format_exc()})
        finally:
            t = TIMINGS.setdefault(name, [0.0, 0])
            t[0] += time.perf_counter() - start
            t[1] += 1

    return call


def name_of(fn: Callable[..., Any]) -> str:
    """The stable name a function is registered under."""
    module = getattr(fn, "__module__", None) or "main"
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    if module in ("__main__", "__mp_main__"):
        module = "main"
    return f"python:{module}.{qual}".replace(" ", "_")


class Registry:
    """The user functions of one spec: each function gets one name (distinct functions that
    share a qualified name, such as two lambdas, get ``#2``, ``#3``)."""

    def __init__(self) -> None:
        self.names: Dict[Any, str] = {}
        self.entries: Dict[str, Any] = {}

    def add(self, kind: str, fn: Callable[..., Any]) -> str:
        if not callable(fn):
            raise TypeError(f"{kind}: expected a function, got {type(fn).__name__}")
        key = (id(fn), kind)
        if key in self.names:
            return self.names[key]
        base = name_of(fn)
        name, n = base, 1
        while name in self.entries:
            n += 1
            name = f"{base}#{n}"
        self.names[key] = name
        self.entries[name] = (kind, fn)
        return name

    def install(self) -> None:
        for name, (kind, fn) in self.entries.items():
            _native.register_hook(name, _trampoline(name, kind, fn))
            _REGISTERED[name] = fn
