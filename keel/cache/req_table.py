"""ReqToTokenTable: the device table mapping (request row, token position) -> KV slot.

Attention reads a request's KV through its row. Row 0 is reserved as the padding row: it
stays all zeros, so a padded request reads slot 0 and nothing else.
"""

from __future__ import annotations

import torch

from keel.transfer import columns_to_device


class ReqToTokenTable:
    def __init__(self, num_rows: int, width: int, device: torch.device) -> None:
        self.width = width  # most tokens one request can hold (the context length)
        self.slots = torch.zeros(num_rows + 1, width, dtype=torch.int32, device=device)

    def write(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """slots[rows[i], positions[i]] = slots[i]; host index tensors, checked against the table's extent."""
        if rows.numel() == 0:
            return
        if int(rows.min()) < 1 or int(rows.max()) >= self.slots.shape[0]:
            raise IndexError(f"request-table write to rows outside [1, {self.slots.shape[0]})")
        if int(positions.min()) < 0 or int(positions.max()) >= self.width:
            raise IndexError(f"request-table write to positions outside [0, {self.width})")
        rows_d, positions_d, slots_d = columns_to_device(
            [(rows, torch.int64), (positions, torch.int64), (slots, torch.int32)], self.slots.device)
        self.slots[rows_d, positions_d] = slots_d
