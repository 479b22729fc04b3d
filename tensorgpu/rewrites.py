"""Graph rewrites: named rules that find, in the graph of plain tensor code, the patterns a
hand-written kernel does in one dispatch, and rewrite the graph to use it.

Why here and not in tg.nn: a model file should say what it computes (layer_norm, linear,
rope, a cache write, attention) and get the decode step's few dispatches anyway; and the
next architecture gets them without new entry points. The scheduler calls `rewrite(root)`
on the unrealized graph under a node before it fuses and plans it (schedule.py).

Each rule is a function over a `Graph` that changes nodes in place and returns how many
times it fired; `tg.debug.stats()["rule_<name>"]` counts firings. Rules only ever replace a
computation by an equal one: a node they make unused stays valid (it is recomputed if
something outside the graph reads it later). Adding a rule: write `@rule def name(g): ...`
below (the order of definition is the order they run), and a test in tests/test_rewrites.py
that builds plain code and checks the kernel count and the values against NumPy.
"""
from __future__ import annotations

import weakref
from math import prod
from typing import Callable, Optional

from . import dtypes as dt
from .graph import Node
from .graph import _seq as _node_seq
from .ops import Op
from .runtime import STATS, get_device
from .symbolic import SymInt
from .view import View

RULES: list = []


def rule(fn: Callable) -> Callable:
    """Register a rewrite rule (runs in definition order)."""
    RULES.append(fn)
    return fn


class Graph:
    """The unrealized nodes under a root, sources first, and who reads each of them."""

    def __init__(self, root: Node):
        self.root = root
        self.nodes: list = []
        self.readers: dict = {}        # id(node) -> [(consumer, src index)]
        seen, order = set(), []
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.append((n, True))
            for i, (m, _) in enumerate(n.srcs):
                if m.buffer is None and m.op is not Op.CONST:
                    self.readers.setdefault(id(m), []).append((n, i))
                    if id(m) not in seen:
                        stack.append((m, False))
        self.nodes = order

    def reads(self, n: Node) -> int:
        return len(self.readers.get(id(n), ()))

    def only_reader(self, n: Node):
        """(consumer, src index) when n is read exactly once in the graph, else None."""
        r = self.readers.get(id(n), ())
        return r[0] if len(r) == 1 and n is not self.root else None


def rewrite(root: Node) -> None:
    """Apply every rule, in order, to the graph under `root`."""
    if root.buffer is not None or not root.srcs:
        return
    g = Graph(root)
    for fn in RULES:
        fired = fn(g)
        if fired:
            STATS[f"rule_{fn.__name__}"] = STATS.get(f"rule_{fn.__name__}", 0) + fired
            g = Graph(root)


# ----------------------------------------------------------------------------- helpers


def _is(n: Node, kernel_cls) -> bool:
    return n.op is Op.CUSTOM and n.buffer is None and isinstance(n.arg, kernel_cls)


def _flat_row(v: View, K: int) -> bool:
    """v reads K consecutive elements (one row) at a static offset the GEMV can bake in."""
    return (v.is_contiguous and not isinstance(v.offset, SymInt) and v.offset % 4 == 0
            and prod(v.shape) == K)


def _row_view(v: View, n: Node) -> bool:
    """v reads n ([1, N] or [N]) element for element (any leading 1s)."""
    return v.offset == 0 and v.is_contiguous and prod(v.shape) == n.numel and not isinstance(v.offset, SymInt)


def _same(a, b) -> bool:
    """Two ints (or SymInts) that are provably equal."""
    d = a - b
    return not isinstance(d, SymInt) and d == 0


def _rows_of_a_matmul(g: Graph, n, i: int, L, v) -> Optional[tuple]:
    """(T, V, k, r) when source i of n reads rows r .. r+k of a [T, V] matmul (x @ w.T) that
    nothing else reads, with k < T (a prompt's last row); r may be a step variable. Else None."""
    from .customops import MatmulKernel, QuantMatmulKernel
    if not ((_is(L, MatmulKernel) or _is(L, QuantMatmulKernel)) and len(L.shape) == 2
            and g.only_reader(L) == (n, i) and len(L.srcs) == 2):
        return None
    T, V = L.shape
    k = v.shape[0] if len(v.shape) == 2 else 0
    if not (0 < k < T and v.shape == (k, V) and v.strides == (V, 1)):
        return None
    if not isinstance(v.offset, SymInt):
        r = v.offset // V
        return (T, V, k, r) if r * V == v.offset else None
    if any(c % V for _, c in v.offset.terms) or v.offset.const % V:
        return None
    return T, V, k, SymInt._make(int(v.offset) // V, v.offset.const // V, {vv: c // V for vv, c in v.offset.terms})


def _matmul_row_reads(g: Graph):
    """(n, i, L, v, (T, V, k, r), (X, xv), (W, wv)) for each source i = (L, v) of a node n that
    reads rows of a matmul L = x @ w.T (_rows_of_a_matmul), with the matmul's two operands."""
    for n in list(g.nodes):
        for i, (L, v) in enumerate(n.srcs):
            rows = _rows_of_a_matmul(g, n, i, L, v)
            if rows is not None:
                yield n, i, L, v, rows, L.srcs[0], L.srcs[1]


def _read_linear(n, i: int, v, V: int, h, W, wv):
    """Make source i of n (k rows of a [T, V] matmul, viewed as v) read linear(h, w) instead, w
    the matmul's [V, C] weight; returns that linear (a Tensor)."""
    from .nn import linear
    from .tensor import Tensor
    y = linear(h, Tensor(W, View(wv.shape[::-1], wv.strides[::-1], wv.offset)))      # w back to [V, C]
    srcs = list(n.srcs)
    srcs[i] = (y.node, View(v.shape, y.view.strides if y.view.shape == v.shape else (V, 1), y.view.offset))
    n.set_srcs(tuple(srcs))
    return y


# ----------------------------------------------------------------------------- rules


@rule
def rows_before_head(g: Graph) -> int:
    """Some rows of linear(layer_norm(x)) — a prompt's last-token logits out of [T, vocab] — are
    the linear of the layer norm of those rows of x: the vocabulary projection runs for the
    rows read, not for the whole prompt."""
    from .nn import LayerNormKernel, layer_norm
    from .tensor import Tensor
    fired = 0
    for n, i, L, v, (T, V, k, r), (X, xv), (W, wv) in _matmul_row_reads(g):
        if not (_is(X, LayerNormKernel) and g.only_reader(X) == (L, 0) and xv.is_identity(X.shape)
                and len(X.shape) == 2):
            continue
        (Y, yv) = X.srcs[0]
        if len(yv.shape) != 2:
            continue
        rows = View((k, yv.shape[1]), yv.strides, yv.offset + r * yv.strides[0])
        ln = X.arg
        extra = [Tensor(m, mv) for m, mv in X.srcs[1:]]
        lw = extra.pop(0) if ln.has_w else None
        lb = extra.pop(0) if ln.has_b else None
        floor = next(_node_seq)
        h = layer_norm(Tensor(Y, rows), lw, lb, ln.eps)
        y = _read_linear(n, i, v, V, h, W, wv)
        _age_as(y.node, floor, X.seq)      # the new nodes read what the norm read (in-place write order)
        y.node.seq = L.seq
        fired += 1
    return fired


def _age_as(root: Node, floor: int, seq: int) -> None:
    """Give the unrealized nodes built after creation order `floor` under root the order `seq`:
    a rule's rebuilt nodes then read what the nodes they replace read (a lazy write issued in
    between stays after them)."""
    stack, seen = [root], set()
    while stack:
        x = stack.pop()
        if id(x) in seen or x.seq <= floor or x.buffer is not None:
            continue
        seen.add(id(x))
        x.seq = seq
        stack.extend(m for m, _ in x.srcs)


def _rows_of(m: Node, v: View, r, k: int, memo: dict):
    """(node, view) reading rows r .. r+k of axis 0 of what (m, v) reads. An elementwise node or
    a reduction that keeps axis 0, read row for row, is rebuilt over those rows only (its
    sources' rows, recursively: RMSNorm's sum of squares becomes that of the rows); anything
    else is read through the sliced view."""
    key = (id(m), v)
    hit = memo.get(key)
    if hit is not None:
        return hit
    from .graph import REINDEXING
    nd = len(m.shape)
    shape = (k,) + tuple(v.shape[1:])
    rowwise = (m.buffer is None and m.op is not Op.CONST and nd >= 1 and len(v.shape) == nd
               and v.shape[0] == m.shape[0] > 1 and not isinstance(v.offset, SymInt) and v.offset == 0
               and v.strides[0] == View.contiguous(m.shape).strides[0]
               and ((m.is_elementwise and m.op not in REINDEXING) or (m.is_reduce and 0 not in m.arg)))
    if not rowwise:
        out = (m, View(shape, v.strides, v.offset + r * v.strides[0]))
    else:
        mshape = (k,) + tuple(m.shape[1:])
        n = Node(m.op, (), m.dtype, mshape, arg=m.arg)
        n.seq = m.seq                  # it reads what m read (in-place write order)
        n.set_srcs(tuple(_rows_of(s, sv, r, k, memo) for s, sv in m.srcs))
        out = (n, View(shape, (View.contiguous(mshape).strides[0],) + tuple(v.strides[1:]), 0))
    memo[key] = out
    return out


@rule
def rows_before_linear(g: Graph) -> int:
    """Some rows of linear(f(x)), f computed row by row in plain ops (LLaMA's final RMSNorm:
    x * rsqrt(mean(x * x) + eps) * w) — a prompt's last-token logits out of [T, vocab] — are the
    linear of f of those rows: the vocabulary projection (and the norm) run for the rows read,
    not for the whole prompt. (A hand-written layer_norm is rows_before_head's.)"""
    from .tensor import Tensor
    fired = 0
    for n, i, L, v, (T, V, k, r), (X, xv), (W, wv) in _matmul_row_reads(g):
        if len(xv.shape) != 2 or xv.shape[0] != T or len(wv.shape) != 2:
            continue
        _read_linear(n, i, v, V, Tensor(*_rows_of(X, xv, r, k, {})), W, wv)
        fired += 1
    return fired


@rule
def fold_norm_into_gemv(g: Graph) -> int:
    """layer_norm(x) read by a one-row linear: the GEMV normalises x itself (its constants
    folded into the weights once), so the norm is no kernel of its own."""
    from .nn import DecodeLinearKernel, LayerNormKernel
    fired = 0
    for n in g.nodes:
        if not (_is(n, DecodeLinearKernel) and n.arg.ln is None and not n.arg.K2 and not n.arg.glu):
            continue
        x, xv = n.srcs[0]
        if not (_is(x, LayerNormKernel) and _row_view(xv, x) and x.numel == n.arg.K):
            continue
        inner, iv = x.srcs[0]
        if inner.dtype not in (dt.float32, dt.float16) or not _flat_row(iv, n.arg.K):
            continue
        k = x.arg
        n.arg = DecodeLinearKernel(n.arg.w_dtype, n.arg.N, n.arg.K, (k.has_w, k.has_b, k.eps))
        n.set_srcs((x.srcs[0], n.srcs[1]) + tuple(x.srcs[1:]))
        fired += 1
    return fired


def _const(m: Node, v: View):
    """The float value of a broadcast constant read (node, view), else None."""
    if m.op is not Op.CONST or isinstance(m.arg, SymInt) or not isinstance(m.arg, (int, float)):
        return None
    return float(m.arg)


def _match_rms_norm(m: Node, v: View, K: int):
    """(x (node, view), weight (node, view of [K]) or None, eps) when the one-row read (m, v) is
    `tg.nn.rms_norm(x, weight, eps)` in plain ops: x * rsqrt(sum(x * x, -1) * (1/K) + eps)
    [* weight], x a flat float row [1, K] the GEMV can read, every piece checked. Else None."""
    import numpy as np
    if not (m.op is Op.MUL and m.buffer is None and m.shape == (1, K) and _row_view(v, m)):
        return None

    def scaled(n: Node):
        """x * rsqrt(mean(x*x) + eps) of a [1, K] node: (x, eps) or None."""
        if not (n.op is Op.MUL and n.buffer is None and n.shape == (1, K) and len(n.srcs) == 2):
            return None
        for (x, xv), (r, rv) in (n.srcs, n.srcs[::-1]):
            if not (r.op is Op.RSQRT and r.buffer is None and r.shape == (1, 1) and rv.shape == (1, K)
                    and rv.strides[1] == 0 and rv.offset == 0):
                continue
            if not (x.dtype is dt.float32 and xv.shape == (1, K) and _flat_row(xv, K)):
                continue
            a, av = r.srcs[0]
            if not (a.op is Op.ADD and a.buffer is None and a.shape == (1, 1) and av.is_identity((1, 1))):
                continue
            for (mm, mv), (c, cv) in (a.srcs, a.srcs[::-1]):
                eps = _const(c, cv)
                if eps is None or not (mm.op is Op.MUL and mm.buffer is None and mm.shape == (1, 1)
                                       and mv.is_identity((1, 1)) and eps >= 0):
                    continue
                for (sm, sv), (ic, icv) in (mm.srcs, mm.srcs[::-1]):
                    inv = _const(ic, icv)
                    if inv is None or np.float32(inv) != np.float32(1.0 / K):
                        continue
                    if not (sm.op is Op.SUM and sm.buffer is None and sm.shape == (1, 1) and sm.arg in ((1,), (-1,))
                            and sv.is_identity((1, 1)) and sm.dtype is dt.float32):
                        continue
                    sq, qv = sm.srcs[0]
                    if not (sq.op is Op.MUL and sq.buffer is None and qv.is_identity((1, K)) and sq.shape == (1, K)
                            and all(y is x and yv == xv for y, yv in sq.srcs)):
                        continue
                    return (x, xv), eps
        return None

    got = scaled(m)
    if got is not None:
        return got[0], None, got[1]
    if len(m.srcs) != 2:
        return None
    for (n, nv), (w, wv) in (m.srcs, m.srcs[::-1]):
        if not nv.is_identity((1, K)):
            continue
        got = scaled(n)
        if got is None or w.dtype not in (dt.float32, dt.float16) or isinstance(wv.offset, SymInt):
            continue
        if not (wv.shape == (1, K) and wv.strides[1] in (0, 1) and (wv.strides[1] == 1 or K == 1)):
            continue
        if w.numel < wv.offset + K:
            continue
        return got[0], (w, View((K,), (1,), wv.offset)), got[1]
    return None


@rule
def fold_rms_norm_into_gemv(g: Graph) -> int:
    """rms_norm(x, w, eps) (LLaMA's RMSNorm in plain ops: x * rsqrt(mean(x * x) + eps) * w) read
    by a one-row linear: the GEMV normalises x itself (the row's sum of squares comes out of its
    final reduction and scales the dot products), so the norm's reduction and scale are no
    kernels of their own."""
    from .nn import DecodeLinearKernel
    fired = 0
    for n in g.nodes:
        if not (_is(n, DecodeLinearKernel) and n.arg.ln is None and not n.arg.K2 and not n.arg.rms
                and not n.arg.glu):
            continue
        x, xv = n.srcs[0]
        m = _match_rms_norm(x, xv, n.arg.K)
        if m is None:
            continue
        (inner, iv), w, eps = m
        n.arg = DecodeLinearKernel(n.arg.w_dtype, n.arg.N, n.arg.K, (w is not None, False, eps), rms=True)
        n.set_srcs(((inner, iv), n.srcs[1]) + ((w,) if w is not None else ()))
        fired += 1
    return fired


def _bias_act_chain(g: Graph, gm: Node):
    """From a GEMV node: its single consumer `+ bias` ([N] float32) and then `.gelu()`, as far
    as they go. Returns (end node, bias (node, view) or None, act or None)."""
    N = gm.arg.N
    end, bias, act = gm, None, None
    r = g.only_reader(end)
    if r is not None:
        c, i = r
        other = c.srcs[1 - i] if c.op is Op.ADD and len(c.srcs) == 2 else None
        if (other is not None and c.shape == gm.shape and c.srcs[i][1].is_identity(gm.shape)
                and other[0].buffer is not None and other[0].dtype is dt.float32 and other[0].shape == (N,)
                and other[1].shape == gm.shape and other[1].strides[-1] == 1 and other[1].offset == 0):
            end, bias = c, other
            r = g.only_reader(end)
    if r is not None:
        c, i = r
        if c.op is Op.GELU and c.shape == end.shape and c.srcs[0][1].is_identity(end.shape):
            end, act = c, "gelu"
    return end, bias, act


def _redirect(g: Graph, old: Node, new: Node, offset: int) -> None:
    """Every graph read of `old` (a [1, n] row) reads `new` at element `offset` on instead (no
    copy between them), and `old` itself becomes that slice of `new` (for a Tensor holding it)."""
    for c, i in g.readers.get(id(old), ()):
        v = c.srcs[i][1]
        srcs = list(c.srcs)
        srcs[i] = (new, View(v.shape, v.strides, v.offset + offset))
        c.set_srcs(tuple(srcs))
    old.op, old.arg = Op.CAST, None
    old.set_srcs(((new, View(old.shape, View.contiguous(old.shape).strides, offset)),))


@rule
def stack_sibling_gemvs(g: Graph) -> int:
    """Two one-row linears of one input, each after its own layer norm (GPT-NeoX's ln1 + QKV
    and ln2 + MLP up): ONE GEMV over both weights stacked, each norm folded in, each bias and
    gelu in its store; what read the two results reads slices of the stacked one."""
    from .nn import DecodeLinearKernel, DecodeNormLinearsKernel
    groups: dict = {}
    for n in g.nodes:
        if _is(n, DecodeLinearKernel) and n.arg.ln is not None and not n.arg.K2 and not n.arg.rms and n is not g.root:
            x, xv = n.srcs[0]
            groups.setdefault((id(x), xv, n.arg.K, n.arg.w_dtype, n.arg.ln[2]), []).append(n)
    fired = 0
    limit = get_device().max_storage_buffers
    for (_, _, K, wd, eps), nodes in groups.items():
        if len(nodes) < 2:
            continue
        a, b = sorted(nodes, key=lambda n: n.seq)[:2]
        parts = []
        for gm in (a, b):
            end, bias, act = _bias_act_chain(g, gm)
            has_w, has_b, _ = gm.arg.ln
            rest = list(gm.srcs[2:])
            lw = rest.pop(0) if has_w else None
            lb = rest.pop(0) if has_b else None
            parts.append((gm, end, lw, lb, bias, act))
        params = [p for part in parts for p in part[2:5]]
        if any(p is not None and (p[0].dtype is not dt.float32 or not p[1].is_contiguous) for p in params):
            continue
        if 5 + sum(p is not None for p in (parts[0][2], parts[1][2], parts[0][4], parts[1][4])) > limit:
            continue
        N1, N2 = a.arg.N, b.arg.N
        present = tuple(tuple(p is not None for p in part[2:5]) for part in parts)
        srcs = [a.srcs[0], a.srcs[1], b.srcs[1]]
        for part in parts:
            for p in part[2:5]:
                if p is not None:
                    srcs.append((p[0], View.contiguous((p[0].numel,))))
        kern = DecodeNormLinearsKernel(wd, N1, N2, K, eps, present, (parts[0][5], parts[1][5]))
        s = Node(Op.CUSTOM, (), dt.float32, (1, N1 + N2), arg=kern)
        s.set_srcs(tuple(srcs))
        _redirect(g, parts[0][1], s, 0)
        _redirect(g, parts[1][1], s, N1)
        fired += 1
    return fired


@rule
def stack_sibling_rms_gemvs(g: Graph) -> int:
    """Two or three one-row linears of one input, each after the same RMSNorm (the GEMVs
    fold_rms_norm_into_gemv left: LLaMA's q, k and v; gate and up): ONE GEMV over the weights
    stacked, the norm folded in once, each part's `+ bias` (and gelu) in its store; what read
    the results reads slices of the stacked one."""
    from .nn import DecodeLinearKernel, DecodeRmsLinearsKernel
    groups: dict = {}
    for n in g.nodes:
        if _is(n, DecodeLinearKernel) and n.arg.rms and not n.arg.K2 and n is not g.root and len(n.srcs) in (2, 3):
            (x, xv), (w, wv) = n.srcs[:2]
            if w.buffer is None:
                continue
            lw = n.srcs[2] if n.arg.ln[0] else None
            if (len(n.srcs) == 3) != bool(n.arg.ln[0]):
                continue
            key = (id(x), xv, n.arg.K, n.arg.w_dtype, n.arg.ln[2],
                   (id(lw[0]), lw[1]) if lw is not None else None)
            groups.setdefault(key, []).append(n)
    fired = 0
    limit = get_device().max_storage_buffers
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        nodes = sorted(nodes, key=lambda n: n.seq)
        while nodes:
            take = None
            for k in (3, 2):
                part = nodes[:k]
                if len(part) < k:
                    continue
                chains = [_bias_act_chain(g, gm) for gm in part]
                if any(b is not None and (b[0].dtype is not dt.float32 or not b[1].is_contiguous)
                       for _, b, _ in chains):
                    continue
                # out, x, the weights, the norm weight, the biases
                if 2 + k + (key[5] is not None) + sum(b is not None for _, b, _ in chains) <= limit:
                    take = (part, chains)
                    break
            if take is None:
                break
            part, chains = take
            nodes = nodes[len(part):]
            a = part[0]
            K, wd, eps = a.arg.K, a.arg.w_dtype, a.arg.ln[2]
            Ns = tuple(gm.arg.N for gm in part)
            srcs = [a.srcs[0]] + [gm.srcs[1] for gm in part] + ([a.srcs[2]] if a.arg.ln[0] else [])
            for _, b, _ in chains:
                if b is not None:
                    srcs.append((b[0], View.contiguous((b[0].numel,))))
            kern = DecodeRmsLinearsKernel(wd, Ns, K, eps, bool(a.arg.ln[0]), tuple(b is not None for _, b, _ in chains),
                                          tuple(act for _, _, act in chains))
            st = Node(Op.CUSTOM, (), dt.float32, (1, sum(Ns)), arg=kern)
            st.set_srcs(tuple(srcs))
            off = 0
            for (end, _, _), N in zip(chains, Ns):
                _redirect(g, end, st, off)
                off += N
            fired += 1
    return fired


@rule
def fold_glu_into_gemv(g: Graph) -> int:
    """silu(gate) * up read by a one-row linear, gate and up two slices of one row (the stacked
    gate/up GEMV stack_sibling_rms_gemvs made: LLaMA's SwiGLU): the GEMV computes its row as it
    loads it, so the product is no kernel of its own."""
    from .nn import DecodeLinearKernel
    fired = 0
    for n in g.nodes:
        if not (_is(n, DecodeLinearKernel) and n.arg.ln is None and not n.arg.K2 and not n.arg.rms
                and not n.arg.glu):
            continue
        K = n.arg.K
        m, mv = n.srcs[0]
        if not (m.op is Op.MUL and m.buffer is None and m.dtype is dt.float32 and m.shape == (1, K)
                and _row_view(mv, m) and len(m.srcs) == 2):
            continue
        for (sl, slv), (b, bv) in (m.srcs, m.srcs[::-1]):
            if not (sl.op is Op.SILU and sl.buffer is None and sl.dtype is dt.float32 and sl.shape == (1, K)
                    and slv.is_identity((1, K))):
                continue
            a, av = sl.srcs[0]
            if not (a is b and a.dtype is dt.float32 and _flat_row(av, K) and _flat_row(bv, K)):
                continue
            d = bv.offset - av.offset
            if d <= 0 or d % 4 or a.numel < bv.offset + K:
                continue
            n.arg = DecodeLinearKernel(n.arg.w_dtype, n.arg.N, K, glu=d)
            n.set_srcs(((a, View((1, K), (K, 1), av.offset)), n.srcs[1]))
            fired += 1
            break
    return fired


def _top_sums(g: Graph):
    """(n, terms) for each unrealized float32 sum n that no bigger sum holds, consumers first (the
    largest sums), with its terms (_add_leaves): what the pairing rules look through."""
    for n in reversed(g.nodes):
        if n.op is not Op.ADD or n.buffer is not None or n.dtype is not dt.float32:
            continue
        if g.only_reader(n) is not None and g.only_reader(n)[0].op is Op.ADD:
            continue                      # part of a bigger sum, seen from its top
        leaves: list = []
        _add_leaves(g, n, View.contiguous(n.shape), leaves, True)
        yield n, leaves


def _add_leaves(g: Graph, n: Node, v: View, out: list, top: bool) -> None:
    """The terms of a sum of same-shape tensors (x + a + b, in any grouping)."""
    if (n.op is Op.ADD and n.buffer is None and (top or (g.reads(n) == 1 and v.is_identity(n.shape)))
            and all(sv.shape == n.shape for _, sv in n.srcs)):
        for m, sv in n.srcs:
            _add_leaves(g, m, sv, out, False)
    else:
        out.append((n, v))


@rule
def pair_gemvs_in_sum(g: Graph) -> int:
    """A sum with two one-row linears among its terms (GPT-NeoX's parallel residual:
    x + attn_output(a) + mlp_down(u)): ONE GEMV over both inputs and weights, the other terms
    (biases, the residual) added in its store."""
    from .nn import DecodeLinearKernel
    fired = 0
    for n, leaves in _top_sums(g):
        if n.numel == 0:
            continue
        gemvs = [(m, v) for m, v in leaves
                 if _is(m, DecodeLinearKernel) and m.arg.ln is None and not m.arg.K2 and not m.arg.glu and g.reads(m) == 1
                 and v.shape == n.shape and _row_view(v, m) and m.numel == n.numel]
        if len(gemvs) < 2:
            continue
        (g1, _), (g2, _) = gemvs[:2]
        k1, k2 = g1.arg, g2.arg
        if k1.N != k2.N or not (k1.w_dtype is k2.w_dtype or (k1.w_dtype.is_quant and k2.w_dtype.is_quant)):
            continue
        pair = Node(Op.CUSTOM, (), dt.float32, g1.shape,
                    arg=DecodeLinearKernel(k1.w_dtype, k1.N, k1.K, None, k2.K, k2.w_dtype))
        pair.set_srcs((g1.srcs[0], g1.srcs[1], g2.srcs[0], g2.srcs[1]))
        _sum_with(n, pair, [lv for lv in leaves if lv[0] is not g1 and lv[0] is not g2])   # [1, N] read as [N]
        fired += 1
    return fired


def _sum_with(n: Node, node: Node, rest: list) -> None:
    """Make sum node n read `node` (its shape's elements in order) plus the `rest` of its terms:
    what is left of a sum after a rule replaced some of its terms by one kernel."""
    acc = (node, View.contiguous(n.shape))
    if not rest:
        n.op = Op.CAST
        n.set_srcs((acc,))
        return
    for m, v in rest[:-1]:
        s = Node(Op.ADD, (), n.dtype, n.shape)
        s.set_srcs((acc, (m, v)))
        acc = (s, View.contiguous(n.shape))
    n.set_srcs((acc, rest[-1]))


def _one_token_attentions(g: Graph):
    """(node, q, k, v sources, heads, head size, key length) of every unrealized causal
    attention of one query over a cache prefix: what the decode-attention rules look at."""
    from .nn import AttentionKernel
    for n in g.nodes:
        if (_is(n, AttentionKernel) and n.arg.kv_len_runtime is not None and n.arg.causal
                and n.arg.out_layout == "bsd" and len(n.srcs) == 3 and n.shape[1] == 1):
            yield (n,) + tuple(n.srcs) + (n.shape[0], n.shape[2], n.arg.kv_len_runtime)


@rule
def fuse_decode_attention(g: Graph) -> int:
    """One query token: q = rope(qkv[:, 0]), cache_k[:, pos] = rope(qkv[:, 1]),
    cache_v[:, pos] = qkv[:, 2], attention(q, cache[:, :pos + 1]) is ONE kernel (the rope,
    both cache writes, the attention and its split combine), reading q, k and v from the
    fused projection."""
    from .kernels.attention import rope_attention_decode_supported
    from .kernels.common import Operand
    from .nn import RopeAttentionDecodeKernel
    fired = 0
    for n, (q, qv), (ka, kav), (va, vav), H, D, L in _one_token_attentions(g):
        m = _match_rope_cache_write(q, qv, ka, kav, va, vav, H, D)
        if m is None or m["T"] != 1 or not _same(m["start"], L - 1):
            continue
        probe = Operand(None, m["qkv"].dtype, m["qkv_view"].shape, m["qkv_view"].strides, m["qkv_view"].offset)
        cache_dtype = m["kbase"].dtype
        if not rope_attention_decode_supported(probe, H, D, cache_dtype):
            continue
        # the position and key length are kernel parameters (step variables under tg.capture)
        n.arg = RopeAttentionDecodeKernel(H, D, m["rot"], m["max_ctx"], m["base"], cache_dtype, n.arg.scale,
                                          step=(m["start"], L))
        kbase, vbase = m["kbase"], m["vbase"]
        n.set_srcs(((m["qkv"], m["qkv_view"]), (kbase, View.contiguous(kbase.shape)),
                     (vbase, View.contiguous(vbase.shape))))
        _writes_done_by(n, ka, va, m)
        fired += 1
    return fired


@rule
def fuse_decode_attention_gqa(g: Graph) -> int:
    """One query token with separate q, k and v rows (LLaMA's own projections) and grouped-query
    heads: q = rope(q_row), cache_k[:, pos] = rope(k_row), cache_v[:, pos] = v_row (caches with
    Hkv <= H heads, query head h reading KV head h // (H / Hkv)), attention(q, cache[:, :pos + 1])
    is ONE kernel, either rope mode ("normal" adjacent pairs or "neox")."""
    from .kernels.attention import rope_attention_decode_supported
    from .kernels.common import Operand
    from .nn import RopeAttentionDecodeKernel
    fired = 0
    if get_device().max_storage_buffers < 7:     # q, k, v, both caches, out, scratch
        return 0
    for n, (q, qv), (ka, kav), (va, vav), H, D, L in _one_token_attentions(g):
        m = _match_decode_sep(q, qv, ka, kav, va, vav, H, D)
        if m is None or not _same(m["start"], L - 1):
            continue
        probe = Operand(None, m["q"][0].dtype, (1, 3, H, D), (0, 0, 0, 0), 0)
        cache_dtype = m["kbase"].dtype
        if not rope_attention_decode_supported(probe, H, D, cache_dtype):
            continue
        n.arg = RopeAttentionDecodeKernel(H, D, m["rot"], m["max_ctx"], m["base"], cache_dtype, n.arg.scale,
                                          mode=m["mode"], step=(m["start"], L), n_kv_heads=m["Hkv"],
                                          freq_factors=m["ff"])
        kbase, vbase = m["kbase"], m["vbase"]
        n.set_srcs((m["q"], m["k"], m["v"], (kbase, View.contiguous(kbase.shape)),
                    (vbase, View.contiguous(vbase.shape))))
        _writes_done_by(n, ka, va, m)
        fired += 1
    return fired


def _match_decode_sep(q, qv, ka, kav, va, vav, H, D):
    """The pieces of one decode token's attention input with separate q/k/v rows: q =
    rope(q_row [1, H, D]), cache_k[:, p:p+1] = rope(k_row [1, Hkv, D]), cache_v[:, p:p+1] = v_row,
    the caches [Hkv, max_ctx, D] with Hkv dividing H, the rope positions an arange starting at p:
    the prompt form's match for one token (_match_prompt_sep). Returns the q / k / v (node,
    [1, heads, D] view) and the rest; None when the graph is not that."""
    return _match_prompt_sep(q, qv, ka, kav, va, vav, H, 1, D)


def _match_rope_cache_write(q, qv, ka, kav, va, vav, H, D):
    """The pieces of plain-code attention input for T tokens: q = rope(qkv[:, 0]),
    cache_k[:, p:p+T] = rope(qkv[:, 1]), cache_v[:, p:p+T] = qkv[:, 2], with the rope positions
    an arange starting at p (so the rows written are the rows the rope angles are for): the
    separate-q/k/v match (_match_prompt_sep) with neox rope, no frequency factors, as many KV
    heads as query heads, and q, k, v read from one [T, 3, H, D] block. None when the graph is
    not that."""
    from .nn import RopeKernel
    if not (_is(q, RopeKernel) and q.arg.freq_factors is None and q.arg.args[5] == "neox"):
        return None
    T = q.arg.args[0]
    m = _match_prompt_sep(q, qv, ka, kav, va, vav, H, T, D)
    if m is None or m["Hkv"] != H:
        return None
    (qx, qxv), (kx, kxv), (vw, vxv) = m["q"], m["k"], m["v"]
    # q, k and v all read one [T, 3, H, D] block (GGUF's fused QKV order): qkv[:, 0 / 1 / 2]
    if not (qx is kx is vw):
        return None
    o, R = qxv.offset, 3 * H * D
    for view, at in ((qxv, o), (kxv, o + H * D), (vxv, o + 2 * H * D)):
        if not (view.strides[1:] == (D, 1) and (T == 1 or view.strides[0] == R) and _same(view.offset, at)):
            return None
    if qx.numel < o + T * R:
        return None
    return dict(T=T, qkv=qx, qkv_view=View((T, 3, H, D), (R, H * D, D, 1), o), pos=m["pos"], start=m["start"],
                kbase=m["kbase"], vbase=m["vbase"], rot=m["rot"], base=m["base"], max_ctx=m["max_ctx"])


def _writes_done_by(n: Node, ka: Node, va: Node, m: dict) -> None:
    """The two cache writes are kernel n's now: they stand for the caches once n has run."""
    for a, base in ((ka, m["kbase"]), (va, m["vbase"])):
        a.op, a.arg = Op.AFTER, None
        a.set_srcs(((base, View.contiguous(a.shape)), (n, View.contiguous(n.shape))))
    n.arg.afters = (weakref.ref(ka), weakref.ref(va))   # done when n is (schedule.py)


def _reads_as(v: View, shape: tuple, strides: tuple, offset) -> bool:
    """v reads the elements (shape, strides, offset) names: the same shape and offset, the same
    strides wherever the extent is above 1 (a stride over one element is never used)."""
    return (v.shape == tuple(shape) and not isinstance(v.offset, SymInt) and v.offset == offset
            and all(a == b for a, b, n in zip(v.strides, strides, shape) if n > 1))


def _float_input(node: Node, view: View) -> bool:
    """A float16/32 operand the fused kernel reads with its view's static strides, in bounds."""
    if node.dtype not in (dt.float32, dt.float16) or isinstance(view.offset, SymInt) or view.offset < 0:
        return False
    if any(isinstance(st, SymInt) or st < 0 for st in view.strides):
        return False
    return view.offset + sum((n - 1) * st for n, st in zip(view.shape, view.strides)) < node.numel


def _through_copies(n: Node, v: View):
    """(node, view) reading the same elements as (n, v), past unrealized same-dtype copies of a
    contiguous run of another node: what `_redirect` leaves for a reader outside the graph (the
    batched decode's K/V writes read the q/k/v rows through those after the rows were stacked)."""
    while (n.op is Op.CAST and n.buffer is None and len(n.srcs) == 1 and n.srcs[0][0].dtype is n.dtype
           and not isinstance(v.offset, SymInt)):
        m, mv = n.srcs[0]
        if not (mv.shape == n.shape and mv.is_contiguous and not isinstance(mv.offset, SymInt)):
            break
        n, v = m, View(v.shape, v.strides, v.offset + mv.offset)
    return n, v


def _plus_one_of(n: Node, v: View, pos: Node, pv: View) -> bool:
    """(n, v) is `pos + 1` (int32, read whole), through identity copies."""
    while (n.op is Op.CAST and n.buffer is None and n.dtype is dt.int32 and len(n.srcs) == 1
           and v.is_identity(n.shape) and n.srcs[0][1].is_identity(n.shape)):
        n, v = n.srcs[0]
    if not (n.op is Op.ADD and n.buffer is None and n.dtype is dt.int32 and n.shape == pos.shape
            and v.is_identity(n.shape) and len(n.srcs) == 2):
        return False
    for (a, av), (c, cv) in (n.srcs, n.srcs[::-1]):
        if a is pos and av == pv and _const(c, cv) == 1.0:
            return True
    return False


def _write_before(cache: Node, n: Node):
    """The last in-place write not run yet into cache's buffer issued before n (which reads that
    buffer through another tensor), or None. Folding only that one keeps the order: earlier
    writes still run before n, and none comes between it and n."""
    from .schedule import pending_writes_into
    ws = [w for w in pending_writes_into(cache.buffer) if w.seq < n.seq]
    return max(ws, key=lambda w: w.seq) if ws else None


def _match_batched_decode(n: Node):
    """The pieces of a batched decode step's attention in plain code (base.cached_attention with
    positions an int32 [B] tensor): q = rope(q_in, pos) [B, H, D]; put_along_axis writes of
    rope(k_in, pos) and v [B, Hkv, D] into rows pos[b] of the first B slots of realized caches
    [S, Hkv, max_ctx, D] (the index exactly the positions the ropes used); attention of q [B*H, 1,
    D] over those slots with kv_len = pos + 1. None when the graph is not exactly that."""
    from .nn import RopeKernel
    from .schedule import pending_writes_into
    import numpy as np
    (q, qv), (kc, kcv), (vc, vcv), (ln, lnv) = n.srcs
    if not _is(q, RopeKernel):
        return None
    B, H, D, rot, base, mode = q.arg.args
    if mode not in ("neox", "normal") or n.shape != (B * H, 1, D) or not (
            n.arg.kv_rows == H or (n.arg.kv_rows == 0 and B == 1)):
        return None
    if not _reads_as(qv, (B * H, 1, D), (D, D, 1), 0):
        return None
    (qx, qxv), (pn, pv) = q.srcs
    if not (pn.dtype is dt.int32 and pn.shape == (B,) and pv.is_identity((B,)) and _plus_one_of(ln, lnv, pn, pv)):
        return None
    if pn.buffer is not None and pending_writes_into(pn.buffer):
        return None                      # the positions change between their reads: not one value
    # the caches: the first B slots of two realized [S, Hkv, max_ctx, D] tensors
    if kc.buffer is None or vc.buffer is None or kc.buffer is vc.buffer or len(kc.shape) != 4 or vc.shape != kc.shape:
        return None
    S, Hkv, L, _ = kc.shape
    if kc.shape[3] != D or S < B or Hkv <= 0 or H % Hkv or kc.dtype not in (dt.float16, dt.float32) \
            or vc.dtype is not kc.dtype:
        return None
    if not (_reads_as(kcv, (B * Hkv, L, D), (L * D, D, 1), 0) and _reads_as(vcv, (B * Hkv, L, D), (L * D, D, 1), 0)):
        return None
    # the writes: put_along_axis(cache[:B], pos[:, None, None, None], x[:, :, None, :], axis=2), the
    # last write into each cache before the attention
    vals = []
    for c in (kc, vc):
        w = _write_before(c, n)
        if not (w is not None and w.op is Op.SCATTER and w.srcs[0][0] is c and w.srcs[0][1].is_identity(c.shape)
                and tuple(w.arg.dims) == (0, 1, -1, 3) and len(w.srcs) == 3
                and _reads_as(w.arg.view, (B, Hkv, L, D), (Hkv * L * D, L * D, D, 1), 0)):
            return None
        (x, xv), (ix, ixv) = w.srcs[1], w.srcs[2]
        if not (ix is pn and _reads_as(ixv, (B, Hkv, 1, D), (pv.strides[0], 0, 0, 0), pv.offset)):
            return None
        if xv.shape != (B, Hkv, 1, D):
            return None
        vals.append((w, x, View((B, Hkv, D), (xv.strides[0], xv.strides[1], xv.strides[3]), xv.offset)))
    (ka, kw, kwv), (va, vx, vxv) = vals
    ff = q.arg.freq_factors
    kff = kw.arg.freq_factors if _is(kw, RopeKernel) else None
    if not (_is(kw, RopeKernel) and kw.arg.args == (B, Hkv, D, rot, base, mode) and kw.srcs[1][0] is pn
            and kw.srcs[1][1] == pv and (ff is None) == (kff is None)
            and (ff is None or np.array_equal(np.asarray(ff), np.asarray(kff)))):
        return None
    if not _reads_as(kwv, (B, Hkv, D), (Hkv * D, D, 1), 0):
        return None
    (qx, qxv), (kx, kxv), (vx, vxv) = (_through_copies(*x) for x in ((qx, qxv), kw.srcs[0], (vx, vxv)))
    for node, view, h in ((qx, qxv, H), (kx, kxv, Hkv), (vx, vxv, Hkv)):
        if view.shape != (B, h, D) or not _float_input(node, view):
            return None
    m = dict(B=B, H=H, Hkv=Hkv, D=D, L=L, rot=rot, base=base, mode=mode, ff=ff, pos=(pn, pv), kbase=kc, vbase=vc,
             ka=ka, va=va, q=(qx, qxv), k=(kx, kxv), v=(vx, vxv), qkv=None)
    # q, k and v as one [B, 3, H, D] block (GPT-NeoX's fused projection): one binding, not three
    d = kxv.offset - qxv.offset
    if (qx is kx is vx and Hkv == H and d > 0 and _reads_as(kxv, (B, H, D), qxv.strides, qxv.offset + d)
            and _reads_as(vxv, (B, H, D), qxv.strides, qxv.offset + 2 * d)):
        s0, s1, s2 = qxv.strides
        m["qkv"] = (qx, View((B, 3, H, D), (s0, d, s1, s2), qxv.offset))
    return m


@rule
def fuse_batched_decode_attention(g: Graph) -> int:
    """One token for each of B sequences (continuous batching's decode step, base.cached_attention
    with positions an int32 [B] tensor): q = rope(q_in, pos), put_along_axis writes of rope(k_in,
    pos) and v into row pos[b] of cache slot b, attention over each slot's first pos[b] + 1 rows
    (kv_len = pos + 1) is ONE kernel: the ropes, both cache writes, the `pos + 1`, the attention and
    its split combine. q/k/v from one [B, 3, H, D] block, or separate with grouped-query heads."""
    from .kernels.attention import rope_attention_decode_supported
    from .kernels.common import Operand
    from .nn import AttentionKernel, RopeAttentionDecodeKernel
    fired = 0
    limit = get_device().max_storage_buffers
    for n in g.nodes:
        if not (_is(n, AttentionKernel) and n.arg.kv_len_runtime is None and n.arg.kv_len_static is None
                and n.arg.causal and n.arg.out_layout == "bsd" and len(n.srcs) == 4 and len(n.shape) == 3
                and n.shape[1] == 1):
            continue
        m = _match_batched_decode(n)
        if m is None:
            continue
        B, H, D, cache_dtype = m["B"], m["H"], m["D"], m["kbase"].dtype
        block = m["qkv"] is not None
        # bindings: qkv (or q, k, v), positions, both caches, out, scratch
        if limit < (6 if block else 8):
            continue
        probe = Operand(None, m["q"][0].dtype, (B, 3, H, D), (0, 0, 0, 0), 0)
        if not rope_attention_decode_supported(probe, H, D, cache_dtype, m["L"]):
            continue
        n.arg = RopeAttentionDecodeKernel(H, D, m["rot"], m["L"], m["base"], cache_dtype, n.arg.scale, mode=m["mode"],
                                          n_kv_heads=None if block else m["Hkv"], freq_factors=m["ff"], batched=True)
        kbase, vbase = m["kbase"], m["vbase"]
        ins = (m["qkv"],) if block else (m["q"], m["k"], m["v"])
        n.set_srcs(ins + (m["pos"], (kbase, View.contiguous(kbase.shape)), (vbase, View.contiguous(vbase.shape))))
        _writes_done_by(n, m["ka"], m["va"], m)
        fired += 1
    return fired


def _cols_view(v: View, N: int, NT: int, off: int):
    """The view of a [M, NT] node that reads what `v` reads of a contiguous [M, N] one whose
    columns are its columns off .. off+N: row strides (multiples of N) scale to NT, column
    strides stay, provided no read carries past a row's end. None when v is not like that."""
    if isinstance(v.offset, SymInt):
        return None
    o_r, o_c = divmod(v.offset, N)
    strides, reach = [], o_c
    for n, st in zip(v.shape, v.strides):
        if n == 1 or st % N == 0:
            strides.append(0 if n == 1 else st // N * NT)
        elif st > 0:
            strides.append(st)
            reach += (n - 1) * st
        else:
            return None
    return View(v.shape, tuple(strides), o_r * NT + o_c + off) if reach < N else None


def _sibling_end(g: Graph, L: Node):
    """(end node, bias (node, view) or None): L, or its only reader `L + b` with b [N] float32
    broadcast over the rows (tg.nn.linear's bias), which the stacked kernel's store adds."""
    M, N = L.shape
    r = g.only_reader(L)
    if r is not None:
        c, i = r
        if c.op is Op.ADD and c.buffer is None and len(c.srcs) == 2 and c.shape == L.shape and c.dtype is dt.float32 \
                and c.srcs[i][1].is_identity(L.shape):
            b, bv = c.srcs[1 - i]
            if b.shape == (N,) and b.dtype is dt.float32 and bv.shape == (M, N) and bv.strides == (0, 1) \
                    and bv.offset == 0:
                return c, (b, View((N,), (1,), 0))
    return L, None


@rule
def stack_sibling_matmuls(g: Graph) -> int:
    """Two or three many-row linears of one x (LLaMA's and Qwen2's q, k and v projections of a
    prompt): ONE tiled matmul over the weights side by side (customops.StackedMatmulKernel; each
    weight stays its own tensor), biases added in its store; what read each projection reads its
    columns. Why: k and v have few columns (TinyLlama: 256 of q's 2048), too few output tiles
    to fill a GPU without splitting K, so three matmuls, three split-K reductions, ran where
    one fills it. Only where each projection's readers are kernels of their own anyway (rope,
    a cache write, a strided read), never an epilogue the stack would take away (gate/up's
    silu(gate) * up stays in up's store)."""
    from .customops import MatmulKernel, QuantMatmulKernel, StackedMatmulKernel
    from .graph import IN_PLACE
    from .kernels import matmul as mm, quant
    from .nn import RopeKernel
    from .tensor import Tensor, cat
    groups: dict = {}
    for L in g.nodes:
        q = _is(L, QuantMatmulKernel)
        if not ((q or _is(L, MatmulKernel)) and L is not g.root and len(L.shape) == 2 and len(L.srcs) == 2):
            continue
        (X, xv), (W, wv) = L.srcs
        M, N = L.shape
        K = xv.shape[-1] if len(xv.shape) == 2 else -1
        if not (W.buffer is not None and W.shape == (N, K) and wv == View((K, N), (1, K), 0)
                and (q or W.dtype in (dt.float32, dt.float16)) and X.dtype in (dt.float32, dt.float16)
                and M > (quant.TUNING if q else mm.TUNING)["gemv_max_m"]):
            continue
        groups.setdefault((id(X), xv, W.dtype, q), []).append(L)
    fired = 0
    limit = get_device().max_storage_buffers
    for (_, xv, wd, q), nodes in groups.items():
        if len(nodes) < 2:
            continue
        parts = []
        for L in sorted(nodes, key=lambda n: n.seq):
            end, bias = _sibling_end(g, L)
            ok = end is not g.root
            for c, i in g.readers.get(id(end), ()):
                v = c.srcs[i][1]
                fine = (_is(c, RopeKernel) or (c.op in IN_PLACE and i == 1)
                        or (c.is_elementwise and not v.is_identity(end.shape)))
                ok = ok and fine
            if ok:
                parts.append((L, end, bias))
        # a weight whose columns are not a multiple of 128 goes last; only one may be
        parts.sort(key=lambda p: p[0].shape[1] % 128 != 0)
        while len(parts) > 1 and (any(p[0].shape[1] % 128 for p in parts[:-1])
                                  or 2 + len(parts) + sum(b is not None for _, _, b in parts) > limit):
            parts.pop()
        parts = parts[:3]
        if len(parts) < 2:
            continue
        Ns = [L.shape[1] for L, _, _ in parts]
        NT, M, K = sum(Ns), parts[0][0].shape[0], parts[0][0].srcs[1][0].shape[1]
        offs = [sum(Ns[:j]) for j in range(len(Ns))]
        views = []
        for (L, end, _), N, off in zip(parts, Ns, offs):
            views.append([(c, i, _cols_view(c.srcs[i][1], N, NT, off)) for c, i in g.readers.get(id(end), ())])
        if any(nv is None for vs in views for _, _, nv in vs):
            continue
        st = Node(Op.CUSTOM, (), dt.float32, (M, NT), arg=StackedMatmulKernel(wd, Ns, K))
        st.set_srcs((parts[0][0].srcs[0],) + tuple(L.srcs[1] for L, _, _ in parts))
        top = st
        if any(b is not None for _, _, b in parts):
            pieces = [Tensor(*b) if b is not None else Tensor.const(0.0, dt.float32, (N,))
                      for (_, _, b), N in zip(parts, Ns)]
            top = (Tensor(st) + cat(pieces)).node
        for (L, end, _), N, off, vs in zip(parts, Ns, offs, views):
            for c, i, nv in vs:
                srcs = list(c.srcs)
                srcs[i] = (top, nv)
                c.set_srcs(tuple(srcs))
            end.op, end.arg = Op.CAST, None          # for a Tensor holding it: the columns, copied
            end.set_srcs(((top, View((M, N), (NT, 1), off)),))
        fired += 1
    return fired


@rule
def stack_sibling_layer_norms(g: Graph) -> int:
    """Two layer_norms of one x (GPT-NeoX's parallel residual: the attention and MLP inputs of a
    prompt or a batched decode step): ONE kernel that reduces each row once and stores both
    affines, [2, *x.shape] (nn.StackedLayerNormKernel); what read each norm reads its block.
    Why: each norm re-read x and re-reduced its rows in a dispatch of its own (a B = 64 pythia
    step had 49 of them). Only where every reader of both is a kernel of its own (a matmul),
    never an elementwise consumer a norm's store would take as its epilogue; the one-row case is
    fold_norm_into_gemv's (this rule runs after it)."""
    from .nn import LayerNormKernel, StackedLayerNormKernel
    groups: dict = {}
    for L in g.nodes:
        if _is(L, LayerNormKernel) and L is not g.root and len(L.srcs) >= 1:
            groups.setdefault((id(L.srcs[0][0]), L.srcs[0][1], L.arg.eps), []).append(L)
    fired = 0
    limit = get_device().max_storage_buffers
    for nodes in groups.values():
        pair = [L for L in sorted(nodes, key=lambda n: n.seq)
                if g.reads(L) and all(c.op is Op.CUSTOM for c, _ in g.readers[id(L)])][:2]
        if len(pair) < 2 or len(pair[0].srcs) + len(pair[1].srcs) > limit:   # x once, params, out
            continue
        a, b = pair
        numel = prod(a.shape)
        flags = (a.arg.has_w, a.arg.has_b, b.arg.has_w, b.arg.has_b)
        st = Node(Op.CUSTOM, (), dt.float32, (2,) + tuple(a.shape), arg=StackedLayerNormKernel(a.arg.eps, flags))
        st.set_srcs((a.srcs[0],) + tuple(a.srcs[1:]) + tuple(b.srcs[1:]))
        for j, L in enumerate(pair):
            for c, i in g.readers[id(L)]:
                v = c.srcs[i][1]
                srcs = list(c.srcs)
                srcs[i] = (st, View(v.shape, v.strides, v.offset + j * numel))
                c.set_srcs(tuple(srcs))
            L.op, L.arg = Op.CAST, None          # for a Tensor holding it: its block, copied
            L.set_srcs(((st, View(tuple(a.shape), View.contiguous(a.shape).strides, j * numel)),))
        fired += 1
    return fired


@rule
def pair_matmuls_in_sum(g: Graph) -> int:
    """A sum with two many-row linears among its terms (GPT-NeoX's parallel residual over a
    prompt or a batched decode step: x + attn_output(a) + mlp_down(u)): ONE tiled matmul over the
    concatenated K (customops.PairedMatmulKernel), the other terms (biases, the residual) added
    in its store. Why: the two projections were two matmuls, each with its own split-K
    reduction pass and residual add, where one longer K loop fills the GPU as well. The
    one-row case is pair_gemvs_in_sum's."""
    from .customops import MatmulKernel, PairedMatmulKernel, QuantMatmulKernel
    from .kernels import matmul as mm, matmul_coop as coop, quant
    fired = 0
    for n, leaves in _top_sums(g):
        if len(n.shape) != 2:
            continue
        M, N = n.shape
        cands = []
        for m, v in leaves:
            q = _is(m, QuantMatmulKernel)
            if not ((q or _is(m, MatmulKernel)) and g.reads(m) == 1 and m.shape == (M, N) and v.is_identity(n.shape)
                    and len(m.srcs) == 2 and M > (quant.TUNING if q else mm.TUNING)["gemv_max_m"]):
                continue
            (X, xv), (W, wv) = m.srcs
            if X.dtype not in (dt.float32, dt.float16) or len(xv.shape) != 2 or len(wv.shape) != 2:
                continue
            if not q and W.dtype not in (dt.float32, dt.float16):
                continue
            cands.append((m, W.dtype, xv.shape[1]))
        pair = None
        for i, (m1, d1, k1) in enumerate(cands):
            for m2, d2, k2 in cands[i + 1:]:
                if d1 is d2 and (k1 % 64 == 0 or k2 % 64 == 0):
                    pair = (m1, m2) if k1 % 64 == 0 else (m2, m1)   # the part with whole K steps first
                    break
            if pair:
                break
        if pair is None:
            continue
        m1, m2 = pair
        dts = tuple(src.dtype for m in pair for src, _ in m.srcs)
        if coop.takes(M, dts) and not coop.TUNING["k_parts"]:
            continue                      # two tensor-core matmuls, until paired ones have run on a GPU
        Ks = (m1.srcs[0][1].shape[1], m2.srcs[0][1].shape[1])
        node = Node(Op.CUSTOM, (), dt.float32, (M, N), arg=PairedMatmulKernel(m1.srcs[1][0].dtype, N, Ks))
        node.set_srcs(m1.srcs + m2.srcs)
        _sum_with(n, node, [lv for lv in leaves if lv[0] is not m1 and lv[0] is not m2])
        fired += 1
    return fired


@rule
def fuse_rope_cache_write(g: Graph) -> int:
    """A prompt's q = rope(qkv[:, 0]) and its two cache writes (rope(k) and v into rows
    p..p+T) are one kernel; the attention then reads the roped q it wrote."""
    from .nn import AttentionKernel, RopeKVWriteKernel
    fired = 0
    for n in g.nodes:
        if not (_is(n, AttentionKernel) and len(n.srcs) == 3):
            continue
        (q, qv), (ka, kav), (va, vav) = n.srcs
        H, T, D = n.shape
        m = _match_rope_cache_write(q, qv, ka, kav, va, vav, H, D)
        if m is None or m["T"] != T:
            continue
        kern = RopeKVWriteKernel(T, H, D, m["rot"], m["max_ctx"], m["base"], m["kbase"].dtype)
        r = Node(Op.CUSTOM, (), dt.float32, (H, T, D), arg=kern)
        r.set_srcs(((m["qkv"], m["qkv_view"]), m["pos"], (m["kbase"], View.contiguous(m["kbase"].shape)),
                     (m["vbase"], View.contiguous(m["vbase"].shape))))
        _writes_done_by(r, ka, va, m)
        n.set_srcs(((r, View.contiguous((H, T, D))), (ka, kav), (va, vav)))
        fired += 1
    return fired


def _match_prompt_sep(q, qv, ka, kav, va, vav, H, T, D):
    """The pieces of a T-token attention input with separate q/k/v (LLaMA's and Qwen2's own
    projections) and grouped-query heads: q = rope(q_x [T, H, D]) read as [H, T, D],
    cache_k[:, p:p+T] = rope(k_x [T, Hkv, D]).swapaxes(0, 1), cache_v[:, p:p+T] = v_x.swapaxes(0, 1),
    caches [Hkv, max_ctx, D] with Hkv dividing H, both ropes with the same arguments and
    frequency factors, their positions an arange starting at p (the same one, or one with the
    same start). Returns q / k / v as (node, [T, heads, D] view) and the rest; None when the
    graph is not that."""
    from .nn import RopeKernel
    from .tensor import arange_start
    import numpy as np
    if not (_is(q, RopeKernel) and ka.op is Op.ASSIGN and va.op is Op.ASSIGN and ka.buffer is None
            and va.buffer is None):
        return None
    if not (kav.is_identity(ka.shape) and vav.is_identity(va.shape) and len(ka.shape) == 3 and ka.shape[2] == D
            and va.shape == ka.shape):
        return None
    Hkv, max_ctx = ka.shape[0], ka.shape[1]
    if Hkv <= 0 or H % Hkv:
        return None
    qT, qh, qd, rot, base, mode = q.arg.args
    if (qT, qh, qd) != (T, H, D) or mode not in ("neox", "normal"):
        return None
    # q: rope of [T, H, D] (contiguous, the kernel's output) read as [H, T, D]
    if qv.shape != (H, T, D) or qv.strides[0] != D or qv.strides[2] != 1 or (T > 1 and qv.strides[1] != H * D) \
            or qv.offset != 0:
        return None
    (qx, qxv), qpos = q.srcs
    start = arange_start(*qpos)
    if start is None:
        return None
    kw, kwv = ka.srcs[1]
    ff = q.arg.freq_factors
    if not (_is(kw, RopeKernel) and kw.arg.args == (T, Hkv, D, rot, base, mode)):
        return None
    kff = kw.arg.freq_factors
    if (ff is None) != (kff is None) or (ff is not None and not np.array_equal(np.asarray(ff), np.asarray(kff))):
        return None
    kstart = arange_start(*kw.srcs[1])     # k's positions: the same arange, or one with the same start
    if not (kw.srcs[1][0] is qpos[0] and kw.srcs[1][1] == qpos[1]) and (kstart is None or not _same(kstart, start)):
        return None
    for a in (ka, va):
        t = a.arg
        if not (t.shape == (Hkv, T, D) and t.strides[0] == max_ctx * D and t.strides[2] == 1
                and (T == 1 or t.strides[1] == D) and _same(t.offset, start * D)):
            return None
    if kwv.shape != (Hkv, T, D) or kwv.strides[0] != D or kwv.strides[2] != 1 or kwv.offset != 0 or \
            (T > 1 and kwv.strides[1] != Hkv * D):
        return None
    (kx, kxv) = kw.srcs[0]
    vw, vwv = va.srcs[1]
    if vwv.shape != (Hkv, T, D):
        return None
    vx = View((T, Hkv, D), (vwv.strides[1], vwv.strides[0], vwv.strides[2]), vwv.offset)
    for node, view, h in ((qx, qxv, H), (kx, kxv, Hkv), (vw, vx, Hkv)):
        if view.shape != (T, h, D) or isinstance(view.offset, SymInt) or node.dtype not in (dt.float32, dt.float16):
            return None
        if any(st < 0 for st in view.strides) or view.offset < 0:
            return None
        if view.offset + sum((n - 1) * st for n, st in zip(view.shape, view.strides)) >= node.numel:
            return None
    kbase, vbase = ka.srcs[0][0], va.srcs[0][0]
    if kbase.dtype not in (dt.float16, dt.float32) or vbase.dtype is not kbase.dtype:
        return None
    if kbase.shape != ka.shape or vbase.shape != va.shape:
        return None
    return dict(q=(qx, qxv), k=(kx, kxv), v=(vw, vx), pos=qpos, start=start, kbase=kbase, vbase=vbase, rot=rot,
                base=base, mode=mode, max_ctx=max_ctx, Hkv=Hkv, ff=ff)


@rule
def fuse_rope_cache_write_gqa(g: Graph) -> int:
    """A prompt's q = rope(q_x), cache_k[:, p:p+T] = rope(k_x) and cache_v[:, p:p+T] = v_x with
    separate q/k/v projections and grouped-query heads (LLaMA: "normal" rope; Qwen2: "neox";
    Llama 3.1's frequency factors) are ONE rope + cache-write kernel reading the three
    projections where they are; the attention then reads the roped q it wrote. (The fused-QKV
    form is fuse_rope_cache_write's.)"""
    from .nn import AttentionKernel, RopeKVWriteKernel
    fired = 0
    if get_device().max_storage_buffers < 7:     # q, positions, q_out, both caches, k, v
        return 0
    for n in g.nodes:
        if not (_is(n, AttentionKernel) and len(n.srcs) == 3 and n.arg.out_layout == "bsd" and len(n.shape) == 3):
            continue
        (q, qv), (ka, kav), (va, vav) = n.srcs
        H, T, D = n.shape
        m = _match_prompt_sep(q, qv, ka, kav, va, vav, H, T, D)
        if m is None:
            continue
        kern = RopeKVWriteKernel(T, H, D, m["rot"], m["max_ctx"], m["base"], m["kbase"].dtype, m["mode"],
                                 n_kv_heads=m["Hkv"], freq_factors=m["ff"])
        r = Node(Op.CUSTOM, (), dt.float32, (H, T, D), arg=kern)
        r.set_srcs((m["q"], m["pos"], (m["kbase"], View.contiguous(m["kbase"].shape)),
                    (m["vbase"], View.contiguous(m["vbase"].shape)), m["k"], m["v"]))
        _writes_done_by(r, ka, va, m)
        n.set_srcs(((r, View.contiguous((H, T, D))), (ka, kav), (va, vav)))
        fired += 1
    return fired


@rule
def attention_writes_token_major(g: Graph) -> int:
    """attention(...) [heads, T, d] copied to [T, heads, d] (`a.swapaxes(0, 1).reshape(T, C)`,
    the output projection's input): the attention kernel stores that layout itself, and the
    copy disappears."""
    from .nn import AttentionKernel
    fired = 0
    for c in g.nodes:
        if not (c.op is Op.CAST and c.buffer is None and len(c.srcs) == 1):
            continue
        a, v = c.srcs[0]
        if not (_is(a, AttentionKernel) and a.arg.out_layout == "bsd" and a.dtype is c.dtype and len(a.shape) == 3
                and g.only_reader(a) == (c, 0)):
            continue
        B, sq, d = a.shape
        if sq == 1 or v.shape != (sq, B, d) or v.strides != (d, sq * d, 1) or v.offset != 0:
            continue
        k = a.arg
        a.arg = AttentionKernel(k.causal, k.scale, k.kv_len_static, "sbd", k.kv_len_runtime)
        a.arg.__dict__.update({x: y for x, y in k.__dict__.items() if x not in a.arg.__dict__})
        a.shape = (sq, B, d)
        for r, i in g.readers.get(id(c), ()):
            srcs = list(r.srcs)
            srcs[i] = (a, srcs[i][1])
            r.set_srcs(tuple(srcs))
        c.set_srcs(((a, View.contiguous(a.shape)),))
        fired += 1
    return fired
