"""Shared fixtures: tiny random-weight Hugging Face checkpoints, engines, and the end-of-test KV check."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Two test workers on two cores: one thread each, and in their subprocesses, or OpenMP's spinning threads fight
# (tests ran 3-10x slower).
ONE_THREAD = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if ONE_THREAD:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

if ONE_THREAD:
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, in numpy; set before they load

from transformers import AutoModelForCausalLM

import keel
from keel.debug.invariants import STRICT_ENV
from keel.models.byte_tokenizer import save_byte_tokenizer
from keel.models.source import DEMO_NAME, resolve_model
from tests.helpers import build_tiny_hf_model
from tests.spec.eagle_heads import write_eagle_head

# Every engine in the tests checks all KV invariants after every step.
os.environ[STRICT_ENV] = "1"
# Variants marked slow (more page sizes or kinds of a check CI already runs once) run only when this is 1.
FULL_TESTS_ENV = "KEEL_FULL_TESTS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(FULL_TESTS_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"a slow variant CI leaves out; {FULL_TESTS_ENV}=1 runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def keel_cache_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """keel-demo and presets go to pytest's cache folder in the checkout (a temporary folder when
    the cache plugin is off), never the user's cache; keel-demo is trained once per checkout."""
    cache = getattr(pytestconfig, "cache", None)
    path = cache.mkdir("keel-cache") if cache is not None else tmp_path_factory.mktemp("keel-cache")
    os.environ["KEEL_CACHE_DIR"] = str(path)
    # Built here, not by the first server that needs it: a server's start-up has a deadline, and training under a
    # loaded machine can pass it. The other test worker waits for this one (keel.models.source's lock), so the
    # training may take every core.
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        resolve_model(DEMO_NAME)
    finally:
        torch.set_num_threads(threads)
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


@pytest.fixture(scope="session")
def drafters(tiny_model, tmp_path_factory) -> dict[str, dict]:
    """Speculative options by name: n-grams, the target as its own drafter, a noisy copy of it (accepts some
    drafts, not all) and an unrelated random model (accepts almost none)."""
    target, _ = tiny_model("llama3")
    unrelated, _ = tiny_model("llama2")
    noisy = tmp_path_factory.mktemp("noisy-draft")
    model = AutoModelForCausalLM.from_pretrained(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(noisy)
    save_byte_tokenizer(noisy)
    standalone = dict(speculative_algorithm="STANDALONE")
    eagle3 = write_eagle_head(tmp_path_factory.mktemp("eagle3"), target, eagle3=True, draft_vocab_size=300,
                              with_embedding=False)
    eagle = write_eagle_head(tmp_path_factory.mktemp("eagle-identity"), target, eagle3=False, identity=True)
    return {"ngram": dict(speculative_algorithm="NGRAM"),
            "self": dict(standalone, speculative_draft_model_path=str(target)),
            "noisy": dict(standalone, speculative_draft_model_path=str(noisy)),
            "unrelated": dict(standalone, speculative_draft_model_path=str(unrelated)),
            "eagle3": dict(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(eagle3)),
            "eagle": dict(speculative_algorithm="EAGLE", speculative_draft_model_path=str(eagle))}
