"""Element types a Tensor can hold, and how each one lives in a GPU buffer.

Plain types (float32, float16, int32, uint32, bool) are addressed per element; GGML block
types (q8_0, q4_0, ...) are addressed per block of `block_size` elements stored in
`block_bytes` bytes, exactly as GGUF files lay them out. Every buffer is an array of 32-bit
words on the GPU: f16 may be packed two to a word when the adapter lacks `shader-f16`, and bool
is stored one element per u32 word so a generated kernel can write it without atomics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True, eq=False)
class DType:
    name: str
    itemsize: int                 # bytes per element on the host (NumPy side)
    np_dtype: Optional[np.dtype]  # NumPy dtype of .numpy() results
    kind: str                     # "float", "int", "uint", "bool", "quant"
    gpu_itemsize: float           # bytes per element in the GPU buffer
    block_size: int = 1           # elements per block (GGML block types)
    block_bytes: int = 0          # bytes per block (GGML block types)
    ggml_type: Optional[int] = None  # gguf.GGMLQuantizationType value, where one exists

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_quant(self) -> bool:
        return self.kind == "quant"

    def nbytes(self, numel: int) -> int:
        """Bytes the GPU buffer needs for `numel` elements (before rounding up to 4)."""
        if self.is_quant:
            if numel % self.block_size:
                raise ValueError(f"{self.name}: {numel} elements is not a multiple of the block size {self.block_size}")
            return numel // self.block_size * self.block_bytes
        return int(numel * self.gpu_itemsize)

    def __repr__(self) -> str:
        return f"tg.{self.name}"

    def __reduce__(self):  # pickle as the module-level singleton
        return (_by_name, (self.name,))


float32 = DType("float32", 4, np.dtype(np.float32), "float", 4, ggml_type=0)
float16 = DType("float16", 2, np.dtype(np.float16), "float", 2, ggml_type=1)
bfloat16 = DType("bfloat16", 2, np.dtype(np.float32), "quant", 2, 1, 2, ggml_type=30)
int32 = DType("int32", 4, np.dtype(np.int32), "int", 4, ggml_type=26)
uint32 = DType("uint32", 4, np.dtype(np.uint32), "uint", 4)
bool_ = DType("bool", 1, np.dtype(np.bool_), "bool", 4)

# GGML block types: (name, ggml type id, elements per block, bytes per block)
q4_0 = DType("q4_0", 4, np.dtype(np.float32), "quant", 18 / 32, 32, 18, 2)
q4_1 = DType("q4_1", 4, np.dtype(np.float32), "quant", 20 / 32, 32, 20, 3)
q5_0 = DType("q5_0", 4, np.dtype(np.float32), "quant", 22 / 32, 32, 22, 6)
q5_1 = DType("q5_1", 4, np.dtype(np.float32), "quant", 24 / 32, 32, 24, 7)
q8_0 = DType("q8_0", 4, np.dtype(np.float32), "quant", 34 / 32, 32, 34, 8)
q4_k = DType("q4_k", 4, np.dtype(np.float32), "quant", 144 / 256, 256, 144, 12)
q5_k = DType("q5_k", 4, np.dtype(np.float32), "quant", 176 / 256, 256, 176, 13)
q6_k = DType("q6_k", 4, np.dtype(np.float32), "quant", 210 / 256, 256, 210, 14)

PLAIN = (float32, float16, int32, uint32, bool_)
QUANT = (bfloat16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)
ALL = PLAIN + QUANT
_BY_NAME = {d.name: d for d in ALL}
_BY_GGML = {d.ggml_type: d for d in ALL if d.ggml_type is not None}


def _by_name(name: str) -> DType:
    return _BY_NAME[name]


def from_ggml_type(type_id: int) -> Optional[DType]:
    """The DType of a GGML tensor type id, or None when tensorgpu does not support it."""
    return _BY_GGML.get(int(type_id))


SUPPORTED = "float32, float16, int32, uint32 and bool"


class OutOfRangeError(ValueError, OverflowError):
    """Values that do not fit the dtype they must be stored in (a ValueError, and an
    OverflowError as NumPy raises for out-of-bounds Python integers)."""


class DtypeConversionWarning(UserWarning):
    """Host data whose values changed on the way to the dtype tensorgpu stores it in (NumPy int64
    past int32, float64 past float32's range). Issued once per conversion per process."""


_WARNED: set = set()     # (from, to) conversions already warned about


def from_numpy(dt) -> DType:
    """The tensorgpu dtype that stores host data of NumPy dtype `dt`: float64 -> float32, any
    signed int -> int32, any unsigned int -> uint32 (what `tg.tensor(array)` does implicitly;
    values that change on the way are warned about once, see `host_values`)."""
    dt = np.dtype(dt)
    if dt == np.bool_:
        return bool_
    if dt.kind == "f":
        return float16 if dt == np.float16 else float32
    if dt.kind == "i":
        return int32
    if dt.kind == "u":
        return uint32
    raise TypeError(f"unsupported dtype {dt}: tensorgpu holds {SUPPORTED}")


def as_dtype(d) -> DType:
    """An explicitly requested dtype: a DType, a name ("float32"), a NumPy dtype-like of a
    supported type, or Python's bool / float / int (tensorgpu's bool, float32 and int32: its
    default float and integer). Anything else (float64, int64, int8, ...) is a TypeError naming
    the supported dtypes: tensorgpu does not silently store a requested type as another."""
    if isinstance(d, DType):
        return d
    if isinstance(d, str) and d in _BY_NAME:
        return _BY_NAME[d]
    if d is bool:
        return bool_
    if d is float:
        return float32
    if d is int:
        return int32
    try:
        nd = np.dtype(d)
    except Exception:
        raise TypeError(f"unsupported dtype {d!r}: expected one of {SUPPORTED} (or a GGML block type: "
                        f"{', '.join(q.name for q in QUANT)})") from None
    for p in PLAIN:
        if p.np_dtype == nd:
            return p
    raise TypeError(f"unsupported dtype {nd}: tensorgpu holds {SUPPORTED} (and the GGML block types "
                    f"{', '.join(q.name for q in QUANT)} for weights); ask for one of those, e.g. dtype=tg.float32")


_LIMITS = {"int32": (-2**31, 2**31 - 1), "uint32": (0, 2**32 - 1)}


def host_values(a: np.ndarray, d: DType, explicit: bool, what: str = "tg.tensor") -> np.ndarray:
    """Host data `a` converted to what a buffer of dtype `d` holds (bool as one uint32 per
    element). An implicit narrowing (a NumPy int64 / float64 array becoming int32 / float32)
    that changes values warns once (DtypeConversionWarning) and keeps NumPy's astype result;
    integers out of range of an explicitly requested dtype are an OutOfRangeError."""
    if d is bool_:
        return a.astype(np.bool_).astype(np.uint32)
    if d.kind in ("int", "uint") and a.dtype.kind in "iub" and a.size:
        lo, hi = _LIMITS[d.name]
        amin, amax = a.min(), a.max()
        if amin < lo or amax > hi:
            if explicit or a.dtype.itemsize <= d.itemsize:
                raise OutOfRangeError(f"{what}: {a.dtype} values {amin}..{amax} do not fit {d.name} "
                                      f"({d.name} holds {lo}..{hi})")
            _warn_once(a.dtype, d, f"{what}: {a.dtype} values {amin}..{amax} do not fit {d.name}, the type "
                                   f"tensorgpu stores them in; out-of-range values wrap as NumPy's astype does")
    if d.kind in ("int", "uint") and a.dtype.kind == "f" and a.size and not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: a {a.dtype} array with NaN or inf cannot become {d.name}")
    with np.errstate(over="ignore", invalid="ignore"):     # said once below, as a DtypeConversionWarning
        out = a.astype(d.np_dtype)
    if d.is_float and a.dtype.kind == "f" and a.dtype.itemsize > d.itemsize and a.size:
        with np.errstate(all="ignore"):
            grew = np.isinf(out) & np.isfinite(a)
        if grew.any():
            _warn_once(a.dtype, d, f"{what}: {a.dtype} values beyond {d.name}'s range (e.g. {a[grew].flat[0]}) "
                                   f"became inf")
    return out


def _warn_once(src, d: DType, msg: str) -> None:
    import os
    import sys
    import warnings
    key = (str(src), d.name)
    if key in _WARNED:
        return
    _WARNED.add(key)
    # point at the user's line: the first caller outside this package
    pkg, f, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(0), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    warnings.warn(msg, DtypeConversionWarning, stacklevel=level)


def result_type(a: DType, b: DType) -> DType:
    """Promotion for binary ops: float beats int beats bool; float32 beats float16."""
    if a is b:
        return a
    order = {bool_: 0, uint32: 1, int32: 2, float16: 3, float32: 4}
    if a not in order or b not in order:
        raise TypeError(f"no arithmetic between {a} and {b}: convert quantized tensors with .astype(tg.float32) first")
    return a if order[a] >= order[b] else b
