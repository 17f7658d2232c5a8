"""Shared fixtures: tiny random-weight Hugging Face checkpoints, engines, and the end-of-test KV check."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, in numpy; set before they load

import keel
from keel.debug.invariants import STRICT_ENV
from tests.helpers import build_tiny_hf_model

# Every engine in the tests checks all KV invariants after every step.
os.environ[STRICT_ENV] = "1"


@pytest.fixture(scope="session", autouse=True)
def keel_cache_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """keel-demo and presets go to pytest's cache folder in the checkout (a temporary folder when
    the cache plugin is off), never the user's cache; keel-demo is trained once per checkout."""
    cache = getattr(pytestconfig, "cache", None)
    path = cache.mkdir("keel-cache") if cache is not None else tmp_path_factory.mktemp("keel-cache")
    os.environ["KEEL_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """tiny_model(kind) -> (checkpoint directory, the transformers model it holds). Built once per session."""
    built: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(kind: str) -> tuple[Path, torch.nn.Module]:
        if kind not in built:
            directory = tmp_path_factory.mktemp(f"hf-{kind}")
            # The llama3 checkpoint is sharded, so the index-file path is exercised too.
            shard = "40KB" if kind == "llama3" else None
            built[kind] = (directory, build_tiny_hf_model(kind, directory, max_shard_size=shard))
        return built[kind]

    return get


@pytest.fixture
def make_engine() -> Iterator[Callable[..., keel.Engine]]:
    """Engines made through this fixture are checked after the test: drained, invariants intact, and every
    page free again once the prefix cache is flushed."""
    engines: list[keel.Engine] = []

    def make(model: str | Path, **options) -> keel.Engine:
        options.setdefault("dtype", "float32")
        options.setdefault("device", "cpu")
        engine = keel.Engine(str(model), **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.core.check_idle()
        engine.core.flush_cache()
        kv = engine.core.kv_cache
        for pool in (kv.pages,) + ((kv.swa.allocator,) if kv.swa is not None else ()):
            assert pool.num_free == pool.capacity, f"{pool.capacity - pool.num_free} {pool.what}s not free after flush"
