"""Helpers shared by the nn-kernel tests (softmax, layer_norm, rope, attention, embedding,
sampling): feature-path fixtures, NumPy views -> Operands, and hand-written Epilogues."""
import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels.common import Operand

PATHS = [(True, True), (True, False), (False, True), (False, False)]
PATH_IDS = ["f16+sg", "f16+nosg", "packed+sg", "packed+nosg"]


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def paths(request):
    """Every combination of shader-f16 on/off and subgroups on/off (lavapipe has both)."""
    old = (runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups)
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = request.param
    yield request.param
    runtime.OPTIONS.use_f16, runtime.OPTIONS.use_subgroups = old


class Base:
    """A contiguous host array uploaded once; `view(v)` is the Operand of any NumPy view of it."""

    def __init__(self, arr):
        self.arr = np.ascontiguousarray(arr)
        self.dtype = dtypes.from_numpy(self.arr.dtype)
        self.buf = runtime.upload(self.arr)

    def view(self, v) -> Operand:
        isz = self.arr.itemsize
        off = v.__array_interface__["data"][0] - self.arr.__array_interface__["data"][0]
        assert off % isz == 0 and all(s % isz == 0 for s in v.strides)
        return Operand(self.buf, self.dtype, tuple(v.shape), tuple(s // isz for s in v.strides), off // isz)

    def whole(self) -> Operand:
        return self.view(self.arr)


def read_f32(buf, n, shape=None):
    a = np.frombuffer(runtime.read(buf, 0, 4 * n), np.float32)
    return a.reshape(shape) if shape is not None else a


class AffineGelu:
    """Epilogue: gelu_erf(acc * scale + bias[i % n]) — checks that a kernel passes the right
    linear index and binds the epilogue's operand. erf is Abramowitz-Stegun 7.1.26 (|err| < 1.5e-7)."""

    def __init__(self, bias: np.ndarray, scale: float = 1.0, gelu: bool = True):
        self.bias = np.asarray(bias, np.float32)
        self.scale, self.gelu = float(scale), gelu
        self.base = Base(self.bias)
        self.operands = [self.base.whole()]

    def wgsl(self, first_binding: int) -> str:
        g = ("let z = abs(x) * 0.7071067811865476; let t = 1.0 / (1.0 + 0.3275911 * z);\n"
             "  let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-z * z);\n"
             "  let e = select(-y, y, x >= 0.0);\n  return 0.5 * x * (1.0 + e);") if self.gelu else "return x;"
        return (f"@group(0) @binding({first_binding}) var<storage, read> ep_bias: array<f32>;\n"
                f"fn epilogue(acc: f32, i: u32) -> f32 {{\n  let x = acc * {self.scale!r} + ep_bias[i % {len(self.bias)}u];\n  {g}\n}}\n")

    def ref(self, acc: np.ndarray) -> np.ndarray:
        from math import erf
        flat = acc.reshape(-1).astype(np.float64)
        x = flat * self.scale + np.resize(self.bias.astype(np.float64), flat.shape)
        if self.gelu:
            x = 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))
        return x.reshape(acc.shape)
