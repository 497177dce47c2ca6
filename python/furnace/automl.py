"""Knobs, config groups and config classes, named as RapidFire AI names them.

A config is plain data: the experiment turns it into a furnace spec (TOML) whose knobs
furnace's engine expands into runs, exactly as a spec file given to ``furnace run``.
Every argument of a config class may be a :class:`List` (and, under
:class:`RFRandomSearch`, a :class:`Range`); functions (formatting, metrics, rewards,
pre/post-processing) may be lists too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union


class List:
    """One of these values: ``List([8, 16, 32])``. Every value has the same type."""

    def __init__(self, values: Iterable[Any]):
        values = list(values)
        if not values:
            raise ValueError("List() needs at least one value")
        kinds = {_kind(v) for v in values}
        if len(kinds) > 1:
            raise ValueError(f"List() values must all have one type; got {sorted(kinds)}")
        self.values = values

    def __repr__(self) -> str:
        return f"List({self.values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, List) and other.values == self.values


class Range:
    """A number drawn uniformly in ``[start, end]`` (``dtype`` ``"int"`` or ``"float"``; ``log=True``
    draws on a log scale). Only :class:`RFRandomSearch` (and furnace's TPE) may hold ranges."""

    def __init__(self, start: float, end: float, dtype: Optional[str] = None, log: bool = False):
        if dtype is None:
            dtype = "int" if isinstance(start, int) and isinstance(end, int) else "float"
        if dtype not in ("int", "float"):
            raise ValueError(f"Range dtype must be 'int' or 'float', not {dtype!r}")
        if not end >= start:
            raise ValueError(f"Range({start}, {end}): end must be >= start")
        self.start, self.end, self.dtype, self.log = start, end, dtype, log

    def __repr__(self) -> str:
        return f"Range({self.start!r}, {self.end!r}, dtype={self.dtype!r})"


def _kind(v: Any) -> str:
    if callable(v):
        return "function"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


class _Config:
    """Keyword arguments kept as given (knobs included), with RapidFire's names."""

    _fields: Sequence[str] = ()

    def __init__(self, **kwargs: Any):
        unknown = [k for k in kwargs if self._fields and k not in self._fields]
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown argument(s) {unknown}; it takes {', '.join(self._fields)}"
            )
        self.kwargs = kwargs

    def get(self, key: str, default: Any = None) -> Any:
        return self.kwargs.get(key, default)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{type(self).__name__}({args})"


class RFLoraConfig(_Config):
    """PEFT's ``LoraConfig``: ``r``, ``lora_alpha``, ``lora_dropout`` (0 only),
    ``target_modules`` (names, or ``"all-linear"``), ``init_lora_weights`` (``True`` or
    ``"gaussian"``), ``use_rslora``, ``bias`` (``"none"`` only)."""

    _fields = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "init_lora_weights", "use_rslora", "task_type")


class RFSFTConfig(_Config):
    """TRL's ``SFTConfig`` (the arguments furnace has; see docs/python.md for the mapping)."""

    _fields = (
        "learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "num_train_epochs", "max_steps", "logging_steps", "eval_strategy",
        "eval_steps", "save_strategy", "save_steps", "warmup_steps", "warmup_ratio", "weight_decay",
        "max_grad_norm", "max_length", "max_seq_length", "packing", "group_by_length", "completion_only_loss",
        "fp16", "bf16", "optim", "seed", "report_to", "output_dir", "logging_strategy",
    )


class RFDPOConfig(RFSFTConfig):
    """TRL's ``DPOConfig``: the SFT arguments and ``beta``, ``loss_type``, ``loss_weights``,
    ``label_smoothing``, ``max_prompt_length``, ``max_completion_length``."""

    _fields = RFSFTConfig._fields + (
        "beta", "loss_type", "loss_weights", "label_smoothing", "max_prompt_length", "max_completion_length",
        "model_adapter_name", "ref_adapter_name", "reference_adapter",
    )


class RFGRPOConfig(RFSFTConfig):
    """TRL's ``GRPOConfig``: the SFT arguments and ``num_generations``, ``temperature``,
    ``top_p``, ``top_k``, ``max_completion_length``, ``beta``, ``epsilon``, ``epsilon_high``,
    ``loss_type``, ``scale_rewards``, ``num_iterations``, ``reward_weights``."""

    _fields = RFSFTConfig._fields + (
        "num_generations", "temperature", "top_p", "top_k", "max_prompt_length", "max_completion_length", "beta",
        "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "reward_weights",
        "use_bias_correction_kl",
    )


class RFModelConfig(_Config):
    """One model configuration of a fit experiment: ``model_name`` (a furnace alias such as
    ``smollm2-135m-instruct``, a ``.gguf`` file or an HF folder), ``peft_config``
    (:class:`RFLoraConfig`), ``training_args`` (:class:`RFSFTConfig` / ``RFDPOConfig`` /
    ``RFGRPOConfig``), ``formatting_func``, ``compute_metrics``, ``reward_funcs`` (GRPO),
    ``generation_config`` (GRPO sampling) and ``model_kwargs`` (``{"quantize": "q4"}``:
    the frozen base kept as ``none``/``bf16``/``q8``/``q4``)."""

    _fields = (
        "model_name", "tokenizer", "tokenizer_kwargs", "formatting_func", "compute_metrics", "peft_config",
        "training_args", "model_type", "model_kwargs", "ref_model_name", "ref_model_type", "ref_model_kwargs",
        "reward_funcs", "generation_config",
    )


class RFPromptManager(_Config):
    """How a RAG pipeline's prompt is built: ``instructions`` (or ``instructions_file_path``),
    few-shot ``examples`` (dicts), ``k`` of them, chosen by ``example_selector_cls``
    (``"fixed"``, ``"similarity"`` or ``"mmr"``, or LangChain's selector classes by name)."""

    _fields = (
        "instructions", "instructions_file_path", "examples", "embedding_cls", "embedding_kwargs",
        "example_selector_cls", "example_prompt_template", "k", "template",
    )


class RFLangChainRagSpec(_Config):
    """Retrieval of a RAG pipeline, LangChain-shaped: ``document_loader``
    (:class:`DirectoryLoader` or a path or list of paths), ``text_splitter``
    (:class:`RecursiveCharacterTextSplitter`), ``embedding_cls`` / ``embedding_kwargs``
    (``{"model_name": "all-minilm-l6-v2"}``), ``search_type`` (``similarity``,
    ``similarity_score_threshold``, ``mmr``), ``search_kwargs`` (``k``, ``fetch_k``,
    ``lambda_mult``, ``score_threshold``), ``reranker_cls`` / ``reranker_kwargs``
    (``{"model_name": path, "top_n": 2}``) and ``document_template`` (a Jinja template over
    ``text`` and the metadata)."""

    _fields = (
        "document_loader", "text_splitter", "embedding_cls", "embedding_kwargs", "vector_store", "retriever",
        "search_type", "search_kwargs", "reranker_cls", "reranker_kwargs", "enable_gpu_search",
        "document_template",
    )


class RFvLLMModelConfig(_Config):
    """A generator furnace runs itself (its own engine stands in for vLLM):
    ``model_config={"model": name}``, ``sampling_params={"temperature", "top_p", "max_tokens"}``,
    ``rag``, ``prompt_manager``."""

    _fields = ("model_config", "sampling_params", "rag", "prompt_manager")


#: The same generator under a name that says what it is.
RFLocalModelConfig = RFvLLMModelConfig


class RFOpenAIAPIModelConfig(_Config):
    """A generator behind an OpenAI-compatible API: ``client_config`` (``api_key`` or
    ``api_key_env``, ``base_url``, ``max_retries``, ``timeout``), ``model_config`` (``model``,
    ``temperature``, ``max_completion_tokens``), ``rpm_limit``, ``tpm_limit``, ``rag``,
    ``prompt_manager``."""

    _fields = ("client_config", "model_config", "rpm_limit", "tpm_limit", "rag", "prompt_manager")


class DirectoryLoader(_Config):
    """Documents from a folder (LangChain's name): ``path``, ``glob`` (``"**/*.md"``)."""

    _fields = ("path", "glob", "loader_cls", "show_progress")

    def __init__(self, path: str, glob: Optional[str] = None, **kwargs: Any):
        super().__init__(path=path, glob=glob, **kwargs)


class RecursiveCharacterTextSplitter(_Config):
    """LangChain's recursive splitter: ``chunk_size``, ``chunk_overlap`` (knobs allowed),
    measured in characters, or tokens with :meth:`from_tiktoken_encoder`."""

    _fields = ("chunk_size", "chunk_overlap", "length", "kind")

    @classmethod
    def from_tiktoken_encoder(cls, chunk_size: Any = 256, chunk_overlap: Any = 32, **_: Any) -> "RecursiveCharacterTextSplitter":
        return cls(chunk_size=chunk_size, chunk_overlap=chunk_overlap, length="tokens")


class MarkdownHeaderTextSplitter(RecursiveCharacterTextSplitter):
    """LangChain's Markdown-header splitter (then recursive within a section)."""

    def __init__(self, chunk_size: Any = 512, chunk_overlap: Any = 0, **kwargs: Any):
        super().__init__(chunk_size=chunk_size, chunk_overlap=chunk_overlap, kind="markdown", **kwargs)


ConfigLike = Union[Dict[str, Any], "RFGridSearch", "RFRandomSearch", Sequence[Any]]


class RFGridSearch:
    """Every combination of the :class:`List` knobs of ``configs`` (a dict or a list of dicts);
    ``trainer_type`` ``"SFT"``, ``"DPO"`` or ``"GRPO"`` for fit experiments."""

    def __init__(self, configs: Any, trainer_type: Optional[str] = None):
        self.configs = configs if isinstance(configs, (list, tuple)) else [configs]
        self.trainer_type = trainer_type
        _no_ranges(self.configs)


class RFRandomSearch:
    """``num_runs`` configurations drawn from ``configs``' :class:`List` and :class:`Range`
    knobs with ``seed``."""

    def __init__(self, configs: Any, trainer_type: Optional[str] = None, num_runs: int = 1, seed: int = 42):
        if num_runs < 1:
            raise ValueError("RFRandomSearch num_runs must be >= 1")
        self.configs = configs if isinstance(configs, (list, tuple)) else [configs]
        self.trainer_type = trainer_type
        self.num_runs = num_runs
        self.seed = seed


def _no_ranges(obj: Any, path: str = "configs") -> None:
    if isinstance(obj, Range):
        raise ValueError(f"{path}: RFGridSearch takes List() knobs only; a Range needs RFRandomSearch")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_ranges(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _no_ranges(v, f"{path}[{i}]")
    elif isinstance(obj, _Config):
        for k, v in obj.kwargs.items():
            _no_ranges(v, f"{path}.{k}")


Function = Callable[..., Any]

__all__ = [
    "List", "Range", "RFGridSearch", "RFRandomSearch", "RFModelConfig", "RFLoraConfig", "RFSFTConfig",
    "RFDPOConfig", "RFGRPOConfig", "RFLangChainRagSpec", "RFPromptManager", "RFvLLMModelConfig",
    "RFLocalModelConfig", "RFOpenAIAPIModelConfig", "DirectoryLoader", "RecursiveCharacterTextSplitter",
    "MarkdownHeaderTextSplitter",
]
