"""The bounded write into CUDA-graph input buffers (the guard itself runs anywhere), and the captured sizes."""

import pytest
import torch

from keel.runner.cuda_graph import MAX_PADDING, capture_sizes, write_all_rows


def test_rows_are_written_and_padding_neutralised():
    static = torch.full((8,), 9)
    write_all_rows([(static, torch.tensor([5, 6, 7]), 1)], size=4)
    assert static.tolist() == [5, 6, 7, 1, 9, 9, 9, 9]  # beyond the graph's size nothing is touched


def test_writes_of_several_dtypes_each_land_in_their_buffer():
    tokens, features, rows = torch.zeros(4, dtype=torch.int64), torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    write_all_rows([(tokens, torch.tensor([3, 4]), 0), (features, torch.ones(2, 3), 0),
                    (rows, torch.tensor([7, 8], dtype=torch.int32), -1)], size=3)  # an int32 source widened
    assert tokens.tolist() == [3, 4, 0, 0] and rows.tolist() == [7, 8, -1, 0]
    assert features[:2].eq(1).all() and features[2:].eq(0).all()


def test_oversized_writes_are_refused():
    static = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(IndexError):
        write_all_rows([(static, torch.arange(5), 0)], size=4)  # more rows than the graph has
    with pytest.raises(IndexError):
        write_all_rows([(static, torch.arange(3), 0)], size=9)  # a graph larger than its buffer
    assert static.eq(0).all()


@pytest.mark.parametrize("max_bs", [1, 2, 10, 63, 64, 100, 256, 257, 512, 1024])
def test_capture_sizes_keep_padding_under_a_tenth_of_every_batch(max_bs):
    sizes = capture_sizes(max_bs)
    assert sizes[0] == 1 and sizes[-1] == max_bs and sizes == sorted(set(sizes))
    for batch in range(1, max_bs + 1):
        size = next(s for s in sizes if s >= batch)  # the graph a batch replays
        assert (size - batch) / size < MAX_PADDING, (batch, size)
    assert len(capture_sizes(256)) <= 40  # and no more graphs than that needs (each costs capture time)
