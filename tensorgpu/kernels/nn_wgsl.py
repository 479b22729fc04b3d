"""WGSL building blocks shared by the hand-written nn kernels (softmax, layer_norm, rope,
attention, embedding, sampling): typed loads from an Operand, row addressing, and
workgroup reductions with or without subgroups.

Why generated text rather than one WGSL file per kernel: every shape, stride and dtype is
baked into the source as a constant (the pipeline cache is keyed by source), and the f16
access path differs with the adapter (`array<f16>` with shader-f16, packed `array<u32>`
without). Generating the few lines that differ keeps each kernel template readable.

Assumption shared with the rest of the project: on a 1-D workgroup, subgroup k holds the
invocations with local_invocation_index in [k*sg, (k+1)*sg) (true on NVIDIA, AMD, Intel,
Apple and llvmpipe). The subgroup reductions below rely on it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .. import dtypes
from ..runtime import get_device
from .common import NoEpilogue, Operand

NEG_INF = "bitcast<f32>(0xff800000u)"


def f32_lit(v: float) -> str:
    """An exact WGSL f32 literal for the float32 value nearest `v` (hex float: no decimal
    round trip, so constants match NumPy float32 bit for bit)."""
    x = float(np.float32(v))
    if math.isinf(x):
        return NEG_INF if x < 0 else "bitcast<f32>(0x7f800000u)"
    if x == 0.0:
        return "0.0f"
    return f"({x.hex()}f)"


def next_pow2(n: int) -> int:
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def epilogue_or_default(ep):
    return NoEpilogue() if ep is None else ep


def check_float_operand(name: str, op: Operand, fn: str, allowed=(dtypes.float32, dtypes.float16)) -> None:
    if not isinstance(op, Operand):
        raise TypeError(f"{fn}: {name} must be a kernels.common.Operand, got {type(op).__name__}")
    if op.dtype not in allowed:
        raise TypeError(f"{fn}: {name} has dtype {op.dtype}; supported: {', '.join(d.name for d in allowed)}")
    if len(op.shape) != len(op.strides):
        raise ValueError(f"{fn}: {name} shape {op.shape} and strides {op.strides} differ in length")


def extent(op: Operand) -> int:
    """One past the largest element index the view touches (for bounds checks on the host)."""
    if any(s == 0 for s in op.shape):
        return op.offset
    hi = op.offset + sum((s - 1) * st for s, st in zip(op.shape, op.strides) if st > 0)
    return hi + 1


def check_fits(name: str, op: Operand, fn: str) -> None:
    cap_elems = op.buffer.nbytes / op.dtype.gpu_itemsize if not op.dtype.is_quant else None
    if any(st < 0 for st in op.strides):
        raise ValueError(f"{fn}: {name} has negative strides {op.strides}; make it contiguous first")
    if cap_elems is not None and extent(op) > cap_elems + 1e-9:
        raise ValueError(f"{fn}: {name} view (shape {op.shape}, strides {op.strides}, offset {op.offset}) "
                         f"reaches element {extent(op) - 1} but its buffer holds {int(cap_elems)} {op.dtype.name} elements")


def vec4_ok(op: Operand, inner: int) -> bool:
    """Whether `op` can be read as aligned groups of 4 along its last axis: unit last stride,
    4-aligned offset and outer strides, inner length a multiple of 4."""
    if inner % 4 or op.offset % 4:
        return False
    if op.strides[-1] != 1 and op.shape[-1] != 1:
        return False
    return all(st % 4 == 0 for s, st in zip(op.shape[:-1], op.strides[:-1]) if s != 1)


class Reader:
    """Declaration and load functions for one read-only float operand bound at `binding`.

    Generated functions (element indices are absolute indices into the buffer):
        fn {name}_at(i: u32) -> f32           any i
        fn {name}_at4(i: u32) -> vec4<f32>    i % 4 == 0, only when vec=True
    """

    def __init__(self, name: str, op: Operand, binding: int, vec: bool):
        self.name, self.op, self.binding, self.vec = name, op, binding, vec
        self.f16 = op.dtype is dtypes.float16
        self.native_f16 = self.f16 and get_device().has_f16

    @property
    def needs_f16(self) -> bool:
        return self.native_f16

    def decl(self) -> str:
        n = self.name
        if not self.f16:
            t = "vec4<f32>" if self.vec else "f32"
        elif self.native_f16:
            t = "vec4<f16>" if self.vec else "f16"
        else:
            t = "vec2<u32>" if self.vec else "u32"
        s = f"@group(0) @binding({self.binding}) var<storage, read> {n}: array<{t}>;\n"
        if not self.f16:
            s += (f"fn {n}_at(i: u32) -> f32 {{ return {n}[i >> 2u][i & 3u]; }}\n" if self.vec
                  else f"fn {n}_at(i: u32) -> f32 {{ return {n}[i]; }}\n")
            if self.vec:
                s += f"fn {n}_at4(i: u32) -> vec4<f32> {{ return {n}[i >> 2u]; }}\n"
        elif self.native_f16:
            s += (f"fn {n}_at(i: u32) -> f32 {{ return f32({n}[i >> 2u][i & 3u]); }}\n" if self.vec
                  else f"fn {n}_at(i: u32) -> f32 {{ return f32({n}[i]); }}\n")
            if self.vec:
                s += f"fn {n}_at4(i: u32) -> vec4<f32> {{ return vec4<f32>({n}[i >> 2u]); }}\n"
        else:
            if self.vec:
                s += (f"fn {n}_at(i: u32) -> f32 {{ let w = {n}[i >> 2u]; return unpack2x16float(w[(i >> 1u) & 1u])[i & 1u]; }}\n"
                      f"fn {n}_at4(i: u32) -> vec4<f32> {{ let w = {n}[i >> 2u]; "
                      f"return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }}\n")
            else:
                s += f"fn {n}_at(i: u32) -> f32 {{ return unpack2x16float({n}[i >> 1u])[i & 1u]; }}\n"
        return s


def merged_dims(shape: Sequence[int], strides: Sequence[int]) -> list:
    """(size, stride) pairs with size-1 dims dropped and mergeable neighbours merged."""
    dims = [(int(s), int(st)) for s, st in zip(shape, strides) if s != 1]
    out: list = []
    for s, st in dims:
        if out and out[-1][1] == st * s:
            ps, _ = out[-1]
            out[-1] = (ps * s, st)
        else:
            out.append((s, st))
    return out


def index_fn(fn_name: str, shape: Sequence[int], strides: Sequence[int], offset: int) -> str:
    """WGSL `fn {fn_name}(r: u32) -> u32`: element index of linear (row-major) position r
    over `shape` read through `strides` plus `offset`."""
    dims = merged_dims(shape, strides)
    body = [f"fn {fn_name}(r: u32) -> u32 {{", f"  var q = r;", f"  var b = {int(offset)}u;"]
    for k in range(len(dims) - 1, -1, -1):
        s, st = dims[k]
        if k == 0:
            body.append(f"  b += q * {st}u;")
        else:
            body.append(f"  b += (q % {s}u) * {st}u; q = q / {s}u;")
    body.append("  return b;\n}\n")
    return "\n".join(body)


def enable_f16(*readers_or_flags) -> str:
    need = any((r.needs_f16 if isinstance(r, Reader) else bool(r)) for r in readers_or_flags)
    return "enable f16;\n" if need else ""


# ----------------------------------------------------------------------------- reductions


def seg_reduce(fname: str, op: str, T: int, WG: int, subgroups: bool, identity: str, ty: str = "f32") -> str:
    """WGSL `fn {fname}(v: ty, lid: u32, sg: u32) -> ty` (ty f32 or vecN<f32>; max and + act
    per component) reducing `v` over aligned segments
    of T invocations (T a power of two dividing WG). Every invocation of the workgroup must
    call it (it may contain barriers); every invocation gets its segment's result. `op` is a
    WGSL binary function name ("max") or "+".

    With subgroups: a butterfly of subgroupShuffleXor within min(T, sg) lanes, then (if a
    segment spans several subgroups) one shared-memory exchange of T/sg values. Without: a
    shared-memory tree (log2 T barriers)."""
    comb = (lambda a, b: f"({a} + {b})") if op == "+" else (lambda a, b: f"{op}({a}, {b})")
    buf = f"{fname}_buf"
    if T == 1:
        return f"fn {fname}(v: {ty}, lid: u32, sg: u32) -> {ty} {{ return v; }}\n"
    if subgroups:
        return f"""var<workgroup> {buf}: array<{ty}, {WG}>;
fn {fname}(v0: {ty}, lid: u32, sg: u32) -> {ty} {{
  var v = v0;
  let lim = min({T}u, sg);
  for (var m = 1u; m < lim; m = m << 1u) {{ v = {comb('v', 'subgroupShuffleXor(v, m)')}; }}
  if ({T}u <= sg) {{ return v; }}
  workgroupBarrier();
  if ((lid & (sg - 1u)) == 0u) {{ {buf}[lid / sg] = v; }}
  workgroupBarrier();
  let nper = {T}u / sg;
  let base = (lid / {T}u) * nper;
  var r = {buf}[base];
  for (var k = 1u; k < nper; k = k + 1u) {{ r = {comb('r', f'{buf}[base + k]')}; }}
  return r;
}}
"""
    return f"""var<workgroup> {buf}: array<{ty}, {WG}>;
fn {fname}(v0: {ty}, lid: u32, sg: u32) -> {ty} {{
  workgroupBarrier();
  {buf}[lid] = v0;
  workgroupBarrier();
  for (var s = {T // 2}u; s > 0u; s = s >> 1u) {{
    if ((lid & {T - 1}u) < s) {{ {buf}[lid] = {comb(f'{buf}[lid]', f'{buf}[lid + s]')}; }}
    workgroupBarrier();
  }}
  return {buf}[lid & ~{T - 1}u];
}}
"""


def sg_builtin(subgroups: bool) -> tuple:
    """(extra entry-point parameter, expression for the subgroup size) for kernels that call
    seg_reduce: without subgroups the size is irrelevant, pass 1."""
    if subgroups:
        return ", @builtin(subgroup_size) sg: u32", "sg"
    return "", "1u"


def max_workgroup_size() -> int:
    lim = get_device().limits
    return int(min(lim.get("max-compute-invocations-per-workgroup", 256),
                   lim.get("max-compute-workgroup-size-x", 256), 1024))


def check_out(name: str, buf, nbytes: int, fn: str) -> None:
    if buf.nbytes < nbytes:
        raise ValueError(f"{fn}: output {name} holds {buf.nbytes} bytes, needs {nbytes}")


def distinct(fn: str, **bufs) -> None:
    """Raise if one Buffer is bound twice in a dispatch (WebGPU forbids rw aliasing)."""
    seen: dict = {}
    for k, b in bufs.items():
        if b is None:
            continue
        if id(b) in seen:
            raise ValueError(f"{fn}: {seen[id(b)]} and {k} are the same Buffer; a kernel never binds one "
                             f"buffer twice (copy one of them first)")
        seen[id(b)] = k


# ----------------------------------------------------------------------------- row kernels


class RowPlan:
    """Launch shape of a one-row-per-segment kernel (softmax, layer_norm, logsumexp).

    A row of `cols` elements is read as nv = cols / V items (V = 4 when vec4 loads are legal)
    by T invocations (power of two); WG = max(T, 64) invocations hold R = WG / T rows. Each
    invocation owns K = ceil(nv / T) items, interleaved (item t + k*T) so loads coalesce. When
    K <= kmax the items stay in registers between the reduction and the store (the row is read
    from memory once); otherwise the store pass reads the row again."""

    # Below this many rows the GPU is not filled by one workgroup per row, so each row gets as
    # many invocations as it has items (latency of a decode-sized layer norm, not bandwidth).
    FEW_ROWS = 128

    def __init__(self, rows: int, cols: int, vec: bool, kt: Optional[int] = None, kmax: int = 16):
        if kt is None:
            kt = 1 if rows < self.FEW_ROWS else 4
        self.V = 4 if vec else 1
        self.nv = -(-cols // self.V)
        wgmax = max_workgroup_size()
        self.T = min(next_pow2(-(-self.nv // kt)), wgmax)
        self.WG = min(max(self.T, 64), wgmax)
        self.R = self.WG // self.T
        self.K = -(-self.nv // self.T)
        self.cached = self.K <= kmax
        self.n_wg = -(-rows // self.R)

    def vtype(self) -> str:
        return "vec4<f32>" if self.V == 4 else "f32"

    def hmax(self, v: str) -> str:
        return f"max(max({v}.x, {v}.y), max({v}.z, {v}.w))" if self.V == 4 else v

    def hsum(self, v: str) -> str:
        return f"(({v}.x + {v}.y) + ({v}.z + {v}.w))" if self.V == 4 else v

    def splat(self, s: str) -> str:
        return f"vec4<f32>({s})" if self.V == 4 else s

    def entry(self, sgp: str) -> list:
        """The entry point and the row this invocation works on: `row` (valid when < ROWS),
        `t` (its slot in the row) and `base` (the row's first element, via x_row)."""
        return [f"@compute @workgroup_size({self.WG})",
                f"fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
                f"@builtin(local_invocation_index) lid: u32{sgp}) {{",
                f"  let row = (wid.x + wid.y * nwg.x) * {self.R}u + lid / {self.T}u;",
                f"  let t = lid % {self.T}u;",
                "  let valid = row < ROWS;",
                "  let base = x_row(min(row, ROWS - 1u));"]

    def store(self, dst: str, idx_item: str, first_elem: str, val: str) -> str:
        """WGSL statement storing item value `val` through epilogue() at item `idx_item`,
        whose first element has linear output index `first_elem`."""
        if self.V == 4:
            return (f"{{ let a = {val}; let e0 = {first_elem}; {dst}[{idx_item}] = vec4<f32>(epilogue(a.x, e0), "
                    f"epilogue(a.y, e0 + 1u), epilogue(a.z, e0 + 2u), epilogue(a.w, e0 + 3u)); }}")
        return f"{{ {dst}[{idx_item}] = epilogue({val}, {first_elem}); }}"


def row_operand_check(fn: str, name: str, x: Operand, rows: int, cols: int) -> None:
    check_float_operand(name, x, fn)
    if not x.shape or x.shape[-1] != cols or int(np.prod(x.shape[:-1], dtype=np.int64)) != rows:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected a view of [rows={rows}, cols={cols}] "
                         f"(last axis cols, leading axes multiplying to rows)")
    check_fits(name, x, fn)
