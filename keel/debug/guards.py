"""Named guards for the seed bug classes (DESIGN, "Guards and their debug switches").

Each guard is always on. `KEEL_DEBUG_DISABLE_GUARDS=name[,name]` turns guards off, for tests only: a seed's
test must fail with its guard off and pass with it on (a mutation proof, recorded in docs/guards.md). The
engine logs a warning at start while any guard is off.
"""

from __future__ import annotations

import os

DISABLE_ENV = "KEEL_DEBUG_DISABLE_GUARDS"
GUARDS = {
    "fresh-metadata": "000: attention metadata is built for every forward from that forward's batch, IDLE included",
    "one-plan": "001: the split-KV plan is computed once per forward and read by the kernel and its combine step",
    "mapping-reset": "002: a full page's SWA mapping is cleared when its SWA page is freed, and must be empty when "
                     "the full page is handed out",
    "bounded-write": "003: writes into fixed-size (CUDA-graph) buffers check their extent; padded rows neutralised",
    "optional-explicit": "004: fields that may be absent are declared so, and checked before use",
}


def disabled_guards() -> set[str]:
    names = {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}
    unknown = names - set(GUARDS)
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown guards {sorted(unknown)}; guards: {', '.join(GUARDS)}")
    return names


def guard_on(name: str) -> bool:
    """Whether guard `name` runs (read at every call, so a test can switch it for one engine)."""
    assert name in GUARDS, name
    return name not in disabled_guards()
