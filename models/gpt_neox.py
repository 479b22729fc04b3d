"""GPT-NeoX (Pythia, RedPajama-INCITE, StableLM-alpha) as plain tensorgpu code.

    model = GPTNeoX.from_gguf("models/tiny-neox/tiny-neox-q8_0.gguf")
    sess = model.session()
    logits = sess.forward(model.tokenizer.encode("In the beginning"))   # Tensor [seq, vocab]
    for tok in sess.generate("In the beginning", max_new_tokens=16): ...

The model holds the weights exactly as the GGUF file stores them (quantized blocks stay
quantized on the GPU); a Session owns a preallocated KV cache and a position, so many sessions
share one copy of the weights. Names follow the GGUF tensors (llama.cpp's `gptneox` layout).

One forward of T tokens, per layer (C = n_embd, H = n_head, D = head_dim = C / H):

    h   = layer_norm(x)                            [T, C]
    qkv = h @ attn_qkv.T + b                       [T, 3C] viewed as [T, 3, H, D] (GGUF's order)
    q, k = rope(q), rope(k)                        [T, H, D]
    cache[:, pos:pos+T] = k, v                     caches [H, max_ctx, D]
    a   = attention(q, cache[:, :pos+T])           [H, T, D] -> [T, C]
    parallel:    x = x + attn_output(a) + mlp(ffn_norm(x))
    sequential:  x = x + attn_output(a);  x = x + mlp(ffn_norm(x))

The file is plain tensor code: the engine's rewrite rules (tensorgpu/rewrites.py) find the
decode step's fusions (the norms folded into the GEMVs, QKV and MLP-up stacked, the two output
projections paired with the residual, rope + cache write + attention as one kernel). `pos` is a
Python int; under tg.capture it is a step variable, so one captured step serves every position.

`python -m models.gpt_neox {generate,perplexity,convert} --help` is the command line
(models/cli.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import tensorgpu as tg

from .base import (MetaReader, ModelError, Params, build_tokenizer, cached_attention, check_dtypes, check_tensors,
                   load_checked, new_kv_cache, token_positions)

__all__ = ["GPTNeoX", "GPTNeoXConfig", "Session", "ModelError", "ContextOverflowError", "DEFAULT_MODEL"]

DEFAULT_MODEL = Path(__file__).resolve().parent / "tiny-neox" / "tiny-neox-q8_0.gguf"
ARCH = "gptneox"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GPTNeoXConfig:
    n_vocab: int
    n_ctx: int              # gptneox.context_length
    n_embd: int             # gptneox.embedding_length
    n_layer: int            # gptneox.block_count
    n_head: int             # gptneox.attention.head_count
    n_ff: int               # gptneox.feed_forward_length
    rot_dims: int           # gptneox.rope.dimension_count (Pythia: 25% of head_dim)
    rope_base: float        # gptneox.rope.freq_base, 10000 when absent
    norm_eps: float         # gptneox.attention.layer_norm_epsilon
    parallel_residual: bool  # gptneox.use_parallel_residual

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    _REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "rope.dimension_count", "attention.head_count", "attention.layer_norm_epsilon",
                 "use_parallel_residual")

    @classmethod
    def from_metadata(cls, md: dict, n_vocab: int, where: str = "GGUF file") -> "GPTNeoXConfig":
        arch = md.get("general.architecture")
        if arch != ARCH:
            raise ModelError(f"{where}: general.architecture is {arch!r}; GPTNeoX loads only {ARCH!r} models")
        m = MetaReader(md, ARCH, where)
        m.require(*cls._REQUIRED)
        cfg = cls(n_vocab=n_vocab, n_ctx=m.int("context_length"), n_embd=m.int("embedding_length"),
                  n_layer=m.int("block_count"), n_head=m.int("attention.head_count"),
                  n_ff=m.int("feed_forward_length"), rot_dims=m.int("rope.dimension_count", lo=2),
                  rope_base=m.float("rope.freq_base", 10000.0),
                  norm_eps=m.float("attention.layer_norm_epsilon", hi=1.0),
                  parallel_residual=_flag(md, f"{ARCH}.use_parallel_residual", where))
        if cfg.n_embd % cfg.n_head:
            raise ModelError(f"{where}: embedding_length {cfg.n_embd} is not divisible by head_count {cfg.n_head}")
        if cfg.rot_dims % 2 or not 2 <= cfg.rot_dims <= cfg.head_dim:
            raise ModelError(f"{where}: rope.dimension_count {cfg.rot_dims} must be even and <= head_dim {cfg.head_dim}")
        return cfg


def _flag(md: dict, key: str, where: str) -> bool:
    v = md[key]
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    raise ModelError(f"{where}: metadata {key} = {v!r} is not a bool")


# ----------------------------------------------------------------------------- weights


_Params = Params  # the accessor is shared with the other models (models/base.py)


def _expected_shapes(c: GPTNeoXConfig) -> dict:
    """numpy-order shape of every tensor the model reads (GGUF ne reversed)."""
    C, F, V = c.n_embd, c.n_ff, c.n_vocab
    shapes = {"token_embd.weight": (V, C), "output_norm.weight": (C,), "output_norm.bias": (C,),
              "output.weight": (V, C)}
    for i in range(c.n_layer):
        b = f"blk.{i}"
        shapes.update({
            f"{b}.attn_norm.weight": (C,), f"{b}.attn_norm.bias": (C,),
            f"{b}.attn_qkv.weight": (3 * C, C), f"{b}.attn_qkv.bias": (3 * C,),
            f"{b}.attn_output.weight": (C, C), f"{b}.attn_output.bias": (C,),
            f"{b}.ffn_norm.weight": (C,), f"{b}.ffn_norm.bias": (C,),
            f"{b}.ffn_up.weight": (F, C), f"{b}.ffn_up.bias": (F,),
            f"{b}.ffn_down.weight": (C, F), f"{b}.ffn_down.bias": (C,),
        })
    return shapes


# ----------------------------------------------------------------------------- the model


class GPTNeoX:
    """The resident model: config, weights (as stored in the GGUF), tokenizer."""

    def __init__(self, config: GPTNeoXConfig, tensors: dict, tokenizer=None, path: Optional[str] = None,
                 metadata: Optional[dict] = None):
        self.config = config
        self.tensors = tensors          # GGUF name -> Tensor (file dtype)
        self.tokenizer = tokenizer
        self.path = path
        self.metadata = metadata or {}
        self.token_embd = tensors["token_embd.weight"]      # [V, C]
        self.blk = [_Params(tensors, f"blk.{i}") for i in range(config.n_layer)]
        self.output_norm = _Params(tensors, "output_norm")
        self.output = tensors["output.weight"]               # [V, C]

    # -- loading --------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: Union[str, os.PathLike] = DEFAULT_MODEL, progress: Optional[bool] = None,
                  _file=None) -> "GPTNeoX":
        """Load a llama.cpp `gptneox` GGUF. Raises ModelError naming what is wrong; on failure the
        file's device buffers are released."""
        path = os.fspath(path)

        def build(f):
            md = f.metadata
            emb = f.tensors.get("token_embd.weight")
            if md.get("general.architecture") == ARCH and emb is None:
                raise ModelError(f"{path}: missing required tensor(s): token_embd.weight")
            n_vocab = emb.shape[0] if emb is not None and emb.ndim == 2 else 0
            config = GPTNeoXConfig.from_metadata(md, n_vocab, where=path)
            tensors = check_tensors(f, _expected_shapes(config), path)
            check_dtypes(tensors, path, f)
            return cls(config, tensors, build_tokenizer(md, config.n_vocab, path), path, md)

        return load_checked(path, build, progress, _file)

    # -- the forward pass -----------------------------------------------------------

    def forward(self, ids: tg.Tensor, pos, cache: Sequence) -> tg.Tensor:
        """Logits float32 [T, vocab] of `ids` (int32 [T]) at positions pos .. pos+T-1. Each
        layer writes its K/V rows into `cache` (per layer a (k, v) pair of [H, max_ctx, D]
        tensors) and attends over the first pos+T rows. Under tg.capture `pos` is a step
        variable: one captured step serves every position.
        A batch of T sequences, one token each: pos is an int32 [T] tensor and the caches are
        [S, H, max_ctx, D] slots (see base.cached_attention)."""
        c = self.config
        T = ids.shape[0]
        positions = token_positions(pos, T)                                # [T]
        x = tg.nn.embedding(ids, self.token_embd)                          # [T, C]
        for blk, (k_cache, v_cache) in zip(self.blk, cache):
            x = self._block(blk, x, pos, positions, k_cache, v_cache)
        x = tg.nn.layer_norm(x, self.output_norm.weight, self.output_norm.bias, c.norm_eps)
        return tg.nn.linear(x, self.output)                                # [T, V]

    def _block(self, blk, x, pos, positions, k_cache, v_cache):
        c = self.config
        T, H, D = x.shape[0], c.n_head, c.head_dim
        h = tg.nn.layer_norm(x, blk.attn_norm.weight, blk.attn_norm.bias, c.norm_eps)
        qkv = tg.nn.linear(h, blk.attn_qkv.weight, blk.attn_qkv.bias)     # [T, 3C]
        qkv = qkv.reshape(T, 3, H, D)                                      # GGUF rows: all q, all k, all v
        q = tg.nn.rope(qkv[:, 0], positions, c.rot_dims, c.rope_base)      # [T, H, D]
        k = tg.nn.rope(qkv[:, 1], positions, c.rot_dims, c.rope_base)
        a = cached_attention(q, k, qkv[:, 2], pos, k_cache, v_cache)       # [T, H, D]
        a = a.reshape(T, c.n_embd)                                         # [T, C]
        attn = tg.nn.linear(a, blk.attn_output.weight, blk.attn_output.bias)
        if c.parallel_residual:                                            # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self._mlp(blk, tg.nn.layer_norm(x, blk.ffn_norm.weight, blk.ffn_norm.bias, c.norm_eps))
        x = x + attn                                                       # sequential (RedPajama-style)
        return x + self._mlp(blk, tg.nn.layer_norm(x, blk.ffn_norm.weight, blk.ffn_norm.bias, c.norm_eps))

    def _mlp(self, blk, h):
        u = tg.nn.linear(h, blk.ffn_up.weight, blk.ffn_up.bias).gelu()        # [T, F], exact erf GELU
        return tg.nn.linear(u, blk.ffn_down.weight, blk.ffn_down.bias)       # [T, C]

    # -- sessions -------------------------------------------------------------------

    def session(self, max_context: Optional[int] = None, cache_dtype=tg.float16) -> "Session":
        """A new conversation over this model's weights with its own KV cache."""
        return Session(self, max_context, cache_dtype)

    def new_cache(self, max_context: int, cache_dtype=tg.float16) -> list:
        """Per layer a (k, v) pair of zeroed [H, max_context, D] tensors on the GPU."""
        c = self.config
        return new_kv_cache(c.n_layer, c.n_head, max_context, c.head_dim, cache_dtype)

    @property
    def n_params(self) -> int:
        return sum(t.size for t in self.tensors.values())

    def __repr__(self):
        c = self.config
        return (f"GPTNeoX({os.path.basename(self.path or '?')}: {c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, "
                f"vocab {c.n_vocab}, ctx {c.n_ctx}, rot {c.rot_dims}, "
                f"{'parallel' if c.parallel_residual else 'sequential'} residual, weights {self.token_embd.dtype.name})")


from .session import ContextOverflowError, Session  # noqa: E402  (session.py does not import this module)


if __name__ == "__main__":
    import sys

    from .cli import main
    sys.exit(main())
