"""Rotary position embedding (RoPE), and the fused decode/prefill helper that ropes Q and K of
a fused QKV projection and writes K and V into the KV cache in one kernel.

Why the angle is computed the way it is: Hugging Face GPT-NeoX computes
inv_freq = 1 / base^(arange(0, rot, 2) / rot) in float32, then angle = f32(pos) * inv_freq
in float32, then cos/sin of that float32 angle. inv_freq is computed here on the host with
NumPy float32 (bit-identical constants baked into the WGSL), the product is one IEEE f32
multiply on the GPU, and the angle is reduced modulo 2*pi with a three-part Cody-Waite
constant before cos/sin: GPU sin/cos are only accurate on about [-pi, pi], and at position
2048 an unreduced angle would already be off by ~1e-4.

Modes: "neox" rotates the pair (i, i + rot/2) (rotate-half; GPT-NeoX, Qwen2, llama.cpp NEOX
mode); "normal" rotates (2i, 2i + 1) (GPT-J / llama.cpp mode 0, what a `llama` GGUF needs: its
converter permuted the Q/K rows so that HF's rotate-half pairs became adjacent). Dimensions >=
rot_dims pass through. Optional frequency factors (Llama 3.1's `rope_freqs.weight`) divide the
angle of pair i by factor[i], as llama.cpp does; they are folded into the baked inv_freq.
"""
from __future__ import annotations

import numpy as np

from .. import dtypes
from ..runtime import Buffer, dispatch, get_device, grid_for
from .common import Operand
from .nn_wgsl import Reader, check_fits, check_float_operand, check_out, distinct, enable_f16, f32_lit

WG = 64
MODES = ("neox", "normal")


def inv_freq(rot_dims: int, base: float = 10000.0) -> np.ndarray:
    """float32 [rot_dims/2]: 1 / base^(2i/rot_dims) the way HF computes it in float32: the
    exponent 2i/rot in f32, base^e as a correctly rounded f32 pow (via float64), then an f32
    reciprocal. Bit-identical to torch's CPU result for every head size GPT-NeoX models use
    (NumPy's own float32 power differs from it by an ulp in ~40% of entries, which at position
    8000 is a 1e-4 error in the angle)."""
    exps = np.arange(0, rot_dims, 2, dtype=np.int64).astype(np.float32) / np.float32(rot_dims)
    powed = (np.float64(np.float32(base)) ** exps.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / powed).astype(np.float32)


def scaled_inv_freq(rot_dims: int, base: float = 10000.0, freq_factors=None) -> np.ndarray:
    """inv_freq, divided by per-pair frequency factors when given (float32 [rot_dims/2])."""
    f = inv_freq(rot_dims, base)
    if freq_factors is None:
        return f
    ff = np.asarray(freq_factors, np.float32).reshape(-1)
    if ff.shape != f.shape:
        raise ValueError(f"rope: freq_factors has {ff.size} values, expected rot_dims/2 = {f.size}")
    if not np.all(np.isfinite(ff)) or np.any(ff <= 0):
        raise ValueError("rope: freq_factors must be finite and positive")
    return (f / ff).astype(np.float32)


def _rope_wgsl(rot_dims: int, base: float, mode: str, freq_factors=None) -> str:
    """WGSL constants and helpers: rope_partner(d) / rope_sign(d) (the dimension d is rotated
    with, and the sign of its term), rope_cs(pos, d) -> (cos, sin) of d's angle."""
    half = rot_dims // 2
    freqs = ", ".join(f32_lit(v) for v in scaled_inv_freq(rot_dims, base, freq_factors))
    if mode == "neox":
        pair = (f"fn rope_partner(d: u32) -> u32 {{ return select(d + {half}u, d - {half}u, d >= {half}u); }}\n"
                f"fn rope_sign(d: u32) -> f32 {{ return select(-1.0, 1.0, d >= {half}u); }}\n"
                f"fn rope_i(d: u32) -> u32 {{ return d % {half}u; }}\n")
    else:
        pair = ("fn rope_partner(d: u32) -> u32 { return d ^ 1u; }\n"
                "fn rope_sign(d: u32) -> f32 { return select(-1.0, 1.0, (d & 1u) == 1u); }\n"
                "fn rope_i(d: u32) -> u32 { return d >> 1u; }\n")
    return f"""const ROT: u32 = {rot_dims}u;
const INV_FREQ = array<f32, {half}>({freqs});
{pair}
// cos/sin of a float32 angle: reduce by 2*pi = C1 + C2 + C3 (C1, C2 with 8 significant bits,
// so k*C1 and k*C2 are exact for |k| < 2^16), then the hardware cos/sin on [-pi, pi].
fn sincos_reduced(a: f32) -> vec2<f32> {{
  let k = round(a * 0.15915494309189535f);
  let r = ((a - k * 6.28125f) - k * 0x1.fap-10f) - k * 0x1.54442ep-18f;
  return vec2<f32>(cos(r), sin(r));
}}
fn rope_cs(pos: f32, d: u32) -> vec2<f32> {{
  let a = pos * INV_FREQ[rope_i(d)];
  return sincos_reduced(a);
}}
"""


def _rope_val_wgsl(sd: int, fn: str = "val", at: str = "x_at") -> str:
    """WGSL {fn}(b, d, pos): element d of the head vector at {at}(b + d * sd), rotated to `pos`
    (dimensions past ROT pass through). Needs `{at}` and _rope_wgsl's helpers."""
    return f"""fn {fn}(b: u32, d: u32, pos: f32) -> f32 {{
  let v = {at}(b + d * {sd}u);
  if (d >= ROT) {{ return v; }}
  let cs = rope_cs(pos, d);
  return v * cs.x + rope_sign(d) * {at}(b + rope_partner(d) * {sd}u) * cs.y;
}}
"""


def _check_common(fn: str, head_dim: int, rot_dims: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode {mode!r} is not one of {MODES}")
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{fn}: head_dim must be even and positive, got {head_dim}")
    if rot_dims <= 0 or rot_dims % 2 or rot_dims > head_dim:
        raise ValueError(f"{fn}: rot_dims must be even and in [2, head_dim={head_dim}], got {rot_dims}")


def _check_positions(fn: str, positions: Buffer, seq: int) -> None:
    if not isinstance(positions, Buffer):
        raise TypeError(f"{fn}: positions must be a runtime.Buffer of int32 [seq], got {type(positions).__name__}")
    if positions.nbytes < 4 * seq:
        raise ValueError(f"{fn}: positions holds {positions.nbytes // 4} int32 values, needs seq={seq}")


def rope(out: Buffer, x: Operand, positions: Buffer, seq: int, n_heads: int, head_dim: int,
         rot_dims: int, base: float = 10000.0, mode: str = "neox", freq_factors=None) -> None:
    """out[s, h, :] (contiguous float32 [seq, n_heads, head_dim]) = x[s, h, :] with its first
    rot_dims dims rotated by angle positions[s] * base^(-2i/rot_dims) / freq_factors[i].

    x: f32/f16 Operand of shape [seq, n_heads, head_dim], any strides (e.g. the q or k slice
    of a fused [seq, 3, n_heads, head_dim] projection). positions: int32 Buffer [seq]."""
    fn = "rope"
    _check_common(fn, head_dim, rot_dims, mode)
    check_float_operand("x", x, fn)
    if tuple(x.shape) != (seq, n_heads, head_dim):
        raise ValueError(f"rope: x has shape {tuple(x.shape)}, expected [seq={seq}, n_heads={n_heads}, head_dim={head_dim}]")
    check_fits("x", x, fn)
    _check_positions(fn, positions, seq)
    n = seq * n_heads * (head_dim // 2)
    if n == 0:
        return
    check_out("out", out, 4 * seq * n_heads * head_dim, fn)
    distinct(fn, out=out, x=x.buffer, positions=positions)
    rd = Reader("x", x, 0, False)
    ss, sh, sd = x.strides
    src = f"""{enable_f16(rd)}{rd.decl()}
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec2<f32>>;
{_rope_wgsl(rot_dims, base, mode, freq_factors)}
{_rope_val_wgsl(sd)}@compute @workgroup_size({WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{
  let t = gid.x + gid.y * nwg.x * {WG}u;
  if (t >= {n}u) {{ return; }}
  let p = t % {head_dim // 2}u;
  let h = (t / {head_dim // 2}u) % {n_heads}u;
  let s = t / {(head_dim // 2) * n_heads}u;
  let pos = f32(positions[s]);
  let b = {x.offset}u + s * {ss}u + h * {sh}u;
  out[t] = vec2<f32>(val(b, 2u * p, pos), val(b, 2u * p + 1u, pos));
}}
"""
    dispatch(f"rope[{seq}x{n_heads}x{head_dim}]", src, [(x.buffer, "read"), (positions, "read"), (out, "rw")],
             grid_for(-(-n // WG)))


def _split_qkv(qkv: Operand, seq: int, n_heads: int, head_dim: int, fn: str) -> tuple:
    """The q, k and v [seq, n_heads, head_dim] Operands of a fused [seq, 3, n_heads, head_dim] one."""
    if tuple(qkv.shape) != (seq, 3, n_heads, head_dim):
        raise ValueError(f"{fn}: qkv has shape {tuple(qkv.shape)}, expected [seq={seq}, 3, n_heads={n_heads}, head_dim={head_dim}]")
    ss, s3, sh, sd = qkv.strides
    return tuple(Operand(qkv.buffer, qkv.dtype, (seq, n_heads, head_dim), (ss, sh, sd), qkv.offset + j * s3)
                 for j in range(3))


def rope_kv_write(q_out: Buffer, k_cache: Buffer, v_cache: Buffer, qkv: Operand, positions: Buffer,
                  seq: int, n_heads: int, head_dim: int, rot_dims: int, max_ctx: int,
                  base: float = 10000.0, cache_dtype=dtypes.float16, mode: str = "neox", *,
                  k: Operand = None, v: Operand = None, n_kv_heads: int = None, freq_factors=None) -> None:
    """One kernel for the attention prologue: rope q and k, write k and v into the KV cache.

    qkv: f32/f16 Operand [seq, 3, n_heads, head_dim] (a fused projection, any strides); or, with
    k and v given, qkv is q [seq, n_heads, head_dim] and k, v are [seq, n_kv_heads, head_dim]
    (separate projections, grouped-query attention when n_kv_heads < n_heads). For every s, h:
      q_out[h, s, :]               = rope(q[s, h, :], positions[s])   float32 [n_heads, seq, head_dim]
      k_cache[g, positions[s], :]  = rope(k[s, g, :], positions[s])   cache_dtype [n_kv_heads, max_ctx, head_dim]
      v_cache[g, positions[s], :]  = v[s, g, :]
    Positions outside [0, max_ctx) write no cache row (the caller validates on the host).
    f16 caches are written as f16 (shader-f16) or as packed pairs of adjacent dims in one u32."""
    fn = "rope_kv_write"
    _check_common(fn, head_dim, rot_dims, mode)
    check_float_operand("qkv", qkv, fn)
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: give both k and v (separate projections) or neither (fused qkv)")
    if k is None:
        q, k, v = _split_qkv(qkv, seq, n_heads, head_dim, fn)
        n_kv_heads = n_heads
    else:
        q = qkv
        n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
        if n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"{fn}: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        for name, op, h in (("q", q, n_heads), ("k", k, n_kv_heads), ("v", v, n_kv_heads)):
            check_float_operand(name, op, fn)
            if tuple(op.shape) != (seq, h, head_dim):
                raise ValueError(f"{fn}: {name} has shape {tuple(op.shape)}, expected [seq={seq}, {h}, head_dim={head_dim}]")
    for name, op in (("q", q), ("k", k), ("v", v)):
        check_fits(name, op, fn)
    _check_positions(fn, positions, seq)
    cache_dtype = dtypes.as_dtype(cache_dtype)
    if cache_dtype not in (dtypes.float16, dtypes.float32):
        raise TypeError(f"{fn}: cache_dtype must be float16 or float32, got {cache_dtype}")
    n = seq * n_heads * (head_dim // 2)
    if n == 0:
        return
    check_out("q_out", q_out, 4 * seq * n_heads * head_dim, fn)
    csize = n_kv_heads * max_ctx * head_dim * cache_dtype.itemsize
    check_out("k_cache", k_cache, csize, fn)
    check_out("v_cache", v_cache, csize, fn)
    # q, k and v may share one buffer (a fused projection): each distinct buffer is bound once
    srcs: list = []
    for op in (q, k, v):
        if all(b is not op.buffer for b, _ in srcs):
            srcs.append((op.buffer, op))
    distinct(fn, q_out=q_out, k_cache=k_cache, v_cache=v_cache, positions=positions,
             **{f"src{i}": b for i, (b, _) in enumerate(srcs)})
    readers = [Reader(f"x{i}", op, 0 if i == 0 else 4 + i, False) for i, (_, op) in enumerate(srcs)]

    def at(name: str, op: Operand) -> str:
        r = next(i for i, (b, _) in enumerate(srcs) if b is op.buffer)
        return f"fn {name}_at(i: u32) -> f32 {{ return x{r}_at(i); }}\n"

    f16 = cache_dtype is dtypes.float16
    native = f16 and get_device().has_f16
    if not f16:
        ctype, conv = "vec2<f32>", "vec2<f32>(a, b)"
    elif native:
        ctype, conv = "vec2<f16>", "vec2<f16>(f16(a), f16(b))"
    else:
        ctype, conv = "u32", "pack2x16float(vec2<f32>(a, b))"
    (qs, qh, qd), (ks, kh, kd), (vs, vh, vd) = q.strides, k.strides, v.strides
    G = n_heads // n_kv_heads
    src = f"""{enable_f16(*readers, native)}{''.join(r.decl() for r in readers)}{at("q", q)}{at("k", k)}{at("v", v)}
@group(0) @binding(1) var<storage, read> positions: array<i32>;
@group(0) @binding(2) var<storage, read_write> q_out: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<{ctype}>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<{ctype}>;
{_rope_wgsl(rot_dims, base, mode, freq_factors)}
{_rope_val_wgsl(qd, "val_q", "q_at")}{_rope_val_wgsl(kd, "val_k", "k_at")}fn cache_val(a: f32, b: f32) -> {ctype} {{ return {conv}; }}
@compute @workgroup_size({WG})
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{
  let t = gid.x + gid.y * nwg.x * {WG}u;
  if (t >= {n}u) {{ return; }}
  let p = t % {head_dim // 2}u;
  let h = (t / {head_dim // 2}u) % {n_heads}u;
  let s = t / {(head_dim // 2) * n_heads}u;
  let ipos = positions[s];
  let pos = f32(ipos);
  let bq = {q.offset}u + s * {qs}u + h * {qh}u;
  let d0 = 2u * p;
  q_out[(h * {seq}u + s) * {head_dim // 2}u + p] = vec2<f32>(val_q(bq, d0, pos), val_q(bq, d0 + 1u, pos));
  // KV head h is written by the invocations of query head h (h < n_kv_heads)
  if (h < {n_kv_heads}u && ipos >= 0 && ipos < {max_ctx}) {{
    let row = (h * {max_ctx}u + u32(ipos)) * {head_dim // 2}u + p;
    let bk = {k.offset}u + s * {ks}u + h * {kh}u;
    k_cache[row] = cache_val(val_k(bk, d0, pos), val_k(bk, d0 + 1u, pos));
    let bv = {v.offset}u + s * {vs}u + h * {vh}u;
    v_cache[row] = cache_val(v_at(bv + d0 * {vd}u), v_at(bv + (d0 + 1u) * {vd}u));
  }}
}}
"""
    binds = [(srcs[0][0], "read"), (positions, "read"), (q_out, "rw"), (k_cache, "rw"), (v_cache, "rw")]
    binds += [(b, "read") for b, _ in srcs[1:]]
    tag = f"{seq}x{n_heads}x{head_dim}" + (f"/{n_kv_heads}kv" if G > 1 else "")
    dispatch(f"rope_kv_write[{tag}]", src, binds, grid_for(-(-n // WG)))
