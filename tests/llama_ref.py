"""A float64 NumPy LLaMA/Qwen2 forward over a GGUF file's own weights, dequantized by gguf-py
(`gguf.quants.dequantize`): the reference the quantized files are tested against.

It shares no code with models/llama.py: it reads the file with gguf.GGUFReader, follows
llama.cpp's definitions (normal rope on the permuted Q/K rows for `llama`, NEOX rope for
`qwen2`, GQA head h -> KV head h // (Hq / Hkv), RMSNorm, SwiGLU, tied output when
output.weight is absent) and computes everything in float64.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

ROPE_MODE = {"llama": "normal", "qwen2": "neox"}


@lru_cache(maxsize=4)
def load(path: str):
    """(config dict, name -> float64 array in numpy order) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch = md["general.architecture"]
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type)
        w[t.name] = np.asarray(a, np.float64).reshape(tuple(int(s) for s in reversed(t.shape.tolist())))
    C, H = md[f"{arch}.embedding_length"], md[f"{arch}.attention.head_count"]
    cfg = dict(arch=arch, n_layer=md[f"{arch}.block_count"], n_head=H,
               n_head_kv=md.get(f"{arch}.attention.head_count_kv", H), head_dim=C // H,
               rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
               eps=float(md[f"{arch}.attention.layer_norm_rms_epsilon"]))
    cfg["rot"] = md.get(f"{arch}.rope.dimension_count", cfg["head_dim"])
    return cfg, w


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, rot, base, mode, freq_factors=None):
    """x [T, H, D] rotated at positions pos [T] (float64 angles; pair i's divided by
    freq_factors[i], Llama 3.1's rope_freqs.weight, when given)."""
    inv = base ** (-np.arange(0, rot, 2, dtype=np.float64) / rot)                  # [rot/2]
    if freq_factors is not None:
        inv = inv / freq_factors
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.copy()
    if mode == "neox":
        a, b = x[..., :rot // 2], x[..., rot // 2:rot]
        y[..., :rot // 2], y[..., rot // 2:rot] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        y[..., 0:rot:2], y[..., 1:rot:2] = a * c - b * s, b * c + a * s
    return y


def forward(path: str, ids) -> np.ndarray:
    """float64 logits [T, vocab] of the token ids (positions 0..T-1, causal)."""
    cfg, w = load(path)
    ids = np.asarray(ids, np.int64)
    T, Hq, Hkv, D = len(ids), cfg["n_head"], cfg["n_head_kv"], cfg["head_dim"]
    pos = np.arange(T)
    mode, eps = ROPE_MODE[cfg["arch"]], cfg["eps"]
    x = w["token_embd.weight"][ids]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(cfg["n_layer"]):
        p = lambda n: w.get(f"blk.{i}.{n}")                                      # noqa: E731
        h = _rms(x, p("attn_norm.weight"), eps)
        q, k, v = (h @ p(f"attn_{n}.weight").T + (0 if p(f"attn_{n}.bias") is None else p(f"attn_{n}.bias"))
                   for n in "qkv")
        ff = w.get("rope_freqs.weight")
        q = _rope(q.reshape(T, Hq, D), pos, cfg["rot"], cfg["rope_base"], mode, ff)
        k = _rope(k.reshape(T, Hkv, D), pos, cfg["rot"], cfg["rope_base"], mode, ff)
        v = v.reshape(T, Hkv, D)
        kq, vq = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)  # head h -> kv h // G
        s = np.einsum("thd,uhd->htu", q, kq) / np.sqrt(D)
        s = np.where(mask[None], s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        a = np.einsum("htu,uhd->thd", pr, vq).reshape(T, Hq * D)
        x = x + a @ p("attn_output.weight").T
        h = _rms(x, p("ffn_norm.weight"), eps)
        g = h @ p("ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up.weight").T)) @ p("ffn_down.weight").T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def nll(path: str, ids) -> np.ndarray:
    """float64 negative log-likelihood of ids[1:] given the ones before them."""
    lg = forward(path, ids)[:-1]
    m = lg.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
    return lse - lg[np.arange(len(ids) - 1), np.asarray(ids[1:])]
