"""ForwardBatch: everything one model forward needs, as an immutable value.

The scheduler builds one per step; the runner and the attention backend only read it. Fields
typed `DeviceTensor` live on the model's device, fields typed `HostInts` are plain Python on
the host (known without a device sync); `__post_init__` checks that the two agree.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass
from typing import Annotated, Optional

import torch

from keel.distributed.dp_attention import DpRound

DeviceTensor = Annotated[torch.Tensor, "device"]
HostInts = tuple[int, ...]


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prompt tokens (possibly after a cached prefix)
    DECODE = "decode"  # one new token per request
    MIXED = "mixed"  # extend and decode requests in one batch
    IDLE = "idle"  # no tokens; still a valid forward (data-parallel ranks with nothing to do)
    # speculative decoding
    # The target scores each request's last token and its drafts, laid out as decode rows: one row per token,
    # each attending to the KV up to its own position (the drafts' KV is stored before attention reads it), and
    # within a draft tree only to its ancestors (`tree`).
    TARGET_VERIFY = "target_verify"
    DRAFT_EXTEND = "draft_extend"  # a draft model writes its KV for the tokens of the target's forward
    DRAFT_DECODE = "draft_decode"  # a draft model runs decode rows (its own proposals, or a verify's tokens)

    @property
    def is_decode(self) -> bool:
        """One token per row, read through the decode kernels (and a CUDA graph when one is captured). IDLE counts:
        zero rows, or only padding rows in a data-parallel decode round."""
        return self in (ForwardMode.DECODE, ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_DECODE, ForwardMode.IDLE)


NOT_IN_TREE = 2**31 - 1  # TreeMask.starts of a token outside any draft tree: every key before it is visible


@dataclass(frozen=True)
class TreeMask:
    """Which tokens of a draft tree each token sees. A tree's tokens sit at consecutive table positions from its
    root's; a key at position starts[t] + j is visible to token t only if bit j of bits[t] is set (its ancestors
    and itself), a key before starts[t] always is (causally). Tokens outside trees have starts == NOT_IN_TREE."""

    starts: torch.Tensor  # [num_tokens] int64, the table position of the token's tree root
    bits: torch.Tensor  # [num_tokens] int64


@dataclass(frozen=True)
class ForwardBatch:
    mode: ForwardMode
    device: torch.device
    # host, one entry per request (per row, in decode layouts)
    # KV length of each request after this forward (of each row: up to its token); None when only the device
    # knows them (after a verify step in flight, see PendingTokens.shifts)
    seq_lens_cpu: Optional[HostInts]
    extend_lens_cpu: HostInts  # tokens each request adds in this forward (1 when decoding)
    # device
    input_ids: DeviceTensor  # [num_tokens] int64, the requests' new tokens back to back
    positions: DeviceTensor  # [num_tokens] int64
    req_rows: DeviceTensor  # [batch_size] int64, rows of the request->token table
    seq_lens: DeviceTensor  # [batch_size] int64
    out_cache_loc: DeviceTensor  # [num_tokens] int64, KV slot each new token is written to
    logits_indices: DeviceTensor  # [num_sampled] int64, token indices whose logits are sampled
    # [num_tokens, dim]: hidden states an EAGLE head reads with each token (the target's, or its own); None
    # for every other model, and the runner refuses a head's batch without them (guard optional-explicit)
    input_features: Optional[torch.Tensor] = None
    tree: Optional[TreeMask] = None  # draft trees being verified or drafted; None when no token is in one
    dp: Optional[DpRound] = None  # under data-parallel attention, the round this forward takes part in

    def __post_init__(self) -> None:
        for name in _DEVICE_FIELDS:
            tensor = getattr(self, name)
            if not _placed_on(tensor, self.device):
                raise ValueError(f"ForwardBatch.{name} is on {tensor.device}, expected {self.device}")
        bs = len(self.extend_lens_cpu)
        if ((self.seq_lens_cpu is not None and len(self.seq_lens_cpu) != bs) or self.req_rows.numel() != bs
                or self.seq_lens.numel() != bs):
            raise ValueError("ForwardBatch per-request fields disagree on the batch size")
        num_tokens = sum(self.extend_lens_cpu)
        features = self.input_features
        if features is not None and (features.shape[0] != num_tokens or not _placed_on(features, self.device)):
            raise ValueError(f"ForwardBatch.input_features is {list(features.shape)} on {features.device}, "
                             f"expected {num_tokens} rows on {self.device}")
        tensors = {name: getattr(self, name) for name in ("input_ids", "positions", "out_cache_loc")}
        if self.tree is not None:
            tensors.update({"tree.starts": self.tree.starts, "tree.bits": self.tree.bits})
            if not (_placed_on(self.tree.starts, self.device) and _placed_on(self.tree.bits, self.device)):
                raise ValueError(f"ForwardBatch.tree is not on {self.device}")
        for name, tensor in tensors.items():
            if tensor.numel() != num_tokens:
                raise ValueError(f"ForwardBatch.{name} has {tensor.numel()} entries, "
                                 f"expected {num_tokens} (sum of extend_lens_cpu)")

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @classmethod
    def idle(cls, device: torch.device) -> "ForwardBatch":
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return cls(ForwardMode.IDLE, device, (), (), empty, empty, empty, empty, empty, empty)

    @classmethod
    def draft_rows(cls, input_ids: torch.Tensor, positions: torch.Tensor, req_rows: torch.Tensor,
                   seq_lens: torch.Tensor, slots: torch.Tensor, features: Optional[torch.Tensor] = None,
                   tree: Optional[TreeMask] = None) -> "ForwardBatch":
        """A DRAFT_DECODE batch of single-token rows, lengths on the device only, every row's logits sampled."""
        n, device = input_ids.numel(), input_ids.device
        return cls(ForwardMode.DRAFT_DECODE, device, None, (1,) * n, input_ids, positions, req_rows, seq_lens, slots,
                   torch.arange(n, device=device), features, tree)

    def padded_to(self, rows: int) -> "ForwardBatch":
        """This decode batch with padding rows appended up to `rows`: each reads and writes only the reserved
        padding slot (request-table row PAD_ROW, KV slot PAD_SLOT, length 1) and is not sampled."""
        extra = rows - self.batch_size
        assert self.mode.is_decode and self.tree is None and self.input_features is None and extra >= 0

        def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([tensor, torch.full((extra,), value, dtype=tensor.dtype, device=tensor.device)])

        return ForwardBatch(self.mode, self.device, None if self.seq_lens_cpu is None else
                            self.seq_lens_cpu + (PAD_SEQ_LEN,) * extra, self.extend_lens_cpu + (1,) * extra,
                            pad(self.input_ids, 0), pad(self.positions, 0), pad(self.req_rows, PAD_ROW),
                            pad(self.seq_lens, PAD_SEQ_LEN), pad(self.out_cache_loc, PAD_SLOT), self.logits_indices,
                            dp=self.dp)


# A padding row (CUDA-graph padding, data-parallel decode rounds) reads and writes only the reserved slot 0 of the
# KV pool, through request-table row 0, at length 1.
PAD_ROW, PAD_SLOT, PAD_SEQ_LEN = 0, 0, 1


def _placed_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """`cuda` (no index) accepts any CUDA tensor; `cuda:1` only that GPU's."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


_DEVICE_FIELDS = tuple(
    name for name, hint in typing.get_type_hints(ForwardBatch, include_extras=True).items() if hint is DeviceTensor
)
