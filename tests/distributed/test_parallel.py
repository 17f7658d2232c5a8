"""The collectives data-parallel attention uses, on two gloo ranks: a reduce-scatter of rows, a row-parallel layer's
partial products (the bias counted once), and an all-to-all of uneven row counts."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from keel.distributed.parallel import (all_reduce, all_to_all_rows, exchange_counts, init_tensor_parallel,
                                       reduce_scatter_rows, shutdown_tensor_parallel)
from keel.models.layers.linear import Linear


def _on_rank(rank: int, init_method: str) -> None:
    init_tensor_parallel(rank, 2, init_method, torch.device("cpu"))
    try:
        g = torch.Generator().manual_seed(0)
        rows = torch.randn(2, 6, 4, generator=g)  # rank r's tensor is rows[r]
        torch.testing.assert_close(reduce_scatter_rows(rows[rank].clone()), rows.sum(0)[3 * rank:3 * rank + 3])

        weight, bias, x = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(3, 8, generator=g)
        layer = Linear(8, 5, bias=True, parallel="row")  # this rank's 4 input features
        layer.weight.copy_(weight[:, 4 * rank:4 * rank + 4])
        layer.bias.copy_(bias)
        mine = x[:, 4 * rank:4 * rank + 4]
        expected = x @ weight.t() + bias
        torch.testing.assert_close(all_reduce(layer(mine, reduce=False)), expected)
        torch.testing.assert_close(layer(mine), expected)

        send = [1, 2] if rank == 0 else [0, 3]  # rows for rank 0, then rank 1
        ours = torch.arange(sum(send), dtype=torch.float32)[:, None] + 10 * rank
        receive = exchange_counts(send, torch.device("cpu"))
        assert receive == ([1, 0] if rank == 0 else [2, 3])
        got = all_to_all_rows(ours, send, receive)
        assert got[:, 0].tolist() == ([0.0] if rank == 0 else [1.0, 2.0, 10.0, 11.0, 12.0])
    finally:
        dist.barrier()
        shutdown_tensor_parallel()


def test_reduce_scatter_partial_products_and_all_to_all_on_two_ranks(tmp_path):
    mp.spawn(_on_rank, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)
