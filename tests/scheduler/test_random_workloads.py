"""Randomized scheduler workloads: every non-aborted request gets the output it gets alone.

Each seed draws a workload (see workloads.py): prompt lengths including 1 and exactly a page,
shared prefixes, staggered arrivals, aborts at random steps, page size 1/4/16, a KV pool one
request large plus a few pages, chunked or mixed prefill, fcfs or lpm, radix cache on or off,
and forced retraction. The engine checks every KV invariant after every step
(KEEL_STRICT_CHECKS=1) and at the end the pool must be free once the prefix cache is flushed.

The same workloads run on hybrid sliding-window models too (a tiny Qwen2 whose second layer slides and a tiny
Mistral whose layers all do, window 8, with small sliding-window pools), against their own solo runs.

The same workloads run again with speculative decoding (an n-gram drafter, the target as its own draft
model, an unrelated one, or a random EAGLE-3 head, drafting chains of 3 tokens; or the target or the EAGLE-3
head drafting trees; backoff on or off, overlap as the workload draws it): outputs must still equal each
request's solo run.

Replay one seed: KEEL_WORKLOAD_SEED=17 pytest tests/scheduler/test_random_workloads.py
More seeds:      KEEL_WORKLOADS=2000 KEEL_SPEC_WORKLOADS=2000 KEEL_HYBRID_WORKLOADS=2000 pytest \
                     tests/scheduler/test_random_workloads.py
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

import keel
from keel.debug import invariants
from tests.helpers import assert_same_greedy
from tests.scheduler.workloads import Workload, make_workload
from tests.spec.eagle_heads import write_eagle_head

SEEDS = ([int(os.environ["KEEL_WORKLOAD_SEED"])] if "KEEL_WORKLOAD_SEED" in os.environ
         else range(int(os.environ.get("KEEL_WORKLOADS", "200"))))
SPEC_SEEDS = ([int(os.environ["KEEL_WORKLOAD_SEED"])] if "KEEL_WORKLOAD_SEED" in os.environ
              else range(int(os.environ.get("KEEL_SPEC_WORKLOADS", "40"))))
HYBRID_SEEDS = ([int(os.environ["KEEL_WORKLOAD_SEED"])] if "KEEL_WORKLOAD_SEED" in os.environ
                else range(int(os.environ.get("KEEL_HYBRID_WORKLOADS", "40"))))
HYBRID_KINDS = ["qwen2-window", "mistral"]
STATS: Counter = Counter()


@pytest.fixture(scope="module")
def solo_engine(tiny_model):
    directory, _ = tiny_model("llama3")
    return keel.Engine(str(directory), device="cpu", dtype="float32", chunked_prefill_size=None)


@pytest.fixture(scope="module")
def hybrid_solo_engines(tiny_model):
    """Each hybrid kind's engine for solo runs: full KV (the hybrid pool off), no chunking."""
    return {kind: keel.Engine(str(tiny_model(kind)[0]), device="cpu", dtype="float32", chunked_prefill_size=None,
                              disable_hybrid_swa_memory=True) for kind in HYBRID_KINDS}


@pytest.fixture(scope="module", autouse=True)
def report_stats():
    """Counts the invariant checker's real calls, and prints the totals at the end."""
    import keel.engine.core as core_module

    def counted(check):
        def wrapper(*args, **kwargs):
            STATS["checks"] += 1
            return check(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core_module, "check_invariants", counted(core_module.check_invariants))
        patch.setattr(core_module, "check_idle", counted(core_module.check_idle))
        yield
    print(f"\nrandom workloads: {STATS['workloads']} workloads, {STATS['requests']} requests "
          f"({STATS['aborted']} aborted), {STATS['steps']} steps, {STATS['checks']} invariant checks, "
          f"{STATS['retractions']} retractions, {STATS['chains verified']} chains and {STATS['trees verified']} "
          "draft trees verified")


def run_workload(core, workload: Workload) -> tuple[dict[int, keel.RequestOutput], set[int]]:
    """Drive the core step by step with arrivals and aborts; returns outputs per request index."""
    outputs: dict[int, keel.RequestOutput] = {}
    rids: dict[int, int] = {}
    aborted: set[int] = set()
    step = 0
    while step <= max(r.arrival_step for r in workload.requests) or core.has_work:
        for i, req in enumerate(workload.requests):
            if req.arrival_step == step:
                rids[core.add_request(req.prompt, req.params)] = i
                outputs[i] = keel.RequestOutput(str(i), None, req.prompt, logprobs=[])
            if req.abort_step == step and i in outputs and not outputs[i].finished:
                rid = next(r for r, j in rids.items() if j == i)
                core.abort(rid)
                aborted.add(i)
        for out in core.step():
            result = outputs[rids[out.rid]]
            result.token_ids += out.token_ids
            result.logprobs += out.logprobs or []
            result.finish_reason = out.finish_reason
            STATS["verified"] += bool(out.num_draft_tokens)
        step += 1
        STATS["steps"] += 1
    return outputs, aborted


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed={s}")
def test_random_workload(seed, tiny_model, solo_engine, monkeypatch):
    check_workload(make_workload(seed), seed, tiny_model, solo_engine, monkeypatch)


@pytest.mark.parametrize("seed", HYBRID_SEEDS, ids=lambda s: f"seed={s}")
def test_random_workload_hybrid(seed, tiny_model, hybrid_solo_engines, monkeypatch):
    workload = make_workload(seed)
    kind = HYBRID_KINDS[seed % len(HYBRID_KINDS)]
    # the workload's kv_cache_tokens sizes the full pool (mistral: the window pool); the window pool gets a
    # small share, which kv_plan raises to a chunk and a window
    workload.options["swa_full_tokens_ratio"] = [0.05, 0.3, 1.0][seed // len(HYBRID_KINDS) % 3]
    check_workload(workload, seed, tiny_model, hybrid_solo_engines[kind], monkeypatch, kind)


@pytest.fixture(scope="module")
def eagle3_head(tiny_model, tmp_path_factory):
    return write_eagle_head(tmp_path_factory.mktemp("eagle3"), tiny_model("llama3")[0], eagle3=True)


@pytest.mark.parametrize("seed", SPEC_SEEDS, ids=lambda s: f"seed={s}")
def test_random_workload_speculative(seed, tiny_model, solo_engine, eagle3_head, monkeypatch):
    workload = make_workload(seed)
    target, _ = tiny_model("llama3")
    drafter = [dict(speculative_algorithm="NGRAM"),
               dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(target)),
               dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tiny_model("llama2")[0])),
               dict(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(eagle3_head)),
               dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(target),
                    speculative_num_steps=3, speculative_eagle_topk=4, speculative_num_draft_tokens=8),
               dict(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(eagle3_head),
                    speculative_num_steps=4, speculative_eagle_topk=2, speculative_num_draft_tokens=6)]
    workload.options.update(drafter[seed % len(drafter)], disable_speculative_backoff=bool(seed // len(drafter) % 2))
    check_workload(workload, seed, tiny_model, solo_engine, monkeypatch)


def check_workload(workload: Workload, seed: int, tiny_model, solo_engine, monkeypatch, kind: str = "llama3") -> None:
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", str(workload.retract_every))
    directory, _ = tiny_model(kind)
    engine = keel.Engine(str(directory), device="cpu", dtype="float32", **workload.options)
    assert (engine.core.kv_cache.swa is not None) == (kind in HYBRID_KINDS)
    retractions = Counter()
    original = engine.core.scheduler._retract
    engine.core.scheduler._retract = lambda req: (retractions.update([1]), original(req))[1]
    replay = f"replay: KEEL_WORKLOAD_SEED={seed} pytest {__file__}\n{workload.describe()}"
    verified_before = STATS["verified"]
    try:
        outputs, aborted = run_workload(engine.core, workload)
    except Exception as e:
        raise AssertionError(f"workload failed: {e}\n{replay}") from e
    for i, req in enumerate(workload.requests):
        if i in aborted:
            continue
        solo = solo_engine.generate([req.prompt], req.params)[0]
        assert_same_greedy(outputs[i], solo, f"request {i}\n{replay}")
    invariants.check_idle(engine.core.scheduler)
    engine.core.flush_cache()
    kv = engine.core.kv_cache
    for pool in (kv.pages,) + ((kv.swa.allocator,) if kv.swa is not None else ()):
        assert pool.num_free == pool.capacity, replay
    STATS.update(workloads=1, requests=len(workload.requests), aborted=len(aborted),
                 retractions=sum(retractions.values()))
    if workload.options.get("speculative_algorithm"):
        kind = "trees" if workload.options.get("speculative_eagle_topk", 1) > 1 else "chains"
        STATS[f"{kind} verified"] += STATS["verified"] - verified_before
