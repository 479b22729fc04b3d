"""GGML block formats on the GPU: dequantize, and matmul / GEMV straight from the block bytes.

Weights stay exactly as GGUF stores them (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k and
bf16), uploaded unchanged into a buffer bound as `array<u32>`. Blocks are not 4-byte aligned in
general (q8_0 is 34 bytes, q4_0 18, q5_0 22, q6_k 210), so every read goes through byte-offset
helpers: `rd16(b)` (an f16 scale at an even byte), `rd32(b)` (4 bytes at an even offset: one
word, or two words funnel-shifted by 16 bits), `rd8(b)`. A float copy of a weight is never made.

Three kernels, all generated from one per-format description (`_FORMATS`):

  dequantize   one thread per 4 output elements (`dq4`: the exact order of operations of
               gguf.quants.dequantize, so the f32 result is bit-identical; see `_EXACTNESS`).
  gemv         out[m, n] for small M (decode). A workgroup owns ROWS weight rows; each thread
               takes 16-element "units" of a row (two lanes per 32-block, sixteen per 256-block)
               so the u32 loads of a subgroup cover consecutive bytes and its x loads are whole
               vec4s, decodes them for all ROWS rows (x is loaded once per unit and reused), then
               one subgroupAdd (or a shared-memory tree) per output. The unit decode places each
               4..8-bit code in the mantissa of 1.0 (`1 + q/2^B`, a shift and an and-or per
               element, no int->float conversion) and folds the offset into a per-group
               `C * sum(x)` term:  w = a*q + b = A*(1 + q/2^B) + C  with A = a*2^B, C = b - A.
  tiled        prefill: the float tiled matmul (matmul.py: its tile-shape / split-K planner,
               reduce pass and epilogue handling) with W bound as its operand b through
               `_WeightBinding`: each aligned 4-element load of the W tile is one `wld4` (q4_0,
               q8_0: no int->float conversions) or `dq4`, decoded in registers on its way to
               workgroup memory.

The weight binding is always `W: array<u32>`; x may be float32 or float16 (f16 through
`array<f16>` / `vec4<f16>` with shader-f16, else packed in u32 words + unpack2x16float), any
strides; out is contiguous float32 [*batch, M, N]. Accumulation is f32 everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .. import dtypes, runtime
from ..runtime import Buffer
from . import matmul as mm
from .common import NoEpilogue, Operand, epilogue_bindings

__all__ = ["dequantize", "quant_matmul", "quant_nbytes", "plan_matmul", "TUNING", "SUPPORTED"]

SUPPORTED = (dtypes.q8_0, dtypes.q4_0, dtypes.q4_1, dtypes.q5_0, dtypes.q5_1,
             dtypes.q4_k, dtypes.q5_k, dtypes.q6_k, dtypes.bfloat16)

# Knobs the benchmarks sweep (TENSORGPU_QGEMV="threads,rows" overrides in bench_quant_gemv.py).
# The tiled (prefill) path is the float tiled matmul: its tile / split-K / BK knobs are matmul.TUNING.
TUNING = {
    "gemv_max_m": 8,      # x rows (batch*M) up to this use the GEMV kernel, else tiled (M = 16: tiled wins, RESULTS.md)
    "gemv_m_chunk": 4,    # x rows per GEMV dispatch pass (registers: 16 x floats per row)
    "gemv_threads": None, # GEMV workgroup size; None: from K (256 for K >= 4096)
    "gemv_rows": None,    # weight rows per GEMV workgroup; None: from the M chunk (4 for M=1)
    # Off by default (None): quantized weights are only ever decoded inside the kernels, never
    # copied out as floats. Set to e.g. 256 to let prefills of that many rows dequantize W once
    # into an f32 scratch buffer and run the float tiled matmul (no faster on the H100 since the
    # tiled path shares the float planner; kept for comparisons).
    "dequant_min_rows": None,
    "dequant_max_bytes": 256 << 20,   # largest f32 weight copy the dequant path makes
    "tiled_fast_decode": True,        # tiled path: _TILED_LD4 decoders (q4_0, q8_0) instead of dq4
}

_U32 = 1 << 32


def _u(x: int) -> str:
    return f"{int(x) % _U32}u"


def quant_nbytes(dtype: dtypes.DType, numel: int) -> int:
    """Bytes that `numel` elements of a GGML block type occupy (the GGUF tensor data size)."""
    dtype = dtypes.as_dtype(dtype)
    if dtype not in SUPPORTED:
        raise TypeError(f"quant_nbytes: {dtype} is not a supported GGML block type "
                        f"({', '.join(d.name for d in SUPPORTED)})")
    if numel < 0:
        raise ValueError(f"quant_nbytes: negative element count {numel}")
    if numel % dtype.block_size:
        raise ValueError(f"quant_nbytes: {numel} elements of {dtype.name} is not a whole number of "
                         f"{dtype.block_size}-element blocks")
    return numel // dtype.block_size * dtype.block_bytes


# ----------------------------------------------------------------------------- WGSL: byte access

# The 4 bytes of a word as floats (also used by gemv.py's 64-element items, whose W binding may be
# vec4-typed, so it lives apart from the W-reading helpers below).
_SMALL4 = """
fn small4(w: u32) -> vec4<f32> {   // the 4 bytes of w as floats, without int->float conversions
    return bitcast<vec4<f32>>(unpack4xU8(w) | vec4<u32>(0x4b000000u)) - vec4<f32>(8388608.0);
}
"""

# All reads of the block bytes. `b` is a byte offset; rd16/rd32 need it even (every field of
# every format sits at an even offset). rd32 reads 4 bytes as one u32 whatever the alignment
# (0 or 2 mod 4): always two loads, a funnel and a select (no divergent branch).
_BYTES = """
fn rd8(b: u32) -> u32 { return (W[b >> 2u] >> ((b & 3u) << 3u)) & 0xffu; }
fn rd16(b: u32) -> u32 { return (W[b >> 2u] >> ((b & 2u) << 3u)) & 0xffffu; }
fn rd32(b: u32) -> u32 {
    let i = b >> 2u;
    let w0 = W[i];
    return select(w0, (w0 >> 16u) | (W[i + 1u] << 16u), (b & 2u) != 0u);
}
fn rd32x2(b: u32) -> vec2<u32> {
    let i = b >> 2u;
    return words2(vec3<u32>(W[i], W[i + 1u], W[i + 2u]), (b & 2u) != 0u);
}
fn rd32x4(b: u32) -> vec4<u32> {
    let i = b >> 2u;
    let w0 = W[i]; let w1 = W[i + 1u]; let w2 = W[i + 2u]; let w3 = W[i + 3u];
    let odd = (b & 2u) != 0u;
    return vec4<u32>(select(w0, (w0 >> 16u) | (w1 << 16u), odd),
                     select(w1, (w1 >> 16u) | (w2 << 16u), odd),
                     select(w2, (w2 >> 16u) | (w3 << 16u), odd),
                     select(w3, (w3 >> 16u) | (W[i + 4u] << 16u), odd));
}
// 8 bytes as two u32 from the 3 words that hold them: shifted by 2 bytes when they start at 2 mod 4
fn words2(w: vec3<u32>, odd: bool) -> vec2<u32> {
    return select(w.xy, vec2<u32>((w.x >> 16u) | (w.y << 16u), (w.y >> 16u) | (w.z << 16u)), odd);
}
fn bytes4(w: u32) -> vec4<f32> { return vec4<f32>(unpack4xU8(w)); }
fn spread4(x: u32) -> u32 { return (x | (x << 7u) | (x << 14u) | (x << 21u)) & 0x01010101u; }
fn sext8(x: u32) -> f32 { return bitcast<f32>((x ^ 0x80u) | 0x4b000000u) - 8388736.0; }   // int8 byte
""" + _SMALL4

# f16 bits -> f32. The exact decoder never depends on the driver's handling of f16 subnormals
# (m * 2^-24 is exact in f32); the fast one is unpack2x16float (used where bit-exactness is not
# the contract: GEMV / tiled).
_H2F_EXACT = """
fn h2f(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    let normal = s | ((e + 112u) << 23u) | (m << 13u);
    let sub = s | bitcast<u32>(f32(m) * 5.9604644775390625e-8);
    let inf = s | 0x7f800000u | (m << 13u);
    return bitcast<f32>(select(select(normal, inf, e == 31u), sub, e == 0u));
}
"""
_H2F_FAST = "\nfn h2f(h: u32) -> f32 { return unpack2x16float(h).x; }\n"


def _mant(bits: int) -> str:
    """WGSL fn m<bits>(w): the `bits`-bit code in the low bits of each byte of w (higher bits of
    each byte are ignored) as 1 + q / 2^bits, by shifting it under the mantissa of 1.0."""
    top = 23 - bits
    mask = ((1 << bits) - 1) << top
    parts = []
    for k in range(4):
        sh = top - 8 * k
        parts.append(f"w << {sh}u" if sh > 0 else ("w" if sh == 0 else f"w >> {-sh}u"))
    return (f"fn m{bits}(w: u32) -> vec4<f32> {{\n"
            f"    return bitcast<vec4<f32>>((vec4<u32>({', '.join(parts)}) & vec4<u32>({mask:#x}u)) | vec4<u32>(0x3f800000u));\n}}\n")


_MANT = _mant(4) + _mant(5) + _mant(6) + _mant(8)

# ----------------------------------------------------------------------------- WGSL: formats


@dataclass(frozen=True)
class _Format:
    """One GGML format as WGSL.

    dq4(bb, j) -> vec4<f32>: elements 4j..4j+3 of the block at byte bb, computed in exactly the
        order gguf.quants.dequantize uses (used by dequantize and the tiled kernel).
    unit(rb, u) -> QU: GEMV unit u of the row at byte rb: 16 elements as four groups of 4 at
        element offsets e0(u) + offs[g]; v_g = 1 + q/2^B (or the values themselves when
        has_c is False), a = per-group multipliers A_g, c = per-group constants C_g.
    """
    dq4: str
    unit: str
    e0: str                 # WGSL expression of the unit's first element (within the row), of u
    offs: tuple             # element offsets of the four groups from e0
    has_c: bool = True      # whether C_g * sum(x_g) terms exist


_QU = "struct QU { v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, a: vec4<f32>, c: vec4<f32> }\n"

_SCMIN2_K = """
// Both sub-blocks 2c, 2c+1 of a unit from the scale words s0 (bytes 0-3), s1 (4-7), s2 (8-11):
// (sc0, sc1, m0, m1). The two 6-bit values of a pair sit in one 16-bit half; small ints become
// floats through the 2^23 mantissa trick (no int->float conversion, which is slow on GPUs).
fn scmin2(s0: u32, s1: u32, s2: u32, c: u32) -> vec4<f32> {
    let k = (c & 1u) << 4u;
    let a0 = s0 >> k; let a1 = s1 >> k; let a2 = s2 >> k;
    let lo = (a0 & 0x3f3fu) | ((a1 & 0x3f3fu) << 16u);
    let hi = ((a2 & 0x0f0fu) | ((a0 >> 2u) & 0x3030u)) | ((((a2 >> 4u) & 0x0f0fu) | ((a1 >> 2u) & 0x3030u)) << 16u);
    return small4(select(lo, hi, c >= 2u));
}
"""

# q4_k / q5_k 6-bit scale and min of sub-block sb (0..7) from the 12 scale bytes at bb + 4.
_SCMIN_K = """
fn scmin(bb: u32, sb: u32) -> vec2<f32> {
    let k = sb & 3u;
    let s0 = rd8(bb + 4u + k); let s1 = rd8(bb + 8u + k); let s2 = rd8(bb + 12u + k);
    let hi = sb >= 4u;
    let sc = select(s0 & 63u, (s2 & 0xfu) | ((s0 >> 6u) << 4u), hi);
    let mn = select(s1 & 63u, (s2 >> 4u) | ((s1 >> 6u) << 4u), hi);
    return vec2<f32>(f32(sc), f32(mn));
}
""" + _SCMIN2_K

_FORMATS: dict = {}

_FORMATS["q8_0"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb));
    return vec4<f32>(unpack4xI8(rd32(bb + 2u + 4u * j))) * d;
}
""",
    unit="""
fn qu_q8_0(d: f32, w: vec4<u32>) -> QU {   // a unit from its scale and 16 code bytes
    let q = w ^ vec4<u32>(0x80808080u);   // q + 128
    let A = vec4<f32>(256.0 * d); let C = vec4<f32>(-384.0 * d);
    return QU(m8(q.x), m8(q.y), m8(q.z), m8(q.w), A, C);
}
fn unit(rb: u32, u: u32) -> QU {
    let bb = rb + 34u * (u >> 1u);
    return qu_q8_0(h2f(rd16(bb)), rd32x4(bb + 2u + 16u * (u & 1u)));
}
""",
    e0="16u * u", offs=(0, 4, 8, 12))

_FORMATS["q4_0"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb));
    let q = (rd32(bb + 2u + 4u * (j & 3u)) >> ((j >> 2u) << 2u)) & 0x0f0f0f0fu;
    return d * vec4<f32>(vec4<i32>(unpack4xU8(q)) - vec4<i32>(8));
}
""",
    unit="""
fn qu_q4_0(d: f32, q: vec2<u32>) -> QU {   // a unit from its scale and 8 code bytes
    let A = vec4<f32>(16.0 * d); let C = vec4<f32>(-24.0 * d);
    return QU(m4(q.x), m4(q.y), m4(q.x >> 4u), m4(q.y >> 4u), A, C);
}
fn unit(rb: u32, u: u32) -> QU {
    let bb = rb + 18u * (u >> 1u);
    return qu_q4_0(h2f(rd16(bb)), rd32x2(bb + 2u + 8u * (u & 1u)));
}
""",
    e0="32u * (u >> 1u) + 8u * (u & 1u)", offs=(0, 4, 16, 20))

_FORMATS["q4_1"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb)); let m = h2f(rd16(bb + 2u));
    let q = (rd32(bb + 4u + 4u * (j & 3u)) >> ((j >> 2u) << 2u)) & 0x0f0f0f0fu;
    return d * bytes4(q) + m;
}
""",
    # 20-byte blocks: every block (and field) is 4-byte aligned
    unit="""
fn unit(rb: u32, u: u32) -> QU {
    let wi = (rb + 20u * (u >> 1u)) >> 2u;
    let dm = unpack2x16float(W[wi]);
    let qa = W[wi + 1u + 2u * (u & 1u)]; let qb = W[wi + 2u + 2u * (u & 1u)];
    let A = vec4<f32>(16.0 * dm.x); let C = vec4<f32>(dm.y - 16.0 * dm.x);
    return QU(m4(qa), m4(qb), m4(qa >> 4u), m4(qb >> 4u), A, C);
}
""",
    e0="32u * (u >> 1u) + 8u * (u & 1u)", offs=(0, 4, 16, 20))

_FORMATS["q5_0"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb));
    let qh = rd32(bb + 2u);
    let lo = (rd32(bb + 6u + 4u * (j & 3u)) >> ((j >> 2u) << 2u)) & 0x0f0f0f0fu;
    let q = lo | (spread4((qh >> (4u * j)) & 0xfu) << 4u);
    return d * vec4<f32>(vec4<i32>(unpack4xU8(q)) - vec4<i32>(16));
}
""",
    unit="""
fn unit(rb: u32, u: u32) -> QU {
    let bb = rb + 22u * (u >> 1u);
    let i = u & 1u;
    let d = h2f(rd16(bb));
    let qh = rd32(bb + 2u) >> (8u * i);
    let q = rd32x2(bb + 6u + 8u * i);
    let A = vec4<f32>(32.0 * d); let C = vec4<f32>(-48.0 * d);
    return QU(m5((q.x & 0x0f0f0f0fu) | (spread4(qh & 0xfu) << 4u)),
              m5((q.y & 0x0f0f0f0fu) | (spread4((qh >> 4u) & 0xfu) << 4u)),
              m5(((q.x >> 4u) & 0x0f0f0f0fu) | (spread4((qh >> 16u) & 0xfu) << 4u)),
              m5(((q.y >> 4u) & 0x0f0f0f0fu) | (spread4((qh >> 20u) & 0xfu) << 4u)), A, C);
}
""",
    e0="32u * (u >> 1u) + 8u * (u & 1u)", offs=(0, 4, 16, 20))

_FORMATS["q5_1"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb)); let m = h2f(rd16(bb + 2u));
    let qh = rd32(bb + 4u);
    let lo = (rd32(bb + 8u + 4u * (j & 3u)) >> ((j >> 2u) << 2u)) & 0x0f0f0f0fu;
    let q = lo | (spread4((qh >> (4u * j)) & 0xfu) << 4u);
    return d * bytes4(q) + m;
}
""",
    # 24-byte blocks: 4-byte aligned
    unit="""
fn unit(rb: u32, u: u32) -> QU {
    let wi = (rb + 24u * (u >> 1u)) >> 2u;
    let i = u & 1u;
    let dm = unpack2x16float(W[wi]);
    let qh = W[wi + 1u] >> (8u * i);
    let qa = W[wi + 2u + 2u * i]; let qb = W[wi + 3u + 2u * i];
    let A = vec4<f32>(32.0 * dm.x); let C = vec4<f32>(dm.y - 32.0 * dm.x);
    return QU(m5((qa & 0x0f0f0f0fu) | (spread4(qh & 0xfu) << 4u)),
              m5((qb & 0x0f0f0f0fu) | (spread4((qh >> 4u) & 0xfu) << 4u)),
              m5(((qa >> 4u) & 0x0f0f0f0fu) | (spread4((qh >> 16u) & 0xfu) << 4u)),
              m5(((qb >> 4u) & 0x0f0f0f0fu) | (spread4((qh >> 20u) & 0xfu) << 4u)), A, C);
}
""",
    e0="32u * (u >> 1u) + 8u * (u & 1u)", offs=(0, 4, 16, 20))

# k-quants: 256-element super-blocks of eight 32-element sub-blocks. A GEMV unit (16 per block)
# is (c, i): qs bytes 32c + 8i .. +7, whose low nibbles are elements 64c + 8i.. of sub-block 2c
# and high nibbles elements 64c + 32 + 8i.. of sub-block 2c+1.
_FORMATS["q4_k"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb)); let dmin = h2f(rd16(bb + 2u));
    let sb = j >> 3u;
    let q = (rd32(bb + 16u + 32u * (j >> 4u) + 4u * (j & 7u)) >> ((sb & 1u) << 2u)) & 0x0f0f0f0fu;
    let sm = scmin(bb, sb);
    return (d * sm.x) * bytes4(q) - dmin * sm.y;
}
""",
    unit="""
fn qu_q4_k(dm: vec2<f32>, sm: vec4<f32>, qa: u32, qb: u32) -> QU {   // from (d, dmin), scmin2's (sc, m) pair, 8 code bytes
    let a0 = dm.x * sm.x; let a1 = dm.x * sm.y;
    let b0 = -dm.y * sm.z; let b1 = -dm.y * sm.w;
    let A = vec4<f32>(16.0 * a0, 16.0 * a0, 16.0 * a1, 16.0 * a1);
    let C = vec4<f32>(b0 - A.x, b0 - A.x, b1 - A.z, b1 - A.z);
    return QU(m4(qa), m4(qb), m4(qa >> 4u), m4(qb >> 4u), A, C);
}
fn unit(rb: u32, u: u32) -> QU {
    let wi = (rb + 144u * (u >> 4u)) >> 2u;
    let c = (u >> 2u) & 3u; let i = u & 3u;
    let sm = scmin2(W[wi + 1u], W[wi + 2u], W[wi + 3u], c);
    return qu_q4_k(unpack2x16float(W[wi]), sm, W[wi + 4u + 8u * c + 2u * i], W[wi + 5u + 8u * c + 2u * i]);
}
""",
    e0="256u * (u >> 4u) + 64u * ((u >> 2u) & 3u) + 8u * (u & 3u)", offs=(0, 4, 32, 36))

_FORMATS["q5_k"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb)); let dmin = h2f(rd16(bb + 2u));
    let sb = j >> 3u; let l = 4u * (j & 7u);
    let lo = (rd32(bb + 48u + 32u * (j >> 4u) + l) >> ((sb & 1u) << 2u)) & 0x0f0f0f0fu;
    let hb = (rd32(bb + 16u + l) >> sb) & 0x01010101u;
    let sm = scmin(bb, sb);
    return (d * sm.x) * bytes4(lo | (hb << 4u)) - dmin * sm.y;
}
""",
    unit="""
fn unit(rb: u32, u: u32) -> QU {
    let wi = (rb + 176u * (u >> 4u)) >> 2u;
    let c = (u >> 2u) & 3u; let i = u & 3u;
    let dm = unpack2x16float(W[wi]);
    let sm = scmin2(W[wi + 1u], W[wi + 2u], W[wi + 3u], c);
    let ha = W[wi + 4u + 2u * i]; let hb = W[wi + 5u + 2u * i];
    let qa = W[wi + 12u + 8u * c + 2u * i]; let qb = W[wi + 13u + 8u * c + 2u * i];
    let s0 = 2u * c; let s1 = s0 + 1u;
    let a0 = dm.x * sm.x; let a1 = dm.x * sm.y;
    let b0 = -dm.y * sm.z; let b1 = -dm.y * sm.w;
    let A = vec4<f32>(32.0 * a0, 32.0 * a0, 32.0 * a1, 32.0 * a1);
    let C = vec4<f32>(b0 - A.x, b0 - A.x, b1 - A.z, b1 - A.z);
    return QU(m5((qa & 0x0f0f0f0fu) | (((ha >> s0) & 0x01010101u) << 4u)),
              m5((qb & 0x0f0f0f0fu) | (((hb >> s0) & 0x01010101u) << 4u)),
              m5(((qa >> 4u) & 0x0f0f0f0fu) | (((ha >> s1) & 0x01010101u) << 4u)),
              m5(((qb >> 4u) & 0x0f0f0f0fu) | (((hb >> s1) & 0x01010101u) << 4u)), A, C);
}
""",
    e0="256u * (u >> 4u) + 64u * ((u >> 2u) & 3u) + 8u * (u & 3u)", offs=(0, 4, 32, 36))

# q6_k: ql[128] qh[64] scales[16] (int8) d. Element e: half h = e/128, r = e%128: low 4 bits from
# ql[64h + r%64] (nibble r/64), high 2 bits from qh[32h + r%32] (bits 2*(r/32)), scale e/16.
# A GEMV unit (16 per block) is (h, i): ql bytes 64h + 8i .. +7, i.e. r = 8i.. and r = 64 + 8i...
_FORMATS["q6_k"] = _Format(
    dq4="""
fn dq4(bb: u32, j: u32) -> vec4<f32> {
    let h = j >> 5u; let r = 4u * (j & 31u);
    let lo = (rd32(bb + 64u * h + (r & 63u)) >> ((r >> 6u) << 2u)) & 0x0f0f0f0fu;
    let hi = (rd32(bb + 128u + 32u * h + (r & 31u)) >> ((r >> 5u) << 1u)) & 0x03030303u;
    let sc = sext8(rd8(bb + 192u + (j >> 2u)));
    let d = h2f(rd16(bb + 208u));
    return (d * sc) * vec4<f32>(vec4<i32>(unpack4xU8(lo | (hi << 4u))) - vec4<i32>(32));
}
""",
    unit="""
fn qu_q6_k(ql: vec2<u32>, qh: vec2<u32>, i: u32, a0: f32, a1: f32) -> QU {   // from 8 low-code bytes, 8 high-bit bytes, d * scales
    let t0 = (i >> 2u) << 1u; let t1 = t0 + 4u;
    let A = vec4<f32>(64.0 * a0, 64.0 * a0, 64.0 * a1, 64.0 * a1);
    let C = vec4<f32>(-96.0 * a0, -96.0 * a0, -96.0 * a1, -96.0 * a1);
    return QU(m6((ql.x & 0x0f0f0f0fu) | (((qh.x >> t0) & 0x03030303u) << 4u)),
              m6((ql.y & 0x0f0f0f0fu) | (((qh.y >> t0) & 0x03030303u) << 4u)),
              m6(((ql.x >> 4u) & 0x0f0f0f0fu) | (((qh.x >> t1) & 0x03030303u) << 4u)),
              m6(((ql.y >> 4u) & 0x0f0f0f0fu) | (((qh.y >> t1) & 0x03030303u) << 4u)), A, C);
}
fn unit(rb: u32, u: u32) -> QU {
    let bb = rb + 210u * (u >> 4u);
    let h = (u >> 3u) & 1u; let i = u & 7u;
    let ql = rd32x2(bb + 64u * h + 8u * i);
    let qh = rd32x2(bb + 128u + 32u * h + 8u * (i & 3u));
    let d = h2f(rd16(bb + 208u));
    return qu_q6_k(ql, qh, i, d * sext8(rd8(bb + 192u + 8u * h + (i >> 1u))), d * sext8(rd8(bb + 196u + 8u * h + (i >> 1u))));
}
""",
    e0="256u * (u >> 4u) + 128u * ((u >> 3u) & 1u) + 8u * (u & 7u)", offs=(0, 4, 64, 68))

# bf16: "blocks" of one element, 2 bytes; rb is the row's byte offset, elements past KLIM
# (the row length) read as 0 so a row needs no multiple-of-16 length.
_FORMATS["bfloat16"] = _Format(
    dq4="""
fn bf(rb: u32, e: u32) -> f32 { return select(0.0, bitcast<f32>(rd16(rb + 2u * e) << 16u), e < KLIM); }
fn dq4(rb: u32, e: u32) -> vec4<f32> {
    return vec4<f32>(bf(rb, e), bf(rb, e + 1u), bf(rb, e + 2u), bf(rb, e + 3u));
}
""",
    unit="""
fn bf2(w: u32) -> vec2<f32> { return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u)); }
fn bfg(rb: u32, e: u32) -> vec4<f32> {
    let w = rd32x2(rb + 2u * e);
    let v = vec4<f32>(bf2(w.x), bf2(w.y));
    if (KLIM % 16u == 0u) { return v; }
    return select(vec4<f32>(0.0), v, vec4<u32>(e) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(KLIM));
}
fn unit(rb: u32, u: u32) -> QU {
    let e = 16u * u;
    return QU(bfg(rb, e), bfg(rb, e + 4u), bfg(rb, e + 8u), bfg(rb, e + 12u), vec4<f32>(1.0), vec4<f32>(0.0));
}
""",
    e0="16u * u", offs=(0, 4, 8, 12), has_c=False)


def _fmt(dtype: dtypes.DType) -> _Format:
    f = _FORMATS.get(dtype.name)
    if f is None or dtype not in SUPPORTED:
        raise TypeError(f"{dtype} is not a supported GGML block type ({', '.join(d.name for d in SUPPORTED)})")
    return f


def _format_wgsl(dtype: dtypes.DType, exact: bool, klim: int, unit: bool) -> str:
    """Byte helpers + f16 decoder + (dq4 | unit) of one format, with KLIM (the bf16 row length)."""
    f = _fmt(dtype)
    s = f"const KLIM: u32 = {_u(klim)};\n" + _BYTES + (_H2F_EXACT if exact else _H2F_FAST)
    if dtype in (dtypes.q4_k, dtypes.q5_k):
        s += _SCMIN_K
    if unit:
        s += _MANT + _QU + f.unit
    else:
        s += f.dq4
    return s


# `dq4` and gguf.quants.dequantize agree bit for bit: every product is exact in f32 (an f16 scale
# has 11 significant bits, a sub-scale <= 8, a code <= 8: at most 23 bits), so the only rounding
# is the final add of q4_1/q5_1 (d*q + m) and the k-quants (d*sc*q - dmin*m), done once in both,
# and a fused multiply-add of an exact product rounds the same. The f16 decoder is integer-only.
_EXACTNESS = "bit-exact for every format"


# ----------------------------------------------------------------------------- dequantize

_DQ_WG = 256


def dequantize(out: Buffer, src: Buffer, dtype: dtypes.DType, numel: int, src_offset_blocks: int = 0) -> None:
    """Queue out[0:numel] (contiguous float32) = the GGML blocks of `src` starting at block
    `src_offset_blocks` (elements for bf16), decoded bit-identically to gguf.quants.dequantize."""
    dtype = dtypes.as_dtype(dtype)
    _fmt(dtype)   # raises TypeError for a type without a GPU decoder
    numel, off = int(numel), int(src_offset_blocks)
    if numel < 0 or off < 0:
        raise ValueError(f"dequantize({dtype.name}): numel={numel} and src_offset_blocks={off} must be >= 0")
    need = quant_nbytes(dtype, numel) + off * dtype.block_bytes
    if src.nbytes < need:
        raise ValueError(f"dequantize({dtype.name}): {numel} elements from block {off} need {need} bytes, "
                         f"the source buffer holds {src.nbytes}")
    if out.nbytes < numel * 4:
        raise ValueError(f"dequantize({dtype.name}): output buffer holds {out.nbytes} bytes, "
                         f"{numel * 4} needed for float32 [{numel}]")
    if out is src:
        raise ValueError(f"dequantize({dtype.name}): output and source are the same buffer")
    if numel == 0:
        return
    runtime.dispatch(*_dequantize_pass(out, src, dtype, numel, off))


def _dequantize_pass(out: Buffer, src: Buffer, dtype: dtypes.DType, numel: int, off: int) -> tuple:
    """(name, wgsl, bindings, grid) of dequantize (arguments already validated)."""
    groups = -(-numel // 4)
    base = off * dtype.block_bytes
    head = f"""
@group(0) @binding(1) var<storage, read> W: array<u32>;
{_format_wgsl(dtype, True, numel, False)}
@compute @workgroup_size({_DQ_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {{
    let g = ({runtime.WGSL_LINEAR_ID}) * {_DQ_WG}u + lid;
    if (g >= {_u(groups)}) {{ return; }}"""
    if dtype is dtypes.bfloat16:
        # bits straight through (a NaN payload survives); the tail of a numel % 4 != 0 is guarded
        body = f"""
@group(0) @binding(0) var<storage, read_write> O: array<u32>;{head}
    for (var c = 0u; c < 4u; c++) {{
        let e = 4u * g + c;
        if (e < KLIM) {{ O[e] = rd16({_u(base)} + 2u * e) << 16u; }}
    }}
}}
"""
    else:
        gpb = dtype.block_size // 4   # groups of 4 per block
        body = f"""
@group(0) @binding(0) var<storage, read_write> O: array<vec4<f32>>;{head}
    O[g] = dq4({_u(base)} + (g / {gpb}u) * {dtype.block_bytes}u, g % {gpb}u);
}}
"""
    return (f"dequantize_{dtype.name}", body, [(out, "rw"), (src, "read")], runtime.grid_for(-(-groups // _DQ_WG)))


# ----------------------------------------------------------------------------- x operand access


@dataclass
class _X:
    """The activation operand flattened to rows: element offset of row r, vector-load ability."""
    op: Operand
    rows: int
    K: int
    sk: int
    row_dims: list          # [(size, stride)] of the dims before K (outermost first), size > 1
    vec: bool               # 4 consecutive K elements at multiple-of-4 k form one aligned vector

    @staticmethod
    def of(x: Operand, K: int) -> "_X":
        shape, strides = tuple(int(s) for s in x.shape), tuple(int(s) for s in x.strides)
        rows = math.prod(shape[:-1])
        sk = strides[-1] if K > 1 else 1
        dims = [(n, s) for n, s in zip(shape[:-1], strides[:-1]) if n != 1]
        merged: list = []
        for n, s in dims:     # merge dims that step like one (row r -> offset r * stride)
            if merged and merged[-1][1] == s * n:
                merged[-1] = (merged[-1][0] * n, s)
            else:
                merged.append((n, s))
        vec = (sk == 1 and K % 4 == 0 and int(x.offset) % 4 == 0 and all(s % 4 == 0 for _, s in merged))
        return _X(x, rows, K, sk, merged, vec)

    def row_fn(self) -> str:
        """WGSL fn xrow(r) -> element offset of flattened row r (r < rows)."""
        off = _u(self.op.offset)
        if not self.row_dims:
            return f"fn xrow(r: u32) -> u32 {{ return {off}; }}\n"
        if len(self.row_dims) == 1:
            return f"fn xrow(r: u32) -> u32 {{ return {off} + r * {_u(self.row_dims[0][1])}; }}\n"
        lines = [f"fn xrow(r0: u32) -> u32 {{\n    var r = r0;\n    var o = {off};\n"]
        for n, s in reversed(self.row_dims):
            lines.append(f"    o += (r % {_u(n)}) * {_u(s)}; r = r / {_u(n)};\n")
        lines.append("    return o;\n}\n")
        return "".join(lines)

    def decl_and_loads(self, binding: int, native_f16: bool) -> tuple:
        """(declaration, load functions): xl(i) one element, xl4(i) elements i..i+3 of row offset
        + k (k a multiple of 4); the vector form only when `vec`."""
        f16 = self.op.dtype is dtypes.float16
        sk = _u(self.sk)
        if not f16:
            t = "vec4<f32>" if self.vec else "f32"
            one = "X[i >> 2u][i & 3u]" if self.vec else "X[i]"
            four = "X[i >> 2u]"
        elif native_f16:
            t = "vec4<f16>" if self.vec else "f16"
            one = "f32(X[i >> 2u][i & 3u])" if self.vec else "f32(X[i])"
            four = "vec4<f32>(X[i >> 2u])"
        else:
            t = "vec2<u32>" if self.vec else "u32"
            one = ("unpack2x16float(X[i >> 2u][(i >> 1u) & 1u])[i & 1u]" if self.vec
                   else "unpack2x16float(X[i >> 1u])[i & 1u]")
            four = "vec4<f32>(unpack2x16float(X[i >> 2u].x), unpack2x16float(X[i >> 2u].y))"
        decl = f"@group(0) @binding({binding}) var<storage, read> X: array<{t}>;\n"
        fns = f"fn xl(i: u32) -> f32 {{ return {one}; }}\n"
        if self.vec:
            fns += f"fn xl4(ro: u32, k: u32) -> vec4<f32> {{ let i = ro + k; return {four}; }}\n"
        else:
            fns += (f"fn xl4(ro: u32, k: u32) -> vec4<f32> {{\n    var v = vec4<f32>(0.0);\n"
                    f"    for (var c = 0u; c < 4u; c++) {{ if (k + c < {_u(self.K)}) {{ v[c] = xl(ro + (k + c) * {sk}); }} }}\n"
                    f"    return v;\n}}\n")
        return decl, fns


# ----------------------------------------------------------------------------- quant_matmul


@dataclass
class Launch:
    kind: str                     # "gemv", "tiled", "empty"
    passes: list = field(default_factory=list)   # [(name, wgsl, bindings, grid)]
    info: dict = field(default_factory=dict)


def quant_matmul(out: Buffer, x: Operand, w: Buffer, w_dtype: dtypes.DType, N: int, K: int, epilogue=None,
                 w_offset_blocks: int = 0) -> None:
    """Queue out[..., m, n] = epilogue(sum_k x[..., m, k] * W[n, k], i) with W the [N, K] GGML
    weight stored as GGUF blocks in `w` (row n = K/block_size consecutive blocks, starting at
    block `w_offset_blocks`), x a float32/float16 Operand [*batch, M, K] (any strides), out a
    contiguous float32 [*batch, M, N]; i = the element's linear index in out."""
    launch = plan_matmul(out, x, w, w_dtype, N, K, epilogue, w_offset_blocks)
    for name, wgsl, bindings, grid in launch.passes:
        runtime.dispatch(name, wgsl, bindings, grid)


def plan_matmul(out: Buffer, x: Operand, w: Buffer, w_dtype: dtypes.DType, N: int, K: int, epilogue=None,
                w_offset_blocks: int = 0, force: Optional[str] = None) -> Launch:
    """Validate and generate the dispatches of quant_matmul. `force` = "gemv" | "tiled" overrides
    the choice by M (tests cover both paths on every shape)."""
    w_dtype = dtypes.as_dtype(w_dtype)
    fmt = _fmt(w_dtype)
    N, K, woff = int(N), int(K), int(w_offset_blocks)
    ep = epilogue if epilogue is not None else NoEpilogue()
    if x.dtype not in (dtypes.float32, dtypes.float16):
        raise TypeError(f"quant_matmul: x has dtype {x.dtype}; float32 or float16 expected")
    if len(x.shape) < 1 or len(x.shape) != len(x.strides):
        raise ValueError(f"quant_matmul: x has shape {tuple(x.shape)} and strides {tuple(x.strides)}")
    if int(x.shape[-1]) != K:
        raise ValueError(f"quant_matmul: x {tuple(x.shape)} does not match weight [{N}, {K}] "
                         f"(x's last dim must be K={K})")
    if N <= 0 or K <= 0:
        raise ValueError(f"quant_matmul: weight [{N}, {K}] must have N > 0 and K > 0")
    if K % w_dtype.block_size:
        raise ValueError(f"quant_matmul: weight [{N}, {K}] of {w_dtype.name}: K={K} is not a multiple of the "
                         f"block size {w_dtype.block_size} (x is {tuple(x.shape)})")
    if woff < 0:
        raise ValueError(f"quant_matmul: w_offset_blocks={woff} must be >= 0")
    row_bytes = K // w_dtype.block_size * w_dtype.block_bytes
    wbase = woff * w_dtype.block_bytes
    need = wbase + N * row_bytes
    if w.nbytes < need:
        raise ValueError(f"quant_matmul: weight [{N}, {K}] {w_dtype.name} needs {need} bytes "
                         f"(from block {woff}), its buffer holds {w.nbytes}")
    dev = runtime.get_device()
    if w.nbytes > dev.max_binding_size:
        raise ValueError(f"quant_matmul: weight [{N}, {K}] {w_dtype.name} lives in a buffer of {w.nbytes} bytes, over "
                         f"the device's max_storage_buffer_binding_size {dev.max_binding_size}; split it by rows")
    X = _X.of(x, K)
    rows = X.rows
    numel = rows * N
    if out.nbytes < numel * 4:
        raise ValueError(f"quant_matmul: output buffer holds {out.nbytes} bytes, {numel * 4} needed for "
                         f"float32 {tuple(x.shape[:-1]) + (N,)}")
    bufs = [x.buffer, w] + [o.buffer for o in getattr(ep, "operands", ())]
    if any(b is out for b in bufs):
        raise ValueError("quant_matmul: the output buffer is also an input (x, w or an epilogue operand)")
    if x.buffer is w:
        raise ValueError("quant_matmul: x and the weight are the same buffer")
    if numel == 0:
        return Launch("empty")
    _check_x_bounds(x)

    kind = force or ("gemv" if rows <= TUNING["gemv_max_m"] else
                     "dequant" if TUNING["dequant_min_rows"] is not None and rows >= TUNING["dequant_min_rows"]
                     and _dequant_ok(dev, X, w_dtype, N, K) else "tiled")
    ctx = dict(dev=dev, X=X, w=w, dt=w_dtype, fmt=fmt, N=N, K=K, rb=row_bytes, wbase=wbase, ep=ep, out=out)
    if kind == "gemv" and rows == 1 and wbase == 0:
        one = _plan_gemv_row(X, w, w_dtype, N, K, ep, out)
        if one is not None:
            return one
    if kind == "gemv":
        return _plan_gemv(**ctx)
    if kind == "tiled":
        return _plan_tiled(**ctx)
    if kind == "dequant":
        if not _dequant_ok(dev, X, w_dtype, N, K):
            raise ValueError(f"quant_matmul: the dequant path needs x rows with one stride, a {w_dtype.name} "
                             f"block format (not bf16) and an f32 copy of the [{N}, {K}] weight within "
                             f"TUNING['dequant_max_bytes'] and the binding size limit")
        return _plan_dequant(**ctx)
    raise ValueError(f"quant_matmul: unknown path {force!r}")


def plan_stacked_matmul(out: Buffer, x: Operand, ws: list, w_dtype: dtypes.DType, Ns: list, K: int,
                        epilogue=None) -> Launch:
    """out[m, :] = epilogue(x[m] @ [W_0 | W_1 | ...].T) for GGML weights W_j [N_j, K] of one type,
    each a whole buffer of blocks: several projections of one x (LLaMA's q, k and v) in one
    tiled matmul (mm.plan's b_parts; each N_j but the last a multiple of 128). x is [M, K], any
    strides; out a contiguous float32 [M, sum(N_j)]."""
    w_dtype = dtypes.as_dtype(w_dtype)
    _fmt(w_dtype)
    ep = epilogue if epilogue is not None else NoEpilogue()
    K, Ns = int(K), [int(n) for n in Ns]
    if len(ws) != len(Ns) or len(ws) < 2:
        raise ValueError(f"quant stacked matmul: {len(ws)} weights for column counts {Ns} (two or more, one each)")
    if x.dtype not in (dtypes.float32, dtypes.float16) or len(x.shape) != 2 or int(x.shape[1]) != K:
        raise ValueError(f"quant stacked matmul: x {x.dtype} {tuple(x.shape)} must be float32/float16 [M, K={K}]")
    if K % w_dtype.block_size:
        raise ValueError(f"quant stacked matmul: K={K} is not a multiple of {w_dtype.name}'s block size {w_dtype.block_size}")
    for j, (w, n) in enumerate(zip(ws, Ns)):
        _check_weight("quant stacked matmul", j, w, w_dtype, n, K, (x.buffer, out))
    _check_x_bounds(x)
    a = Operand(x.buffer, x.dtype, (int(x.shape[0]), K), tuple(int(v) for v in x.strides), int(x.offset))
    bs = [Operand(w, w_dtype, (K, n), (1, K), 0) for w, n in zip(ws, Ns)]
    binds = _weight_bindings(w_dtype, len(ws))
    ml = mm.plan(out, a, bs[0], ep, force="tiled", b_binding=binds[0], b_parts=list(zip(bs[1:], binds[1:])))
    return Launch("empty") if ml.kind == "empty" else _launch("tiled", ml)


def plan_paired_matmul(out: Buffer, xs: list, ws: list, w_dtype: dtypes.DType, N: int, Ks: list,
                       epilogue=None) -> Launch:
    """out[m, :] = epilogue(sum_j x_j[m] @ W_j.T) for GGML weights W_j [N, K_j] of one type, each a
    whole buffer of blocks: products whose sum is wanted (GPT-NeoX's attention output and MLP down
    projections of a prompt or a batch) in one tiled matmul over the concatenated K (mm.plan's
    k_parts; every K_j but the last a multiple of 64). x_j are [M, K_j], any strides."""
    w_dtype = dtypes.as_dtype(w_dtype)
    _fmt(w_dtype)
    ep = epilogue if epilogue is not None else NoEpilogue()
    N, Ks = int(N), [int(k) for k in Ks]
    if not (len(xs) == len(ws) == len(Ks) >= 2):
        raise ValueError(f"quant paired matmul: {len(xs)} inputs, {len(ws)} weights, K parts {Ks} (two or more, one each)")
    for j, (x, w, k) in enumerate(zip(xs, ws, Ks)):
        if x.dtype not in (dtypes.float32, dtypes.float16) or len(x.shape) != 2 or int(x.shape[1]) != k:
            raise ValueError(f"quant paired matmul: x {j} {x.dtype} {tuple(x.shape)} must be float32/float16 [M, K={k}]")
        if k % w_dtype.block_size:
            raise ValueError(f"quant paired matmul: K={k} is not a multiple of {w_dtype.name}'s block size {w_dtype.block_size}")
        _check_weight("quant paired matmul", j, w, w_dtype, N, k, (x.buffer, out))
        _check_x_bounds(x)
    bs = [Operand(w, w_dtype, (k, N), (1, k), 0) for w, k in zip(ws, Ks)]
    binds = _weight_bindings(w_dtype, len(ws))
    ml = mm.plan(out, xs[0], bs[0], ep, force="tiled", b_binding=binds[0],
                 k_parts=[(x, b, bd) for x, b, bd in zip(xs[1:], bs[1:], binds[1:])])
    return Launch("empty") if ml.kind == "empty" else _launch("tiled", ml)


def _check_weight(fn: str, j: int, w: Buffer, w_dtype: dtypes.DType, n: int, k: int, others: tuple) -> None:
    """Weight j of a multi-weight matmul: [n, k] blocks of w_dtype fit its buffer and one binding,
    and it is none of `others` (the inputs, the output)."""
    dev = runtime.get_device()
    need = n * (k // w_dtype.block_size * w_dtype.block_bytes)
    if w.nbytes < need or w.nbytes > dev.max_binding_size:
        raise ValueError(f"{fn}: weight {j} [{n}, {k}] {w_dtype.name} needs {need} bytes in a "
                         f"binding of at most {dev.max_binding_size}; its buffer holds {w.nbytes}")
    if any(w is o for o in others):
        raise ValueError(f"{fn}: weight {j} is also an input or the output")


def _weight_bindings(w_dtype: dtypes.DType, n: int) -> list:
    """The decoding bindings of n weights of one type in one tiled matmul: mm_b / W, then
    mm_b1 / W1, ... (renamed decoder copies, each reading its own array)."""
    dev = runtime.get_device()
    fast = bool(TUNING["tiled_fast_decode"])
    return [_WeightBinding("mm_b" if j == 0 else f"mm_b{j}", w_dtype, 4, dev.has_f16, fast, "W" if j == 0 else f"W{j}")
            for j in range(n)]


def _check_x_bounds(x: Operand) -> None:
    if any(int(s) == 0 for s in x.shape):
        return
    lo = int(x.offset) + sum(min(0, (int(n) - 1) * int(s)) for n, s in zip(x.shape, x.strides))
    hi = int(x.offset) + sum(max(0, (int(n) - 1) * int(s)) for n, s in zip(x.shape, x.strides))
    cap = int(x.buffer.nbytes // x.dtype.gpu_itemsize)
    if lo < 0 or hi >= cap:
        raise ValueError(f"quant_matmul: x view (shape {tuple(x.shape)}, strides {tuple(x.strides)}, offset "
                         f"{x.offset}) reaches elements [{lo}, {hi}] of a buffer holding {cap} {x.dtype.name} elements")


def _header(dev, X: _X, ep) -> str:
    """Module text shared by both kernels: bindings out (0), X (1), W (2), epilogue (3..)."""
    native = dev.has_f16
    xdecl, xfns = X.decl_and_loads(1, native)
    ep_lines = ep.wgsl(3).splitlines(keepends=True)
    enables = [ln.strip() for ln in ep_lines if ln.lstrip().startswith("enable ")]
    ep_text = "".join(ln for ln in ep_lines if not ln.lstrip().startswith("enable "))
    if native and X.op.dtype is dtypes.float16:
        enables.insert(0, "enable f16;")
    h = "".join(e + "\n" for e in dict.fromkeys(enables))
    h += "@group(0) @binding(0) var<storage, read_write> OUT: array<f32>;\n" + xdecl
    h += "@group(0) @binding(2) var<storage, read> W: array<u32>;\n" + ep_text + xfns + X.row_fn()
    return h


def _plan_gemv_row(X: _X, w: Buffer, dt: dtypes.DType, N: int, K: int, ep, out: Buffer) -> Optional[Launch]:
    """One x row: kernels/gemv.py's decode GEMV (the one `tg.nn.linear` uses, so decode has one
    kernel to tune), where it takes the case (unit-stride x at an aligned offset, not bf16)."""
    from . import gemv
    x1 = Operand(X.op.buffer, X.op.dtype, (1, K), (K, 1), int(X.op.offset))
    if X.sk != 1 or not gemv.supported(x1, dt, K):
        return None
    name, wgsl, binds, grid, info = gemv.plan(out, x1, w, dt, N, K, ep)
    return Launch("gemv", [(name, wgsl, binds, grid)], info)


def _gemv_config(K: int, mt: int) -> tuple:
    upr = -(-K // 16)
    threads = TUNING["gemv_threads"] or (256 if upr >= 256 else 128 if upr >= 96 else 64 if upr >= 48 else 32)
    rows = TUNING["gemv_rows"] or (4 if mt <= 2 else 2)
    return int(threads), int(rows)


def _plan_gemv(dev, X, w, dt, fmt, N, K, rb, wbase, ep, out) -> Launch:
    """One dispatch: workgroup g takes row group g % groups of x-row chunk g / groups."""
    mt = max(1, min(int(TUNING["gemv_m_chunk"]), X.rows))
    threads, R = _gemv_config(K, mt)
    R = max(1, min(R, N))
    if dt is dtypes.bfloat16 and K % 16 and X.vec:
        X = _X(X.op, X.rows, X.K, X.sk, X.row_dims, False)   # guarded x loads past the row end
    wgsl, grid = _gemv_wgsl(dev, X, dt, fmt, N, K, rb, wbase, ep, mt, threads, R)
    binds = [(out, "rw"), (X.op.buffer, "read"), (w, "read")] + epilogue_bindings(ep)
    return Launch("gemv", [(f"qgemv_{dt.name}", wgsl, binds, grid)],
                  {"threads": threads, "rows": R, "m_chunk": mt, "x_vec": X.vec})


def _gemv_wgsl(dev, X, dt, fmt, N, K, rb, wbase, ep, mt, T, R) -> tuple:
    upr = -(-K // 16)
    groups = -(-N // R)
    chunks = -(-X.rows // mt)
    sg = dev.has_subgroups
    RM = R * mt
    s = [_header(dev, X, ep), _format_wgsl(dt, False, K, True)]
    s.append(f"const N: u32 = {_u(N)};\nconst RB: u32 = {_u(rb)};\nconst WB: u32 = {_u(wbase)};\n")
    s.append(f"var<workgroup> red: array<f32, {RM * (T // 4 if sg else T)}>;\n")
    b = ("@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
         "@builtin(local_invocation_index) lid: u32")
    if sg:
        b += ", @builtin(subgroup_invocation_id) sgl: u32, @builtin(subgroup_id) sgid: u32, @builtin(num_subgroups) nsg: u32"
    s.append(f"@compute @workgroup_size({T})\nfn main({b}) {{\n")
    # past the end (N or x rows): clamped reads, no store; no early return before the barriers
    # consecutive workgroups take the x-row chunks of one weight row group: a weight row is
    # fetched from memory once and re-read from L2 by the other chunks (a batch of sequences)
    s.append(f"    let g = {runtime.WGSL_LINEAR_ID};\n    let n0 = (g / {_u(chunks)}) * {R}u;\n"
             f"    let m0 = (g % {_u(chunks)}) * {mt}u;\n")
    for r in range(R):
        s.append(f"    let rb{r} = WB + min(n0 + {r}u, N - 1u) * RB;\n")
    for m in range(mt):
        s.append(f"    let xo{m} = xrow(min(m0 + {m}u, {_u(X.rows - 1)}));\n")
        for r in range(R):
            s.append(f"    var acc{r}_{m} = 0.0;\n")
    s.append(f"    for (var u = lid; u < {_u(upr)}; u += {T}u) {{\n")
    s.append(f"        let e0 = {fmt.e0};\n")
    for m in range(mt):
        for g, o in enumerate(fmt.offs):
            s.append(f"        let x{g}_{m} = xl4(xo{m}, e0 + {o}u);\n")
        if fmt.has_c:
            s.append(f"        let sx{m} = vec4<f32>(dot(x0_{m}, vec4<f32>(1.0)), dot(x1_{m}, vec4<f32>(1.0)), "
                     f"dot(x2_{m}, vec4<f32>(1.0)), dot(x3_{m}, vec4<f32>(1.0)));\n")
    for r in range(R):
        s.append(f"        {{\n            let q = unit(rb{r}, u);\n")
        for m in range(mt):
            t = (f"dot(q.a, vec4<f32>(dot(q.v0, x0_{m}), dot(q.v1, x1_{m}), dot(q.v2, x2_{m}), dot(q.v3, x3_{m})))")
            if fmt.has_c:
                t += f" + dot(q.c, sx{m})"
            s.append(f"            acc{r}_{m} += {t};\n")
        s.append("        }\n")
    s.append("    }\n")
    accs = [(r, m) for r in range(R) for m in range(mt)]
    if sg:
        for k, (r, m) in enumerate(accs):
            s.append(f"    let t{k} = subgroupAdd(acc{r}_{m});\n")
        s.append("    if (sgl == 0u) {\n")
        for k in range(RM):
            s.append(f"        red[sgid * {RM}u + {k}u] = t{k};\n")
        s.append("    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {RM}u) {{\n        var v = 0.0;\n"
                 f"        for (var j = 0u; j < nsg; j++) {{ v += red[j * {RM}u + lid]; }}\n")
    else:
        for k, (r, m) in enumerate(accs):
            s.append(f"    red[{k * T}u + lid] = acc{r}_{m};\n")
        s.append(f"    for (var h = {T // 2}u; h > 0u; h >>= 1u) {{\n        workgroupBarrier();\n"
                 f"        if (lid < h) {{\n")
        for k in range(RM):
            s.append(f"            red[{k * T}u + lid] += red[{k * T}u + lid + h];\n")
        s.append("        }\n    }\n    workgroupBarrier();\n")
        s.append(f"    if (lid < {RM}u) {{\n        let v = red[lid * {T}u];\n")
    # output slot lid = r * mt + m
    s.append(f"        let n = n0 + lid / {mt}u;\n        let m = m0 + lid % {mt}u;\n"
             f"        if (n < N && m < {_u(X.rows)}) {{ let i = m * N + n; OUT[i] = epilogue(v, i); }}\n    }}\n}}\n")
    return "".join(s), runtime.grid_for(groups * chunks)


def _dequant_ok(dev, X: _X, dt: dtypes.DType, N: int, K: int) -> bool:
    nbytes = N * K * 4
    return (dt is not dtypes.bfloat16 and len(X.row_dims) <= 1 and nbytes <= TUNING["dequant_max_bytes"]
            and nbytes <= dev.max_binding_size)


def _mm_operands(X: _X, w: Buffer, dt: dtypes.DType, N: int, K: int, wbase: int) -> tuple:
    """(a, b) for the float matmul: x as [*batch, M, K] (its row dims, merged), W as b = W.T
    [*batch, K, N] (batch stride 0), counted in elements of a virtual row-major [N, K] matrix
    (element n*K + k) starting at the weight's first element."""
    dims = X.row_dims or [(1, 0)]
    shape = tuple(n for n, _ in dims) + (K,)
    a = Operand(X.op.buffer, X.op.dtype, shape, tuple(s for _, s in dims) + (X.sk,), int(X.op.offset))
    woff = wbase // dt.block_bytes * dt.block_size
    b = Operand(w, dt, shape[:-2] + (K, N), (0,) * (len(dims) - 1) + (1, K), woff)
    return a, b


def _launch(kind: str, ml, pre: tuple = ()) -> Launch:
    """A quant Launch of the float matmul's dispatches (main pass + split-K reduction)."""
    return Launch(kind, list(pre) + ml.passes, dict(ml.info))


def _plan_dequant(dev, X, w, dt, fmt, N, K, rb, wbase, ep, out) -> Launch:
    """Prefill (many x rows): decode the whole weight once into an f32 scratch [N, K] (exact, a
    bandwidth-bound pass: ~2% of the matmul's time at 512 rows) and run the float tiled matmul
    on it. Opt-in only (TUNING["dequant_min_rows"]): it materialises a float copy of W."""
    scratch = mm._scratch_buffer("dequant_w", N * K * 4)
    dq = _dequantize_pass(scratch, w, dt, N * K, wbase // dt.block_bytes)
    a, _ = _mm_operands(X, w, dt, N, K, wbase)
    b = Operand(scratch, dtypes.float32, (K, N), (1, K), 0)
    return _launch("dequant", mm.plan(out, a, b, ep, force="tiled"), (dq,))


def _plan_tiled(dev, X, w, dt, fmt, N, K, rb, wbase, ep, out) -> Launch:
    """Prefill: the float tiled matmul with W as its operand b, read through `_WeightBinding`.
    Why: prefill shapes (M = 512) need the float path's tile-shape and split-K planning (and its
    reduce pass, which applies the epilogue) to fill the GPU; sharing the kernel gives quantized
    weights the same tuning, while each W element is still decoded from the GGUF blocks in
    registers on its way to workgroup memory, so no float copy of W is ever made."""
    a, b = _mm_operands(X, w, dt, N, K, wbase)
    return _launch("tiled", mm.plan(out, a, b, ep, force="tiled", b_binding=_weight_bindings(dt, 1)[0]))


# Tiled-path loads of 4 consecutive weights (group j of the block at byte bb) for the formats
# prefill uses most. Why not dq4: its int->float conversions are quarter-rate instructions on
# NVIDIA, paid for every W element of every K step. Here the codes go under the mantissa of 1.0
# (m<B>: 1 + q/2^B, a shift and an and-or) and one fma applies the scale: A*(1 + q/2^B) + C with
# A = 2^B d, C = -(2^B + offset) d. Bit-identical to dq4 for finite scales: A*(1 + q/2^B) =
# d*(2^B + q) is exact in f32 (an 11-bit f16 scale times a <= 9-bit integer), and the fma rounds
# d*(q - offset) once, which is exact too. (bits, WGSL fn wld4(bb, j)).
_TILED_LD4 = {
    "q4_0": (4, """
fn wld4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb));
    let q = rd32(bb + 2u + 4u * (j & 3u)) >> ((j >> 2u) << 2u);
    return fma(vec4<f32>(16.0 * d), m4(q), vec4<f32>(-24.0 * d));
}
"""),
    "q8_0": (8, """
fn wld4(bb: u32, j: u32) -> vec4<f32> {
    let d = h2f(rd16(bb));
    return fma(vec4<f32>(256.0 * d), m8(rd32(bb + 2u + 4u * j) ^ 0x80808080u), vec4<f32>(-384.0 * d));
}
"""),
}


@dataclass
class _WeightBinding(mm._Binding):
    """GGUF blocks bound as `W: array<u32>`, loaded as the float matmul's b: element i of the
    virtual row-major [N, K] float matrix is element i % BS of block i / BS. The 4 elements an
    aligned vector load asks for (i a multiple of 4) lie in one block, so one `wld4` (or `dq4`)
    decodes them in registers; the scalar load (unaligned views) takes one lane of that.
    `fast`: the `_TILED_LD4` decoder where the format has one (TUNING["tiled_fast_decode"]).
    `arr`: the storage array's name; a weight stacked after the first (mm.plan's b_parts) is
    `W1`, `W2`, ..., with copies of the decoders that read it (renamed) and the shared helpers
    left to the first."""
    fast: bool = True
    arr: str = "W"

    def decl(self, binding: int) -> str:
        return f"@group(0) @binding({binding}) var<storage, read> {self.arr}: array<u32>;\n"

    def functions(self) -> str:
        bs, bb, X = self.dtype.block_size, self.dtype.block_bytes, self.name
        src = _format_wgsl(self.dtype, False, _U32 - 1, False)
        fast = _TILED_LD4.get(self.dtype.name) if self.fast else None
        if fast:
            src += _mant(fast[0]) + fast[1]
        dec = "wld4" if fast else "dq4"
        if self.arr != "W":
            from .gemv import _reading_copy
            sfx = "_" + self.arr
            src, dec = _reading_copy(src, "W", self.arr, sfx), dec + sfx
        return (src + f"fn ld4_{X}(i: u32) -> vec4<f32> {{ return {dec}((i / {bs}u) * {bb}u, (i % {bs}u) >> 2u); }}\n"
                f"fn ld_{X}(i: u32) -> f32 {{ return ld4_{X}(i & ~3u)[i & 3u]; }}\n")
