"""What every hand-written kernel shares: how an input is described (Operand), how elementwise
work is fused into a kernel's store (Epilogue), and WGSL snippets for reading f16 / bool /
quantized words out of u32 storage.

Storage convention (all kernels): every binding is `array<u32>`, `array<f32>`, `array<i32>` or,
when the adapter has shader-f16 and OPTIONS.use_f16 is on, `array<f16>`/`array<vec4<f16>>`.
f16 data has the same bytes either way, so a kernel may pick its access path per adapter.
Hand-written kernels write float32 outputs unless documented otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from .. import dtypes
from ..runtime import Buffer
from ..view import View


@dataclass
class Operand:
    """A kernel input: a buffer read through a strided view (all counts in elements)."""
    buffer: Buffer
    dtype: dtypes.DType
    shape: tuple
    strides: tuple
    offset: int = 0

    @property
    def is_contiguous(self) -> bool:
        return View(tuple(self.shape), tuple(self.strides), self.offset).is_contiguous


class Epilogue(Protocol):
    """Elementwise work fused into a kernel's store (bias add, gelu, residual add, scale).

    `wgsl(first_binding)` returns WGSL module-scope text: the storage declarations of
    `operands` at bindings first_binding, first_binding+1, ... and a function
        fn epilogue(acc: f32, i: u32) -> f32
    where `acc` is the kernel's computed value and `i` the linear index of that element in the
    kernel's contiguous row-major output. The kernel binds `operands[k].buffer` (read-only) at
    first_binding + k and stores `epilogue(acc, i)`.
    """
    operands: Sequence[Operand]

    def wgsl(self, first_binding: int) -> str: ...


class NoEpilogue:
    operands: Sequence[Operand] = ()

    def wgsl(self, first_binding: int) -> str:
        return "fn epilogue(acc: f32, i: u32) -> f32 { return acc; }\n"


def epilogue_bindings(ep) -> list:
    return [(op.buffer, "read") for op in (ep.operands if ep is not None else ())]


# WGSL for reading one f16 element i out of a packed u32 array named `buf`.
def wgsl_load_f16_packed(buf: str, idx: str) -> str:
    return f"unpack2x16float({buf}[({idx}) >> 1u])[({idx}) & 1u]"
