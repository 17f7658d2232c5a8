"""Fixtures of the disaggregation tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from keel.engine.core import EngineCore


@pytest.fixture
def closing() -> Iterator[Callable[..., tuple[EngineCore, ...]]]:
    """closing(*cores) -> cores, each closed (its NIXL agent released) after the test."""
    cores: list[EngineCore] = []

    def keep(*made: EngineCore) -> tuple[EngineCore, ...]:
        cores.extend(made)
        return made

    yield keep
    for core in cores:
        core.close()
