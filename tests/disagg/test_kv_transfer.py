"""KV transfer between two pools over NIXL (UCX, host memory, in one process): every layer's pages land where the
plan says and nothing else changes, hybrid pools move their window pages too, and what cannot work fails clearly."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from keel.cache.kv_pool import KVPool
from keel.cache.swa_pages import SwaPageMap
from keel.disagg.kv_transfer import (KVTransferAgent, PagePlan, TransferError, TransferState, _runs, check_compatible,
                                     kv_layout)

_names = itertools.count()


def _pool(num_pages: int, page_size: int = 4, swa_layers: frozenset[int] = frozenset(), heads: int = 2) -> KVPool:
    swa = SwaPageMap(torch.zeros(num_pages + 1, dtype=torch.int32), page_size) if swa_layers else None
    return KVPool(3, num_pages, page_size, heads, 8, torch.float32, torch.device("cpu"), swa_layers,
                  num_swa_pages=num_pages // 2 if swa_layers else 0, swa_map=swa)


def _fill(pool: KVPool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for tensor in (pool.k_cache, pool.v_cache, pool.swa_k_cache, pool.swa_v_cache):
        tensor.copy_(torch.randn(tensor.shape, generator=g))


def _pages(cache: torch.Tensor, pages: list[int], page_size: int) -> torch.Tensor:
    """[layers, pages, page_size, heads, dim] of `cache` ([layers, slots, heads, dim])."""
    layers, slots = cache.shape[:2]
    return cache.reshape(layers, slots // page_size, page_size, *cache.shape[2:])[:, pages]


def _agents(prefill_pool: KVPool, decode_pool: KVPool) -> tuple[KVTransferAgent, KVTransferAgent]:
    n = next(_names)
    prefill, decode = KVTransferAgent(f"prefill-{n}", prefill_pool), KVTransferAgent(f"decode-{n}", decode_pool)
    prefill.connect(decode.info())
    return prefill, decode


def _finish(sender: KVTransferAgent, receiver: KVTransferAgent, transfer, timeout_s: float = 10.0) -> list[str]:
    """Poll both sides, as a prefill and a decode engine do at every step, until the transfer is done and its
    notification has arrived (over host memory nothing else drives UCX)."""
    deadline = time.monotonic() + timeout_s
    arrived: list[str] = []
    while sender.poll(transfer) is TransferState.IN_PROGRESS or not arrived:
        arrived += receiver.arrived()
        assert time.monotonic() < deadline, "the transfer never finished"
    return arrived


@pytest.mark.parametrize("src, dst", [([3, 5, 1], [2, 11, 4]),  # scattered: one descriptor per page
                                      ([3, 4, 5, 1, 2, 7], [2, 3, 4, 9, 10, 6])])  # runs consecutive on both sides
def test_a_request_s_pages_land_in_the_planned_pages_of_every_layer(src, dst):
    src_pool, dst_pool = _pool(8), _pool(12)
    _fill(src_pool, 0)
    before = (dst_pool.k_cache.clone(), dst_pool.v_cache.clone())
    prefill, decode = _agents(src_pool, dst_pool)
    try:
        transfer = prefill.write(decode.name, "req-1", PagePlan(tuple(src), tuple(dst)))
        assert _finish(prefill, decode, transfer) == ["req-1"]
        assert transfer.state is TransferState.DONE and transfer.handle is None
        for cache, old, sent in ((dst_pool.k_cache, before[0], src_pool.k_cache),
                                 (dst_pool.v_cache, before[1], src_pool.v_cache)):
            torch.testing.assert_close(_pages(cache, dst, 4), _pages(sent, src, 4), rtol=0, atol=0)
            untouched = [p for p in range(13) if p not in dst]
            torch.testing.assert_close(_pages(cache, untouched, 4), _pages(old, untouched, 4), rtol=0, atol=0)
    finally:
        prefill.close()
        decode.close()


def test_a_hybrid_pool_moves_its_window_pages_with_the_full_ones():
    src_pool, dst_pool = _pool(8, swa_layers=frozenset({1})), _pool(10, swa_layers=frozenset({1}))
    _fill(src_pool, 1)
    prefill, decode = _agents(src_pool, dst_pool)
    try:
        plan = PagePlan((2, 6), (9, 1), src_swa=(3,), dst_swa=(2,))
        assert _finish(prefill, decode, prefill.write(decode.name, "req-2", plan)) == ["req-2"]
        torch.testing.assert_close(_pages(dst_pool.k_cache, [9, 1], 4), _pages(src_pool.k_cache, [2, 6], 4))
        torch.testing.assert_close(_pages(dst_pool.swa_v_cache, [2], 4), _pages(src_pool.swa_v_cache, [3], 4))
        assert not dst_pool.swa_k_cache[:, :8].any()  # its other window pages (page 0, page 1) were not written
    finally:
        prefill.close()
        decode.close()


def test_pools_of_another_geometry_are_refused():
    ours = kv_layout(_pool(8))
    with pytest.raises(TransferError, match="does not match"):
        check_compatible(ours, kv_layout(_pool(8, page_size=8)))
    with pytest.raises(TransferError, match="does not match"):
        check_compatible(ours, kv_layout(_pool(8, heads=1)))
    with pytest.raises(TransferError, match="does not match"):
        check_compatible(ours, kv_layout(_pool(8, swa_layers=frozenset({1}))))
    check_compatible(ours, kv_layout(_pool(20)))  # only the page count differs: fine


def test_what_cannot_be_sent_fails_before_anything_moves():
    src_pool, dst_pool = _pool(8), _pool(8)
    prefill, decode = _agents(src_pool, dst_pool)
    try:
        with pytest.raises(TransferError, match="no connection"):
            prefill.write("nobody", "req-3", PagePlan((1,), (1,)))
        with pytest.raises(TransferError, match="outside"):
            prefill.write(decode.name, "req-4", PagePlan((1,), (9,)))  # past the decode pool's last page
        with pytest.raises(TransferError, match="outside"):
            prefill.write(decode.name, "req-5", PagePlan((0,), (1,)))  # page 0 is reserved for padding
        with pytest.raises(ValueError, match="one to one"):
            PagePlan((1, 2), (1,))
        prefill.disconnect(decode.name)
        with pytest.raises(TransferError, match="no connection"):
            prefill.write(decode.name, "req-6", PagePlan((1,), (1,)))
        assert decode.arrived() == []
        assert not dst_pool.k_cache.any()
    finally:
        prefill.close()
        decode.close()


def test_pages_consecutive_on_both_sides_move_as_one_run():
    first_src, first_dst, lengths = _runs((3, 4, 5, 1, 2, 7, 8), (2, 3, 4, 9, 10, 6, 11))
    assert (first_src.tolist(), first_dst.tolist(), lengths.tolist()) == ([3, 1, 7, 8], [2, 9, 6, 11], [3, 2, 1, 1])
