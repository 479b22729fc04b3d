"""tensorgpu: NumPy-like tensors that run lazily, fused into generated WGSL, on any GPU
WebGPU reaches (Vulkan, Metal, DX12) through wgpu-py."""
from . import debug, dtypes
from .dtypes import (DType, bfloat16, float16, float32, int32, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0,
                     uint32)
from .dtypes import bool_ as bool  # noqa: A001 - tg.bool is part of the public API
from .dtypes import DtypeConversionWarning, OutOfRangeError
from .tensor import (Tensor, arange, argsort, broadcast_shapes, cat, concatenate, cumsum, dot, empty, expand_dims,
                     eye, full, linspace, matmul, maximum, minimum, ones, ones_like, rand, randn, realize, sort, stack,
                     tensor, topk, where, zeros, zeros_like)
from .einsum import einsum
from .indexing import put_along_axis, take_along_axis
from .runtime import NoAdapterError, flush, sync
from .capture import capture


# The release: the installed distribution's metadata (setup.cfg's `version` when built), or the
# same number written here for a source tree that was never installed. tests/test_api_docs.py
# checks that the two agree.
_SOURCE_VERSION = "0.1.0"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("tensorgpu")
    except Exception:     # not installed (a source checkout on sys.path)
        return _SOURCE_VERSION


__version__ = _version()


def device() -> dict:
    """The adapter in use: name, backend, limits and enabled features."""
    from .runtime import get_device
    return get_device().describe()


def _fn(name):
    def f(x, *args, **kwargs):
        if not isinstance(x, Tensor):
            x = tensor(x)
        return getattr(x, name)(*args, **kwargs)
    f.__name__ = name
    f.__doc__ = f"tg.{name}(x, ...) is x.{name}(...)"
    return f


for _n in ("exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "erf", "sigmoid", "relu", "silu", "gelu",
           "reciprocal", "floor", "ceil", "abs", "clip", "sum", "mean", "max", "min", "argmax", "argmin", "var",
           "std", "softmax", "log_softmax", "logsumexp", "reshape", "permute", "transpose", "expand",
           "broadcast_to", "squeeze", "unsqueeze", "flatten", "contiguous", "split", "chunk", "astype",
           "prod", "any", "all", "round", "isnan", "isinf", "isfinite", "ravel", "copy", "swapaxes", "moveaxis"):
    globals()[_n] = _fn(_n)
del _n


def __getattr__(name):
    # heavier subsystems load on first use
    import importlib
    if name in ("nn", "gguf", "capture_mod"):
        return importlib.import_module(f"tensorgpu.{name}")
    if name in ("load_gguf", "save_gguf", "GGUFError"):
        return getattr(importlib.import_module("tensorgpu.gguf"), name)
    raise AttributeError(f"module 'tensorgpu' has no attribute {name!r}")
