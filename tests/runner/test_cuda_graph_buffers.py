"""The bounded write into CUDA-graph input buffers (the guard itself runs anywhere)."""

import pytest
import torch

from keel.runner.cuda_graph import capture_sizes, write_all_rows


def test_rows_are_written_and_padding_neutralised():
    static = torch.full((8,), 9)
    write_all_rows([(static, torch.tensor([5, 6, 7]), 1)], size=4)
    assert static.tolist() == [5, 6, 7, 1, 9, 9, 9, 9]  # beyond the graph's size nothing is touched


def test_oversized_writes_are_refused():
    static = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(IndexError):
        write_all_rows([(static, torch.arange(5), 0)], size=4)  # more rows than the graph has
    with pytest.raises(IndexError):
        write_all_rows([(static, torch.arange(3), 0)], size=9)  # a graph larger than its buffer
    assert static.eq(0).all()


def test_capture_sizes_end_at_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(10) == [1, 2, 4, 8, 10]
    assert capture_sizes(256)[-1] == 256 and capture_sizes(256) == sorted(set(capture_sizes(256)))
