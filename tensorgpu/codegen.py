"""Fused kernels -> WGSL source. Index arithmetic comes from Views and is baked in as constants,
so one source (and one compiled pipeline) exists per kernel *structure*; new data reuses it.

A KernelBuilder renders an expression tree of graph nodes: realized nodes become loads from
bindings, unrealized elementwise nodes are inlined (re-indexed through their Views), and at
most one "core" value (a reduction's accumulator or a hand-written kernel's result) appears as
the variable `acc`. The same renderer produces elementwise kernels, reduction kernels (with
prologue and epilogue) and the Epilogue objects hand-written kernels call on store.
"""
from __future__ import annotations

import math
import struct
from math import prod
from typing import Optional

import numpy as np

from . import dtypes as dt
from .graph import Node
from .ops import BINARY, F32_OVERRIDES, REDUCE, U32_OVERRIDES, UNARY, WGSL_HELPERS, Op, compute_type
from .runtime import get_device
from .symbolic import is_symbolic, static
from .view import View

WG = 256  # threads per workgroup for generated kernels


def f32_literal(v: float) -> str:
    v = float(np.float32(v))
    if math.isnan(v):
        return "bitcast<f32>(0x7fc00000u)"
    if math.isinf(v):
        return "bitcast<f32>(0x7f800000u)" if v > 0 else "bitcast<f32>(0xff800000u)"
    if v != 0 and abs(v) < 1.1754943508222875e-38:  # subnormal: WGSL may flush; keep exact bits
        return f"bitcast<f32>({struct.unpack('<I', struct.pack('<f', v))[0]}u)"
    return f"f32({repr(v)})" if "e" in repr(v) or "." in repr(v) else f"{v}.0"


def literal(value, d: dt.DType) -> str:
    ct = compute_type(d)
    if ct == "f32":
        return f32_literal(value)
    if ct == "bool":
        return "true" if value else "false"
    if ct == "i32":
        v = int(value)
        return f"i32({v})" if v >= 0 else f"(-i32({-v}))" if v != -2**31 else "(-2147483647 - 1)"
    return f"{int(value) & 0xffffffff}u"


def convert(expr: str, src: str, dst: str) -> str:
    """Convert a value between WGSL compute types with NumPy's semantics."""
    if src == dst:
        return expr
    if dst == "bool":
        zero = {"f32": "0.0", "i32": "0", "u32": "0u"}[src]
        return f"(!({expr} == {zero}))"  # not `!=`: drivers compare ordered, so NaN != 0 would be false
    if src == "bool":
        one, zero = {"f32": ("1.0", "0.0"), "i32": ("1", "0"), "u32": ("1u", "0u")}[dst]
        return f"select({zero}, {one}, {expr})"
    return f"{dst}({expr})"


class KernelBuilder:
    """Accumulates bindings, helper functions and statements for one WGSL kernel."""

    def __init__(self, first_binding: int = 0):
        self.first_binding = first_binding
        self.bindings: list = []      # (Buffer, access, name, storage_type)
        self._names: dict = {}
        self.helpers: set = set()
        self.uses_f16 = False
        self.lines: list = []
        self.memo: dict = {}
        self.tmp = 0
        self.core: Optional[Node] = None
        self.core_var = "acc"
        self.row_vals: dict = {}      # id(row reduction) -> the variable holding its row's value
        dev = get_device()
        self.native_f16 = dev.has_f16
        # runtime values (a uniform, see `param`): view offsets and scalar constants, so new
        # values reuse the compiled kernel. Off for epilogues inside hand-written kernels.
        self.params: list = []
        self.use_params = True

    def param(self, value, ct: str) -> str:
        """WGSL reading `value` (int, float or SymInt) from this kernel's parameter uniform, as
        compute type `ct`; the value itself is passed at dispatch (and re-evaluated per replay
        when it is a SymInt)."""
        k = len(self.params)
        self.params.append((value, ct))
        w = f"tgp[{k // 4}][{k % 4}]"
        return {"u32": w, "i32": f"bitcast<i32>({w})", "f32": f"bitcast<f32>({w})"}[ct]

    # -- bindings ------------------------------------------------------------------------

    def storage_type(self, d: dt.DType) -> str:
        if d is dt.float16 and self.native_f16:
            self.uses_f16 = True
            return "f16"
        return {dt.float32: "f32", dt.int32: "i32"}.get(d, "u32")

    def bind(self, buf, d: dt.DType, access: str = "read") -> str:
        key = (id(buf), d.name, access)
        name = self._names.get(key)
        if name is None:
            name = f"b{len(self.bindings) + self.first_binding}"
            st = self.storage_type(d)
            self.bindings.append((buf, access, name, st))
            self._names[key] = name
        return name

    def decls(self) -> str:
        out = []
        for i, (buf, access, name, st) in enumerate(self.bindings):
            mode = "read" if access == "read" else "read_write"
            ty = f"array<{st}>" if access != "atomic" else "array<atomic<u32>>"
            out.append(f"@group(0) @binding({i + self.first_binding}) var<storage, {mode}> {name}: {ty};")
        if self.params:
            out.append(f"@group(0) @binding({len(self.bindings) + self.first_binding}) var<uniform> tgp: "
                       f"array<vec4<u32>, {(len(self.params) + 3) // 4}>;")
        return "\n".join(out)

    def header(self) -> str:
        return "enable f16;\n" if self.uses_f16 else ""

    def helper_text(self) -> str:
        need, todo = set(), list(self.helpers)
        while todo:  # helpers may call other helpers
            h = todo.pop()
            if h not in need:
                need.add(h)
                todo.extend(o for o in WGSL_HELPERS if o != h and o + "(" in WGSL_HELPERS[h])
        return "\n".join(WGSL_HELPERS[h] for h in sorted(need))

    def new(self, expr: str, ty: str) -> str:
        self.tmp += 1
        name = f"v{self.tmp}"
        self.lines.append(f"let {name}: {ty} = {expr};")
        return name

    # -- loads ---------------------------------------------------------------------------

    def load(self, buf, d: dt.DType, idx: str) -> str:
        name = self.bind(buf, d)
        if d is dt.float16:
            if self.native_f16:
                return f"f32({name}[{idx}])"
            return f"unpack2x16float({name}[u32({idx}) >> 1u])[u32({idx}) & 1u]"
        if d is dt.bool_:
            return f"({name}[{idx}] != 0u)"
        return f"{name}[{idx}]"

    def linear(self, view: View, coords: list) -> str:
        """The linear element `view` maps `coords` to (an i32 expression); a nonzero or symbolic
        offset is a runtime parameter, so every slice start shares one kernel."""
        off = view.offset
        if self.use_params and (is_symbolic(off) or off != 0):
            terms = [self.param(off, "i32")]
        else:
            terms = [str(static(off))] if off else []
        for c, s, st in zip(coords, view.shape, view.strides):
            if s == 1 or st == 0:
                continue
            terms.append(c if st == 1 else f"{c} * {st}")
        return " + ".join(terms) if terms else "0"

    @staticmethod
    def unravel(lin: str, shape: tuple) -> list:
        """Row-major coordinates of linear index `lin` (an i32 expression) in `shape`."""
        coords = []
        acc = 1
        nd = len(shape)
        for k in range(nd - 1, -1, -1):
            s = shape[k]
            if s == 1:
                coords.append("0")
            else:
                e = lin if acc == 1 else f"({lin} / {acc})"
                outer = all(x == 1 for x in shape[:k])
                coords.append(e if outer else f"({e} % {s})")
            acc *= s
        return list(reversed(coords))

    # -- expression rendering ------------------------------------------------------------

    def render(self, node: Node, view: View, coords: list) -> str:
        """WGSL value (compute type of node.dtype) of `node` read through `view` at `coords`."""
        key = (id(node), view, tuple(coords))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        ct = compute_type(node.dtype)
        if node is self.core:
            val = self.core_var
        elif id(node) in self.row_vals:
            val = self.row_vals[id(node)]
        elif node.op is Op.CONST:
            if self.use_params and ct in ("f32", "i32", "u32"):
                val = self.param(node.arg, ct)
            else:
                val = literal(static(node.arg) if is_symbolic(node.arg) else node.arg, node.dtype)
        elif node.buffer is not None:
            lin = self.linear(view, coords)
            idx = f"u32({lin})" if lin != "0" else "0u"
            val = self.new(self.load(node.buffer, node.dtype, idx), ct)
        elif node.is_elementwise:
            if view.is_identity(node.shape):
                ncoords = list(coords)
            else:
                lin = self.new(self.linear(view, coords), "i32")
                ncoords = self.unravel(lin, node.shape)
            val = self.render_elementwise(node, ncoords)
        else:
            raise AssertionError(f"cannot inline {node}: the scheduler must realize it first")
        self.memo[key] = val
        return val

    def render_elementwise(self, node: Node, coords: list) -> str:
        op = node.op
        ct = compute_type(node.dtype)
        if op is Op.CAT:
            return self.render_cat(node, coords)
        if op is Op.GATHER:
            return self.render_gather(node, coords)
        srcs = [self.render(n, v, coords) for n, v in node.srcs]
        if op is Op.CAST:
            src_dt = node.srcs[0][0].dtype
            val = convert(srcs[0], compute_type(src_dt), ct)
            if node.dtype is dt.float16 and src_dt is not dt.float16:
                # f16 values live in f32 registers: round here, or a cast inside a chain is a no-op
                val = f"unpack2x16float(pack2x16float(vec2<f32>({val}, 0.0))).x"
            return self.new(val, ct)
        if op is Op.WHERE:
            return self.new(f"select({srcs[2]}, {srcs[1]}, {srcs[0]})", ct)
        if op in UNARY:
            tmpl = UNARY[op].wgsl
            self._note_helpers(tmpl)
            sct = compute_type(node.srcs[0][0].dtype)
            zero = {"f32": "0.0", "i32": "0", "u32": "0u", "bool": "false"}[sct]
            tmpl = {"f32": F32_OVERRIDES, "u32": U32_OVERRIDES}.get(sct, {}).get(op, tmpl)
            self._note_helpers(tmpl)
            return self.new(tmpl.format(*srcs, zero=zero), ct)
        if op in BINARY:
            tmpl = BINARY[op].wgsl
            sct = compute_type(node.srcs[0][0].dtype)
            if op is Op.MOD:
                fn = {"f32": "tg_fmod", "i32": "tg_imod", "u32": "tg_umod"}[sct]
                self.helpers.add({"tg_fmod": "tg_fmod", "tg_imod": "tg_imod", "tg_umod": "tg_idiv_safe"}[fn])
                return self.new(f"{fn}({srcs[0]}, {srcs[1]})", ct)
            if op is Op.FLOORDIV:
                fn = {"f32": "tg_ffloordiv", "i32": "tg_ifloordiv", "u32": "tg_ufloordiv"}[sct]
                self.helpers.add(fn)
                return self.new(f"{fn}({srcs[0]}, {srcs[1]})", ct)
            if op is Op.POW and sct in ("i32", "u32"):
                fn = "tg_ipow" if sct == "i32" else "tg_upow"
                self.helpers.add(fn)
                return self.new(f"{fn}({srcs[0]}, {srcs[1]})", ct)
            if op is Op.DIV and sct == "i32":
                raise AssertionError("integer true division must be cast to float first")
            divisor = node.srcs[1][0]
            if op is Op.DIV and divisor.op is Op.CONST and divisor.arg == 0:
                # drivers fold `x / 0.0` (lavapipe stores nothing at all); x * (1/c) is the same IEEE value here
                with np.errstate(divide="ignore"):
                    recip = np.float32(1.0) / np.float32(divisor.arg)
                return self.new(f"({srcs[0]} * {f32_literal(recip)})", ct)
            # likewise `0.0 / x` and `x * 0.0` are folded to 0; NumPy gives NaN for 0/0, 0/NaN, 0 * inf
            zero_side = [i for i, (m, _) in enumerate(node.srcs) if m.op is Op.CONST and sct == "f32" and m.arg == 0]
            inf_div = op is Op.DIV and sct == "f32" and divisor.op is Op.CONST and math.isinf(divisor.arg)
            if (op is Op.DIV and zero_side == [0]) or (op is Op.MUL and len(zero_side) == 1) or inf_div:
                x = srcs[0] if inf_div else srcs[1 - zero_side[0]]
                bad = f"(tg_isnan({x}) || {x} == 0.0)" if op is Op.DIV and not inf_div else f"tg_nonfinite({x})"
                self.helpers |= {"tg_isnan", "tg_nonfinite"}
                return self.new(f"select(0.0, bitcast<f32>(0x7fc00000u), {bad})", ct)
            if sct == "f32" and op in F32_OVERRIDES:
                tmpl = F32_OVERRIDES[op]
            self._note_helpers(tmpl)
            return self.new(tmpl.format(*srcs), ct)
        raise AssertionError(f"no WGSL for {op}")

    def render_cat(self, node: Node, coords: list) -> str:
        axis = node.arg
        ct = compute_type(node.dtype)
        self.tmp += 1
        out = f"v{self.tmp}"
        self.lines.append(f"var {out}: {ct};")
        start = 0
        c = coords[axis]
        first = True
        saved_lines, saved_memo = self.lines, self.memo
        for n, v in node.srcs:
            size = v.shape[axis]
            sub = list(coords)
            sub[axis] = f"({c} - {start})"
            self.lines, self.memo = [], dict(saved_memo)
            val = self.render(n, v, sub)
            body = "\n  ".join(self.lines + [f"{out} = {val};"])
            cond = f"({c} < {start + size})"
            saved_lines.append(("if " if first else "else if ") + f"{cond} {{\n  {body}\n}}")
            first = False
            start += size
        self.lines, self.memo = saved_lines, saved_memo
        return out

    def index_value(self, raw: str, ct: str, n: int) -> tuple:
        """An index read from a tensor (compute type `ct`) into an axis of length n: the i32
        position (negative values count from the end, NumPy's rule) and whether it is inside
        the axis. Out-of-range positions are never dereferenced: gathers read 0, scatters skip."""
        n = static(n)
        if ct == "u32":
            i = self.new(f"select(-1, i32({raw}), {raw} < {n}u)", "i32")
        else:
            i = self.new(f"select({raw}, {raw} + {n}, {raw} < 0)", "i32")
        ok = self.new(f"({i} >= 0 && {i} < {n})", "bool")
        return i, ok

    def mapped_coords(self, sv: View, dims: tuple, coords: list, index_srcs) -> tuple:
        """Coordinates into a view `sv` that a gather reads or a scatter writes (graph.ScatterArg:
        dims[d] >= 0 takes coordinate dims[d] of `coords`, dims[d] = -1 - k the value of index
        source k at `coords`), and a bool expression saying whether every index was in range
        (None when no index is involved). A dimension of size 1 is read at 0 (broadcast)."""
        out, oks = [], []
        for d, m in enumerate(dims):
            if m >= 0:
                out.append("0" if sv.shape[d] == 1 else coords[m])
            else:
                inode, iview = index_srcs[-1 - m]
                i, ok = self.index_value(self.render(inode, iview, coords), compute_type(inode.dtype), sv.shape[d])
                out.append(i)
                oks.append(ok)
        ok = self.new(" && ".join(oks), "bool") if len(oks) > 1 else (oks[0] if oks else None)
        return out, ok

    def render_gather(self, node: Node, coords: list) -> str:
        """srcs[0] read at coordinates some of which come from the index sources srcs[1:]
        (`take_along_axis`, `t[idx]`); out-of-range indices read 0 (never dereferenced)."""
        src, sv = node.srcs[0]
        sub, ok = self.mapped_coords(sv, node.arg, coords, node.srcs[1:])
        if ok is None:
            return self.render(src, sv, sub)
        sub = [c if m >= 0 else f"select(0, {c}, {ok})" for c, m in zip(sub, node.arg)]
        val = self.render(src, sv, sub)
        ct = compute_type(node.dtype)
        zero = {"f32": "0.0", "i32": "0", "u32": "0u", "bool": "false"}[ct]
        return self.new(f"select({zero}, {val}, {ok})", ct)

    def _note_helpers(self, tmpl: str) -> None:
        for h in WGSL_HELPERS:
            if h + "(" in tmpl:
                self.helpers.add(h)



# ----------------------------------------------------------------------------- stores


def store_stmt(b: KernelBuilder, out_buf, d: dt.DType, idx: str, val: str, access: str = "rw") -> str:
    name = b.bind(out_buf, d, access)
    ct = compute_type(d)
    if d is dt.float16:
        if b.native_f16:
            return f"{name}[{idx}] = f16({val});"
        raise AssertionError("packed f16 stores are handled by the caller")
    if d is dt.bool_:
        return f"{name}[{idx}] = select(0u, 1u, {val});"
    return f"{name}[{idx}] = {val};"


GRID_PREAMBLE = ("@compute @workgroup_size({wg})\n"
                 "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,"
                 " @builtin(local_invocation_index) lid: u32) {{\n")


def elementwise_kernel(root: Node, out_buf, out_view: View, core: Optional[Node] = None, scatter=None):
    """WGSL + bindings computing `root` for every coordinate of out_view.shape and storing it
    through out_view into out_buf (contiguous for fresh results, strided for setitem).

    `scatter=(index sources, dims)`: a scatter (`put_along_axis`, `t[idx] = v`): `root` and the
    indices are computed over root.shape, and each value is stored through out_view (a
    graph.ScatterArg's view) at the coordinates `dims` maps to (KernelBuilder.mapped_coords);
    values with an index out of range are not stored."""
    b = KernelBuilder()
    shape = out_view.shape if scatter is None else root.shape
    n = prod(shape)
    d = root.dtype
    packed_f16 = d is dt.float16 and not b.native_f16
    # two halves per thread; an odd count may write the half after the last only if that is padding
    pairs = (packed_f16 and out_view.is_contiguous and out_view.offset % 2 == 0 and scatter is None
             and (n % 2 == 0 or out_view.offset + n >= out_buf.nbytes // 2))
    body: list = []

    def value_at(lin_expr: str) -> str:
        b.memo = {}
        lin = b.new(lin_expr, "i32")
        coords = b.unravel(lin, shape)
        return b.render(root, View.contiguous(shape), coords)

    if pairs:
        n_threads = (n + 1) // 2
        b.lines = []
        v0 = value_at("i32(e0)")
        first = b.lines
        b.lines = []
        v1 = value_at("i32(min(e0 + 1u, " + str(max(n - 1, 0)) + "u))")
        second = b.lines
        name = b.bind(out_buf, d, "rw")
        word = f"u32({b.param(static(out_view.offset) // 2, 'u32')}) + (e0 >> 1u)"
        body = first + second + [
            f"let hi = select(0.0, {v1}, e0 + 1u < {n}u);",
            f"{name}[{word}] = pack2x16float(vec2<f32>({v0}, hi));"]
        prologue = "let e0 = gidx * 2u;"
    else:
        n_threads = n
        b.lines = []
        ok = None
        if scatter is not None:
            b.memo = {}
            coords = b.unravel(b.new("i32(gidx)", "i32"), shape)
            val = b.render(root, View.contiguous(shape), coords)
            index_srcs, dims = scatter
            tcoords, ok = b.mapped_coords(out_view, dims, coords, index_srcs)
            idx = f"u32({b.linear(out_view, tcoords)})"
        else:
            val = value_at("i32(gidx)")
            if out_view.is_identity(shape):
                idx = "gidx"
            else:
                lin = b.new("i32(gidx)", "i32")
                idx = f"u32({b.linear(out_view, b.unravel(lin, shape))})"
        head = len(b.lines)
        if packed_f16:
            name = b.bind(out_buf, d, "atomic")
            b.lines += [
                f"let oi = {idx};", "let sh = (oi & 1u) * 16u;",
                f"let hv = pack2x16float(vec2<f32>({val}, 0.0)) & 0xffffu;",
                "loop {", f"  let old = atomicLoad(&{name}[oi >> 1u]);",
                "  let nv = (old & ~(0xffffu << sh)) | (hv << sh);",
                f"  if (atomicCompareExchangeWeak(&{name}[oi >> 1u], old, nv).exchanged) {{ break; }}", "}"]
        else:
            b.lines.append(store_stmt(b, out_buf, d, idx, val))
        if ok is not None:    # a scatter stores only values whose index is inside the axis
            b.lines[head:] = [f"if ({ok}) {{"] + ["  " + l for l in b.lines[head:]] + ["}"]
        body = b.lines
        prologue = ""
    n_wg = (n_threads + WG - 1) // WG
    src = (b.header() + b.decls() + "\n" + b.helper_text() + "\n" + GRID_PREAMBLE.format(wg=WG)
           + f"  let gidx = ({'wid.x + wid.y * nwg.x'}) * {WG}u + lid;\n"
           + f"  if (gidx >= {n_threads}u) {{ return; }}\n"
           + ("  " + prologue + "\n" if prologue else "")
           + "".join("  " + l + "\n" for l in body) + "}\n")
    return src, b.bindings, n_wg, b.params


# ----------------------------------------------------------------------------- reductions


def reduce_kernel(red: Node, root: Node, out_buf, subgroups: bool, split=None, index_src=None, core_node=None):
    """One kernel: the reduction `red` (prologue = its inlined source expression) and the
    elementwise `root` of the reduced shape on top of it (epilogue), stored contiguously.

    Long reductions with few outputs run in two kernels (see schedule.py): `split=(C, CH,
    P_buf, I_buf)` makes this the first stage — workgroup (o, c) reduces elements
    [c*CH, (c+1)*CH) of row o into P[o*C + c] (and the arg index into I); the second stage is
    an ordinary call over P with `index_src` (the I buffer, argmax/argmin) and `core_node`
    (the original reduction, which `root` refers to)."""
    op = red.op
    axes = red.arg
    src_node, src_view = red.srcs[0]
    in_shape = src_view.shape
    out_shape = red.shape                      # keepdims shape
    n_out = prod(out_shape)
    red_dims = [in_shape[a] for a in axes]
    rlen = prod(red_dims)
    sct = compute_type(src_node.dtype)
    act = compute_type(red.dtype) if op not in (Op.ARGMAX, Op.ARGMIN) else sct
    if act == "bool":
        act = "i32"
    is_arg = op in (Op.ARGMAX, Op.ARGMIN)
    # strategy: a workgroup per output row when the reduced axis is contiguous (coalesced)
    inner_stride = src_view.strides[axes[-1]] if axes else 1
    per_thread = ((inner_stride != 1 and n_out >= 256) or rlen <= 16) and split is None
    b = KernelBuilder()

    def src_coords(out_c: list, r_lin: str) -> list:
        rc = b.unravel(r_lin, tuple(red_dims))
        c = list(out_c)
        for a, e in zip(axes, rc):
            c[a] = e
        return c

    identity = None if is_arg else REDUCE[op][1][act]
    combine = None if is_arg else REDUCE[op][2]
    nan_aware = act == "f32" and op in (Op.RMAX, Op.RMIN)
    if nan_aware:  # NumPy's max/min propagate NaN; WGSL's max/min need not
        combine = "tg_fmax({0}, {1})" if op is Op.RMAX else "tg_fmin({0}, {1})"
        b.helpers |= {"tg_isnan", "tg_fmax" if op is Op.RMAX else "tg_fmin"}
    if is_arg and act == "f32":
        b.helpers.add("tg_isnan")
    cmp = ">" if op is Op.ARGMAX else "<"
    lines_pro: list = []
    b.lines = lines_pro
    olin = b.new("i32(o)", "i32")
    out_c = b.unravel(olin, out_shape)
    # loop body
    b.lines = []
    b.memo = {}
    rl = b.new("i32(r)", "i32")
    v = b.render(src_node, src_view, src_coords(out_c, rl))
    v = convert(v, sct, act)
    ridx = "i32(r)"
    if index_src is not None:
        ridx = b.render(index_src[0], index_src[1], src_coords(out_c, rl))
    if is_arg:
        # NaN: NumPy's argmax/argmin return the first NaN
        if act == "f32":
            upd = [f"let cv: f32 = {v};",
                   f"if (!found_nan && (tg_isnan(cv) || cv {cmp} best || bi < 0)) {{ best = cv; bi = {ridx}; found_nan = tg_isnan(cv); }}"]
        else:
            upd = [f"let cv: {act} = {v};", f"if (cv {cmp} best || bi < 0) {{ best = cv; bi = {ridx}; }}"]
        loop_body = b.lines + upd
    else:
        loop_body = b.lines + [f"acc_r = {combine.format('acc_r', v)};"]
    # epilogue
    b.lines = []
    b.memo = {}
    b.core = red if core_node is None else core_node
    b.core_var = "accv"
    if root.shape != out_shape:  # the consumer reads the reduction through a reshape (keepdims=False)
        root_c = b.unravel(b.new("i32(o)", "i32"), root.shape)
    else:
        root_c = out_c
    val = b.render(root, View.contiguous(root.shape), root_c) if split is None else "accv"
    if split is not None:
        b.lines = []
        pn = b.bind(split[2], {"f32": dt.float32, "i32": dt.int32, "u32": dt.uint32}[act], "rw")
        epi = [f"{pn}[o * {split[0]}u + c] = {'sv[0]' if is_arg else 'accv'};"]
        if is_arg:
            epi.append(f"{b.bind(split[3], dt.int32, 'rw')}[o * {split[0]}u + c] = accv;")
    else:
        epi = b.lines + [store_stmt(b, out_buf, root.dtype, "o", val)] if root.dtype is not dt.float16 or b.native_f16 else None
    if epi is None:  # packed f16 output of a reduction: write through an atomic CAS
        name = b.bind(out_buf, root.dtype, "atomic")
        epi = b.lines + ["let sh = (o & 1u) * 16u;", f"let hv = pack2x16float(vec2<f32>({val}, 0.0)) & 0xffffu;",
                         "loop {", f"  let old = atomicLoad(&{name}[o >> 1u]);", "  let nv = (old & ~(0xffffu << sh)) | (hv << sh);",
                         f"  if (atomicCompareExchangeWeak(&{name}[o >> 1u], old, nv).exchanged) {{ break; }}", "}"]
    res_t = "i32" if is_arg else act
    ind = lambda ls, k=2: "".join(" " * k + l + "\n" for l in ls)  # noqa: E731
    init = (f"var best: {act} = {REDUCE[Op.RMAX if op is Op.ARGMIN else Op.RMIN][1][act]};\n  var bi: i32 = -1;\n"
            + ("  var found_nan = false;\n" if act == "f32" else "")) if is_arg else f"var acc_r: {act} = {identity};\n"
    head = b.header() + b.decls() + "\n" + b.helper_text() + "\n"
    if per_thread:
        src = (head + GRID_PREAMBLE.format(wg=WG)
               + f"  let o = (wid.x + wid.y * nwg.x) * {WG}u + lid;\n  if (o >= {n_out}u) {{ return; }}\n"
               + ind(lines_pro) + "  " + init
               + f"  for (var r = 0u; r < {rlen}u; r = r + 1u) {{\n" + ind(loop_body, 4) + "  }\n"
               + (f"  let accv: {res_t} = {'bi' if is_arg else 'acc_r'};\n")
               + ind(epi) + "}\n")
        return src, b.bindings, (n_out + WG - 1) // WG, b.params
    # workgroup per output: strided loop, then a tree (or subgroup) reduction
    wg = 256 if rlen >= 256 else 64
    if is_arg:
        shared = f"var<workgroup> sv: array<{act}, {wg}>;\nvar<workgroup> si: array<i32, {wg}>;\n"
        store_sh = "sv[lid] = best; si[lid] = bi;\n"
        nan = "tg_isnan(b)" if act == "f32" else "false"
        nan_a = "tg_isnan(a)" if act == "f32" else "false"
        merge = (f"    if (lid < s) {{\n      let a = sv[lid]; let ai = si[lid]; let b = sv[lid + s]; let bj = si[lid + s];\n"
                 f"      var take = false;\n      if (bj >= 0) {{\n"
                 f"        if (ai < 0) {{ take = true; }}\n"
                 f"        else if ({nan_a}) {{ take = {nan} && bj < ai; }}\n"
                 f"        else if ({nan}) {{ take = true; }}\n"
                 f"        else {{ take = (b {cmp} a) || (b == a && bj < ai); }}\n      }}\n"
                 f"      if (take) {{ sv[lid] = b; si[lid] = bj; }}\n    }}\n")
        final = "let accv: i32 = si[0];"
    else:
        shared = f"var<workgroup> sv: array<{act}, {wg}>;\n"
        if subgroups and act in ("f32", "i32", "u32"):
            sg_fn = {Op.SUM: "subgroupAdd", Op.PROD: "subgroupMul", Op.RMAX: "subgroupMax", Op.RMIN: "subgroupMin"}[op]
            store_sh = (f"let sg = {sg_fn}(acc_r);\n  if (sgid == 0u) {{ sv[lid / sgsize] = sg; }}\n")
            if nan_aware:  # subgroupMax/Min may drop NaN: carry a NaN flag through the subgroup
                store_sh = (f"let sgn = subgroupMax(select(0u, 1u, tg_isnan(acc_r)));\n"
                            f"  let sg = select({sg_fn}(acc_r), bitcast<f32>(0x7fc00000u), sgn != 0u);\n"
                            f"  if (sgid == 0u) {{ sv[lid / sgsize] = sg; }}\n")
            merge = None
        else:
            store_sh = "sv[lid] = acc_r;\n"
            merge = f"    if (lid < s) {{ sv[lid] = {combine.format('sv[lid]', 'sv[lid + s]')}; }}\n"
        final = f"let accv: {act} = sv[0];"
    sg_args = ", @builtin(subgroup_invocation_id) sgid: u32, @builtin(subgroup_size) sgsize: u32" if (not is_arg and subgroups and merge is None) else ""
    pre = GRID_PREAMBLE.format(wg=wg).replace(" @builtin(local_invocation_index) lid: u32)", f" @builtin(local_invocation_index) lid: u32{sg_args})")
    if merge is None:
        tree = (f"  workgroupBarrier();\n  if (lid == 0u) {{\n    var t: {act} = sv[0];\n"
                f"    for (var k = 1u; k < {wg}u / sgsize; k = k + 1u) {{ t = {combine.format('t', 'sv[k]')}; }}\n"
                f"    sv[0] = t;\n  }}\n  workgroupBarrier();\n")
    else:
        tree = (f"  workgroupBarrier();\n  for (var s = {wg // 2}u; s > 0u; s = s >> 1u) {{\n" + merge
                + "    workgroupBarrier();\n  }\n")
    if split is not None:
        C, CH = split[0], split[1]
        head = b.header() + b.decls() + "\n" + b.helper_text() + "\n"
        start = (f"  let wl = wid.x + wid.y * nwg.x;\n  if (wl >= {n_out * C}u) {{ return; }}\n"
                 f"  let o = wl / {C}u;\n  let c = wl % {C}u;\n")
        loop = f"  for (var r = c * {CH}u + lid; r < min({rlen}u, (c + 1u) * {CH}u); r = r + {wg}u) {{\n"
    else:
        start = f"  let o = wid.x + wid.y * nwg.x;\n  if (o >= {n_out}u) {{ return; }}\n"
        loop = f"  for (var r = lid; r < {rlen}u; r = r + {wg}u) {{\n"
    src = (head + shared + pre + start
           + ind(lines_pro) + "  " + init
           + loop + ind(loop_body, 4) + "  }\n"
           + "  " + store_sh + tree
           + f"  if (lid == 0u) {{\n    {final}\n" + ind(epi, 4) + "  }\n}\n")
    return src, b.bindings, n_out * (split[0] if split is not None else 1), b.params


# ----------------------------------------------------------------------------- row kernels


def _workgroup_combine(op: Op, act: str, acc: str, out: str, wg: int, subgroups: bool, helpers: set,
                       reuse: bool) -> list:
    """WGSL lines combining every invocation's `acc` (compute type `act`) of a workgroup of `wg`
    into `let {out}`, visible to all of them; with `reuse` the shared array `sv_{act}` is free
    again after (a barrier once every invocation has read it)."""
    combine = REDUCE[op][2]
    nan_aware = act == "f32" and op in (Op.RMAX, Op.RMIN)
    if nan_aware:   # NumPy's max/min propagate NaN; WGSL's max/min need not
        combine = "tg_fmax({0}, {1})" if op is Op.RMAX else "tg_fmin({0}, {1})"
        helpers |= {"tg_isnan", "tg_fmax" if op is Op.RMAX else "tg_fmin"}
    sv = f"sv_{act}"
    if subgroups:
        fn = {Op.SUM: "subgroupAdd", Op.RMAX: "subgroupMax", Op.RMIN: "subgroupMin"}[op]
        if nan_aware:   # subgroupMax/Min may drop NaN: carry a NaN flag through the subgroup
            part = [f"let sgn_{out} = subgroupMax(select(0u, 1u, tg_isnan({acc})));",
                    f"let sg_{out} = select({fn}({acc}), bitcast<f32>(0x7fc00000u), sgn_{out} != 0u);"]
        else:
            part = [f"let sg_{out} = {fn}({acc});"]
        # one invocation combines the subgroups' partials (every invocation looping over them is
        # several times slower on lavapipe), then all read the total
        return part + [f"if (sgid == 0u) {{ {sv}[lid / sgsize] = sg_{out}; }}", "workgroupBarrier();",
                       "if (lid == 0u) {", f"  var t: {act} = {sv}[0];",
                       f"  for (var k = 1u; k < {wg}u / sgsize; k = k + 1u) {{ t = {combine.format('t', f'{sv}[k]')}; }}",
                       f"  {sv}[0] = t;", "}", "workgroupBarrier();",
                       f"let {out} = {sv}[0];"] + (["workgroupBarrier();"] if reuse else [])
    return [f"{sv}[lid] = {acc};", "workgroupBarrier();",
            f"for (var s = {wg // 2}u; s > 0u; s = s >> 1u) {{",
            f"  if (lid < s) {{ {sv}[lid] = {combine.format(f'{sv}[lid]', f'{sv}[lid + s]')}; }}",
            "  workgroupBarrier();", "}", f"let {out} = {sv}[0];"] + (["workgroupBarrier();"] if reuse else [])


def row_kernel(root: Node, cores: list, k: int, out_buf, subgroups: bool):
    """One workgroup per row: the row reductions `cores` (keepdims shape [rows..., 1, ...], axes
    from k on; each one's prologue its inlined source expression, which may read an earlier
    one's row value), then the elementwise `root` over the row's elements (axes from k on of
    root.shape), reading each reduction as its row's value; stored contiguously. What
    RMSNorm / layer norm / softmax in plain ops become (schedule.RowCores)."""
    b = KernelBuilder()
    O = cores[0].shape
    n_rows = prod(O)
    row_shape = tuple(root.shape[k:])
    RL = prod(row_shape)
    rlens = [prod(c.srcs[0][1].shape[a] for a in c.arg) for c in cores]
    wg = 256 if max(rlens + [RL]) >= 256 else 64
    b.lines = []
    out_c = b.unravel(b.new("i32(o)", "i32"), O)
    body = b.lines
    acts = []
    for j, (red, rlen) in enumerate(zip(cores, rlens)):
        src, sv = red.srcs[0]
        act = compute_type(red.dtype)
        acts.append(act)
        b.lines, b.memo = [], {}
        rc = b.unravel(b.new("i32(r)", "i32"), tuple(sv.shape[a] for a in red.arg))
        c = list(out_c)
        for a, e in zip(red.arg, rc):
            c[a] = e
        val = convert(b.render(src, sv, c), compute_type(src.dtype), act)
        combine = REDUCE[red.op][2]
        if act == "f32" and red.op in (Op.RMAX, Op.RMIN):
            combine = "tg_fmax({0}, {1})" if red.op is Op.RMAX else "tg_fmin({0}, {1})"
        body += [f"var acc{j}: {act} = {REDUCE[red.op][1][act]};",
                 f"for (var r = lid; r < {rlen}u; r = r + {wg}u) {{"]
        body += ["  " + l for l in b.lines] + [f"  acc{j} = {combine.format(f'acc{j}', val)};", "}"]
        reuse = any(compute_type(c.dtype) == act for c in cores[j + 1:])     # a later reduction's shared array
        body += _workgroup_combine(red.op, act, f"acc{j}", f"row{j}", wg, subgroups, b.helpers, reuse)
        b.row_vals[id(red)] = f"row{j}"
    b.lines, b.memo = [], {}
    ec = b.unravel(b.new("i32(e)", "i32"), row_shape)
    val = b.render(root, View.contiguous(root.shape), list(out_c[:k]) + ec)
    st = store_stmt(b, out_buf, root.dtype, f"o * {RL}u + e", val)
    body += [f"for (var e = lid; e < {RL}u; e = e + {wg}u) {{"] + ["  " + l for l in b.lines + [st]] + ["}"]
    shared = "".join(f"var<workgroup> sv_{a}: array<{a}, {wg}>;\n" for a in sorted(set(acts)))
    sg_args = ", @builtin(subgroup_invocation_id) sgid: u32, @builtin(subgroup_size) sgsize: u32" if subgroups else ""
    pre = GRID_PREAMBLE.format(wg=wg).replace(" @builtin(local_invocation_index) lid: u32)",
                                              f" @builtin(local_invocation_index) lid: u32{sg_args})")
    src = (b.header() + b.decls() + "\n" + b.helper_text() + "\n" + shared + pre
           + f"  let o = wid.x + wid.y * nwg.x;\n  if (o >= {n_rows}u) {{ return; }}\n"
           + "".join("  " + l + "\n" for l in body) + "}\n")
    return src, b.bindings, n_rows, b.params


# ----------------------------------------------------------------------------- epilogues


class GraphEpilogue:
    """An Epilogue (see kernels/common.py) rendered from the graph: `root` evaluated with the
    hand-written kernel's node `core` replaced by its computed value."""

    def __init__(self, root: Node, core: Node):
        from .kernels.common import Operand
        self.root, self.core = root, core
        self._wgsl: dict = {}   # first binding -> source (kernels may ask more than once)
        b, _ = self._render(0)
        self.operands = [Operand(buf, _dtype_of(st), (buf.nbytes,), (1,), 0) for buf, _, _, st in b.bindings]

    def _render(self, first_binding: int):
        b = KernelBuilder(first_binding)
        b.native_f16 = False  # the host kernel's module may not enable f16
        b.use_params = False  # constants baked: the host kernel binds no parameter uniform
        b.core = self.core
        b.core_var = "acc"
        b.lines = ["let li = i32(i);"]
        val = b.render(self.root, View.contiguous(self.root.shape), b.unravel("li", self.root.shape))
        return b, val

    def wgsl(self, first_binding: int) -> str:
        src = self._wgsl.get(first_binding)
        if src is None:
            b, val = self._render(first_binding)
            body = "".join("  " + l + "\n" for l in b.lines)
            src = self._wgsl[first_binding] = (b.decls() + "\n" + b.helper_text() + "\n"
                                               + f"fn epilogue(acc: f32, i: u32) -> f32 {{\n{body}  return f32({val});\n}}\n")
        return src


def _dtype_of(storage: str) -> dt.DType:
    return {"f32": dt.float32, "i32": dt.int32, "u32": dt.uint32, "f16": dt.float16}[storage]
