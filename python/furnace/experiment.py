"""``furnace.Experiment``: RapidFire AI's ``Experiment`` over furnace's engine."""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Union

from . import _native
from ._hooks import Registry
from ._spec import SpecError, evals_spec, fit_spec, rows_of, toml_value, write_jsonl

RunId = int


class Experiment:
    """A named experiment in ``experiments_path`` (a furnace runs folder: its store, run
    folders, checkpoints), ``mode`` ``"fit"`` (train configs with :meth:`run_fit`) or
    ``"evals"`` (compare pipelines with :meth:`run_evals`).

    Nothing is created until ``run_fit``/``run_evals``: the experiment takes ``experiment_name``
    then, with ``_1``, ``_2``, ... when that name is taken, unless the last experiment of that
    name was interrupted with the same configs and data, which then continues (re-running a
    notebook cell after an interrupt goes on from the checkpoints).

    ``dashboard=True`` serves furnace's dashboard and API for this experiment's folder on
    loopback (``dashboard_url``) while the object lives; the notebook table's buttons post
    IC ops to it.
    """

    def __init__(
        self,
        experiment_name: str,
        mode: str = "fit",
        experiments_path: str = "./furnace_experiments",
        *,
        path: Optional[str] = None,
        dashboard: bool = False,
        dashboard_port: int = 0,
        notebook_origins: Optional[List[str]] = None,
    ):
        if mode in ("eval",):
            mode = "evals"
        if mode not in ("fit", "evals"):
            raise ValueError(f"mode={mode!r}: expected 'fit' or 'evals'")
        if not experiment_name or not isinstance(experiment_name, str):
            raise ValueError("experiment_name must be a non-empty string")
        self.requested_name = experiment_name
        self.name: Optional[str] = None
        self.mode = mode
        self.path = os.path.abspath(path or experiments_path)
        os.makedirs(self.path, exist_ok=True)
        self._channel = _native.Channel()
        self._registry: Optional[Registry] = None
        self._dashboard = None
        self.dashboard_url: Optional[str] = None
        if dashboard:
            origins = notebook_origins if notebook_origins is not None else _default_origins()
            self._dashboard = _native.serve(self.path, self._channel, "127.0.0.1", dashboard_port, origins)
            self.dashboard_url = self._dashboard.url

    # ------------------------------------------------------------ running

    def run_fit(
        self,
        param_config: Any,
        *args: Any,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        num_chunks: int = 4,
        seed: int = 42,
        create_model_fn: Optional[Callable[..., Any]] = None,
        memory_budget: Optional[int] = None,
        policy: Optional[Dict[str, Any]] = None,
        fresh: bool = False,
        display: Optional[bool] = None,
    ) -> "pandas.DataFrame":  # noqa: F821
        """Trains every config of ``param_config`` (a config dict, a list of them,
        :class:`RFGridSearch` or :class:`RFRandomSearch`) on ``train_dataset``, chunk by chunk,
        all runs together; evaluates on ``eval_dataset`` at chunk boundaries. Blocks until
        every run ends; a KeyboardInterrupt stops cleanly (call again to continue).
        RapidFire's positional order ``(config, create_model_fn, train, eval, num_chunks)``
        works too (furnace loads models itself: ``create_model_fn`` is not called).
        ``policy`` sets furnace's ``[experiment]`` scheduling keys, e.g.
        ``{"policy": "asha", "eta": 2}``. Returns :meth:`get_runs_info`."""
        args = list(args)
        if args and (callable(args[0]) or args[0] is None) and not _is_dataset(args[0]):
            create_model_fn = args.pop(0)
        names = ["train_dataset", "eval_dataset", "num_chunks", "seed"]
        given = dict(zip(names, args))
        train_dataset = given.get("train_dataset", train_dataset)
        eval_dataset = given.get("eval_dataset", eval_dataset)
        num_chunks = given.get("num_chunks", num_chunks)
        seed = given.get("seed", seed)
        if create_model_fn is not None:
            warnings.warn("furnace loads models itself (model_name); create_model_fn is not called", stacklevel=2)
        if self.mode != "fit":
            raise RuntimeError(f"experiment {self.requested_name!r} is in mode 'evals': use run_evals")
        data_dir = os.path.join(self.path, ".data")
        train = write_jsonl(rows_of(train_dataset, "train_dataset"), data_dir)
        ev = write_jsonl(rows_of(eval_dataset, "eval_dataset"), data_dir) if eval_dataset is not None else None
        reg = Registry()
        text = fit_spec(self.requested_name, param_config, train, ev, int(num_chunks), int(seed), reg, policy)
        return self._run(text, reg, fresh, memory_budget, display)

    def run_evals(
        self,
        config_group: Any,
        dataset: Any,
        num_shards: int = 4,
        num_actors: Optional[int] = None,
        seed: int = 42,
        *,
        question_column: Optional[str] = None,
        answers_column: Optional[str] = None,
        policy: Optional[Dict[str, Any]] = None,
        fresh: bool = False,
        display: Optional[bool] = None,
    ) -> Dict[int, Any]:
        """Runs every pipeline of ``config_group`` over ``dataset`` shard by shard, each
        metric with a confidence interval that narrows as shards come in. Returns
        ``{run_id: (metrics, cumulative_metrics)}`` as RapidFire does: each metric's final
        ``{"value", "lower", "upper"}`` and its values after every shard. ``num_actors`` is
        accepted for RapidFire's signature and has no effect (furnace batches the pipelines'
        requests on its own engine)."""
        if self.mode != "evals":
            raise RuntimeError(f"experiment {self.requested_name!r} is in mode 'fit': use run_fit")
        rows = rows_of(dataset, "dataset")
        question = question_column or ("question" if "question" in rows[0] else _first_text(rows[0]))
        if question is None:
            raise SpecError("dataset: no text column to use as the question (give question_column=)")
        answers = answers_column or next((c for c in ("answers", "answer", "ground_truth") if c in rows[0]), None)
        data_dir = os.path.join(self.path, ".data")
        path = write_jsonl(rows, data_dir)
        reg = Registry()
        text = evals_spec(
            self.requested_name, config_group, path, question, answers, int(num_shards), int(seed), reg,
            data_dir, lambda ex: write_jsonl(ex, data_dir), policy,
        )
        self._run(text, reg, fresh, None, display)
        return self._evals_results()

    def _run(self, text: str, reg: Registry, fresh: bool, memory_budget: Optional[int], display: Optional[bool]):
        import hashlib

        spec_dir = os.path.join(self.path, ".specs")
        os.makedirs(spec_dir, exist_ok=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        spec_path = os.path.join(spec_dir, f"{_safe(self.requested_name)}-{digest}.toml")
        if not os.path.exists(spec_path):
            with open(spec_path, "w", encoding="utf-8") as f:
                f.write(text)
        self._registry = reg
        reg.install()
        name, continued = _native.create_experiment(self.path, spec_path, fresh)
        self.name = name
        if continued:
            print(f"continuing experiment {name} (interrupted before; fresh=True starts a new one)", file=sys.stderr)
        return self._drive(memory_budget, display)

    def _drive(self, memory_budget: Optional[int] = None, display: Optional[bool] = None):
        from .notebook import Progress

        # This experiment's functions, installed again: another experiment of this process may
        # have registered a different function under the same name since.
        if self._registry is not None:
            self._registry.install()
        view = Progress(self, display)
        view.start()
        try:
            _native.run(self.path, self._require_name(), self._channel, view.on_events, memory_budget)
        finally:
            view.finish()
        if self.mode == "fit":
            return self.get_runs_info()
        return None

    def resume_experiment(self, display: Optional[bool] = None):
        """Continues this experiment's unfinished runs (after an interrupt) with the user
        functions registered now."""
        return self._drive(None, display)

    # ------------------------------------------------------------ results

    def _require_name(self) -> str:
        if self.name is None:
            raise RuntimeError("the experiment has not started: call run_fit or run_evals first")
        return self.name

    def get_runs_info(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per run: ``run_id``, ``status``, progress, lineage, ``error`` (a failed
        user function's traceback), the knobs that vary as columns, and the full ``config``."""
        import pandas as pd

        runs = json.loads(_native.runs(self.path, self._require_name()))
        rows = []
        for r in runs:
            row = {
                "run_id": r["id"],
                "status": r["status"],
                "steps_done": r["steps_done"],
                "total_steps": r["total_steps"],
                "chunks_done": r["chunks_done"],
                "total_chunks": r["total_chunks"],
                "parent_id": r["parent_id"],
                "warm": r["warm"],
                "error": r["error"],
                "knobs": r["knobs"],
                "config": r["config"],
            }
            for k, v in (r["knobs"] or {}).items():
                row[k] = v
            rows.append(row)
        cols = ["run_id", "status", "steps_done", "total_steps", "chunks_done", "total_chunks", "parent_id", "warm", "error", "knobs", "config"]
        return pd.DataFrame(rows, columns=cols + sorted({k for r in rows for k in r} - set(cols)))

    def get_results(self) -> "pandas.DataFrame":  # noqa: F821
        """Every metric of every run at every step, one row per (``run_id``, ``step``) and a
        column per metric (``loss``, ``lr``, ``eval_loss``, your ``eval_<metric>``; in evals
        mode each metric's estimate and ``<metric>_lower`` / ``<metric>_upper``)."""
        import pandas as pd

        res = json.loads(_native.results(self.path, self._require_name()))
        table: Dict[tuple, Dict[str, Any]] = {}
        for m in res["metrics"]:
            table.setdefault((m["run_id"], m["step"]), {})[m["name"]] = m["value"]
        for b in res["bounds"]:
            row = table.setdefault((b["run_id"], b["step"]), {})
            row[f"{b['name']}_lower"] = b["lower"]
            row[f"{b['name']}_upper"] = b["upper"]
        rows = [{"run_id": r, "step": s, **v} for (r, s), v in sorted(table.items())]
        names = sorted({k for r in rows for k in r} - {"run_id", "step"})
        return pd.DataFrame(rows, columns=["run_id", "step"] + names)

    def get_ops(self) -> "pandas.DataFrame":  # noqa: F821
        """The IC ops recorded so far and what became of them."""
        import pandas as pd

        rows = []
        for o in json.loads(_native.ops(self.path, self._require_name())):
            kind = o.pop("kind")
            o.pop("experiment_id", None)
            rows.append({"op_id": o.pop("id"), "run_id": o.pop("run_id"), "op": kind.get("op"), "set": kind.get("set"), "warm": kind.get("warm"), **o})
        cols = ["op_id", "run_id", "op", "set", "warm", "source", "status", "message", "new_run_id", "applied_step", "created"]
        return pd.DataFrame(rows, columns=cols)

    def _evals_results(self) -> Dict[int, Any]:
        res = json.loads(_native.results(self.path, self._require_name()))
        bounds = {(b["run_id"], b["step"], b["name"]): (b["lower"], b["upper"]) for b in res["bounds"]}
        out: Dict[int, Any] = {}
        for m in res["metrics"]:
            final, cumulative = out.setdefault(m["run_id"], ({}, {}))
            lo, hi = bounds.get((m["run_id"], m["step"], m["name"]), (None, None))
            point = {"value": m["value"], "lower": lo, "upper": hi, "step": m["step"]}
            cumulative.setdefault(m["name"], []).append(point)
            if m["name"] not in final or final[m["name"]]["step"] <= m["step"]:
                final[m["name"]] = point
        return out

    # ------------------------------------------------------------ IC ops

    def _op(self, run_id: RunId, op: Dict[str, Any]) -> int:
        return _native.submit_op(self.path, self._require_name(), int(run_id), json.dumps(op))

    def stop(self, run_id: RunId) -> int:
        """Stops a run at its next chunk boundary (its state kept); returns the op id."""
        return self._op(run_id, {"op": "stop"})

    def resume(self, run_id: RunId) -> int:
        """Puts a stopped run back into training."""
        return self._op(run_id, {"op": "resume"})

    def delete(self, run_id: RunId) -> int:
        """Removes a run from views and scheduling (its files are kept)."""
        return self._op(run_id, {"op": "delete"})

    def clone(self, run_id: RunId, changes: Optional[Dict[str, Any]] = None, warm: bool = True) -> int:
        """A new run from ``run_id``'s config with ``changes`` (``{"lora.r": 32}`` or
        ``{"trainer": {"learning_rate": 1e-4}}``), warm-started from its parent's adapter,
        optimizer and data position when ``warm``."""
        sets = [f"{k}={toml_value(v)}" for k, v in _flat(changes or {}).items()]
        return self._op(run_id, {"op": "clone", "set": sets, "warm": bool(warm)})

    def end(self) -> None:
        """Stops the dashboard; the experiment stays in its folder (``furnace runs``,
        ``furnace results`` and a new ``Experiment`` can read it)."""
        if self._dashboard is not None:
            self._dashboard.shutdown()
            self._dashboard = None
            self.dashboard_url = None

    def __enter__(self) -> "Experiment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def __repr__(self) -> str:
        return f"Experiment(name={self.name or self.requested_name!r}, mode={self.mode!r}, path={self.path!r})"


def _flat(changes: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in changes.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _is_dataset(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or hasattr(v, "columns") or hasattr(v, "features")


def _first_text(row: Dict[str, Any]) -> Optional[str]:
    return next((k for k, v in row.items() if isinstance(v, str)), None)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]


def _default_origins() -> List[str]:
    env = os.environ.get("FURNACE_NOTEBOOK_ORIGINS")
    if env:
        return [o.strip() for o in env.split(",") if o.strip()]
    return [f"http://{h}:{p}" for h in ("localhost", "127.0.0.1") for p in (8888, 8889, 8890)]
