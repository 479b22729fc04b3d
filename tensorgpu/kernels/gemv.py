"""Decode GEMV: out[n] = epilogue(sum_k h[k] * W[n, k]) for ONE activation row, with the layer
norm that produces h optionally fused in front (h = layer_norm(x) * ln_w + ln_b).

Why a separate kernel from matmul.gemv_k / quant's gemv: at batch 1 a transformer layer is a
chain of small dependent dispatches, and each costs microseconds of drain and launch on top of
its work. A layer norm of one 2048-wide row is ~nothing of work but a whole dispatch; here every
workgroup recomputes the mean and variance of the row it reads anyway (the row is 8 KB, in L2)
and normalises its slice of x in registers, so the norm costs no dispatch of its own. The
workgroup's weight loads are issued before the two reductions that give mean and variance, so
their latency hides the norm's.

Layout: a workgroup owns R consecutive weight rows; its T invocations take the row's "items"
(8 f16 = one 16-byte load, 4 f32, or one 16-element quant unit of quant.py's formats) strided
by T, all fully unrolled (K is a compile-time constant), so every load is independent and in
flight at once. Per-row partial sums are reduced across the workgroup (subgroupAdd + shared
slots, or a shared-memory tree without subgroups).

Weights: float16 / float32 Operands [N, K] with contiguous rows, or a GGUF block Buffer of any
type quant.py decodes (bound as array<u32>). x: float32/float16 [K] contiguous. out: float32 [N].
"""
from __future__ import annotations

from typing import Optional

from .. import dtypes, runtime
from ..runtime import Buffer
from .common import NoEpilogue, Operand, epilogue_bindings
from .nn_wgsl import Reader, enable_f16, f32_lit, seg_reduce

# Knobs the sweeps set (benchmarks/sweep_decode.py): None = chosen from K / the weight type.
TUNING = {"threads": None, "rows": None, "prefetch_max": 16}

_U32 = 1 << 32


def _u(x: int) -> str:
    return f"{int(x) % _U32}u"


def supported(x: Operand, w_dtype: dtypes.DType, K: int, w: Optional[Operand] = None) -> bool:
    """Whether `gemv` takes this case (else the general matmul / quant_matmul paths)."""
    if x.dtype not in (dtypes.float32, dtypes.float16) or K <= 0 or K % 4:
        return False
    if int(x.offset) % 4 or (x.strides and x.strides[-1] != 1 and K > 1):
        return False
    if w_dtype in (dtypes.float16, dtypes.float32):
        if w is None:
            return True
        vw = 8 if w_dtype is dtypes.float16 else 4
        return K % vw == 0 and tuple(w.strides) == (K, 1) and int(w.offset) % vw == 0
    from .quant import SUPPORTED
    return w_dtype in SUPPORTED and w_dtype is not dtypes.bfloat16 and K % w_dtype.block_size == 0


def _config(w_dtype, K: int) -> tuple:
    """(items per row, elements per item, threads, rows per workgroup)."""
    if w_dtype is dtypes.float16:
        per = 8
    elif w_dtype is dtypes.float32:
        per = 4
    else:
        per = 16
    items = K // per
    T = TUNING["threads"] or (256 if items >= 1024 else 128 if items >= 128 else 64 if items >= 48 else 32)
    R = TUNING["rows"] or (2 if per in (4, 8) else 4)
    return items, per, int(T), int(R)


def gemv(out: Buffer, x: Operand, w, w_dtype: dtypes.DType, N: int, K: int, epilogue=None,
         ln: Optional[tuple] = None) -> None:
    """Queue out[n] = epilogue(sum_k h[k] W[n, k], n) for n < N, h = x or, with ln = (ln_w, ln_b,
    eps) (Operands [K] or None), the layer norm of x (biased variance, like torch) times ln_w
    plus ln_b. w: Operand [N, K] (f16/f32, contiguous rows) or a Buffer of GGUF blocks of w_dtype."""
    w_dtype = dtypes.as_dtype(w_dtype)
    N, K = int(N), int(K)
    ep = epilogue if epilogue is not None else NoEpilogue()
    xw = w if isinstance(w, Operand) else None
    if not supported(x, w_dtype, K, xw):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} with weight [{N}, {K}] {w_dtype} is not a supported "
                         f"decode GEMV (contiguous x, K % 8, quant K % block size)")
    wbuf = w.buffer if isinstance(w, Operand) else w
    items, per, T, R = _config(w_dtype, K)
    R = max(1, min(R, N))
    if out.nbytes < 4 * N:
        raise ValueError(f"gemv: output holds {out.nbytes} bytes, needs {4 * N} for float32 [{N}]")
    ins = [x.buffer, wbuf] + [o.buffer for o in (ln[:2] if ln else ()) if o is not None] + [o.buffer for o in ep.operands]
    if any(b is out for b in ins):
        raise ValueError("gemv: the output buffer is also an input")
    src, grid, binds = _source(out, x, w, wbuf, w_dtype, N, K, ep, ln, items, per, T, R)
    tag = w_dtype.name
    runtime.dispatch(f"gemv{'_ln' if ln else ''}_{tag}[{N}x{K}]", src, binds, grid)


def _source(out, x, w, wbuf, w_dtype, N, K, ep, ln, items, per, T, R):
    dev = runtime.get_device()
    sub = dev.has_subgroups
    quant = w_dtype not in (dtypes.float16, dtypes.float32)
    ITERS = -(-items // T)
    ragged = items % T != 0
    xr = Reader("xv", x, 1, True)
    lnw = lnb = None
    b = 3
    readers = [xr]
    if ln:
        if ln[0] is not None:
            lnw = Reader("lnw", ln[0], b, ln[0].offset % 4 == 0 and ln[0].strides[-1] == 1)
            b += 1
            readers.append(lnw)
        if ln[1] is not None:
            lnb = Reader("lnb", ln[1], b, ln[1].offset % 4 == 0 and ln[1].strides[-1] == 1)
            b += 1
            readers.append(lnb)
    ep_lines = ep.wgsl(b).splitlines(keepends=True)
    enables = [ln_.strip() for ln_ in ep_lines if ln_.lstrip().startswith("enable ")]
    ep_text = "".join(ln_ for ln_ in ep_lines if not ln_.lstrip().startswith("enable "))
    head = enable_f16(*readers)
    if head:
        enables.insert(0, head.strip())
    s = ["".join(e + "\n" for e in dict.fromkeys(enables))]
    s.append("@group(0) @binding(0) var<storage, read_write> OUT: array<f32>;\n")
    s += [r.decl() for r in readers]
    x0 = int(x.offset)
    if quant:
        from .quant import _fmt, _format_wgsl
        fmt = _fmt(w_dtype)
        rb_bytes = K // w_dtype.block_size * w_dtype.block_bytes
        s.append("@group(0) @binding(2) var<storage, read> W: array<u32>;\n")
        s.append(_format_wgsl(w_dtype, False, K, True))
    else:
        fmt = None
        if w_dtype is dtypes.float16:
            s.append("@group(0) @binding(2) var<storage, read> W: array<vec4<u32>>;\n")
            s.append("fn up4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }\n")
        else:
            s.append("@group(0) @binding(2) var<storage, read> W: array<vec4<f32>>;\n")
        woff = int(w.offset) // per
    s.append(ep_text)
    if ln:
        s.append(seg_reduce("red_sum", "+", T, T, sub, "0.0"))
        s.append(f"const INV_K: f32 = 1.0f / {K}.0f;\nconst EPS: f32 = {f32_lit(ln[2])};\n")
    s.append(f"var<workgroup> red: array<f32, {R * (T if not sub else max(1, T // 4))}>;\n")
    bi = ("@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
          "@builtin(local_invocation_index) lid: u32")
    if sub:
        bi += (", @builtin(subgroup_invocation_id) sgl: u32, @builtin(subgroup_id) sgid: u32, "
               "@builtin(num_subgroups) nsg: u32, @builtin(subgroup_size) sg: u32")
    s.append(f"@compute @workgroup_size({T})\nfn main({bi}) {{\n")
    groups = -(-N // R)
    s.append(f"    let g = {runtime.WGSL_LINEAR_ID};\n    let n0 = min(g, {_u(groups - 1)}) * {R}u;\n")
    for r in range(R):
        if quant:
            s.append(f"    let rb{r} = min(n0 + {r}u, {_u(N - 1)}) * {_u(rb_bytes)};\n")
        else:
            s.append(f"    let rb{r} = {_u(woff)} + min(n0 + {r}u, {_u(N - 1)}) * {_u(K // per)};\n")
    # item indices (clamped: a past-the-end item reads a valid one and gets x = 0)
    nx = 4 if quant else per // 4        # vec4 of x per item
    offs = fmt.offs if quant else tuple(4 * j for j in range(nx))
    for it in range(ITERS):
        last = it == ITERS - 1 and ragged
        s.append(f"    let i{it} = {'min(' if last else ''}{it * T}u + lid{f', {_u(items - 1)})' if last else ''};\n")
        if last:
            s.append(f"    let ok{it} = {it * T}u + lid < {_u(items)};\n")
        if quant:
            e0 = _subst_u(fmt.e0, f"i{it}")
        else:
            e0 = f"{per}u * i{it}"
        s.append(f"    let e{it} = {e0};\n")
    # weight loads first (they do not depend on x): their latency covers the norm's reductions
    pre = ITERS * R <= int(TUNING["prefetch_max"])

    def wload(r, it):
        if quant:
            return f"unit(rb{r}, i{it})"
        return f"W[rb{r} + i{it}]"

    wt = "QU" if quant else ("vec4<u32>" if w_dtype is dtypes.float16 else "vec4<f32>")
    if pre:
        for it in range(ITERS):
            for r in range(R):
                s.append(f"    let w{r}_{it} = {wload(r, it)};\n")
    # x slices
    for it in range(ITERS):
        for j, o in enumerate(offs):
            val = f"xv_at4({_u(x0)} + e{it} + {o}u)"
            if it == ITERS - 1 and ragged:
                val = f"select(vec4<f32>(0.0), {val}, ok{it})"
            s.append(f"    var x{it}_{j} = {val};\n")
    if ln:
        terms = " + ".join(f"x{it}_{j}" for it in range(ITERS) for j in range(len(offs)))
        s.append(f"    let mean = red_sum(dot({terms}, vec4<f32>(1.0)), lid, {'sg' if sub else '1u'}) * INV_K;\n")
        s.append("    var q = vec4<f32>(0.0);\n")
        for it in range(ITERS):
            for j in range(len(offs)):
                d = f"x{it}_{j} - vec4<f32>(mean)"
                if it == ITERS - 1 and ragged:
                    d = f"select(vec4<f32>(0.0), {d}, ok{it})"
                s.append(f"    x{it}_{j} = {d};\n    q = fma(x{it}_{j}, x{it}_{j}, q);\n")
        s.append(f"    let rstd = inverseSqrt(red_sum(dot(q, vec4<f32>(1.0)), lid, {'sg' if sub else '1u'}) * INV_K + EPS);\n")
        for it in range(ITERS):
            for j, o in enumerate(offs):
                e = f"e{it} + {o}u"
                v = f"x{it}_{j} * rstd"
                if lnw is not None:
                    v = f"{v} * {_param4(lnw, ln[0], e)}"
                if lnb is not None:
                    v = f"{v} + {_param4(lnb, ln[1], e)}"
                if it == ITERS - 1 and ragged:
                    v = f"select(vec4<f32>(0.0), {v}, ok{it})"
                s.append(f"    x{it}_{j} = {v};\n")
    # the dot products
    for r in range(R):
        s.append(f"    var a{r} = vec4<f32>(0.0);\n")
        if quant:
            s.append(f"    var c{r} = 0.0;\n")
    if quant and fmt.has_c:
        for it in range(ITERS):
            s.append(f"    let sx{it} = vec4<f32>(" + ", ".join(f"dot(x{it}_{j}, vec4<f32>(1.0))" for j in range(4)) + ");\n")
    for it in range(ITERS):
        for r in range(R):
            w_ = f"w{r}_{it}" if pre else f"wl{r}_{it}"
            if not pre:
                s.append(f"    let {w_}: {wt} = {wload(r, it)};\n")
            if quant:
                t = f"vec4<f32>(dot({w_}.v0, x{it}_0), dot({w_}.v1, x{it}_1), dot({w_}.v2, x{it}_2), dot({w_}.v3, x{it}_3))"
                s.append(f"    a{r} = fma({w_}.a, {t}, a{r});\n")
                if fmt.has_c:
                    s.append(f"    c{r} += dot({w_}.c, sx{it});\n")
            elif w_dtype is dtypes.float16:
                s.append(f"    a{r} = fma(up4({w_}.xy), x{it}_0, fma(up4({w_}.zw), x{it}_1, a{r}));\n")
            else:
                s.append(f"    a{r} = fma({w_}, x{it}_0, a{r});\n")
    for r in range(R):
        extra = f" + c{r}" if quant else ""
        s.append(f"    let t{r} = dot(a{r}, vec4<f32>(1.0)){extra};\n")
    if sub:
        for r in range(R):
            s.append(f"    let u{r} = subgroupAdd(t{r});\n")
        s.append("    if (sgl == 0u) {\n")
        for r in range(R):
            s.append(f"        red[sgid * {R}u + {r}u] = u{r};\n")
        s.append("    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {R}u) {{\n        var v = 0.0;\n"
                 f"        for (var j = 0u; j < nsg; j++) {{ v += red[j * {R}u + lid]; }}\n")
    else:
        for r in range(R):
            s.append(f"    red[{r * T}u + lid] = t{r};\n")
        s.append(f"    for (var h = {T // 2}u; h > 0u; h >>= 1u) {{\n        workgroupBarrier();\n        if (lid < h) {{\n")
        for r in range(R):
            s.append(f"            red[{r * T}u + lid] += red[{r * T}u + lid + h];\n")
        s.append("        }\n    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {R}u) {{\n        let v = red[lid * {T}u];\n")
    s.append(f"        let n = min(g, {_u(groups - 1)}) * {R}u + lid;\n"
             f"        if (n < {_u(N)} && g < {_u(groups)}) {{ OUT[n] = epilogue(v, n); }}\n    }}\n}}\n")
    binds = [(out, "rw"), (x.buffer, "read"), (wbuf, "read")]
    if ln:
        binds += [(o.buffer, "read") for o in ln[:2] if o is not None]
    binds += epilogue_bindings(ep)
    return "".join(s), runtime.grid_for(groups), binds


def _param4(rd: Reader, op: Operand, e: str) -> str:
    """vec4 of a [K] parameter (layer-norm weight/bias) at elements e .. e+3."""
    if rd.vec:
        return f"{rd.name}_at4({_u(op.offset)} + {e})"
    st = int(op.strides[-1]) if op.shape else 1
    return (f"vec4<f32>({rd.name}_at({_u(op.offset)} + ({e}) * {_u(st)}), {rd.name}_at({_u(op.offset)} + ({e} + 1u) * {_u(st)}), "
            f"{rd.name}_at({_u(op.offset)} + ({e} + 2u) * {_u(st)}), {rd.name}_at({_u(op.offset)} + ({e} + 3u) * {_u(st)}))")


def _subst_u(expr: str, var: str) -> str:
    """quant's unit-offset expressions are written in a variable named `u`: rename it."""
    import re
    return re.sub(r"\bu\b", var, expr)
