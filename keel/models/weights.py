"""Model weights: loading Hugging Face safetensors into keel's (fused) layers, or random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from keel.distributed.parallel import tensor_parallel

# Checkpoint tensors keel does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Where a checkpoint tensor goes in its keel parameter: all of it (None), part i of a fused projection (i), or
# part i of expert e of stacked experts ((e, i)).
Shard = Optional[Union[int, tuple[int, int]]]
# checkpoint name part -> (keel name part, shard index or None for a plain rename)
Renames = dict[str, tuple[str, Optional[int]]]


@torch.no_grad()
def init_random_weights(module: nn.Module, seed: int, std: float = 0.02) -> None:
    """Deterministic random weights: norms 1, everything else N(0, std), drawn in sorted-name order."""
    params = sorted(module.named_parameters(), key=lambda item: item[0])
    if not params:
        return
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, param in params:
        if not param.is_floating_point():
            continue  # index tables (an EAGLE-3 head's d2t) keep their constructed values
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for name in names:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{index.name} lists {name}, which is missing from {directory}")
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory} "
                                "(use load_format='dummy' for random weights)")
    return files


@torch.no_grad()
def load_safetensors(model: nn.Module, directory: Path, fused: Renames, tied_lm_head: bool, device: torch.device,
                     ignored: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                     experts: Optional[dict[str, tuple[str, int]]] = None) -> set[str]:
    """Copy every checkpoint tensor into its keel parameter; raise naming any tensor that does not fit, or any
    parameter the checkpoint lacks (but those in `optional`). Tensors named in `ignored` are skipped. Returns
    the names of the parameters loaded. `experts`: see `keel_name`."""
    params = dict(model.named_parameters())
    expected = {(name, shard) for name, p in params.items() for shard in _shards(p) if name not in optional}
    loaded: set[tuple[str, Shard]] = set()
    files = weight_files(directory)
    for path in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=None):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                if (hf_name.endswith(_IGNORED_SUFFIXES) or hf_name in ignored
                        or (tied_lm_head and hf_name == "lm_head.weight")):
                    continue
                name, shard = keel_name(hf_name, fused, experts)
                if name not in params:
                    raise ValueError(f"unexpected tensor {hf_name!r} in {path.name}: keel's model has no "
                                     f"parameter {name!r}")
                if not _holds(params[name], shard):
                    continue  # an expert another rank holds
                target = _shard_view(params[name], shard)
                tensor = _read_rank_slice(f, hf_name, params[name])
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(f"shape mismatch for tensor {hf_name!r} in {path.name}: checkpoint has "
                                     f"{list(tensor.shape)}, the model expects {list(target.shape)}")
                target.copy_(tensor)
                loaded.add((name, shard))
    missing = sorted(expected - loaded, key=str)
    if missing:
        raise ValueError(f"checkpoint in {directory} lacks {len(missing)} tensor(s), e.g. "
                         + ", ".join(f"{n}[shard {s}]" if s is not None else n for n, s in missing[:5]))
    return {name for name, _ in loaded}


def _read_rank_slice(f, hf_name: str, param: torch.Tensor) -> torch.Tensor:
    """The checkpoint tensor, or under tensor parallelism this rank's slice of it along the parameter's `tp_dim`:
    only that slice is read from the file."""
    tp, dim = tensor_parallel(), getattr(param, "tp_dim", None)
    if tp.size == 1 or dim is None:
        return f.get_tensor(hf_name)
    part = f.get_slice(hf_name)
    size = part.get_shape()[dim]
    if getattr(param, "tp_padded", False):  # the vocabulary's rows: an equal share rounded up, zeros past the end
        rows = param.shape[0]
        if -(-size // tp.size) != rows:
            raise ValueError(f"{hf_name} has {size} rows, the model expects {rows} on each of {tp.size} ranks")
        tensor = part[min(size, tp.rank * rows):min(size, (tp.rank + 1) * rows)]
        return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])
    if size % tp.size:
        raise ValueError(f"{hf_name} has {size} rows along dimension {dim}, not divisible by {tp.size} ranks")
    start, stop = tp.rank * size // tp.size, (tp.rank + 1) * size // tp.size
    return part[start:stop] if dim == 0 else part[:, start:stop]


def keel_name(hf_name: str, renames: Renames,
              experts: Optional[dict[str, tuple[str, int]]] = None) -> tuple[str, Shard]:
    """'…self_attn.k_proj.weight' -> ('…self_attn.qkv_proj.weight', 1); with `experts` (checkpoint projection name
    -> (stacked parameter, part)), '…experts.5.up_proj.weight' -> ('…experts.w13', (5, 1)); renamed parts (Mixtral's
    'block_sparse_moe' -> 'mlp') change the name only; other names map to themselves."""
    parts = hf_name.split(".")
    shard: Shard = None
    if experts and "experts" in parts:
        i = parts.index("experts")
        if i + 2 < len(parts) and parts[i + 1].isdigit() and parts[i + 2] in experts:
            stacked, part = experts[parts[i + 2]]
            shard = (int(parts[i + 1]), part)
            parts = parts[:i + 1] + [stacked]
    for i, part in enumerate(parts):
        if part in renames:
            parts[i], index = renames[part]
            shard = index if index is not None else shard
    return ".".join(parts), shard


def _holds(param: torch.Tensor, shard: Shard) -> bool:
    """Whether this rank holds `shard` of `param` (with expert parallelism, only its own experts)."""
    if not isinstance(shard, tuple):
        return True
    first = getattr(param, "first_expert", 0)
    return first <= shard[0] < first + param.shape[0]


def _shards(param: torch.Tensor) -> list[Shard]:
    experts = getattr(param, "expert_shards", None)
    if experts:
        first = getattr(param, "first_expert", 0)
        return [(first + e, i) for e in range(param.shape[0]) for i in range(len(experts))]
    sizes = getattr(param, "shard_sizes", None)
    return list(range(len(sizes))) if sizes else [None]


def _shard_view(param: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard is None:
        return param.data
    if isinstance(shard, tuple):
        expert, part = shard
        sizes = param.expert_shards
        return param.data[expert - getattr(param, "first_expert", 0)].narrow(0, sum(sizes[:part]), sizes[part])
    sizes = param.shard_sizes
    return param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
