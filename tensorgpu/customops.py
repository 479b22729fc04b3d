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

import numpy as np

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
            passes = plan(out, x, ws[0], epilogue, force="tiled", b_parts=[(w, None) for w in ws[1:]]).passes
        for name, wgsl, bindings, grid in passes:
            runtime.dispatch(name, wgsl, bindings, grid)


class PairedMatmulKernel(CustomKernel):
    """x_0 @ W_0.T + x_1 @ W_1.T, x_j [M, K_j] and W_j [N, K_j] of one dtype (float or GGUF blocks),
    each its own tensor: ONE tiled matmul over the concatenated K (kernels/matmul.py's k_parts;
    rewrites.pair_matmuls_in_sum puts it in the graph). Sources: x_0, W_0.T, x_1, W_1.T."""
    name = "matmul_pair"
    supports_epilogue = True

    def __init__(self, w_dtype, N, Ks):
        self.w_dtype, self.N, self.Ks = w_dtype, int(N), tuple(int(k) for k in Ks)

    def key(self) -> tuple:
        return (self.name, self.w_dtype.name, self.N, self.Ks)

    def emit(self, out, operands, epilogue):
        from . import runtime
        xs, ws = operands[0::2], operands[1::2]
        if self.w_dtype.is_quant:
            from .kernels.quant import plan_paired_matmul
            passes = plan_paired_matmul(out, xs, [w.buffer for w in ws], self.w_dtype, self.N, self.Ks, epilogue).passes
        else:
            from .kernels.matmul import plan
            passes = plan(out, xs[0], ws[0], epilogue, force="tiled",
                          k_parts=[(x, w, None) for x, w in zip(xs[1:], ws[1:])]).passes
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


# ----------------------------------------------------------------------------- scan, sort


class CumsumKernel(CustomKernel):
    """Inclusive prefix sums along the last axis of a contiguous [rows, n] f32/i32/u32 tensor."""
    name = "cumsum"
    contiguous_srcs = (0,)

    def emit(self, out, operands, epilogue):
        from .kernels.scan import cumsum_rows
        x = operands[0]
        rows, n = x.shape
        cumsum_rows(out, x, rows, n)


class ArgsortKernel(CustomKernel):
    """Positions of the k smallest / largest of each row (kernels/sort.py), int32 [rows, k]."""
    contiguous_srcs = (0, 1)

    def __init__(self, k: int, descending: bool):
        self.k, self.descending = k, descending
        self.name = f"argsort{'_desc' if descending else ''}"

    def key(self) -> tuple:
        return (self.name, self.k)

    def emit(self, out, operands, epilogue):
        from .kernels.sort import argsort_rows
        x = operands[0]
        rows, n = x.shape
        argsort_rows(out, x, rows, n, self.k, self.descending, ties=operands[1] if len(operands) > 1 else None)


def _rows_view(x: Tensor, axis, what: str):
    """x with `axis` moved last and computable by the row kernels (f16 -> f32, bool -> int32),
    as [rows, n], plus how to give a [rows, m] result x's layout back."""
    x._check_plain(what)
    if x.ndim == 0:
        raise ValueError(f"{what} of a 0-d tensor: there is no axis to work along")
    ax = _norm_axis(axis, x.ndim)
    moved = x.moveaxis(ax, -1) if ax != x.ndim - 1 else x
    if moved.dtype is dt.float16:
        moved = moved.astype(dt.float32)
    elif moved.dtype is dt.bool_:
        moved = moved.astype(dt.int32)
    lead = moved.shape[:-1]

    def back(r: Tensor) -> Tensor:
        r = r.reshape(lead + (r.shape[-1],))
        return r.moveaxis(-1, ax) if ax != x.ndim - 1 else r

    return moved.reshape(-1, moved.shape[-1]) if moved.size else moved.reshape(prod(lead), moved.shape[-1]), back


def cumsum(x: Tensor, axis=None) -> Tensor:
    """NumPy's cumsum: running sums along `axis` (None: over the flattened tensor). bool sums
    as int32; float16 in float32, rounded once to float16. Rows longer than the kernel's limit
    are scanned in blocks whose totals are scanned in turn and added back."""
    from .kernels.scan import MAX_ROW
    if axis is None:
        x = x.reshape(-1)
        axis = 0
    out_dtype = dt.int32 if x.dtype is dt.bool_ else x.dtype
    rows, back = _rows_view(x, axis, "cumsum")
    return back(_cumsum_rows(rows, MAX_ROW)).astype(out_dtype)


def _cumsum_rows(x: Tensor, limit: int) -> Tensor:
    R, n = x.shape
    if n == 0 or R == 0:
        return x
    if n <= limit:
        return _custom(CumsumKernel(), [x], (R, n), x.dtype)
    nb = -(-n // limit)
    pad = nb * limit - n
    from .tensor import cat, zeros
    xp = cat([x, zeros((R, pad), dtype=x.dtype)], 1) if pad else x
    blocks = _cumsum_rows(xp.reshape(R * nb, limit), limit).reshape(R, nb, limit)
    totals = blocks[:, :, limit - 1]                               # [R, nb]
    before = _cumsum_rows(totals, limit) - totals                  # exclusive scan of the block totals
    return (blocks + before.reshape(R, nb, 1)).reshape(R, nb * limit)[:, :n]


def argsort(x: Tensor, axis: int = -1, descending: bool = False, k: Optional[int] = None) -> Tensor:
    """Positions (int32) that sort x along `axis`, stable: equal values keep their order (NumPy's
    argsort(kind="stable")); NaN sorts last (first with descending=True). `k`: only the first k
    positions. Rows longer than one workgroup sorts (kernels/sort.py) are refused here; topk
    handles them."""
    from .kernels.sort import max_row
    rows, back = _rows_view(x, axis, "argsort")
    R, n = rows.shape
    k = n if k is None else k
    limit = max_row()
    if n > limit:
        raise ValueError(f"argsort/sort along an axis of {n} elements (shape {x.shape}): the GPU sort takes rows of "
                         f"up to {limit} elements (one workgroup); for the largest / smallest k of longer rows use "
                         "topk(k), or sort on the host (np.sort(t.numpy()))")
    if R == 0 or n == 0:
        from .tensor import zeros
        return back(zeros((R, k), dtype=dt.int32))
    return back(_custom(ArgsortKernel(k, descending), [rows], (R, k), dt.int32))


def topk(x: Tensor, k: int, axis: int = -1, largest: bool = True) -> tuple:
    """(values, indices) of the k largest (smallest with largest=False) along `axis`, in order
    (largest first); ties keep the lower index first; NaN counts as the largest. Rows longer
    than one workgroup sorts are narrowed in chunks: each chunk keeps its best k, until one
    workgroup holds every candidate (needs k <= half that length)."""
    from .indexing import take_along_axis
    from .kernels.sort import max_row
    from .tensor import arange, cat, full
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"topk: k must be an int, got {k!r}")
    rows, back = _rows_view(x, axis, "topk")
    R, n = rows.shape
    if not 0 <= k <= n:
        raise ValueError(f"topk: k={k} is out of range for an axis of {n} elements (shape {x.shape})")
    limit = max_row()
    if n > limit and k > limit // 2:
        raise ValueError(f"topk: k={k} over an axis of {n} elements (shape {x.shape}): rows longer than {limit} "
                         f"(one workgroup) are narrowed in chunks, which needs k <= {limit // 2}")
    if R == 0 or k == 0:
        empty = full((R, k), 0, dt.int32)
        return back(take_along_axis(rows, empty, 1)).astype(x.dtype), back(empty)
    vals, orig = rows, None
    while n > limit:
        nch = -(-n // limit)
        pad = nch * limit - n
        ties = orig if orig is not None else arange(n).reshape(1, n).expand(R, n)
        if pad:
            worst = _worst(vals.dtype, largest)
            vals = cat([vals, full((R, pad), worst, vals.dtype)], 1)
            ties = cat([ties, (arange(pad) + n).reshape(1, pad).expand(R, pad)], 1)
        v3 = vals.reshape(R * nch, limit)
        t3 = ties.reshape(R * nch, limit)
        local = _custom(ArgsortKernel(k, largest), [v3, t3], (R * nch, k), dt.int32)
        vals = take_along_axis(v3, local, 1).reshape(R, nch * k)
        orig = take_along_axis(t3, local, 1).reshape(R, nch * k)
        n = nch * k
    srcs = [vals] + ([orig] if orig is not None else [])
    pos = _custom(ArgsortKernel(k, largest), srcs, (R, k), dt.int32)
    idx = take_along_axis(orig, pos, 1) if orig is not None else pos
    values = take_along_axis(rows, idx, 1)
    return back(values).astype(x.dtype), back(idx)


def _worst(d: dt.DType, largest: bool):
    """A padding value no real element loses to (equal ones win by their lower index)."""
    if d is dt.float32:
        return float("-inf") if largest else float("inf")
    if d is dt.int32:
        return -2**31 if largest else 2**31 - 1
    return 0 if largest else 2**32 - 1
