"""Row-wise argsort / top-k: the positions of the k smallest (or largest) elements of each row
of a [rows, n] array, in order. The values then come from a gather (tensor.sort / topk).

Why this shape: a row that fits in workgroup memory is sorted there by one workgroup with a
bitonic network: log2(N) (log2(N) + 1) / 2 compare-exchange steps over N = n rounded up to a
power of two, each step one pass of the workgroup over N / 2 pairs between two barriers, no
data-dependent control flow, no global traffic after the load. Each element is a 32-bit key
whose unsigned order is the value order (floats: sign-flipped bits, -0 as +0, NaN above
+inf as NumPy sorts it; ints: the sign bit flipped; descending: the key inverted) and a
position; equal keys keep their order by position (or by a `ties` array: the original index
of a candidate row that tensor.topk gathered), so the order is the stable sort's, which is
NumPy's for argsort(kind="stable"). Padding sorts after everything.

A row holds at most max_row() elements (8 bytes of workgroup memory each, within the 16 KiB
every WebGPU adapter has); tensor.topk narrows longer rows in chunks of this size first.
"""
from __future__ import annotations

from typing import Optional

from .. import dtypes
from ..runtime import Buffer, dispatch, get_device, grid_for
from .common import Operand

_TYPES = {dtypes.float32: "f32", dtypes.int32: "i32", dtypes.uint32: "u32"}
_KEY = {
    "f32": """fn key_of(v: f32) -> u32 {
  var b = bitcast<u32>(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) { return 0xfffffffeu; }
  if (b == 0x80000000u) { b = 0u; }
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}""",
    "i32": "fn key_of(v: i32) -> u32 { return bitcast<u32>(v) ^ 0x80000000u; }",
    "u32": "fn key_of(v: u32) -> u32 { return v; }",
}


def max_row() -> int:
    """The longest row one workgroup sorts: a power of two, 8 bytes per element of workgroup
    memory, at most 2048 (16 KiB, WebGPU's guaranteed minimum)."""
    lim = min(get_device().max_workgroup_storage, 16384) // 8
    return 1 << (lim.bit_length() - 1)


def argsort_rows(out: Buffer, x: Operand, rows: int, n: int, k: Optional[int] = None, descending: bool = False,
                 ties: Optional[Operand] = None) -> None:
    """out[r, j] (int32, contiguous [rows, k]) = the position in row r of its j-th smallest
    element (largest with descending=True), for a contiguous [rows, n] x of f32 / i32 / u32
    from element x.offset, n <= max_row(). Equal elements keep the order of their positions,
    or of `ties` (a contiguous [rows, n] int32 Operand of distinct non-negative values) when
    given. NaN sorts above +inf (so first when descending)."""
    k = n if k is None else k
    if x.dtype not in _TYPES:
        raise TypeError(f"argsort kernel: x must be float32, int32 or uint32, got {x.dtype}")
    if not 0 <= k <= n or rows < 0:
        raise ValueError(f"argsort kernel: rows={rows}, n={n}, k={k}: need 0 <= k <= n")
    limit = max_row()
    if n > limit:
        raise ValueError(f"argsort kernel: a row of {n} elements is over the {limit} one workgroup sorts")
    if rows > 1 and tuple(x.strides[-2:]) != (n, 1) or n > 1 and x.strides[-1] != 1:
        raise ValueError(f"argsort kernel: x must be contiguous [rows, n] = [{rows}, {n}], got strides {x.strides}")
    if ties is not None and (ties.dtype is not dtypes.int32 or (rows > 1 and tuple(ties.strides[-2:]) != (n, 1))):
        raise ValueError("argsort kernel: ties must be a contiguous int32 [rows, n] operand")
    if rows == 0 or k == 0:
        return
    if out.nbytes < 4 * rows * k:
        raise ValueError(f"argsort kernel: out has {out.nbytes} bytes, needs {4 * rows * k}")
    N = 1 << max(n - 1, 1).bit_length()
    wg = min(256, N // 2)
    ty = _TYPES[x.dtype]
    inv = "~" if descending else ""
    tie = (f"fn tie_of(row: u32, p: u32) -> u32 {{ if (p >= {n}u) {{ return 0xffffffffu; }} "
           f"return bitcast<u32>(ties[{ties.offset}u + row * {n}u + p]); }}") if ties is not None else \
        "fn tie_of(row: u32, p: u32) -> u32 { return p; }"
    src = (f"@group(0) @binding(0) var<storage, read> x: array<{ty}>;\n"
           "@group(0) @binding(1) var<storage, read_write> out: array<i32>;\n"
           + ("@group(0) @binding(2) var<storage, read> ties: array<i32>;\n" if ties is not None else "")
           + f"var<workgroup> sk: array<u32, {N}>;\nvar<workgroup> sp: array<u32, {N}>;\n"
           + _KEY[ty] + "\n" + tie + "\n"
           "fn before(ka: u32, pa: u32, kb: u32, pb: u32, row: u32) -> bool {\n"
           "  if (ka != kb) { return ka < kb; }\n"
           "  return tie_of(row, pa) < tie_of(row, pb);\n}\n"
           f"@compute @workgroup_size({wg})\n"
           "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,"
           " @builtin(local_invocation_index) lid: u32) {\n"
           "  let row = wid.x + wid.y * nwg.x;\n"
           f"  if (row >= {rows}u) {{ return; }}\n"
           f"  for (var p = lid; p < {N}u; p = p + {wg}u) {{\n"
           f"    if (p < {n}u) {{ sk[p] = {inv}key_of(x[{x.offset}u + row * {n}u + p]); }} else {{ sk[p] = 0xffffffffu; }}\n"
           "    sp[p] = p;\n  }\n"
           "  workgroupBarrier();\n"
           f"  for (var kk = 2u; kk <= {N}u; kk = kk << 1u) {{\n"
           "    for (var j = kk >> 1u; j > 0u; j = j >> 1u) {\n"
           f"      for (var t = lid; t < {N // 2}u; t = t + {wg}u) {{\n"
           "        let i = 2u * t - (t & (j - 1u));\n"
           "        let l = i + j;\n"
           "        let ka = sk[i]; let kb = sk[l]; let pa = sp[i]; let pb = sp[l];\n"
           "        let up = (i & kk) == 0u;\n"
           "        if (select(before(ka, pa, kb, pb, row), before(kb, pb, ka, pa, row), up)) {\n"
           "          sk[i] = kb; sk[l] = ka; sp[i] = pb; sp[l] = pa;\n"
           "        }\n"
           "      }\n"
           "      workgroupBarrier();\n"
           "    }\n"
           "  }\n"
           f"  for (var j = lid; j < {k}u; j = j + {wg}u) {{ out[row * {k}u + j] = i32(sp[j]); }}\n"
           "}\n")
    bindings = [(x.buffer, "read"), (out, "rw")] + ([(ties.buffer, "read")] if ties is not None else [])
    dispatch(f"argsort_rows[{rows}x{n}:{k}]", src, bindings, grid_for(rows))
