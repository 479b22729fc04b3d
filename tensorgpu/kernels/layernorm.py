"""LayerNorm over the last axis: out = (x - mean) / sqrt(var + eps) * weight + bias.

Why two passes over registers rather than Welford or E[x^2] - E[x]^2: the row is loaded into
registers once (see nn_wgsl.RowPlan), the mean is reduced, then the sum of squared
deviations of the same registers — exact to ~1e-7 relative even when |mean| >> std, and the
memory traffic is still one read and one write. Rows too long for registers re-read x for the
variance and the store. A single row (decode) is spread over the whole workgroup.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..runtime import Buffer, dispatch, get_device, grid_for
from .common import Operand, epilogue_bindings
from .nn_wgsl import (Reader, RowPlan, check_fits, check_float_operand, check_out, distinct, enable_f16,
                      epilogue_or_default, f32_lit, index_fn, row_operand_check, seg_reduce, sg_builtin, vec4_ok)


def _param_check(name: str, op: Optional[Operand], cols: int) -> None:
    if op is None:
        return
    check_float_operand(name, op, "layer_norm")
    if int(np.prod(op.shape)) != cols or (op.shape and op.shape[-1] != cols):
        raise ValueError(f"layer_norm: {name} has shape {tuple(op.shape)}, expected [{cols}]")
    check_fits(name, op, "layer_norm")


# The mean m is rounded to f32; the second pass also sums the deviations (c = sum(x - m) / n,
# the rounding error of m) so var = E[(x-m)^2] - c^2 and the output uses (x - m) - c: exact to
# ~1e-7 of the output scale even when |mean| >> std (x - m itself is exact then).
_FINISH = ["  let c = CQ.x * INV_N;",
           "  let rstd = 1.0 / sqrt(max(CQ.y * INV_N - c * c, 0.0) + EPS);"]


def _source(x: Operand, w: Optional[Operand], b: Optional[Operand], rows: int, cols: int, eps: float, ep) -> tuple:
    dev = get_device()
    sub = dev.has_subgroups
    vec = vec4_ok(x, cols) and all(p is None or vec4_ok(p, cols) for p in (w, b))
    plan = RowPlan(rows, cols, vec)
    V, T, WG, K, NV = plan.V, plan.T, plan.WG, plan.K, plan.nv
    readers = [Reader("x", x, 0, vec)]
    nb = 1
    if w is not None:
        readers.append(Reader("w", w, nb, vec)); nb += 1
    if b is not None:
        readers.append(Reader("b", b, nb, vec)); nb += 1
    out_binding = nb
    cs = x.strides[-1] if cols > 1 else 1
    if V == 4:
        ld = lambda j: f"x_at4(base + ({j}) * 4u)"
        ldw = lambda j: f"w_at4({w.offset}u + ({j}) * 4u)"
        ldb = lambda j: f"b_at4({b.offset}u + ({j}) * 4u)"
    else:
        ld = lambda j: f"x_at(base + ({j}) * {cs}u)"
        ldw = lambda j: f"w_at({w.offset}u + ({j}) * {w.strides[-1] if w.shape else 1}u)"
        ldb = lambda j: f"b_at({b.offset}u + ({j}) * {b.strides[-1] if b.shape else 1}u)"
    vt = plan.vtype()
    sp = plan.splat
    sgp, sg = sg_builtin(sub)

    def affine(d: str, j: str) -> str:
        e = f"{d} * {sp('rstd')}"
        if w is not None:
            e = f"({e}) * {ldw(j)}"
        if b is not None:
            e = f"{e} + {ldb(j)}"
        return e

    lines = [enable_f16(*readers)] + [r.decl() for r in readers] + [
        index_fn("x_row", x.shape[:-1], x.strides[:-1], x.offset),
        f"@group(0) @binding({out_binding}) var<storage, read_write> out: array<{vt}>;",
        ep.wgsl(out_binding + 1),
        seg_reduce("red_sum", "+", T, WG, sub, "0.0"),
        seg_reduce("red_sum2", "+", T, WG, sub, "vec2<f32>(0.0)", "vec2<f32>"),
        f"const ROWS: u32 = {rows}u;\nconst COLS: u32 = {cols}u;\nconst NV: u32 = {NV}u;",
        f"const INV_N: f32 = 1.0f / {cols}.0f;\nconst EPS: f32 = {f32_lit(eps)};"] + plan.entry(sgp)
    body = []
    if plan.cached:
        for k in range(K):
            body.append(f"  var v{k}: {vt} = {sp('0.0')};")
            body.append(f"  let ok{k} = valid && t + {k * T}u < NV;")
            body.append(f"  if (ok{k}) {{ v{k} = {ld(f't + {k * T}u')}; }}")
        body.append("  var s = 0.0;")
        body += [f"  s += {plan.hsum(f'v{k}')};" for k in range(K)]
        body.append(f"  let mean = red_sum(s, lid, {sg}) * INV_N;")
        body.append("  var cq = vec2<f32>(0.0);")
        for k in range(K):
            body.append(f"  v{k} = select({sp('0.0')}, v{k} - {sp('mean')}, ok{k}); "
                        f"{{ let d2 = v{k} * v{k}; cq += vec2<f32>({plan.hsum(f'v{k}')}, {plan.hsum('d2')}); }}")
        body += [f"  let CQ = red_sum2(cq, lid, {sg});", *_FINISH]
        cv = sp("c")
        for k in range(K):
            j = f"t + {k * T}u"
            val = affine(f"(v{k} - {cv})", j)
            body.append(f"  if (ok{k}) {plan.store('out', f'row * NV + {j}', f'row * COLS + ({j}) * {V}u', val)}")
    else:
        loop = f"  for (var j = t; j < select(0u, NV, valid); j = j + {T}u) {{"
        body += ["  var s = 0.0;", loop, f"    s += {plan.hsum(ld('j'))};", "  }",
                 f"  let mean = red_sum(s, lid, {sg}) * INV_N;",
                 "  var cq = vec2<f32>(0.0);", loop, f"    let d = {ld('j')} - {sp('mean')};", "    let d2 = d * d;",
                 f"    cq += vec2<f32>({plan.hsum('d')}, {plan.hsum('d2')});", "  }",
                 f"  let CQ = red_sum2(cq, lid, {sg});", *_FINISH,
                 loop, f"    let d = ({ld('j')} - {sp('mean')}) - {sp('c')};",
                 f"    {plan.store('out', 'row * NV + j', f'row * COLS + j * {V}u', affine('d', 'j'))}", "  }"]
    src = "\n".join(lines + body + ["}\n"])
    return src, plan


def layer_norm(out: Buffer, x: Operand, weight: Optional[Operand], bias: Optional[Operand],
               rows: int, cols: int, eps: float = 1e-5, epilogue=None) -> None:
    """out[r, c] = epilogue((x[r,c] - mean_r) / sqrt(var_r + eps) * weight[c] + bias[c], r*cols + c)
    as contiguous float32 [rows, cols]; mean/var (biased, like torch) accumulated in f32.

    x: f32/f16 Operand viewed as [rows, cols] (leading axes multiply to rows, any strides).
    weight, bias: f32/f16 Operands of shape [cols], or None."""
    row_operand_check("layer_norm", "x", x, rows, cols)
    _param_check("weight", weight, cols)
    _param_check("bias", bias, cols)
    if rows <= 0:
        return
    if cols <= 0:
        raise ValueError(f"layer_norm: cols must be >= 1, got {cols} (rows={rows})")
    check_out("out", out, 4 * rows * cols, "layer_norm")
    ep = epilogue_or_default(epilogue)
    distinct("layer_norm", out=out, x=x.buffer, weight=weight.buffer if weight is not None else None,
             bias=bias.buffer if bias is not None else None,
             **{f"epilogue{i}": o.buffer for i, o in enumerate(ep.operands)})
    src, plan = _source(x, weight, bias, rows, cols, eps, ep)
    binds = [(x.buffer, "read")] + [(p.buffer, "read") for p in (weight, bias) if p is not None] + [(out, "rw")]
    dispatch(f"layer_norm[{rows}x{cols}]", src, binds + epilogue_bindings(ep), grid_for(plan.n_wg))
