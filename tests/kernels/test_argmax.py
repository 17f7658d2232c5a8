"""The greedy argmax kernel against torch.argmax (interpreted on a CPU)."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.argmax import CHUNK, argmax_rows
from tests.helpers import KERNEL_DEVICE


@pytest.mark.parametrize("n", [7, 2048, 10000])  # under one chunk, exactly one, several with a partial last
def test_argmax_matches_torch(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).to(KERNEL_DEVICE)
    x[1, n // 2] = 100.0
    x[2] = float("-inf")  # all -inf: index 0, like torch
    x[3, :] = 1.0  # ties everywhere: the first index
    x[4, n - 1] = 100.0  # in the last (partial) chunk
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert argmax_rows(x[:0]).shape == (0,)


def test_argmax_prefers_the_first_of_tied_maxima_across_chunks():
    x = torch.zeros(2, 3 * CHUNK + 5).to(KERNEL_DEVICE)
    x[0, 2 * CHUNK + 1] = x[0, CHUNK + 7] = x[0, CHUNK + 3] = 2.0  # chunk 1 holds the first, at 3
    x[1, 3 * CHUNK + 4] = x[1, 3 * CHUNK] = 1.0  # only the last (partial) chunk holds the maximum
    assert argmax_rows(x).tolist() == [CHUNK + 3, 3 * CHUNK]
