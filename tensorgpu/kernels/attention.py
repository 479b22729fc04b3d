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


def _check_kv(name: str, op: Operand, B: int, D: int) -> int:
    """Checks a K or V operand against q [B, sq, D]; returns the query heads per KV head (GQA:
    op may have B / G rows of heads for any G dividing B)."""
    check_float_operand(name, op, "attention")
    if len(op.shape) != 3 or op.shape[2] != D or op.shape[0] <= 0 or B % op.shape[0]:
        raise ValueError(f"attention: {name} has shape {tuple(op.shape)}, expected [B_kv, sk_max, d={D}] with "
                         f"B_kv dividing q's B={B} (grouped-query attention)")
    check_fits(name, op, "attention")
    return B // int(op.shape[0])


def _load4_fn(fn: str, rd: Reader, op: Operand, D: int) -> str:
    """fn {fn}(base: u32, d4: u32) -> vec4<f32>: elements 4*d4 .. 4*d4+3 of the row at base."""
    if rd.vec:
        return f"fn {fn}(base: u32, d4: u32) -> vec4<f32> {{ return {rd.name}_at4(base + d4 * 4u); }}\n"
    sd = op.strides[2]
    comps = []
    for c in range(4):
        comps.append(f"select(0.0, {rd.name}_at(base + (d4 * 4u + {c}u) * {sd}u), d4 * 4u + {c}u < {D}u)")
    return f"fn {fn}(base: u32, d4: u32) -> vec4<f32> {{ return vec4<f32>({', '.join(comps)}); }}\n"


class KVParam:
    """A key length passed as a runtime parameter (the kernel's uniform, bound after its storage
    bindings): a cache read as `cache[:, :pos + T]` keeps one pipeline for every length, and
    under tg.capture the length may be a step variable re-evaluated per replay."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


_TGP = "@TGP_BINDING@"


def _params_wgsl(kv_len, q_pos0, sq: int, sk_max: int, first_binding: int, kv_rows: int = 0) -> tuple:
    """Declarations and WGSL expressions for the KV length and q_pos0 (constants, or storage
    reads so one pipeline serves every decode step); returns (decls, kvl_expr, qp0_expr, buffers).
    kv_rows > 0: the buffer holds one length per kv_rows consecutive rows b of q (per sequence
    of a batch: its heads share the length); the expression then reads `b`."""
    decls, bufs = "", []
    b = first_binding
    if isinstance(kv_len, KVParam):
        decls += f"@group(0) @binding({_TGP}) var<uniform> tgp: array<vec4<u32>, 1>;\n"
        kvl = f"min(tgp[0].x, {sk_max}u)"
    elif isinstance(kv_len, Buffer):
        decls += f"@group(0) @binding({b}) var<storage, read> kvlen_buf: array<i32>;\n"
        at = f"b / {kv_rows}u" if kv_rows else "0"
        kvl = f"min(u32(max(kvlen_buf[{at}], 0)), {sk_max}u)"
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


def _prefill_io(q: Operand, k: Operand, v: Operand, D: int, kv_len, q_pos0, sq: int, sk_max: int, split: bool,
                out_elem: str, kv_rows: int = 0) -> tuple:
    """What both prefill kernels declare first: the q/k/v readers and their row loaders, the kv
    length / q_pos0 parameters, and the output (the split partials, or `out` of out_elem).
    Returns (WGSL lines, kvl expression, qp0 expression, bindings of q, k, v and the params)."""
    vq, vk, vv = (vec4_ok(o, D) for o in (q, k, v))
    rq, rk, rv = Reader("qb", q, 0, vq), Reader("kb", k, 1, vk), Reader("vb", v, 2, vv)
    decls, kvl, qp0, pbufs = _params_wgsl(kv_len, q_pos0, sq, sk_max, 3, kv_rows)
    nb = 3 + len(pbufs)
    if split:
        outs = (f"@group(0) @binding({nb}) var<storage, read_write> part_o: array<vec4<f32>>;\n"
                f"@group(0) @binding({nb + 1}) var<storage, read_write> part_ml: array<vec2<f32>>;\n")
    else:
        outs = f"@group(0) @binding({nb}) var<storage, read_write> out: array<{out_elem}>;\n"
    lines = [enable_f16(rq, rk, rv), rq.decl(), rk.decl(), rv.decl(), decls, outs,
             _load4_fn("ld_q", rq, q, D), _load4_fn("ld_k", rk, k, D), _load4_fn("ld_v", rv, v, D)]
    binds = [(q.buffer, "read"), (k.buffer, "read"), (v.buffer, "read")] + [(x, "read") for x in pbufs]
    return lines, kvl, qp0, binds


def _prefill_entry(q: Operand, k: Operand, v: Operand, scale: float, WG: int, sgp: str) -> list:
    """The row-offset functions, the log2-domain scale and the entry point of a prefill kernel.
    Grouped-query attention: query head b reads K/V head b / G (G = q heads per KV head), so
    K/V are never copied to the query's head count."""
    qs, ks, vs = q.strides, k.strides, v.strides
    G = q.shape[0] // k.shape[0]
    kb = "b" if G == 1 else f"(b / {G}u)"
    return [f"fn qrow(b: u32, i: u32) -> u32 {{ return {q.offset}u + b * {qs[0]}u + i * {qs[1]}u; }}",
            f"fn krow(b: u32, j: u32) -> u32 {{ return {k.offset}u + {kb} * {ks[0]}u + j * {ks[1]}u; }}",
            f"fn vrow(b: u32, j: u32) -> u32 {{ return {v.offset}u + {kb} * {vs[0]}u + j * {vs[1]}u; }}",
            f"const SCALE_LOG2E: f32 = {f32_lit(scale * math.log2(math.e))};",
            f"@compute @workgroup_size({WG})",
            f"fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
            f"@builtin(local_invocation_index) lid: u32{sgp}) {{"]


def _prefill_tile(p, B: int, sq: int, kvl: str, qp0: str, causal: bool, longest_first: bool) -> list:
    """Which (head b, query tile q0, key split [k_lo, k_hi)) this workgroup takes, the key range
    cut at the causal limit of the tile's last query."""
    NS, NQT, BQ = p.NSPLIT, p.NQT, p.BQ
    qt = f"{NQT - 1}u - (wg / {NS}u) % {NQT}u" if longest_first else f"(wg / {NS}u) % {NQT}u"
    L = ["  let wg = wid.x + wid.y * nwg.x;",
         f"  if (wg >= {B * NQT * NS}u) {{ return; }}",
         f"  let split = wg % {NS}u;",
         f"  let qt = {qt};",
         f"  let b = wg / {NS * NQT}u;",
         f"  let q0 = qt * {BQ}u;",
         f"  let kvl = {kvl};",
         f"  let qp0 = {qp0};",
         f"  let ninf = {NEG_INF};",
         f"  let k_lo = split * {p.CHUNK}u;",
         f"  var k_hi = min(k_lo + {p.CHUNK}u, kvl);"]
    if causal:
        L += [f"  let lim = qp0 + i32(min(q0 + {BQ}u, {sq}u));",   # last query index + 1
              "  k_hi = u32(clamp(lim, 0, i32(k_hi)));"]
    return L


def _empty_split(p, sq: int, cond: str) -> list:
    """A split with no visible key (`cond`) stores an empty partial and returns."""
    return [f"  if ({cond}) {{",
            f"    if (lid < {p.BQ}u && q0 + lid < {sq}u) {{ part_ml[(b * {sq}u + q0 + lid) * {p.NSPLIT}u + split] = vec2<f32>(ninf, 0.0); }}",
            "    return;",
            "  }"]


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
                 kv_len, q_pos0, causal: bool, scale: float, layout: str, kv_rows: int = 0) -> tuple:
    dev = get_device()
    sub = dev.has_subgroups
    WG, BQ, BK, D4, D4P, KW, G, RQ, TR, NO, OP, KG = (p.WG, p.BQ, p.BK, p.D4, p.D4P, p.KW, p.G, p.RQ,
                                                     p.TR, p.NO, p.OP, p.KG)
    NS = p.NSPLIT
    split = NS > 1
    L, kvl, qp0, binds = _prefill_io(q, k, v, D, kv_len, q_pos0, sq, sk_max, split,
                                     "vec4<f32>" if D % 4 == 0 else "f32", kv_rows)
    sgp, sg = sg_builtin(sub)
    L += [seg_reduce("red_max", "max", TR, WG, sub, NEG_INF),
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
    L += _prefill_entry(q, k, v, scale, WG, sgp) + _prefill_tile(p, B, sq, kvl, qp0, causal, longest_first=False)
    if split:
        L += _empty_split(p, sq, "k_lo >= k_hi")
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
    return "\n".join(L), binds


# ----------------------------------------------------------------------------- prefill: register-blocked tiles

# "auto": the register-blocked prefill kernel where it applies (sq > DECODE_MAX_SQ, d % 16 == 0,
# tiles fit workgroup memory), else the generic one; "generic" forces the generic kernel.
PREFILL_KERNEL = "auto"
# Workgroups the register-blocked kernel aims for: a causal prefill's last query tiles walk every
# key tile, so splitting the key range balances them (and fills the GPU) at the price of a
# combine pass.
TILED_TARGET_WORKGROUPS = 1024
# Inner-loop shape of the register-blocked kernel (knobs for benchmarks/bench_prefill.py sweeps):
#   bk        key tile (the largest that fits workgroup memory, at most this)
#   unroll_s  d steps per iteration of the S = Q K^T loop (all loads of a step group issued before
#             its FMAs, so a thread keeps several shared-memory loads in flight)
#   unroll_pv keys per iteration of the O += P V loop over a constant BK trip count (keys past the
#             range have P = 0 and V = 0); 0 = a loop over the tile's valid keys only
TILED_TUNING = {"bk": 32, "unroll_s": 16, "unroll_pv": 8}
# A split walks at least this many key tiles: its fixed cost (Q tile, partial stores, its share
# of the combine) must stay small next to its loop.
TILED_MIN_CHUNK_TILES = 4


class _TilePlan:
    """Launch shape of the register-blocked prefill kernel.

    Why another kernel: the generic staged kernel keeps a scalar dot product per (query, key)
    thread pair and re-reads Q from workgroup memory for every key, so a 512-token prefill ran
    at a few TFLOP/s. Here a 128-invocation workgroup owns BQ = 32 queries and treats S = Q K^T
    and O += P V as small register-blocked matmuls: invocation (ty, tx) computes S for 4
    queries x BK/16 keys (Q stored transposed, one vec4 of 4 queries per d) and accumulates O
    for the same 4 queries x D/16 dims; the row max / sum reduce over the 16 invocations that
    share a query group (subgroup shuffles where available). K/V tiles are prefetched into
    registers one phase ahead."""
    WG, BQ, TX = 128, 32, 16

    def __init__(self, B: int, sq: int, sk_max: int, D: int, vecs: tuple, span: Optional[int] = None):
        dev = get_device()
        self.ok = False
        if sq <= DECODE_MAX_SQ or D % 16 or PREFILL_KERNEL == "generic":
            return
        self.D, self.D4 = D, D // 4
        self.VW = 4 if D % 64 == 0 else 1          # V / O per invocation: vec4 units or scalars
        self.NU = D // (self.TX * self.VW)          # units per invocation
        lim = dev.max_workgroup_storage
        for bk in (b for b in (64, 32, 16) if b <= TILED_TUNING["bk"]):
            self.BK = bk
            if self.shared_bytes() <= lim:
                break
        else:
            return
        self.KPT = self.BK // self.TX
        self.US = max(u for u in (1, 2, 4, 8, 16) if u <= TILED_TUNING["unroll_s"] and D % u == 0)
        self.UPV = max((u for u in (1, 2, 4, 8, 16, 32) if u <= TILED_TUNING["unroll_pv"] and self.BK % u == 0), default=0)
        self.NQT = -(-sq // self.BQ)
        self.REGS = -(-(self.BK * self.D4) // self.WG)      # K/V vec4 registers per invocation
        # the chunk is sized from the keys the longest query tile walks (`span`, default sk_max),
        # not from the cache capacity: a 512-token prompt in a 2048-row cache still gets chunks
        # of ~1/4 of its length (the splits past kv_len exit at once)
        span = sk_max if span is None else max(1, min(span, sk_max))
        max_split = max(1, -(-span // self.BK))
        nsplit = max(1, min(max_split, -(-TILED_TARGET_WORKGROUPS // (B * self.NQT))))
        self.CHUNK = max(-(-max_split // nsplit), TILED_MIN_CHUNK_TILES) * self.BK
        self.NSPLIT = max(1, -(-sk_max // self.CHUNK))
        self.ok = True

    def shared_bytes(self) -> int:
        # Qs [D][BQ], KV [BK * D], Ps [BK][BQ], two vec4 reduction buffers, l exchange
        return 4 * (self.D * self.BQ + self.BK * self.D) + 16 * self.BK * self.PS + 2 * 16 * self.WG

    @property
    def PS(self) -> int:
        """Row stride (vec4s) of Ps [key][query/4], padded by one so the 16 invocations of a
        query group storing 16 different keys' rows hit different banks."""
        return self.BQ // 4 + 1


def _pv_loop(p: _TilePlan) -> list:
    """O += P V over the staged tile: each key j's P column (4 queries) and V row slices loaded
    first, then the FMAs, unroll_pv keys per iteration (or one key per iteration over the valid
    keys only when unroll_pv is 0)."""
    BQ4, D4, TX, NU, VW = p.BQ // 4, p.D4, p.TX, p.NU, p.VW
    U = p.UPV or 1
    if p.UPV:
        L = [f"    for (var j0 = 0u; j0 < {p.BK}u; j0 = j0 + {U}u) {{"]
    else:
        L = [f"    let nk = min({p.BK}u, k_hi - t0);",
             "    for (var j0 = 0u; j0 < nk; j0 = j0 + 1u) {"]
    for w in range(U):
        L.append(f"      let pj{w} = Ps[(j0 + {w}u) * {p.PS}u + ty];")
        for u in range(NU):
            if VW == 4:
                L.append(f"      let v{w}_{u} = KV[(j0 + {w}u) * {D4}u + tx + {u * TX}u];")
            else:
                dd = f"tx + {u * TX}u"
                L.append(f"      let v{w}_{u} = vec4<f32>(KV[(j0 + {w}u) * {D4}u + ({dd}) / 4u][({dd}) % 4u]);")
    for w in range(U):
        for u in range(NU):
            if VW == 4:
                L += [f"      o{r4}_{u} = fma(vec4<f32>(pj{w}[{r4}]), v{w}_{u}, o{r4}_{u});" for r4 in range(4)]
            else:
                L.append(f"      o_{u} = fma(pj{w}, v{w}_{u}, o_{u});")
    L.append("    }")
    return L


def _tiled_source(p: _TilePlan, q: Operand, k: Operand, v: Operand, B: int, sq: int, sk_max: int, D: int,
                  kv_len, q_pos0, causal: bool, scale: float, layout: str, kv_rows: int = 0) -> tuple:
    dev = get_device()
    sub = dev.has_subgroups
    WG, BQ, BK, TX, D4, VW, NU, KPT, R = p.WG, p.BQ, p.BK, p.TX, p.D4, p.VW, p.NU, p.KPT, p.REGS
    BQ4 = BQ // 4
    NS = p.NSPLIT
    split = NS > 1
    L, kvl, qp0, binds = _prefill_io(q, k, v, D, kv_len, q_pos0, sq, sk_max, split, "vec4<f32>", kv_rows)
    sgp, sg = sg_builtin(sub)
    L += [seg_reduce("red_max", "max", TX, WG, sub, NEG_INF, "vec4<f32>"),
          seg_reduce("red_sum", "+", TX, WG, sub, "vec4<f32>(0.0)", "vec4<f32>"),
          f"var<workgroup> Qs: array<vec4<f32>, {D * BQ4}>;",        # [d][query/4]
          f"var<workgroup> KV: array<vec4<f32>, {BK * D4}>;",        # K: [d][key/4]; V: [key][d/4]
          f"var<workgroup> Ps: array<vec4<f32>, {BK * p.PS}>;"]      # [key][query/4], padded rows
    # the longest causal rows first: they take the most key tiles
    L += _prefill_entry(q, k, v, scale, WG, sgp) + _prefill_tile(p, B, sq, kvl, qp0, causal, longest_first=True)
    L += [f"  let tx = lid % {TX}u;",
          f"  let ty = lid / {TX}u;",
          f"  let kt_n = select(0u, (k_hi - k_lo + {BK - 1}u) / {BK}u, k_hi > k_lo);"]
    if split:   # a split past the causal limit / kv length: an empty partial, nothing else
        L += _empty_split(p, sq, "kt_n == 0u")
    # Q tile, transposed and pre-scaled (scores in the log2 domain); consecutive invocations
    # take consecutive queries so the transposed stores hit distinct banks
    L += [f"  for (var e = lid; e < {BQ * D4}u; e = e + {WG}u) {{",
          f"    let qi = e % {BQ}u;",
          f"    let d4 = e / {BQ}u;",
          "    var x = vec4<f32>(0.0);",
          f"    if (q0 + qi < {sq}u) {{ x = ld_q(qrow(b, q0 + qi), d4) * SCALE_LOG2E; }}",
          f"    Qs[(d4 * 4u + 0u) * {BQ4}u + qi / 4u][qi % 4u] = x[0];",
          f"    Qs[(d4 * 4u + 1u) * {BQ4}u + qi / 4u][qi % 4u] = x[1];",
          f"    Qs[(d4 * 4u + 2u) * {BQ4}u + qi / 4u][qi % 4u] = x[2];",
          f"    Qs[(d4 * 4u + 3u) * {BQ4}u + qi / 4u][qi % 4u] = x[3];",
          "  }"]
    # register staging of one K or V tile: item e = lid + r*WG -> key e / D4, d4 = e % D4
    for r in range(R):
        L.append(f"  var rg{r} = vec4<f32>(0.0);")

    def fetch(fn: str, row: str, t0: str) -> list:
        # K: item e -> key e % BK, d4 e / BK (consecutive invocations then store consecutive keys of
        # one transposed row: no bank conflicts); V: key e / D4, d4 e % D4 (coalesced rows)
        kmap = fn == "ld_k"
        jd = (f"let j = e % {BK}u; let d4 = e / {BK}u;" if kmap else f"let j = e / {D4}u; let d4 = e % {D4}u;")
        out = []
        for r in range(R):
            g = f"lid + {r * WG}u < {BK * D4}u && " if (BK * D4) % WG and r == R - 1 else ""
            out += [f"    {{ let e = lid + {r * WG}u; {jd}",
                    f"      rg{r} = vec4<f32>(0.0);",
                    f"      if ({g}{t0} + j < k_hi) {{ rg{r} = {fn}({row}(b, {t0} + j), d4); }} }}"]
        return out

    def put_k() -> list:
        out = []
        for r in range(R):
            g = f"if (lid + {r * WG}u < {BK * D4}u) " if (BK * D4) % WG and r == R - 1 else ""
            out += [f"    {g}{{ let e = lid + {r * WG}u; let j = e % {BK}u; let d4 = e / {BK}u;"]
            out += [f"      KV[(d4 * 4u + {c}u) * {BK // 4}u + j / 4u][j % 4u] = rg{r}[{c}];" for c in range(4)]
            out += ["    }"]
        return out

    def put_v() -> list:
        out = []
        for r in range(R):
            g = f"if (lid + {r * WG}u < {BK * D4}u) " if (BK * D4) % WG and r == R - 1 else ""
            out.append(f"    {g}{{ KV[lid + {r * WG}u] = rg{r}; }}")
        return out

    L += ["  var m_run = vec4<f32>(ninf);",     # per query row of this invocation (4 rows)
          "  var l_run = vec4<f32>(0.0);"]     # partial over this invocation's keys
    for u in range(NU):
        if VW == 4:
            L += [f"  var o{r4}_{u} = vec4<f32>(0.0);" for r4 in range(4)]
        else:
            L.append(f"  var o_{u} = vec4<f32>(0.0);")   # 4 rows of one dim
    L += ["  if (kt_n > 0u) {"] + fetch("ld_k", "krow", "k_lo") + ["  }"]
    L += ["  for (var it = 0u; it < kt_n; it = it + 1u) {",
          f"    let t0 = k_lo + it * {BK}u;",
          "    workgroupBarrier();"]
    L += put_k()
    L += ["    workgroupBarrier();"]
    L += fetch("ld_v", "vrow", "t0")
    # S = Q K^T: keys tx + 16 * kk
    for kk in range(KPT):
        L.append(f"    var s{kk} = vec4<f32>(0.0);")
    US = p.US
    L.append(f"    for (var d = 0u; d < {D}u; d = d + {US}u) {{")
    for u in range(US):
        L.append(f"      let qv{u} = Qs[(d + {u}u) * {BQ4}u + ty];")
        L += [f"      let kv{u}_{kk} = KV[(d + {u}u) * {BK // 4}u + (tx + {kk * TX}u) / 4u][(tx + {kk * TX}u) % 4u];"
              for kk in range(KPT)]
    for u in range(US):
        L += [f"      s{kk} = fma(qv{u}, vec4<f32>(kv{u}_{kk}), s{kk});" for kk in range(KPT)]
    L += ["    }"]
    # mask: key past the range / causal / query past sq
    L.append(f"    let qrow4 = vec4<i32>(i32(q0 + ty * 4u)) + vec4<i32>(0, 1, 2, 3);")
    for kk in range(KPT):
        key = f"(t0 + tx + {kk * TX}u)"
        conds = [f"vec4<bool>({key} >= k_hi)", f"qrow4 >= vec4<i32>({sq})"]
        if causal:
            conds.append(f"vec4<i32>(i32{key}) > vec4<i32>(qp0) + qrow4")
        L.append(f"    s{kk} = select(s{kk}, vec4<f32>(ninf), {' | '.join(conds)});")
    tmax = "s0"
    for kk in range(1, KPT):
        tmax = f"max({tmax}, s{kk})"
    L += [f"    let m_new = max(m_run, red_max({tmax}, lid, {sg}));",
          "    let alpha = select(exp2(m_run - m_new), vec4<f32>(1.0), m_new == vec4<f32>(ninf));",
          "    m_run = m_new;"]
    for kk in range(KPT):
        L.append(f"    let p{kk} = select(exp2(s{kk} - m_new), vec4<f32>(0.0), s{kk} == vec4<f32>(ninf));")
    L.append(f"    l_run = l_run * alpha + {' + '.join(f'p{kk}' for kk in range(KPT))};")
    for kk in range(KPT):
        L.append(f"    Ps[(tx + {kk * TX}u) * {p.PS}u + ty] = p{kk};")
    for u in range(NU):
        if VW == 4:
            L += [f"    o{r4}_{u} *= alpha[{r4}];" for r4 in range(4)]
        else:
            L.append(f"    o_{u} *= alpha;")
    L += ["    workgroupBarrier();"]
    L += put_v()
    L += ["    workgroupBarrier();",
          "    if (it + 1u < kt_n) {",
          f"      let tn = t0 + {BK}u;"]
    L += ["  " + x for x in fetch("ld_k", "krow", "tn")]
    L.append("    }")
    L += _pv_loop(p)
    L.append("  }")
    # finish
    L += [f"  let lsum = red_sum(l_run, lid, {sg});"]
    for r4 in range(4):
        L += ["  {",
              f"    let qi = ty * 4u + {r4}u;",
              "    let qg = q0 + qi;",
              f"    if (qg < {sq}u) {{"]
        if split:
            L.append(f"      let po = ((b * {sq}u + qg) * {NS}u + split) * {D4}u;")
            for u in range(NU):
                if VW == 4:
                    L.append(f"      part_o[po + tx + {u * TX}u] = o{r4}_{u};")
                else:
                    dd = f"tx + {u * TX}u"
                    L.append(f"      part_o[po + ({dd}) / 4u][({dd}) % 4u] = o_{u}[{r4}];")
            L.append(f"      if (tx == 0u) {{ part_ml[(b * {sq}u + qg) * {NS}u + split] = "
                     f"vec2<f32>(m_run[{r4}], lsum[{r4}]); }}")
        else:
            L += [f"      let l = lsum[{r4}];",
                  "      let inv = select(0.0, 1.0 / l, l > 0.0);",
                  f"      let ob = {_out_index(layout, B, sq, D, 'b', 'qg')};"]
            for u in range(NU):
                if VW == 4:
                    L.append(f"      out[ob / 4u + tx + {u * TX}u] = o{r4}_{u} * inv;")
                else:
                    dd = f"tx + {u * TX}u"
                    L.append(f"      out[(ob + {dd}) / 4u][({dd}) % 4u] = o_{u}[{r4}] * inv;")
        L += ["    }", "  }"]
    L.append("}\n")
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


def _key_span(kv_len, q_pos0, sq: int, causal: bool) -> Optional[int]:
    """Keys the longest query row sees, as far as the host knows: kv_len when it is an int (or
    q_pos0 + sq when that is smaller and both are ints); for a causal prefill with kv_len in a
    buffer, the prompt length (a fresh prefill sees sq keys; a chunk after a long context gets
    more splits than it needs, never fewer chunks per row); None (the cache capacity) otherwise."""
    if isinstance(kv_len, int):
        if causal and isinstance(q_pos0, int):
            return max(1, min(kv_len, q_pos0 + sq))
        return max(1, kv_len)
    return sq if causal else None


def attention(out: Buffer, q: Operand, k_cache: Operand, v_cache: Operand,
              kv_len: Union[Buffer, int], causal: bool = True, scale: Optional[float] = None,
              q_pos0: Union[Buffer, int, None] = None, out_layout: str = "bsd", kv_rows: int = 0) -> None:
    """Attention of q [B, sq, d] over the first kv_len keys of k_cache/v_cache [B, sk_max, d]
    (or [B / G, sk_max, d]: grouped-query attention, query head b reads K/V head b // G, as
    torch's enable_gqa=True).

    B is batch*heads; all three are f32/f16 Operands with any strides (e.g. caches laid out
    [n_heads, max_ctx, head_dim] and q [n_heads, sq, head_dim] need no copy). kv_len: int, or
    an int32 Buffer read at element 0 on the GPU (clamped to [0, sk_max]); with kv_rows > 0 the
    Buffer holds B / kv_rows lengths, one per kv_rows consecutive rows (a batch of sequences, each
    with its heads: every sequence attends over its own cache length). causal: key j is
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
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if out_layout not in ("bsd", "sbd"):
        raise ValueError(f"attention: out_layout must be 'bsd' or 'sbd', got {out_layout!r}")
    params = ()
    if isinstance(kv_len, KVParam):
        if not 0 <= kv_len.value <= sk_max:
            raise ValueError(f"attention: kv_len={int(kv_len.value)} outside [0, sk_max={sk_max}] (k_cache shape {tuple(k_cache.shape)})")
        params = ((kv_len.value, "u32"),)
    elif isinstance(kv_len, Buffer):
        n_len = B // kv_rows if kv_rows else 1
        if kv_rows and (kv_rows < 0 or B % kv_rows):
            raise ValueError(f"attention: kv_rows={kv_rows} does not divide the {B} rows of q {tuple(q.shape)}")
        if kv_len.nbytes < 4 * n_len:
            raise ValueError(f"attention: kv_len buffer ({kv_len.nbytes} bytes) must hold {n_len} int32")
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
    tp = _TilePlan(B, sq, sk_max, D, (), _key_span(kv_len, q_pos0, sq, causal))
    if tp.ok:
        p = tp
        src, binds = _tiled_source(tp, q, k_cache, v_cache, B, sq, sk_max, D, kv_len, q_pos0, causal, scale, out_layout,
                                   kv_rows)
        name = f"attention_tiled[{B}x{sq}x{sk_max}x{D}]"
    else:
        p = _Plan(B, sq, sk_max, D)
        src, binds = _main_source(p, q, k_cache, v_cache, B, sq, sk_max, D, kv_len, q_pos0, causal, scale, out_layout,
                                  kv_rows)
        name = f"attention[{B}x{sq}x{sk_max}x{D}]"
    n_wg = B * p.NQT * p.NSPLIT
    src = src.replace(_TGP, str(len(binds) + (1 if p.NSPLIT == 1 else 2)))
    if p.NSPLIT == 1:
        dispatch(name, src, binds + [(out, "rw")], grid_for(n_wg), params)
        return
    rows = B * sq
    part_o = _scratch_buffer("part_o", rows * p.NSPLIT * p.D4 * 16)
    part_ml = _scratch_buffer("part_ml", rows * p.NSPLIT * 8)
    dispatch(name, src, binds + [(part_o, "rw"), (part_ml, "rw")], grid_for(n_wg), params)
    dispatch(f"attention_combine[{B}x{sq}x{D}]", _combine_source(p, B, sq, D, out_layout),
             [(part_o, "read"), (part_ml, "read"), (out, "rw")], grid_for(rows))


# ----------------------------------------------------------------------------- fused decode step

# Keys per workgroup of the fused decode kernel. A short context (<= DECODE_CHUNK keys) is one
# workgroup per head that writes the output itself; a longer one is split into chunks whose
# partial (max, sum, acc) the last workgroup of each head to finish merges (no second dispatch).
DECODE_CHUNK = 64
DECODE_WG = 128
# knobs for same-run A/Bs (benchmarks' --tune attention.chunk=128): keys per workgroup of the decode kernel
DECODE_TUNING = {"chunk": DECODE_CHUNK}


def _decode_chunk() -> int:
    """DECODE_TUNING["chunk"], checked: a workgroup's DECODE_WG invocations hold one score each."""
    ch = int(DECODE_TUNING["chunk"])
    if not 1 <= ch <= DECODE_WG:
        raise ValueError(f"attention: DECODE_TUNING['chunk'] = {ch}; keys per decode workgroup are 1..{DECODE_WG}")
    return ch


def _pow2_divisor(n: int, cap: int) -> int:
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


def rope_attention_decode_supported(qkv: Operand, n_heads: int, head_dim: int, cache_dtype,
                                    max_ctx: Optional[int] = None) -> bool:
    """Whether `rope_attention_decode` takes these shapes (else: rope_kv_write + attention):
    qkv [B, 3, n_heads, head_dim] for B >= 1 tokens (one per sequence of a batch). With max_ctx,
    also whether the B * n_heads rows' split partials fit one storage binding of this device."""
    from .. import dtypes
    D4 = head_dim // 4
    ok = (head_dim % 4 == 0 and 0 < D4 <= DECODE_WG and cache_dtype in (dtypes.float16, dtypes.float32)
          and qkv.dtype in (dtypes.float32, dtypes.float16) and len(qkv.shape) == 4 and qkv.shape[0] >= 1)
    if ok and max_ctx is not None:
        rows = int(qkv.shape[0]) * int(n_heads)
        NS = max(1, -(-int(max_ctx) // _decode_chunk()))
        ok = 4 * _decode_layout(rows, NS, head_dim)[2] <= get_device().max_binding_size
    return ok


def rope_attention_decode(out: Buffer, k_cache: Buffer, v_cache: Buffer, qkv: Operand, positions,
                          kv_len, n_heads: int, head_dim: int, rot_dims: int, max_ctx: int,
                          base: float = 10000.0, cache_dtype=None, scale: Optional[float] = None,
                          mode: str = "neox", k: Optional[Operand] = None, v: Optional[Operand] = None,
                          n_kv_heads: Optional[int] = None, freq_factors=None) -> None:
    """One decode token's attention in ONE dispatch: for every head h,
        q = rope(qkv[0, 0, h]); k_cache[h, pos] = rope(qkv[0, 1, h]); v_cache[h, pos] = qkv[0, 2, h]
        out[0, h, :] = softmax(scale * q . k_cache[h, :kv_len]) @ v_cache[h, :kv_len]
    with pos = positions[0] and kv_len (both int32 buffers read on the GPU, so one pipeline
    serves every step). The key that pos names is written by the workgroup that reads it, before
    it reads it (a position outside [0, max_ctx) writes nothing, as in rope_kv_write).

    Why fused: at batch 1 every dispatch costs a few microseconds of GPU drain/launch; rope + KV
    write, attention and the split combine were three dependent dispatches per layer doing
    microseconds of work. The cross-split combine uses the last-workgroup-done pattern: each
    split stores its partial through atomics (coherent at device scope), bumps a per-head
    counter, and the workgroup that brings it to the split count merges and resets it.

    qkv: f32/f16 Operand [1, 3, n_heads, head_dim] (any strides); caches [n_heads, max_ctx,
    head_dim] of cache_dtype (f16 default, or f32); out: contiguous float32 [1, n_heads, head_dim].

    Separate operands (k and v given, LLaMA's own q/k/v projections): qkv is q [1, n_heads,
    head_dim], k and v are [1, n_kv_heads, head_dim] (any strides), the caches [n_kv_heads,
    max_ctx, head_dim]; query head h reads KV head h // (n_heads / n_kv_heads) (grouped-query
    attention). Every query head of a group ropes the new key itself (it uses it from registers);
    only the group's first head stores the row.

    A batch (kv_len=None; continuous batching's decode step): qkv [B, 3, n_heads, head_dim] (or
    q [B, n_heads, head_dim] with k, v [B, n_kv_heads, head_dim]) holds the next token of B
    sequences, token b of the sequence in cache slot b: the caches are [S >= B, heads, max_ctx,
    head_dim] (slot b starts at element b * heads * max_ctx * head_dim), positions is an int32
    Buffer of B positions, and row b is roped to positions[b], writes row positions[b] of slot b
    and attends over the slot's first positions[b] + 1 rows; out is [B, n_heads, head_dim]. As
    put_along_axis writes, a negative position counts from the end of the cache (its key length
    is then 0: zeros out) and one past the cache writes nothing (it attends over all max_ctx rows).
    B = 1 with kv_len=None is the same computation for one sequence.

    freq_factors: float32 [rot_dims/2] (Llama 3.1's rope_freqs, linear scaling), as `rope` takes."""
    from .. import dtypes
    from .rope import _check_common
    fn = "rope_attention_decode"
    cache_dtype = dtypes.float16 if cache_dtype is None else dtypes.as_dtype(cache_dtype)
    _check_common(fn, head_dim, rot_dims, mode)
    check_float_operand("qkv", qkv, fn)
    H, D = int(n_heads), int(head_dim)
    batched = kv_len is None
    B = int(qkv.shape[0]) if batched and len(qkv.shape) in (3, 4) and int(qkv.shape[0]) >= 1 else 1
    sep = None
    if k is not None or v is not None:
        Hkv = int(n_kv_heads if n_kv_heads is not None else H)
        if k is None or v is None or Hkv <= 0 or H % Hkv:
            raise ValueError(f"{fn}: separate q/k/v need both k and v and n_kv_heads dividing n_heads={H}")
        for name, op, h in (("q", qkv, H), ("k", k, Hkv), ("v", v, Hkv)):
            check_float_operand(name, op, fn)
            if tuple(op.shape) != (B, h, D):
                raise ValueError(f"{fn}: {name} has shape {tuple(op.shape)}, expected [{B}, {h}, head_dim={D}]")
            check_fits(name, op, fn)
        sep = (k, v, Hkv)
    elif n_kv_heads is not None and int(n_kv_heads) != H:
        raise ValueError(f"{fn}: n_kv_heads {n_kv_heads} != n_heads {H} needs separate q, k and v operands")
    elif tuple(qkv.shape) != (B, 3, H, D):
        raise ValueError(f"{fn}: qkv has shape {tuple(qkv.shape)}, expected [{B}, 3, n_heads={H}, head_dim={D}]")
    probe = qkv if sep is None else Operand(qkv.buffer, qkv.dtype, (B, 3, H, D), (0, 0, 0, 0), 0)
    if not rope_attention_decode_supported(probe, H, D, cache_dtype):
        raise ValueError(f"{fn}: head_dim {D} / cache {cache_dtype} not supported (head_dim % 4 == 0, <= {4 * DECODE_WG})")
    if not rope_attention_decode_supported(probe, H, D, cache_dtype, max_ctx):
        raise ValueError(f"{fn}: the split partials of {B} x {H} heads over max_ctx={max_ctx} exceed this device's "
                         f"max_storage_buffer_binding_size ({get_device().max_binding_size} bytes)")
    if sep is None:
        check_fits("qkv", qkv, fn)
    if batched:
        pos_mode = "batch"
        if not isinstance(positions, Buffer) or positions.nbytes < 4 * B:
            raise ValueError(f"{fn}: with kv_len=None, positions must be a Buffer holding {B} int32 (one per "
                             f"sequence of qkv {tuple(qkv.shape)}), got {positions!r}")
    else:
        pos_mode = "params" if not isinstance(positions, Buffer) else "buffers"
        for name, b in (("positions", positions), ("kv_len", kv_len)):
            if pos_mode == "params":
                if isinstance(b, Buffer) or not isinstance(b, int):
                    raise ValueError(f"{fn}: positions and kv_len must both be Buffers or both ints, got {name}={b!r}")
            elif not isinstance(b, Buffer) or b.nbytes < 4:
                raise ValueError(f"{fn}: {name} must be a Buffer holding an int32")
    csize = B * (H if sep is None else sep[2]) * max_ctx * D * cache_dtype.itemsize
    check_out("k_cache", k_cache, csize, fn)
    check_out("v_cache", v_cache, csize, fn)
    check_out("out", out, 4 * B * H * D, fn)
    distinct(fn, out=out, k_cache=k_cache, v_cache=v_cache, qkv=qkv.buffer,
             positions=positions if isinstance(positions, Buffer) else None,
             kv_len=kv_len if isinstance(kv_len, Buffer) else None)
    if sep is not None:
        for name, op in (("k", sep[0]), ("v", sep[1])):
            if op.buffer in (out, k_cache, v_cache):
                raise ValueError(f"{fn}: {name} shares a buffer with an output")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    src, NS = _decode_source(qkv, B, H, D, rot_dims, max_ctx, base, mode, cache_dtype, scale, sep, freq_factors,
                             pos_mode)
    scratch = _decode_scratch(B * H, NS, D)
    heads = f"{H}" if sep is None else f"{H}x{sep[2]}"
    name = (f"attention_decode{'' if sep is None else '_gqa'}"
            f"{'_batch' if batched else ''}[{f'{B}x' if batched else ''}{heads}x{max_ctx}x{D}]")
    # bindings in the order _decode_source declares them
    binds = [(qkv.buffer, "read")]
    if pos_mode == "buffers":
        binds += [(positions, "read"), (kv_len, "read")]
    elif pos_mode == "batch":
        binds.append((positions, "read"))
    binds += [(k_cache, "rw"), (v_cache, "rw"), (out, "rw"), (scratch, "rw")]
    if sep is not None:
        binds += [(sep[0].buffer, "read"), (sep[1].buffer, "read")]
    # params: the position and the key length as kernel parameters (step variables under
    # tg.capture): no buffers to fill for them, so no kernel before this one in a decode step
    params = ((positions, "i32"), (kv_len, "i32")) if pos_mode == "params" else ()
    dispatch(name, src, binds, grid_for(B * H * NS), params)


def _decode_layout(H: int, NS: int, D: int) -> tuple:
    """u32 offsets in the scratch buffer: counters [H] (padded), (m, l) [H, NS], acc [H, NS, D]
    (H: the rows of the kernel, batch x heads)."""
    ml = -(-H // 4) * 4
    acc = ml + 2 * H * NS
    return ml, acc, acc + H * NS * D


def _decode_scratch(H: int, NS: int, D: int) -> Buffer:
    """The split partials + counters; counters must start at 0 (the kernel leaves them at 0).
    One buffer per layout: the counters of one (H, NS) sit where another layout keeps its
    partials, so kernels of different head counts (a model with GQA beside one without) must
    not share it."""
    from ..runtime import write
    n = _decode_layout(H, NS, D)[2] * 4
    key = ("decode", H, NS, D)
    buf = _scratch.get(key)
    if buf is None:
        import numpy as np

        from ..runtime import untraced
        with untraced():     # kept for the process: from the pool, never from a capture's arena
            buf = Buffer(n)
            write(buf, np.zeros(n // 4, np.uint32))
        _scratch[key] = buf
    return buf


def _conv(ctype: str, w: str) -> str:
    """A loaded cache vector (ctype) as vec4<f32>."""
    if ctype == "vec4<f32>":
        return w
    if ctype == "vec4<f16>":
        return f"vec4<f32>({w})"
    return f"vec4<f32>(unpack2x16float({w}.x), unpack2x16float({w}.y))"


def _decode_source(qkv: Operand, B: int, H: int, D: int, rot: int, max_ctx: int, base: float, mode: str,
                   cache_dtype, scale: float, sep=None, freq_factors=None, pos_mode: str = "buffers") -> tuple:
    """WGSL of rope_attention_decode: one workgroup per (row r = b * H + h, key split s).
    pos_mode: "buffers" (positions[0] and kv_len from int32 buffers), "params" (both from the
    uniform), "batch" (row b's position from positions[b], its key length positions[b] + 1,
    a negative position counting from the end of the cache)."""
    from .. import dtypes
    from .rope import _rope_val_wgsl, _rope_wgsl
    dev = get_device()
    sub = dev.has_subgroups
    WG, CH = DECODE_WG, _decode_chunk()
    NS = max(1, -(-max_ctx // CH))
    D4 = D // 4
    TPK = _pow2_divisor(D4, 8)          # threads per key in q.k (interleaved vec4s: coalesced)
    VPT = D4 // TPK
    KPP = WG // TPK                      # keys per pass
    PASSES = -(-CH // KPP)
    KG = WG // D4                        # key groups in p.v
    JPG = -(-CH // KG)
    ML, ACC, _ = _decode_layout(B * H, NS, D)
    f16 = cache_dtype is dtypes.float16
    native = f16 and dev.has_f16
    if not f16:
        ctype, st = "vec4<f32>", "{v}"
    elif native:
        ctype, st = "vec4<f16>", "vec4<f16>({v})"
    else:
        ctype, st = "vec2<u32>", "vec2<u32>(pack2x16float(({v}).xy), pack2x16float(({v}).zw))"
    # bindings: x, [positions, [kv_len]], kc, vc, out, scr, [xk, xv], [the parameter uniform]
    nb = {"buffers": 3, "batch": 2, "params": 1}[pos_mode]
    decls = ""
    if pos_mode != "params":
        decls += "@group(0) @binding(1) var<storage, read> positions: array<i32>;\n"
    if pos_mode == "buffers":
        decls += "@group(0) @binding(2) var<storage, read> kvlen_buf: array<i32>;\n"
    decls += (f"@group(0) @binding({nb}) var<storage, read_write> kc: array<{ctype}>;\n"
              f"@group(0) @binding({nb + 1}) var<storage, read_write> vc: array<{ctype}>;\n"
              f"@group(0) @binding({nb + 2}) var<storage, read_write> out: array<vec4<f32>>;\n"
              f"@group(0) @binding({nb + 3}) var<storage, read_write> scr: array<atomic<u32>>;\n")
    if pos_mode == "params":
        decls += f"@group(0) @binding({nb + 4 + (0 if sep is None else 2)}) var<uniform> tgp: array<vec4<u32>, 1>;\n"
    if pos_mode == "buffers":
        ipos, kvl, wrow = "positions[0]", f"min(u32(max(kvlen_buf[0], 0)), {max_ctx}u)", "ipos"
    elif pos_mode == "params":
        ipos, kvl, wrow = "bitcast<i32>(tgp[0].x)", f"min(u32(max(bitcast<i32>(tgp[0].y), 0)), {max_ctx}u)", "ipos"
    else:
        ipos, kvl, wrow = "positions[b]", f"min(u32(max(ipos + 1, 0)), {max_ctx}u)", f"select(ipos, ipos + {max_ctx}, ipos < 0)"
    rd = Reader("x", qkv, 0, False)
    readers = [rd]
    if sep is None:
        sb, s3, sh, sd = qkv.strides
        G, Hkv = 1, H
        kdecl = ""
    else:   # q [B, H, D], k / v [B, Hkv, D] at their own bindings; query head h reads KV head h / G
        kop, vop, Hkv = sep
        G = H // Hkv
        sb, sh, sd = qkv.strides
        s3 = 0
        rk, rv = Reader("xk", kop, nb + 4, False), Reader("xv", vop, nb + 5, False)
        readers += [rk, rv]
        kdecl = rk.decl() + rv.decl() + _rope_val_wgsl(kop.strides[2], "valk", "xk_at")
    if sep is None:
        kval = "val4(bq + {s3}u, d4, posf)".format(s3=s3)
        vbase = f"bq + {2 * s3}u + d4 * {4 * sd}u"
        vat, vsd = "x_at", sd
        kvarg, kvpar = "bq", "bq: u32"
    else:
        kval = "vec4<f32>(valk(bk, d4 * 4u, posf), valk(bk, d4 * 4u + 1u, posf), valk(bk, d4 * 4u + 2u, posf), " \
               "valk(bk, d4 * 4u + 3u, posf))"
        vsd = vop.strides[2]
        vbase = f"bv + d4 * {4 * vsd}u"
        vat = "xv_at"
        kvarg, kvpar = "bk, bv", "bk: u32, bv: u32"
    kvoff = "" if sep is None else (
        f"  let bk = {kop.offset}u + b * {kop.strides[0]}u + hk * {kop.strides[1]}u;\n"
        f"  let bv = {vop.offset}u + b * {vop.strides[0]}u + hk * {vop.strides[1]}u;\n")
    sgp, sg = sg_builtin(sub)
    cv = lambda w: _conv(ctype, w)   # noqa: E731
    src = f"""{enable_f16(*readers, native)}{rd.decl()}{kdecl}{decls}
{_rope_wgsl(rot, base, mode, freq_factors)}
{seg_reduce("red_max", "max", WG, WG, sub, NEG_INF)}
{seg_reduce("red_sum", "+", WG, WG, sub, "0.0")}
const SCALE_LOG2E: f32 = {f32_lit(scale * math.log2(math.e))};
var<workgroup> Qs: array<vec4<f32>, {D4}>;
var<workgroup> Sp: array<f32, {PASSES * KPP * TPK}>;
var<workgroup> Ps: array<f32, {CH}>;
var<workgroup> Xs: array<vec4<f32>, {KG * D4}>;
var<workgroup> last_sh: u32;
var<workgroup> Kn: array<vec4<f32>, {D4}>;
var<workgroup> Vn: array<vec4<f32>, {D4}>;
{_rope_val_wgsl(sd)}fn val4(b: u32, d4: u32, pos: f32) -> vec4<f32> {{
  let d = d4 * 4u;
  return vec4<f32>(val(b, d, pos), val(b, d + 1u, pos), val(b, d + 2u, pos), val(b, d + 3u, pos));
}}
fn write_row(ch: u32, pos: u32, {kvpar}, posf: f32, lid: u32, store: bool) {{
  let row = (ch * {max_ctx}u + pos) * {D4}u;
  for (var d4 = lid; d4 < {D4}u; d4 = d4 + {WG}u) {{
    let kv = {kval};
    let kq = {st.format(v="kv")};
    if (store) {{ kc[row + d4] = kq; }}
    Kn[d4] = {cv("kq")};   // as the cache stores it (f16-rounded), like a read-back
    let b = {vbase};
    let vv = vec4<f32>({vat}(b), {vat}(b + {vsd}u), {vat}(b + {2 * vsd}u), {vat}(b + {3 * vsd}u));
    let vq = {st.format(v="vv")};
    if (store) {{ vc[row + d4] = vq; }}
    Vn[d4] = {cv("vq")};
  }}
}}
fn st_f(i: u32, v: f32) {{ atomicStore(&scr[i], bitcast<u32>(v)); }}
fn ld_f(i: u32) -> f32 {{ return bitcast<f32>(atomicLoad(&scr[i])); }}
@compute @workgroup_size({WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32{sgp}) {{
  let wg = wid.x + wid.y * nwg.x;
  if (wg >= {B * H * NS}u) {{ return; }}
  let r = wg / {NS}u;           // output row: sequence b, query head h
  let s = wg % {NS}u;
  let b = r / {H}u;
  let h = r % {H}u;
  let ipos = {ipos};
  let posf = f32(ipos);
  let kvl = {kvl};
  let wrow = {wrow};            // the cache row this token's K/V go to
  let nse = clamp((kvl + {CH - 1}u) / {CH}u, 1u, {NS}u);
  let bq = {qkv.offset}u + b * {sb}u + h * {sh}u;
  let hk = h / {G}u;
  let ch = b * {Hkv}u + hk;     // the (slot, KV head) whose cache rows this row reads
  let store = h % {G}u == 0u;   // one query head per KV head writes the new row
{kvoff}  let k_lo = s * {CH}u;
  let nk = min(kvl - min(kvl, k_lo), {CH}u);
  let klast = k_lo + max(nk, 1u) - 1u;
  let kbase = ch * {max_ctx}u;
  // the new key/value row is written by the split that holds it; that split uses the values
  // from registers (Kn/Vn) instead of reading the row back, so no load waits for the store
  let writer = wrow >= 0 && wrow < {max_ctx} && u32(wrow) / {CH}u == s;
  let jpos = u32(wrow) - k_lo;
  if (s >= nse) {{
    if (writer && store) {{ write_row(ch, u32(wrow), {kvarg}, posf, lid, true); }}
    return;
  }}
  // every cache load of this workgroup, issued at once: the K rows of the scores (TPK threads
  // per key, interleaved vec4s) and the V rows of p.v (KG groups of D4 lanes)
  let kt = lid % {TPK}u;
  let kk = lid / {TPK}u;
  let g = lid / {D4}u;
  let d4 = lid % {D4}u;
  let gg = min(g, {KG - 1}u);
"""
    L = []
    for p in range(PASSES):
        L.append(f"  let kr{p} = (kbase + min(k_lo + {p * KPP}u + kk, klast)) * {D4}u + kt;")
        for v in range(VPT):
            L.append(f"  let kw{p}_{v} = kc[kr{p} + {v * TPK}u];")
    for i in range(JPG):
        L.append(f"  let vw{i} = vc[(kbase + min(k_lo + gg + {i * KG}u, klast)) * {D4}u + d4];")
    src += "\n".join(L) + f"""
  if (writer) {{ write_row(ch, u32(wrow), {kvarg}, posf, lid, store); }}
  if (lid < {D4}u) {{ Qs[lid] = val4(bq, lid, posf) * SCALE_LOG2E; }}
  workgroupBarrier();
"""
    L = []
    for p in range(PASSES):
        L.append(f"  {{ let j = {p * KPP}u + kk; let new_k = writer && j == jpos; var d = 0.0;")
        for v in range(VPT):
            L.append(f"    d += dot(Qs[kt + {v * TPK}u], select({cv('kw%d_%d' % (p, v))}, Kn[kt + {v * TPK}u], new_k));")
        L.append(f"    Sp[j * {TPK}u + kt] = d; }}")
    src += "\n".join(L) + f"""
  workgroupBarrier();
  var sc = {NEG_INF};
  if (lid < nk) {{
    var t = 0.0;
    for (var q = 0u; q < {TPK}u; q = q + 1u) {{ t += Sp[lid * {TPK}u + q]; }}
    sc = t;
  }}
  let m = red_max(sc, lid, {sg});
  let p = select(0.0, exp2(sc - m), lid < nk);
  let l = red_sum(p, lid, {sg});
  if (lid < {CH}u) {{ Ps[lid] = p; }}
  workgroupBarrier();
  // p.v: KG groups of D4 lanes; lane d4 of group g sums keys g, g + KG, ...
  var acc = vec4<f32>(0.0);
  if (g < {KG}u) {{
"""
    L = []
    for i in range(JPG):
        L.append(f"    {{ let j = g + {i * KG}u; if (j < nk) {{ acc += Ps[j] * "
                 f"select({cv('vw%d' % i)}, Vn[d4], writer && j == jpos); }} }}")
    src += "\n".join(L) + f"""
    Xs[g * {D4}u + d4] = acc;
  }}
  workgroupBarrier();
  var o = vec4<f32>(0.0);
  if (lid < {D4}u) {{
    for (var q = 0u; q < {KG}u; q = q + 1u) {{ o += Xs[q * {D4}u + lid]; }}
  }}
  if (nse == 1u) {{
    if (lid < {D4}u) {{ out[r * {D4}u + lid] = select(vec4<f32>(0.0), o / l, l > 0.0); }}
    return;
  }}
  let slot = r * {NS}u + s;
  if (lid < {D4}u) {{
    let a = {ACC}u + (slot * {D4}u + lid) * 4u;
    st_f(a, o.x); st_f(a + 1u, o.y); st_f(a + 2u, o.z); st_f(a + 3u, o.w);
  }}
  if (lid == 0u) {{ st_f({ML}u + 2u * slot, m); st_f({ML}u + 2u * slot + 1u, l); }}
  storageBarrier();
  if (lid == 0u) {{
    let done = atomicAdd(&scr[r], 1u) + 1u;
    let last = done == nse;
    if (last) {{ atomicStore(&scr[r], 0u); }}
    last_sh = select(0u, 1u, last);
  }}
  let is_last = workgroupUniformLoad(&last_sh);
  if (is_last == 0u) {{ return; }}
  storageBarrier();
  if (lid < {D4}u) {{
    var M = {NEG_INF};
    for (var q = 0u; q < nse; q = q + 1u) {{ M = max(M, ld_f({ML}u + 2u * (r * {NS}u + q))); }}
    var Ls = 0.0;
    var O = vec4<f32>(0.0);
    for (var q = 0u; q < nse; q = q + 1u) {{
      let sl = r * {NS}u + q;
      let w = exp2(ld_f({ML}u + 2u * sl) - M);
      Ls += ld_f({ML}u + 2u * sl + 1u) * w;
      let a = {ACC}u + (sl * {D4}u + lid) * 4u;
      O += vec4<f32>(ld_f(a), ld_f(a + 1u), ld_f(a + 2u), ld_f(a + 3u)) * w;
    }}
    out[r * {D4}u + lid] = select(vec4<f32>(0.0), O / Ls, Ls > 0.0);
  }}
}}
"""
    return src, NS
