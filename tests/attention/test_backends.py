"""Both attention backends against dense float32 attention on random paged K/V.

The Triton kernels run under TRITON_INTERPRET=1 here (tests/conftest.py sets it without a GPU).
"""

from __future__ import annotations

import pytest
import torch

from keel.attention.base import AttentionLayer, Rotation
from keel.attention import create_backend
from keel.cache.kv_cache import KVCacheManager
from keel.cache.kv_pool import KVPool
from keel.cache.radix import PrefixMatch
from keel.models.config import RopeConfig
from keel.models.layers.rotary import RotaryEmbedding
from keel.runner.forward_batch import ForwardBatch, ForwardMode
from tests.helpers import KERNEL_DEVICE

HEAD_DIM = 16


def reference(q, keys, values, prefix, window, scale, visible=None, softcap=None):
    """q: [ext, H, D] at positions prefix.., keys/values: [seq, KVH, D] -> [ext, H*D]; `visible` ([ext, seq])
    replaces the causal (and window) mask; `softcap` caps the scores (cap * tanh(score / cap))."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, ext, seq]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if visible is None:
        qpos = torch.arange(prefix, prefix + q.shape[0], device=q.device)[:, None]
        kpos = torch.arange(keys.shape[0], device=q.device)[None, :]
        visible = kpos <= qpos
        if window is not None:
            visible &= kpos > qpos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[0], -1)


BACKENDS = ["torch", "triton"]


def run_case(prefix_lens, extend_lens, page_size, heads, kv_heads, window, mode, backend_name="torch", seed=0,
             device=None, dtype=torch.float32, head_dim=HEAD_DIM, rotate=False, softcap=None, hybrid=False):
    """Random paged K/V and queries through a backend, against dense float32 attention on the same values.
    float32 must agree to 1e-5; other dtypes to a relative error (norm of the difference) under 1e-2.
    With `rotate`, the backend also applies a rotary embedding to q and the new keys (the reference
    rotates them in float32 first). With `hybrid`, the layer is a sliding-window layer of a hybrid pool: its K/V
    go through the full->SWA page map (SWA pages numbered apart from the full ones), and the prefix's pages
    behind the window of the first new token have given their SWA pages back before the forward."""
    device = device or (KERNEL_DEVICE if backend_name == "triton" else torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    layer = AttentionLayer(0, heads, kv_heads, head_dim, head_dim ** -0.5, window, softcap)
    context = max(p + e for p, e in zip(prefix_lens, extend_lens)) + page_size
    num_pages = sum(prefix_lens) // page_size + sum(extend_lens) + 2 * len(prefix_lens) + 8
    kv = KVCacheManager(num_pages=num_pages, page_size=page_size, max_requests=8, context_length=context,
                        device=device, prefix_cache=False, num_swa_pages=num_pages + 3 if hybrid else 0,
                        window=window if hybrid else None)
    swa_map = kv.swa.device_map if kv.swa is not None else None
    if kv.swa is not None:
        kv.swa.allocator.alloc(torch.tensor([99, 99, 99]))  # so no SWA page has the number of its full page
    pool = KVPool(1, kv.pages.capacity, page_size, kv_heads, head_dim, dtype, device,
                  frozenset({0}) if hybrid else frozenset(), num_pages + 3 if hybrid else 0, swa_map)
    seqs = [p + e for p, e in zip(prefix_lens, extend_lens)]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    keys = [rand(s, kv_heads, head_dim) for s in seqs]
    values = [rand(s, kv_heads, head_dim) for s in seqs]
    owners = list(range(1, len(seqs) + 1))
    for owner in owners:
        kv.admit(owner, PrefixMatch([], None))
    rows_t = torch.tensor([kv.row(o) for o in owners], device=device)
    prefix_slots = kv.grow(owners, prefix_lens).to(device)  # the cached prefix, written directly
    pool.write(0, swa_map.slots(prefix_slots) if swa_map else prefix_slots,
               torch.cat([k[:p] for k, p in zip(keys, prefix_lens)]),
               torch.cat([v[:p] for v, p in zip(values, prefix_lens)]))
    kv.free_out_of_window(owners, prefix_lens)  # no-op without a hybrid pool
    new_slots = kv.grow(owners, seqs).to(device)
    q = [rand(e, heads, head_dim) for e in extend_lens]
    batch = ForwardBatch(
        mode=mode, device=device, seq_lens_cpu=tuple(seqs), extend_lens_cpu=tuple(extend_lens),
        input_ids=torch.zeros(sum(extend_lens), dtype=torch.int64, device=device),
        positions=torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seqs)]).to(device),
        req_rows=rows_t, seq_lens=torch.tensor(seqs, device=device), out_cache_loc=new_slots,
        logits_indices=torch.zeros(0, dtype=torch.int64, device=device))
    backend = create_backend(backend_name, kv.table, [layer], swa_map)
    queries, new_keys = torch.cat(q), torch.cat([k[p:] for k, p in zip(keys, prefix_lens)])
    rotation = None
    if rotate:
        rotary = RotaryEmbedding(head_dim, RopeConfig(theta=10000.0), context).to(device)
        rotation = Rotation(rotary, batch.positions)
        rotated_q, rotated_keys = rotary(batch.positions, queries.float(), new_keys.float())
        q = list(rotated_q.to(dtype).split(extend_lens))
        keys = [torch.cat([k[:p], new.to(dtype)]) for k, p, new in zip(keys, prefix_lens, rotated_keys.split(extend_lens))]
    out = backend.forward(layer, queries.clone(), new_keys.clone(),
                          torch.cat([v[p:] for v, p in zip(values, prefix_lens)]), pool,
                          backend.build_metadata(batch), rotation)
    expected = torch.cat([reference(qi.float(), k.float(), v.float(), p, window, layer.scale, softcap=softcap)
                          for qi, k, v, p in zip(q, keys, values, prefix_lens)])
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        error = ((out.float() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, f"relative error {error:.2e}"
    for owner in owners:
        kv.release(owner)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_extend_with_prefix(page_size, heads, kv_heads, window, backend):
    # prompt from scratch, one token, exactly a page, page + 1, and extensions after cached prefixes
    run_case([0, 0, 0, 16, 3, 17], [1, 16, 17, 5, 40, 1], page_size, heads, kv_heads, window, ForwardMode.EXTEND,
             backend)


@pytest.mark.parametrize("tile", ["SMALL_TILE", "LARGE_TILE"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window", [None, 5])
def test_triton_extend_with_each_tile(tile, page_size, window, monkeypatch):
    """Both tiles (the large one is taken by long prefills on GPUs), with prefixes longer than a key block so the
    unmasked key blocks run, query blocks cut short, and blocks laid out longest first."""
    from keel.kernels import extend_attention

    monkeypatch.setattr(extend_attention, "extend_tile", lambda lens: getattr(extend_attention, tile))
    run_case([0, 130, 70, 0], [200, 5, 140, 1], page_size, 8, 2, window, ForwardMode.EXTEND, "triton")


def test_extend_blocks_start_with_the_longest_running():
    from keel.kernels.extend_attention import SMALL_TILE, plan_extend_blocks

    blocks = plan_extend_blocks((70, 5), torch.device("cpu"), SMALL_TILE)
    assert blocks.block_req.tolist() == [1, 0, 0, 0] and blocks.block_start.tolist() == [0, 64, 32, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode(page_size, heads, kv_heads, window, backend):
    run_case([0, 1, 15, 16, 40, 300], [1, 1, 1, 1, 1, 1], page_size, heads, kv_heads, window, ForwardMode.DECODE,
             backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotate", [False, True])
def test_mixed_batch_of_decode_and_extend(backend, rotate):
    run_case([12, 0, 7], [1, 9, 1], 4, 8, 2, None, ForwardMode.MIXED, backend, rotate=rotate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND])
@pytest.mark.parametrize("window", [None, 5])
def test_softcapped_scores(backend, mode, window):
    """Gemma 2's soft-capping (cap 0.5, far below these random scores, so every score is bent)."""
    extend = [1, 1, 1, 1] if mode == ForwardMode.DECODE else [1, 9, 17, 4]
    run_case([0, 3, 16, 40], extend, 4, 8, 2, window, mode, backend, softcap=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND])
@pytest.mark.parametrize("page_size,window", [(1, 3), (4, 3), (4, 9), (16, 5), (16, 20)])
@pytest.mark.parametrize("softcap", [None, 0.5])
def test_sliding_window_layers_of_a_hybrid_pool(backend, mode, page_size, window, softcap):
    """Windows smaller and larger than a page, read through the SWA page map after the pages behind the window
    went back (their map entries point at the reserved page)."""
    extend = [1, 1, 1, 1] if mode == ForwardMode.DECODE else [1, 9, 17, 4]
    run_case([0, 3, 16, 40], extend, page_size, 8, 2, window, mode, backend, softcap=softcap, hybrid=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_rotation(backend):
    run_case([0, 5, 40], [1, 1, 1], 4, 8, 2, None, ForwardMode.DECODE, backend, rotate=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [ForwardMode.IDLE, ForwardMode.DECODE, ForwardMode.EXTEND])
@pytest.mark.parametrize("rotate", [False, True])
def test_empty_batch_gives_empty_output(mode, backend, rotate):
    device = KERNEL_DEVICE if backend == "triton" else torch.device("cpu")
    kv = KVCacheManager(num_pages=4, page_size=1, max_requests=2, context_length=8, device=device)
    pool = KVPool(1, 4, 1, 2, HEAD_DIM, torch.float32, device)
    layer = AttentionLayer(0, 4, 2, HEAD_DIM, 0.25, None)
    backend = create_backend(backend, kv.table, [layer])
    empty = ForwardBatch.idle(device)
    batch = ForwardBatch(mode, device, (), (), empty.input_ids, empty.positions, empty.req_rows, empty.seq_lens,
                         empty.out_cache_loc, empty.logits_indices)
    out = backend.forward(layer, torch.zeros(0, 4, HEAD_DIM, device=device), torch.zeros(0, 2, HEAD_DIM, device=device),
                          torch.zeros(0, 2, HEAD_DIM, device=device), pool, backend.build_metadata(batch),
                          Rotation(RotaryEmbedding(HEAD_DIM, RopeConfig(theta=10000.0), 8).to(device), empty.positions)
                          if rotate else None)
    assert out.shape == (0, 4 * HEAD_DIM)
    assert (pool.k_cache == 0).all()  # nothing was written


@pytest.mark.parametrize("min_keys", [1, 8, 64])
def test_triton_decode_with_many_splits(min_keys, monkeypatch):
    """Small split thresholds: up to the cap's splits per request (27 here, in scratch 32 wide; a lone request
    64), some of them empty."""
    from keel.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "MIN_KEYS_PER_SPLIT", min_keys)
    run_case([0, 2, 30, 64, 100], [1, 1, 1, 1, 1], 4, 8, 2, None, ForwardMode.DECODE, "triton")
    run_case([100], [1], 4, 8, 2, None, ForwardMode.DECODE, "triton")
    run_case([0, 2, 30, 64, 100], [1, 1, 1, 1, 1], 4, 8, 2, 7, ForwardMode.DECODE, "triton")


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_decode_of_a_batch_that_fills_the_gpu_unsplit(page_size, monkeypatch):
    """A batch large enough that no request splits (here: a target of one program): the grid has one split per
    request, and no combine step runs."""
    from keel.kernels import decode_attention

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the combine step was launched for a batch planned as one split per request")

    monkeypatch.setattr(decode_attention, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(decode_attention, "FEW_LANES_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(decode_attention, "_decode_combine_kernel", NotLaunched())
    for window in (None, 5):
        run_case([0, 1, 15, 16, 40, 300], [1] * 6, page_size, 8, 2, window, ForwardMode.DECODE, "triton")


def test_decode_planner_is_one_decision_per_request():
    from keel.kernels.decode_attention import (FEW_LANES, FEW_LANES_TARGET_PROGRAMS, MAX_SPLITS, MIN_KEYS_PER_SPLIT,
                                               TARGET_PROGRAMS, plan_decode_splits)

    m, cap = MIN_KEYS_PER_SPLIT, min(MAX_SPLITS, -(-FEW_LANES_TARGET_PROGRAMS // 5))  # 5 requests, one KV head
    seq_lens = torch.tensor([1, m, m + 1, cap * m + 1, 100000])
    splits = plan_decode_splits(seq_lens, num_kv_heads=1, window=None)
    assert splits.counts.tolist() == [1, 1, 2, cap, cap] and splits.cap == cap
    assert splits.width >= cap and splits.width & (splits.width - 1) == 0 and splits.width < 2 * cap
    assert plan_decode_splits(seq_lens, 1, window=3 * m + 1).counts.tolist() == [1, 1, 2, 4, 4]
    # a full GPU needs no splitting: 256 requests x 8 KV heads already fill it (no combine step then)
    full = plan_decode_splits(torch.full((256,), 100000), 8, None)
    assert full.cap == 1 and full.counts.max() == 1
    # past FEW_LANES (request, KV head) pairs the smaller target holds
    many = plan_decode_splits(torch.full((FEW_LANES // 8 + 1,), 100000), 8, None)
    assert many.cap == min(MAX_SPLITS, -(-TARGET_PROGRAMS // (FEW_LANES + 8)))


def random_tree_bits(size: int, g: torch.Generator) -> list[int]:
    """Ancestor bits of a random tree of `size` nodes in parent-first order (node 0 the root)."""
    bits = [1]
    for i in range(1, size):
        bits.append(bits[int(torch.randint(0, i, (1,), generator=g))] | (1 << i))
    return bits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("decode_layout", [False, True])
def test_draft_tree_mask(backend, page_size, decode_layout):
    """Draft trees after cached prefixes: each tree token sees the whole prefix and, of its tree, only its ancestors
    and itself. Extend layout (a tree per request, as in a MIXED batch) and decode layout (a row per tree token, as
    in TARGET_VERIFY and the drafter's tree steps); a request without a tree rides along (NOT_IN_TREE)."""
    from keel.runner.forward_batch import NOT_IN_TREE, TreeMask

    device = KERNEL_DEVICE if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    heads, kv_heads = 8, 2
    layer = AttentionLayer(0, heads, kv_heads, HEAD_DIM, HEAD_DIM ** -0.5, None)
    prefix_lens, sizes = [5, 40, 16, 9], [8, 13, 64, 1]  # the last: one plain decode token
    trees = [random_tree_bits(n, g) if n > 1 else [] for n in sizes]
    seqs = [p + n for p, n in zip(prefix_lens, sizes)]
    kv = KVCacheManager(num_pages=sum(seqs) + 8, page_size=page_size, max_requests=8, context_length=max(seqs) + 16,
                        device=device, prefix_cache=False)
    pool = KVPool(1, kv.pages.capacity, page_size, kv_heads, HEAD_DIM, torch.float32, device)
    owners = [1, 2, 3, 4]
    for owner in owners:
        kv.admit(owner, PrefixMatch([], None))
    keys = [torch.randn(s, kv_heads, HEAD_DIM, generator=g).to(device) for s in seqs]
    values = [torch.randn(s, kv_heads, HEAD_DIM, generator=g).to(device) for s in seqs]
    pool.write(0, kv.grow(owners, prefix_lens).to(device), torch.cat([k[:p] for k, p in zip(keys, prefix_lens)]),
               torch.cat([v[:p] for v, p in zip(values, prefix_lens)]))
    new_slots = kv.grow(owners, seqs).to(device)
    q = [torch.randn(n, heads, HEAD_DIM, generator=g).to(device) for n in sizes]
    starts = [p if tree else NOT_IN_TREE for p, tree in zip(prefix_lens, trees) for _ in range(len(tree) or 1)]
    bits = [b - (b >> 63 << 64) for tree in trees for b in (tree or [0])]  # as int64: bit 63 is the sign
    rows = [kv.row(o) for o in owners]
    if decode_layout:
        row_of = [r for r, n in zip(rows, sizes) for _ in range(n)]
        seq_lens = [p + i + 1 for p, n in zip(prefix_lens, sizes) for i in range(n)]
        extend_lens = [1] * len(seq_lens)
    else:
        row_of, seq_lens, extend_lens = rows, seqs, sizes
    batch = ForwardBatch(
        ForwardMode.TARGET_VERIFY if decode_layout else ForwardMode.MIXED, device, tuple(seq_lens),
        tuple(extend_lens),
        torch.zeros(sum(sizes), dtype=torch.int64, device=device),
        torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seqs)]).to(device),
        torch.tensor(row_of, device=device), torch.tensor(seq_lens, device=device), new_slots,
        torch.zeros(0, dtype=torch.int64, device=device),
        tree=TreeMask(torch.tensor(starts, device=device), torch.tensor(bits, device=device)))
    backend = create_backend(backend, kv.table, [layer])
    out = backend.forward(layer, torch.cat(q), torch.cat([k[p:] for k, p in zip(keys, prefix_lens)]),
                          torch.cat([v[p:] for v, p in zip(values, prefix_lens)]), pool, backend.build_metadata(batch),
                          None)
    expected = []
    for qi, k, v, p, tree in zip(q, keys, values, prefix_lens, trees):
        visible = torch.ones(len(qi), len(k), dtype=torch.bool, device=device)
        for i, b in enumerate(tree):
            visible[i, p:] = torch.tensor([bool(b >> j & 1) for j in range(len(k) - p)], device=device)
        expected.append(reference(qi, k, v, p, None, layer.scale, visible))
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)
    for owner in owners:
        kv.release(owner)
