"""keel: a fast, memory-safe LLM inference and serving engine."""

from keel.config import EngineConfig
from keel.engine.engine import Engine
from keel.engine.outputs import RequestOutput, TokenLogprob
from keel.sampling_params import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams", "TokenLogprob"]
__version__ = "0.1.0"
