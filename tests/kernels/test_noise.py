"""The sampler's noise kernels against its torch definition (interpreted on a CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

from keel.kernels.noise import keyed_uniform, race_argmax
from keel.runner import sampler
from tests.helpers import KERNEL_DEVICE


def _torch_uniform(seeds, steps, token_ids):
    return sampler.uniform_noise(seeds.cpu(), steps.cpu(), token_ids.cpu())  # the torch definition, on the CPU


def test_keyed_uniform_is_the_samplers_noise_bit_for_bit():
    seeds = torch.tensor([0, 5, 2**62 + 12345, 2**63 - 1])
    steps = torch.tensor([0, 7, 2**33 + 1, -3])  # a shifted step may be negative; high bits are cut as in torch
    tokens = torch.arange(3000).expand(4, -1)
    got = keyed_uniform(seeds.to(KERNEL_DEVICE), steps.to(KERNEL_DEVICE), tokens.to(KERNEL_DEVICE))
    assert torch.equal(got.cpu(), _torch_uniform(seeds, steps, tokens))
    keys = torch.full((4, 1), 0xFFFFFFFF)  # the verifier's accept key, one column
    got = keyed_uniform(seeds.to(KERNEL_DEVICE), steps.to(KERNEL_DEVICE), keys.to(KERNEL_DEVICE))
    assert torch.equal(got.cpu(), _torch_uniform(seeds, steps, keys))


@pytest.mark.parametrize("sorted_ids", [False, True])
def test_race_argmax_picks_what_the_torch_race_picks(sorted_ids):
    g = torch.Generator().manual_seed(3)
    rows, vocab = 6, 5000  # three chunks of 2,048, the last partial
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 3, dim=-1)
    probs[1, 100:] = 0.0  # most of a row cut off, as top-k does
    seeds, steps = torch.randint(0, 2**62, (rows,), generator=g), torch.randint(0, 1000, (rows,), generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)]) if sorted_ids else None
    want = (probs / -torch.log(_torch_uniform(seeds, steps, ids if sorted_ids else
                                              torch.arange(vocab).expand(rows, -1)))).argmax(dim=-1)
    got = race_argmax(probs.to(KERNEL_DEVICE), seeds.to(KERNEL_DEVICE), steps.to(KERNEL_DEVICE),
                      ids.to(KERNEL_DEVICE) if ids is not None else None)
    assert torch.equal(got.cpu(), want)
    empty = probs[:0].to(KERNEL_DEVICE)
    assert race_argmax(empty, seeds[:0].to(KERNEL_DEVICE), steps[:0].to(KERNEL_DEVICE)).shape == (0,)

