"""LLaMA-family models (Llama 2 / 3.x, TinyLlama, Mistral; Qwen2) as plain tensorgpu code.

    from models import load
    model = load("models/tiny-llama/tiny-llama-q8_0.gguf")      # a Llama for arch llama / qwen2
    sess = model.session()
    for tok in sess.generate("In the beginning", max_new_tokens=16): ...

The weights stay as the GGUF stores them (quantized blocks stay quantized on the GPU). Names
follow the GGUF tensors. One forward of T tokens, per layer (C = n_embd, Hq query heads, Hkv KV
heads, D = head_dim, F = n_ff):

    h = rms_norm(x) * attn_norm                          [T, C]
    q = h @ attn_q.T (+ b)                               [T, Hq, D]
    k, v = h @ attn_k.T (+ b), h @ attn_v.T (+ b)        [T, Hkv, D] each
    q = rope(q); cache[:, pos] = rope(k), v              q: [Hq, T, D]; caches [Hkv, max_ctx, D]
    a = attention(q, cache[:, :pos+T])                   [T, Hq, D]; query head h reads KV head h // (Hq/Hkv)
    x = x + a @ attn_output.T                            [T, C]
    x = x + ffn_down(silu(ffn_gate(h2)) * ffn_up(h2))    h2 = rms_norm(x) * ffn_norm; [T, F] inside

Rope: llama.cpp's converter permutes the Q/K rows of a `llama` file (convert_hf_to_gguf.py
LlamaModel.permute) so that HF's rotate-half pairs (i, i + D/2) become adjacent (2i, 2i+1):
such a file needs GGML's "normal" rope. A `qwen2` file is not permuted and uses NEOX rope.
Llama 3.1's `rope_freqs.weight` divides pair i's angle by its factor.

The forward protocol is GPT-NeoX's, `forward(ids, pos, cache)`: the K/V rows are written with
slice assignment (`cache[:, pos:pos+T] = k`) and attention reads `cache[:, :pos+T]`; under
tg.capture `pos` is a step variable, so one captured decode step serves every position, and
models/session.py drives both models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

import tensorgpu as tg

from .base import (MetaReader, ModelError, Params, build_tokenizer, cached_attention, check_dtypes, check_tensors,
                   load_checked, new_kv_cache, token_positions)

__all__ = ["Llama", "LlamaConfig", "ARCHITECTURES", "DEFAULT_MODEL"]

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny-llama", "tiny-llama-q8_0.gguf")

# general.architecture -> the rope mode llama.cpp uses for it (llama_model_rope_type)
ARCHITECTURES = {"llama": "normal", "qwen2": "neox"}
# {arch}.rope.scaling.type values we compute: none, and linear (positions / factor)
_ROPE_SCALING = ("none", "linear")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LlamaConfig:
    arch: str               # general.architecture: llama | qwen2
    n_vocab: int            # token_embd rows
    n_ctx: int              # {arch}.context_length
    n_embd: int             # {arch}.embedding_length
    n_layer: int            # {arch}.block_count
    n_head: int             # {arch}.attention.head_count
    n_head_kv: int          # {arch}.attention.head_count_kv (GQA; = n_head when absent)
    n_ff: int               # {arch}.feed_forward_length
    head_dim: int           # {arch}.attention.key_length, else n_embd / n_head
    rot_dims: int           # {arch}.rope.dimension_count, else head_dim
    rope_base: float        # {arch}.rope.freq_base (Llama 2: 1e4, Llama 3: 5e5, Qwen2: 1e6)
    rope_mode: str          # "normal" (llama: adjacent pairs) | "neox" (qwen2: rotate-half)
    rope_scale: float       # linear rope scaling factor (1: none)
    norm_eps: float         # {arch}.attention.layer_norm_rms_epsilon

    _REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.layer_norm_rms_epsilon")

    @classmethod
    def from_metadata(cls, md: dict, n_vocab: int, where: str = "GGUF file") -> "LlamaConfig":
        arch = md.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelError(f"{where}: general.architecture is {arch!r}; Llama loads {sorted(ARCHITECTURES)}")
        m = MetaReader(md, arch, where)
        m.require(*cls._REQUIRED)
        n_embd, n_head = m.int("embedding_length"), m.int("attention.head_count")
        n_head_kv = m.int("attention.head_count_kv", n_head)
        if n_embd % n_head and not m.has("attention.key_length"):
            raise ModelError(f"{where}: {arch}.embedding_length {n_embd} is not divisible by "
                             f"{arch}.attention.head_count {n_head}")
        if n_head % n_head_kv:
            raise ModelError(f"{where}: {arch}.attention.head_count_kv {n_head_kv} does not divide "
                             f"{arch}.attention.head_count {n_head}")
        head_dim = m.int("attention.key_length", n_embd // n_head)
        if m.int("attention.value_length", head_dim) != head_dim:
            raise ModelError(f"{where}: {arch}.attention.value_length {md[m.key('attention.value_length')]} differs "
                             f"from key_length {head_dim} (not supported)")
        rot = m.int("rope.dimension_count", head_dim)
        if rot % 2 or rot > head_dim:
            raise ModelError(f"{where}: {arch}.rope.dimension_count {rot} must be even and <= head_dim {head_dim}")
        scaling = m.str("rope.scaling.type", "none")
        if scaling not in _ROPE_SCALING:
            raise ModelError(f"{where}: {arch}.rope.scaling.type {scaling!r} is not supported; supported: "
                             f"{', '.join(_ROPE_SCALING)}")
        scale = m.float("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        return cls(arch=arch, n_vocab=n_vocab, n_ctx=m.int("context_length"), n_embd=n_embd,
                   n_layer=m.int("block_count"), n_head=n_head, n_head_kv=n_head_kv,
                   n_ff=m.int("feed_forward_length"), head_dim=head_dim, rot_dims=rot,
                   rope_base=m.float("rope.freq_base", 10000.0), rope_mode=ARCHITECTURES[arch],
                   rope_scale=scale, norm_eps=m.float("attention.layer_norm_rms_epsilon", hi=1.0))


def _expected_shapes(c: LlamaConfig) -> tuple:
    """numpy-order shapes (GGUF ne reversed) of the tensors the model reads: (required, optional)."""
    C, F, V, Dq, Dkv = c.n_embd, c.n_ff, c.n_vocab, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    req = {"token_embd.weight": (V, C), "output_norm.weight": (C,)}
    opt = {"output.weight": (V, C), "rope_freqs.weight": (c.rot_dims // 2,)}
    for i in range(c.n_layer):
        b = f"blk.{i}"
        req.update({f"{b}.attn_norm.weight": (C,), f"{b}.attn_q.weight": (Dq, C), f"{b}.attn_k.weight": (Dkv, C),
                    f"{b}.attn_v.weight": (Dkv, C), f"{b}.attn_output.weight": (C, Dq), f"{b}.ffn_norm.weight": (C,),
                    f"{b}.ffn_gate.weight": (F, C), f"{b}.ffn_up.weight": (F, C), f"{b}.ffn_down.weight": (C, F)})
        opt.update({f"{b}.attn_q.bias": (Dq,), f"{b}.attn_k.bias": (Dkv,), f"{b}.attn_v.bias": (Dkv,)})
    if c.arch == "qwen2":   # llama.cpp requires Qwen2's q/k/v biases
        for i in range(c.n_layer):
            for n in ("q", "k", "v"):
                req[f"blk.{i}.attn_{n}.bias"] = opt.pop(f"blk.{i}.attn_{n}.bias")
    return req, opt


# ----------------------------------------------------------------------------- the model


def _residual(x: tg.Tensor) -> tg.Tensor:
    """The residual stream after an add, realized. Why: the scheduler cannot yet plan a matmul
    whose epilogue is the residual add (x + a @ W.T) when both a reduction (the next RMSNorm's
    mean of squares) and that reduction's epilogue read the result (an IndexError in
    schedule._emit_custom); GPT-NeoX never hits it because its layer_norm is a hand-written
    kernel. No extra kernel: the matmul with its add runs either way, only earlier."""
    return x.realize()



class Llama:
    """The resident model: config, weights (as stored in the GGUF), tokenizer."""

    def __init__(self, config: LlamaConfig, tensors: dict, tokenizer=None, path: Optional[str] = None,
                 metadata: Optional[dict] = None):
        self.config = config
        self.tensors = tensors
        self.tokenizer = tokenizer
        self.path = path
        self.metadata = metadata or {}
        self.token_embd = tensors["token_embd.weight"]                 # [V, C]
        self.output = tensors.get("output.weight", self.token_embd)    # [V, C]; tied when absent
        self.output_norm = Params(tensors, "output_norm")
        self.blk = [Params(tensors, f"blk.{i}") for i in range(config.n_layer)]
        ff = tensors.get("rope_freqs.weight")                          # Llama 3.1: [rot/2]
        ff = None if ff is None else ff.astype(tg.float32).numpy()
        if config.rope_scale != 1.0:                                   # linear scaling: every angle / factor
            ff = np.full(config.rot_dims // 2, config.rope_scale, np.float32) * (1 if ff is None else ff)
        self.freq_factors = ff

    @classmethod
    def from_gguf(cls, path: Union[str, os.PathLike] = DEFAULT_MODEL, progress: Optional[bool] = None,
                  _file=None) -> "Llama":
        """Load a llama.cpp `llama` or `qwen2` GGUF. Raises ModelError naming the file and the field;
        on failure the file's device buffers are released."""
        path = os.fspath(path)

        def build(f):
            md = f.metadata
            emb = f.tensors.get("token_embd.weight")
            if md.get("general.architecture") in ARCHITECTURES and (emb is None or emb.ndim != 2):
                raise ModelError(f"{path}: missing required tensor(s): token_embd.weight (2-D)")
            config = LlamaConfig.from_metadata(md, emb.shape[0] if emb is not None else 0, where=path)
            arch = config.arch
            if f"{arch}.vocab_size" in md:
                nv = MetaReader(md, arch, path).int("vocab_size")
                if nv != config.n_vocab:
                    raise ModelError(f"{path}: {arch}.vocab_size {nv} does not match token_embd.weight's "
                                     f"{config.n_vocab} rows")
            req, opt = _expected_shapes(config)
            tensors = check_tensors(f, req, path, opt)
            check_dtypes(tensors, path, f)
            return cls(config, tensors, build_tokenizer(md, config.n_vocab, path), path, md)

        return load_checked(path, build, progress, _file)

    # -- the forward pass (the models' protocol: models/session.py drives it) ----------------

    def forward(self, ids: tg.Tensor, pos, cache: Sequence) -> tg.Tensor:
        """Logits float32 [T, vocab] of `ids` (int32 [T]) at positions pos .. pos+T-1. Each layer
        writes its K/V rows into `cache` (per layer a (k, v) pair of [Hkv, max_ctx, D]) and
        attends over the first pos+T rows. Under tg.capture `pos` is a step variable: one
        captured step serves every position."""
        c = self.config
        T = ids.shape[0]
        positions = token_positions(pos, T)                                # [T]
        x = tg.nn.embedding(ids, self.token_embd)                          # [T, C]
        for blk, (k_cache, v_cache) in zip(self.blk, cache):
            x = self.block(blk, x, pos, positions, k_cache, v_cache)
        x = tg.nn.rms_norm(x, self.output_norm.weight, c.norm_eps)
        return tg.nn.linear(x, self.output)                                # [T, V]

    def block(self, blk, x, pos, positions, k_cache, v_cache):
        """One pre-norm transformer layer: x + attention(norm(x)), then + mlp(norm(x))."""
        c = self.config
        h = tg.nn.rms_norm(x, blk.attn_norm.weight, c.norm_eps)           # [T, C]
        x = _residual(x + self.attention(blk, h, pos, positions, k_cache, v_cache))
        return _residual(x + self.mlp(blk, tg.nn.rms_norm(x, blk.ffn_norm.weight, c.norm_eps)))

    def attention(self, blk, h, pos, positions, k_cache, v_cache):
        """Self-attention of h [T, C] with grouped-query heads; writes this step's K/V rows."""
        c = self.config
        T, Hq, Hkv, D = h.shape[0], c.n_head, c.n_head_kv, c.head_dim
        rope = dict(rot_dims=c.rot_dims, base=c.rope_base, mode=c.rope_mode, freq_factors=self.freq_factors)
        q = tg.nn.linear(h, blk.attn_q.weight, blk.attn_q.bias).reshape(T, Hq, D)
        k = tg.nn.linear(h, blk.attn_k.weight, blk.attn_k.bias).reshape(T, Hkv, D)
        v = tg.nn.linear(h, blk.attn_v.weight, blk.attn_v.bias).reshape(T, Hkv, D)
        q, k = tg.nn.rope(q, positions, **rope), tg.nn.rope(k, positions, **rope)
        # query head h reads KV head h // (Hq / Hkv): no copy of K/V to Hq heads
        a = cached_attention(q, k, v, pos, k_cache, v_cache).reshape(T, Hq * D)   # [T, Hq*D]
        return tg.nn.linear(a, blk.attn_output.weight)                     # [T, C]

    def mlp(self, blk, h):
        """SwiGLU: ffn_down(silu(ffn_gate(h)) * ffn_up(h))."""
        g = tg.nn.linear(h, blk.ffn_gate.weight).silu() * tg.nn.linear(h, blk.ffn_up.weight)   # [T, F]
        return tg.nn.linear(g, blk.ffn_down.weight)                                            # [T, C]

    # -- sessions -------------------------------------------------------------------

    def session(self, max_context: Optional[int] = None, cache_dtype=tg.float16):
        """A new conversation over this model's weights with its own KV cache."""
        from .session import Session
        return Session(self, max_context, cache_dtype)

    def new_cache(self, max_context: int, cache_dtype=tg.float16) -> list:
        """Per layer a (k, v) pair of zeroed [n_head_kv, max_context, head_dim] tensors (GQA: sized
        by the KV heads)."""
        c = self.config
        return new_kv_cache(c.n_layer, c.n_head_kv, max_context, c.head_dim, cache_dtype)

    @property
    def n_params(self) -> int:
        return sum(t.size for t in self.tensors.values())

    def __repr__(self):
        c = self.config
        tied = "tied" if self.output is self.token_embd else "untied"
        return (f"Llama({os.path.basename(self.path or '?')}: {c.arch}, {c.n_layer} layers, {c.n_embd} wide, "
                f"{c.n_head}/{c.n_head_kv} heads, vocab {c.n_vocab}, ctx {c.n_ctx}, rope {c.rope_mode} "
                f"base {c.rope_base:g}, {tied} output, weights {self.token_embd.dtype.name})")
