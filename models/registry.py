"""One loader for every model: `load("FILE.gguf")` returns the model class that
`general.architecture` names. A new model adds one line to MODELS."""
from __future__ import annotations

import importlib
import os
from typing import Optional, Union

import tensorgpu as tg

from .base import ModelError

__all__ = ["MODELS", "load", "model_class", "supported_architectures"]

# general.architecture -> ".module:Class", relative to this package (imported on first use; relative
# because the package is `models` in a checkout and `tensorgpu_models` once installed); the class
# has from_gguf(path, progress=None, _file=None)
MODELS = {
    "gptneox": ".gpt_neox:GPTNeoX",
    "llama": ".llama:Llama",
    "qwen2": ".llama:Llama",
}


def supported_architectures() -> list:
    return sorted(MODELS)


def model_class(arch, where: str = "GGUF file"):
    """The class that loads `arch`; ModelError naming it and the supported ones otherwise."""
    spec = MODELS.get(arch)
    if spec is None:
        raise ModelError(f"{where}: general.architecture {arch!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    mod, _, cls = spec.partition(":")
    return getattr(importlib.import_module(mod, __package__), cls)


def load(path: Union[str, os.PathLike], progress: Optional[bool] = None):
    """Load any supported GGUF model (the file is read and uploaded once). Raises GGUFError for
    a broken file and ModelError for an unsupported or inconsistent model; either way no device
    buffer stays behind."""
    path = os.fspath(path)
    f = tg.load_gguf(path, progress=progress)
    try:
        cls = model_class(f.metadata.get("general.architecture"), path)
    except BaseException:
        f.close()
        raise
    return cls.from_gguf(path, progress=progress, _file=f)
