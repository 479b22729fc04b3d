"""On-GPU token selection from one row of logits, so decode step N+1 can be queued before
token N is read back (the chosen id stays in a GPU buffer that the next step's embedding
gather reads).

Semantics (sample_reference below is the executable definition, in float64 NumPy):
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

from ..runtime import Buffer, dispatch, get_device, upload
from .nn_wgsl import NEG_INF, check_out, distinct, f32_lit, max_workgroup_size, next_pow2, seg_reduce

KCAP = 256          # candidates kept when top_k is 0 but top_p < 1 (and the largest top_k allowed)


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
        w = np.exp(z - z.max())
        c = np.cumsum(w)
        hit = np.nonzero(c > u * c[-1])[0]
        return int(hit[0]) if hit.size else int(np.nonzero(w > 0)[0][-1])
    k = min(top_k if top_k > 0 else KCAP, V)
    order = np.lexsort((np.arange(V), -z))[:k]     # z descending, id ascending
    w = np.exp(z[order] - z[order[0]])
    norm = w.sum() if top_k > 0 else np.exp(z - z[order[0]]).sum()
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
    L = decl + [_KEY, seg_reduce("red_max", "max", WG, WG, False, NEG_INF), seg_reduce("red_sum", "+", WG, WG, False, "0.0"),
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
        L += [f"  let u = clamp(rnd[0], 0.0, 0x1.fffffep-1f);",
              "  var m = ninf;",
              f"  for (var i = lid; i < V; i = i + {WG}u) {{ m = max(m, zval(i)); }}",
              "  let M = red_max(m, lid, 1u);"]
        L += _walk_lines(WG, CH, "exp(zval(i) - M)", "exp(zval(i) - M)")
    else:
        L += [f"  let u = clamp(rnd[0], 0.0, 0x1.fffffep-1f);"]
        if top_k <= 0:   # top-p against the full-vocabulary normaliser
            L += ["  var m = ninf;",
                  f"  for (var i = lid; i < V; i = i + {WG}u) {{ m = max(m, zval(i)); }}",
                  "  let M = red_max(m, lid, 1u);",
                  "  var zs = 0.0;",
                  f"  for (var i = lid; i < V; i = i + {WG}u) {{ zs += exp(zval(i) - M); }}",
                  "  let Z = red_sum(zs, lid, 1u);"]
        L += _radix_select_lines(WG, f"{K}u", "okey(zval(i))")
        L += _compact_lines(WG, CH, "zval", "okey", "z", f"{K}u", f"{KP}u", "ninf")
        L += _bitonic_lines(WG, f"{KP}u")
        L += ["  var tok = 0u;",
              "  if (lid == 0u) {",
              "    let z0 = cv[0];",
              "    var wsum = 0.0;",
              f"    for (var r = 0u; r < {K}u; r = r + 1u) {{ wsum += exp(cv[r] - z0); }}",
              f"    let norm = {'wsum' if top_k > 0 else 'Z * exp(M - z0)'};",
              f"    var keep = {K}u;"]
        if top_p < 1.0:
            L += ["    var cb = 0.0;",
                  f"    for (var r = 0u; r < {K}u; r = r + 1u) {{",
                  f"      if (r > 0u && cb >= {f32_lit(top_p)} * norm) {{ keep = r; break; }}",
                  "      cb += exp(cv[r] - z0);",
                  "    }"]
        L += ["    var wk = 0.0;",
              "    for (var r = 0u; r < keep; r = r + 1u) { wk += exp(cv[r] - z0); }",
              "    let goal = u * wk;",
              "    var c = 0.0;",
              "    tok = ci[keep - 1u];",
              "    for (var r = 0u; r < keep; r = r + 1u) {",
              "      c += exp(cv[r] - z0);",
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
