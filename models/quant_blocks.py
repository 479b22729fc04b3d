"""GGML block quantizers in NumPy, bit-identical to ggml's reference quantizers.

llama-quantize without an importance matrix writes every block with ggml's `quantize_row_*_ref`
(ggml-quants.c). Those are plain C loops over float32: a block's bytes depend on the exact order
of every float32 addition and on C's conversions (`nearest_int`'s magic-number rounding, `roundf`,
float -> int8 truncation). To give the same bytes, this module does the same float32 operations in
the same order, but over many blocks at once: each array holds one lane of the block loop for
every block (layout (elements per group, groups)), and a running sum over a block is a Python loop
over its 16 or 32 lanes (`_running_sum`), never `np.sum` (pairwise summation rounds differently).
Work goes in chunks of 64K floats (temporaries stay in the CPU caches, memory stays bounded on a
large embedding matrix), on a thread pool: NumPy releases the GIL inside its loops.

The signs of zeros and the NaNs of an overflowed fit follow the C code too (a max scan that starts
from +0.0, comparisons that a NaN never wins): models/quant-reference holds ggml's own bytes for
such rows, and tests/test_quantize.py compares every type against them.

Where the C code reads a value it wrote earlier (a k-quant's 6-bit sub-block scale, its f16
super-block scale) this code recomputes the same value rather than unpacking it.

Entry point: `quantize_rows(x, type_name)`: float32 [rows, n] -> uint8 [rows, bytes per row].
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

__all__ = ["BLOCK_LAYOUT", "QUANT_TYPES", "quantize_rows", "row_bytes"]

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)   # ggml-quants.c: a group whose largest |x| is below this is all zeros
_MAGIC = F32(12582912.0)     # 1.5 * 2**23: nearest_int's rounding constant
CHUNK_ELEMENTS = 1 << 16     # floats per chunk: a chunk's temporaries stay in the CPU caches
THREADS = min(os.cpu_count() or 1, 16)   # chunks quantized at once (NumPy releases the GIL in its loops)

# type -> (elements per block, bytes per block); f16/f32 are the plain fallbacks
BLOCK_LAYOUT = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
                "q4_k": (QK_K, 144), "q5_k": (QK_K, 176), "q6_k": (QK_K, 210), "f16": (1, 2), "f32": (1, 4)}
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of one row of n elements in `type_name` (n a multiple of its block size)."""
    bs, bb = BLOCK_LAYOUT[type_name]
    return n // bs * bb


# ----------------------------------------------------------------------------- C semantics


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: adds 1.5 * 2**23 in float32 and reads the low mantissa bits (round half
    to even for |v| < 2**22; the same bit pattern as C for any finite input). int32."""
    return ((v + _MAGIC).view(np.int32) & 0x007FFFFF) - 0x00400000


def _trunc_to_int32(v: np.ndarray) -> np.ndarray:
    """C's float -> int conversion as x86-64 does it (cvttss2si): truncation toward zero, and
    0x80000000 for NaN, infinities and values outside int32."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(v) & (np.abs(v) < F32(2.0 ** 31))
        return np.where(ok, np.trunc(np.where(ok, v, 0)), -2.0 ** 31).astype(np.int64).astype(np.int32)


def _as_int8(v: np.ndarray) -> np.ndarray:
    """(int8_t) of a float: the low byte of the int32 conversion, signed."""
    return _trunc_to_int32(v).astype(np.int8)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (float64 holds v + 0.5 exactly for float32 v)."""
    d = v.astype(np.float64)
    return np.trunc(d + np.copysign(0.5, d))


def _f16_bits(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even, like NumPy's cast) as uint16 bits."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).view(np.uint16)


def _f16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the value a block stores for scale v."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(F32)


def _running_sum(terms, start=None) -> np.ndarray:
    """C's `acc += term` loop in float32 over the lanes (axis 0) of `terms`, from 0 (or `start`)."""
    acc = np.zeros(terms.shape[1:], F32) if start is None else start.copy()
    for t in terms:
        acc += t
    return acc


def _pick(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, idx[None], axis=0)[0]


def _first_absmax(x: np.ndarray):
    """(amax, max) as ggml's strict `amax < |v|` scan from amax = max = 0 finds them: the signed value
    at the first lane of largest magnitude, and +0.0 (not a -0.0 lane) when every lane is zero; a NaN
    lane (an overflowed fit) never compares greater."""
    a = np.abs(x)
    with np.errstate(invalid="ignore"):
        a = np.where(a == a, a, F32(-1))
        v = _pick(x, np.argmax(a, axis=0))
        amax = np.where(_pick(a, np.argmax(a, axis=0)) > 0, np.abs(v), F32(0))
    return amax, np.where(amax > 0, v, F32(0))


def _u16_bytes(v: np.ndarray) -> np.ndarray:
    """uint16 [groups] -> uint8 [groups, 2] little-endian."""
    return v.astype("<u2").view(np.uint8).reshape(-1, 2)


def _u32_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<u4").view(np.uint8).reshape(-1, 4)


# ----------------------------------------------------------------------------- 32-element blocks
# Arrays are lane-major: x[j, b] is element j of block b.


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.max(np.abs(x), axis=0)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    with np.errstate(invalid="ignore", over="ignore"):
        q = _roundf(x * inv).astype(np.int64).astype(np.int8)
    return np.concatenate([_u16_bytes(_f16_bits(d)), q.T.view(np.uint8)], axis=1)


def _signed_scale(x: np.ndarray, div: int):
    """q4_0/q5_0: d = (the value of largest magnitude) / -div, and its inverse (0 when d is 0)."""
    _, vmax = _first_absmax(x)
    d = vmax / F32(-div)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return d, inv


def _min_max_scale(x: np.ndarray, levels: int):
    """q4_1/q5_1: (min, d = (max - min) / levels, inverse of d or 0)."""
    lo = _pick(x, np.argmin(x, axis=0))   # the first lane holding it: keeps the sign of a zero
    hi = _pick(x, np.argmax(x, axis=0))
    with np.errstate(over="ignore", invalid="ignore"):
        d = (hi - lo) / F32(levels)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    return lo, d, inv


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """32 codes per block (lane-major, low 4 bits used) -> 16 bytes: byte j = q[j] | q[j + 16] << 4."""
    return ((q[:16] & 0x0F) | ((q[16:] & 0x0F) << 4)).astype(np.uint8).T


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 codes -> one little-endian uint32 (bit j for element j)."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)[:, None]
    return np.bitwise_or.reduce(bits, axis=0)


def _q4_0(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_scale(x, 8)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.minimum(15, _as_int8(x * inv + F32(8.5)).astype(np.int16)).astype(np.uint8)
    return np.concatenate([_u16_bytes(_f16_bits(d)), _pack_nibbles(q)], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    lo, d, inv = _min_max_scale(x, 15)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.minimum(15, _as_int8((x - lo) * inv + F32(0.5)).astype(np.int16)).astype(np.uint8)
    return np.concatenate([_u16_bytes(_f16_bits(d)), _u16_bytes(_f16_bits(lo)), _pack_nibbles(q)], axis=1)


def _q5_0(x: np.ndarray) -> np.ndarray:
    d, inv = _signed_scale(x, 16)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.minimum(31, _as_int8(x * inv + F32(16.5)).astype(np.int16)).astype(np.uint8)
    return np.concatenate([_u16_bytes(_f16_bits(d)), _u32_bytes(_high_bits(q)), _pack_nibbles(q)], axis=1)


def _q5_1(x: np.ndarray) -> np.ndarray:
    lo, d, inv = _min_max_scale(x, 31)
    with np.errstate(invalid="ignore", over="ignore"):
        q = _trunc_to_int32((x - lo) * inv + F32(0.5)).astype(np.uint8)  # (uint8_t): the low byte
    return np.concatenate([_u16_bytes(_f16_bits(d)), _u16_bytes(_f16_bits(lo)), _u32_bytes(_high_bits(q)),
                           _pack_nibbles(q)], axis=1)


# ----------------------------------------------------------------------------- k-quant helpers


def _codes(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """clip(nearest_int(v), lo, hi) as float32, in place in v. nearest_int is round-half-even for
    |v| < 2**22, where np.rint gives the same integers faster; outside (an overflowed fit: inf, NaN,
    huge) the magic-number emulation keeps C's bit pattern."""
    vmax, vmin = v.max(), v.min()
    if vmax < F32(2.0 ** 22) and vmin >= F32(-2.0 ** 22):    # False for NaN
        np.rint(v, out=v)
    else:
        v[...] = _nearest_int(v)
    return np.clip(v, lo, hi, out=v)


def _weighted_sq_error(w, x, scale, L, minv, buf) -> np.ndarray:
    """sum over lanes of w * (scale * L + min - x)^2, each product and sum rounded as the C loop does."""
    np.multiply(L, scale, out=buf)
    buf += minv
    buf -= x
    buf *= buf
    buf *= w
    return _running_sum(buf)


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad false) for 32-lane groups: codes L in [0, nmax], scale and the
    (positive) min such that x ~ scale * L - min. Tries nstep + 1 rescalings of the range and keeps
    the weighted least-squares fit with the smallest weighted error; each try starts from the
    min the best fit so far chose, as the C loop does. Returns (L float32, scale, the_min)."""
    nmax_f = F32(nmax)
    lo = np.minimum(np.min(x, axis=0), F32(0))
    hi = np.max(x, axis=0)
    flat = hi == lo                      # C returns at once: all codes 0, scale 0
    sum_w = _running_sum(w[1:], start=w[0])
    wx = w * x
    sum_x = _running_sum(wx[1:], start=wx[0])
    Laux, wl, buf = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / np.where(flat, F32(1), hi - lo)
        scale = F32(1) / iscale
        L = _codes(np.multiply(np.subtract(x, lo, out=buf), iscale, out=buf), 0, nmax).copy()
        best = _weighted_sq_error(w, x, scale, L, lo, buf)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / np.where(flat, F32(1), hi - lo)
            _codes(np.multiply(np.subtract(x, lo, out=Laux), iscale, out=Laux), 0, nmax)
            np.multiply(w, Laux, out=wl)
            sum_l = _running_sum(wl)
            sum_l2 = _running_sum(np.multiply(wl, Laux, out=buf))
            sum_xl = _running_sum(np.multiply(wl, x, out=buf))
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, F32(0), this_min)
            cur = _weighted_sq_error(w, x, this_scale, Laux, this_min, buf)
            better = (D > 0) & (cur < best) & ~flat
            if better.any():
                np.copyto(L, Laux, where=better[None])
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                lo = np.where(better, this_min, lo)
    L[:, flat] = 0
    return L, np.where(flat, F32(0), scale), -lo


def _make_qx(x, nmax: int):
    """make_qx_quants with rmse_type 1 (weights x*x) for 16-lane groups: codes in [0, 2 nmax) and
    the scale (x ~ scale * (L - nmax)); tries 18 scales around -nmax / max and keeps the best fit."""
    amax, vmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    nmax_f = F32(nmax)
    w = x * x
    wx = w * x                           # C: w*x[i]*l is (w*x)*l
    l, buf = np.empty_like(x), np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        vsafe = np.where(zero, F32(1), vmax)
        iscale = F32(-nmax) / vsafe
        _codes(np.multiply(x, iscale, out=l), -nmax, nmax - 1)
        sumlx = _running_sum(np.multiply(wx, l, out=buf))
        suml2 = _running_sum(np.multiply(np.multiply(w, l, out=buf), l, out=buf))
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        L = l + nmax_f
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            iscale = -(nmax_f + F32(0.1) * F32(i)) / vsafe
            _codes(np.multiply(x, iscale, out=l), -nmax, nmax - 1)
            sumlx = _running_sum(np.multiply(wx, l, out=buf))
            suml2 = _running_sum(np.multiply(np.multiply(w, l, out=buf), l, out=buf))
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                np.copyto(L, np.add(l, nmax_f, out=buf), where=better[None])
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
    L[:, zero] = 0
    return L, np.where(zero, F32(0), scale)


def _qkx_blocks(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The common part of q4_k and q5_k for super-blocks x [256, blocks] (lane-major): 8 sub-blocks
    of 32 fitted by make_qkx2 with weights sqrt(mean x^2) + |x|, their scales and mins quantized to
    6 bits against the largest of each, then every code recomputed from the stored scales.
    Returns (codes [256, blocks] uint8, d bits, dmin bits, the 12 packed scale bytes [blocks, 12])."""
    nb = x.shape[1]
    xs = x.reshape(8, 32, nb).transpose(1, 0, 2).reshape(32, 8 * nb)  # [lane, sub-block * blocks]
    sum_x2 = _running_sum(xs * xs)
    av_x = np.sqrt(sum_x2 / F32(32))
    w = av_x + np.abs(xs)
    L, scales, mins = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(8, nb), mins.reshape(8, nb)
    max_scale = np.fmax(np.fmax.reduce(scales, axis=0), F32(0))   # `if (scale > max_scale)`: NaN never wins
    max_min = np.fmax(np.fmax.reduce(mins, axis=0), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(_nearest_int(inv_scale * scales).astype(np.uint8), 63)  # uint8_t, then MIN(63, .)
    lm = np.minimum(_nearest_int(inv_min * mins).astype(np.uint8), 63)
    packed = np.concatenate([ls[:4] | ((ls[4:] >> 4) << 6), lm[:4] | ((lm[4:] >> 4) << 6),
                             (ls[4:] & 0x0F) | ((lm[4:] & 0x0F) << 4)], axis=0).T
    d_val = max_scale / F32(63)
    m_val = max_min / F32(63)
    d = _f16_round(d_val)[None] * ls.astype(F32)      # [8, blocks]
    dm = _f16_round(m_val)[None] * lm.astype(F32)
    xb = xs.reshape(32, 8, nb)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        again = np.clip(_nearest_int((xb + dm[None]) / d[None]), 0, nmax).astype(F32)
    L = np.where(d[None] != 0, again, L.reshape(32, 8, nb))                   # d == 0: keep the fit's codes
    codes = L.transpose(1, 0, 2).reshape(256, nb).astype(np.uint8)
    return codes, _f16_bits(d_val), _f16_bits(m_val), packed


def _q4_k(x: np.ndarray) -> np.ndarray:
    codes, d, dmin, scales = _qkx_blocks(x, 15, -1.0, 20)
    c = codes.reshape(4, 2, 32, -1)                              # [64-group, half, lane, block]
    qs = (c[:, 0] | (c[:, 1] << 4)).reshape(128, -1).T
    return np.concatenate([_u16_bytes(d), _u16_bytes(dmin), scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    codes, d, dmin, scales = _qkx_blocks(x, 31, -0.5, 15)
    c = codes.reshape(4, 2, 32, -1)
    low = c & 0x0F
    qs = (low[:, 0] | (low[:, 1] << 4)).reshape(128, -1).T
    hi = (c >> 4).astype(np.uint8)                                # [group k, half, lane, block]
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None, None, None] + np.arange(2, dtype=np.uint8)[None, :, None, None]
    qh = np.bitwise_or.reduce((hi << shifts).reshape(8, 32, -1), axis=0).T
    return np.concatenate([_u16_bytes(d), _u16_bytes(dmin), scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[1]
    xs = x.reshape(16, 16, nb).transpose(1, 0, 2).reshape(16, 16 * nb)   # [lane, sub-block * blocks]
    L, scales = _make_qx(xs, 32)
    scales = scales.reshape(16, nb)
    amax, vmax = _first_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / vmax
        d_val = F32(1) / iscale
        sc = np.minimum(127, _nearest_int(iscale * scales)).astype(np.int8)
    d_val = np.where(zero, F32(0), d_val)
    sc = np.where(zero[None], np.int8(0), sc)
    d = _f16_round(d_val)[None] * sc.astype(F32)                    # [16, blocks]
    xb = xs.reshape(16, 16, nb)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        again = np.clip(_nearest_int(xb / d[None]), -32, 31).astype(F32) + F32(32)
    L = np.where(d[None] != 0, again, L.reshape(16, 16, nb))
    codes = L.transpose(1, 0, 2).reshape(256, nb).astype(np.uint8)
    codes = np.where(zero[None], np.uint8(0), codes)
    c = codes.reshape(2, 4, 32, nb)                                  # [128-half, quarter, lane, block]
    ql = np.concatenate([(c[:, 0] & 0x0F) | ((c[:, 2] & 0x0F) << 4),
                         (c[:, 1] & 0x0F) | ((c[:, 3] & 0x0F) << 4)], axis=1).reshape(128, nb).T
    h = c >> 4
    qh = (h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)).reshape(64, nb).T
    return np.concatenate([ql, qh, sc.T.view(np.uint8), _u16_bytes(_f16_bits(d_val))], axis=1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1,
    "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k,
}


def quantize_rows(x: np.ndarray, type_name: str, threads: Optional[int] = None) -> np.ndarray:
    """float32 [rows, n] -> uint8 [rows, row_bytes(type_name, n)]: each row's blocks as ggml's
    reference quantizer writes them (f16 / f32: plain conversions). n must be a multiple of the
    type's block size; values must be finite (the caller checks, naming the tensor). Chunks of
    blocks are quantized on `threads` threads (default THREADS); every block's bytes depend on
    that block alone, so the result does not depend on the chunking."""
    if type_name not in BLOCK_LAYOUT:
        raise ValueError(f"quantize_rows: unknown type {type_name!r}; known: {', '.join(BLOCK_LAYOUT)}")
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows: expected a 2-D array [rows, n], got shape {x.shape}")
    rows, n = x.shape
    bs, bb = BLOCK_LAYOUT[type_name]
    if n % bs:
        raise ValueError(f"quantize_rows: row length {n} is not a multiple of the {type_name} block size {bs}")
    if type_name == "f32":
        return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(rows, n * 4)
    if type_name == "f16":
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x, dtype=np.float32).astype("<f2").view(np.uint8).reshape(rows, n * 2)
    fn = _QUANTIZERS[type_name]
    out = np.empty((rows, n // bs * bb), np.uint8)
    flat_out = out.reshape(-1, bb)
    blocks = np.ascontiguousarray(x, dtype=F32).reshape(-1, bs)
    step = max(1, CHUNK_ELEMENTS // bs)

    def one(start: int) -> None:
        chunk = blocks[start:start + step]
        flat_out[start:start + len(chunk)] = fn(np.ascontiguousarray(chunk.T))

    starts = range(0, len(blocks), step)
    workers = min(THREADS if threads is None else max(1, threads), len(starts))
    if workers <= 1:
        for s0 in starts:
            one(s0)
        return out
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantize")
    try:
        for _ in pool.map(one, starts):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out
