"""Softmax, log-softmax and logsumexp over the last axis.

Why this shape: softmax is memory bound, so the goal is one read and one write of the row.
Each row is owned by a power-of-two segment of invocations (a whole workgroup for long rows,
a few lanes for short ones, several rows per workgroup); every invocation loads its items
into registers, the row max and the sum of exp(x - max) are reduced across the segment with
subgroup shuffles (or a shared-memory tree without subgroups), and the registers are stored
normalised. Rows too long for registers (> 16 items per invocation) keep an online
(max, sum) pair per invocation in the read pass and re-read the row in the store pass.
"""
from __future__ import annotations

from ..runtime import Buffer, dispatch, get_device, grid_for
from .common import Operand, epilogue_bindings
from .nn_wgsl import (NEG_INF, Reader, RowPlan, check_out, distinct, enable_f16, epilogue_or_default,
                      index_fn, row_operand_check, seg_reduce, sg_builtin, vec4_ok)


def _source(x: Operand, rows: int, cols: int, mode: str, ep) -> tuple:
    """WGSL for mode in ("softmax", "log_softmax", "logsumexp") and its launch plan."""
    dev = get_device()
    sub = dev.has_subgroups
    vec = vec4_ok(x, cols)
    plan = RowPlan(rows, cols, vec)
    V, T, WG, K, NV = plan.V, plan.T, plan.WG, plan.K, plan.nv
    rd = Reader("x", x, 0, vec)
    cs = x.strides[-1] if cols > 1 else 1
    ld = (lambda j: f"x_at4(base + ({j}) * 4u)") if V == 4 else (lambda j: f"x_at(base + ({j}) * {cs}u)")
    vt = plan.vtype()
    out_vec = mode != "logsumexp" and V == 4
    sgp, sg = sg_builtin(sub)
    lines = [enable_f16(rd), rd.decl(),
             index_fn("x_row", x.shape[:-1], x.strides[:-1], x.offset),
             f"@group(0) @binding(1) var<storage, read_write> out: array<{'vec4<f32>' if out_vec else 'f32'}>;",
             ep.wgsl(2),
             seg_reduce("red_max", "max", T, WG, sub, NEG_INF),
             seg_reduce("red_sum", "+", T, WG, sub, "0.0"),
             f"const ROWS: u32 = {rows}u;\nconst COLS: u32 = {cols}u;\nconst NV: u32 = {NV}u;"]
    lines += plan.entry(sgp) + [f"  let ninf = {NEG_INF};"]
    body = []
    if plan.cached:
        for k in range(K):
            body.append(f"  var v{k}: {vt} = {plan.splat('ninf')};")
            body.append(f"  if (valid && t + {k * T}u < NV) {{ v{k} = {ld(f't + {k * T}u')}; }}")
        body.append("  var m = ninf;")
        for k in range(K):
            body.append(f"  m = max(m, {plan.hmax(f'v{k}')});")
        body.append(f"  let M = red_max(m, lid, {sg});")
        body.append("  var s = 0.0;")
        for k in range(K):
            if mode == "softmax":
                body.append(f"  v{k} = exp(v{k} - {plan.splat('M')}); s += {plan.hsum(f'v{k}')};")
            else:
                body.append(f"  {{ let e = exp(v{k} - {plan.splat('M')}); s += {plan.hsum('e')}; }}")
        body.append(f"  let S = red_sum(s, lid, {sg});")
        if mode == "logsumexp":
            body.append("  if (valid && t == 0u) { out[row] = epilogue(M + log(S), row); }")
        else:
            body.append("  let inv = 1.0 / S;" if mode == "softmax" else "  let lns = log(S);")
            for k in range(K):
                # (x - max) - log(sum): x - max is exact, so large logits keep their precision
                val = f"v{k} * {plan.splat('inv')}" if mode == "softmax" else f"(v{k} - {plan.splat('M')}) - {plan.splat('lns')}"
                j = f"t + {k * T}u"
                body.append(f"  if (valid && {j} < NV) {plan.store('out', f'row * NV + {j}', f'row * COLS + ({j}) * {V}u', val)}")
    else:
        body += ["  var m = ninf;", "  var s = 0.0;",
                 f"  for (var j = t; j < select(0u, NV, valid); j = j + {T}u) {{",
                 f"    let v = {ld('j')};",
                 f"    let cm = {plan.hmax('v')};",
                 "    if (cm > m) { s = s * exp(m - cm); m = cm; }",
                 f"    if (m != ninf) {{ let e = exp(v - {plan.splat('m')}); s += {plan.hsum('e')}; }}",
                 "  }",
                 f"  let M = red_max(m, lid, {sg});",
                 f"  let S = red_sum(select(s * exp(m - M), 0.0, m == ninf), lid, {sg});"]
        if mode == "logsumexp":
            body.append("  if (valid && t == 0u) { out[row] = epilogue(M + log(S), row); }")
        else:
            body.append("  let inv = 1.0 / S;" if mode == "softmax" else "  let lns = log(S);")
            val = f"exp({ld('j')} - {plan.splat('M')}) * {plan.splat('inv')}" if mode == "softmax" \
                else f"({ld('j')} - {plan.splat('M')}) - {plan.splat('lns')}"
            body += [f"  for (var j = t; j < select(0u, NV, valid); j = j + {T}u) {{",
                     f"    {plan.store('out', 'row * NV + j', f'row * COLS + j * {V}u', val)}",
                     "  }"]
    src = "\n".join(lines + body + ["}\n"])
    return src, plan


def _run(name: str, out: Buffer, x: Operand, rows: int, cols: int, mode: str, epilogue) -> None:
    row_operand_check(name, "x", x, rows, cols)
    if rows <= 0 or cols <= 0:
        if cols <= 0 and rows > 0:
            raise ValueError(f"{name}: cols must be >= 1, got {cols} (rows={rows})")
        return
    n_out = rows if mode == "logsumexp" else rows * cols
    check_out(name, out, 4 * n_out, name)
    ep = epilogue_or_default(epilogue)
    distinct(name, out=out, x=x.buffer, **{f"epilogue{i}": o.buffer for i, o in enumerate(ep.operands)})
    src, plan = _source(x, rows, cols, mode, ep)
    dispatch(f"{mode}[{rows}x{cols}]", src,
             [(x.buffer, "read"), (out, "rw")] + epilogue_bindings(ep), grid_for(plan.n_wg))


def softmax(out: Buffer, x: Operand, rows: int, cols: int, log: bool = False, epilogue=None) -> None:
    """out[r, c] = softmax(x[r, :])[c] (or log-softmax with log=True) as contiguous float32
    [rows, cols]. x: f32 or f16 Operand whose last axis has `cols` elements and whose leading
    axes multiply to `rows` (any strides). epilogue(acc, r*cols + c) is applied at the store."""
    _run("softmax", out, x, rows, cols, "log_softmax" if log else "softmax", epilogue)


def logsumexp(out: Buffer, x: Operand, rows: int, cols: int, epilogue=None) -> None:
    """out[r] = log(sum_c exp(x[r, c])) as float32 [rows] (numerically stable)."""
    _run("logsumexp", out, x, rows, cols, "logsumexp", epilogue)
