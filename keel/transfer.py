"""Host <-> device copies that never make the host wait for the device.

A plain `.to("cuda")` of a pageable host tensor synchronizes with the stream, which would stall
overlap scheduling; staging through pinned memory lets the copy queue behind the running forward.
PyTorch's pinned-memory cache keeps a staging block alive until its copy has run.

Python lists become tensors through the `array` module: `torch.tensor` inspects every element of a
list (256 ints: 79 us against 24 us through `array.array`, on this project's 2-core CI machine), and
a decode step at batch 256 builds a dozen such columns.
"""

from __future__ import annotations

import array
import numpy as np
import torch

_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d", torch.bool: "B"}


def host_tensor(values: object, dtype: torch.dtype) -> torch.Tensor:
    """`values` (a list of Python numbers, or a tensor) as a host tensor of `dtype`."""
    return torch.from_numpy(_host_array(values, dtype)).view(dtype)


def _host_array(values: object, dtype: torch.dtype) -> np.ndarray:
    """`values` as a flat numpy array of `dtype`'s bytes layout (bool as uint8), shaped as given for tensors."""
    if isinstance(values, torch.Tensor):
        host = values.to("cpu", dtype).contiguous()
        return host.view(torch.uint8).numpy() if dtype == torch.bool else host.numpy()
    code = _ARRAY_CODES.get(dtype)
    flat = isinstance(values, range) or (isinstance(values, list) and not (values and isinstance(values[0], list)))
    if code is None or not flat:  # nested lists, tuples, numpy arrays: torch works out the shape
        return _host_array(torch.as_tensor(values, dtype=dtype), dtype)
    return np.frombuffer(array.array(code, values), dtype=np.uint8 if dtype == torch.bool else code)


def to_device(values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a host tensor) as a `dtype` tensor on `device`, copied asynchronously."""
    host = host_tensor(values, dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def columns_to_device(columns: list[tuple[object, torch.dtype]], device: torch.device) -> list[torch.Tensor]:
    """Several host columns (values, dtype) as device tensors, in one copy: packed into one pinned
    byte buffer (each column 16-byte aligned), copied once, and viewed back per column. A decode
    step's ~15 small columns cost ~1 us of copy-engine time each on the forward's stream otherwise."""
    hosts = [_host_array(values, dtype) for values, dtype in columns]
    offsets = [0]
    for host in hosts:
        offsets.append(offsets[-1] + -(-host.nbytes // 16) * 16)
    packed = torch.empty(max(offsets[-1], 16), dtype=torch.uint8, pin_memory=device.type == "cuda")
    packed_bytes = packed.numpy()
    for host, offset in zip(hosts, offsets):
        packed_bytes[offset:offset + host.nbytes] = host.reshape(-1).view(np.uint8)
    on_device = packed.to(device, non_blocking=True)
    return [_view(on_device, offset, host, dtype) for host, offset, (_, dtype) in zip(hosts, offsets, columns)]


def _view(packed: torch.Tensor, offset: int, host: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    column = packed[offset:offset + host.nbytes].view(dtype)
    return column if host.ndim == 1 else column.reshape(host.shape)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to the host; valid once an event recorded after this call has fired."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
