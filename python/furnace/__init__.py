"""furnace from Python: hyperparallel LoRA fine-tuning and evaluation with RapidFire AI's
API shape, over furnace's Rust engine (the same one as the ``furnace`` CLI).

    from furnace import Experiment
    from furnace.automl import RFModelConfig, RFLoraConfig, RFSFTConfig, List, RFGridSearch

See docs/python.md for the whole API and how RapidFire's names map to furnace's.
"""

from . import _native
from .automl import (
    DirectoryLoader,
    List,
    MarkdownHeaderTextSplitter,
    Range,
    RecursiveCharacterTextSplitter,
    RFDPOConfig,
    RFGridSearch,
    RFGRPOConfig,
    RFLangChainRagSpec,
    RFLocalModelConfig,
    RFLoraConfig,
    RFModelConfig,
    RFOpenAIAPIModelConfig,
    RFPromptManager,
    RFRandomSearch,
    RFSFTConfig,
    RFvLLMModelConfig,
)
from ._spec import SpecError
from .experiment import Experiment

__version__ = _native.version()

__all__ = [
    "Experiment", "SpecError", "List", "Range", "RFGridSearch", "RFRandomSearch", "RFModelConfig", "RFLoraConfig",
    "RFSFTConfig", "RFDPOConfig", "RFGRPOConfig", "RFLangChainRagSpec", "RFPromptManager", "RFvLLMModelConfig",
    "RFLocalModelConfig", "RFOpenAIAPIModelConfig", "DirectoryLoader", "RecursiveCharacterTextSplitter",
    "MarkdownHeaderTextSplitter", "__version__",
]
