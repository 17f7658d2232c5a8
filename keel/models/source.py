"""Where a model comes from: a local Hugging Face directory, a preset, or the built-in keel-demo.

Presets and keel-demo are materialised as ordinary HF-format directories in the cache folder
($KEEL_CACHE_DIR, default ~/.cache/keel) and then load through the normal path. Nothing is
downloaded: hub names are not accepted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from keel.models.byte_tokenizer import save_byte_tokenizer
from keel.models.demo import DEMO_NAME, write_demo_model
from keel.models.presets import PRESETS


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    has_weights: bool  # False for presets: config and tokenizer only, weights are always dummy


def cache_dir() -> Path:
    return Path(os.environ.get("KEEL_CACHE_DIR", Path.home() / ".cache" / "keel"))


def resolve_model(name: str) -> ModelSource:
    if name == DEMO_NAME:
        return ModelSource(name, _materialise(cache_dir() / "keel-demo-v2", write_demo_model), True)
    if name in PRESETS:
        return ModelSource(name, _materialise(cache_dir() / "presets" / name, lambda d: _write_preset(name, d)),
                           False)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return ModelSource(name, path, True)
    if path.exists():
        raise ValueError(f"model directory {path} has no config.json")
    raise ValueError(f"model {name!r} is not a local directory, a preset ({', '.join(sorted(PRESETS))}) "
                     f"or {DEMO_NAME!r}; keel loads local Hugging Face directories and does not download")


def _write_preset(name: str, directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps(PRESETS[name], indent=2))
    save_byte_tokenizer(directory)


def _materialise(path: Path, write: Callable[[Path], None]) -> Path:
    """Build `path` once; written to a temporary sibling and renamed, so readers never see half of it."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError:
        if not (path / "config.json").is_file():  # lost a race with another writer: theirs is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
