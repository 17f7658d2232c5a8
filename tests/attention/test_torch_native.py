"""The torch-native backend against dense float32 attention on random paged K/V."""

from __future__ import annotations

import pytest
import torch

from keel.attention.base import AttentionLayer
from keel.attention.torch_native import TorchNativeBackend
from keel.cache.kv_cache import KVCacheManager
from keel.cache.kv_pool import KVPool
from keel.cache.radix import PrefixMatch
from keel.runner.forward_batch import ForwardBatch, ForwardMode

CPU = torch.device("cpu")
HEAD_DIM = 16


def reference(q, keys, values, prefix, window, scale):
    """q: [ext, H, D] at positions prefix.., keys/values: [seq, KVH, D] -> [ext, H*D]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, ext, seq]
    qpos = torch.arange(prefix, prefix + q.shape[0])[:, None]
    kpos = torch.arange(keys.shape[0])[None, :]
    visible = kpos <= qpos
    if window is not None:
        visible &= kpos > qpos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[0], -1)


def run_case(prefix_lens, extend_lens, page_size, heads, kv_heads, window, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = AttentionLayer(0, heads, kv_heads, HEAD_DIM, HEAD_DIM ** -0.5, window)
    kv = KVCacheManager(num_pages=256 // page_size + 8, page_size=page_size, max_requests=8, context_length=256,
                        device=CPU, prefix_cache=False)
    pool = KVPool(1, kv.pages.capacity, page_size, kv_heads, HEAD_DIM, torch.float32, CPU)
    seqs = [p + e for p, e in zip(prefix_lens, extend_lens)]
    keys = [torch.randn(s, kv_heads, HEAD_DIM, generator=g) for s in seqs]
    values = [torch.randn(s, kv_heads, HEAD_DIM, generator=g) for s in seqs]
    owners = list(range(1, len(seqs) + 1))
    for owner in owners:
        kv.admit(owner, PrefixMatch([], None))
    rows_t = torch.tensor([kv.row(o) for o in owners])
    prefix_slots = kv.grow(owners, prefix_lens)  # the cached prefix, written directly
    pool.write(0, prefix_slots, torch.cat([k[:p] for k, p in zip(keys, prefix_lens)]),
               torch.cat([v[:p] for v, p in zip(values, prefix_lens)]))
    new_slots = kv.grow(owners, seqs)
    q = [torch.randn(e, heads, HEAD_DIM, generator=g) for e in extend_lens]
    batch = ForwardBatch(
        mode=mode, device=CPU, seq_lens_cpu=tuple(seqs), extend_lens_cpu=tuple(extend_lens),
        input_ids=torch.zeros(sum(extend_lens), dtype=torch.int64),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seqs)]),
        req_rows=rows_t, seq_lens=torch.tensor(seqs), out_cache_loc=new_slots,
        logits_indices=torch.zeros(0, dtype=torch.int64))
    backend = TorchNativeBackend(kv.table, (window,))
    out = backend.forward(layer, torch.cat(q), torch.cat([k[p:] for k, p in zip(keys, prefix_lens)]),
                          torch.cat([v[p:] for v, p in zip(values, prefix_lens)]), pool,
                          backend.build_metadata(batch))
    expected = torch.cat([reference(qi, k, v, p, window, layer.scale)
                          for qi, k, v, p in zip(q, keys, values, prefix_lens)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for owner in owners:
        kv.release(owner)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_extend_with_prefix(page_size, heads, kv_heads, window):
    # prompt from scratch, one token, exactly a page, page + 1, and extensions after cached prefixes
    run_case([0, 0, 0, 16, 3, 17], [1, 16, 17, 5, 20, 1], page_size, heads, kv_heads, window, ForwardMode.EXTEND)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode(page_size, heads, kv_heads, window):
    run_case([0, 1, 15, 16, 40], [1, 1, 1, 1, 1], page_size, heads, kv_heads, window, ForwardMode.DECODE)


def test_mixed_batch_of_decode_and_extend():
    run_case([12, 0, 7], [1, 9, 1], 4, 8, 2, None, ForwardMode.MIXED)


@pytest.mark.parametrize("mode", [ForwardMode.IDLE, ForwardMode.DECODE, ForwardMode.EXTEND])
def test_empty_batch_gives_empty_output(mode):
    kv = KVCacheManager(num_pages=4, page_size=1, max_requests=2, context_length=8, device=CPU)
    pool = KVPool(1, 4, 1, 2, HEAD_DIM, torch.float32, CPU)
    backend = TorchNativeBackend(kv.table, (None,))
    empty = ForwardBatch.idle(CPU)
    batch = ForwardBatch(mode, CPU, (), (), empty.input_ids, empty.positions, empty.req_rows, empty.seq_lens,
                         empty.out_cache_loc, empty.logits_indices)
    layer = AttentionLayer(0, 4, 2, HEAD_DIM, 0.25, None)
    out = backend.forward(layer, torch.zeros(0, 4, HEAD_DIM), torch.zeros(0, 2, HEAD_DIM),
                          torch.zeros(0, 2, HEAD_DIM), pool, backend.build_metadata(batch))
    assert out.shape == (0, 4 * HEAD_DIM)
    assert (pool.k_cache == 0).all()  # nothing was written
