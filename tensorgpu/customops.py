"""Graph glue for hand-written kernels: each class here is a CustomKernel node argument that
validates shapes/dtypes at the call, and at realize time hands realized Operands (read
through their strides) to a kernel function in tensorgpu/kernels/.

To add a hand-written kernel: write it in kernels/<name>.py (function over Buffers/Operands,
NumPy check and benchmark beside it), then add a CustomKernel subclass + a tensor-level
function here, and export it from nn.py if it is a building block.
"""
from __future__ import annotations

from math import prod
from typing import Optional

from . import dtypes as dt
from .graph import CustomKernel, Node
from .ops import Op
from .tensor import Tensor, _norm_axis, broadcast_shapes, tensor
from .view import View


def _custom(kernel: CustomKernel, srcs: list, shape: tuple, dtype: dt.DType = dt.float32) -> Tensor:
    return Tensor(Node(Op.CUSTOM, tuple((t.node, t.view) for t in srcs), dtype, tuple(shape), arg=kernel))


# ----------------------------------------------------------------------------- matmul


class MatmulKernel(CustomKernel):
    name = "matmul"
    supports_epilogue = True

    def emit(self, out, operands, epilogue):
        from .kernels.matmul import matmul
        matmul(out, operands[0], operands[1], epilogue)


class QuantMatmulKernel(CustomKernel):
    """x [*, M, K] @ W.T where W [N, K] is a quantized GGUF tensor (blocks along K)."""
    name = "qmatmul"
    supports_epilogue = True

    def __init__(self, w_dtype, n, k):
        self.w_dtype, self.n, self.k = w_dtype, n, k

    def emit(self, out, operands, epilogue):
        from .kernels.quant import quant_matmul
        x, w = operands
        quant_matmul(out, x, w.buffer, self.w_dtype, self.n, self.k, epilogue)


class StackedMatmulKernel(CustomKernel):
    """x [M, K] @ [W_0 | W_1 | ...].T, the W_j [N_j, K] weights of one dtype (float or GGUF
    blocks) each its own tensor, read as `W_j.T`: one tiled matmul writing [M, sum(N_j)]
    (kernels/matmul.py's b_parts; rewrites.stack_sibling_matmuls puts it in the graph)."""
    name = "matmul_stack"
    supports_epilogue = True

    def __init__(self, w_dtype, Ns, K):
        self.w_dtype, self.Ns, self.K = w_dtype, tuple(int(n) for n in Ns), int(K)

    def emit(self, out, operands, epilogue):
        from . import runtime
        x, *ws = operands
        if self.w_dtype.is_quant:
            from .kernels.quant import plan_stacked_matmul
            passes = plan_stacked_matmul(out, x, [w.buffer for w in ws], self.w_dtype, self.Ns, self.K, epilogue).passes
        else:
            from .kernels.matmul import plan
            L = plan(out, x, ws[0], epilogue, force="tiled", b_parts=[(w, None) for w in ws[1:]])
            passes = [] if L.kind == "empty" else [(L.name, L.wgsl, L.bindings, L.grid)] + list(L.extra)
        for name, wgsl, bindings, grid in passes:
            runtime.dispatch(name, wgsl, bindings, grid)


def _is_quant_transposed(b: Tensor) -> bool:
    """b is W.T for a whole quantized [N, K] tensor W (the only quantized view matmul reads)."""
    v = b.view
    if b.ndim != 2 or b.node.buffer is None:
        return False
    n_shape = b.node.shape
    return (len(n_shape) == 2 and v.offset == 0 and v.shape == (n_shape[1], n_shape[0])
            and v.strides == (1, n_shape[1]))


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy matmul: 1-D operands, 2-D, batched with broadcast batch dims; strided operands
    are read in place. float32/float16 inputs, float32 result (f32 accumulation)."""
    if not isinstance(a, Tensor):
        a = tensor(a)
    if not isinstance(b, Tensor):
        b = tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must not be 0-d (shapes {a.shape} and {b.shape})")
    if a.dtype.is_quant:
        raise TypeError(f"matmul: the left operand is {a.dtype}; quantized weights go on the right as x @ w.T")
    if not a.dtype.is_float:
        a = a.astype(dt.float32)
    if b.dtype.is_quant:
        if not _is_quant_transposed(b):
            raise TypeError(f"matmul with a {b.dtype} tensor needs it as `w.T` of a whole [N, K] weight, got view {b.shape}")
        K, N = b.shape
        if a.shape[-1] != K:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} not aligned: {a.shape[-1]} (dim -1) != {K} (dim 0)")
        a1 = a.unsqueeze(0) if a.ndim == 1 else a
        out = _custom(QuantMatmulKernel(b.dtype, N, K), [a1, b], a1.shape[:-1] + (N,))
        return out.reshape(out.shape[1:]) if a.ndim == 1 else out
    if not b.dtype.is_float:
        b = b.astype(dt.float32)
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    a2 = a.unsqueeze(0) if squeeze_a else a
    b2 = b.unsqueeze(-1) if squeeze_b else b
    M, K = a2.shape[-2:]
    K2, N = b2.shape[-2:]
    if K != K2:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} not aligned: {K} (dim -1) != {K2} (dim -2)")
    batch = broadcast_shapes(a2.shape[:-2], b2.shape[:-2], what="matmul batch dims")
    a3 = a2.expand(batch + (M, K))
    b3 = b2.expand(batch + (K, N))
    out = _custom(MatmulKernel(), [a3, b3], batch + (M, N))
    if squeeze_a:
        out = out.squeeze(-2)
    if squeeze_b:
        out = out.squeeze(-1)
    return out


# ----------------------------------------------------------------------------- dequantize


class DequantKernel(CustomKernel):
    name = "dequant"

    def __init__(self, dtype):
        self.dtype = dtype

    def emit(self, out, operands, epilogue):
        from .kernels.quant import dequantize
        src = operands[0]
        dequantize(out, src.buffer, self.dtype, prod(src.shape))


def dequantize(t: Tensor) -> Tensor:
    """float32 values of a quantized tensor (whole tensor, then the view is re-applied)."""
    base = Tensor(t.node)
    out = _custom(DequantKernel(t.dtype), [base], t.node.shape)
    return Tensor(out.node, t.view) if t.view != View.contiguous(t.node.shape) else out


# ----------------------------------------------------------------------------- softmax


class SoftmaxKernel(CustomKernel):
    name = "softmax"
    supports_epilogue = False

    def __init__(self, log: bool):
        self.log = log
        self.name = "log_softmax" if log else "softmax"

    def emit(self, out, operands, epilogue):
        from .kernels.softmax import softmax
        x = rows_operand(operands[0])
        softmax(out, x, *x.shape, log=self.log)


def rows_viewable(t: Tensor, unit_last: bool = True) -> bool:
    """The row kernels (softmax, layer_norm) can read `t` as [rows, cols] in place: the leading
    dims collapse to one non-negative row stride (and, with unit_last, the last axis is contiguous)."""
    v = t.view
    if t.ndim == 0 or unit_last and v.strides[-1] != 1 and v.shape[-1] != 1:
        return False
    if any(st < 0 for sz, st in zip(v.shape[:-1], v.strides[:-1]) if sz > 1):
        return False  # the row kernels walk rows forwards
    lead = View(v.shape[:-1], v.strides[:-1], 0)
    if len(lead.shape) <= 1:
        return True
    return lead.reshape((prod(lead.shape),)) is not None


def rows_operand(x):
    """An Operand [..., cols] viewed as [rows, cols] (rows_viewable must have held)."""
    from .kernels.common import Operand
    rows, cols = prod(x.shape[:-1]), x.shape[-1]
    if len(x.shape) == 1:
        return Operand(x.buffer, x.dtype, (1, cols), (cols, x.strides[-1]), x.offset)
    lead = View(tuple(x.shape[:-1]), tuple(x.strides[:-1]), 0).reshape((rows,))
    return Operand(x.buffer, x.dtype, (rows, cols), (lead.strides[0], x.strides[-1]), x.offset)


def softmax(x: Tensor, axis: int = -1, log: bool = False) -> Tensor:
    x._check_plain("softmax")
    if not x.dtype.is_float:
        x = x.astype(dt.float32)
    ax = _norm_axis(axis, x.ndim)
    if x.size == 0:
        return x.astype(dt.float32)
    if ax == x.ndim - 1 and _kernel_available("softmax"):
        src = x if rows_viewable(x) and x.node.buffer is not None else x.contiguous()
        return _custom(SoftmaxKernel(log), [src], x.shape)
    m = x.max(ax, keepdims=True)
    e = (x - m).exp()
    s = e.sum(ax, keepdims=True)
    return (x - m) - s.log() if log else e / s


def _kernel_available(module: str) -> bool:
    import importlib
    try:
        importlib.import_module(f"tensorgpu.kernels.{module}")
        return True
    except ImportError:
        return False
