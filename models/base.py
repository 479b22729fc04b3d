"""What every GGUF model in models/ shares: the error type, checked metadata numbers, the
tensor-name accessor, the tensor checks, the load-or-release wrapper and the KV cache.

Why here: GPT-NeoX and LLaMA validate a file the same way (every number range-checked before
anything scales with it, every tensor's shape compared with what the metadata implies, the
file's device buffers released when anything is wrong), so that logic is written once.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import tensorgpu as tg

__all__ = ["ModelError", "Params", "MetaReader", "check_tensors", "check_dtypes", "check_cache_fits",
           "load_checked", "new_kv_cache", "build_tokenizer"]

# Upper bounds of the metadata numbers a model scales with: far above any released model, low
# enough that a corrupt or hostile value (a block_count of 0xFFFFFFFF) fails at once instead of
# building millions of per-layer entries or allocating a giant cache.
LIMITS = {
    "block_count": 4096,
    "embedding_length": 1 << 20,
    "feed_forward_length": 1 << 22,
    "context_length": 1 << 24,
    "attention.head_count": 4096,
    "attention.head_count_kv": 4096,
    "attention.key_length": 1 << 14,
    "attention.value_length": 1 << 14,
    "rope.dimension_count": 1 << 14,
    "vocab_size": 1 << 24,
}


class ModelError(ValueError):
    """A GGUF file that is not a usable model: wrong or unsupported architecture, missing keys or
    tensors, numbers out of range, shapes that disagree with the metadata. The message names the
    file and the field."""


class Params:
    """Attribute access to one GGUF name prefix: blk.0 -> .attn_q.weight is 'blk.0.attn_q.weight'.
    A name the file does not have reads as None at the leaf (`blk.attn_q.bias` of a bias-free
    model), so optional tensors read naturally in the model code."""

    def __init__(self, tensors: dict, prefix: str):
        self._t, self._p = tensors, prefix

    def __getattr__(self, name):
        key = f"{self._p}.{name}"
        if key in self._t:
            return self._t[key]
        if name in ("weight", "bias"):
            return None
        return Params(self._t, key)


class MetaReader:
    """Typed, range-checked reads of `{arch}.*` metadata keys; errors name the file and the key."""

    def __init__(self, md: dict, arch: str, where: str):
        self.md, self.arch, self.where = md, arch, where

    def key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self.key(name) in self.md

    def require(self, *names: str) -> None:
        missing = [self.key(n) for n in names if not self.has(n)]
        if missing:
            raise ModelError(f"{self.where}: missing required metadata key(s): {', '.join(missing)}")

    def _get(self, name: str, default) -> tuple:
        """(full key, value); the value is None when the key is absent and has a default, and
        an absent key without a default is a ModelError naming it."""
        k = self.key(name)
        if k not in self.md:
            if default is None:
                raise ModelError(f"{self.where}: missing required metadata key {k}")
            return k, None
        return k, self.md[k]

    def int(self, name: str, default: Optional[int] = None, lo: int = 1, hi: Optional[int] = None) -> int:
        """A positive integer in [lo, hi] (hi from LIMITS by default)."""
        k, v = self._get(name, default)
        if v is None:
            return default
        hi = LIMITS.get(name, 1 << 31) if hi is None else hi
        try:
            if isinstance(v, bool):
                raise TypeError
            n = operator.index(v)
        except TypeError:
            raise ModelError(f"{self.where}: metadata {k} = {v!r} is not an integer") from None
        if not lo <= n <= hi:
            raise ModelError(f"{self.where}: metadata {k} = {n} is out of range [{lo}, {hi}]")
        return n

    def float(self, name: str, default: Optional[float] = None, lo: float = 0.0, hi: float = float("inf"),
              lo_open: bool = True) -> float:
        """A finite float in (lo, hi] (or [lo, hi] with lo_open=False)."""
        k, v = self._get(name, default)
        if v is None:
            return default
        if isinstance(v, (bool, str, list, bytes)) or not isinstance(v, (int, float)):
            raise ModelError(f"{self.where}: metadata {k} = {v!r} is not a number")
        x = float(v)
        if x != x or x in (float("inf"), float("-inf")) or x > hi or x < lo or (lo_open and x == lo):
            raise ModelError(f"{self.where}: metadata {k} = {x!r} is out of range "
                             f"{'(' if lo_open else '['}{lo}, {hi}]")
        return x

    def str(self, name: str, default: Optional[str] = None) -> Optional[str]:
        v = self.md.get(self.key(name), default)
        if v is not None and not isinstance(v, str):
            raise ModelError(f"{self.where}: metadata {self.key(name)} = {v!r} is not a string")
        return v


def check_tensors(f, expected: dict, where: str, optional: dict = None) -> dict:
    """The tensors a model reads: every `expected` name (numpy-order shape) must be in the file
    with that shape; `optional` names are checked when present. Returns name -> Tensor."""
    missing = [k for k in expected if k not in f.tensors]
    if missing:
        more = f" (and {len(missing) - 12} more)" if len(missing) > 12 else ""
        raise ModelError(f"{where}: missing required tensor(s): {', '.join(missing[:12])}{more}")
    want = dict(expected)
    want.update({k: s for k, s in (optional or {}).items() if k in f.tensors})
    bad = [f"{k} is {f.tensors[k].shape} {f.tensors[k].dtype.name}, expected {s}"
           for k, s in want.items() if f.tensors[k].shape != tuple(s)]
    if bad:
        raise ModelError(f"{where}: tensor shapes do not match the metadata: {'; '.join(bad[:6])}")
    return {k: f.tensors[k] for k in want}


# What a model computes on, per tensor role: norm weights and biases are read as plain floats by
# the layer-norm and bias-add kernels; weight matrices and the embedding go through the GEMV /
# matmul / embedding kernels, which decode every GGML block type tensorgpu supports.
VECTOR_DTYPES = ("float32", "float16")


def matrix_dtypes() -> tuple:
    from tensorgpu.kernels.quant import SUPPORTED
    return ("float32", "float16") + tuple(d.name for d in SUPPORTED)


def check_dtypes(tensors: dict, where: str, f=None) -> None:
    """Every tensor's dtype must be one the model computes on for its role: 1-D tensors (norm
    weights, biases) float32/float16, matrices float32/float16 or a supported block type. A
    file that breaks this would load and then give constant tokens, NaN logits or a TypeError at
    the first forward; here it is a ModelError naming the tensor, its type and its file offset."""
    mats = matrix_dtypes()
    for name, t in tensors.items():
        ok = VECTOR_DTYPES if t.ndim <= 1 else mats
        if t.dtype.name not in ok:
            info = getattr(f, "tensor_info", {}).get(name)
            at = f" (data at file offset {info[2]})" if info else ""
            role = "a norm weight or bias" if t.ndim <= 1 else "a weight matrix"
            raise ModelError(f"{where}: tensor {name!r}{at} is {t.dtype.name}, but as {role} {t.shape} it must be "
                             f"one of {', '.join(ok)}")


def check_cache_fits(n_layer: int, n_kv_heads: int, max_context: int, head_dim: int, itemsize: int,
                     what: str) -> None:
    """A KV cache of `max_context` rows must fit the device: each layer's K (and V) tensor
    [n_kv_heads, max_context, head_dim] is one storage binding. The error names the context
    length, the bytes it needs and the limit."""
    per = n_kv_heads * max_context * head_dim * itemsize
    lim = tg.runtime.get_device().max_binding_size
    if per > lim:
        raise ValueError(f"{what} = {max_context}: the KV cache needs {per} bytes per layer tensor "
                         f"({2 * n_layer * per} bytes in all), over this device's max_storage_buffer_binding_size "
                         f"of {lim} bytes; pass a smaller max_context (at most {lim // (n_kv_heads * head_dim * itemsize)})")


def load_checked(path: str, build: Callable, progress: Optional[bool] = None, f=None):
    """Open (or take) the GGUF file and return build(f); when build raises, the file's device
    buffers are released before the error propagates (nothing half-loaded stays on the GPU).
    Either way the file object is closed: the model keeps only the tensors it took."""
    if f is None:
        f = tg.load_gguf(path, progress=progress)
    try:
        model = build(f)
    except BaseException:
        f.close()
        raise
    f.close()
    return model


def build_tokenizer(md: dict, n_vocab: int, where: str):
    """The file's tokenizer (None when it has no tokenizer.ggml.model); its vocabulary must fit
    the embedding."""
    if "tokenizer.ggml.model" not in md:
        return None
    from .tokenizer import tokenizer_from_gguf_metadata
    try:
        tok = tokenizer_from_gguf_metadata(md)
    except ValueError as e:
        raise ModelError(f"{where}: {e}") from e
    if tok.vocab_size > n_vocab:
        raise ModelError(f"{where}: the tokenizer has {tok.vocab_size} tokens (tokenizer.ggml.tokens) but "
                         f"token_embd.weight only {n_vocab} rows")
    return tok


def new_kv_cache(n_layer: int, n_kv_heads: int, max_context: int, head_dim: int, cache_dtype=tg.float16) -> list:
    """Per layer a (k, v) pair of zeroed [n_kv_heads, max_context, head_dim] tensors on the GPU."""
    shape = (n_kv_heads, max_context, head_dim)
    return [(tg.zeros(shape, cache_dtype).contiguous().realize(), tg.zeros(shape, cache_dtype).contiguous().realize())
            for _ in range(n_layer)]


def token_positions(pos, T: int) -> tg.Tensor:
    """Positions of a forward's T tokens: pos .. pos+T-1 for one sequence (pos an int, a step
    variable under tg.capture), or pos itself for a batch (an int32 [T] tensor: token t is the
    next token of sequence t)."""
    return pos if isinstance(pos, tg.Tensor) else tg.arange(pos, pos + T)


def cached_attention(q: tg.Tensor, k: tg.Tensor, v: tg.Tensor, pos, k_cache: tg.Tensor,
                     v_cache: tg.Tensor) -> tg.Tensor:
    """Write this forward's K/V rows into the cache and attend over everything cached so far.
    q [T, Hq, D], k, v [T, Hkv, D] (roped) -> [T, Hq, D]; query head h reads KV head h // (Hq/Hkv).

    One sequence (pos an int): caches [Hkv, max_ctx, D], rows pos .. pos+T-1 are written and
    the T queries attend causally over the first pos+T rows.
    A batch (pos an int32 [T] tensor): caches [S, Hkv, max_ctx, D] with S >= T slots; token t
    belongs to the sequence in slot t, is written at row pos[t] of that slot and attends over the
    slot's first pos[t]+1 rows. Both are plain tensor ops; the engine's rewrite rules fuse the
    decode step, of one sequence or of a batch (rope + cache writes + attention in one kernel)."""
    T = q.shape[0]
    if not isinstance(pos, tg.Tensor):
        k_cache[:, pos:pos + T] = k.swapaxes(0, 1)                        # [Hkv, T, D] rows
        v_cache[:, pos:pos + T] = v.swapaxes(0, 1)
        a = tg.nn.scaled_dot_product_attention(q.swapaxes(0, 1), k_cache[:, :pos + T], v_cache[:, :pos + T],
                                               causal=True)               # [Hq, T, D]
        return a.swapaxes(0, 1)                                           # [T, Hq, D]
    rows = pos[:, None, None, None]                                        # [T, 1, 1, 1]
    tg.put_along_axis(k_cache[:T], rows, k[:, :, None, :], axis=2)         # k_cache[t, :, pos[t]] = k[t]
    tg.put_along_axis(v_cache[:T], rows, v[:, :, None, :], axis=2)
    a = tg.nn.scaled_dot_product_attention(q[:, :, None, :], k_cache[:T], v_cache[:T], causal=True,
                                           kv_len=pos + 1)                 # [T, Hq, 1, D]
    return a.reshape(q.shape)
