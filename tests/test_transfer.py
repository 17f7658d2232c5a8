"""Packed host-to-device column copies."""

from __future__ import annotations

import torch

from keel.transfer import columns_to_device
from tests.helpers import KERNEL_DEVICE


def test_columns_round_trip_with_their_dtypes_and_alignment():
    columns = [([1, 2, 3], torch.int64), ([True, False], torch.bool), ([0.5, -1.25, 3.0], torch.float32),
               ([], torch.int64), (torch.tensor([7, 8], dtype=torch.int32), torch.int64), ([2 ** 62], torch.int64)]
    out = columns_to_device(columns, KERNEL_DEVICE)
    for (values, dtype), tensor in zip(columns, out):
        assert tensor.dtype == dtype and tensor.device.type == KERNEL_DEVICE.type
        assert torch.equal(tensor.cpu(), torch.as_tensor(values, dtype=dtype))
        assert tensor.data_ptr() % 16 == 0  # Triton kernels see the same pointer alignment as before
    out[0][1] = 99  # the views are disjoint: writing one leaves the others alone
    assert out[0].tolist() == [1, 99, 3] and out[1].tolist() == [True, False]
