"""Scaled dot-product attention over a KV cache: one kernel family for prefill and decode.

    out[b, i, :] = softmax_j(scale * q[b, i, :] . k[b, j, :] + mask) @ v[b, j, :]
    over keys j < kv_len; causal: key j is visible to query i iff j <= q_pos0 + i
    (default q_pos0 = kv_len - sq: the last query sees the last key).

Why one kernel family: every workgroup runs the same flash-attention loop — a tile of BQ
queries, the keys of one split walked in tiles of BK with an online (max, sum) in f32 — and
only the tile shape changes:

* decode / short chunks (sq <= 8): BQ = sq rounded up to a power of two, K and V are read
  straight from global memory (there is no reuse to stage for), and the key range is split
  over many workgroups (flash-decoding) so a long context fills the GPU; a small combine
  kernel merges the per-split (max, sum, acc) triples.
* prefill: BQ queries share K/V tiles staged in workgroup memory; splits only when there
  are too few query tiles to fill the GPU.

The KV length (and optionally q_pos0) can be read from a storage buffer, and the number of
splits is sized from the cache capacity (sk_max), so one pipeline + bind group serves every
decode step: splits past the current length exit at once. Scratch buffers for the split
partials are cached per size, so repeated calls reuse the same bind groups.
"""
from __future__ import annotations

import math
from typing import Optional, Union

from ..runtime import Buffer, dispatch, get_device, grid_for
from .common import Operand
from .nn_wgsl import (NEG_INF, Reader, check_fits, check_float_operand, check_out, distinct, enable_f16,
                      f32_lit, next_pow2, seg_reduce, sg_builtin, vec4_ok)

# Workgroups the split heuristic aims for (a few per SM on a large GPU; harmless on small ones).
TARGET_WORKGROUPS_DECODE = 512
TARGET_WORKGROUPS_PREFILL = 256
DECODE_MAX_SQ = 8


class _Plan:
    def __init__(self, B: int, sq: int, sk_max: int, D: int):
        dev = get_device()
        self.D4 = -(-D // 4)
        if sq <= DECODE_MAX_SQ:
            self.stage = False
            self.BQ = next_pow2(sq)
            self.WG = 64
            self.BK = 64
        else:
            self.stage = True
            self.WG = 128
            lim = dev.max_workgroup_storage
            for bq, bk in ((32, 32), (16, 32), (16, 16), (8, 16)):
                self.BQ, self.BK = bq, bk
                if self.shared_bytes() <= lim:
                    break
            else:
                raise ValueError(f"attention: head_dim {D} needs more workgroup memory than the device's {lim} bytes")
        self.KW = min(self.BK, self.WG)
        self.G = self.WG // self.KW
        self.RQ = -(-self.BQ // self.G)
        self.TR = self.WG // self.BQ
        self.NO = self.BQ * self.D4
        if self.NO >= self.WG:
            self.OP, self.KG = -(-self.NO // self.WG), 1
        else:
            self.OP, self.KG = 1, self.WG // self.NO
        self.NQT = -(-sq // self.BQ)
        target = TARGET_WORKGROUPS_PREFILL if self.stage else TARGET_WORKGROUPS_DECODE
        max_split = max(1, -(-sk_max // self.BK))
        nsplit = max(1, min(max_split, -(-target // (B * self.NQT))))
        chunk_tiles = -(-max_split // nsplit)
        self.CHUNK = chunk_tiles * self.BK
        self.NSPLIT = max(1, -(-sk_max // self.CHUNK))

    @property
    def D4P(self) -> int:
        return self.D4 + 1

    def shared_bytes(self) -> int:
        n = self.BQ * self.D4 * 16 + self.BQ * self.BK * 4 + 3 * self.BQ * 4 + 2 * self.WG * 4
        if self.stage:
            n += self.BK * self.D4P * 16
        return n + self.WG * 16


_scratch: dict = {}


def _scratch_buffer(tag: str, nbytes: int) -> Buffer:
    """A cached scratch Buffer of at least nbytes: the same object for every call of the same
    size class, so bind groups (and captured dispatches) stay valid."""
    buf = _scratch.get(tag)
    if buf is None or buf.nbytes < nbytes:
        buf = Buffer(nbytes)
        _scratch[tag] = buf
    return buf


def _check_kv(name: str, op: Operand, B: int, D: int) -> None:
    check_float_operand(name, op, "attention")
    if len(op.shape) != 3 or op.shape[0] != B or op.shape[2] != D:
        raise ValueError(f"attention: {name} has shape {tuple(op.shape)}, expected [B={B}, sk_max, d={D}]")
    check_fits(name, op, "attention")


def _load4_fn(fn: str, rd: Reader, op: Operand, D: int) -> str:
    """fn {fn}(base: u32, d4: u32) -> vec4<f32>: elements 4*d4 .. 4*d4+3 of the row at base."""
    if rd.vec:
        return f"fn {fn}(base: u32, d4: u32) -> vec4<f32> {{ return {rd.name}_at4(base + d4 * 4u); }}\n"
    sd = op.strides[2]
    comps = []
    for c in range(4):
        comps.append(f"select(0.0, {rd.name}_at(base + (d4 * 4u + {c}u) * {sd}u), d4 * 4u + {c}u < {D}u)")
    return f"fn {fn}(base: u32, d4: u32) -> vec4<f32> {{ return vec4<f32>({', '.join(comps)}); }}\n"


def _params_wgsl(kv_len, q_pos0, sq: int, sk_max: int, first_binding: int) -> tuple:
    """Declarations and WGSL expressions for the KV length and q_pos0 (constants, or storage
    reads so one pipeline serves every decode step); returns (decls, kvl_expr, qp0_expr, buffers)."""
    decls, bufs = "", []
    b = first_binding
    if isinstance(kv_len, Buffer):
        decls += f"@group(0) @binding({b}) var<storage, read> kvlen_buf: array<i32>;\n"
        kvl = f"min(u32(max(kvlen_buf[0], 0)), {sk_max}u)"
        bufs.append(kv_len)
        b += 1
    else:
        kvl = f"{int(kv_len)}u"
    if q_pos0 is None:
        qp0 = f"(i32(kvl) - {sq})"
    elif isinstance(q_pos0, Buffer):
        decls += f"@group(0) @binding({b}) var<storage, read> qpos0_buf: array<i32>;\n"
        qp0 = "qpos0_buf[0]"
        bufs.append(q_pos0)
    else:
        qp0 = f"({int(q_pos0)})"
    return decls, kvl, qp0, bufs


def _out_index(layout: str, B: int, sq: int, D: int, b: str, q: str) -> str:
    """Element index of out[b, q, 0] for out_layout "bsd" ([B, sq, D]) or "sbd" ([sq, B, D])."""
    if layout == "bsd":
        return f"(({b}) * {sq}u + ({q})) * {D}u"
    return f"(({q}) * {B}u + ({b})) * {D}u"


def _store_row4(D: int, idx: str, val: str) -> str:
    """Store vec4 `val` as out elements idx .. idx+3 (clipped at D when D % 4 != 0)."""
    if D % 4 == 0:
        return f"out[({idx}) >> 2u] = {val};"
    return (f"{{ let v = {val}; let i0 = {idx}; for (var c = 0u; c < 4u; c = c + 1u) {{ "
            f"if (d4 * 4u + c < {D}u) {{ out[i0 + c] = v[c]; }} }} }}")


def _main_source(p: _Plan, q: Operand, k: Operand, v: Operand, B: int, sq: int, sk_max: int, D: int,
                 kv_len, q_pos0, causal: bool, scale: float, layout: str) -> tuple:
    dev = get_device()
    sub = dev.has_subgroups
    vq, vk, vv = (vec4_ok(o, D) for o in (q, k, v))
    rq, rk, rv = Reader("qb", q, 0, vq), Reader("kb", k, 1, vk), Reader("vb", v, 2, vv)
    decls, kvl, qp0, pbufs = _params_wgsl(kv_len, q_pos0, sq, sk_max, 3)
    nb = 3 + len(pbufs)
    WG, BQ, BK, D4, D4P, KW, G, RQ, TR, NO, OP, KG = (p.WG, p.BQ, p.BK, p.D4, p.D4P, p.KW, p.G, p.RQ,
                                                     p.TR, p.NO, p.OP, p.KG)
    NS = p.NSPLIT
    split = NS > 1
    if split:
        outs = (f"@group(0) @binding({nb}) var<storage, read_write> part_o: array<vec4<f32>>;\n"
                f"@group(0) @binding({nb + 1}) var<storage, read_write> part_ml: array<vec2<f32>>;\n")
    else:
        outs = f"@group(0) @binding({nb}) var<storage, read_write> out: array<{'vec4<f32>' if D % 4 == 0 else 'f32'}>;\n"
    sgp, sg = sg_builtin(sub)
    L = [enable_f16(rq, rk, rv), rq.decl(), rk.decl(), rv.decl(), decls, outs,
         _load4_fn("ld_q", rq, q, D), _load4_fn("ld_k", rk, k, D), _load4_fn("ld_v", rv, v, D),
         seg_reduce("red_max", "max", TR, WG, sub, NEG_INF),
         seg_reduce("red_sum", "+", TR, WG, sub, "0.0"),
         f"var<workgroup> Qs: array<vec4<f32>, {BQ * D4}>;",
         f"var<workgroup> Ss: array<f32, {BQ * BK}>;",
         f"var<workgroup> alpha_sh: array<f32, {BQ}>;",
         f"var<workgroup> l_sh: array<f32, {BQ}>;",
         f"var<workgroup> m_sh: array<f32, {BQ}>;"]
    if p.stage:
        L.append(f"var<workgroup> KVs: array<vec4<f32>, {BK * D4P}>;")
    if KG > 1:
        L.append(f"var<workgroup> Xs: array<vec4<f32>, {KG * NO}>;")
    qs, ks, vs = q.strides, k.strides, v.strides
    L += [f"fn qrow(b: u32, i: u32) -> u32 {{ return {q.offset}u + b * {qs[0]}u + i * {qs[1]}u; }}",
          f"fn krow(b: u32, j: u32) -> u32 {{ return {k.offset}u + b * {ks[0]}u + j * {ks[1]}u; }}",
          f"fn vrow(b: u32, j: u32) -> u32 {{ return {v.offset}u + b * {vs[0]}u + j * {vs[1]}u; }}",
          f"const SCALE_LOG2E: f32 = {f32_lit(scale * math.log2(math.e))};",
          f"@compute @workgroup_size({WG})",
          f"fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
          f"@builtin(local_invocation_index) lid: u32{sgp}) {{",
          f"  let wg = wid.x + wid.y * nwg.x;",
          f"  if (wg >= {B * p.NQT * NS}u) {{ return; }}",
          f"  let split = wg % {NS}u;",
          f"  let qt = (wg / {NS}u) % {p.NQT}u;",
          f"  let b = wg / {NS * p.NQT}u;",
          f"  let q0 = qt * {BQ}u;",
          f"  let kvl = {kvl};",
          f"  let qp0 = {qp0};",
          f"  let ninf = {NEG_INF};",
          f"  let k_lo = split * {p.CHUNK}u;",
          f"  var k_hi = min(k_lo + {p.CHUNK}u, kvl);"]
    if causal:
        L += [f"  let lim = qp0 + i32(min(q0 + {BQ}u, {sq}u)) ;",  # last query index + 1
              "  k_hi = u32(clamp(lim, 0, i32(k_hi)));"]
    if split:
        L += ["  if (k_lo >= k_hi) {",
              f"    if (lid < {BQ}u && q0 + lid < {sq}u) {{ part_ml[(b * {sq}u + q0 + lid) * {NS}u + split] = vec2<f32>(ninf, 0.0); }}",
              "    return;",
              "  }"]
    # Q tile, pre-scaled so scores are in the log2 domain.
    L += [f"  for (var e = lid; e < {BQ * D4}u; e = e + {WG}u) {{",
          f"    let qi = e / {D4}u;",
          f"    var x = vec4<f32>(0.0);",
          f"    if (q0 + qi < {sq}u) {{ x = ld_q(qrow(b, q0 + qi), e % {D4}u) * SCALE_LOG2E; }}",
          "    Qs[e] = x;",
          "  }",
          "  workgroupBarrier();",
          f"  let row = lid / {TR}u;",
          f"  let c = lid % {TR}u;",
          "  var m_run = ninf;",
          "  var l_run = 0.0;"]
    # accumulator ownership
    if KG == 1:
        owned = [(f"o{r}", f"lid + {r * WG}u") for r in range(OP)]
        kg_start, kg_ok = "0u", "true"
    else:
        owned = [("o0", f"lid % {NO}u")]
        kg_start, kg_ok = f"lid / {NO}u", f"lid < {KG * NO}u"
    for r, (name, expr) in enumerate(owned):
        L += [f"  let {name} = {expr};", f"  var acc{r} = vec4<f32>(0.0);",
              f"  let qi{r} = min({name} / {D4}u, {BQ - 1}u);", f"  let d4_{r} = {name} % {D4}u;"]
    L += [f"  for (var t0 = k_lo; t0 < k_hi; t0 = t0 + {BK}u) {{",
          f"    let nk = min({BK}u, k_hi - t0);"]
    if p.stage:
        L += [f"    for (var e = lid; e < {BK * D4}u; e = e + {WG}u) {{",
              f"      let j = e / {D4}u;",
              "      var x = vec4<f32>(0.0);",
              f"      if (j < nk) {{ x = ld_k(krow(b, t0 + j), e % {D4}u); }}",
              f"      KVs[j * {D4P}u + e % {D4}u] = x;",
              "    }",
              "    workgroupBarrier();"]
    # S = Q K^T for this tile
    for kb in range(0, BK, KW):
        L += ["    {",
              f"      let kj = {kb}u + lid % {KW}u;",
              f"      let g = lid / {KW}u;"]
        L += [f"      var s{r} = 0.0;" for r in range(RQ)]
        L += ["      if (kj < nk) {"]
        if not p.stage:
            L.append("        let kbase = krow(b, t0 + kj);")
        L.append(f"        for (var d4 = 0u; d4 < {D4}u; d4 = d4 + 1u) {{")
        L.append(f"          let kv = {'KVs[kj * %du + d4]' % D4P if p.stage else 'ld_k(kbase, d4)'};")
        for r in range(RQ):
            L.append(f"          s{r} += dot(Qs[min(g + {r * G}u, {BQ - 1}u) * {D4}u + d4], kv);")
        L += ["        }", "      }"]
        for r in range(RQ):
            qi = f"(g + {r * G}u)"
            cond = [f"kj >= nk", f"q0 + {qi} >= {sq}u"]
            if causal:
                cond.append(f"i32(t0 + kj) > qp0 + i32(q0 + {qi})")
            L += [f"      if ({qi} < {BQ}u) {{",
                  f"        Ss[{qi} * {BK}u + kj] = select(s{r}, ninf, {' || '.join(cond)});",
                  "      }"]
        L.append("    }")
    L += ["    workgroupBarrier();",
          # online softmax, TR invocations per query row
          "    var tmax = ninf;",
          f"    for (var j = c; j < {BK}u; j = j + {TR}u) {{ tmax = max(tmax, Ss[row * {BK}u + j]); }}",
          f"    let m_new = max(m_run, red_max(tmax, lid, {sg}));",
          "    let alpha = select(exp2(m_run - m_new), 1.0, m_new == ninf);",
          "    var ps = 0.0;",
          f"    for (var j = c; j < {BK}u; j = j + {TR}u) {{",
          f"      let s = Ss[row * {BK}u + j];",
          "      let pj = select(exp2(s - m_new), 0.0, s == ninf);",
          f"      Ss[row * {BK}u + j] = pj;",
          "      ps += pj;",
          "    }",
          "    l_run = l_run * alpha + ps;",
          "    m_run = m_new;",
          "    if (c == 0u) { alpha_sh[row] = alpha; }"]
    if p.stage:
        L += [f"    for (var e = lid; e < {BK * D4}u; e = e + {WG}u) {{",
              f"      let j = e / {D4}u;",
              "      var x = vec4<f32>(0.0);",
              f"      if (j < nk) {{ x = ld_v(vrow(b, t0 + j), e % {D4}u); }}",
              f"      KVs[j * {D4P}u + e % {D4}u] = x;",
              "    }"]
    L.append("    workgroupBarrier();")
    # O += P V
    L.append(f"    if ({kg_ok}) {{")
    for r in range(len(owned)):
        L.append(f"      acc{r} *= alpha_sh[qi{r}];")
    L.append(f"      for (var j = {kg_start}; j < nk; j = j + {KG}u) {{")
    if not p.stage:
        L.append("        let vbase = vrow(b, t0 + j);")
    for r in range(len(owned)):
        vsrc = f"KVs[j * {D4P}u + d4_{r}]" if p.stage else f"ld_v(vbase, d4_{r})"
        L.append(f"        acc{r} += Ss[qi{r} * {BK}u + j] * {vsrc};")
    L += ["      }", "    }", "    workgroupBarrier();", "  }"]
    # finish: row sums, cross-group accumulator reduction, stores
    L += [f"  let lsum = red_sum(l_run, lid, {sg});",
          "  if (c == 0u) { l_sh[row] = lsum; m_sh[row] = m_run; }"]
    if KG > 1:
        L += [f"  if ({kg_ok}) {{ Xs[lid] = acc0; }}",
              "  workgroupBarrier();",
              f"  if (lid < {NO}u) {{",
              f"    for (var g2 = 1u; g2 < {KG}u; g2 = g2 + 1u) {{ acc0 += Xs[g2 * {NO}u + lid]; }}",
              "  }"]
    L.append("  workgroupBarrier();")
    first_ok = f"lid < {NO}u" if KG > 1 else None
    for r, (name, _) in enumerate(owned):
        valid = [f"{name} < {NO}u", f"q0 + qi{r} < {sq}u"]
        if first_ok:
            valid.append(first_ok)
        L.append(f"  if ({' && '.join(valid)}) {{")
        L.append(f"    let qg = q0 + qi{r};")
        if split:
            L.append(f"    part_o[((b * {sq}u + qg) * {NS}u + split) * {D4}u + d4_{r}] = acc{r};")
        else:
            L.append(f"    let l = l_sh[qi{r}];")
            L.append(f"    let d4 = d4_{r};")
            L.append("    " + _store_row4(D, _out_index(layout, B, sq, D, "b", "qg") + " + d4 * 4u",
                                          f"select(vec4<f32>(0.0), acc{r} / l, l > 0.0)"))
        L.append("  }")
    if split:
        L += [f"  if (lid < {BQ}u && q0 + lid < {sq}u) {{",
              f"    part_ml[(b * {sq}u + q0 + lid) * {NS}u + split] = vec2<f32>(m_sh[lid], l_sh[lid]);",
              "  }"]
    L.append("}\n")
    binds = [(q.buffer, "read"), (k.buffer, "read"), (v.buffer, "read")] + [(x, "read") for x in pbufs]
    return "\n".join(L), binds


def _combine_source(p: _Plan, B: int, sq: int, D: int, layout: str) -> str:
    NS, D4 = p.NSPLIT, p.D4
    WG = min(max(next_pow2(D4), 32), 256)
    return f"""@group(0) @binding(0) var<storage, read> part_o: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> part_ml: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<{'vec4<f32>' if D % 4 == 0 else 'f32'}>;
@compute @workgroup_size({WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {{
  let rowid = wid.x + wid.y * nwg.x;
  if (rowid >= {B * sq}u) {{ return; }}
  let b = rowid / {sq}u;
  let qg = rowid % {sq}u;
  var M = {NEG_INF};
  for (var s = 0u; s < {NS}u; s = s + 1u) {{
    let ml = part_ml[rowid * {NS}u + s];
    if (ml.y > 0.0) {{ M = max(M, ml.x); }}
  }}
  var Lsum = 0.0;
  for (var s = 0u; s < {NS}u; s = s + 1u) {{
    let ml = part_ml[rowid * {NS}u + s];
    if (ml.y > 0.0) {{ Lsum += ml.y * exp2(ml.x - M); }}
  }}
  for (var d4 = lid; d4 < {D4}u; d4 = d4 + {WG}u) {{
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < {NS}u; s = s + 1u) {{
      let ml = part_ml[rowid * {NS}u + s];
      if (ml.y > 0.0) {{ acc += part_o[(rowid * {NS}u + s) * {D4}u + d4] * exp2(ml.x - M); }}
    }}
    {_store_row4(D, _out_index(layout, B, sq, D, "b", "qg") + " + d4 * 4u", "select(vec4<f32>(0.0), acc / Lsum, Lsum > 0.0)")}
  }}
}}
"""


def attention(out: Buffer, q: Operand, k_cache: Operand, v_cache: Operand,
              kv_len: Union[Buffer, int], causal: bool = True, scale: Optional[float] = None,
              q_pos0: Union[Buffer, int, None] = None, out_layout: str = "bsd") -> None:
    """Attention of q [B, sq, d] over the first kv_len keys of k_cache/v_cache [B, sk_max, d].

    B is batch*heads; all three are f32/f16 Operands with any strides (e.g. caches laid out
    [n_heads, max_ctx, head_dim] and q [n_heads, sq, head_dim] need no copy). kv_len: int, or
    an int32 Buffer read at element 0 on the GPU (clamped to [0, sk_max]). causal: key j is
    visible to query i iff j <= q_pos0 + i; q_pos0 (int or int32 Buffer element 0) defaults
    to kv_len - sq. scale defaults to 1/sqrt(d). A query that sees no key gets zeros.
    out: contiguous float32, [B, sq, d] (out_layout="bsd") or [sq, B, d] ("sbd", i.e. the
    [sq, n_heads*d] layout the output projection wants)."""
    fn = "attention"
    check_float_operand("q", q, fn)
    if len(q.shape) != 3:
        raise ValueError(f"attention: q has shape {tuple(q.shape)}, expected [B, sq, d]")
    B, sq, D = (int(s) for s in q.shape)
    check_fits("q", q, fn)
    _check_kv("k_cache", k_cache, B, D)
    _check_kv("v_cache", v_cache, B, D)
    sk_max = int(k_cache.shape[1])
    if v_cache.shape[1] != sk_max:
        raise ValueError(f"attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in length")
    if out_layout not in ("bsd", "sbd"):
        raise ValueError(f"attention: out_layout must be 'bsd' or 'sbd', got {out_layout!r}")
    if isinstance(kv_len, Buffer):
        if kv_len.nbytes < 4:
            raise ValueError("attention: kv_len buffer must hold one int32")
    else:
        kv_len = int(kv_len)
        if not 0 <= kv_len <= sk_max:
            raise ValueError(f"attention: kv_len={kv_len} outside [0, sk_max={sk_max}] (k_cache shape {tuple(k_cache.shape)})")
    if isinstance(q_pos0, Buffer) and q_pos0.nbytes < 4:
        raise ValueError("attention: q_pos0 buffer must hold one int32")
    if B == 0 or sq == 0 or D == 0:
        return
    check_out("out", out, 4 * B * sq * D, fn)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    distinct(fn, out=out, q=q.buffer, k_cache=k_cache.buffer, v_cache=v_cache.buffer,
             kv_len=kv_len if isinstance(kv_len, Buffer) else None,
             q_pos0=q_pos0 if isinstance(q_pos0, Buffer) else None)
    p = _Plan(B, sq, sk_max, D)
    src, binds = _main_source(p, q, k_cache, v_cache, B, sq, sk_max, D, kv_len, q_pos0, causal, scale, out_layout)
    n_wg = B * p.NQT * p.NSPLIT
    name = f"attention[{B}x{sq}x{sk_max}x{D}]"
    if p.NSPLIT == 1:
        dispatch(name, src, binds + [(out, "rw")], grid_for(n_wg))
        return
    rows = B * sq
    part_o = _scratch_buffer("part_o", rows * p.NSPLIT * p.D4 * 16)
    part_ml = _scratch_buffer("part_ml", rows * p.NSPLIT * 8)
    dispatch(name, src, binds + [(part_o, "rw"), (part_ml, "rw")], grid_for(n_wg))
    dispatch(f"attention_combine[{B}x{sq}x{D}]", _combine_source(p, B, sq, D, out_layout),
             [(part_o, "read"), (part_ml, "read"), (out, "rw")], grid_for(rows))
