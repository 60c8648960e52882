"""gptcpp: GPT-2 inference on the CPU with a C++ core, exact to transformers."""
from . import _core
from .config import ConfigError, GPT2Config
from .generation import GenerationResult, ScoreResult, TokenLogprob
from .loading import CheckpointError, bundled_models
from .model import GPT2
from .tokenizer import GPT2Tokenizer

__version__ = "0.1.0"


def cpu_info() -> dict:
    """What the CPU offers, which instruction-set levels can run, the one in use, and the kernel choices made
    for this CPU ("tuning": variants that measured faster on it; they never change results)."""
    return _core.cpu_info()


__all__ = ["GPT2", "GPT2Config", "GPT2Tokenizer", "GenerationResult", "ScoreResult", "TokenLogprob",
           "CheckpointError", "ConfigError", "bundled_models", "cpu_info", "__version__"]
