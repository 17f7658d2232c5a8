"""Where a model comes from: a local Hugging Face directory, a GGUF file (or a directory holding one), a
real model installed as a Python package, a preset, or the built-in keel-demo.

GGUF files, presets and keel-demo are materialised as ordinary HF-format directories in the cache
folder ($KEEL_CACHE_DIR, default ~/.cache/keel) and then load through the normal path. Nothing is
downloaded: hub names are not accepted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from keel.models.packaged import PACKAGED_MODELS, packaged_gguf
from keel.models.presets import PRESETS

DEMO_NAME = "keel-demo"
# Bumped when convert_gguf writes its directory differently, so an older conversion is not reused.
GGUF_CONVERSION_VERSION = 2


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    has_weights: bool  # False for presets: config and tokenizer only, weights are always dummy


def cache_dir() -> Path:
    return Path(os.environ.get("KEEL_CACHE_DIR", Path.home() / ".cache" / "keel"))


def resolve_model(name: str) -> ModelSource:
    if name == DEMO_NAME:
        return ModelSource(name, _materialise(cache_dir() / "keel-demo-v2", _write_demo), True)
    if name in PRESETS:
        return ModelSource(name, _materialise(cache_dir() / "presets" / name, lambda d: _write_preset(name, d)),
                           False)
    if name in PACKAGED_MODELS:
        return _from_gguf(name, packaged_gguf(name, cache_dir()))
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return ModelSource(name, path, True)
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(name, path)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return _from_gguf(name, ggufs[0])
    if ggufs:
        raise ValueError(f"model directory {path} holds several GGUF files; name one: "
                         f"{', '.join(p.name for p in ggufs)}")
    if path.exists():
        raise ValueError(f"model path {path} is neither a directory with config.json nor a .gguf file")
    raise ValueError(f"model {name!r} is not a local directory or GGUF file, a packaged model "
                     f"({', '.join(sorted(PACKAGED_MODELS))}), a preset ({', '.join(sorted(PRESETS))}) "
                     f"or {DEMO_NAME!r}; keel loads local checkpoints and does not download")


def _from_gguf(name: str, path: Path) -> ModelSource:
    """The Hugging Face directory converted from a GGUF file, cached by the file's SHA-256."""
    directory = cache_dir() / "gguf" / f"{path.stem}-{_digest(path)[:16]}-v{GGUF_CONVERSION_VERSION}"
    return ModelSource(name, _materialise(directory, lambda d: _convert_gguf(path, d)), True)


def _digest(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, modification time): hashing a large file on every start
    (twice: API and engine process) would cost a second or more."""
    stat = path.resolve().stat()
    memo = cache_dir() / "gguf" / "digests" / hashlib.sha256(
        f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    digest = _file_digest(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(digest)
    os.replace(tmp, memo)  # atomic: a concurrent reader sees all of it or nothing
    return digest


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# The builders import torch and transformers, so they are imported only when a directory is built: resolving
# an existing one (as `keel serve`'s API process does before it spawns the engine) stays quick.
def _write_demo(directory: Path) -> None:
    from keel.models.demo import write_demo_model

    write_demo_model(directory)


def _convert_gguf(path: Path, directory: Path) -> None:
    from keel.models.gguf import convert_gguf

    convert_gguf(path, directory)


def _write_preset(name: str, directory: Path) -> None:
    from keel.models.byte_tokenizer import save_byte_tokenizer

    (directory / "config.json").write_text(json.dumps(PRESETS[name], indent=2))
    save_byte_tokenizer(directory)


def _materialise(path: Path, write: Callable[[Path], None]) -> Path:
    """Build `path` once; written to a temporary sibling and renamed, so readers never see half of it. A lock
    beside it makes a second process that needs it at the same time (two servers starting, parallel test
    workers) wait for the first instead of building it again (training keel-demo, converting a GGUF file)."""
    if (path / "config.json").is_file():
        return path
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if (path / "config.json").is_file():  # built by the process that held the lock
            return path
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
