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


def from_numpy(dt) -> DType:
    """Map a NumPy dtype to the tensorgpu dtype that stores it (float64 -> float32, int64 -> int32)."""
    dt = np.dtype(dt)
    if dt == np.bool_:
        return bool_
    if dt.kind == "f":
        return float16 if dt == np.float16 else float32
    if dt.kind == "i":
        return int32
    if dt.kind == "u":
        return uint32
    raise TypeError(f"unsupported dtype {dt}: tensorgpu holds float32, float16, int32, uint32 and bool")


def as_dtype(d) -> DType:
    """Accept a DType, a name ("float32"), or a NumPy dtype-like."""
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
        return from_numpy(d)
    except TypeError:
        raise
    except Exception:
        raise TypeError(f"unsupported dtype {d!r}: expected one of {', '.join(_BY_NAME)}") from None


def result_type(a: DType, b: DType) -> DType:
    """Promotion for binary ops: float beats int beats bool; float32 beats float16."""
    if a is b:
        return a
    order = {bool_: 0, uint32: 1, int32: 2, float16: 3, float32: 4}
    if a not in order or b not in order:
        raise TypeError(f"no arithmetic between {a} and {b}: convert quantized tensors with .astype(tg.float32) first")
    return a if order[a] >= order[b] else b
