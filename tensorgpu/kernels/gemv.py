"""Decode GEMV: out[n] = epilogue(sum_k h[k] * W[n, k]) for ONE activation row, with the layer
norm that produces h optionally fused in front (h = layer_norm(x) * ln_w + ln_b).

Why a separate kernel from matmul.gemv_k / quant's gemv: at batch 1 a transformer layer is a
chain of small dependent dispatches, and each costs microseconds of drain and launch on top of
its work. A layer norm of one 2048-wide row is ~nothing of work but a whole dispatch; here the
norm is folded into the GEMV algebraically (see `gemv`): each workgroup reads the x slice it
needs anyway, and the row's mean and variance come out of the same final reduction as the dot
products, so the norm adds neither a dispatch nor a barrier.

Layout: a workgroup owns R consecutive weight rows; its T invocations take the row's "items"
(8 f16 = one 16-byte load, 4 f32, or one 16-element quant unit of quant.py's formats) strided
by T, all fully unrolled (K is a compile-time constant), so every load is independent and in
flight at once. Per-row partial sums are reduced across the workgroup (subgroupAdd + shared
slots, or a shared-memory tree without subgroups).

Weights: float16 / float32 Operands [N, K] with contiguous rows, or a GGUF block Buffer of any
type quant.py decodes (bound as array<u32>). x: float32/float16 [K] contiguous. out: float32 [N].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import dtypes, runtime
from ..runtime import Buffer
from .common import NoEpilogue, Operand, epilogue_bindings
from .nn_wgsl import Reader, enable_f16, f32_lit

# Knobs the sweeps set (benchmarks/sweep_decode.py): None = chosen from K / the weight type.
# Variants measured on the H100 and dropped (benchmarks/results/2026-11-25b/ and -25c/): 64-element
# items with half the integer work per element; rows staged through workgroup memory with 16-byte
# loads; one lane per 16-byte-aligned run of blocks (8 q4_0 blocks = 9 vec4 loads) decoded with
# compile-time offsets, with x staged in workgroup memory; one lane per 16-byte q4_k code chunk.
# None beat this kernel by more than ~10% on any shape, most were slower.
# probe (a diagnostic, never on by default): 1 = weight loads only, the decode replaced by folding
# the raw words; 2 = decode with x = 1 (no x loads). Full minus probe 2 is what x costs, probe 2
# minus probe 1 what the decode costs.
TUNING = {"threads": None, "rows": None, "hoist": True, "hoist_regs": 48, "probe": 0}

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


def _config(w_dtype, K: int, ln: bool = False) -> tuple:
    """(items per row, elements per item, threads, rows per workgroup). With subgroups the
    workgroup size may be any multiple of 32 that divides the items (K = 2560 is 160 quant
    units: one pass of 160 invocations beats a full pass of 128 plus a quarter-full one)."""
    if w_dtype is dtypes.float16:
        per = 8
    elif w_dtype is dtypes.float32:
        per = 4
    else:
        per = 16
    items = K // per
    T = TUNING["threads"]
    if T is None and runtime.get_device().has_subgroups:
        for n in range(1 if per >= 16 else 2, 9):   # float rows: >= 2 loads in flight per row
            t = items // n
            if items % n == 0 and t % 32 == 0 and 64 <= t <= 256:
                T = t
                break
    if T is None:
        T = 256 if items >= 1024 else 128 if items >= 128 else 64 if items >= 48 else 32
    if not runtime.get_device().has_subgroups:
        T = 1 << (int(T).bit_length() - 1)          # the shared-memory tree needs a power of two
    # rows per workgroup (H100, same-run A/B in benchmarks/sweep_decode.py `ab`): float rows
    # alone for K <= 4096 without the norm, else pairs; quant units 4 rows (x reused 4 times)
    R = TUNING["rows"] or ((1 if (K <= 4096 and not ln) else 2) if per in (4, 8) else 4)
    return items, per, int(T), int(R)


def gemv(out: Buffer, x: Operand, w, w_dtype: dtypes.DType, N: int, K: int, epilogue=None,
         ln: Optional[tuple] = None, out_offset: int = 0, pair: Optional[tuple] = None,
         stack: Optional[tuple] = None, rms: bool = False, glu: int = 0) -> None:
    """Queue the GEMV that `plan` describes (see there)."""
    name, src, binds, grid, _ = plan(out, x, w, w_dtype, N, K, epilogue, ln, out_offset, pair, stack, rms, glu)
    runtime.dispatch(name, src, binds, grid)


def plan(out: Buffer, x: Operand, w, w_dtype: dtypes.DType, N: int, K: int, epilogue=None,
         ln: Optional[tuple] = None, out_offset: int = 0, pair: Optional[tuple] = None,
         stack: Optional[tuple] = None, rms: bool = False, glu: int = 0) -> tuple:
    """The dispatch of out[out_offset + n] = epilogue(sum_k h[k] W[n, k], n) for n < N, h = x or, with
    ln = (ln_w, ln_b, eps) (Operands [K] or None), the layer norm of x (biased variance, like
    torch) times ln_w plus ln_b. w: Operand [N, K] (f16/f32, contiguous rows) or a Buffer of
    GGUF blocks of w_dtype. Returns (name, wgsl, bindings, grid, info) of the one dispatch
    (quant.plan_matmul's one-row case takes it as its pass; the norm's constants, when new, are
    queued here).

    The norm is applied algebraically: with d = x - mean and g = ln_w,
        sum_k W[n,k] (d_k rstd g_k + b_k) = rstd (sum_k W[n,k] g_k x_k - mean B[n]) + C[n]
    where B[n] = sum_k W[n,k] g_k and C[n] = sum_k W[n,k] b_k depend on the weights only (two
    GEMVs, computed once per (W, ln_w, ln_b) and cached). So the kernel needs no reduction
    before its dot products: the row's sum and sum of squares ride along in the final
    reduction. x is shifted by the mean of its first 32 values first, so neither the variance
    nor `A - mean B` cancels badly when |mean| >> std.

    pair = (x2, w2, K2[, w2_dtype]): a second dot product added in the same kernel, out[n] =
    epilogue(x W[n] + x2 W2[n]) with W2 [N, K2]: two projections whose results are summed
    (Pythia's attention output and MLP down projections) cost one dispatch. W2 has W's type, or
    with a quantized W any other GGUF block type (w2_dtype; a Q4_K_M file pairs q4_k with q6_k).
    Not with ln.

    stack = (w2, N2, ln2_w, ln2_b): a second GEMV of the same x stacked under the first, with its
    own weight (W2 [N2, K], W's type) and its own norm parameters (same eps): out[n] for n < N
    as above, out[N + m] = epilogue(layer_norm(x) * ln2_w + ln2_b) W2[m]). GPT-NeoX's parallel
    attention and MLP inputs (ln1 + QKV, ln2 + up) in one dispatch. Needs ln; not with pair.

    rms=True: the norm is LLaMA's RMSNorm instead, h = x / sqrt(mean(x^2) + eps) * ln_w (no mean,
    no bias: ln = (ln_w or None, None, eps)). Then sum_k W[n,k] h_k = rstd * sum_k W[n,k] ln_w_k x_k:
    the row's sum of squares rides along in the final reduction and scales the dot products, with
    no weight-derived constants at all. Not with pair. With rms, stack = ((w2, N2), ...): one or
    two more weights of the same x and the same norm (LLaMA's q, k and v projections) stacked
    under the first: out[N1 + ...] are their rows, in order.

    glu = d > 0: the row is h[k] = silu(x[k]) * x[k + d] (SwiGLU: the gate and up halves of one
    stacked output, d elements apart in x's buffer), computed as x is loaded. d % 4 == 0; not
    with ln, pair or stack."""
    w_dtype = dtypes.as_dtype(w_dtype)
    N, K = int(N), int(K)
    ep = epilogue if epilogue is not None else NoEpilogue()
    xw = w if isinstance(w, Operand) else None
    if not supported(x, w_dtype, K, xw):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype} with weight [{N}, {K}] {w_dtype} is not a supported "
                         f"decode GEMV (contiguous x, K % 8, quant K % block size)")
    wbuf = w.buffer if isinstance(w, Operand) else w
    if rms and (ln is None or ln[1] is not None or pair is not None):
        raise ValueError("gemv: rms needs ln = (ln_w or None, None, eps), without pair")
    glu = int(glu)
    if glu and (glu < 0 or glu % 4 or ln is not None or pair is not None or stack is not None
                or x.buffer.nbytes < x.dtype.itemsize * (int(x.offset) + glu + K)):
        raise ValueError(f"gemv: glu {glu} needs d % 4 == 0, x's buffer holding x[k + d], no ln, pair or stack")
    extra = []    # the stacked weights after the first: (w, N)
    if stack is not None and rms:
        if not (isinstance(stack, tuple) and 1 <= len(stack) <= 2 and all(isinstance(p, tuple) and len(p) == 2 for p in stack)):
            raise ValueError("gemv: with rms, stack is ((w2, N2),) or ((w2, N2), (w3, N3))")
        extra = [(sw, int(sn)) for sw, sn in stack]
    elif stack is not None:
        extra = [(stack[0], int(stack[1]))]
    Kc = K
    w2_dtype = w_dtype
    if pair is not None:
        x2, w2, K2 = pair[:3]
        K2 = int(K2)
        w2_dtype = dtypes.as_dtype(pair[3]) if len(pair) > 3 else (w2.dtype if isinstance(w2, Operand) else w_dtype)
        ok = (w2_dtype is w_dtype or (w_dtype.is_quant and w2_dtype.is_quant)) and isinstance(w2, Operand) == (xw is not None)
        if ln is not None or not ok or not supported(x2, w2_dtype, K2, w2 if isinstance(w2, Operand) else None):
            raise ValueError(f"gemv: second pair x {tuple(x2.shape)} {x2.dtype} with weight [{N}, {K2}] {w2_dtype} is not "
                             f"supported beside {w_dtype} (the same weight type or two GGUF block types, contiguous x, "
                             f"no layer norm)")
        pair = (x2, w2, K2, w2_dtype)
        Kc = K + K2
    N1 = N
    starts = []
    for w2, N2 in extra:
        w2_dtype = w2.dtype if isinstance(w2, Operand) else w_dtype
        if (ln is None or pair is not None or w2_dtype is not w_dtype or isinstance(w2, Operand) != (xw is not None)
                or not supported(x, w_dtype, K, w2 if isinstance(w2, Operand) else None) or N2 <= 0):
            raise ValueError(f"gemv: stacked weight [{N2}, {K}] {w2_dtype} is not supported under [{N}, {K}] {w_dtype} "
                             f"(the same type, with a layer norm, without a pair)")
        starts.append(N)
        N += N2
    _, per, T, R = _config(w_dtype, Kc, ln is not None)   # launch shape from the whole row
    items = K // per                                        # of which the first pair's part
    R = max(1, min(R, N))
    while any(st % R for st in starts):                     # a workgroup's rows lie in one weight
        R -= 1
    if out.nbytes < 4 * (N + out_offset):
        raise ValueError(f"gemv: output holds {out.nbytes} bytes, needs {4 * (N + out_offset)} for float32 [{N}]")
    ins = ([x.buffer, wbuf] + [o.buffer for o in (ln[:2] if ln else ()) if o is not None] + [o.buffer for o in ep.operands]
           + ([pair[0].buffer, pair[1].buffer if isinstance(pair[1], Operand) else pair[1]] if pair else []))
    ins += [sw.buffer if isinstance(sw, Operand) else sw for sw, _ in extra]
    if stack is not None and not rms:
        ins += [o.buffer for o in stack[2:] if o is not None]
    if any(b is out for b in ins):
        raise ValueError("gemv: the output buffer is also an input")
    if stack is not None and rms:
        bc = None
        stack = ([(sw, sw.buffer if isinstance(sw, Operand) else sw, st) for (sw, _), st in zip(extra, starts)], None)
    elif stack is not None:
        w2, N2, g2, b2 = stack
        bc = _ln_constants(w, w_dtype, N1, K, ln[0], ln[1], more=((w2, N2, g2, b2),))
        stack = ([(w2, w2.buffer if isinstance(w2, Operand) else w2, N1)], g2)
    else:
        bc = _ln_constants(w, w_dtype, N, K, ln[0], ln[1]) if ln and not rms else None
    src, grid, binds = _source(out, x, w, wbuf, w_dtype, N, K, ep, ln, bc, items, per, T, R, int(out_offset), pair, stack,
                               rms, glu)
    kind = "_glu" if glu else f"_rms{len(extra) + 1}" if stack and rms else "_ln2" if stack else "_rms" if rms else "_ln" if ln else "2" if pair else ""
    types = w_dtype.name + (f"+{w2_dtype.name}" if w2_dtype is not w_dtype else "")
    return (f"gemv{kind}_{types}[{N}x{Kc}]", src, binds, grid,
            {"kernel": "gemv.py", "threads": T, "rows": R, "elements_per_item": per})


# (W buffer) -> {(id(g), g offset, id(b), b offset): (weakref g, weakref b, Buffer [B | C])}
_BC: "weakref.WeakKeyDictionary" = None


def _ln_constants(w, w_dtype, N: int, K: int, g: Optional[Operand], b: Optional[Operand], more: tuple = ()) -> Buffer:
    """Buffer of float32 [2N]: B[n] = sum_k W[n,k] g[k], C[n] = sum_k W[n,k] b[k] (g = 1, b = 0
    when absent). more: further (w, N, g, b) blocks stacked under the first (`plan`'s stack), laid
    out [B of every block | C of every block]. Computed on first use, outside any capture
    recording (the weights are constant, so a replayed step must not recompute them), then cached
    for the life of the weights."""
    import weakref

    import numpy as np
    global _BC
    if _BC is None:
        _BC = weakref.WeakKeyDictionary()
    parts = [(w, int(N), g, b)] + [(pw, int(pn), pg, pb) for pw, pn, pg, pb in more]
    wbuf = w.buffer if isinstance(w, Operand) else w

    def bufs(i, p):   # the buffers a block's constants depend on (the first W is the cache's key)
        pw, _, pg, pb = p
        return [x for x in ((pw.buffer if isinstance(pw, Operand) else pw) if i else None,
                            pg.buffer if pg is not None else None, pb.buffer if pb is not None else None) if x is not None]
    key = tuple((id(pw.buffer if isinstance(pw, Operand) else pw) if i else 0, pw.offset if isinstance(pw, Operand) else 0,
                 pn, id(pg.buffer) if pg else 0, pg.offset if pg else 0, id(pb.buffer) if pb else 0, pb.offset if pb else 0)
                for i, (pw, pn, pg, pb) in enumerate(parts)) + (K, w_dtype.name)
    deps = [x for i, p in enumerate(parts) for x in bufs(i, p)]
    per_w = _BC.setdefault(wbuf, {})
    hit = per_w.get(key)
    if hit is not None:
        refs, buf = hit
        if all(r() is d for r, d in zip(refs, deps)):
            return buf
    NT = sum(p[1] for p in parts)
    with runtime.untraced():
        buf = Buffer(8 * NT)
        ones = None
        r0 = 0
        for pw, pn, pg, pb in parts:
            if pg is None and ones is None:
                ones = runtime.upload(np.ones(K, np.float32))
            gx = pg if pg is not None else Operand(ones, dtypes.float32, (K,), (1,), 0)
            gemv(buf, _row(gx, K), pw, w_dtype, pn, K, out_offset=r0)
            if pb is not None:
                gemv(buf, _row(pb, K), pw, w_dtype, pn, K, out_offset=NT + r0)
            else:
                runtime.write(buf, np.zeros(pn, np.float32), offset=4 * (NT + r0))
            r0 += pn
    for k in [k for k, (refs, _) in per_w.items() if any(r() is None for r in refs)]:
        del per_w[k]     # constants of norm parameters or weights that no longer exist
    per_w[key] = ([weakref.ref(d) for d in deps], buf)
    return buf


def epilogue_text(ep, first_binding: int) -> tuple:
    """(its `enable` directives, the rest of its WGSL) of an epilogue whose operands bind from
    `first_binding`: directives must open the shader, so the caller merges them with its own."""
    lines = ep.wgsl(first_binding).splitlines(keepends=True)
    return ([ln.strip() for ln in lines if ln.lstrip().startswith("enable ")],
            "".join(ln for ln in lines if not ln.lstrip().startswith("enable ")))


def _row(op: Operand, K: int) -> Operand:
    """A [K] parameter as the [1, K] x of a GEMV (copied when it is strided or misaligned)."""
    if (not op.shape or op.strides[-1] == 1 or K == 1) and op.offset % 4 == 0:
        return Operand(op.buffer, op.dtype, (1, K), (K, 1), op.offset)
    import numpy as np
    from .. import runtime as rt
    raw = np.frombuffer(rt.read(op.buffer), op.dtype.np_dtype)
    st = op.strides[-1] if op.shape else 1
    vals = np.ascontiguousarray(raw[op.offset: op.offset + st * (K - 1) + 1: st]).astype(np.float32)
    return Operand(rt.upload(vals), dtypes.float32, (1, K), (K, 1), 0)


@dataclass
class _Seg:
    """One (x, W) pair of the dot products: the whole row, or (with a second pair) one part of
    the concatenated K. Names keep the second pair's WGSL apart (x reader, W array, helper
    functions, row offsets)."""
    x: Operand
    w: object
    wbuf: object
    dtype: object    # the weight's dtypes.DType
    K: int
    items: int
    xname: str       # x reader prefix
    wname: str       # W array
    sfx: str         # suffix of the W-reading helper functions
    rbp: str         # row-offset variable prefix
    first: int = 0   # number of the segment's first iteration (iterations are numbered across segments)
    iters: int = 0
    fmt: object = None   # quant.py's _Format of a GGUF block type
    raw: bool = False    # loads split off the decode (a _RAW row)


def _source(out, x, w, wbuf, w_dtype, N, K, ep, ln, bc, items, per, T, R, out_off, pair=None, stack=None, rms=False,
            glu=0):
    dev = runtime.get_device()
    sub = dev.has_subgroups
    quant = w_dtype not in (dtypes.float16, dtypes.float32)
    segs = [_Seg(x, w, wbuf, w_dtype, K, items, "xv", "W", "", "rb")]
    if pair is not None:
        x2, w2, K2, w2_dtype = pair
        segs.append(_Seg(x2, w2, w2.buffer if isinstance(w2, Operand) else w2, w2_dtype, K2, K2 // per, "xw", "W2", "_2", "rc"))
    n_it = 0
    for sg in segs:
        sg.first, sg.iters = n_it, -(-sg.items // T)
        n_it += sg.iters
    ITERS = n_it
    seg_of = [sg for sg in segs for _ in range(sg.iters)]
    xr = Reader("xv", x, 1, True)
    lnw = None
    b = 3
    readers = [xr]
    if pair is not None:
        readers.append(Reader("xw", segs[1].x, 3, True))
        b = 5
    stk = stack[0] if stack is not None else []      # [(w, wbuf, first row)] of W2 (, W3)
    if stack is not None:    # W2 (W3) at binding 3 (4): rows N1.. read it (see plan's stack)
        b = 3 + len(stk)
    if ln and ln[0] is not None:
        lnw = Reader("lnw", ln[0], b, ln[0].offset % 4 == 0 and (not ln[0].shape or ln[0].strides[-1] == 1))
        b += 1
        readers.append(lnw)
    lnw2 = None
    if stack is not None and stack[1] is not None:    # the stacked rows' own norm weight
        g2 = stack[1]
        lnw2 = Reader("lnw2", g2, b, g2.offset % 4 == 0 and (not g2.shape or g2.strides[-1] == 1))
        b += 1
        readers.append(lnw2)
    if ln and not rms:
        bc_binding = b
        b += 1
    enables, ep_text = epilogue_text(ep, b)
    head = enable_f16(*readers)
    if head:
        enables.insert(0, head.strip())
    s = ["".join(e + "\n" for e in dict.fromkeys(enables))]
    s.append("@group(0) @binding(0) var<storage, read_write> OUT: array<f32>;\n")
    s += [r.decl() for r in readers]
    if ln and not rms:
        s.append(f"@group(0) @binding({bc_binding}) var<storage, read> BC: array<f32>;\n")
    wbind = {"W": 2, "W2": 4 if stack is None else 3, "W3": 4}
    warrs = [sg.wname for sg in segs] + [f"W{j + 2}" for j in range(len(stk))]
    if quant:
        from .quant import _fmt, _format_wgsl
        def helpers(dt):
            return _format_wgsl(dt, False, K, True) + (_RAW[dt.name][1] if dt.name in _RAW else "")
        for sg in segs:
            sg.fmt = _fmt(sg.dtype)
            sg.raw = bool(TUNING.get("hoist", True)) and sg.dtype.name in _RAW   # float: no gain (A/B)
        for a in warrs:
            s.append(f"@group(0) @binding({wbind[a]}) var<storage, read> {a}: array<u32>;\n")
        s.append(helpers(w_dtype))
        for j in range(len(stk)):
            s.append(_reading_copy(helpers(w_dtype), "W", f"W{j + 2}", f"_{j + 2}"))
        if pair is not None:
            s.append(_reading_copy(helpers(segs[1].dtype), "W", "W2", "_2"))
            if segs[1].dtype is not w_dtype:     # its helpers that read no weights, where W's lack them
                s.append(_missing_items(helpers(segs[1].dtype), helpers(w_dtype), "W"))
    else:
        vt = "vec4<u32>" if w_dtype is dtypes.float16 else "vec4<f32>"
        for a in warrs:
            s.append(f"@group(0) @binding({wbind[a]}) var<storage, read> {a}: array<{vt}>;\n")
        if w_dtype is dtypes.float16:
            s.append("fn up4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }\n")
    s.append(ep_text)
    if glu:
        from ..ops import UNARY, Op
        s.append(f"fn glu4(i: u32) -> vec4<f32> {{\n  let a = xv_at4(i);\n"
                 f"  return {UNARY[Op.SILU].wgsl.format('a')} * xv_at4(i + {_u(glu)});\n}}\n")
    if ln:
        s.append(f"const INV_K: f32 = 1.0f / {K}.0f;\nconst EPS: f32 = {f32_lit(ln[2])};\n")
    NV = R + (2 if ln else 0)                       # values reduced across the workgroup
    s.append(f"var<workgroup> red: array<f32, {NV * (T if not sub else max(1, -(-T // 4)))}>;\n")
    bi = ("@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
          "@builtin(local_invocation_index) lid: u32")
    if sub:
        bi += (", @builtin(subgroup_invocation_id) sgl: u32, @builtin(subgroup_id) sgid: u32, "
               "@builtin(num_subgroups) nsg: u32")
    s.append(f"@compute @workgroup_size({T})\nfn main({bi}) {{\n")
    groups = -(-N // R)
    s.append(f"    let g = {runtime.WGSL_LINEAR_ID};\n    let n0 = min(g, {_u(groups - 1)}) * {R}u;\n")
    if stack is not None:   # rows of W2 from N1 on (W3 after); a workgroup's R rows lie in one weight (plan)
        s.append("    let seg = " + " + ".join(["0u"] + [f"select(0u, 1u, n0 >= {_u(st)})" for _, _, st in stk]) + ";\n")
        s.append("    let seg2 = seg == 1u;\n")
        for r in range(R):
            s.append(f"    let nr{r} = min(n0 + {r}u, {_u(N - 1)});\n")
            if quant:
                row = K // w_dtype.block_size * w_dtype.block_bytes
                e = f"nr{r}"
                for j, (_, _, st) in enumerate(stk):
                    e = f"select({e}, nr{r} - {_u(st)}, seg == {j + 1}u)"
                s.append(f"    let rb{r} = {e} * {_u(row)};\n")
            else:
                ln_ = K // per
                e = f"{_u(int(w.offset) // per)} + nr{r} * {_u(ln_)}"
                for j, (sw, _, st) in enumerate(stk):
                    e = f"select({e}, {_u(int(sw.offset) // per)} + (nr{r} - {_u(st)}) * {_u(ln_)}, seg == {j + 1}u)"
                s.append(f"    let rb{r} = {e};\n")
    for sg in (segs if stack is None else ()):
        for r in range(R):
            if quant:
                row = sg.K // sg.dtype.block_size * sg.dtype.block_bytes
                s.append(f"    let {sg.rbp}{r} = min(n0 + {r}u, {_u(N - 1)}) * {_u(row)};\n")
            else:
                s.append(f"    let {sg.rbp}{r} = {_u(int(sg.w.offset) // per)} + min(n0 + {r}u, {_u(N - 1)}) * {_u(sg.K // per)};\n")
    # item indices (clamped: a past-the-end item reads a valid one and gets x = 0)
    float_offs = tuple(4 * j for j in range(per // 4))
    ragged_it = set()
    for it in range(ITERS):
        sg = seg_of[it]
        li = it - sg.first
        last = li == sg.iters - 1 and sg.items % T != 0
        s.append(f"    let i{it} = {'min(' if last else ''}{li * T}u + lid{f', {_u(sg.items - 1)})' if last else ''};\n")
        if last:
            ragged_it.add(it)
            s.append(f"    let ok{it} = {li * T}u + lid < {_u(sg.items)};\n")
        s.append(f"    let e{it} = {_subst_u(sg.fmt.e0, f'i{it}') if sg.fmt else f'{per}u * i{it}'};\n")
    # Issue order matters: a GPU warp issues in order and stalls at the first instruction that
    # needs a load still in flight, so every weight load of a chunk of iterations goes out first
    # (raw words for the quant formats, decoded after), then x (and the norm's) loads, then the
    # arithmetic. Chunks bound the registers the raw weights hold.
    raw = any(sg.raw for sg in segs)
    words = max((_RAW[sg.dtype.name][0] for sg in segs if sg.raw), default=0)
    C = max(1, int(TUNING.get("hoist_regs", 48)) // max(1, R * words)) if raw else ITERS
    for r in range(R):
        s.append(f"    var a{r} = vec4<f32>(0.0);\n")
        if quant:
            s.append(f"    var c{r} = 0.0;\n")
    x0 = int(x.offset)
    for c0 in range(0, ITERS, C):
        its = range(c0, min(ITERS, c0 + C))
        if raw and stack is not None:   # one uniform branch picks the weight for the whole chunk
            st = _raw_struct(w_dtype)
            s.append("".join(f"    var w{r}_{it}: {st};\n" for it in its for r in range(R)))
            brs = [(f"    if (seg == {j - 1}u) {{\n" if j == len(stk) + 1 else f"    }} else if (seg == {j - 1}u) {{\n", f"_{j}")
                   for j in range(len(stk) + 1, 1, -1)] + [("    } else {\n", "")]
            for br, sfx in brs:
                s.append(br + "".join(f"        w{r}_{it} = ldr_{w_dtype.name}{sfx}(rb{r}, i{it});\n" for it in its for r in range(R)))
            s.append("    }\n")
        elif raw:
            for it in its:
                sg = seg_of[it]
                for r in range(R if sg.raw else 0):
                    s.append(f"    let w{r}_{it} = ldr_{sg.dtype.name}{sg.sfx}({sg.rbp}{r}, i{it});\n")
        if rms and c0 == 0:   # RMSNorm: no shift, no constants; only the sum of squares is used
            s.append("    var s1 = 0.0;\n    var s2 = 0.0;\n")
        if ln and not rms and c0 == 0:   # the shift: mean of the first 4 values (same in every invocation): |mean - shift| ~ std
            s.append(f"    let cshift = dot(xv_at4({_u(x0)}), vec4<f32>(0.25));\n    var s1 = 0.0;\n    var s2 = 0.0;\n")
            s.append(f"    let bcn = min(n0 + min(lid, {R - 1}u), {_u(N - 1)});\n"
                     f"    let bcB = BC[bcn];\n    let bcC = BC[{_u(N)} + bcn];\n")
        for it in its:
            sg = seg_of[it]
            for j, o in enumerate(sg.fmt.offs if sg.fmt else float_offs):
                xe = f"{'glu4' if glu else sg.xname + '_at4'}({_u(int(sg.x.offset))} + e{it} + {o}u)" \
                    if TUNING.get("probe") != 2 else "vec4<f32>(1.0)"
                s.append(f"    var x{it}_{j} = {xe};\n")
                if ln and (lnw is not None or lnw2 is not None):
                    s.append(_norm_weight4(f"gw{it}_{j}", f"e{it} + {o}u", lnw, ln[0], lnw2, stack[1] if stack else None,
                                           stack is not None and not rms))
        for it in its:
            fmt = seg_of[it].fmt
            for j, o in enumerate(fmt.offs if fmt else float_offs):
                v = f"x{it}_{j}"
                if ln and not rms:
                    s.append(f"    {v} -= vec4<f32>(cshift);\n")
                if it in ragged_it:
                    s.append(f"    {v} = select(vec4<f32>(0.0), {v}, ok{it});\n")
                if ln:
                    s.append(f"    s1 += dot({v}, vec4<f32>(1.0));\n    s2 += dot({v}, {v});\n")
                    if lnw is not None or lnw2 is not None:
                        s.append(f"    {v} *= gw{it}_{j};\n")
            if fmt and fmt.has_c:
                s.append(f"    let sx{it} = vec4<f32>(" + ", ".join(f"dot(x{it}_{j}, vec4<f32>(1.0))" for j in range(4)) + ");\n")
        for it in its:
            sg = seg_of[it]
            for r in range(R):
                w_ = f"w{r}_{it}"
                rb_ = f"{sg.rbp}{r}"
                if sg.raw and TUNING.get("probe") == 1:   # loads only (a diagnostic: what the reads cost)
                    z = " ^ ".join(f"{w_}.{f}" for f in _RAW_FIELDS[sg.dtype.name])
                    s.append(f"    a{r} += vec4<f32>(bitcast<f32>(({z}) & 0x3fffffu | 0x3f800000u));\n")
                elif quant:
                    q = f"q{r}_{it}"
                    if stack is not None and not sg.raw:   # the unit of W, W2 or W3 (a uniform branch)
                        s.append(f"    var {q}: QU;\n" + _seg_branch(len(stk), lambda sfx: f"{q} = unit{sfx}({rb_}, i{it});"))
                    else:
                        s.append(f"    let {q} = {f'unr_{sg.dtype.name}({w_}, {rb_}, i{it})' if sg.raw else f'unit{sg.sfx}({rb_}, i{it})'};\n")
                    t = f"vec4<f32>(dot({q}.v0, x{it}_0), dot({q}.v1, x{it}_1), dot({q}.v2, x{it}_2), dot({q}.v3, x{it}_3))"
                    s.append(f"    a{r} = fma({q}.a, {t}, a{r});\n")
                    if sg.fmt.has_c:
                        s.append(f"    c{r} += dot({q}.c, sx{it});\n")
                else:
                    if stack is not None:
                        s.append(f"    var {w_}: {vt};\n" + _seg_branch(
                            len(stk), lambda sfx: f"{w_} = W{sfx.lstrip('_')}[{rb_} + i{it}];"))
                    else:
                        s.append(f"    let {w_} = {sg.wname}[{rb_} + i{it}];\n")
                    if w_dtype is dtypes.float16:
                        s.append(f"    a{r} = fma(up4({w_}.xy), x{it}_0, fma(up4({w_}.zw), x{it}_1, a{r}));\n")
                    else:
                        s.append(f"    a{r} = fma({w_}, x{it}_0, a{r});\n")
    vals = [f"dot(a{r}, vec4<f32>(1.0)){f' + c{r}' if quant else ''}" for r in range(R)]
    if ln:
        vals += ["s1", "s2"]
    for k, v in enumerate(vals):
        s.append(f"    let t{k} = {v};\n")
    if sub:
        for k in range(NV):
            s.append(f"    let u{k} = subgroupAdd(t{k});\n")
        s.append("    if (sgl == 0u) {\n")
        for k in range(NV):
            s.append(f"        red[sgid * {NV}u + {k}u] = u{k};\n")
        s.append("    }\n    workgroupBarrier();\n")
        tot = lambda k: f"tot(nsg, {k}u)"   # noqa: E731
        s.append(f"    if (lid < {R}u) {{\n        let v = tot(nsg, lid);\n")
        fn_tot = (f"fn tot(nsg: u32, k: u32) -> f32 {{ var v = 0.0; "
                  f"for (var j = 0u; j < nsg; j++) {{ v += red[j * {NV}u + k]; }} return v; }}\n")
    else:
        for k in range(NV):
            s.append(f"    red[{k * T}u + lid] = t{k};\n")
        s.append(f"    for (var h = {T // 2}u; h > 0u; h >>= 1u) {{\n        workgroupBarrier();\n        if (lid < h) {{\n")
        for k in range(NV):
            s.append(f"            red[{k * T}u + lid] += red[{k * T}u + lid + h];\n")
        s.append("        }\n    }\n    workgroupBarrier();\n")
        tot = lambda k: f"red[{k * T}u]"   # noqa: E731
        s.append(f"    if (lid < {R}u) {{\n        let v = red[lid * {T}u];\n")
        fn_tot = ""
    s.append(f"        let n = min(g, {_u(groups - 1)}) * {R}u + lid;\n")
    if rms:
        s.append(f"        let rstd = inverseSqrt({tot(R + 1)} * INV_K + EPS);\n        let y = rstd * v;\n")
    elif ln:
        s.append(f"        let dm = {tot(R)} * INV_K;\n"
                 f"        let rstd = inverseSqrt(max({tot(R + 1)} * INV_K - dm * dm, 0.0) + EPS);\n"
                 f"        let y = rstd * (v - dm * bcB) + bcC;\n")
    else:
        s.append("        let y = v;\n")
    s.append(f"        if (n < {_u(N)} && g < {_u(groups)}) {{ OUT[{_u(out_off)} + n] = epilogue(y, n); }}\n    }}\n}}\n")
    binds = [(out, "rw"), (x.buffer, "read"), (wbuf, "read")]
    binds += [(sb, "read") for _, sb, _ in stk]
    if pair is not None:
        binds += [(segs[1].x.buffer, "read"), (segs[1].wbuf, "read")]
    if ln:
        binds += [(ln[0].buffer, "read")] if ln[0] is not None else []
        binds += [(lnw2.op.buffer, "read")] if lnw2 is not None else []
        binds += [(bc, "read")] if not rms else []
    binds += epilogue_bindings(ep)
    s.insert(1, fn_tot)
    return "".join(s), runtime.grid_for(groups), binds


# Quant formats whose 16-element unit is split into raw word loads (ldr_*) and a decode (unr_*):
# (u32 words held per unit, WGSL). Other formats decode with quant.py's unit() where it is used.
_RAW = {
    "q8_0": (6, """
struct RQ8 { dw: u32, q: vec4<u32>, q4: u32 }
fn ldr_q8_0(rb: u32, u: u32) -> RQ8 {
    let bb = rb + 34u * (u >> 1u);
    let i = (bb + 2u + 16u * (u & 1u)) >> 2u;
    return RQ8(W[bb >> 2u], vec4<u32>(W[i], W[i + 1u], W[i + 2u], W[i + 3u]), W[i + 4u]);
}
fn unr_q8_0(r: RQ8, rb: u32, u: u32) -> QU {
    let bb = rb + 34u * (u >> 1u);
    let d = unpack2x16float(r.dw >> ((bb & 2u) << 3u)).x;
    let w = r.q;
    let sh = vec4<u32>((w.x >> 16u) | (w.y << 16u), (w.y >> 16u) | (w.z << 16u), (w.z >> 16u) | (w.w << 16u), (w.w >> 16u) | (r.q4 << 16u));
    return qu_q8_0(d, select(w, sh, ((bb + 2u) & 2u) != 0u));
}
"""),
    "q4_k": (6, """
struct RQ4K { h: vec4<u32>, q: vec2<u32> }
fn ldr_q4_k(rb: u32, u: u32) -> RQ4K {
    let wi = (rb + 144u * (u >> 4u)) >> 2u;
    let k = wi + 4u + 8u * ((u >> 2u) & 3u) + 2u * (u & 3u);
    return RQ4K(vec4<u32>(W[wi], W[wi + 1u], W[wi + 2u], W[wi + 3u]), vec2<u32>(W[k], W[k + 1u]));
}
fn unr_q4_k(r: RQ4K, rb: u32, u: u32) -> QU {
    return qu_q4_k(unpack2x16float(r.h.x), scmin2(r.h.y, r.h.z, r.h.w, (u >> 2u) & 3u), r.q.x, r.q.y);
}
"""),
    "q6_k": (9, """
struct RQ6 { ql: vec3<u32>, qh: vec3<u32>, dw: u32, sa: u32, sb: u32 }
fn ldr_q6_k(rb: u32, u: u32) -> RQ6 {
    let bb = rb + 210u * (u >> 4u);
    let h = (u >> 3u) & 1u; let i = u & 7u;
    let l = (bb + 64u * h + 8u * i) >> 2u;
    let q = (bb + 128u + 32u * h + 8u * (i & 3u)) >> 2u;
    let sc = bb + 192u + 8u * h + (i >> 1u);
    return RQ6(vec3<u32>(W[l], W[l + 1u], W[l + 2u]), vec3<u32>(W[q], W[q + 1u], W[q + 2u]), W[(bb + 208u) >> 2u],
               W[sc >> 2u], W[(sc + 4u) >> 2u]);
}
fn unr_q6_k(r: RQ6, rb: u32, u: u32) -> QU {
    let bb = rb + 210u * (u >> 4u);
    let h = (u >> 3u) & 1u; let i = u & 7u;
    let odd = (bb & 2u) != 0u;   // ql, qh and d sit at bb plus multiples of 4: bb's alignment
    let ql = words2(r.ql, odd);
    let qh = words2(r.qh, odd);
    let d = unpack2x16float(r.dw >> (((bb + 208u) & 2u) << 3u)).x;
    let sc = bb + 192u + 8u * h + (i >> 1u);
    return qu_q6_k(ql, qh, i, d * sext8((r.sa >> ((sc & 3u) << 3u)) & 0xffu), d * sext8((r.sb >> (((sc + 4u) & 3u) << 3u)) & 0xffu));
}
"""),
    "q4_0": (4, """
struct RQ4 { dw: u32, q: vec3<u32> }
fn ldr_q4_0(rb: u32, u: u32) -> RQ4 {
    let bb = rb + 18u * (u >> 1u);
    let i = (bb + 2u + 8u * (u & 1u)) >> 2u;
    return RQ4(W[bb >> 2u], vec3<u32>(W[i], W[i + 1u], W[i + 2u]));
}
fn unr_q4_0(r: RQ4, rb: u32, u: u32) -> QU {
    let bb = rb + 18u * (u >> 1u);
    let d = unpack2x16float(r.dw >> ((bb & 2u) << 3u)).x;
    return qu_q4_0(d, words2(r.q, ((bb + 2u) & 2u) != 0u));
}
"""),
}


# the u32 fields of each raw struct (TUNING["probe"] = 1 folds them instead of decoding)
_RAW_FIELDS = {"q8_0": ("dw", "q.x", "q.y", "q.z", "q.w", "q4"), "q4_0": ("dw", "q.x", "q.y", "q.z"),
               "q4_k": ("h.x", "h.y", "h.z", "h.w", "q.x", "q.y"),
               "q6_k": ("ql.x", "ql.y", "ql.z", "qh.x", "qh.y", "qh.z", "dw", "sa", "sb")}


def _raw_struct(dt) -> str:
    """The struct a format's raw load function returns (its _RAW row)."""
    import re
    return re.search(r"struct (\w+)", _RAW[dt.name][1]).group(1)


def _reading_copy(wgsl: str, arr: str, arr2: str, sfx: str) -> str:
    """The functions of `wgsl` that read the storage array `arr` (directly or through another
    such function), renamed with `sfx` and reading `arr2` instead: the helpers of a second
    weight binding."""
    import re
    names = _items(wgsl)
    reads = _readers(names, arr)
    out = []
    for n, b in names.items():
        if n in reads:
            b = re.sub(rf"\b{arr}\[", f"{arr2}[", b)
            for m in reads:
                b = re.sub(rf"\b{m}\(", f"{m}{sfx}(", b)
            out.append(b)
    return "".join(out)


def _readers(items: dict, arr: str) -> set:
    """Names of the items that read the storage array `arr`, directly or by calling one that does."""
    import re
    reads = {n for n, b in items.items() if re.search(rf"\b{arr}\[", b)}
    grew = True
    while grew:
        more = {n for n, b in items.items() if n not in reads and any(re.search(rf"\b{m}\(", b) for m in reads)}
        reads |= more
        grew = bool(more)
    return reads


def _items(wgsl: str) -> dict:
    """Top-level items of generated WGSL by name: `fn` blocks (one line, or up to a closing `}`
    at column 0), one-line `struct`s and `const`s."""
    import re
    items, cur = {}, None
    for line in wgsl.splitlines(keepends=True):
        if cur is not None:
            cur.append(line)
            if line.startswith("}"):
                items[re.match(r"fn (\w+)", cur[0]).group(1)] = "".join(cur)
                cur = None
        elif line.startswith("fn "):
            if line.rstrip().endswith("}") and line.count("{") == line.count("}"):
                items[re.match(r"fn (\w+)", line).group(1)] = line
            else:
                cur = [line]
        elif line.startswith(("struct ", "const ")):
            items[re.match(r"(?:struct|const) (\w+)", line).group(1)] = line
    return items


def _missing_items(wgsl: str, have: str, arr: str) -> str:
    """The items of `wgsl` that do not read the storage array `arr` and that `have` does not
    define: what a second weight format needs beside the first one's helpers (its readers come
    renamed from `_reading_copy`)."""
    own, there = _items(wgsl), _items(have)
    reads = _readers(own, arr)
    return "".join(b for n, b in own.items() if n not in reads and n not in there)


def _seg_branch(n_extra: int, stmt) -> str:
    """`stmt(suffix)` for the weight the workgroup's rows lie in (seg 0: W, "", 1: W2, "_2", ...)."""
    s = "    "
    for j in range(n_extra, 0, -1):
        s += f"if (seg == {j}u) {{ {stmt(f'_{j + 1}')} }} else "
    return s + f"{{ {stmt('')} }}\n"


def _norm_weight4(name: str, e: str, rd1, op1, rd2=None, op2=None, stacked: bool = False) -> str:
    """`let name` = the norm weight at elements e .. e+3: the first block's (rd1), or with a stack
    (seg2) the second block's (rd2); 1 where a block has none. One uniform branch, one load."""
    if not stacked:
        return f"    let {name} = {_param4(rd1, op1, e)};\n"
    one = "vec4<f32>(1.0)"
    a = _param4(rd1, op1, e) if rd1 is not None else one
    b = _param4(rd2, op2, e) if rd2 is not None else one
    return f"    var {name}: vec4<f32>;\n    if (seg2) {{ {name} = {b}; }} else {{ {name} = {a}; }}\n"


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
