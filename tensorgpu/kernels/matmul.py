"""Float matmul and GEMV: out[*batch, M, N] (float32, contiguous) = a[*batch, M, K] @ b[*batch, K, N].

Three paths, picked by `plan()` from shapes, strides, dtypes and device features:

  gemv_k   M <= TUNING['gemv_max_m'] (4) and b's K axis is the fast one (the `x @ w.T` decode case, w stored
           [N, K]): a workgroup owns COLS output columns and its threads stride along K with
           vector loads (vec4 f32, 8 f16 as one vec4<u32>), then reduce across the workgroup
           (subgroupAdd + a few shared slots, or a shared-memory tree without subgroups).
           Decode is weight-bandwidth bound, so the point is to stream each weight byte once at
           full width; the activation rows are tiny and stay in cache.
  gemv_n   M <= TUNING['gemv_max_m'] and b's N axis is the fast one (x @ w with w stored [K, N], attention's
           p @ v): adjacent threads own adjacent columns (coalesced), K split across thread rows.
  tiled    everything else: an output tile per workgroup, 128 or 64 rows (prefill: 8x8 .. 4x4
           outputs per thread, 256 threads) or 32 or 16 rows (batched decode: 4x8 .. 2x4 per
           thread, 128 threads) by 128 or 64 columns, picked with a split-K factor by a cost
           model (`_tiled_config`); K in steps of 16 (32 for the 16/32-row tiles) staged through
           shared memory with the next step's global loads prefetched into registers. Each
           operand's tile load is specialised to its layout: vec4 along K (row-major a, `w.T`
           b), vec4 along M/N (transposed a, row-major b) or scalar strided reads for anything
           else. No copy is ever made.
           quant.py's prefill runs through it too, with a b binding that decodes GGUF blocks.
  naive    one thread per output; used for K == 0 (the epilogue of 0) and tiny problems.

Where GEMV stops (TUNING["gemv_max_m"]; quant.TUNING["gemv_max_m"] for GGUF weights). A GEMV
reads each weight once, but every workgroup re-reads all M activation rows for its few columns
(gemv_k: M x K floats per column at M >= 8, i.e. 16-32x the weight bytes from L1/L2 at M = 16)
and each thread keeps cols x M accumulators, so its loads per FMA grow with M; quant's GEMV
decodes each weight unit once per 4-row chunk (4x at M = 16, 16x at M = 64). Raising its reach
(8-row chunks, more rows per pass) costs registers: the H200 sweep of 2026-12-03 measured 36-38 ms
for a B = 64 q4_0 step through GEMV against 16-17 ms tiled. The tiled kernel stages the rows once
per workgroup in shared memory and reuses each weight element for TM rows from registers; with
16-row tiles M = 16 no longer pays for 64 rows: in the H200 small-M sweep they beat the float
GEMV at M = 16 by 1.02-1.6x (hence gemv_max_m 4) and quant's within -4%..+40% (8 there);
benchmarks/bench_matmul.py's small-M sweep (M = 8 and 16: "gemv" against the tiles) re-decides
both knobs.

Strides are element strides of any sign (0 for a broadcast batch); offsets and strides are baked
into the WGSL as u32 constants and all index arithmetic wraps modulo 2**32, so a negative stride
is just a large constant. The pipeline cache is keyed by source, so one layout of one shape
compiles once -- and a new (shape, strides, offsets, dtypes) compiles a new pipeline (tens of ms
on an H100 for the tiled kernel): keep per-token-varying lengths out of matmul operands.

Bindings: 0 = out (rw), 1 = a, 2 = b (a and b share binding 1 when they view one buffer, e.g. q and
k of a fused qkv), then the epilogue's operands. Module-scope names `mm_*`, `ld_mm_*`, `ld4_mm_*`,
`ld8_mm_*` and `epilogue` belong to this module; an epilogue may bring `enable` directives (they
are hoisted to the top). Each binding must fit max_storage_buffer_binding_size (no splitting).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from .. import dtypes, runtime
from ..runtime import Buffer
from .common import NoEpilogue, Operand, epilogue_bindings

GEMV_MAX_M = 4          # default of TUNING["gemv_max_m"] (M = 16: the tiled planner wins on the H200, RESULTS.md)

# Knobs the benchmarks sweep; plan() reads them at every call (values are chosen for H100-like
# GPUs from H100-FACTS.md: 256-thread GEMV workgroups, 128x128 tiles with 8x8 per thread).
TUNING = {
    "gemv_max_m": GEMV_MAX_M,  # up to this many rows use GEMV (decode / small speculative batches)
    "gemv_cols": None,      # columns per GEMV workgroup; None: by M and weight dtype
    "gemv_threads": None,   # GEMV workgroup size; None: by K
    "tile": None,           # 128 or 64: force a square tile (no split-K unless split_k); None: chosen
    "tile128_min_wgs": 128,
    "tile_mn": None,        # (TM, TN) in {16, 32, 64, 128} x {64, 128}: force the tiled kernel's output tile
    "tile_candidates": None,  # the tiles the cost model chooses among, e.g. ((16, 128),); None: every tile_eff one
    "small_tile_max_m": 64,   # the 16/32-row tiles are chosen for up to this many rows (M) only
    "tile_blocks": None,    # ((TM, TN), (RM, RN)), ...: a register block other than TILE_BLOCKS' for a tile
    # the cost model's FMA rate of each tile relative to 128x128 (_tiled_config says where from)
    "tile_eff": ((128, 128, 1.0), (128, 64, 0.9), (64, 128, 0.9), (64, 64, 0.6),
                 (32, 128, 0.55), (32, 64, 0.49), (16, 128, 0.35), (16, 64, 0.32)),
    "split_k": None,        # force a split-K factor (None: chosen with the tile)
    "target_wgs": 256,      # workgroups the tile / split-K choice aims for (about 2 per SM on an H100)
    "split_min_k": 256,     # K elements per split, at least
    "tile_policy": "auto",  # "auto": rectangular tiles + split-K by the cost model; "square": the first policy
    "bk": 16,               # K step of the tiled kernel
    "bk_small": None,       # K step of the 16/32-row tiles (None: bk; 32 halves the steps, unmeasured on a GPU yet)
}

_U32 = 1 << 32


def _u(x: int) -> str:
    """A u32 WGSL literal; negative values wrap (index arithmetic is modulo 2**32)."""
    return f"{int(x) % _U32}u"


# ----------------------------------------------------------------------------- storage access


@dataclass
class _Binding:
    """One bound input buffer and how it is declared: `lanes` elements per array element.

    f32: array<f32> (1) or array<vec4<f32>> (4). f16 with shader-f16: array<f16> (1) or
    array<vec4<f16>> (4). f16 packed: array<u32> (2), array<vec2<u32>> (4), array<vec4<u32>> (8).
    Loads are emitted as small WGSL functions taking an absolute element index."""
    name: str
    dtype: dtypes.DType
    lanes: int
    native_f16: bool

    @property
    def is_f16(self) -> bool:
        return self.dtype is dtypes.float16

    def decl(self, binding: int) -> str:
        if not self.is_f16:
            t = "f32" if self.lanes == 1 else "vec4<f32>"
        elif self.native_f16 and self.lanes in (1, 4):
            t = "f16" if self.lanes == 1 else "vec4<f16>"
        else:
            t = {2: "u32", 4: "vec2<u32>", 8: "vec4<u32>"}[self.lanes]
        return f"@group(0) @binding({binding}) var<storage, read> {self.name}: array<{t}>;\n"

    def _packed(self) -> bool:
        return self.is_f16 and not (self.native_f16 and self.lanes in (1, 4))

    def functions(self) -> str:
        X, L = self.name, self.lanes
        # scalar load
        if not self._packed():
            s = f"{X}[i]" if L == 1 else f"{X}[i >> 2u][i & 3u]"
            s = f"f32({s})" if self.is_f16 else s
        elif L == 2:
            s = f"unpack2x16float({X}[i >> 1u])[i & 1u]"
        elif L == 4:
            s = f"unpack2x16float({X}[i >> 2u][(i >> 1u) & 1u])[i & 1u]"
        else:
            s = f"unpack2x16float({X}[i >> 3u][(i >> 1u) & 3u])[i & 1u]"
        out = f"fn ld_{X}(i: u32) -> f32 {{ return {s}; }}\n"
        # 4 contiguous elements at an index that is a multiple of 4 (only used where aligned)
        if L == 4 and not self._packed():
            v = f"{X}[i >> 2u]"
            v = f"vec4<f32>({v})" if self.is_f16 else v
        elif L == 4:
            v = f"mm_up4({X}[i >> 2u])"
        elif L == 8:
            v = f"mm_up4(select({X}[i >> 3u].xy, {X}[i >> 3u].zw, (i & 4u) != 0u))"
        else:
            v = f"vec4<f32>(ld_{X}(i), ld_{X}(i + 1u), ld_{X}(i + 2u), ld_{X}(i + 3u))"
        out += f"fn ld4_{X}(i: u32) -> vec4<f32> {{ return {v}; }}\n"
        if L == 8:
            out += (f"fn ld8_{X}(i: u32) -> mat2x4<f32> {{ let w = {X}[i >> 3u]; "
                    f"return mat2x4<f32>(mm_up4(w.xy), mm_up4(w.zw)); }}\n")
        return out


_UP4 = "fn mm_up4(w: vec2<u32>) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }\n"


# ----------------------------------------------------------------------------- operand analysis


@dataclass
class _Mat:
    """One operand reduced to what the kernels need: a [nb, R, C] strided matrix view."""
    op: Operand
    rows: int            # M for a, K for b
    cols: int            # K for a, N for b
    srow: int            # element strides (0 where that dim has size 1)
    scol: int
    offset: int
    bstrides: tuple      # strides of the (merged) batch dims

    @property
    def dtype(self):
        return self.op.dtype

    def vec_ok(self, axis: str, width: int) -> bool:
        """Can `width` consecutive elements along `axis` ('row'|'col') be read as one aligned
        vector load at every position the kernels use (multiples of `width` along that axis)?"""
        along, other = (self.srow, self.scol) if axis == "row" else (self.scol, self.srow)
        size = self.rows if axis == "row" else self.cols
        if along != 1 or size % width:
            return False
        if self.offset % width or other % width or any(s % width for s in self.bstrides):
            return False
        buf = self.op.buffer
        # a binding clipped to max_binding_size is not a whole number of vectors
        return buf.capacity <= runtime.get_device().max_binding_size or buf.nbytes % 16 == 0


def _check_float(name: str, op: Operand) -> None:
    if op.dtype not in (dtypes.float32, dtypes.float16):
        raise TypeError(f"matmul: {name} has dtype {op.dtype}; only float32 and float16 are supported "
                        f"(quantized weights go through the quantized GEMV kernels)")
    if len(op.shape) != len(op.strides):
        raise ValueError(f"matmul: {name} has shape {tuple(op.shape)} but strides {tuple(op.strides)}")


def _check_bounds(name: str, op: Operand) -> None:
    """Fail here, naming the view, rather than read another tensor's bytes (or clamp) on the GPU."""
    if any(s == 0 for s in op.shape):
        return
    lo = op.offset + sum(min(0, (n - 1) * s) for n, s in zip(op.shape, op.strides))
    hi = op.offset + sum(max(0, (n - 1) * s) for n, s in zip(op.shape, op.strides))
    cap = int(op.buffer.nbytes // op.dtype.gpu_itemsize)
    if lo < 0 or hi >= cap:
        raise ValueError(f"matmul: {name} view (shape {tuple(op.shape)}, strides {tuple(op.strides)}, "
                         f"offset {op.offset}) reaches elements [{lo}, {hi}] of a buffer holding {cap} "
                         f"{op.dtype.name} elements")


def _stride(n: int, s) -> int:
    """An operand's element stride along a dim of size n: a size-1 dim never advances, so stride 0
    keeps it out of the alignment checks."""
    return 0 if n == 1 else int(s)


def _mat2d(op: Operand, rows: int, cols: int) -> "_Mat":
    """An unbatched [rows, cols] operand (the stacked and K-concatenated plans' parts)."""
    return _Mat(op, rows, cols, _stride(rows, op.strides[0]), _stride(cols, op.strides[1]), int(op.offset), ())


def _merge_batch(shape: tuple, sa: tuple, sb: tuple):
    """Drop size-1 batch dims and merge adjacent ones that are contiguous in both operands (the
    output is contiguous), so a kernel does as few div/mods per workgroup as possible."""
    dims = [(n, x, y) for n, x, y in zip(shape, sa, sb) if n != 1]
    merged: list = []
    for n, x, y in dims:
        if merged:
            pn, px, py = merged[-1]
            if px == x * n and py == y * n:
                merged[-1] = (pn * n, x, y)
                continue
        merged.append((n, x, y))
    return merged


def _batch_code(dims, var: str = "bi") -> tuple:
    """WGSL computing the a and b element offsets of batch index `var`."""
    if not dims:
        return "", "0u", "0u"
    if len(dims) == 1:
        _, x, y = dims[0]
        return "", f"{var} * {_u(x)}", f"{var} * {_u(y)}"
    lines = [f"    var br = {var};\n", "    var boa = 0u;\n", "    var bob = 0u;\n"]
    for n, x, y in reversed(dims):
        lines.append(f"    {{ let j = br % {_u(n)}; br = br / {_u(n)}; boa += j * {_u(x)}; bob += j * {_u(y)}; }}\n")
    return "".join(lines), "boa", "bob"


# ----------------------------------------------------------------------------- the plan


@dataclass
class Launch:
    """What `matmul` dispatches; returned by `plan` so tests and benchmarks can see the choice."""
    kind: str                  # "gemv_k", "gemv_n", "tiled", "naive", "empty"
    name: str
    wgsl: str = ""
    bindings: list = field(default_factory=list)
    grid: tuple = (0, 0, 0)
    info: dict = field(default_factory=dict)
    extra: list = field(default_factory=list)   # follow-up dispatches (name, wgsl, bindings, grid): split-K reduction

    @property
    def passes(self) -> list:
        """Every dispatch (name, wgsl, bindings, grid) in queue order: the kernel, then `extra`."""
        return [] if self.kind == "empty" else [(self.name, self.wgsl, self.bindings, self.grid)] + list(self.extra)


def matmul(out: Buffer, a: Operand, b: Operand, epilogue=None) -> None:
    """Queue out = epilogue(a @ b): a [*batch, M, K], b [*batch, K, N] (identical batch shapes; the
    caller broadcasts with stride 0), float32/float16 each, any strides and offsets; out is a
    contiguous float32 [*batch, M, N]. Accumulates in f32."""
    for name, wgsl, bindings, grid in plan(out, a, b, epilogue).passes:
        runtime.dispatch(name, wgsl, bindings, grid)


def plan(out: Buffer, a: Operand, b: Operand, epilogue=None, force: Optional[str] = None,
         b_binding: Optional["_Binding"] = None, b_parts: Optional[list] = None,
         k_parts: Optional[list] = None) -> Launch:
    """Validate, pick a path and generate its WGSL. `force` ("gemv_k", "gemv_n", "tiled", "naive",
    "coop") overrides the choice (tests use it to cover every path on every shape); "tiled" still
    goes to the tensor cores where matmul_coop.eligible says so (matmul_coop.TUNING["enabled"] =
    False keeps the WGSL tiles).

    `b_binding` (tiled path only) replaces b's storage declaration and loads, so b may be a
    non-float dtype the binding decodes (quant.py's GGUF weights): the planner, split-K and
    epilogue handling are then shared with the float path.

    `b_parts` (tiled path only, no batch dims): more right operands [K, N_j] stacked after b
    along N, each in its own buffer, as [(Operand, binding or None)]: out = a @ [b | b_1 | ...]
    in one dispatch (LLaMA's q, k and v projections of one x: rewrites.stack_sibling_matmuls).
    b's and every part's columns but the last are a multiple of 128, so an output tile never
    straddles two of them; a workgroup loads its b tiles from the one its columns lie in.

    `k_parts` (tiled path only, no batch dims): more (a_j [M, K_j], b_j [K_j, N], binding or None)
    products added in the same dispatch, out = a @ b + a_1 @ b_1 + ... as ONE matmul over the
    concatenated K (GPT-NeoX's attention output and MLP down projections of a prompt or a batch,
    whose sum is the residual: rewrites.pair_matmuls_in_sum). Every K_j but the last is a
    multiple of 64, so a K step never straddles two parts."""
    ep = epilogue if epilogue is not None else NoEpilogue()
    if b_parts and k_parts:
        raise ValueError("matmul: b_parts (along N) and k_parts (along K) do not combine")
    if b_parts:
        return _plan_parts(out, a, b, list(b_parts), ep, force, b_binding)
    if k_parts:
        return _plan_kparts(out, a, b, list(k_parts), ep, force, b_binding)
    _check_float("a", a)
    if b_binding is None:
        _check_float("b", b)
    elif force not in ("tiled", "coop"):
        raise ValueError("matmul: a b_binding needs force='tiled' (or 'coop')")
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ValueError(f"matmul needs a [*batch, M, K] and b [*batch, K, N]; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if tuple(a.shape[:-2]) != tuple(b.shape[:-2]) or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match "
                         f"(batch dims must be identical, a's last dim must equal b's second-to-last)")
    batch = tuple(int(x) for x in a.shape[:-2])
    M, K = int(a.shape[-2]), int(a.shape[-1])
    N = int(b.shape[-1])
    nb = math.prod(batch)
    numel = nb * M * N
    if out.nbytes < numel * 4:
        raise ValueError(f"matmul: output buffer holds {out.nbytes} bytes, {numel * 4} needed for float32 {batch + (M, N)}")
    in_bufs = [a.buffer, b.buffer] + [o.buffer for o in getattr(ep, "operands", ())]
    if any(buf is out for buf in in_bufs):
        raise ValueError("matmul: the output buffer is also an input (a, b or an epilogue operand); "
                         "a kernel cannot read and write one binding")
    if numel == 0:
        return Launch("empty", "matmul_empty")
    _check_bounds("a", a)
    if b_binding is None:
        _check_bounds("b", b)

    z = _stride
    dims = _merge_batch(batch, tuple(z(n, s) for n, s in zip(batch, a.strides[:-2])),
                        tuple(z(n, s) for n, s in zip(batch, b.strides[:-2])))
    A = _Mat(a, M, K, z(M, a.strides[-2]), z(K, a.strides[-1]), int(a.offset), tuple(d[1] for d in dims))
    B = _Mat(b, K, N, z(K, b.strides[-2]), z(N, b.strides[-1]), int(b.offset), tuple(d[2] for d in dims))
    if a.buffer is b.buffer and a.dtype is not b.dtype:
        raise TypeError(f"matmul: a ({a.dtype}) and b ({b.dtype}) are views of one buffer with different dtypes")

    dev = runtime.get_device()
    kind = force
    if kind is None:
        if K == 0 or (M * N * K <= 4096 and M > TUNING["gemv_max_m"]):
            kind = "naive"
        elif M <= TUNING["gemv_max_m"]:
            kfast = B.srow == 1 or (B.scol != 1 and abs(B.srow) <= abs(B.scol))
            kind = "gemv_k" if kfast else "gemv_n"
        else:
            kind = "tiled"
    ctx = _Ctx(dev, A, B, M, N, K, nb, dims, ep, b_binding)
    inputs = [(A.op.buffer, "read")] + ([] if ctx.aliased else [(B.op.buffer, "read")])
    return _launch(ctx, kind, numel, out, ep, inputs)


def _launch(ctx: "_Ctx", kind: str, numel: int, out: Buffer, ep, inputs: list) -> Launch:
    """The Launch of ctx's kernel of `kind` (generated, or taken from _tiled_cache for a tiled
    one) reading `inputs`: one pass storing into out, or with split-K a pass writing partial sums
    to a scratch buffer and a second pass reducing them (epilogue applied)."""
    if kind == "tiled" and matmul_coop.eligible(ctx):
        kind = "coop"
    elif kind == "coop" and not ctx.dev.has_coopmat:
        raise ValueError("matmul: force='coop' needs an adapter with cooperative matrices (Device.has_coopmat)")
    key = _tiled_key(ctx, kind, numel) if kind in ("tiled", "coop") else None
    hit = _tiled_cache.get(key) if key is not None else None
    if hit is None:
        gen = {"gemv_k": _gen_gemv_k, "gemv_n": _gen_gemv_n, "tiled": _gen_tiled, "naive": _gen_naive,
               "coop": matmul_coop.gen}[kind]
        name, body, grid, info = gen(ctx)
        wgsl = _hoist_enables(ctx.header() + body)
        split = info.get("split", 1)
        red = _splitk_reduce(out, None, numel, split, ep) if split > 1 else None
        if key is not None:
            if len(_tiled_cache) > 512:
                _tiled_cache.clear()
            _tiled_cache[key] = (name, wgsl, grid, info, red)
    else:
        name, wgsl, grid, info, red = hit
    if red is not None:
        part = _scratch_buffer("splitk", info["split"] * numel * 4)
        rname, rsrc, _, rgrid = red
        reduce = (rname, rsrc, [(out, "rw"), (part, "read")] + epilogue_bindings(ep), rgrid)
        return Launch(kind, name, wgsl, [(part, "rw")] + inputs, grid, dict(info), [reduce])
    return Launch(kind, name, wgsl, [(out, "rw")] + inputs + epilogue_bindings(ep), grid, dict(info))


def _hoist_enables(wgsl: str) -> str:
    """WGSL wants every `enable` directive before any declaration: move them up, once each, in
    the order they first appear (the header's f16, an epilogue's, matmul_coop's)."""
    lines = wgsl.splitlines(keepends=True)
    en = [ln.strip() for ln in lines if ln.lstrip().startswith("enable ")]
    if not en:
        return wgsl
    return "".join(e + "\n" for e in dict.fromkeys(en)) + "".join(ln for ln in lines if not ln.lstrip().startswith("enable "))


# Generated tiled kernels by everything their text depends on: re-generating the unrolled
# source costs ~0.1-0.3 ms of Python per call, paid by every matmul of every prefill.
_tiled_cache: dict = {}


def _tiled_key(c: "_Ctx", kind: str, numel: int):
    dev = c.dev

    def mat(m: _Mat):
        buf = m.op.buffer
        whole = buf.capacity <= dev.max_binding_size or buf.nbytes % 16 == 0
        return (m.dtype.name, m.rows, m.cols, m.srow, m.scol, m.offset, m.bstrides, whole)

    try:
        key = (kind, numel, c.M, c.N, c.K, c.nb, tuple(c.dims), mat(c.A), mat(c.B), c.aliased,
               dev.has_f16, dev.has_subgroups, dev.max_workgroup_storage,
               tuple(sorted(TUNING.items())), kind == "coop" and tuple(sorted(matmul_coop.TUNING.items())), c.ep.wgsl(3), c.b_binding and c.b_binding.functions())
        if c.parts:
            key += tuple((mat(pm), start, pb and pb.functions()) for pm, pb, start in c.parts)
        if c.kparts:
            key += ("k",) + tuple((mat(am), mat(bm), start, kb and kb.functions()) for am, bm, kb, start in c.kparts)
        hash(key)
    except TypeError:      # an unhashable knob value: no caching
        return None
    return key


class _Ctx:
    """Shared state of one generation: operands, their binding declarations, epilogue text."""

    def __init__(self, dev, A, B, M, N, K, nb, dims, ep, b_binding=None, parts=(), kparts=()):
        self.dev, self.A, self.B, self.M, self.N, self.K, self.nb, self.dims, self.ep = dev, A, B, M, N, K, nb, dims, ep
        self.b_binding = b_binding
        self.lanes = {"a": 1, "b": 1}
        self.out_vec = False
        # stacked right operands after B (plan's b_parts): [(_Mat, binding or None, first column)]
        self.parts = list(parts)
        # more (a, b) pairs after A and B along K (plan's k_parts): [(A_j, B_j, b binding or None, first k)]
        self.kparts = list(kparts)

    def want(self, which: str, lanes: int) -> None:
        self.lanes[which] = lanes

    def _bindings(self):
        f16n = self.dev.has_f16
        A, B = self.A, self.B

        def base(m):
            return 2 if (m.dtype is dtypes.float16 and not f16n) else 1

        la, lb = max(self.lanes["a"], base(A)), max(self.lanes["b"], base(B))
        if A.op.buffer is B.op.buffer:
            lanes = la if la == lb else base(A)
            one = _Binding("mm_ab", A.dtype, lanes, f16n)
            return [one], one, one
        ba = _Binding("mm_a", A.dtype, la, f16n)
        bb = self.b_binding or _Binding("mm_b", B.dtype, lb, f16n)
        more = [pb or _Binding(f"mm_b{j + 1}", pm.dtype, lb, f16n) for j, (pm, pb, _) in enumerate(self.parts)]
        for j, (am, bm, kb, _) in enumerate(self.kparts):
            more += [_Binding(f"mm_a{j + 1}", am.dtype, max(self.lanes["a"], base(am)), f16n),
                     kb or _Binding(f"mm_b{j + 1}", bm.dtype, max(self.lanes["b"], base(bm)), f16n)]
        return [ba, bb] + more, ba, bb

    def part_bindings(self) -> list:
        """The bindings of B and of each stacked part after it, in column order."""
        return self._bindings()[0][1:] if self.parts else [self.bind_b]

    @property
    def bind_a(self) -> _Binding:
        return self._bindings()[1]

    @property
    def bind_b(self) -> _Binding:
        return self._bindings()[2]

    @property
    def aliased(self) -> bool:
        return self.A.op.buffer is self.B.op.buffer

    def can_vec(self, which: str, axis: str, width: int) -> bool:
        m = self.A if which == "a" else self.B
        return m.vec_ok(axis, width)

    def input_bindings(self) -> list:
        binds = self._bindings()[0]
        return ([(self.A.op.buffer, "read")] + ([(self.B.op.buffer, "read")] if len(binds) >= 2 else [])
                + [(pm.op.buffer, "read") for pm, _, _ in self.parts]
                + [(m.op.buffer, "read") for am, bm, _, _ in self.kparts for m in (am, bm)])

    def header(self) -> str:
        """Bindings, the epilogue and the load functions; the `enable` directives in it (f16, an
        epilogue's own) are hoisted to the top of the module by _launch (_hoist_enables)."""
        binds = self._bindings()[0]
        h = "enable f16;\n" if any(bd.is_f16 and not bd._packed() for bd in binds) else ""
        h += f"@group(0) @binding(0) var<storage, read_write> mm_out: array<{'vec4<f32>' if self.out_vec else 'f32'}>;\n"
        for i, bd in enumerate(binds):
            h += bd.decl(1 + i)
        h += self.ep.wgsl(1 + len(binds))
        h += _UP4
        for bd in binds:
            h += bd.functions()
        return h

    def dtag(self) -> str:
        t = {dtypes.float32: "f32", dtypes.float16: "f16"}
        return f"{t[self.A.dtype]}{t.get(self.B.dtype, self.B.dtype.name)}"


_GRID_PRELUDE = """    let g = wid.x + wid.y * nwg.x;
    if (g >= {total}) {{ return; }}
"""


# ----------------------------------------------------------------------------- GEMV, K fast


def _gen_gemv_k(c: _Ctx):
    A, B, M, N, K = c.A, c.B, c.M, c.N, c.K
    wbytes = B.dtype.itemsize
    # vector width along K: 8 f16 (one 16-byte vec4<u32>) or 4, when every column is aligned
    W = 1
    if B.dtype is dtypes.float16 and c.can_vec("b", "row", 8):
        W = 8
    elif c.can_vec("b", "row", 4):
        W = 4
    la = 1
    if W == 8 and A.dtype is dtypes.float16 and c.can_vec("a", "col", 8):
        la = 8
    elif W > 1 and c.can_vec("a", "col", 4):
        la = 4
    if c.aliased and la != W:
        W = la = 1        # one declaration serves both views: plain scalar reads
    c.want("a", la)
    c.want("b", W)
    ba, bb = c.bind_a, c.bind_b
    a_vec = la >= 4
    # columns per workgroup: enough that the f32 activation bytes re-read per workgroup do not
    # outweigh the weight bytes it streams, few enough to keep cols * M accumulators in registers
    cols = TUNING["gemv_cols"] or min(4, max(1, 8 // M), 1 << max(0, math.ceil(math.log2(max(1.0, M * 4 / wbytes)))))
    cols = max(1, min(cols, N))
    nvec = K // W
    threads = TUNING["gemv_threads"] or (256 if nvec >= 1024 else 128 if nvec >= 256 else 64)
    iters = -(-nvec // threads)
    ktail = K - nvec * W
    ngroups = -(-N // cols)
    total = c.nb * ngroups
    sg = c.dev.has_subgroups
    CM = cols * M
    maxsg = threads // 4 if sg else threads

    pre, boa, bob = _batch_code(c.dims)
    s = []
    s.append(f"var<workgroup> mm_part: array<f32, {CM * maxsg}>;\n")
    builtins = ("@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
                "@builtin(local_invocation_index) lid: u32")
    if sg:
        builtins += (", @builtin(subgroup_invocation_id) sgi: u32, @builtin(subgroup_id) sgid: u32, "
                     "@builtin(num_subgroups) nsg: u32")
    s.append(f"@compute @workgroup_size({threads})\nfn main({builtins}) {{\n")
    s.append(_GRID_PRELUDE.format(total=_u(total)))
    s.append(f"    let bi = g / {_u(ngroups)};\n    let n0 = (g % {_u(ngroups)}) * {_u(cols)};\n")
    s.append(pre)
    s.append(f"    let ab = {_u(A.offset)} + {boa};\n    let bb = {_u(B.offset)} + {bob};\n")
    for j in range(cols):
        s.append(f"    let wb{j} = bb + min(n0 + {_u(j)}, {_u(N - 1)}) * {_u(B.scol)};\n")
    for m in range(M):
        s.append(f"    let xb{m} = ab + {_u(m * A.srow)};\n")
    vt = "vec4<f32>" if W > 1 else "f32"
    for j in range(cols):
        for m in range(M):
            s.append(f"    var acc{j}_{m} = {vt}(0.0);\n")
    if nvec:
        s.append(f"    for (var it = 0u; it < {_u(iters)}; it++) {{\n        let kv = it * {_u(threads)} + lid;\n")
        guard = nvec % threads != 0
        if guard:
            s.append(f"        if (kv < {_u(nvec)}) {{\n")
        ind = "            " if guard else "        "
        if W == 1:
            s.append(f"{ind}let k = kv;\n")
            for m in range(M):
                s.append(f"{ind}let x{m} = ld_{ba.name}(xb{m} + k * {_u(A.scol)});\n")
            for j in range(cols):
                s.append(f"{ind}let w{j} = ld_{bb.name}(wb{j} + k * {_u(B.srow)});\n")
                for m in range(M):
                    s.append(f"{ind}acc{j}_{m} = fma(w{j}, x{m}, acc{j}_{m});\n")
        else:
            s.append(f"{ind}let k = kv * {W}u;\n")
            halves = W // 4
            for m in range(M):
                for h in range(halves):
                    if a_vec:
                        s.append(f"{ind}let x{m}_{h} = ld4_{ba.name}(xb{m} + k + {4 * h}u);\n")
                    else:
                        sc = _u(A.scol)
                        idx = f"xb{m} + (k + {4 * h}u) * {sc}"
                        s.append(f"{ind}let xi{m}_{h} = {idx};\n")
                        s.append(f"{ind}let x{m}_{h} = vec4<f32>(ld_{ba.name}(xi{m}_{h}), ld_{ba.name}(xi{m}_{h} + {sc}), "
                                 f"ld_{ba.name}(xi{m}_{h} + {_u(2 * A.scol)}), ld_{ba.name}(xi{m}_{h} + {_u(3 * A.scol)}));\n")
            for j in range(cols):
                if W == 8:
                    s.append(f"{ind}let w{j} = ld8_{bb.name}(wb{j} + k);\n")
                    for m in range(M):
                        s.append(f"{ind}acc{j}_{m} = fma(w{j}[0], x{m}_0, fma(w{j}[1], x{m}_1, acc{j}_{m}));\n")
                else:
                    s.append(f"{ind}let w{j} = ld4_{bb.name}(wb{j} + k);\n")
                    for m in range(M):
                        s.append(f"{ind}acc{j}_{m} = fma(w{j}, x{m}_0, acc{j}_{m});\n")
        if guard:
            s.append("        }\n")
        s.append("    }\n")
    if ktail:  # K % W leftover elements (W > 1 only), one per thread
        s.append(f"    if (lid < {_u(ktail)}) {{\n        let k = {_u(nvec * W)} + lid;\n")
        for m in range(M):
            s.append(f"        let x{m} = ld_{ba.name}(xb{m} + k * {_u(A.scol)});\n")
        for j in range(cols):
            s.append(f"        let w{j} = ld_{bb.name}(wb{j} + k * {_u(B.srow)});\n")
            for m in range(M):
                s.append(f"        acc{j}_{m}.x = fma(w{j}, x{m}, acc{j}_{m}.x);\n")
        s.append("    }\n")
    for j in range(cols):
        for m in range(M):
            v = f"dot(acc{j}_{m}, vec4<f32>(1.0))" if W > 1 else f"acc{j}_{m}"
            s.append(f"    let s{j}_{m} = {v};\n")
    if sg:
        for j in range(cols):
            for m in range(M):
                s.append(f"    let r{j}_{m} = subgroupAdd(s{j}_{m});\n")
        s.append("    if (sgi == 0u) {\n")
        for j in range(cols):
            for m in range(M):
                s.append(f"        mm_part[{(j * M + m) * maxsg}u + sgid] = r{j}_{m};\n")
        s.append("    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {CM}u) {{\n        var t = 0.0;\n"
                 f"        for (var q = 0u; q < nsg; q++) {{ t += mm_part[lid * {maxsg}u + q]; }}\n")
    else:
        for j in range(cols):
            for m in range(M):
                s.append(f"    mm_part[{(j * M + m) * threads}u + lid] = s{j}_{m};\n")
        s.append(f"    for (var h = {threads // 2}u; h > 0u; h >>= 1u) {{\n        workgroupBarrier();\n"
                 f"        if (lid < h) {{\n")
        s.append(f"            for (var q = 0u; q < {CM}u; q++) {{ mm_part[q * {threads}u + lid] += mm_part[q * {threads}u + lid + h]; }}\n")
        s.append("        }\n    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {CM}u) {{\n        let t = mm_part[lid * {threads}u];\n")
    s.append(f"        let n = n0 + lid / {M}u;\n        let m = lid % {M}u;\n"
             f"        if (n < {_u(N)}) {{\n"
             f"            let o = bi * {_u(M * N)} + m * {_u(N)} + n;\n"
             f"            mm_out[o] = epilogue(t, o);\n        }}\n    }}\n}}\n")
    name = f"gemv_k_{c.dtag()}_w{W}_c{cols}_t{threads}_m{M}{'_sg' if sg else ''}"
    info = {"W": W, "cols": cols, "threads": threads, "subgroups": sg}
    return name, "".join(s), runtime.grid_for(total), info


# ----------------------------------------------------------------------------- GEMV, N fast


def _gen_gemv_n(c: _Ctx):
    A, B, M, N, K = c.A, c.B, c.M, c.N, c.K
    ba, bb = c.bind_a, c.bind_b
    tn = 32 if N >= 32 else 1 << max(0, math.ceil(math.log2(N)))
    ks = 256 // tn
    ngroups = -(-N // tn)
    total = c.nb * ngroups
    iters = -(-K // ks)
    pre, boa, bob = _batch_code(c.dims)
    s = [f"var<workgroup> mm_part: array<f32, {M * 256}>;\n",
         "@compute @workgroup_size(256)\nfn main(@builtin(workgroup_id) wid: vec3<u32>, "
         "@builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n",
         _GRID_PRELUDE.format(total=_u(total)),
         f"    let bi = g / {_u(ngroups)};\n    let tn = lid % {tn}u;\n    let ks = lid / {tn}u;\n"
         f"    let n = (g % {_u(ngroups)}) * {tn}u + tn;\n    let nn = min(n, {_u(N - 1)});\n",
         pre,
         f"    let ab = {_u(A.offset)} + {boa};\n    let wb = {_u(B.offset)} + {bob} + nn * {_u(B.scol)};\n"]
    for m in range(M):
        s.append(f"    var acc{m} = 0.0;\n")
    s.append(f"    for (var it = 0u; it < {_u(iters)}; it++) {{\n        let k = it * {ks}u + ks;\n")
    guard = K % ks != 0
    ind = "            " if guard else "        "
    if guard:
        s.append(f"        if (k < {_u(K)}) {{\n")
    s.append(f"{ind}let w = ld_{bb.name}(wb + k * {_u(B.srow)});\n")
    for m in range(M):
        s.append(f"{ind}acc{m} = fma(w, ld_{ba.name}(ab + {_u(m * A.srow)} + k * {_u(A.scol)}), acc{m});\n")
    if guard:
        s.append("        }\n")
    s.append("    }\n")
    for m in range(M):
        s.append(f"    mm_part[{m * 256}u + lid] = acc{m};\n")
    s.append("    workgroupBarrier();\n")
    s.append(f"    if (ks == 0u && n < {_u(N)}) {{\n")
    for m in range(M):
        s.append(f"        {{ var t = 0.0;\n          for (var q = 0u; q < {ks}u; q++) {{ t += mm_part[{m * 256}u + q * {tn}u + tn]; }}\n"
                 f"          let o = bi * {_u(M * N)} + {_u(m * N)} + n;\n          mm_out[o] = epilogue(t, o); }}\n")
    s.append("    }\n}\n")
    name = f"gemv_n_{c.dtag()}_tn{tn}_m{M}"
    return name, "".join(s), runtime.grid_for(total), {"tn": tn, "ks": ks}


# ----------------------------------------------------------------------------- naive


def _gen_naive(c: _Ctx):
    A, B, M, N, K = c.A, c.B, c.M, c.N, c.K
    ba, bb = c.bind_a, c.bind_b
    total = c.nb * M * N
    nwg = -(-total // 64)
    pre, boa, bob = _batch_code(c.dims)
    s = ("@compute @workgroup_size(64)\nfn main(@builtin(workgroup_id) wid: vec3<u32>, "
         "@builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
         "    let o = (wid.x + wid.y * nwg.x) * 64u + lid;\n"
         f"    if (o >= {_u(total)}) {{ return; }}\n"
         f"    let n = o % {_u(N)};\n    let m = (o / {_u(N)}) % {_u(M)};\n    let bi = o / {_u(M * N)};\n"
         + pre +
         f"    let ai = {_u(A.offset)} + {boa} + m * {_u(A.srow)};\n"
         f"    let bj = {_u(B.offset)} + {bob} + n * {_u(B.scol)};\n"
         "    var acc = 0.0;\n"
         f"    for (var k = 0u; k < {_u(K)}; k++) {{\n"
         f"        acc = fma(ld_{ba.name}(ai + k * {_u(A.scol)}), ld_{bb.name}(bj + k * {_u(B.srow)}), acc);\n"
         "    }\n    mm_out[o] = epilogue(acc, o);\n}\n")
    return f"matmul_naive_{c.dtag()}", s, runtime.grid_for(nwg), {}


# ----------------------------------------------------------------------------- tiled


def _k_fastest(m: "_Mat", which: str) -> bool:
    """A scalar tile load's item order: k fastest when k is operand `which`'s smaller stride."""
    sk, st = (m.scol, m.srow) if which == "a" else (m.srow, m.scol)
    return abs(sk) <= abs(st)


def _tile_load(c: _Ctx, which: str, T: int, BK: int, tdim: int, K: int, allow_vec: bool = True,
               threads: int = 256, lanes: int = 4, cast: str = "", tmajor: int = 0, kfast: Optional[bool] = None):
    """Code moving one [BK x T] tile of operand `which` (a: T = M rows; b: T = N cols) from global
    memory into registers (`load`) and from registers into shared memory (`store`), spread over
    the workgroup's `threads` invocations. `cast` names a conversion applied to each value as it
    is stored (matmul_coop's f16 tiles: "f16"). `tmajor` > 0 (with lanes 1): the t-major layout
    S[t * tmajor + k] instead (matmul_coop: a thread's 4 k-consecutive values land side by side).

    Shared layout: S[k * T/L + t/L][t % L] with L = `lanes` (4: vec4 rows along t, so the inner
    loop reads a thread's 4 consecutive m (or n) values as one vec4; 2 or 1 for a's tile when a
    thread owns fewer than 4 rows: vec2 or f32 elements). `kfast` forces the scalar layout's item
    order (k fastest or t fastest; default: along the operand's smaller stride)."""
    m = c.A if which == "a" else c.B
    X = "a" if which == "a" else "b"
    S = "mm_As" if which == "a" else "mm_Bs"
    # strides along k and along t
    if which == "a":
        sk, st, kaxis, taxis = m.scol, m.srow, "col", "row"
    else:
        sk, st, kaxis, taxis = m.srow, m.scol, "row", "col"
    T4 = T // 4
    NT = threads
    cv = (lambda v: f"{cast}({v})") if cast else (lambda v: v)   # noqa: E731
    regs, load, store = [], [], []
    conds = ([f"gt < {_u(tdim)}"] if tdim % T else []) + ([f"gk < {_u(K)}"] if K % BK else [])

    def slot(kexpr: str, t: str = "t") -> str:
        """The shared-memory element of (k, t)."""
        if tmajor:
            return f"{S}[{t} * {tmajor}u + {kexpr}]"
        if lanes == 4:
            return f"{S}[{kexpr} * {T4}u + {t} / 4u][{t} % 4u]"
        if lanes == 2:
            return f"{S}[{kexpr} * {T // 2}u + {t} / 2u][{t} % 2u]"
        return f"{S}[{kexpr} * {T}u + {t}]"

    def guarded(reg: str, zero: str, value: str) -> str:
        """reg = value, behind the tile-edge bounds (gt, gk) when the tile can pass an edge; the
        item's block closes here."""
        if conds:
            return f"          {reg} = {zero};\n          if ({' && '.join(conds)}) {{ {reg} = {value}; }} }}\n"
        return f"          {reg} = {value}; }}\n"

    if allow_vec and c.can_vec(which, kaxis, 4):
        mode = "vk"
        c.want(which, 4)
        per = BK // 4                       # vec4s per tile row
        count = T * per
        R = -(-count // NT)
        for r in range(R):
            regs.append(f"    var r{X}{r} = vec4<f32>(0.0);\n")
            load.append(f"        {{ let e = lid + {NT * r}u; let t = e / {per}u; let kv = e % {per}u;\n"
                        f"          let gt = {X}t0 + t; let gk = k0 + kv * 4u;\n")
            load.append(guarded(f"r{X}{r}", "vec4<f32>(0.0)", f"ld4_{{B}}({X}base + gt * {_u(st)} + gk)"))
            store.append(f"        {{ let e = lid + {NT * r}u; let t = e / {per}u; let kv = e % {per}u;\n")
            for j in range(4):
                store.append(f"          {slot(f'(kv * 4u + {j}u)')} = {cv(f'r{X}{r}[{j}]')};\n")
            store.append("        }\n")
    elif allow_vec and c.can_vec(which, taxis, 4):
        mode = "vt"
        c.want(which, 4)
        count = BK * T4
        R = -(-count // NT)
        for r in range(R):
            regs.append(f"    var r{X}{r} = vec4<f32>(0.0);\n")
            load.append(f"        {{ let e = lid + {NT * r}u; let kk = e / {T4}u; let tv = e % {T4}u;\n"
                        f"          let gt = {X}t0 + tv * 4u; let gk = k0 + kk;\n")
            load.append(guarded(f"r{X}{r}", "vec4<f32>(0.0)", f"ld4_{{B}}({X}base + gk * {_u(sk)} + gt)"))
            if tmajor:
                parts = " ".join(f"{slot('kk', f'(tv * 4u + {q}u)')} = {cv(f'r{X}{r}[{q}]')};" for q in range(4))
                store.append(f"        {{ let e = lid + {NT * r}u; let kk = e / {T4}u; let tv = e % {T4}u; {parts} }}\n")
            elif lanes == 4:
                store.append(f"        {{ let e = lid + {NT * r}u; {S}[(e / {T4}u) * {T4}u + e % {T4}u] = r{X}{r}; }}\n")
            else:   # 4 consecutive t as 2 vec2 (or 4 f32) elements
                w = 4 // lanes
                parts = " ".join(f"{S}[(e / {T4}u) * {T // lanes}u + (e % {T4}u) * {w}u + {q}u] = "
                                 f"{cv(f'r{X}{r}' + ('.' + ('xy', 'zw')[q] if lanes == 2 else f'[{q}]'))};"
                                 for q in range(w))
                store.append(f"        {{ let e = lid + {NT * r}u; {parts} }}\n")
    else:
        mode = "s"
        count = BK * T
        R = -(-count // NT)
        kfast = _k_fastest(m, which) if kfast is None else kfast
        for r in range(R):
            regs.append(f"    var r{X}{r} = 0.0;\n")
            if kfast:
                idx = f"let e = lid + {NT * r}u; let kk = e % {BK}u; let t = e / {BK}u;"
            else:
                idx = f"let e = lid + {NT * r}u; let t = e % {T}u; let kk = e / {T}u;"
            load.append(f"        {{ {idx}\n          let gt = {X}t0 + t; let gk = k0 + kk;\n")
            load.append(guarded(f"r{X}{r}", "0.0", f"ld_{{B}}({X}base + gt * {_u(st)} + gk * {_u(sk)})"))
            store.append(f"        {{ {idx} {slot('kk')} = {cv(f'r{X}{r}')}; }}\n")
    if count % NT:
        # the last item of each thread exists only for the first count % NT threads
        guard = f"if (lid + {NT * (R - 1)}u < {count}u) "
        load = [(guard + x.lstrip()) if x.lstrip().startswith(f"{{ let e = lid + {NT * (R - 1)}u;") else x for x in load]
        store = [(" " * 8 + guard + x.lstrip()) if x.lstrip().startswith(f"{{ let e = lid + {NT * (R - 1)}u;") else x for x in store]
    return mode, "".join(regs), "".join(load), "".join(store)


# Output tiles of the tiled kernel and the register block each uses by default: a thread
# accumulates RM rows x RN columns of its tile, so a workgroup has (TM / RM) * (TN / RN) threads.
# Every default keeps 16 threads across N (TN / RN = 16), the access pattern the prefill tiles
# were tuned with: a warp's b reads from shared memory are 16 distinct vec4s (the other half-warp
# reads the same ones) and its a reads touch 2 addresses. The small-M tiles (TM = 16, 32: batched
# decode, M = B sequences) have 128 threads, one warp per SM sub-partition, with 2x4..4x8 blocks.
TILE_BLOCKS = {
    (128, 128): (8, 8), (128, 64): (8, 4), (64, 128): (4, 8), (64, 64): (4, 4),   # 256 threads
    (32, 128): (4, 8), (32, 64): (4, 4), (16, 128): (2, 8), (16, 64): (2, 4),     # 128 threads
}


def _tile_block(TM: int, TN: int) -> tuple:
    """(RM, RN, threads) of output tile (TM, TN): its TILE_BLOCKS entry, or TUNING["tile_blocks"]'s."""
    if (TM, TN) not in TILE_BLOCKS:
        raise ValueError(f"matmul: output tile {TM}x{TN} is not one of the tiled kernel's "
                         f"({', '.join(f'{a}x{b}' for a, b in TILE_BLOCKS)}); check TUNING['tile_mn'], "
                         f"TUNING['tile'] and TUNING['tile_candidates']")
    RM, RN = TILE_BLOCKS[(TM, TN)]
    for tile, block in (TUNING.get("tile_blocks") or ()):
        if tuple(int(x) for x in tile) == (TM, TN):
            RM, RN = (int(x) for x in block)
    threads = (TM // RM) * (TN // RN) if RM > 0 and RN > 0 else 0
    if RM not in (1, 2, 4, 8) or RN not in (4, 8) or TM % RM or TN % RN or not 32 <= threads <= 256:
        raise ValueError(f"matmul: register block {RM}x{RN} for output tile {TM}x{TN} (TUNING['tile_blocks']): "
                         f"a thread takes 1, 2, 4 or 8 rows and 4 or 8 columns, dividing the tile, and a "
                         f"workgroup 32..256 threads (this gives {threads})")
    return RM, RN, threads


def _tile_bk(TM: int) -> int:
    """K step of a tile: TUNING["bk_small"] for the 16/32-row tiles, TUNING["bk"] for the others."""
    knob = "bk_small" if TM < 64 and TUNING.get("bk_small") else "bk"
    bk = TUNING[knob]
    if not isinstance(bk, int) or bk <= 0 or bk % 4:
        raise ValueError(f"matmul: TUNING[{knob!r}] = {bk!r}; the tiled kernel's K step must be a positive multiple of 4")
    return bk


def _tiled_config(c: _Ctx) -> tuple:
    """(TM, TN, BK, S, KC, (RM, RN, threads)): output tile, K step, split-K factor, K steps per
    split and the tile's register block.

    Why: a prefill-sized matmul (M = 512 rows) has few 128x128 tiles (N = 2048 gives 64
    workgroups for 132 SMs on an H100), so most of the GPU idles while the big tiles that make
    2048^3 fast run one wave. Rectangular tiles and splitting K over several workgroups (partial
    sums reduced, epilogue applied, by a second small kernel) raise the workgroup count while
    keeping the 8x8 (or 8x4) register blocks that reach ~70% of the FMA peak.

    Batched decode (M = B = 16..64 sequences, every weight read once per step) is the opposite
    end: a 64-row tile over 16 rows does 4x the useful FMAs, and N = 2048 has 32 such tiles, so
    the 64-row tiles need an 8-way split and a reduce pass to fill the GPU. The 16- and 32-row
    tiles waste no rows. What the H200 sweep of them showed (benchmarks/bench_matmul.py
    small-M sweep, results/2026-12-03b/small_m.json, BK 16): a decode-sized tiled matmul costs
    ~4 us + ~0.86 us per K step a workgroup walks (the serial chain of load latency and barriers;
    at M = 16 about half the time) + its padded FMAs at a per-tile rate (64x64: ~16 TFMA/s;
    32-row tiles 0.82-0.92 of that, 16-row 0.55) + ~1 us and ~1 us per MB of partials for a
    split. So at M = 16 and 32 the tile of M rows wins (by 1.2-1.6x over the 64-row one), while
    at M = 64 the 64-row tiles stay best: a 32-row tile's 2 row tiles either double the K steps
    per workgroup (fewer splits: 1.5x slower at N = 2048) or keep them at a lower rate (-3%).
    TUNING["bk_small"] = 32 would stage K in steps of 32 for the 16/32-row tiles: half the K
    steps per workgroup for the same work, a q4_0 row's step one whole 32-element block. It is
    tested for correctness but not yet timed on a GPU (the sweep's "autok16" variant compares
    it), so the default keeps the measured K step of 16.

    The model, one score per (tile, split), the highest wins (ties: the earlier, larger tile):
      eff     the tile's FMA rate relative to 128x128 (TUNING["tile_eff"]). 128/64 values from
              the H100 prefill sweep; the 16/32-row ones from the H200 small-M sweep, relative
              to 64x64 (0.6): 32x128 0.92x, 32x64 0.82x, 16x128 and 16x64 0.55x (16x128 gets
              0.35 rather than 0.33: the model has no term for K steps per workgroup, which
              make a 4-way split of 16x128 beat a 2-way split of 16x64 at N = 8192).
      fill    min(1, workgroups / TUNING["target_wgs"]): latency hiding needs ~2 per SM.
      quant   past one "wave" of target_wgs, the last wave's idle share (wave quantization).
      split   1 - 3% per extra split: partial sums written and read, a second dispatch. Once
              fill is 1, more splits only cost, so a tile with enough tiles takes few or none.
      useful  M * N / (tiles * TM * TN): rows and columns past the matrix edges are wasted FMAs.
    On the sweep's 24 shapes (M = 16/32/64, pythia-1.4b's linears, f16 and q4_0) it picks the
    measured best or one within 2%. The 16/32-row tiles are candidates only up to M =
    TUNING["small_tile_max_m"] (64) rows, so every larger matmul (prefill) keeps the choice it
    had before them: with few tiles of any size (a tiny N) the fill term alone would prefer the
    many small tiles, unmeasured there.

    Knobs: TUNING["tile_mn"] = (TM, TN) and TUNING["split_k"] force a shape (no split unless
    split_k says so); TUNING["tile"] forces a square tile; TUNING["tile_candidates"] limits the
    tiles the model chooses among (its split still chosen: one tile for a sweep, the four
    64/128 tiles for the choice before the small ones); TUNING["tile_blocks"] changes a tile's
    register block; TUNING["bk"] / TUNING["bk_small"] set the K steps."""
    M, N, K, nb = c.M, c.N, c.K, c.nb
    # shared memory of a tile: a [BK x TM] and b [BK x TN] f32 (the rule was 2x that, which demoted a
    # 128x128 tile at bk = 32 to 64x64 on a 32 KiB adapter although it fits)
    smem_ok = lambda tm, tn: _tile_bk(tm) * (tm + tn) * 4 <= c.dev.max_workgroup_storage   # noqa: E731
    forced = TUNING.get("tile_mn")
    if forced:
        TM, TN = (int(x) for x in forced)
    elif TUNING["tile"]:
        TM = TN = int(TUNING["tile"])
    elif TUNING.get("tile_policy") == "square":   # the first policy: square tiles, no split (for comparisons)
        TM = TN = 128 if -(-M // 128) * -(-N // 128) * nb >= TUNING["tile128_min_wgs"] else 64
    else:
        TM = TN = None
    if TM is not None:
        _tile_block(TM, TN)
        if not smem_ok(TM, TN):
            TM = TN = 64
    S = TUNING.get("split_k")
    # a split's partial sums (S copies of the output) are one binding: at most max_binding_size
    max_s = max(1, c.dev.max_binding_size // max(1, nb * M * N * 4))
    if TM is not None:
        S = int(S or 1)
    else:
        effs = {(int(tm), int(tn)): float(e) for tm, tn, e in TUNING["tile_eff"]}
        cands = [tuple(int(x) for x in t) for t in (TUNING.get("tile_candidates") or effs)]
        if not TUNING.get("tile_candidates") and M > int(TUNING.get("small_tile_max_m") or 0):
            cands = [t for t in cands if t[0] >= 64] or cands   # prefill: the 64/128-row tiles, as before
        for tm, tn in cands:
            _tile_block(tm, tn)
            if (tm, tn) not in effs:
                raise ValueError(f"matmul: TUNING['tile_candidates'] names tile {tm}x{tn}, which has no "
                                 f"TUNING['tile_eff'] entry")
        best = _best_tile(c, [(tm, tn, effs[(tm, tn)], _tile_bk(tm)) for tm, tn in cands if smem_ok(tm, tn)],
                          S, max_s, int(TUNING.get("target_wgs", 256)), int(TUNING.get("split_min_k", 256)))
        TM, TN, S = best or (64, 64, 1)
    BK = _tile_bk(TM)
    S, KC = _split_steps(-(-K // BK), S, max_s)
    return TM, TN, BK, S, KC, _tile_block(TM, TN)


def _best_tile(c: "_Ctx", cands: list, S, max_s: int, target: int, split_min_k: int):
    """(TM, TN, split) with the highest score among `cands` [(TM, TN, eff, K step)] and their
    splits (S: forced), or None: the cost model _tiled_config describes, shared with matmul_coop.

    Score: eff x fill (workgroups / target, at most 1) x wave quantization x (1 - 3% per extra
    split: partials written and reduced) x the useful share of the tiles' rows and columns."""
    M, N, K, nb = c.M, c.N, c.K, c.nb
    best = None
    for tm, tn, eff, bk in cands:
        KT = -(-K // bk)
        min_kt = max(1, split_min_k // bk)     # K steps per split, at least
        tiles = -(-M // tm) * -(-N // tn) * nb
        for s in ((min(int(S), max_s),) if S else range(1, min(8, max_s) + 1)):
            if s > 1 and not S and KT // s < min_kt:
                break
            wgs = tiles * s
            fill = min(1.0, wgs / target)
            waves = -(-wgs // target)
            quant = wgs / (waves * target) if wgs > target else 1.0
            score = float(eff) * fill * quant * (1.0 - 0.03 * (s - 1)) * (M * N * nb) / (tiles * tm * tn)
            if best is None or score > best[0] + 1e-9:
                best = (score, tm, tn, s)
    return best[1:] if best else None


def _split_steps(KT: int, S, max_s: int) -> tuple:
    """(splits, K steps per split) for KT steps and a wanted split S: no more splits than steps
    or than one binding of partials holds, and no empty split."""
    S = max(1, min(int(S), KT, max_s))
    KC = -(-KT // S)
    return -(-KT // KC), KC


def _tile_loads(c: _Ctx, TM: int, TN: int, BK: int, NT: int, a_lanes: int = 4, b_lanes: int = 4, **kw) -> tuple:
    """(a mode, b mode, register declarations, global->register loads, register->shared stores)
    of a tiled kernel's two operand tiles (stacked b parts included); `kw` goes to _tile_load
    (matmul_coop's f16 cast and t-major layout). One declaration serving both operands (a and
    b views of one buffer) with different vector widths makes both loads scalar. Sets c.out_vec."""
    if c.kparts:
        return _kpart_loads(c, TM, TN, BK, NT, a_lanes, b_lanes, **kw)
    M, N, K = c.M, c.N, c.K
    moda, regs_a, load_a, store_a = _tile_load(c, "a", TM, BK, M, K, threads=NT, lanes=a_lanes, **kw)
    modb, regs_b, load_b, store_b = _tile_load(c, "b", TN, BK, N, K, threads=NT, lanes=b_lanes, **kw)
    if c.parts:
        modb, regs_b, load_b, store_b = _part_loads(c, TN, BK, K, NT, lanes=b_lanes, **kw)
    if c.aliased and c.lanes["a"] != c.lanes["b"]:
        c.want("a", 1)
        c.want("b", 1)
        moda, regs_a, load_a, store_a = _tile_load(c, "a", TM, BK, M, K, allow_vec=False, threads=NT, lanes=a_lanes, **kw)
        modb, regs_b, load_b, store_b = _tile_load(c, "b", TN, BK, N, K, allow_vec=False, threads=NT, lanes=b_lanes, **kw)
    c.out_vec = N % 4 == 0
    load_a = load_a.replace("{B}", c.bind_a.name)
    load_b = load_b.replace("{B}", c.bind_b.name)     # (stacked parts: their names are in already)
    return moda, modb, regs_a + regs_b, load_a + load_b, store_a + store_b


def _tile_prologue(c: _Ctx, TM: int, TN: int, BK: int, S: int, KC: int, NT: int) -> str:
    """A tiled kernel's entry point up to its thread layout: the flat workgroup index, the split
    (si, kt0..kt1) and output tile (tmi, tni, at0, bt0, batch bi) it owns, and operand bases."""
    M, N = c.M, c.N
    gm, gn = -(-M // TM), -(-N // TN)
    tiles = gm * gn * c.nb
    KT = -(-c.K // BK)
    pre, boa, bob = _batch_code(c.dims)
    s = [f"@compute @workgroup_size({NT})\nfn main(@builtin(workgroup_id) wid: vec3<u32>, "
         "@builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n",
         _GRID_PRELUDE.format(total=_u(tiles * S))]
    if S > 1:
        s.append(f"    let si = g / {_u(tiles)};\n    let gt = g % {_u(tiles)};\n"
                 f"    let kt0 = si * {_u(KC)};\n    let kt1 = min(kt0 + {_u(KC)}, {_u(KT)});\n")
    else:
        s.append(f"    let gt = g;\n    let kt0 = 0u;\n    let kt1 = {_u(KT)};\n")
    s += [f"    let tni = gt % {_u(gn)};\n    let rest = gt / {_u(gn)};\n"
          f"    let tmi = rest % {_u(gm)};\n    let bi = rest / {_u(gm)};\n",
          f"    let at0 = tmi * {TM}u;\n    let bt0 = tni * {TN}u;\n",
          pre,
          f"    let abase = {_u(c.A.offset)} + {boa};\n    let bbase = {_u(c.B.offset)} + {bob};\n",
          "".join(f"    let bbase{j + 1} = {_u(pm.offset)};\n    let btl{j + 1} = bt0 - {_u(start)};\n"
                  for j, (pm, _, start) in enumerate(c.parts)),
          "".join(f"    let abase{j + 1} = {_u(am.offset)};\n    let bbase{j + 1} = {_u(bm.offset)};\n"
                  for j, (am, bm, _, _) in enumerate(c.kparts))]
    return "".join(s)


def _k_loop_head(BK: int, regs: str, loads: str, stores: str) -> str:
    """The K loop up to its inner product: the first step's tiles loaded into registers, then per
    step: registers to shared memory, a barrier, the next step's loads issued (they overlap the
    product), after which the caller's product code and the loop's closing barrier follow."""
    return (regs + f"    {{\n        let k0 = kt0 * {BK}u;\n" + loads + "    }\n"
            "    for (var kt = kt0; kt < kt1; kt++) {\n" + stores + "        workgroupBarrier();\n"
            f"        if (kt + 1u < kt1) {{\n            let k0 = (kt + 1u) * {BK}u;\n" + loads + "        }\n")


def _out_base(c: _Ctx, S: int) -> str:
    """`ob`: where the tile's batch lies in the output, or in split si's copy of it (raw partial sums)."""
    M, N = c.M, c.N
    if S > 1:
        return f"    let ob = si * {_u(c.nb * M * N)} + bi * {_u(M * N)};\n"
    return f"    let ob = bi * {_u(M * N)};\n"


def _store4(c: _Ctx, S: int, TN: int) -> str:
    """Stores vec4 `v` at output element `o` (column `n`) and closes the caller's block: one vec4
    store when rows are vec4-aligned, else four scalar stores; through the epilogue unless split
    (partials stay raw); guarded against the matrix's last columns when TN does not divide N."""
    N = c.N
    if c.out_vec:
        st = ("mm_out[o >> 2u] = v;" if S > 1 else
              "mm_out[o >> 2u] = vec4<f32>(epilogue(v.x, o), epilogue(v.y, o + 1u), "
              "epilogue(v.z, o + 2u), epilogue(v.w, o + 3u));")
        if N % TN:
            st = f"if (n < {_u(N)}) {{ {st} }}"
        return f"          {st} }}\n"
    out = ""
    for j, comp in enumerate("xyzw"):
        val = f"v.{comp}" if S > 1 else f"epilogue(v.{comp}, o + {j}u)"
        st = f"mm_out[o + {j}u] = {val};"
        if N % TN:
            st = f"if (n + {j}u < {_u(N)}) {{ {st} }}"
        out += f"          {st}\n"
    return out + "        }\n"


def _gen_tiled(c: _Ctx):
    M, N = c.M, c.N
    TM, TN, BK, S, KC, (RM, RN, NT) = _tiled_config(c)
    TY, TX = TM // RM, TN // RN     # threads along m and along n
    LA = min(RM, 4)                 # a's shared elements: vec4 (4 rows), vec2 or f32
    GM, GN = RM // LA, RN // 4      # a reads and b vec4 reads per thread and k
    at = {1: "f32", 2: "vec2<f32>", 4: "vec4<f32>"}[LA]
    total = -(-M // TM) * -(-N // TN) * c.nb * S
    if S > 1:
        c.ep = NoEpilogue()         # raw partial sums; the reduction kernel applies the epilogue
    moda, modb, regs, loads, stores = _tile_loads(c, TM, TN, BK, NT, a_lanes=LA)
    s = [f"var<workgroup> mm_As: array<{at}, {BK * TM // LA}>;\n",
         f"var<workgroup> mm_Bs: array<vec4<f32>, {BK * TN // 4}>;\n",
         _tile_prologue(c, TM, TN, BK, S, KC, NT),
         f"    let tx = lid % {TX}u;\n    let ty = lid / {TX}u;\n"]
    for r in range(RM):
        for h in range(GN):
            s.append(f"    var c{r}_{h} = vec4<f32>(0.0);\n")
    s.append(_k_loop_head(BK, regs, loads, stores))
    s.append(f"        for (var kk = 0u; kk < {BK}u; kk++) {{\n")
    for gi in range(GM):
        s.append(f"            let a{gi} = mm_As[kk * {TM // LA}u + {gi * TY}u + ty];\n")
    for h in range(GN):
        s.append(f"            let b{h} = mm_Bs[kk * {TN // 4}u + {h * TX}u + tx];\n")
    comp = "xyzw"
    for r in range(RM):
        gi, i = divmod(r, LA)
        av = f"a{gi}.{comp[i]}" if LA > 1 else f"a{gi}"
        for h in range(GN):
            s.append(f"            c{r}_{h} = fma(vec4<f32>({av}), b{h}, c{r}_{h});\n")
    s.append("        }\n        workgroupBarrier();\n    }\n")
    s.append(_out_base(c, S))
    for r in range(RM):
        gi, i = divmod(r, LA)
        s.append(f"    {{ let m = at0 + {gi * TY * LA + i}u + ty * {LA}u;\n")
        if M % TM:
            s.append(f"      if (m < {_u(M)}) {{\n")
        for h in range(GN):
            s.append(f"        {{ let n = bt0 + {h * TX * 4}u + tx * 4u; let o = ob + m * {_u(N)} + n; let v = c{r}_{h};\n"
                     + _store4(c, S, TN))
        if M % TM:
            s.append("      }\n")
        s.append("    }\n")
    s.append("}\n")
    block = "" if (RM, RN) == TILE_BLOCKS[(TM, TN)] else f"_r{RM}x{RN}"   # a swept register block
    name = f"matmul_{c.dtag()}_t{TM}x{TN}{block}_{moda}{modb}_k{BK}" + (f"_s{S}" if S > 1 else "")
    if c.parts:
        name += f"_x{len(c.parts) + 1}"
    if c.kparts:
        name += f"_kc{len(c.kparts) + 1}"
    info = {"tile": (TM, TN), "block": (RM, RN), "threads": NT, "modes": (moda, modb), "bk": BK, "split": S}
    return name, "".join(s), runtime.grid_for(total), info


def _part_loads(c: _Ctx, TN: int, BK: int, K: int, NT: int, lanes: int = 4, cast: str = "", tmajor: int = 0) -> tuple:
    """The b tile loads of a stacked right operand (plan's b_parts): each part's own loads
    (its binding, offset and column count), the one the workgroup's columns lie in chosen by a
    uniform branch on bt0; one shared-memory layout (every part loads the same way, else all
    scalar)."""
    B = c.B
    parts = [(B, c.bind_b, 0)] + c.parts
    ends = [start for _, _, start in parts[1:]] + [c.N]
    for allow_vec in (True, False):
        if not allow_vec:
            c.want("b", 1)
        gens = []
        for j, (pm, _, start) in enumerate(parts):
            c.B = pm
            gens.append(_tile_load(c, "b", TN, BK, ends[j] - start, K, allow_vec=allow_vec, threads=NT,
                                   lanes=lanes, cast=cast, tmajor=tmajor))
        c.B = B
        if len({g[0] for g in gens}) == 1 and len({g[1] for g in gens}) == 1 and len({g[3] for g in gens}) == 1:
            break
    binds = c.part_bindings()
    code = ""
    for j, ((_, _, load, _), bd) in enumerate(zip(gens, binds)):
        load = load.replace("{B}", bd.name)
        if j:
            load = load.replace("bbase", f"bbase{j}").replace("bt0", f"btl{j}")
        cond = f"if (bt0 < {_u(ends[j])}) " if j < len(parts) - 1 else ""
        code += ("        " if j == 0 else " else ") + cond + "{\n" + load + "        }"
    mode, regs, _, store = gens[0]
    return mode, regs, code + "\n", store


def _kpart_loads(c: _Ctx, TM: int, TN: int, BK: int, NT: int, a_lanes: int, b_lanes: int, **kw) -> tuple:
    """_tile_loads of a K-concatenated matmul (plan's k_parts): each (a_j, b_j) pair's own loads
    (bindings, offsets, its K_j), the one a K step lies in chosen by a uniform branch on k0
    (every part but the last spans whole K steps); one shared-memory layout (every part loads
    the same way, else all scalar)."""
    A, B = c.A, c.B
    parts = [(A, B, c.bind_b, 0)] + c.kparts
    ends = [start for _, _, _, start in parts[1:]] + [c.K]
    # scalar layouts: every part in part 0's item order (their registers are stored alike)
    order = {"a": _k_fastest(A, "a"), "b": _k_fastest(B, "b")}
    for allow_vec in (True, False):
        if not allow_vec:
            c.want("a", 1)
            c.want("b", 1)
        gens = []
        for j, (am, bm, _, start) in enumerate(parts):
            c.A, c.B = am, bm
            Kj = ends[j] - start
            ko = {} if allow_vec else order
            gens.append((_tile_load(c, "a", TM, BK, c.M, Kj, allow_vec=allow_vec, threads=NT, lanes=a_lanes,
                                    kfast=ko.get("a"), **kw),
                         _tile_load(c, "b", TN, BK, c.N, Kj, allow_vec=allow_vec, threads=NT, lanes=b_lanes,
                                    kfast=ko.get("b"), **kw)))
        c.A, c.B = A, B
        same = all(len({g[w][i] for g in gens}) == 1 for w in (0, 1) for i in (0, 3))
        if same:
            break
    if not same:
        raise AssertionError(f"matmul k_parts: the parts' shared-memory stores differ ({[g[0][0] for g in gens]})")
    c.out_vec = c.N % 4 == 0
    binds = c._bindings()[0]
    names = [(binds[0].name, binds[1].name)] + [(binds[2 + 2 * j].name, binds[3 + 2 * j].name)
                                                for j in range(len(c.kparts))]
    code = ""
    for j, ((ga, gb), (na, nb_), (_, _, _, start)) in enumerate(zip(gens, names, parts)):
        load = ga[2].replace("{B}", na) + gb[2].replace("{B}", nb_)
        if j:
            load = re.sub(r"\bk0\b", f"(k0 - {_u(start)})", load)
            load = load.replace("abase", f"abase{j}").replace("bbase", f"bbase{j}")
        cond = f"if (k0 < {_u(ends[j])}) " if j < len(parts) - 1 else ""
        code += ("        " if j == 0 else " else ") + cond + "{\n" + load + "        }"
    (moda, regs_a, _, store_a), (modb, regs_b, _, store_b) = gens[0]
    return moda, modb, regs_a + regs_b, code + "\n", store_a + store_b


def _plan_kparts(out: Buffer, a: Operand, b: Operand, parts: list, ep, force, b_binding) -> Launch:
    """plan() with k_parts: out = epilogue(a @ b + a_1 @ b_1 + ...), validated here and
    generated by the tiled path as one matmul over K = K_0 + K_1 + ..."""
    if force not in (None, "tiled", "coop"):
        raise ValueError(f"matmul: K-concatenated operands (k_parts) run on the tiled path only, not {force!r}")
    ops = [(a, b, b_binding)] + [tuple(p) for p in parts]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise ValueError(f"matmul: k_parts needs a [M, K] and b [K, N]; got {tuple(a.shape)} and {tuple(b.shape)}")
    M, N = int(a.shape[0]), int(b.shape[1])
    Ks = []
    for j, (aj, bj, kb) in enumerate(ops):
        name = "" if j == 0 else f"k_parts[{j - 1}] "
        _check_float(f"{name}a", aj)
        if kb is None:
            _check_float(f"{name}b", bj)
        if (kb is None) != (b_binding is None) or bj.dtype is not b.dtype:
            raise TypeError(f"matmul: {name}b is {bj.dtype}{' (bound)' if kb else ''}, b is {b.dtype}"
                            f"{' (bound)' if b_binding else ''}: K parts share a weight dtype and binding kind")
        if (len(aj.shape) != 2 or len(bj.shape) != 2 or int(aj.shape[0]) != M or int(bj.shape[1]) != N
                or int(aj.shape[1]) != int(bj.shape[0])):
            raise ValueError(f"matmul: {name}a {tuple(aj.shape)} @ b {tuple(bj.shape)}: each K part is [M={M}, K_j] @ "
                             f"[K_j, N={N}]")
        if aj.buffer is out or bj.buffer is out:
            raise ValueError(f"matmul: {name}a or b is also the output")
        Ks.append(int(aj.shape[1]))
    if any(k <= 0 for k in Ks) or any(k % 64 for k in Ks[:-1]):
        raise ValueError(f"matmul: K parts {Ks}: each but the last must be a positive multiple of 64 (whole K steps)")
    if out.nbytes < M * N * 4:
        raise ValueError(f"matmul: output buffer holds {out.nbytes} bytes, {M * N * 4} needed for float32 ({M}, {N})")
    if any(o.buffer is out for o in getattr(ep, "operands", ())):
        raise ValueError("matmul: the output buffer is also an epilogue operand")
    if M * N == 0:
        return Launch("empty", "matmul_empty")
    for j, (aj, bj, kb) in enumerate(ops):
        _check_bounds("a", aj)
        if kb is None:
            _check_bounds("b", bj)

    mats = [(_mat2d(aj, M, k), _mat2d(bj, k, N), kb) for (aj, bj, kb), k in zip(ops, Ks)]
    starts = [sum(Ks[:j]) for j in range(len(Ks))]
    ctx = _Ctx(runtime.get_device(), mats[0][0], mats[0][1], M, N, sum(Ks), 1, [], ep, b_binding,
               kparts=[(am, bm, kb, st) for (am, bm, kb), st in zip(mats[1:], starts[1:])])
    return _launch(ctx, force or "tiled", M * N, out, ep, ctx.input_bindings())


def _plan_parts(out: Buffer, a: Operand, b: Operand, parts: list, ep, force, b_binding) -> Launch:
    """plan() with b_parts: validated here, generated by the tiled path."""
    if force not in (None, "tiled", "coop"):
        raise ValueError(f"matmul: stacked right operands (b_parts) run on the tiled path only, not {force!r}")
    _check_float("a", a)
    ops = [(b, b_binding)] + [(p, pb) for p, pb in parts]
    for j, (p, pb) in enumerate(ops):
        name = "b" if j == 0 else f"b_parts[{j - 1}]"
        if len(p.shape) != 2 or len(p.strides) != 2:
            raise ValueError(f"matmul: {name} has shape {tuple(p.shape)}; stacked right operands are [K, N_j]")
        if pb is None:
            _check_float(name, p)
        if p.dtype is not b.dtype or (pb is None) != (b_binding is None):
            raise TypeError(f"matmul: {name} is {p.dtype}{' (bound)' if pb else ''}, b is {b.dtype}"
                            f"{' (bound)' if b_binding else ''}: stacked right operands share a dtype and a binding kind")
        if p.buffer is a.buffer or p.buffer is out:
            raise ValueError(f"matmul: {name} shares a buffer with a or the output")
    if len(a.shape) != 2 or int(a.shape[1]) != int(b.shape[0]) or any(int(p.shape[0]) != int(b.shape[0]) for p, _ in parts):
        raise ValueError(f"matmul: a {tuple(a.shape)} @ stacked {[tuple(p.shape) for p, _ in ops]}: a is [M, K], "
                         f"each right operand [K, N_j]")
    Ns = [int(p.shape[1]) for p, _ in ops]
    if any(n <= 0 for n in Ns) or any(n % 128 for n in Ns[:-1]):
        raise ValueError(f"matmul: stacked column counts {Ns}: each but the last must be a positive multiple of 128")
    M, K, N = int(a.shape[0]), int(a.shape[1]), sum(Ns)
    if out.nbytes < M * N * 4:
        raise ValueError(f"matmul: output buffer holds {out.nbytes} bytes, {M * N * 4} needed for float32 ({M}, {N})")
    if any(buf is out for buf in [a.buffer] + [o.buffer for o in getattr(ep, "operands", ())]):
        raise ValueError("matmul: the output buffer is also an input (a or an epilogue operand)")
    if M * N == 0:
        return Launch("empty", "matmul_empty")
    _check_bounds("a", a)
    for j, (p, pb) in enumerate(ops):
        if pb is None:
            _check_bounds("b" if j == 0 else f"b_parts[{j - 1}]", p)

    A = _mat2d(a, M, K)
    mats = [_mat2d(p, K, n) for (p, _), n in zip(ops, Ns)]
    starts = [sum(Ns[:j]) for j in range(len(Ns))]
    ctx = _Ctx(runtime.get_device(), A, mats[0], M, N, K, 1, [], ep, b_binding,
               [(m, pb, st) for m, (_, pb), st in zip(mats[1:], parts, starts[1:])])
    return _launch(ctx, force or "tiled", M * N, out, ep, ctx.input_bindings())


_scratch: dict = {}


def _scratch_buffer(tag: str, nbytes: int) -> Buffer:
    """A cached scratch Buffer of at least nbytes: the same object while big enough, so bind groups
    (and captured dispatches) that use it stay valid. Dispatches run in queue order, so one scratch
    serves every split-K matmul of a graph."""
    buf = _scratch.get(tag)
    if buf is None or buf.nbytes < nbytes:
        buf = Buffer(nbytes)
        _scratch[tag] = buf
    return buf


def _splitk_reduce(out: Buffer, part: Buffer, numel: int, S: int, ep) -> tuple:
    """The dispatch (name, wgsl, bindings, grid) summing S partial outputs (each `numel` floats,
    back to back in `part`) into out, applying the epilogue once per element."""
    vec = numel % 4 == 0
    n = numel // 4 if vec else numel
    ep_lines = ep.wgsl(2).splitlines(keepends=True)
    enables = [ln.strip() for ln in ep_lines if ln.lstrip().startswith("enable ")]
    ep_text = "".join(ln for ln in ep_lines if not ln.lstrip().startswith("enable "))
    t = "vec4<f32>" if vec else "f32"
    src = "".join(e + "\n" for e in dict.fromkeys(enables))
    src += (f"@group(0) @binding(0) var<storage, read_write> mm_out: array<{t}>;\n"
            f"@group(0) @binding(1) var<storage, read> mm_part: array<{t}>;\n" + ep_text +
            "@compute @workgroup_size(256)\nfn main(@builtin(workgroup_id) wid: vec3<u32>, "
            "@builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
            f"    let i = ({runtime.WGSL_LINEAR_ID}) * 256u + lid;\n    if (i >= {_u(n)}) {{ return; }}\n"
            "    var v = mm_part[i];\n")
    for k in range(1, S):
        src += f"    v += mm_part[i + {_u(k * n)}];\n"
    if vec:
        src += ("    let o = i * 4u;\n    mm_out[i] = vec4<f32>(epilogue(v.x, o), epilogue(v.y, o + 1u), "
                "epilogue(v.z, o + 2u), epilogue(v.w, o + 3u));\n}\n")
    else:
        src += "    mm_out[i] = epilogue(v, i);\n}\n"
    binds = [(out, "rw"), (part, "read")] + epilogue_bindings(ep)
    return (f"matmul_splitk_reduce_s{S}", src, binds, runtime.grid_for(-(-n // 256)))


# the tensor-core variant builds on this module's pieces, so it is imported once they exist
from . import matmul_coop  # noqa: E402
