"""The Triton attention kernels at real sizes, bfloat16, against float32 attention on the same values."""

from __future__ import annotations

import pytest
import torch

from keel.runner.forward_batch import ForwardMode
from tests.attention.test_backends import run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
HEADS = 32


def lengths(page_size: int) -> list[int]:
    """1 token, exactly a page, a page and one, 32k, and something in between."""
    return [1, page_size, page_size + 1, 32768, 1000]


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_kernel(page_size, group):
    seqs = lengths(page_size)
    run_case([s - 1 for s in seqs], [1] * len(seqs), page_size, HEADS, HEADS // group, None, ForwardMode.DECODE,
             "triton", device=CUDA, dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_kernel(page_size, group):
    # fresh prompts of 1 / a page / a page and one, a 32k context extended by 300, and decodes mixed in
    prefixes = [0, 0, 0, 32768 - 300, 999, page_size]
    extends = [1, page_size, page_size + 1, 300, 1, 1]
    run_case(prefixes, extends, page_size, HEADS, HEADS // group, None, ForwardMode.MIXED, "triton", device=CUDA,
             dtype=torch.bfloat16, head_dim=128)


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND])
def test_sliding_window(mode):
    prefixes, extends = ([4095, 32767, 99], [1, 1, 1]) if mode == ForwardMode.DECODE else ([0, 30000, 99], [700, 500, 3])
    run_case(prefixes, extends, 16, HEADS, 8, 4096, mode, "triton", device=CUDA, dtype=torch.bfloat16, head_dim=128)
