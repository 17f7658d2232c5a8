"""Host <-> device copies that never make the host wait for the device.

A plain `.to("cuda")` of a pageable host tensor synchronizes with the stream, which would stall
overlap scheduling; staging through pinned memory lets the copy queue behind the running forward.
PyTorch's pinned-memory cache keeps a staging block alive until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a host tensor) as a `dtype` tensor on `device`, copied asynchronously."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to the host; valid once an event recorded after this call has fired."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
