"""keel: a fast, memory-safe LLM inference and serving engine."""

from typing import TYPE_CHECKING

from keel.config import EngineConfig
from keel.engine.outputs import RequestOutput, TokenLogprob
from keel.sampling_params import SamplingParams

if TYPE_CHECKING:
    from keel.engine.engine import Engine

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # keel.Engine pulls in the model runner and transformers: imported on first use, so `keel serve` can start
    # its engine process before this process has paid for imports it does not need
    if name == "Engine":
        from keel.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'keel' has no attribute {name!r}")
