"""The fuser: decides which graph nodes get a buffer and which are computed inline, then emits
one kernel per materialized node into the runtime's pending queue.

Rules (see ARCHITECTURE.md):
- unrealized elementwise nodes are always inlined into their consumer (recomputed per read),
  so a chain of elementwise ops with any broadcasts/strided views is one kernel;
- a kernel holds at most one "core": a reduction, or a hand-written kernel that accepts an
  epilogue. A core is fused only when it is read element-for-element (identity views all the
  way up) by an output of its own shape, it has a single consumer and no live Tensor;
  otherwise it is materialized first;
- a kernel binds at most the adapter's storage-buffer limit: past it, the largest inlined
  subtree is materialized and the plan is redone;
- hand-written kernels read realized sources through their strides (no copies unless the
  kernel asks for contiguous input).
"""
from __future__ import annotations

import threading
import weakref
from math import prod
from typing import Optional

from . import dtypes as dt
from .codegen import GraphEpilogue, elementwise_kernel, reduce_kernel, row_kernel
from .graph import IN_PLACE, REINDEXING, WRITE_CHAIN, CustomKernel, Node, ScatterArg, buffer_node
from .ops import Op
from . import runtime
from .runtime import Buffer, dispatch, get_device, grid_for, upload
from .symbolic import is_symbolic, static
from .view import View


class Schedule(list):
    """The kernels realizing a graph, in order: planned first (`schedule`), run afterwards
    (`run`). Each item is a runtime.ScheduledKernel (name, WGSL, bindings, grid, params);
    printing a Schedule lists them."""

    def __str__(self):
        return "\n".join(f"{i:3d}  {k!r}" for i, k in enumerate(self)) or "(no kernels)"

    sent = 0            # kernels already handed to the runtime (a streaming realize)
    stream_every = 0    # > 0: hand them over in chunks as they are planned

    def run(self) -> None:
        """Queue every kernel not queued yet (compiling pipelines the first time a source is seen)."""
        todo, self.sent = self[self.sent:], len(self)
        runtime._collectors.append(None)     # dispatch for real, not into a schedule
        try:
            for k in todo:
                dispatch(k.name, k.wgsl, k.bindings, k.grid, k.params)
        finally:
            runtime._collectors.pop()

    def append(self, k) -> None:
        super().append(k)
        # a realize hands planned kernels over every `stream_every`: each was planned after all
        # it reads, so a prefill's first layers start on the GPU while the last are planned
        if self.stream_every and len(self) - self.sent >= self.stream_every:
            self.run()


@runtime.locked
def schedule(node: Node) -> Schedule:
    """Plan the kernels that give `node` (and the unrealized graph under it) its buffer, without
    running any: graph rewrites (rewrites.py), then fusion. The nodes get their buffers now; the
    kernels that fill them must be run (`Schedule.run`) before anything reads them, which
    `realize` does at once."""
    out = Schedule()
    if node.buffer is not None:
        return out
    runtime._collectors.append(out)
    try:
        _schedule(node)
    finally:
        runtime._collectors.pop()
    return out


def realize(node: Node) -> None:
    """Make sure `node` has a buffer: schedule, then run the schedule. Kernels planned before an
    exception (an interrupt while planning) still run, so every node that got a buffer holds
    its value. Holds the runtime's lock throughout (planning reads and writes shared graph
    state, and the kernels must be queued as one unit)."""
    if node.buffer is not None:
        return
    with runtime.LOCK:
        _realize_locked(node)


def _realize_locked(node: Node) -> None:
    if node.buffer is not None:
        return
    if runtime._collectors and runtime._collectors[-1] is not None:
        _schedule(node)      # inside a schedule being planned: plan into it
        return

    out = Schedule()
    out.stream_every = runtime.SUBMIT_EVERY
    runtime._collectors.append(out)
    try:
        _schedule(node)
    finally:
        runtime._collectors.pop()
        out.run()


def _schedule(node: Node) -> None:
    if node.buffer is not None:
        return
    if _depth[0] == 0:
        # only the outermost realize bounds the graph depth: nested realizes work inside a
        # graph already cut, and re-walking it at every level was quadratic in model size
        _depth[0] += 1
        saved = _graph_consumers[0]
        try:
            if node.op is not Op.CONST:
                from .rewrites import rewrite
                rewrite(node)
                _graph_consumers[0] = _count_consumers(node)
                _cut_deep(node)
            _realize(node)
        finally:
            _depth[0] -= 1
            _graph_consumers[0] = saved
        return
    _realize(node)


# How many reads each unrealized node has inside the graph being realized (not how many nodes
# were ever built on it, nor whether a Python variable still holds it): what decides whether
# a core fuses into its consumer. A fused node keeps its sources, so a tensor read again
# later is recomputed (call .realize() on it to keep it instead).
_graph_consumers: list = [None]


def _count_consumers(root: Node) -> dict:
    counts: dict = {}
    seen = {id(root)}
    stack = [root]
    while stack:
        n = stack.pop()
        for m, _ in n.srcs:
            if m.buffer is not None or m.op is Op.CONST:
                continue
            c = counts.get(id(m))
            counts[id(m)] = (m, c[1] + 1) if c else (m, 1)   # the node is kept: ids stay unique
            if id(m) not in seen:
                seen.add(id(m))
                stack.append(m)
    return counts


_depth = [0]


def _realize(node: Node) -> None:
    if node.buffer is not None:
        return
    if node.op is Op.CONST:
        node.buffer = upload(_const_bytes(node.arg, node.dtype))
        node.shape = ()
        return
    if node.op is Op.CUSTOM:
        _emit_custom(node, node, None)
        return
    if node.op in IN_PLACE:
        _emit_assign(node)
        return
    if node.op is Op.SINK:
        for m, _ in node.srcs:
            realize(m)
        return
    if node.op is Op.AFTER:
        target, dep = node.srcs[0][0], node.srcs[1][0]
        realize(dep)
        realize(target)
        _done_writing(node, _base_buffer(target))
        return
    core, root = _plan(node, rows=True)
    out = Buffer(max(node.dtype.nbytes(node.numel), 4))
    if core is None:
        src, bindings, n_wg, params = elementwise_kernel(root, out, View.contiguous(root.shape))
        _dispatch(_name("E", root), src, bindings, n_wg, params)
    elif isinstance(core, RowCores):
        src, bindings, n_wg, params = row_kernel(root, core.cores, core.k, out, get_device().has_subgroups)
        _dispatch(_name("RE", root, core.cores), src, bindings, n_wg, params)
    elif core.is_reduce:
        _emit_reduce(core, root, out)
    else:
        _emit_custom(core, root, out)
        return
    root.set_buffer(out)


# reductions this long with few outputs run in two stages: a 32000-token vocabulary's argmax (Llama
# 2, Mistral) in one workgroup was 2.6% of a TinyLlama decode step on the H200 (a 50304 one, split, 1.2%)
SPLIT_MIN_LEN = 16384
SPLIT_CHUNK = 4096
# Generated code never loops more than this many times in one invocation: lavapipe silently
# stops a loop after 65,535 iterations (wrong sums, no error), and other drivers have watchdogs.
# A reduction whose per-thread loop would run longer is split over more workgroups.
MAX_THREAD_TRIPS = 16384


def _emit_reduce(core: Node, root: Node, out: Buffer) -> None:
    """A reduction kernel; one long row is split over many workgroups (stage 1 writes a
    partial per chunk, stage 2 reduces the partials and applies the epilogue), so a 50k-vocab
    argmax or a 1M-element sum uses the whole GPU instead of one workgroup."""
    subgroups = get_device().has_subgroups
    axes = core.arg
    src_view = core.srcs[0][1]
    rlen = prod(src_view.shape[a] for a in axes)
    n_out = prod(core.shape)
    inner_contig = src_view.strides[axes[-1]] == 1 if axes else True
    if (rlen < SPLIT_MIN_LEN or n_out > 64 or not inner_contig) and _thread_trips(src_view, axes, rlen, n_out) <= MAX_THREAD_TRIPS:
        src, bindings, n_wg, params = reduce_kernel(core, root, out, subgroups)
        _dispatch(_name("R", root, core), src, bindings, n_wg, params)
        return
    # stage 1: C chunks per output row, each one workgroup of 256 threads looping over CH / 256
    # elements (at most MAX_THREAD_TRIPS); stage 2 reduces C <= 1024-ish partials per row
    C = max(min(-(-rlen // SPLIT_CHUNK), 1024), -(-rlen // (256 * MAX_THREAD_TRIPS)))
    CH = -(-rlen // C)
    C = -(-rlen // CH)
    is_arg = core.op in (Op.ARGMAX, Op.ARGMIN)
    pd = core.srcs[0][0].dtype if is_arg else core.dtype
    pd = {dt.float16: dt.float32, dt.bool_: dt.int32}.get(pd, pd)
    P = Buffer(4 * n_out * C)
    I = Buffer(4 * n_out * C) if is_arg else None
    src, bindings, n_wg, params = reduce_kernel(core, core, None, subgroups, split=(C, CH, P, I))
    _dispatch(_name("R1", core, core), src, bindings, n_wg, params)
    # stage 2: the same reduction over P viewed with the first reduced axis of length C
    strides = [0] * len(core.shape)
    cs = View.contiguous(core.shape).strides
    for i, s in enumerate(core.shape):
        if i not in axes:
            strides[i] = cs[i] * C
    strides[axes[0]] = 1
    shape = list(core.shape)
    shape[axes[0]] = C
    pview = View(tuple(shape), tuple(strides), 0)
    pnode = buffer_node(P, (n_out * C,), pd)
    inode = (buffer_node(I, (n_out * C,), dt.int32), pview) if is_arg else None
    red2 = Node(core.op, ((pnode, pview),), core.dtype, core.shape, arg=(axes[0],))
    src, bindings, n_wg, params = reduce_kernel(red2, root, out, subgroups, index_src=inode, core_node=core)
    _dispatch(_name("R2", root, core), src, bindings, n_wg, params)


def _thread_trips(src_view: View, axes: tuple, rlen: int, n_out: int) -> int:
    """Loop iterations per invocation of codegen.reduce_kernel's single-kernel form (its own
    strategy choice: a thread per output row for strided rows or short ones, else a workgroup
    of 256 (64 for short rows) striding over the row)."""
    inner_stride = src_view.strides[axes[-1]] if axes else 1
    if (inner_stride != 1 and n_out >= 256) or rlen <= 16:
        return rlen
    return -(-rlen // (256 if rlen >= 256 else 64))


def _const_bytes(value, d: dt.DType) -> bytes:
    import numpy as np
    if d is dt.bool_:
        return np.array([1 if value else 0], np.uint32).tobytes()
    if d is dt.float16:
        return np.array([value, 0], np.float16).tobytes()
    return np.array([value], d.np_dtype).tobytes()


def _dispatch(name: str, src: str, bindings, n_wg: int, params=()) -> None:
    access = {"read": "read", "rw": "rw", "atomic": "rw"}
    dispatch(name, src, [(buf, access[a]) for buf, a, _, _ in bindings], grid_for(n_wg), params)


def _name(prefix: str, root: Node, core=None) -> str:
    ops, seen = [], set()
    cores = list(core) if isinstance(core, (list, tuple)) else [core] if core is not None else []

    def walk(n, depth=0):
        if n.buffer is not None or n.op is Op.CONST or id(n) in seen or len(ops) >= 4:
            return
        seen.add(id(n))
        if all(n is not c for c in cores):
            for m, _ in n.srcs:
                walk(m, depth + 1)
        ops.append(n.op.name.lower())

    for c in cores:
        walk(c.srcs[0][0]) if c.is_reduce and c.srcs else None
        ops.append(c.op.name.lower() if c.op is not Op.CUSTOM else c.arg.name)
        if isinstance(core, (list, tuple)):
            seen.add(id(c))       # a row kernel's reductions are named once
    walk(root)
    return prefix + "_" + "_".join(ops[:6])


def _same_linear(view: View, m: Node) -> bool:
    """Reading `m` through `view` maps each linear index to the same linear index of m (the
    identity, or a reshape of it, e.g. a reduction's keepdims=False result)."""
    return view.offset == 0 and view.is_contiguous and prod(view.shape) == m.numel


def _cores_under(m: Node):
    """The unrealized non-elementwise nodes (reductions, hand-written kernels) the elementwise
    node m is computed from, through elementwise nodes only."""
    seen, stack = set(), [m]
    while stack:
        x = stack.pop()
        for s, _ in x.srcs:
            if s.buffer is not None or s.op is Op.CONST or id(s) in seen:
                continue
            seen.add(id(s))
            if s.is_elementwise:
                stack.append(s)
            else:
                yield s


def _over_a_kernel(m: Node) -> bool:
    """Whether the elementwise node m is computed (through elementwise nodes only) from an
    unrealized reduction or hand-written kernel."""
    return next(_cores_under(m), None) is not None


def _over_reductions_only(m: Node) -> bool:
    """Whether every unrealized non-elementwise node the elementwise node m is computed from
    (through elementwise nodes) is a reduction: what a row kernel may compute with it."""
    return all(s.is_reduce for s in _cores_under(m))


def _graph_reads(m: Node) -> int:
    counts = _graph_consumers[0]
    c = counts.get(id(m)) if counts is not None else None
    return c[1] if c is not None and c[0] is m else m.consumers


def _eligible_core(m: Node, view: View, root: Node) -> bool:
    if _graph_reads(m) != 1:
        return False
    if m.is_reduce:
        return _same_linear(view, m) and m.numel == root.numel
    if not view.is_identity(m.shape) or m.shape != root.shape:
        return False
    return (m.op is Op.CUSTOM and m.arg.supports_epilogue and root.dtype is dt.float32
            and prod(m.shape) > 0)


MAX_DEPTH = 128      # a lazy graph deeper than this is cut into kernels (recursion, WGSL size)
MAX_INLINE = 2048    # distinct (node, index mapping) reads one kernel may inline


class _TooBig(Exception):
    pass


def _cut_deep(root: Node) -> None:
    """Realize every MAX_DEPTH-th level of a very deep lazy graph (a loop of lazy updates),
    bottom-up, so planning and code generation (both recursive) see bounded depth."""
    height: dict = {}
    order: list = []
    stack = [(root, False)]
    while stack:  # iterative post-order over unrealized nodes
        n, done = stack.pop()
        if done:
            height[id(n)] = 1 + max((height[id(m)] for m, _ in n.srcs if id(m) in height), default=-1)
            order.append(n)
            continue
        if id(n) in height or n.buffer is not None or n.op is Op.CONST:
            continue
        height[id(n)] = -1  # on the stack
        stack.append((n, True))
        stack.extend((m, False) for m, _ in n.srcs if id(m) not in height)
    if height.get(id(root), 0) <= MAX_DEPTH:
        return
    h: dict = {}
    cuts = []
    for n in order:  # children first
        h[id(n)] = 1 + max((h[id(m)] for m, _ in n.srcs if id(m) in h), default=-1)
        if h[id(n)] >= MAX_DEPTH and n is not root:
            cuts.append(n)
            del h[id(n)]  # becomes a buffer
    for n in cuts:
        realize(n)


def _static_view(v: View) -> None:
    """Generated code bakes shapes and strides in (offsets are parameters): a step variable in
    one specializes the capture to its value, so a replay never runs a kernel of another size."""
    for x in v.shape + v.strides:
        if type(x) is not int:
            static(x)


def _plan(root: Node, extra_bindings: int = 0, rows: bool = False):
    """Choose the core of root's kernel and materialize every source that can't be inlined
    (`extra_bindings`: storage buffers the kernel binds besides root's, a scatter's index).
    The core is None, a node (a reduction or a hand-written kernel root reads element for
    element), or with `rows` a RowCores: row reductions root reads broadcast over their rows."""
    for x in root.shape:
        if type(x) is not int:
            static(x)
    _bound_select_chains(root)
    limit = get_device().max_storage_buffers - extra_bindings
    while True:
        try:
            return _plan_once(root, limit, rows)
        except _TooBig as e:
            # one node is read through so many different index mappings (x = x[1:] + x[:-1] in a
            # loop) that inlining it everywhere would explode the kernel: give it a buffer
            realize(e.args[0])


class RowCores:
    """The core of a row kernel (codegen.row_kernel): reductions over the trailing axes (from
    axis k on) of an elementwise root that reads them broadcast back over the same rows, as
    RMSNorm, layer norm or softmax written in plain ops do. One workgroup per row computes
    each reduction in turn (a later one may read an earlier one's row value), then the map
    over the row: one kernel instead of a reduction kernel, a materialized [rows, 1] result and
    an elementwise kernel."""

    def __init__(self, cores: list, k: int):
        self.cores, self.k = cores, k


def _row_read(v: View, m: Node):
    """k when the read of m through v (in a kernel domain of shape v.shape) is m broadcast over
    the trailing axes from k on, each leading coordinate the domain's own: m [rows..., 1, ..., 1]
    read by [rows..., row...]. Else None."""
    nd = len(m.shape)
    if len(v.shape) != nd or nd == 0 or is_symbolic(v.offset) or v.offset != 0:
        return None
    k = nd
    while k > 0 and m.shape[k - 1] == 1:
        k -= 1
    if k == nd:
        return None
    cs = View.contiguous(m.shape).strides
    for i in range(nd):
        if i < k and (m.shape[i] != v.shape[i] or (m.shape[i] != 1 and v.strides[i] != cs[i])):
            return None
        if i >= k and v.shape[i] != 1 and v.strides[i] != 0:
            return None
    return k


# A row kernel's reductions: ops it combines in a workgroup (the arg reductions keep their kernels)
_ROW_OPS = (Op.SUM, Op.RMAX, Op.RMIN)
ROW_MAP_MIN = 4096     # a row kernel may map rows this long whatever the length of its reductions


def _row_cores_ok(root: Node, cores: list, shapes: set, edges: dict):
    """k when the row reductions a plan found make one row kernel (codegen.row_kernel) that is
    no slower than what it replaces, else None: every reduction over trailing axes of a
    contiguous row, all with the root's leading shape, each read only there; rows neither
    so short that one thread per row reduces them (reduce_kernel's choice) nor so long and few
    that the reduction splits over workgroups; no loop past MAX_THREAD_TRIPS."""
    from .codegen import compute_type
    if root.dtype is dt.float16 and not get_device().has_f16:
        return None                   # packed f16 stores need pairs per thread
    O = cores[0].shape
    nd = len(O)
    if shapes != {O} or len(root.shape) != nd:
        return None
    k = nd
    while k > 0 and O[k - 1] == 1:
        k -= 1
    if k == nd or tuple(root.shape[:k]) != tuple(O[:k]):
        return None
    n_rows = prod(O)
    RL = prod(root.shape[k:])
    for red in cores:
        sv = red.srcs[0][1]
        if red.op not in _ROW_OPS or compute_type(red.dtype) not in ("f32", "i32", "u32") or red.shape != O:
            return None
        if len(sv.shape) != nd or any(a < k for a in red.arg) or \
                any(sv.shape[a] != 1 for a in range(k, nd) if a not in red.arg):
            return None
        rlen = prod(sv.shape[a] for a in red.arg)
        inner = max(red.arg, key=lambda a: a if sv.shape[a] > 1 else -1)
        if rlen <= 16 or sv.strides[inner] != 1 or (rlen >= SPLIT_MIN_LEN and n_rows <= 64):
            return None
        if -(-rlen // 64) > MAX_THREAD_TRIPS or len(edges.get(id(red), ())) != _graph_reads(red):
            return None
    # the workgroup of a row maps the row: worth it while the map is not much longer than the
    # reductions it follows (x / x[:8].sum() over a long row stays two kernels, the map wide)
    longest = max(prod(r.srcs[0][1].shape[a] for a in r.arg) for r in cores)
    if RL == 0 or n_rows == 0 or -(-RL // 64) > MAX_THREAD_TRIPS or RL > max(4 * longest, ROW_MAP_MIN):
        return None
    return k


def _plan_once(root: Node, limit: int, rows: bool = False):
    rows = rows and root.is_elementwise
    while True:
        core = root if root.is_reduce else None
        inlined: list = []
        misread: list = []  # the core reached again on a path that needs another element of it
        memo: dict = {}
        reads: dict = {}
        row_cores: list = []     # reductions read broadcast over their rows, in dependency order
        row_shapes: set = set()  # their keepdims shapes
        row_edges: dict = {}     # id(reduction) -> {(id(reader), src index)}
        shared: dict = {}        # id(node) -> (node, {(id(reader), src index)}): inlined, read again

        def visit(n: Node, identity_path: bool, path=(), dom=None) -> set:
            """Buffers the inlined computation of n binds. Memoized per index mapping (`path`,
            the non-identity views from the root), so shared subgraphs cost one visit each.
            `dom` (row kernels): "full" when n is read at the coordinates of the kernel's
            domain (the root's, or a row reduction's input) with its shape, "row" when at the
            row's coordinates (a [rows, 1] value), else None."""
            nonlocal core
            key = (id(n), identity_path, path, dom)
            hit = memo.get(key)
            if hit is not None:
                return hit
            if len(memo) > MAX_INLINE:
                worst = max(reads.values(), key=lambda t: t[1])[0]
                raise _TooBig(worst)
            if n is not root:
                reads[id(n)] = (n, reads.get(id(n), (n, 0))[1] + 1)
            mine: set = set()
            memo[key] = mine
            for i, (m, v) in enumerate(n.srcs):
                _static_view(v)
                sub_dom = None
                if rows and dom is not None and n.op not in REINDEXING and m.buffer is None and m.op is not Op.CONST:
                    if v.is_identity(m.shape):
                        sub_dom = dom
                    elif dom == "full" and _row_read(v, m) is not None:
                        sub_dom = "row"     # identity reads below keep m's shape: a row core's
                if sub_dom == "row" and m.is_reduce and core is None:
                    # a row reduction: computed by the kernel's workgroup before the map
                    row_edges.setdefault(id(m), set()).add((id(n), i))
                    if all(m is not c for c in row_cores):
                        mine |= visit(m, False, (path, id(m)), "full")
                        if all(m is not c for c in row_cores):
                            row_cores.append(m)   # after the row reductions its input reads
                            row_shapes.add(m.shape)
                    continue
                if m.buffer is not None:
                    if m.buffer in _pending_writes:
                        writes_before(m.buffer, n.seq)
                    mine.add(id(m.buffer))
                    continue
                if m.op is Op.CONST:
                    continue
                if m is core and m is not root:
                    # a shared elementwise node above the core is read on two paths: the kernel's
                    # accumulator serves only reads of the same element
                    if not (identity_path and n.op not in REINDEXING and _same_linear(v, m)):
                        misread.append(m)
                    continue
                if m.is_elementwise and _graph_reads(m) > 1 and _over_a_kernel(m):
                    if sub_dom is not None and _over_reductions_only(m):
                        # in a row kernel, read more than once but perhaps only here (softmax's
                        # exp(x - max) in the sum and in the map): inlined if so (checked below)
                        shared.setdefault(id(m), (m, set()))[1].add((id(n), i))
                    else:
                        # read by several kernels and built on a matmul / reduction: its own kernel
                        # (with that core in its store), not that core recomputed by every reader
                        realize(m)
                        mine.add(id(m.buffer))
                        continue
                if m.is_elementwise:
                    sub_path = path if v.is_identity(m.shape) and n.op not in REINDEXING else (path, v, id(n))
                    # a core below an elementwise node that other kernels read too would be
                    # recomputed for each of them: only a node read once leads to a core
                    sub = visit(m, identity_path and _same_linear(v, m) and n.op not in REINDEXING
                                and _graph_reads(m) <= 1, sub_path, sub_dom)
                    inlined.append((len(sub), m))
                    mine |= sub
                elif core is None and not row_cores and identity_path and n.op not in REINDEXING \
                        and _eligible_core(m, v, root):
                    core = m
                    if m.is_reduce:
                        mine |= visit(m, False, (path, id(m)))
                    else:
                        for s, sv in m.srcs:
                            realize(s)
                            mine.add(id(s.buffer))
                else:
                    realize(m)
                    mine.add(id(m.buffer))
            return mine

        used = visit(root, True, (), "full" if rows else None)
        if (core is not None and core is not root and core.buffer is not None) or \
                any(m.buffer is not None for _, m in inlined) or any(c.buffer is not None for c in row_cores):
            # planning a source realized a node this plan inlined (or its core): the plan is
            # stale — it would recompute that work — so plan again reading the new buffer
            continue
        if misread:
            realize(misread[0])
            continue
        k = None
        if row_cores or shared:
            k = _row_cores_ok(root, row_cores, row_shapes, row_edges) if row_cores else None
            if k is None or any(len(e) != _graph_reads(m) for m, e in shared.values()):
                rows = False          # the reductions get their own kernels: plan again without rows
                continue
        if len(used) + 1 <= limit:
            return (RowCores(row_cores, k) if row_cores else core), root
        # too many bindings: give the biggest inlined subtree that fits its own kernel, then replan
        fitting = [t for t in inlined if 2 <= t[0] <= limit - 1]
        cats = [m for _, m in inlined if m.op is Op.CAT] + ([root] if root.op is Op.CAT else [])
        if fitting:
            realize(max(fitting, key=lambda t: t[0])[1])
        elif cats and _split_cat(cats[0], limit):
            pass
        elif inlined:
            realize(max(inlined, key=lambda t: t[0])[1])
        else:
            raise RuntimeError(f"kernel for {root} needs {len(used) + 1} storage buffers, over the limit of {limit}")


# A `cat` renders as an if / else-if chain over its pieces, and cats inlined into cats nest
# those chains. lavapipe computes wrong values from a depth of about 78 on (no error), so no
# kernel gets a chain deeper than this: longer cats are split into realized sub-cats.
MAX_SELECT_CHAIN = 32


def _bound_select_chains(root: Node) -> None:
    """Keep every if/else-if chain the kernel of `root` would render at most MAX_SELECT_CHAIN
    deep: a cat of more pieces becomes a cat of realized cats of <= MAX_SELECT_CHAIN pieces,
    and a cat that would nest past the bound under the cats above it is realized on its own."""
    best: dict = {}                       # id(node) -> deepest chain depth it was reached at
    stack = [(root, 0)]
    while stack:
        n, depth = stack.pop()
        if n.buffer is not None or n.op is Op.CONST or n.op is Op.CUSTOM or best.get(id(n), -1) >= depth:
            continue
        if n.op is Op.CAT:
            if len(n.srcs) > MAX_SELECT_CHAIN:
                _chunk_cat(n)
            if depth + len(n.srcs) > MAX_SELECT_CHAIN and n is not root:
                realize(n)
                continue
            depth += len(n.srcs)
        best[id(n)] = depth
        if n.is_elementwise or n.is_reduce or n is root:
            stack.extend((m, depth) for m, _ in n.srcs)


def _chunk_cat(node: Node) -> None:
    """cat(s0 .. sk) -> cat(cat(s0 .. s31) realized, cat(s32 .. s63) realized, ...): the same
    values, each kernel's chain at most MAX_SELECT_CHAIN pieces (a tree for very long cats)."""
    axis = node.arg
    srcs = node.srcs
    while len(srcs) > MAX_SELECT_CHAIN:
        groups = []
        for i in range(0, len(srcs), MAX_SELECT_CHAIN):
            head = srcs[i:i + MAX_SELECT_CHAIN]
            if len(head) == 1:
                groups.append(head[0])
                continue
            shape = list(node.shape)
            shape[axis] = sum(v.shape[axis] for _, v in head)
            sub = Node(Op.CAT, head, node.dtype, tuple(shape), arg=axis)
            sub.seq = node.seq            # it reads what the cat read (in-place write order)
            realize(sub)
            groups.append((sub, View.contiguous(sub.shape)))
        srcs = tuple(groups)
    node.srcs = srcs


def _buffers_read(n: Node, v: View, memo: Optional[dict] = None) -> set:
    """Buffers an inlined read of n would bind."""
    if n.buffer is not None:
        return {id(n.buffer)}
    if n.op is Op.CONST:
        return set()
    if not n.is_elementwise:
        return {id(n)}
    memo = {} if memo is None else memo
    if id(n) not in memo:
        out: set = set()
        for m, mv in n.srcs:
            out |= _buffers_read(m, mv, memo)
        memo[id(n)] = out
    return memo[id(n)]


def _split_cat(node: Node, limit: int) -> bool:
    """Turn cat(s0, s1, ..., sk) into cat(cat(s0..sj) realized, sj+1, ...) so that each kernel
    binds at most `limit` buffers. Returns False when no split makes progress."""
    axis = node.arg
    used: set = set()
    j = 0
    for m, v in node.srcs:
        b = _buffers_read(m, v)
        if j >= 2 and len(used | b) > limit - 1:
            break
        used |= b
        j += 1
    if j < 2 or j >= len(node.srcs):
        return False
    head = node.srcs[:j]
    shape = list(node.shape)
    shape[axis] = sum(v.shape[axis] for _, v in head)
    sub = Node(Op.CAT, head, node.dtype, tuple(shape), arg=axis)
    realize(sub)
    node.srcs = ((sub, View.contiguous(sub.shape)),) + node.srcs[j:]
    return True


def _emit_custom(node: Node, root: Node, out: Optional[Buffer]) -> None:
    from .kernels.common import Operand
    kernel: CustomKernel = node.arg
    # a kernel that writes some of its sources in place (a KV-cache write) runs after every
    # pending lazy read of their old contents
    # (a reader built on this kernel's own result, e.g. attention over the cache it fills, reads
    # the new contents by construction and is not one of them; nor is a read built after the
    # lazy writes a rule folded into this kernel, or after the kernel itself, which an
    # `after_write` orders after it: realizing such a read runs this kernel first)
    folded = [a() for a in getattr(kernel, "afters", ())]
    first_write = min([a.seq for a in folded if a is not None] + [node.seq])
    for i in getattr(kernel, "writes", ()):
        m = node.srcs[i][0]
        for r in list(m.readers or ()):
            if (r.buffer is None and r is not node and r is not root and r.seq < first_write
                    and not _depends_on(r, node)):
                realize(r)
    operands = []
    for i, (m, v) in enumerate(node.srcs):
        realize(m)
        if m.buffer in _pending_writes:
            writes_before(m.buffer, node.seq, node)
        # a hand-written kernel bakes its operands' offsets into its WGSL: one that is a step
        # variable is copied out first by a generated kernel (which takes it as a parameter)
        _static_view(v)
        symbolic = is_symbolic(v.offset) and not m.dtype.is_quant
        if (i in kernel.contiguous_srcs and not v.is_contiguous) or symbolic:
            c = Node(Op.CAST, ((m, v),), m.dtype, v.shape)  # identity cast = contiguous copy
            realize(c)
            m, v = c, View.contiguous(v.shape)
        operands.append(Operand(m.buffer, m.dtype, v.shape, v.strides, v.offset))
    epilogue = GraphEpilogue(root, node) if root is not node else None
    if out is None:
        out = Buffer(max(root.dtype.nbytes(root.numel), 4))
    if root.numel:
        kernel.emit(out, operands, epilogue)
    root.set_buffer(out)
    for ref in getattr(kernel, "afters", ()):   # in-place writes this kernel did (rewrites.py)
        a = ref()
        if a is not None and a.buffer is None:
            realize(a)
    # a core fused into root's store keeps its sources: if another path still reaches it (a
    # view of it read after root realized), it is recomputed, never run without operands


def _depends_on(n: Node, target: Node) -> bool:
    """Whether the unrealized node n reads target's (unrealized) result, directly or through others."""
    seen, stack = set(), [n]
    while stack:
        x = stack.pop()
        if x is target:
            return True
        if id(x) in seen or x.buffer is not None:
            continue
        seen.add(id(x))
        stack.extend(m for m, _ in x.srcs)
    return False


@runtime.locked
def assign(target: Node, view: View, value: Node, value_view: View) -> Node:
    """The in-place `t[idx] = v`, lazily: a node that writes `value` (read through value_view,
    already broadcast to view.shape) into target's buffer through `view`, and stands for the
    written tensor. It runs when something reads that memory, after every lazy read that was
    built before it (creation order, `Node.seq`). Rules (rewrites.py) may fold it into another
    kernel, such as the decode attention that writes the cache row it reads."""
    n = Node(Op.ASSIGN, ((target, View.contiguous(target.shape)), (value, value_view)), target.dtype,
             target.shape, arg=view)
    return _pend(n, target)


@runtime.locked
def scatter(target: Node, arg: ScatterArg, value: Node, value_view: View, indices) -> Node:
    """The in-place scatter `put_along_axis(t, index, value, axis)` or `t[idx] = v`, lazily: like
    `assign`, a node standing for the written tensor, ordered with every other write and read of
    the buffer by creation order. value_view and the views of `indices` ((node, view) pairs) all
    have the iteration shape (see graph.ScatterArg)."""
    n = Node(Op.SCATTER, ((target, View.contiguous(target.shape)), (value, value_view)) + tuple(indices),
             target.dtype, target.shape, arg=arg)
    return _pend(n, target)


def _pend(n: Node, target: Node) -> Node:
    """Register the write `n` into target's buffer as pending."""
    from .graph import HOST_RANGE
    m = target
    while m.op in WRITE_CHAIN and m.srcs:
        m = m.srcs[0][0]
    HOST_RANGE.pop(m, None)              # its remembered host values are no longer its values
    buf = _base_buffer(n)
    with _writes_lock:
        _pending_writes.setdefault(buf, []).append(n)
    return n


@runtime.locked
def after_write(target: Node, kernel: Node) -> Node:
    """The in-place write a hand-written kernel node makes into realized `target`'s buffer (its
    `writes`), as the node that stands for that buffer once the kernel ran (an AFTER). Pending
    like an ASSIGN: a read built after it, through any view of the buffer, runs the kernel
    first; the kernel marks it done when it runs (`CustomKernel.afters`)."""
    assert target.buffer is not None, f"after_write into an unrealized {target}"
    n = Node(Op.AFTER, ((target, View.contiguous(target.shape)), (kernel, View.contiguous(kernel.shape))),
             target.dtype, target.shape)
    from .graph import HOST_RANGE
    m = target
    while m.op in (Op.ASSIGN, Op.AFTER) and m.srcs:
        m = m.srcs[0][0]
    HOST_RANGE.pop(m, None)              # its remembered host values are no longer its values
    HOST_RANGE.pop(target, None)
    with _writes_lock:
        _pending_writes.setdefault(target.buffer, []).append(n)
    kernel.arg.afters = tuple(getattr(kernel.arg, "afters", ())) + (weakref.ref(n),)
    return n


def _base_buffer(n: Node):
    """The Buffer an ASSIGN chain ends up writing (the realized node at its root)."""
    while n.buffer is None and n.op in WRITE_CHAIN:
        n = n.srcs[0][0]
    assert n.buffer is not None, f"in-place write into an unrealized {n}"
    return n.buffer


# Buffer -> ASSIGN nodes not yet run that write it (in creation order). Held strongly: a write
# must happen even when the Tensor that issued it is gone (another view may read the memory).
_pending_writes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_writes_lock = threading.Lock()


def writes_before(buf, seq: float, reader: Optional[Node] = None) -> None:
    """Run every pending in-place write into `buf` that was issued before creation order `seq`
    (what a read built at `seq`, or a readback now with seq=inf, must see) — except a write
    that `reader` itself does (a rewrite folded it into that kernel)."""
    lst = _pending_writes.get(buf)
    if not lst:
        return
    for w in list(lst):
        if w.buffer is None and w.seq < seq and not (reader is not None and _depends_on(w, reader)):
            realize(w)


def _emit_assign(node: Node) -> None:
    target, _ = node.srcs[0]
    value, value_view = node.srcs[1]
    is_scatter = node.op is Op.SCATTER
    view = node.arg.view if is_scatter else node.arg
    shape = value_view.shape if is_scatter else view.shape
    realize(target)                      # earlier writes of the chain
    buf = target.buffer
    writes_before(buf, node.seq)         # writes through other views issued before this one
    _unpend(node, buf)                   # from here on this write is being planned
    # lazy reads of the old contents built before this write must see them: run them first
    # (the value itself, when it reads the target, lands in its own buffer this way)
    for r in list(target.readers or ()):
        if r.buffer is None and r is not node and r.seq < node.seq and not _depends_on(r, node):
            realize(r)
    if prod(shape) != 0:
        root = Node(Op.CAST, ((value, value_view),), target.dtype, shape)
        root.seq = node.seq              # it reads what the write's value read
        if _reads_buffer(root, buf):     # t[1:] = t[:-1]: copy the value out first
            tmp = Node(Op.CAST, ((value, value_view),), value.dtype, shape)
            tmp.seq = node.seq
            realize(tmp)
            root = Node(Op.CAST, ((tmp, View.contiguous(shape)),), target.dtype, shape)
            root.seq = node.seq
        sc = None
        if is_scatter:
            # indices are read from their own buffers (a lazy index is computed first, an index
            # that reads the written buffer is copied out first)
            indices = []
            for index, index_view in node.srcs[2:]:
                if index.op is not Op.CONST and (index.buffer is None or _reads_buffer(index, buf)):
                    ic = Node(Op.CAST, ((index, index_view),), index.dtype, shape)
                    ic.seq = node.seq
                    realize(ic)
                    index, index_view = ic, View.contiguous(shape)
                elif index.buffer is not None and index.buffer in _pending_writes:
                    writes_before(index.buffer, node.seq)
                indices.append((index, index_view))
            sc = (indices, node.arg.dims)
        core, root = _plan(root, extra_bindings=len(node.srcs) - 2)
        assert core is None
        src, bindings, n_wg, params = elementwise_kernel(root, buf, view, scatter=sc)
        _dispatch("E_scatter" if is_scatter else "E_assign", src, bindings, n_wg, params)
    _done_writing(node, buf)


def _unpend(node: Node, buf) -> None:
    with _writes_lock:
        lst = _pending_writes.get(buf)
        if lst is not None and node in lst:
            lst.remove(node)
            if not lst:
                del _pending_writes[buf]


def _done_writing(node: Node, buf) -> None:
    """`node` (an ASSIGN, or an AFTER standing for a write another kernel did) holds buf now."""
    _unpend(node, buf)
    node.set_buffer(buf)


def pending_writes_into(buf) -> list:
    """The in-place writes not run yet into `buf`, in the order they were issued (a rule that
    folds a write into the kernel reading it looks here: the write's node is not in the graph
    when the reader reads the buffer through another tensor, as put_along_axis into a view)."""
    with _writes_lock:
        return [w for w in _pending_writes.get(buf, ()) if w.buffer is None]


def pending_writes() -> list:
    """Every in-place write not run yet (capture runs them inside or before a trace)."""
    with _writes_lock:
        return [w for lst in _pending_writes.values() for w in lst if w.buffer is None]


def _reads_buffer(n: Node, buf) -> bool:
    seen = set()
    stack = [n]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.buffer is buf:
            return True
        if x.buffer is None:
            stack.extend(m for m, _ in x.srcs)
    return False
