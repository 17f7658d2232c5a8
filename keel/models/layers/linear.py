"""Linear layers. Weights are created empty; the loader fills them.

A projection also takes the RMSNorm before it (`norm=`) and can add its result into the residual
stream in place (`add_to=`). With `fused` and a single row (batch-1 decode) one GEMV kernel does
all of it (keel.kernels.gemv); otherwise, with `fused`, cuBLAS runs the product and accumulates into the
stream in its epilogue (an in-place addmm: out of place, torch would first copy the stream, one
more kernel). Unfused, the product is rounded before the add, exactly as transformers does.

Tensor parallelism: a "column" layer holds this rank's slice of the output features, a "row" layer its slice
of the input features (its partial products are summed over the ranks before the bias and the add). Each
weight records `tp_dim`, the dimension of the checkpoint tensor that the ranks split, for the loader.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from keel.distributed.parallel import Parallel, all_reduce, split, tensor_parallel
from keel.kernels.gemv import gemv, gemv_applies
from keel.models.layers.activation import SiluAndMul
from keel.models.layers.norm import RMSNorm

class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, fused: bool = False,
                 parallel: Parallel = None) -> None:
        super().__init__()
        self.parallel = parallel
        if parallel == "column":
            out_features = split(out_features, "output features")
        elif parallel == "row":
            in_features = split(in_features, "input features")
        self.in_features = in_features
        self.out_features = out_features
        self.fused = fused
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        if parallel is not None:
            self.weight.tp_dim = 0 if parallel == "column" else 1
            if self.bias is not None and parallel == "column":
                self.bias.tp_dim = 0

    def forward(self, x: torch.Tensor, norm: Optional[RMSNorm] = None,
                add_to: Optional[torch.Tensor] = None, reduce: bool = True) -> torch.Tensor:
        """norm(x) @ weight.T + bias; with `add_to`, added into that tensor in place and returned. A row-parallel
        layer sums its ranks' partial products; with `reduce` False it returns this rank's partial product (the bias
        in rank 0's) for a caller that sums them itself (data-parallel attention's reduce-scatter)."""
        if self.parallel == "row" and tensor_parallel().size > 1:
            if not reduce and add_to is not None:
                raise ValueError("a partial product (reduce=False) cannot be added into the stream")
            out = self._product(x, norm)
            if reduce:
                out = all_reduce(out)
            if self.bias is not None and (reduce or tensor_parallel().rank == 0):
                out += self.bias
            return out if add_to is None else add_to.add_(out)
        if self.fused and gemv_applies(x, self.weight):
            return gemv(x, self.weight, self.bias, *_norm_args(norm), add_to=add_to)
        if norm is not None:
            x = norm(x)
        if add_to is None:
            return F.linear(x, self.weight, self.bias)
        if not self.fused:  # the reference path: round the product, then add, as transformers does
            return add_to.add_(F.linear(x, self.weight, self.bias))
        add_to.addmm_(x, self.weight.t())
        return add_to if self.bias is None else add_to.add_(self.bias)

    def _product(self, x: torch.Tensor, norm: Optional[RMSNorm]) -> torch.Tensor:
        """norm(x) @ weight.T, without the bias."""
        if self.fused and gemv_applies(x, self.weight):
            return gemv(x, self.weight, None, *_norm_args(norm))
        return F.linear(x if norm is None else norm(x), self.weight)


class FusedLinear(Linear):
    """Several projections of one input stored as one matrix (QKV, gate+up), so they run as one GEMM.

    Checkpoints store the parts separately; each parameter records `shard_sizes` so the loader
    can copy part i into rows [sum(sizes[:i]), sum(sizes[:i+1])).
    """

    def __init__(self, in_features: int, out_sizes: tuple[int, ...], bias: bool = False, fused: bool = False,
                 parallel: Parallel = None) -> None:
        """`parallel` "column": each part is split over the ranks (out_sizes are the whole model's)."""
        if parallel == "column":
            out_sizes = tuple(split(size, "output features") for size in out_sizes)
        super().__init__(in_features, sum(out_sizes), bias, fused)
        if parallel == "column":
            self.parallel = parallel
            for param in self.parameters():
                param.tp_dim = 0
        self.out_sizes = out_sizes
        for param in self.parameters():
            param.shard_sizes = out_sizes


class GateUpLinear(FusedLinear):
    """The [gate; up] projection of a gated MLP, returning silu(gate) * up."""

    def __init__(self, in_features: int, intermediate_size: int, fused: bool = False,
                 parallel: Parallel = None) -> None:
        super().__init__(in_features, (intermediate_size, intermediate_size), fused=fused, parallel=parallel)
        self.act = SiluAndMul(fused)

    def forward(self, x: torch.Tensor, norm: Optional[RMSNorm] = None) -> torch.Tensor:  # type: ignore[override]
        if self.fused and gemv_applies(x, self.weight):
            return gemv(x, self.weight, None, *_norm_args(norm), gate_up=True)
        return self.act(super().forward(x, norm))


def _norm_args(norm: Optional[RMSNorm]) -> tuple[Optional[torch.Tensor], float]:
    return (norm.weight, norm.eps) if norm is not None else (None, 0.0)
