"""LayerNorm over the last axis: out = (x - mean) / sqrt(var + eps) * weight + bias.

Why two passes over registers rather than Welford or E[x^2] - E[x]^2: the row is loaded into
registers once (see nn_wgsl.RowPlan), the mean is reduced, then the sum of squared
deviations of the same registers — exact to ~1e-7 relative even when |mean| >> std, and the
memory traffic is still one read and one write. Rows too long for registers re-read x for the
variance and the store. A single row (decode) is spread over the whole workgroup.

`stack`: a second weight/bias of the same normalised rows, stored after the first [rows, cols]
block. GPT-NeoX's parallel residual normalises one x twice (attention and MLP inputs); a prompt
or a batched decode step then reads x and reduces its rows once, in one dispatch instead of two
(rewrites.stack_sibling_layer_norms).
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


def _source(x: Operand, w: Optional[Operand], b: Optional[Operand], rows: int, cols: int, eps: float, ep,
            stack: Optional[tuple] = None) -> tuple:
    dev = get_device()
    sub = dev.has_subgroups
    w2, b2 = stack if stack is not None else (None, None)
    vec = vec4_ok(x, cols) and all(p is None or vec4_ok(p, cols) for p in (w, b, w2, b2))
    plan = RowPlan(rows, cols, vec)
    V, T, WG, K, NV = plan.V, plan.T, plan.WG, plan.K, plan.nv
    readers = [Reader("x", x, 0, vec)]
    nb = 1
    if w is not None:
        readers.append(Reader("w", w, nb, vec)); nb += 1
    if b is not None:
        readers.append(Reader("b", b, nb, vec)); nb += 1
    for name, p in (("w2", w2), ("b2", b2)):
        if p is not None:
            readers.append(Reader(name, p, nb, vec)); nb += 1
    out_binding = nb
    cs = x.strides[-1] if cols > 1 else 1
    if V == 4:
        ld = lambda j: f"x_at4(base + ({j}) * 4u)"
        ldp = lambda name, p, j: f"{name}_at4({p.offset}u + ({j}) * 4u)"
    else:
        ld = lambda j: f"x_at(base + ({j}) * {cs}u)"
        ldp = lambda name, p, j: f"{name}_at({p.offset}u + ({j}) * {p.strides[-1] if p.shape else 1}u)"
    vt = plan.vtype()
    sp = plan.splat
    sgp, sg = sg_builtin(sub)

    def affine(d: str, j: str, wn: str = "w", bn: str = "b", wp=w, bp=b) -> str:
        e = f"{d} * {sp('rstd')}"
        if wp is not None:
            e = f"({e}) * {ldp(wn, wp, j)}"
        if bp is not None:
            e = f"{e} + {ldp(bn, bp, j)}"
        return e

    def stores(d: str, j: str, item: str, elem: str) -> str:
        """The store of normalised item d (and, stacked, its second affine one block later)."""
        st = plan.store("out", item, elem, affine(d, j))
        if stack is not None:
            st += " " + plan.store("out", f"{rows * NV}u + {item}", f"{rows * cols}u + {elem}",
                                   affine(d, j, "w2", "b2", w2, b2))
        return st

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
            body.append(f"  if (ok{k}) {{ let d = v{k} - {cv}; "
                        f"{stores('d', j, f'row * NV + {j}', f'row * COLS + ({j}) * {V}u')} }}")
    else:
        loop = f"  for (var j = t; j < select(0u, NV, valid); j = j + {T}u) {{"
        body += ["  var s = 0.0;", loop, f"    s += {plan.hsum(ld('j'))};", "  }",
                 f"  let mean = red_sum(s, lid, {sg}) * INV_N;",
                 "  var cq = vec2<f32>(0.0);", loop, f"    let d = {ld('j')} - {sp('mean')};", "    let d2 = d * d;",
                 f"    cq += vec2<f32>({plan.hsum('d')}, {plan.hsum('d2')});", "  }",
                 f"  let CQ = red_sum2(cq, lid, {sg});", *_FINISH,
                 loop, f"    let d = ({ld('j')} - {sp('mean')}) - {sp('c')};",
                 f"    {stores('d', 'j', 'row * NV + j', f'row * COLS + j * {V}u')}", "  }"]
    src = "\n".join(lines + body + ["}\n"])
    return src, plan


def layer_norm(out: Buffer, x: Operand, weight: Optional[Operand], bias: Optional[Operand],
               rows: int, cols: int, eps: float = 1e-5, epilogue=None, stack: Optional[tuple] = None) -> None:
    """out[r, c] = epilogue((x[r,c] - mean_r) / sqrt(var_r + eps) * weight[c] + bias[c], r*cols + c)
    as contiguous float32 [rows, cols]; mean/var (biased, like torch) accumulated in f32.

    x: f32/f16 Operand viewed as [rows, cols] (leading axes multiply to rows, any strides).
    weight, bias: f32/f16 Operands of shape [cols], or None.
    stack = (weight2, bias2) (each an Operand [cols] or None): out is [2, rows, cols], its second
    block the same normalised rows times weight2 plus bias2. Not with an epilogue."""
    row_operand_check("layer_norm", "x", x, rows, cols)
    _param_check("weight", weight, cols)
    _param_check("bias", bias, cols)
    if stack is not None:
        if len(stack) != 2 or epilogue is not None:
            raise ValueError("layer_norm: stack is (weight2, bias2), without an epilogue")
        _param_check("weight2", stack[0], cols)
        _param_check("bias2", stack[1], cols)
    if rows <= 0:
        return
    if cols <= 0:
        raise ValueError(f"layer_norm: cols must be >= 1, got {cols} (rows={rows})")
    n_out = 2 if stack is not None else 1
    check_out("out", out, 4 * n_out * rows * cols, "layer_norm")
    ep = epilogue_or_default(epilogue)
    params = [weight, bias] + (list(stack) if stack is not None else [])
    distinct("layer_norm", out=out, x=x.buffer,
             **{name: p.buffer for name, p in zip(("weight", "bias", "weight2", "bias2"), params) if p is not None},
             **{f"epilogue{i}": o.buffer for i, o in enumerate(ep.operands)})
    src, plan = _source(x, weight, bias, rows, cols, eps, ep, stack)
    binds = [(x.buffer, "read")] + [(p.buffer, "read") for p in params if p is not None] + [(out, "rw")]
    dispatch(f"layer_norm{'2' if stack is not None else ''}[{rows}x{cols}]", src, binds + epilogue_bindings(ep),
             grid_for(plan.n_wg))
