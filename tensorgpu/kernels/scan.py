"""Inclusive prefix sums (cumsum) along the last axis of a [rows, n] array.

Why this shape: a scan is one read and one write per element, like a copy, but each output
depends on everything before it in its row. Long rows get a workgroup each: every invocation
sums its own contiguous chunk of the row, the workgroup scans those 256 chunk totals in shared
memory (Hillis-Steele, log2(256) steps), and each invocation re-reads its chunk writing running
sums that start from the total of the chunks before it. Short rows (<= SHORT) get one
invocation each, summing sequentially. Sums are f32 for floats (so float32 results may differ
from NumPy's strictly sequential order in the last bits), wrapping i32 / u32 for integers.

A row may hold at most MAX_ROW elements: no invocation loops more than
schedule.MAX_THREAD_TRIPS times (two passes over its chunk). tensor.cumsum scans longer rows
in blocks of this length and adds the block offsets itself.
"""
from __future__ import annotations

from .. import dtypes
from ..runtime import Buffer, dispatch, grid_for
from .common import Operand

WG = 256
SHORT = 64
MAX_ROW = WG * 8192          # 2 passes x 8192 iterations = 16,384 (schedule.MAX_THREAD_TRIPS)
_TYPES = {dtypes.float32: ("f32", "0.0"), dtypes.int32: ("i32", "0"), dtypes.uint32: ("u32", "0u")}


def _check(x: Operand, rows: int, n: int) -> tuple:
    if x.dtype not in _TYPES:
        raise TypeError(f"cumsum kernel: x must be float32, int32 or uint32, got {x.dtype}")
    if rows < 0 or n < 0 or n > MAX_ROW:
        raise ValueError(f"cumsum kernel: rows={rows}, n={n}: a row holds at most {MAX_ROW} elements")
    if rows > 1 and tuple(x.strides[-2:]) != (n, 1) or rows <= 1 and n > 1 and x.strides[-1] != 1:
        raise ValueError(f"cumsum kernel: x must be contiguous [rows, n] = [{rows}, {n}], got strides {x.strides}")
    return _TYPES[x.dtype]


def cumsum_rows(out: Buffer, x: Operand, rows: int, n: int) -> None:
    """out[r, j] = x[r, 0] + ... + x[r, j] for a contiguous [rows, n] x (f32 / i32 / u32, from
    element x.offset); out is contiguous [rows, n] of x's dtype."""
    ty, zero = _check(x, rows, n)
    if rows == 0 or n == 0:
        return
    if out.nbytes < 4 * rows * n:
        raise ValueError(f"cumsum kernel: out has {out.nbytes} bytes, needs {4 * rows * n}")
    head = (f"@group(0) @binding(0) var<storage, read> x: array<{ty}>;\n"
            f"@group(0) @binding(1) var<storage, read_write> out: array<{ty}>;\n")
    if n <= SHORT:
        src = head + (
            f"@compute @workgroup_size({WG})\n"
            "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,"
            " @builtin(local_invocation_index) lid: u32) {\n"
            f"  let row = (wid.x + wid.y * nwg.x) * {WG}u + lid;\n"
            f"  if (row >= {rows}u) {{ return; }}\n"
            f"  var run: {ty} = {zero};\n"
            f"  for (var j = 0u; j < {n}u; j = j + 1u) {{\n"
            f"    run = run + x[{x.offset}u + row * {n}u + j];\n"
            f"    out[row * {n}u + j] = run;\n"
            "  }\n}\n")
        dispatch(f"cumsum_rows[{rows}x{n}]", src, [(x.buffer, "read"), (out, "rw")], grid_for(-(-rows // WG)))
        return
    chunk = -(-n // WG)
    src = head + (
        f"var<workgroup> sh: array<{ty}, {WG}>;\n"
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,"
        " @builtin(local_invocation_index) lid: u32) {\n"
        "  let row = wid.x + wid.y * nwg.x;\n"
        f"  if (row >= {rows}u) {{ return; }}\n"
        f"  let base = {x.offset}u + row * {n}u;\n"
        f"  let s0 = min(lid * {chunk}u, {n}u);\n"
        f"  let e0 = min(s0 + {chunk}u, {n}u);\n"
        f"  var acc: {ty} = {zero};\n"
        "  for (var j = s0; j < e0; j = j + 1u) { acc = acc + x[base + j]; }\n"
        "  sh[lid] = acc;\n"
        "  workgroupBarrier();\n"
        f"  for (var off = 1u; off < {WG}u; off = off << 1u) {{\n"
        f"    var v: {ty} = {zero};\n"
        "    if (lid >= off) { v = sh[lid - off]; }\n"
        "    workgroupBarrier();\n"
        "    sh[lid] = sh[lid] + v;\n"
        "    workgroupBarrier();\n"
        "  }\n"
        f"  var run: {ty} = {zero};\n"
        "  if (lid > 0u) { run = sh[lid - 1u]; }\n"
        "  for (var j = s0; j < e0; j = j + 1u) {\n"
        "    run = run + x[base + j];\n"
        f"    out[row * {n}u + j] = run;\n"
        "  }\n}\n")
    dispatch(f"cumsum_rows[{rows}x{n}]", src, [(x.buffer, "read"), (out, "rw")], grid_for(rows))
