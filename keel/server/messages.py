"""The messages between the API process and the engine process (pickled over ZMQ)."""

from __future__ import annotations

from dataclasses import dataclass

from keel.engine.limits import RequestLimits
from keel.engine.outputs import CoreOutput, FinishReason
from keel.sampling_params import SamplingParams

# ---- API process -> engine process


@dataclass(frozen=True)
class AddRequest:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    rid: int
    reason: FinishReason = "abort"  # "stop": the API process found a stop string; the KV may be cached


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- engine process -> API process


@dataclass(frozen=True)
class EngineReady:
    limits: RequestLimits
    page_size: int


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    pages_cached: int  # held by the prefix cache (evictable or locked)
    pages_cached_locked: int
    pages_held: int  # held by requests themselves


@dataclass(frozen=True)
class EngineOutputs:
    """One engine step's outputs; also sent empty, as a heartbeat, at least every HEARTBEAT_S while idle."""

    outputs: list[CoreOutput]
    stats: EngineStats


@dataclass(frozen=True)
class EngineFailed:
    error: str  # the engine process is going down: why
