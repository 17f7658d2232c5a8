"""KV transfer bandwidth: one request's KV pages written from a prefill pool into a decode pool through keel's NIXL
layer (keel.disagg.kv_transfer), against a plain torch copy of the same number of bytes between the same devices.

    keel bench kv-transfer --model llama-3.1-8b --tokens 1024 8192 32768 --devices cuda:0 cuda:1

The pools are sized from the model's config (every layer in one full-attention pool, the checkpoint's dtype); no
weights are loaded. A request of T tokens moves ceil(T / page_size) whole pages of every layer's K and V.
`--order shuffled` spreads its pages over each pool at random; `churned` takes them from keel's page allocator after
a run of random requests has taken and freed pages, as after long serving; `contiguous` uses pages 1..n on both
sides. A transfer is timed from `write` until `poll` reports it done (the setup part, building and
posting the descriptors, also on its own); the median of the repeats after warm-up is reported. Before timing,
each size is checked once: the decode pool is zeroed, one transfer runs, and every moved page must equal its
source page (compared by exact per-page checksums, so no page has to cross devices for the check).

The decode side runs in a process of its own, as a real decode server does. `--same-process` keeps both agents in
this one, which starts faster (the CPU test uses it), but on GPUs UCX cannot use CUDA IPC inside one process and
emulates the write over TCP loopback (1,024 tokens of llama-3.1-8b within one H200: 0.34 GB/s, against 4.7 GB/s
over CUDA IPC from two processes). Runs on CPUs too (`--devices cpu cpu`: host memory, UCX's shared-memory transports).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from keel.bench.common import append_result, environment
from keel.cache.kv_pool import KVPool
from keel.cache.page_allocator import PageAllocator
from keel.disagg.kv_transfer import AgentInfo, KVTransferAgent, PagePlan, TransferError, TransferState
from keel.models.loader import load_model_config
from keel.models.source import resolve_model


@dataclass(frozen=True)
class PoolSpec:
    """The geometry both sides build their pools with (each on its own device)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_size: int
    pages: int  # usable pages, page 0 (reserved) not counted

    @property
    def page_bytes(self) -> int:
        """One page of every layer's K and V."""
        return self.page_size * KVPool.bytes_per_token(self.layers, self.kv_heads, self.head_dim, self.dtype)

    def make(self, device: torch.device) -> KVPool:
        return KVPool(self.layers, self.pages, self.page_size, self.kv_heads, self.head_dim, self.dtype, device)


@dataclass
class Row:
    order: str
    tokens: int
    bytes: int
    nixl_s: float  # write until done, median
    setup_s: float  # the write call alone (descriptors built and posted), median
    copy_s: float  # torch peer copy of the same bytes, median
    correct: bool

    @property
    def nixl_gbps(self) -> float:
        return self.bytes / self.nixl_s / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.bytes / self.copy_s / 1e9


def page_checksums(pool: KVPool, pages: Sequence[int]) -> torch.Tensor:
    """An exact fingerprint of each (K or V, layer, page) of `pages`: its bytes weighted by position, summed in
    int64 (a plain sum would miss bytes swapped within a page). On the CPU, [2 * layers, len(pages)]."""
    sums = []
    index = torch.as_tensor(list(pages), device=pool.k_cache.device)
    for cache in (pool.k_cache, pool.v_cache):
        paged = cache.reshape(cache.shape[0], -1, pool.page_size * cache[0, 0].numel())  # [layers, pages, elems]
        for layer in paged:  # one layer at a time: an int64 copy of every layer at once could outgrow the device
            data = layer[index].view(torch.uint8).to(torch.int64)
            weights = torch.arange(data.shape[1], device=data.device) % 65521 + 1
            sums.append((data * weights).sum(dim=1))
    return torch.stack(sums).cpu()


class DecodeSide:
    """The receiving server's half: a pool on its device and the agent over it."""

    def __init__(self, spec: PoolSpec, device: str, name: str) -> None:
        self.name = name
        self.pool = spec.make(_device(device))
        self.agent = KVTransferAgent(name, self.pool, progress_thread=True)  # it idles while the writer times

    def info(self) -> AgentInfo:
        return self.agent.info()

    def clear(self) -> None:
        self.pool.k_cache.zero_()
        self.pool.v_cache.zero_()
        _sync([self.pool.k_cache.device])

    def wait_for(self, note: str, timeout_s: float) -> None:
        """Until the writer's notification `note` has arrived."""
        deadline = time.monotonic() + timeout_s
        while note not in self.agent.arrived():
            if time.monotonic() > deadline:
                raise TransferError(f"the notification {note!r} never arrived")

    def checksums(self, pages: Sequence[int]) -> torch.Tensor:
        return page_checksums(self.pool, pages)

    def close(self) -> None:
        self.agent.close()


class ChildDecodeSide:
    """A DecodeSide in a process of its own, as a decode server is; its methods run there, through a pipe."""

    def __init__(self, spec: PoolSpec, device: str, name: str) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")  # a forked child would inherit this process's CUDA state
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_decode_side, args=(child, spec, device, name), daemon=True)
        self._process.start()
        self._reply()  # its pool and agent are ready

    def _reply(self) -> Any:
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"the decode-side process failed: {value}")
        return value

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):  # only attributes not set yet (as while unpickling): no remote call
            raise AttributeError(method)

        def call(*args: Any) -> Any:
            self._conn.send((method, args))
            return self._reply()
        return call

    def close(self) -> None:
        self._conn.send(("close", ()))
        self._reply()
        self._process.join(timeout=30)


def _serve_decode_side(conn: Any, spec: PoolSpec, device: str, name: str) -> None:
    try:
        side = DecodeSide(spec, device, name)
    except Exception as e:
        conn.send((False, repr(e)))
        return
    conn.send((True, None))
    while True:
        method, args = conn.recv()
        try:
            conn.send((True, getattr(side, method)(*args)))
        except Exception as e:
            conn.send((False, repr(e)))
        if method == "close":
            return


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # UCX registers and copies in the current device's context
    return device


def _sync(devices: Sequence[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def plan_pages(tokens: int, spec: PoolSpec, order: str, rng: random.Random) -> PagePlan:
    """The pages of one request of `tokens` tokens on each side (page 0 is reserved on both)."""
    n = math.ceil(tokens / spec.page_size)
    if order == "contiguous":
        return PagePlan(tuple(range(1, n + 1)), tuple(range(1, n + 1)))
    if order == "churned":
        return PagePlan(churned_pages(n, spec, rng), churned_pages(n, spec, rng))
    return PagePlan(tuple(rng.sample(range(1, spec.pages + 1), n)), tuple(rng.sample(range(1, spec.pages + 1), n)))


def churned_pages(n: int, spec: PoolSpec, rng: random.Random, steps: int = 2000) -> tuple[int, ...]:
    """n pages as keel's page allocator hands them out after serving a while: `steps` requests of 1 to 1/16 of
    the pool's pages each take pages, and live ones are freed at random (half the steps, or when room runs out)."""
    allocator, live = PageAllocator(spec.pages, spec.page_size), {}
    for owner in range(1, steps + 1):
        want = rng.randint(1, max(1, spec.pages // 16))
        while live and (rng.random() < 0.5 or allocator.num_free < want):
            freed = rng.choice(list(live))
            allocator.free(live.pop(freed), freed)
            if allocator.num_free >= want:
                break
        live[owner] = allocator.alloc(torch.full((want,), owner, dtype=torch.int64))
    while allocator.num_free < n:
        freed = rng.choice(list(live))
        allocator.free(live.pop(freed), freed)
    return tuple(allocator.alloc(torch.full((n,), steps + 1, dtype=torch.int64)).tolist())


def time_write(prefill: KVTransferAgent, decode: Any, note: str, plan: PagePlan,
               timeout_s: float) -> tuple[float, float]:
    """(seconds until the transfer is done, seconds the write call took), then waits for its notification."""
    start = time.perf_counter()
    transfer = prefill.write(decode.name, note, plan)
    posted = time.perf_counter()
    while prefill.poll(transfer) is TransferState.IN_PROGRESS:
        if time.perf_counter() - start > timeout_s:
            prefill.release(transfer)
            raise TransferError(f"{note}: not done after {timeout_s} s")
    done = time.perf_counter()
    if transfer.state is TransferState.FAILED:
        raise TransferError(f"{note}: the transfer failed")
    decode.wait_for(note, timeout_s)  # outside the timing: the notification follows the data
    return done - start, posted - start


def peer_copy_seconds(nbytes: int, src: torch.device, dst: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of one contiguous `dst.copy_(src)` of `nbytes` between the two devices."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=src)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    times = []
    for i in range(warmup + repeats):
        _sync([src, dst])
        start = time.perf_counter()
        b.copy_(a)
        _sync([src, dst])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pool_spec(args: argparse.Namespace) -> PoolSpec:
    config = load_model_config(resolve_model(args.model))
    pages = math.ceil(max(args.tokens) / args.page_size)
    return PoolSpec(args.layers or config.num_layers, config.num_kv_heads, config.head_dim, config.checkpoint_dtype,
                    args.page_size, pages + pages // 4 + 1)  # slack, so that shuffled pages spread


def measure(args: argparse.Namespace, spec: PoolSpec) -> list[Row]:
    rng, rows = random.Random(0), []
    with contextlib.ExitStack() as stack:
        decode = (DecodeSide if args.same_process else ChildDecodeSide)(spec, args.devices[1], "bench-decode")
        stack.callback(decode.close)
        src_device = _device(args.devices[0])  # after the decode side: in this process it made its device current
        pool = spec.make(src_device)
        generator = torch.Generator(src_device).manual_seed(0)
        for cache in (pool.k_cache, pool.v_cache):
            cache.normal_(generator=generator)
        _sync([src_device])
        prefill = KVTransferAgent("bench-prefill", pool)
        stack.callback(prefill.close)
        prefill.connect(decode.info())
        for order in args.order:
            for tokens in args.tokens:
                plan = plan_pages(tokens, spec, order, rng)
                decode.clear()
                time_write(prefill, decode, f"check-{order}-{tokens}", plan, args.timeout)
                correct = torch.equal(page_checksums(pool, plan.src_full), decode.checksums(plan.dst_full))
                timings = [time_write(prefill, decode, f"{order}-{tokens}-{i}", plan, args.timeout)
                           for i in range(args.warmup + args.repeats)][args.warmup:]
                nbytes = len(plan.src_full) * spec.page_bytes
                copy_s = peer_copy_seconds(nbytes, src_device, torch.device(args.devices[1]), args.repeats,
                                           args.warmup)
                rows.append(Row(order, tokens, nbytes, statistics.median(t for t, _ in timings),
                                statistics.median(s for _, s in timings), copy_s, correct))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'order':<10} {'tokens':>7} {'MiB':>9} {'nixl ms':>9} {'setup ms':>9} {'nixl GB/s':>10} "
             f"{'copy GB/s':>10} {'ratio':>6} correct"]
    for r in rows:
        lines.append(f"{r.order:<10} {r.tokens:>7} {r.bytes / 2**20:>9.1f} {r.nixl_s * 1e3:>9.3f} "
                     f"{r.setup_s * 1e3:>9.3f} {r.nixl_gbps:>10.2f} {r.copy_gbps:>10.2f} "
                     f"{r.nixl_gbps / r.copy_gbps:>6.3f} {'yes' if r.correct else 'NO'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3.1-8b", help="preset or model directory (its config only)")
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count (tests)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768], help="request lengths")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--order", nargs="+", choices=["shuffled", "churned", "contiguous"], default=["shuffled"],
                        help="where the request's pages lie in each pool")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--devices", nargs=2, default=["cuda:0", "cuda:1"], metavar=("PREFILL", "DECODE"))
    parser.add_argument("--same-process", action="store_true",
                        help="the decode side in this process (on GPUs UCX then falls back to TCP: far slower)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one transfer may take")
    parser.add_argument("--result-file", default="bench_results.jsonl")


def run(args: argparse.Namespace) -> list[Row]:
    spec = pool_spec(args)
    rows = measure(args, spec)
    mode = "one process" if args.same_process else "two processes"
    print(f"{args.model}: {spec.layers} layers x {spec.kv_heads} KV heads x {spec.head_dim} ({spec.dtype}), "
          f"page {spec.page_size} tokens = {spec.page_bytes / 2**10:.0f} KiB of K+V over all layers; "
          f"{args.devices[0]} -> {args.devices[1]}, {mode}")
    print(format_table(rows))
    for row in rows:
        append_result(args.result_file, {
            **environment(torch.device(args.devices[0])), "bench": "kv_transfer", "model": args.model,
            "layers": spec.layers, "page_size": spec.page_size, "devices": args.devices, "mode": mode,
            **asdict(row), "nixl_gbps": row.nixl_gbps, "copy_gbps": row.copy_gbps})
    return rows
