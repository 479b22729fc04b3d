"""On-GPU token selection from one row of logits (`sample`), or from each of B rows with
per-row parameters read from buffers (`sample_rows`, continuous batching: see "many rows"
below), so decode step N+1 can be queued before token N is read back (the chosen id stays in
a GPU buffer that the next step's embedding gather reads). Both kernels are built from the
same WGSL blocks (radix select, compaction, bitonic sort, inverse-CDF walk).

Semantics of `sample` (sample_reference below is the executable definition, in float64 NumPy):
  1. repetition penalty (HF): every distinct id t in prev_tokens[:n_prev] with 0 <= t < vocab
     gets l[t] * p if l[t] < 0 else l[t] / p.
  2. temperature == 0: greedy, argmax with the first maximum winning (like numpy.argmax);
     NaN logits never win, and a row of only NaN gives -1.
  3. otherwise z = l / temperature, then
     * top_k > 0: the candidates are the top_k ids ordered by (z descending, id ascending) —
       exactly k of them; ties at the k-th value are broken by lower id (HF keeps all ties).
       top_k = 0 with top_p < 1: the candidates are the KCAP = 256 best ids and the top-p mass
       is measured against the full-vocabulary softmax (exact unless the nucleus holds more
       than 256 ids, then the 256 best are kept).
     * top_p < 1 (HF TopP): walking the candidates best first, keep id r while the probability
       mass of the ones before it is < top_p (the first is always kept).
     * draw: with weights w_r = exp(z_r - z_max) over the kept ids, pick the first r whose
       running sum exceeds u * sum(w) (u uniform in [0, 1) from the host, so seeds reproduce).
     * a weight below 2^-126 (FLT_MIN) counts as 0 everywhere (see `flush_weights`).
     * top_k = 0 and top_p >= 1: the same inverse-CDF draw over the whole vocabulary in id order.
GPU and reference agree except when u * sum lands within float32 rounding of a boundary.

How (one workgroup): penalised ids go into a shared-memory bitmap; the k-th largest value is
found by a 4-pass radix select on order-preserving u32 keys (a 256-bin histogram per pass);
the k winners are compacted in id order with two prefix scans and sorted by a bitonic sort
in shared memory; thread 0 walks the <= 256 survivors for top-p and the draw.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from .. import dtypes
from ..runtime import WGSL_LINEAR_ID, Buffer, dispatch, get_device, grid_for, upload
from .common import Operand
from .nn_wgsl import (NEG_INF, check_fits, check_out, distinct, f32_lit, max_workgroup_size, next_pow2, seg_reduce,
                      sg_builtin)

KCAP = 256          # candidates kept when top_k is 0 but top_p < 1 (and the largest top_k allowed)
FLT_MIN = float(np.finfo(np.float32).tiny)       # 2^-126: smaller parameters and weights count as 0
FLT_MAX = float(np.finfo(np.float32).max)


def flush_weights(w: np.ndarray) -> np.ndarray:
    """Sampling weights below FLT_MIN set to 0 (the references' side of `_WFLUSH`).

    Why: with u = 0 (or a u * sum below the smallest weight) the draw picks the first id with a
    nonzero weight, so a weight that one arithmetic keeps and another loses decides the token.
    float64 keeps exp(-700); float32 loses anything below 2^-149, and GPUs may flush float32
    subnormals (lavapipe does) or keep them. Declaring every weight under 2^-126 zero, in the
    kernels and the references alike, makes that pick the same everywhere; the mass dropped is
    < V * 2^-126 against a best weight of 1."""
    w = np.asarray(w, np.float64)
    return np.where(w >= FLT_MIN, w, 0.0)


# the kernels' side of flush_weights: the explicit test decides, not the GPU's subnormal mode
_WFLUSH = "fn wflush(e: f32) -> f32 { return select(0.0, e, e >= 0x1p-126f); }"


# ----------------------------------------------------------------------------- reference


def sample_reference(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, u: float = 0.0,
                     repetition_penalty: Optional[float] = None, prev_tokens=None) -> int:
    """The token `sample` picks for these logits and uniform number u (float64 NumPy)."""
    l = np.asarray(logits, dtype=np.float64).copy()
    V = l.shape[0]
    if repetition_penalty is not None and repetition_penalty != 1.0 and prev_tokens is not None:
        ids = np.unique(np.asarray(prev_tokens, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < V)]
        s = l[ids]
        l[ids] = np.where(s < 0, s * repetition_penalty, s / repetition_penalty)
    if temperature == 0:
        if np.isnan(l).all():
            return -1
        return int(np.nanargmax(l))
    z = l / np.float64(np.float32(temperature))
    u = float(min(max(u, 0.0), np.nextafter(1.0, 0.0)))
    if top_k <= 0 and top_p >= 1.0:
        w = flush_weights(np.exp(z - z.max()))
        c = np.cumsum(w)
        hit = np.nonzero(c > u * c[-1])[0]
        return int(hit[0]) if hit.size else int(np.nonzero(w > 0)[0][-1])
    k = min(top_k if top_k > 0 else KCAP, V)
    order = np.lexsort((np.arange(V), -z))[:k]     # z descending, id ascending
    w = flush_weights(np.exp(z[order] - z[order[0]]))
    norm = w.sum() if top_k > 0 else flush_weights(np.exp(z - z[order[0]])).sum()
    keep = k
    if top_p < 1.0:
        before = np.concatenate([[0.0], np.cumsum(w)[:-1]])
        drop = np.nonzero((np.arange(k) > 0) & (before >= top_p * norm))[0]
        keep = int(drop[0]) if drop.size else k
    c = np.cumsum(w[:keep])
    hit = np.nonzero(c > u * c[-1])[0]
    return int(order[hit[0]] if hit.size else order[keep - 1])


# ----------------------------------------------------------------------------- kernel


_KEY = """
fn okey(f: f32) -> u32 {
  let b = bitcast<u32>(f);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}
"""


def _scan_fn(name: str, ty: str, WG: int) -> str:
    """fn {name}(v, lid): inclusive prefix sum over the workgroup in lid order (Hillis-Steele);
    {name}_buf holds every invocation's result until the next call."""
    return f"""var<workgroup> {name}_buf: array<{ty}, {WG}>;
fn {name}(v: {ty}, lid: u32) -> {ty} {{
  workgroupBarrier();
  {name}_buf[lid] = v;
  workgroupBarrier();
  for (var off = 1u; off < {WG}u; off = off << 1u) {{
    var x = {name}_buf[lid];
    if (lid >= off) {{ x = x + {name}_buf[lid - off]; }}
    workgroupBarrier();
    {name}_buf[lid] = x;
    workgroupBarrier();
  }}
  return {name}_buf[lid];
}}
"""


# ----------------------------------------------------------------------------- building blocks
# WGSL line lists shared by the one-row kernel (`_source`, constants baked in) and the rows
# kernel (`_rows_source`, runtime values). Each takes the expressions it needs as WGSL text:
# a count is "40u" in one and "kk" (a function parameter) in the other.


def _radix_select_lines(WG: int, kk: str, key: str) -> list:
    """The kk-th largest of key(i) over i < V by a 4-pass radix select (a 256-bin histogram of
    one key byte per pass, highest byte first). Leaves `T` (that key) and `need_eq` (how many
    ids with key == T belong to the kk largest, lowest ids first). Needs `hist`, `ctl`, `lid`."""
    return ["  var prefix = 0u;", "  var pmask = 0u;", f"  var kleft = {kk};",
            "  for (var ps = 0u; ps < 4u; ps = ps + 1u) {",
            "    let sh = 24u - 8u * ps;",
            "    atomicStore(&hist[lid & 255u], 0u);" if WG >= 256 else
            f"    for (var h = lid; h < 256u; h = h + {WG}u) {{ atomicStore(&hist[h], 0u); }}",
            "    workgroupBarrier();",
            f"    for (var i = lid; i < V; i = i + {WG}u) {{",
            f"      let key = {key};",
            "      if ((key & pmask) == prefix) { atomicAdd(&hist[(key >> sh) & 255u], 1u); }",
            "    }",
            "    workgroupBarrier();",
            "    if (lid == 0u) {",
            "      var above = 0u;",
            "      var d = 255u;",
            "      loop {",
            "        let h = atomicLoad(&hist[d]);",
            "        if (above + h >= kleft || d == 0u) { break; }",
            "        above += h;",
            "        d = d - 1u;",
            "      }",
            "      ctl[0] = d; ctl[1] = above;",
            "    }",
            "    let dsel = workgroupUniformLoad(&ctl[0]);",
            "    let above = ctl[1];",
            "    prefix = prefix | (dsel << sh);",
            "    pmask = pmask | (255u << sh);",
            "    kleft = kleft - above;",
            "    workgroupBarrier();",
            "  }",
            "  let T = prefix;",
            "  let need_eq = kleft;"]


def _compact_lines(WG: int, CH: int, val: str, key: str, store: str, kk: str, kp: str, pad: str) -> list:
    """Compaction in id order: the ids whose key is > T, and the first need_eq ids whose key
    == T, go to ci[0..kk) with `store` (an expression of z = val(i) and key = key(z)) in cv;
    cv/ci[kk..kp) get `pad` / 0xffffffff. Each invocation owns the CH ids from lid * CH; two
    prefix scans (scan_u) place them."""
    return [f"  let c0 = min(lid * {CH}u, V);",
            f"  let c1 = min(c0 + {CH}u, V);",
            "  var ngt = 0u;", "  var neq = 0u;",
            f"  for (var i = c0; i < c1; i = i + 1u) {{ let key = {key}({val}(i)); ngt += u32(key > T); neq += u32(key == T); }}",
            "  let eq_before = scan_u(neq, lid) - neq;",
            "  let take_eq = min(neq, need_eq - min(need_eq, eq_before));",
            "  var p = scan_u(ngt + take_eq, lid) - (ngt + take_eq);",
            "  var eqc = 0u;",
            "  for (var i = c0; i < c1; i = i + 1u) {",
            f"    let z = {val}(i);",
            f"    let key = {key}(z);",
            "    var take = key > T;",
            "    if (key == T && eqc < take_eq) { take = true; eqc = eqc + 1u; }",
            f"    if (take && p < {kk}) {{ cv[p] = {store}; ci[p] = i; p = p + 1u; }}",
            "  }",
            f"  for (var r = {kk} + lid; r < {kp}; r = r + {WG}u) {{ cv[r] = {pad}; ci[r] = 0xffffffffu; }}",
            "  workgroupBarrier();"]


def _bitonic_lines(WG: int, kp: str) -> list:
    """Sort cv/ci[0..kp) (kp a power of two) best first by `before(v, i, w, j)`."""
    return [f"  for (var k = 2u; k <= {kp}; k = k << 1u) {{",
            "    for (var j = k >> 1u; j > 0u; j = j >> 1u) {",
            f"      for (var a = lid; a < {kp}; a = a + {WG}u) {{",
            "        let b = a ^ j;",
            "        if (b > a) {",
            "          let va = cv[a]; let ia = ci[a]; let vb = cv[b]; let ib = ci[b];",
            "          let asc = (a & k) == 0u;",
            "          if ((asc && before(vb, ib, va, ia)) || (!asc && before(va, ia, vb, ib))) {",
            "            cv[a] = vb; ci[a] = ib; cv[b] = va; ci[b] = ia;",
            "          }",
            "        }",
            "      }",
            "      workgroupBarrier();",
            "    }",
            "  }"]


def _walk_lines(WG: int, CH: int, w_sum: str, w_walk: str, pre_sum=(), pre_walk=()) -> list:
    """Inverse-CDF draw over the whole vocabulary in id order: each invocation sums the
    weights of its CH ids (`w_sum`, an expression of i), a scan finds the chunk where the
    running sum passes u * total, and its owner walks it (`w_walk`). Leaves `tok` (uniform).
    Needs `u`, scan_f, `owner`, `pick`. pre_sum / pre_walk: lines before the sum / the walk."""
    return ([f"  let c0 = min(lid * {CH}u, V);",
             f"  let c1 = min(c0 + {CH}u, V);"] + list(pre_sum) +
            ["  var s = 0.0;",
             f"  for (var i = c0; i < c1; i = i + 1u) {{ s += {w_sum}; }}",
             "  let incl = scan_f(s, lid);",
             f"  let total = scan_f_buf[{WG - 1}u];",
             "  let excl = select(0.0, scan_f_buf[max(lid, 1u) - 1u], lid > 0u);",
             "  let goal = u * total;",
             "  if (lid == 0u) { atomicStore(&owner, 0u); }",
             "  workgroupBarrier();",
             # the chunk holding the goal: the last non-empty chunk starting at or before it
             "  if (s > 0.0 && excl <= goal) { atomicMax(&owner, lid); }",
             "  workgroupBarrier();",
             "  if (lid == atomicLoad(&owner)) {"] + list(pre_walk) +
            ["    var c = excl;",
             "    var found = 0xffffffffu;",
             "    var lastnz = c0;",
             "    for (var i = c0; i < c1; i = i + 1u) {",
             f"      let w = {w_walk};",
             "      c += w;",
             "      if (w > 0.0) { lastnz = i; }",
             "      if (c > goal) { found = i; break; }",
             "    }",
             "    pick = select(found, lastnz, found == 0xffffffffu);",
             "  }",
             "  let tok = workgroupUniformLoad(&pick);"])


def _source(vocab: int, logits_offset: int, temperature: float, top_k: int, top_p: float, penalty: Optional[float],
            prev: Optional[tuple], append: bool, WG: int) -> tuple:
    """WGSL and binding names. prev: (max_prev, n_prev_const or None when from a buffer)."""
    greedy = temperature == 0
    full = (not greedy) and top_k <= 0 and top_p >= 1.0
    K = min(top_k if top_k > 0 else KCAP, vocab)
    KP = next_pow2(K)
    CH = -(-vocab // WG)
    names = ["logits"]
    decl = ["@group(0) @binding(0) var<storage, read> logits: array<f32>;"]
    if not greedy:
        decl.append(f"@group(0) @binding({len(names)}) var<storage, read> rnd: array<f32>;")
        names.append("rand")
    acc = "read_write" if append else "read"
    if prev is not None:
        decl.append(f"@group(0) @binding({len(names)}) var<storage, {acc}> prev: array<i32>;")
        names.append("prev_tokens")
        if prev[1] is None:
            decl.append(f"@group(0) @binding({len(names)}) var<storage, {acc}> nprev: array<i32>;")
            names.append("n_prev")
    decl.append(f"@group(0) @binding({len(names)}) var<storage, read_write> out_token: array<i32>;")
    names.append("out_token")
    L = decl + [_KEY, _WFLUSH, seg_reduce("red_max", "max", WG, WG, False, NEG_INF), seg_reduce("red_sum", "+", WG, WG, False, "0.0"),
                f"const V: u32 = {vocab}u;", f"const OFF: u32 = {logits_offset}u;"]
    pen = penalty is not None and penalty != 1.0 and prev is not None
    if pen:
        NW = -(-vocab // 32)
        L.append(f"var<workgroup> pen_bits: array<atomic<u32>, {NW}>;")
        L.append(f"fn logit(i: u32) -> f32 {{ let x = logits[OFF + i]; "
                 f"if (((atomicLoad(&pen_bits[i >> 5u]) >> (i & 31u)) & 1u) != 0u) {{ "
                 f"return select(x / {f32_lit(penalty)}, x * {f32_lit(penalty)}, x < 0.0); }} return x; }}")
    else:
        L.append("fn logit(i: u32) -> f32 { return logits[OFF + i]; }")
    if not greedy:
        L.append(f"fn zval(i: u32) -> f32 {{ return logit(i) / {f32_lit(temperature)}; }}")
    if greedy:
        L += [f"var<workgroup> bv: array<f32, {WG}>;", f"var<workgroup> bi: array<u32, {WG}>;",
              "fn better(v: f32, i: u32, w: f32, j: u32) -> bool { return v > w || (v == w && i < j); }"]
    elif full:
        L += [_scan_fn("scan_f", "f32", WG), "var<workgroup> owner: atomic<u32>;", "var<workgroup> pick: u32;"]
    else:
        L += [_scan_fn("scan_u", "u32", WG), "var<workgroup> hist: array<atomic<u32>, 256>;",
              "var<workgroup> ctl: array<u32, 2>;",
              f"var<workgroup> cv: array<f32, {KP}>;", f"var<workgroup> ci: array<u32, {KP}>;",
              "fn before(v: f32, i: u32, w: f32, j: u32) -> bool { return v > w || (v == w && i < j); }"]
    L += [f"@compute @workgroup_size({WG})",
          "fn main(@builtin(local_invocation_index) lid: u32) {",
          f"  let ninf = {NEG_INF};"]
    if prev is not None:
        nexpr = "nprev[0]" if prev[1] is None else f"{prev[1]}"
        L.append(f"  let np = u32(clamp({nexpr}, 0, {prev[0]}));")
    if pen:
        L += [f"  for (var w = lid; w < {NW}u; w = w + {WG}u) {{ atomicStore(&pen_bits[w], 0u); }}",
              "  workgroupBarrier();",
              f"  for (var r = lid; r < np; r = r + {WG}u) {{",
              "    let t = prev[r];",
              "    if (t >= 0 && u32(t) < V) { atomicOr(&pen_bits[u32(t) >> 5u], 1u << (u32(t) & 31u)); }",
              "  }",
              "  workgroupBarrier();"]
    if greedy:
        L += ["  var m = ninf;", "  var mi = 0xffffffffu;",
              f"  for (var i = lid; i < V; i = i + {WG}u) {{ let x = logit(i); if (better(x, i, m, mi)) {{ m = x; mi = i; }} }}",
              "  bv[lid] = m; bi[lid] = mi;",
              "  workgroupBarrier();",
              f"  for (var s = {WG // 2}u; s > 0u; s = s >> 1u) {{",
              "    if (lid < s && better(bv[lid + s], bi[lid + s], bv[lid], bi[lid])) { bv[lid] = bv[lid + s]; bi[lid] = bi[lid + s]; }",
              "    workgroupBarrier();",
              "  }",
              # every logit NaN: no id won; -1 says so (never a silent token 0)
              "  let tok = bi[0];"]
    elif full:
        L += ["  let u = clamp(rnd[0], 0.0, 0x1.fffffep-1f);",
              "  var m = ninf;",
              f"  for (var i = lid; i < V; i = i + {WG}u) {{ m = max(m, zval(i)); }}",
              "  let M = red_max(m, lid, 1u);"]
        L += _walk_lines(WG, CH, "wflush(exp(zval(i) - M))", "wflush(exp(zval(i) - M))")
    else:
        L += ["  let u = clamp(rnd[0], 0.0, 0x1.fffffep-1f);"]
        if top_k <= 0:   # top-p against the full-vocabulary normaliser
            L += ["  var m = ninf;",
                  f"  for (var i = lid; i < V; i = i + {WG}u) {{ m = max(m, zval(i)); }}",
                  "  let M = red_max(m, lid, 1u);",
                  "  var zs = 0.0;",
                  f"  for (var i = lid; i < V; i = i + {WG}u) {{ zs += wflush(exp(zval(i) - M)); }}",
                  "  let Z = red_sum(zs, lid, 1u);"]
        L += _radix_select_lines(WG, f"{K}u", "okey(zval(i))")
        L += _compact_lines(WG, CH, "zval", "okey", "z", f"{K}u", f"{KP}u", "ninf")
        L += _bitonic_lines(WG, f"{KP}u")
        L += ["  var tok = 0u;",
              "  if (lid == 0u) {",
              "    let z0 = cv[0];",
              "    var wsum = 0.0;",
              f"    for (var r = 0u; r < {K}u; r = r + 1u) {{ wsum += wflush(exp(cv[r] - z0)); }}",
              f"    let norm = {'wsum' if top_k > 0 else 'Z * exp(M - z0)'};",
              f"    var keep = {K}u;"]
        if top_p < 1.0:
            L += ["    var cb = 0.0;",
                  f"    for (var r = 0u; r < {K}u; r = r + 1u) {{",
                  f"      if (r > 0u && cb >= {f32_lit(top_p)} * norm) {{ keep = r; break; }}",
                  "      cb += wflush(exp(cv[r] - z0));",
                  "    }"]
        L += ["    var wk = 0.0;",
              "    for (var r = 0u; r < keep; r = r + 1u) { wk += wflush(exp(cv[r] - z0)); }",
              "    let goal = u * wk;",
              "    var c = 0.0;",
              "    tok = ci[keep - 1u];",
              "    for (var r = 0u; r < keep; r = r + 1u) {",
              "      c += wflush(exp(cv[r] - z0));",
              "      if (c > goal) { tok = ci[r]; break; }",
              "    }",
              "  }"]
    L.append("  if (lid == 0u) {")
    L.append("    out_token[0] = i32(tok);")
    if append:
        L += [f"    if (np < {prev[0]}u) {{ prev[np] = i32(tok); }}",
              f"    nprev[0] = i32(min(np + 1u, {prev[0]}u));"]
    L += ["  }", "}\n"]
    return "\n".join(L), names


def sample(out_token: Buffer, logits: Buffer, vocab: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, rand: Union[Buffer, int, float, None] = None,
           repetition_penalty: Optional[float] = None, prev_tokens: Optional[Buffer] = None,
           n_prev: Union[Buffer, int, None] = None, logits_offset: int = 0, append: bool = False) -> None:
    """Queue the choice of one token from logits[logits_offset : logits_offset + vocab] (f32)
    into out_token[0] (int32); see the module docstring for the exact rule.

    rand: a Buffer whose f32 element 0 is the uniform number u in [0, 1) (the host's RNG, so
    runs reproduce), or an int seed / a float u (uploaded here: a new buffer per call).
    Not needed for greedy (temperature == 0).
    repetition_penalty applies to prev_tokens[:n_prev] (int32 Buffer; n_prev an int or an
    int32 Buffer read on the GPU). append=True (prev_tokens and n_prev Buffers): also write
    the chosen token at prev_tokens[n_prev] and increment n_prev (capped at the capacity
    prev_tokens.nbytes // 4), so a pipelined decode loop keeps its own token history."""
    fn = "sample"
    if vocab <= 0:
        raise ValueError(f"sample: vocab must be >= 1, got {vocab}")
    if logits.nbytes < 4 * (logits_offset + vocab):
        raise ValueError(f"sample: logits holds {logits.nbytes // 4} f32 values, needs logits_offset+vocab="
                         f"{logits_offset + vocab}")
    check_out("out_token", out_token, 4, fn)
    temperature = float(temperature)
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    top_k = int(top_k or 0)
    if top_k < 0 or top_k > KCAP:
        raise ValueError(f"sample: top_k must be in [0, {KCAP}], got {top_k}")
    top_p = float(1.0 if top_p is None else top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"sample: repetition_penalty must be > 0, got {repetition_penalty}")
    prev = None
    if prev_tokens is not None or append:
        if not isinstance(prev_tokens, Buffer):
            raise TypeError("sample: prev_tokens must be an int32 Buffer")
        cap = prev_tokens.nbytes // 4
        if append and not isinstance(n_prev, Buffer):
            raise TypeError("sample: append=True needs n_prev as an int32 Buffer (it is incremented on the GPU)")
        if isinstance(n_prev, Buffer):
            if n_prev.nbytes < 4:
                raise ValueError("sample: n_prev buffer must hold one int32")
            prev = (cap, None)
        else:
            prev = (cap, min(int(cap if n_prev is None else n_prev), cap))
    if repetition_penalty is not None and repetition_penalty != 1.0 and prev is None:
        raise ValueError("sample: repetition_penalty needs prev_tokens")
    greedy = temperature == 0
    rbuf = None
    if not greedy:
        if isinstance(rand, Buffer):
            rbuf = rand
        elif rand is None:
            raise ValueError("sample: temperature > 0 needs rand (a Buffer with u, a seed or a float u)")
        else:
            u = float(rand) if isinstance(rand, float) else float(np.random.default_rng(int(rand)).random())
            rbuf = upload(np.array([u], np.float32))
    WG = min(1024, max_workgroup_size())
    pen_words = -(-vocab // 32) if (repetition_penalty not in (None, 1.0)) else 0
    if pen_words * 4 + 8 * WG + 8 * KCAP + 2048 > get_device().max_workgroup_storage:
        WG = 256
        if pen_words * 4 + 8 * WG + 8 * KCAP + 2048 > get_device().max_workgroup_storage:
            raise ValueError(f"sample: a repetition-penalty bitmap for vocab={vocab} does not fit the device's "
                             f"{get_device().max_workgroup_storage} bytes of workgroup memory")
    src, names = _source(vocab, logits_offset, temperature, top_k, top_p, repetition_penalty, prev, append, WG)
    bufs = {"logits": logits, "rand": rbuf, "prev_tokens": prev_tokens, "n_prev": n_prev, "out_token": out_token}
    distinct(fn, **{k: bufs[k] for k in names})
    access = {"logits": "read", "rand": "read", "prev_tokens": "rw" if append else "read",
              "n_prev": "rw" if append else "read", "out_token": "rw"}
    mode = "greedy" if greedy else f"t{temperature:g}_k{top_k}_p{top_p:g}"
    dispatch(f"sample_{mode}[{vocab}]", src, [(bufs[k], access[k]) for k in names], (1, 1, 1))


# ============================================================================= many rows
#
# sample_rows: one token from each of B rows of logits, every row with its own parameters,
# read from buffers by the kernel (so one compiled kernel serves every mix of parameters and a
# captured decode step replays with new ones). One workgroup per row.
#
# Semantics (sample_rows_reference below is the executable definition, in float64 NumPy). For a
# row l of V logits and its parameters temperature T, top_k k, top_p p, min_p q, uniform u:
#   * NaN logits are never chosen. M = the largest non-NaN logit, a = its first id
#     (-1 when every logit is NaN).
#   * log-probabilities are those of the logits as given (before temperature, what vLLM and the
#     OpenAI API report): lp(t) = (l[t] - M) - log(sum over non-NaN j of exp(l[j] - M)); NaN
#     when M is not finite (a row of -inf, or one holding +inf) or t is -1.
#   * greedy (token a) unless T >= 2^-126 (0, negative, NaN and subnormal temperatures are
#     greedy), M is finite and K > 1, where K = min(k, V) if k > 0 else V.
#   * otherwise weights w_j = exp((l[j] - M) / min(T, FLT_MAX)) (0 for NaN, and 0 below 2^-126:
#     see flush_weights), so w <= 1 and the best id has w = 1 (no overflow at tiny temperatures). Order: (l descending, id ascending),
#     NaN last; the distribution is the K best ids renormalised (HF/vLLM top-k).
#     - top_p < 1 or min_p >= 2^-126 (else min_p is off), or K <= KCAP: the candidates are the
#       C = min(K, KCAP) best ids. Walking them best first, top-p keeps id r while the mass
#       before it is < p * norm, norm = the sum of w over the K best (the first is always kept;
#       exact unless the nucleus holds more than KCAP ids); min_p then keeps the ids with
#       w >= q (p >= q * p_max after temperature, as vLLM and llama.cpp define it). The draw
#       picks the first kept id whose running sum of w exceeds u * (sum of kept w).
#     - top_p >= 1, min_p off and K > KCAP: the same draw over the K best ids in id order
#       (the whole vocabulary when K = V), exact for any K.
#   * u is clamped to [0, 1 - 2^-24] (NaN -> 0).
#   * top-N: the N best ids by (l descending, id ascending), NaN last, and their lp; ids past V
#     (N > V) are -1 with lp -inf.
# GPU and reference agree except where a float32 rounding moves u * sum, p * norm or a w
# across q.
#
# How: one pass reads the row for the argmax and an online (max, sum of exp) pair together; the
# rest reuses the one-row kernel's blocks on raw-logit keys (`nkey`, NaN lowest, -0 == +0):
# radix select of the C-th key, compaction, bitonic sort, then invocation 0 walks the <= 256
# candidates; or the chunked inverse-CDF walk, masked to the K best. The top-N reuses the
# sorted candidates when there are enough, else selects them the same way.

MAX_LOGPROBS = 20
U_MAX = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
ROW_PARAMS = ("temperature", "top_k", "top_p", "min_p", "u")


def _row_order(l: np.ndarray) -> np.ndarray:
    """Ids by (logit descending, id ascending), NaN last (-0.0 equals +0.0)."""
    nan = np.isnan(l)
    return np.lexsort((np.arange(l.shape[0]), nan, -np.where(nan, -np.inf, l)))


def _row_logprobs(l: np.ndarray, ids) -> np.ndarray:
    ok = ~np.isnan(l)
    M = l[ok].max() if ok.any() else np.nan
    ids = np.asarray(ids, np.int64)
    if not np.isfinite(M):
        return np.full(ids.shape, np.nan)
    lse = np.log(np.exp(l[ok] - M).sum())
    out = np.full(ids.shape, np.nan)
    good = (ids >= 0) & (ids < l.shape[0])
    out[good] = (l[ids[good]] - M) - lse
    return out


def sample_row_reference(logits, temperature, top_k, top_p, min_p, u, band: float = 0.0):
    """The token sample_rows picks for one row (float64 NumPy; parameters as float32/int32).

    band > 0: instead the set of tokens a float32 evaluation could pick, those whose share of the
    cumulative weight (in the order the pick walks) overlaps [u - band, u + band]: near u = 1 a
    vocabulary-long float32 sum cannot resolve the threshold, and any token in the tail of tiny
    weights after the float64 pick may be the one the GPU's sum crosses at."""
    l = np.asarray(logits, np.float32).astype(np.float64)
    V = l.shape[0]
    T, p, q, u = (float(np.float32(x)) for x in (temperature, top_p, min_p, u))
    k = int(np.int32(top_k))
    ok = ~np.isnan(l)
    if not ok.any():
        return -1
    M = l[ok].max()
    a = int(np.nonzero(ok & (l == M))[0][0])
    K = min(k, V) if k > 0 else V
    if not (T >= FLT_MIN) or not np.isfinite(M) or K == 1:
        return a
    u = 0.0 if np.isnan(u) else min(max(u, 0.0), U_MAX)
    w = flush_weights(np.where(ok, np.exp((np.where(ok, l, M) - M) / min(T, FLT_MAX)), 0.0))
    order = _row_order(l)
    usep, usem = p < 1.0, q >= FLT_MIN
    if not usep and not usem and K > KCAP:
        allowed = np.zeros(V, bool)
        allowed[order[:K]] = True
        ww = np.where(allowed, w, 0.0)
        c = np.cumsum(ww)
        if band > 0:
            return _in_band(np.arange(V), ww, c, u, band)
        hit = np.nonzero(c > u * c[-1])[0]
        return int(hit[0]) if hit.size else int(np.nonzero(ww > 0)[0][-1])
    C = min(K, KCAP)
    cand = order[:C]
    wc = w[cand]
    keep = C
    if usep:
        norm = w[order[:K]].sum()
        before = np.concatenate([[0.0], np.cumsum(wc)[:-1]])
        drop = np.nonzero((np.arange(C) > 0) & (before >= p * norm))[0]
        keep = int(drop[0]) if drop.size else C
    if usem:
        drop = np.nonzero((np.arange(keep) > 0) & (wc[:keep] < q))[0]
        keep = int(drop[0]) if drop.size else keep
    c = np.cumsum(wc[:keep])
    if band > 0:
        return _in_band(cand[:keep], wc[:keep], c, u, band)
    hit = np.nonzero(c > u * c[-1])[0]
    return int(cand[hit[0]] if hit.size else cand[keep - 1])


def _in_band(tokens, w, c, u: float, band: float) -> set:
    """The tokens (walk order, weights w, cumulative c) whose cumulative-weight interval overlaps
    [u - band, u + band] of the total, plus the last one with weight (a sum that never reaches u)."""
    total = c[-1]
    before = c - w
    ok = (c > (u - band) * total) & (before <= (u + band) * total) & (w > 0)
    out = {int(t) for t in np.asarray(tokens)[ok]}
    nz = np.nonzero(w > 0)[0]
    if nz.size and u + band >= 1.0:
        out.add(int(np.asarray(tokens)[nz[-1]]))
    return out or {int(np.asarray(tokens)[-1])}


def sample_rows_reference(logits, temperature, top_k, top_p, min_p, u, n_logprobs: int = 0) -> tuple:
    """(tokens int32 [B], logprobs float64 [B, 1], top_ids int32 [B, N] or None,
    top_logprobs float64 [B, N] or None): what sample_rows returns, in float64 NumPy."""
    L = np.asarray(logits, np.float32)
    B, V = L.shape
    par = [np.broadcast_to(np.asarray(x), (B,)) for x in (temperature, top_k, top_p, min_p, u)]
    toks = np.array([sample_row_reference(L[r], *(x[r] for x in par)) for r in range(B)], np.int32)
    lps = np.array([_row_logprobs(L[r].astype(np.float64), [toks[r]]) for r in range(B)]).reshape(B, 1)
    if not n_logprobs:
        return toks, lps, None, None
    N = int(n_logprobs)
    ids = np.full((B, N), -1, np.int32)
    tlp = np.full((B, N), -np.inf)
    for r in range(B):
        o = _row_order(L[r].astype(np.float64))[:N]
        ids[r, :o.size] = o
        tlp[r, :o.size] = _row_logprobs(L[r].astype(np.float64), o)
    return toks, lps, ids, tlp


_ROWS_HELPERS = """
fn isnan32(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn nkey(x: f32) -> u32 {
  let b = bitcast<u32>(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) { return 0u; }
  if ((b & 0x7fffffffu) == 0u) { return 0x80000000u; }
  return okey(x);
}
fn kval(k: u32) -> f32 { return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u)); }
fn before(a: u32, ia: u32, b: u32, ib: u32) -> bool { return a > b || (a == b && ia < ib); }
var<private> ROWBASE: u32;
var<private> LM: f32;
var<private> TT: f32;
fn wexp(x: f32) -> f32 { return select(wflush(exp((x - LM) / TT)), 0.0, isnan32(x)); }
// the weight of id i among the K best: key > thr, or key == thr and among the first `take`
// such ids of this invocation's chunk (*eqc counts the ones seen)
fn wm(i: u32, thr: u32, take: u32, eqc: ptr<function, u32>) -> f32 {
  let x = lg(i);
  let key = nkey(x);
  var ok = key > thr;
  if (key == thr && *eqc < take) { ok = true; *eqc = *eqc + 1u; }
  return select(0.0, wexp(x), ok);
}
struct Acc { m: f32, i: u32, s: f32 }
// (max, first id of the max, sum of exp(x - max)): NaN never enters, +-inf stay exact
fn comb(a: Acc, b: Acc) -> Acc {
  var r = a;
  if (b.m > a.m || (b.m == a.m && b.i < a.i)) { r.m = b.m; r.i = b.i; }
  r.s = select(a.s * exp(a.m - r.m), a.s, a.m == r.m) + select(b.s * exp(b.m - r.m), b.s, b.m == r.m);
  return r;
}
"""


def _reduce_acc_fn(WG: int, subgroups: bool) -> str:
    """fn reduce_acc(a, lid, sg) -> Acc: the workgroup's combined Acc, uniform in every
    invocation (subgroup butterflies then one shared exchange, or a shared-memory tree)."""
    L = [f"var<workgroup> acc_m: array<f32, {WG}>;", f"var<workgroup> acc_i: array<u32, {WG}>;",
         f"var<workgroup> acc_s: array<f32, {WG}>;",
         "var<workgroup> res_m: f32;", "var<workgroup> res_i: u32;", "var<workgroup> res_s: f32;",
         "fn reduce_acc(a0: Acc, lid: u32, sg: u32) -> Acc {", "  var a = a0;", "  workgroupBarrier();"]
    if subgroups:
        L += ["  for (var m = 1u; m < sg; m = m << 1u) {",
              "    a = comb(a, Acc(subgroupShuffleXor(a.m, m), subgroupShuffleXor(a.i, m), subgroupShuffleXor(a.s, m)));",
              "  }",
              "  if ((lid & (sg - 1u)) == 0u) { acc_m[lid / sg] = a.m; acc_i[lid / sg] = a.i; acc_s[lid / sg] = a.s; }",
              "  workgroupBarrier();",
              "  if (lid == 0u) {",
              "    var r = Acc(acc_m[0], acc_i[0], acc_s[0]);",
              f"    for (var k = 1u; k < {WG}u / sg; k = k + 1u) {{ r = comb(r, Acc(acc_m[k], acc_i[k], acc_s[k])); }}",
              "    res_m = r.m; res_i = r.i; res_s = r.s;",
              "  }"]
    else:
        L += ["  acc_m[lid] = a.m; acc_i[lid] = a.i; acc_s[lid] = a.s;",
              "  workgroupBarrier();",
              f"  for (var s = {WG // 2}u; s > 0u; s = s >> 1u) {{",
              "    if (lid < s) {",
              "      let r = comb(Acc(acc_m[lid], acc_i[lid], acc_s[lid]), Acc(acc_m[lid + s], acc_i[lid + s], acc_s[lid + s]));",
              "      acc_m[lid] = r.m; acc_i[lid] = r.i; acc_s[lid] = r.s;",
              "    }",
              "    workgroupBarrier();",
              "  }",
              "  if (lid == 0u) { res_m = acc_m[0]; res_i = acc_i[0]; res_s = acc_s[0]; }"]
    L += ["  return Acc(workgroupUniformLoad(&res_m), workgroupUniformLoad(&res_i), workgroupUniformLoad(&res_s));",
          "}"]
    return "\n".join(L) + "\n"


def _rows_footprint(WG: int) -> int:
    """Workgroup memory of the rows kernel: reduction (3 x WG), two scans, histogram, candidates."""
    return 20 * WG + 4 * 256 + 12 * KCAP + 64


def _rows_workgroup() -> int:
    WG = 1 << (max_workgroup_size().bit_length() - 1)
    while WG > 64 and _rows_footprint(WG) > get_device().max_workgroup_storage:
        WG //= 2
    return WG


def _rows_source(B: int, V: int, logits: Operand, params: dict, n_logprobs: int, counts: Optional[Operand],
                 out_ints: Buffer, out_floats: Buffer, WG: int, subgroups: bool) -> tuple:
    """WGSL and the (buffer, access) binding list of the rows kernel."""
    N = n_logprobs
    CH = -(-V // WG)
    bindings: list = []
    decl: list = []

    def bind(buf, ty: str, access: str) -> str:
        for j, (b, a, t) in enumerate(bindings):
            if b is buf and a == access == "read" and t == ty:     # parameters that are rows of one tensor
                return f"b{j}"
        j = len(bindings)
        bindings.append((buf, access, ty))
        decl.append(f"@group(0) @binding({j}) var<storage, {access}> b{j}: array<{ty}>;")
        return f"b{j}"

    lb = bind(logits.buffer, "f32", "read")
    lrs = logits.strides[0] if B > 1 else 0
    fns = [f"fn lg(i: u32) -> f32 {{ return {lb}[ROWBASE + i]; }}"]
    for name in ROW_PARAMS:
        op = params[name]
        ty = "i32" if name == "top_k" else "f32"
        pb = bind(op.buffer, ty, "read")
        fns.append(f"fn par_{name}(r: u32) -> {ty} {{ return {pb}[{op.offset}u + r * {op.strides[0] if B > 1 else 0}u]; }}")
    ib = bind(out_ints, "i32", "read_write")
    fb = bind(out_floats, "f32", "read_write")
    cb = bind(counts.buffer, "i32", "read_write") if counts is not None else None
    sgp, sg = sg_builtin(subgroups)
    fns += [f"fn ib_store(i: u32, v: i32) {{ {ib}[i] = v; }}", f"fn fb_store(i: u32, v: f32) {{ {fb}[i] = v; }}"]
    L = decl + [_KEY, _WFLUSH] + fns + [
        f"const V: u32 = {V}u;", f"const B: u32 = {B}u;", f"const N: u32 = {N}u;", f"const KCAP: u32 = {KCAP}u;",
        _ROWS_HELPERS, _reduce_acc_fn(WG, subgroups), _scan_fn("scan_u", "u32", WG), _scan_fn("scan_f", "f32", WG),
        "var<workgroup> hist: array<atomic<u32>, 256>;", "var<workgroup> ctl: array<u32, 2>;",
        f"var<workgroup> cv: array<u32, {KCAP}>;", f"var<workgroup> ci: array<u32, {KCAP}>;",
        f"var<workgroup> cw: array<f32, {KCAP}>;", "var<workgroup> owner: atomic<u32>;", "var<workgroup> pick: u32;"]
    # the kk-th largest key (T) and how many ids equal to it are in (need_eq)
    L += ["fn radix_kth(kk: u32, lid: u32) -> vec2<u32> {"]
    L += _radix_select_lines(WG, "kk", "nkey(lg(i))")
    L += ["  return vec2<u32>(T, need_eq);", "}"]
    # the kk best ids into cv (keys) / ci, sorted best first; cv/ci[kk..kp) padded
    L += ["fn top_sorted(kk: u32, kp: u32, T: u32, need_eq: u32, lid: u32) {"]
    L += _compact_lines(WG, CH, "lg", "nkey", "key", "kk", "kp", "0u")
    L += _bitonic_lines(WG, "kp")
    L += ["}"]
    # the sum of w over the K best ids (ids with key > thr, and need_eq ids at thr)
    L += ["fn mass(thr: u32, need_eq: u32, lid: u32) -> f32 {",
          "  var s = 0.0;",
          f"  for (var i = lid; i < V; i = i + {WG}u) {{ let x = lg(i); if (nkey(x) > thr) {{ s += wexp(x); }} }}",
          "  let incl = scan_f(s, lid);",
          f"  return scan_f_buf[{WG - 1}u] + f32(need_eq) * wexp(kval(thr));",
          "}"]
    # the inverse-CDF draw over the K best ids in id order
    L += ["fn draw_all(thr: u32, need_eq: u32, u: f32, lid: u32) -> u32 {"]
    L += _walk_lines(WG, CH, "wm(i, thr, take_eq, &eqc)", "wm(i, thr, take_eq, &eqw)",
                     pre_sum=["  var neq = 0u;",
                              "  if (need_eq > 0u) { for (var i = c0; i < c1; i = i + 1u) { neq += u32(nkey(lg(i)) == thr); } }",
                              "  let eq_before = scan_u(neq, lid) - neq;",
                              "  let take_eq = min(neq, need_eq - min(need_eq, eq_before));",
                              "  var eqc = 0u;"],
                     pre_walk=["    var eqw = 0u;"])
    L += ["  return tok;", "}"]
    # top-p, min-p and the draw over the C sorted candidates (invocation 0)
    L += ["fn draw_candidates(C: u32, norm_in: f32, top_p: f32, usep: bool, min_p: f32, usem: bool, u: f32,",
          "                   lid: u32) -> u32 {",
          # every candidate's weight once, in parallel; invocation 0 then only adds
          f"  for (var r = lid; r < C; r = r + {WG}u) {{ cw[r] = wexp(kval(cv[r])); }}",
          "  workgroupBarrier();",
          "  if (lid == 0u) {",
          "    var norm = norm_in;",
          "    if (norm_in < 0.0) { norm = 0.0; for (var r = 0u; r < C; r = r + 1u) { norm += cw[r]; } }",
          "    var keep = C;",
          "    if (usep) {",
          "      var cb = 0.0;",
          "      for (var r = 0u; r < C; r = r + 1u) {",
          "        if (r > 0u && cb >= top_p * norm) { keep = r; break; }",
          "        cb += cw[r];",
          "      }",
          "    }",
          "    if (usem) {",
          "      for (var r = 1u; r < keep; r = r + 1u) { if (cw[r] < min_p) { keep = r; break; } }",
          "    }",
          "    var wk = 0.0;",
          "    for (var r = 0u; r < keep; r = r + 1u) { wk += cw[r]; }",
          "    let goal = u * wk;",
          "    var c = 0.0;",
          "    var t = ci[keep - 1u];",
          "    for (var r = 0u; r < keep; r = r + 1u) {",
          "      c += cw[r];",
          "      if (c > goal) { t = ci[r]; break; }",
          "    }",
          "    pick = t;",
          "  }",
          "  return workgroupUniformLoad(&pick);",
          "}"]
    L += [f"@compute @workgroup_size({WG})",
          "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, "
          f"@builtin(local_invocation_index) lid: u32{sgp}) {{",
          f"  let row = {WGSL_LINEAR_ID};",
          "  if (row >= B) { return; }",
          f"  let ninf = {NEG_INF};",
          f"  ROWBASE = {logits.offset}u + row * {lrs}u;",
          # one pass: argmax (first max, NaN never) and the online sum for the log-softmax
          "  var a = Acc(ninf, 0xffffffffu, 0.0);",
          f"  for (var i = lid; i < V; i = i + {WG}u) {{",
          "    let x = lg(i);",
          "    if (x > a.m) { a.s = a.s * exp(a.m - x) + 1.0; a.m = x; a.i = i; }",
          "    else if (x == a.m) { a.s += 1.0; a.i = min(a.i, i); }",
          "    else if (x > ninf) { a.s += exp(x - a.m); }",
          "  }",
          f"  let R = reduce_acc(a, lid, {sg});",
          "  LM = R.m;",
          "  let finite = (bitcast<u32>(R.m) & 0x7f800000u) != 0x7f800000u;",
          "  let lns = log(R.s);",
          "  var tok = R.i;",
          "  let temp = par_temperature(row);",
          "  let kr = par_top_k(row);",
          "  let K = select(V, min(u32(kr), V), kr > 0);",
          "  var have = false;",
          "  var C = 0u;",
          f"  if (temp >= {f32_lit(FLT_MIN)} && finite && K > 1u) {{",
          f"    TT = min(temp, {f32_lit(FLT_MAX)});",
          "    let u0 = par_u(row);",
          "    let u = select(clamp(u0, 0.0, 0x1.fffffep-1f), 0.0, isnan32(u0));",
          "    let top_p = par_top_p(row);",
          "    let min_p = par_min_p(row);",
          "    let usep = top_p < 1.0;",
          f"    let usem = min_p >= {f32_lit(FLT_MIN)};",
          "    if (!usep && !usem && K > KCAP) {",
          "      var thr = 0u; var ne = 0u;",
          "      if (K < V) { let s = radix_kth(K, lid); thr = s.x; ne = s.y; }",
          "      tok = draw_all(thr, ne, u, lid);",
          "    } else {",
          "      C = min(K, KCAP);",
          "      let kp = 1u << (32u - countLeadingZeros(C - 1u));",
          "      let s = radix_kth(C, lid);",
          "      top_sorted(C, kp, s.x, s.y, lid);",
          "      have = true;",
          "      var norm = -1.0;",        # -1: the sum over the C candidates (K <= KCAP)
          "      if (usep && K > KCAP) {",
          "        var thr = 0u; var ne = 0u;",
          "        if (K < V) { let s2 = radix_kth(K, lid); thr = s2.x; ne = s2.y; }",
          "        norm = mass(thr, ne, lid);",
          "      }",
          "      tok = draw_candidates(C, norm, top_p, usep, min_p, usem, u, lid);",
          "    }",
          "  }"]
    lp_of = "select(bitcast<f32>(0x7fc00000u), (x - LM) - lns, finite)"
    L += ["  if (lid == 0u) {",
          "    ib_store(row, i32(tok));",
          "    var x = bitcast<f32>(0x7fc00000u);",
          "    if (tok < V) { x = lg(tok); }",
          f"    fb_store(row, {lp_of});"]
    if counts is not None:
        crs = counts.strides[0] if B > 1 else 0
        L += [f"    if (tok < V) {{ {cb}[{counts.offset}u + row * {crs}u + tok] += 1; }}"]
    L += ["  }"]
    if N:
        L += ["  let NN = min(N, V);",
              "  if (!(have && C >= NN)) {",
              "    let kp = select(1u, 1u << (32u - countLeadingZeros(NN - 1u)), NN > 1u);",
              "    let s = radix_kth(NN, lid);",
              "    top_sorted(NN, kp, s.x, s.y, lid);",
              "  }",
              f"  for (var j = lid; j < N; j = j + {WG}u) {{",
              "    var id = -1;",
              "    var lp = ninf;",
              f"    if (j < NN) {{ id = i32(ci[j]); let x = kval(cv[j]); lp = {lp_of}; }}",
              "    ib_store(B + row * N + j, id);",
              "    fb_store(B + row * N + j, lp);",
              "  }"]
    L += ["}"]
    return "\n".join(L) + "\n", [(b, "rw" if a == "read_write" else "read") for b, a, _ in bindings]


def sample_rows(out_ints: Buffer, out_floats: Buffer, logits: Operand, params: dict, n_logprobs: int = 0,
                counts: Optional[Operand] = None) -> None:
    """Queue the choice of one token per row of logits [B, V] (float32, unit stride along V),
    each row with its own parameters (see the block comment above for the exact rule).

    params: Operands of shape [B] — temperature, top_p, min_p, u (float32) and top_k (int32),
    any stride (0 broadcasts one value), read by the kernel, so new values compile nothing.
    out_ints (int32): [B] tokens (-1 for a row of NaN), then [B, N] top ids.
    out_floats (float32): [B] the chosen tokens' log-softmax, then [B, N] the top log-softmax.
    counts: int32 [B, V] view (unit stride along V); counts[row, token] += 1 for each chosen
    token (a row of NaN bumps nothing)."""
    fn = "sample_rows"
    if not isinstance(logits, Operand):
        raise TypeError(f"{fn}: logits must be a kernels.common.Operand, got {type(logits).__name__}")
    if logits.dtype is not dtypes.float32 or len(logits.shape) != 2:
        raise ValueError(f"{fn}: logits must be float32 [B, V], got {logits.dtype.name} {tuple(logits.shape)}")
    B, V = (int(x) for x in logits.shape)
    if B < 1 or V < 1:
        raise ValueError(f"{fn}: logits {tuple(logits.shape)} must have B >= 1 rows of V >= 1 values")
    if V > 1 and logits.strides[1] != 1:
        raise ValueError(f"{fn}: logits must have unit stride along V, got strides {tuple(logits.strides)}")
    check_fits("logits", logits, fn)
    N = int(n_logprobs)
    if not 0 <= N <= MAX_LOGPROBS:
        raise ValueError(f"{fn}: n_logprobs must be in [0, {MAX_LOGPROBS}], got {n_logprobs}")
    missing = [k for k in ROW_PARAMS if k not in params]
    if missing or set(params) - set(ROW_PARAMS):
        raise ValueError(f"{fn}: params must be exactly {ROW_PARAMS}, got {tuple(params)}")
    for k in ROW_PARAMS:
        op = params[k]
        want = dtypes.int32 if k == "top_k" else dtypes.float32
        if not isinstance(op, Operand) or op.dtype is not want or tuple(op.shape) != (B,):
            got = f"{op.dtype.name} {tuple(op.shape)}" if isinstance(op, Operand) else type(op).__name__
            raise ValueError(f"{fn}: {k} must be a {want.name} [{B}] Operand (one per row), got {got}")
        check_fits(k, op, fn)
    if counts is not None:
        if not isinstance(counts, Operand) or counts.dtype is not dtypes.int32 or tuple(counts.shape) != (B, V):
            got = f"{counts.dtype.name} {tuple(counts.shape)}" if isinstance(counts, Operand) else type(counts).__name__
            raise ValueError(f"{fn}: counts must be an int32 [{B}, {V}] Operand, got {got}")
        if (V > 1 and counts.strides[1] != 1) or (B > 1 and counts.strides[0] < V):
            raise ValueError(f"{fn}: counts rows must be unit-stride and not overlap, got strides {tuple(counts.strides)}")
        check_fits("counts", counts, fn)
    check_out("out_ints", out_ints, 4 * B * (1 + N), fn)
    check_out("out_floats", out_floats, 4 * B * (1 + N), fn)
    from ..schedule import MAX_THREAD_TRIPS
    WG = _rows_workgroup()
    if -(-V // WG) > MAX_THREAD_TRIPS:
        raise ValueError(f"{fn}: V={V} is too long for one workgroup of {WG} ({MAX_THREAD_TRIPS} ids per invocation at most)")
    distinct(fn, logits=logits.buffer, out_ints=out_ints, out_floats=out_floats,
             counts=counts.buffer if counts is not None else None)
    for k in ROW_PARAMS:
        for other, b in (("out_ints", out_ints), ("out_floats", out_floats),
                         ("counts", counts.buffer if counts is not None else None)):
            if params[k].buffer is b:
                raise ValueError(f"{fn}: {k} and {other} are the same Buffer (a kernel never reads what it writes)")
    sub = get_device().has_subgroups
    src, bufs = _rows_source(B, V, logits, params, N, counts, out_ints, out_floats, WG, sub)
    limit = get_device().max_storage_buffers
    if len(bufs) > limit:
        raise ValueError(f"{fn}: needs {len(bufs)} storage buffers, the device allows {limit} "
                         f"(pass the float parameters as rows of one tensor)")
    dispatch(f"sample_rows[{B}x{V}{f',n{N}' if N else ''}{',counts' if counts is not None else ''}]", src, bufs,
             grid_for(B))

