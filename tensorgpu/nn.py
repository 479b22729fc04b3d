"""tg.nn: the functional building blocks of a transformer, as tensor-level functions.

Each returns a lazy Tensor. Where generated code can't reach the speed (layer norm, rope,
attention, the row gather) the node runs a hand-written kernel from tensorgpu/kernels/;
elementwise consumers of the result (bias, gelu, residual add) fuse into its store.
"""
from __future__ import annotations

from math import prod
from numbers import Integral
from typing import NamedTuple, Optional

from . import dtypes as dt
from .customops import _custom, matmul, rows_operand, rows_viewable, softmax as _softmax
from .graph import IN_PLACE, WRITE_CHAIN, CustomKernel
from .ops import Op
from .tensor import Tensor, tensor
from .symbolic import is_symbolic, static
from .view import View

__all__ = ["linear", "layer_norm", "rms_norm", "embedding", "rope", "scaled_dot_product_attention", "gelu",
           "softmax", "log_softmax", "sample", "sample_rows", "SampledRows"]


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) or approximate="tanh" (GPT-2 / NeoX's fast form)."""
    return x.gelu(approximate)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Softmax along `axis` (a one-pass row kernel for the last axis)."""
    return _softmax(x, axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(x)) along `axis`, computed as (x - max) - log(sum(exp(x - max)))."""
    return _softmax(x, axis, log=True)


def _check_linear(what: str, x: Tensor, w: Tensor, b: Optional[Tensor]) -> None:
    """The shape rules of x [..., in] @ w[out, in].T + b [out]; `what` names the call (and term)."""
    if w.ndim != 2:
        raise ValueError(f"{what}: weight must be 2-D [out, in], got {w.shape}")
    if x.shape[-1:] != (w.shape[1],):
        raise ValueError(f"{what}: input {x.shape} does not match weight {w.shape} (in_features {w.shape[1]})")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"{what}: bias {b.shape} does not match weight {w.shape} (out_features {w.shape[0]})")


def _plus_bias(y: Tensor, b: Optional[Tensor]) -> Tensor:
    """y + b in float32 (a lazy add: it fuses into the producing kernel's store)."""
    if b is None:
        return y
    return y + (b.astype(dt.float32) if b.dtype is not dt.float32 else b)


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ w[out, in].T (+ b [out]); w as GGUF stores it, float or quantized. The bias
    and any elementwise consumer fuse into the matmul's store."""
    _check_linear("linear", x, w, b)
    lead = x.shape[:-1]
    if prod(lead) == 1:
        y = _decode_linear(x, w)
        if y is not None:
            return _plus_bias(y, b).reshape(lead + (w.shape[0],))
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    y = _plus_bias(matmul(x2, w.T), b)
    return y.reshape(lead + (w.shape[0],)) if x.ndim != 2 else y


# ----------------------------------------------------------------------------- layer norm


class LayerNormKernel(CustomKernel):
    name = "layer_norm"
    supports_epilogue = True

    def __init__(self, eps: float, has_w: bool, has_b: bool):
        self.eps, self.has_w, self.has_b = eps, has_w, has_b

    def emit(self, out, operands, epilogue):
        from .kernels.layernorm import layer_norm as k
        x = rows_operand(operands[0])
        rest = list(operands[1:])
        w = rest.pop(0) if self.has_w else None
        b = rest.pop(0) if self.has_b else None
        k(out, x, w, b, *x.shape, self.eps, epilogue)


class StackedLayerNormKernel(CustomKernel):
    """Two layer_norms of one x with their own weight / bias: out [2, *x.shape], the rows' mean
    and variance reduced once (kernels/layernorm.py's stack; rewrites.stack_sibling_layer_norms
    puts it in the graph). flags: (has_w, has_b) of the first norm, then of the second."""
    name = "layer_norm_stack"

    def __init__(self, eps: float, flags: tuple):
        self.eps, self.flags = eps, tuple(bool(f) for f in flags)

    def key(self) -> tuple:
        return (self.name, self.eps, self.flags)

    def emit(self, out, operands, epilogue):
        from .kernels.layernorm import layer_norm as k
        x = rows_operand(operands[0])
        rest = list(operands[1:])
        w1, b1, w2, b2 = (rest.pop(0) if f else None for f in self.flags)
        k(out, x, w1, b1, *x.shape, self.eps, stack=(w2, b2))


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, in f32."""
    x._check_plain("layer_norm")
    if x.ndim == 0:
        raise ValueError("layer_norm needs at least 1 dimension")
    cols = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (cols,):
            raise ValueError(f"layer_norm: {name} has shape {p.shape}, expected ({cols},) for input {x.shape}")
    if not x.dtype.is_float:
        x = x.astype(dt.float32)
    if x.size == 0:
        return x.astype(dt.float32)
    if not rows_viewable(x, unit_last=False):
        x = x.contiguous()
    srcs = [x] + [p for p in (weight, bias) if p is not None]
    return _custom(LayerNormKernel(float(eps), weight is not None, bias is not None), srcs, x.shape)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (LLaMA's RMSNorm), in plain ops: the
    fuser makes it one row kernel (a workgroup per row reduces it and scales it; no hand-written
    kernel), and a one-row linear of it folds it into the GEMV (rewrites.fold_rms_norm_into_gemv)."""
    if not x.dtype.is_float:
        x = x.astype(dt.float32)
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},) for input {x.shape}")
    y = x * ((x * x).mean(-1, keepdims=True) + float(eps)).rsqrt()
    return y if weight is None else y * weight


# ----------------------------------------------------------------------------- embedding


class EmbeddingKernel(CustomKernel):
    name = "embedding"

    def __init__(self, n, vocab, dim, table_dtype):
        self.n, self.vocab, self.dim, self.table_dtype = n, vocab, dim, table_dtype

    def emit(self, out, operands, epilogue):
        from .kernels.embedding import embedding as k
        ids, table = operands
        k(out, ids.buffer, table.buffer, self.table_dtype, self.n, self.vocab, self.dim, ids_offset=ids.offset)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """Rows of `table` [vocab, dim] (float or quantized) picked by integer `ids` -> float32 [*ids.shape, dim].
    Ids known on the host are checked at the call: host sequences and arrays, and tensors made
    from host data (tg.tensor(...), whose range is remembered at upload). Ids computed on the GPU
    are not read back to be checked: an out-of-range one reads as a zero row."""
    if isinstance(ids, Tensor):
        from .graph import HOST_RANGE
        rng = HOST_RANGE.get(ids.node)
        if rng is not None and ids.size and (rng[0] < 0 or rng[1] >= table.shape[0]):
            bad = rng[0] if rng[0] < 0 else rng[1]
            raise IndexError(f"embedding: id {bad} is out of range for a table of {table.shape[0]} rows")
    if not isinstance(ids, Tensor):
        import numpy as np
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= table.shape[0]):
            bad = arr[(arr < 0) | (arr >= table.shape[0])][0]
            raise IndexError(f"embedding: id {bad} is out of range for a table of {table.shape[0]} rows")
        ids = tensor(arr.astype(np.int32))
    if ids.dtype not in (dt.int32, dt.uint32):
        raise TypeError(f"embedding: ids must be int32, got {ids.dtype}")
    if table.ndim != 2:
        raise ValueError(f"embedding: table must be [vocab, dim], got {table.shape}")
    n = ids.size
    flat = ids.reshape(-1)
    if not flat.view.is_contiguous:
        flat = flat.contiguous()
    vocab, dim = table.shape
    if not table.dtype.is_quant and table.view != View.contiguous(table.node.shape):
        table = table.contiguous()
    out = _custom(EmbeddingKernel(n, vocab, dim, table.dtype), [flat, Tensor(table.node)], (n, dim))
    return out.reshape(ids.shape + (dim,))


# ----------------------------------------------------------------------------- rope


class RopeKernel(CustomKernel):
    name = "rope"

    def __init__(self, seq, n_heads, head_dim, rot_dims, base, mode, freq_factors=None):
        self.args = (seq, n_heads, head_dim, rot_dims, base, mode)
        self.freq_factors = freq_factors

    def emit(self, out, operands, epilogue):
        from .kernels.rope import rope as k
        x, pos = operands
        seq, n_heads, head_dim, rot_dims, base, mode = self.args
        k(out, x, pos.buffer, seq, n_heads, head_dim, rot_dims, base, mode, self.freq_factors)


_ROPE_MODES = ("neox", "normal")


def _freq_factors(freq_factors, rot_dims: int):
    """Host float32 [rot_dims/2] of the frequency factors (they are baked into the kernel source
    as constants, like inv_freq), or None. A Tensor is read back once: load it with the model."""
    if freq_factors is None:
        return None
    import numpy as np
    ff = freq_factors.numpy() if isinstance(freq_factors, Tensor) else freq_factors
    ff = np.asarray(ff, np.float32).reshape(-1)
    if ff.shape != (rot_dims // 2,):
        raise ValueError(f"rope: freq_factors has {ff.size} values, expected rot_dims/2 = {rot_dims // 2}")
    if not np.all(np.isfinite(ff)) or np.any(ff <= 0):
        raise ValueError("rope: freq_factors must be finite and positive")
    return ff


def _positions(positions, seq: int) -> Tensor:
    if not isinstance(positions, Tensor):
        import numpy as np
        positions = tensor(np.asarray(positions, dtype=np.int32))
    if positions.shape != (seq,):
        raise ValueError(f"positions must have shape ({seq},), got {positions.shape}")
    if positions.dtype is not dt.int32:
        positions = positions.astype(dt.int32)
    if not positions.view.is_identity(positions.node.shape):
        positions = positions.contiguous()
    return positions   # a lazy one is realized once, however many kernels read it


def rope(x: Tensor, positions, rot_dims: int, base: float = 10000.0, mode: str = "neox",
         freq_factors=None) -> Tensor:
    """Rotary embedding on the first `rot_dims` of each head. mode "neox" rotates (x[i],
    x[i + rot/2]) (rotate-half: GPT-NeoX, Qwen2), "normal" rotates (x[2i], x[2i+1]) (GGML's
    normal mode: a `llama` GGUF, whose Q/K rows the converter permuted). freq_factors (Llama
    3.1's rope_freqs, [rot_dims/2]) divide pair i's angle.
    x: [..., seq, n_heads, head_dim]; positions: int [seq]. Returns float32, same shape."""
    if mode not in _ROPE_MODES:
        raise ValueError(f"rope mode {mode!r} is not supported; use one of {_ROPE_MODES}")
    if x.ndim < 3:
        raise ValueError(f"rope: x must be [..., seq, n_heads, head_dim], got {x.shape}")
    seq, n_heads, head_dim = x.shape[-3:]
    if rot_dims % 2 or not 0 <= rot_dims <= head_dim:
        raise ValueError(f"rope: rot_dims must be even and <= head_dim {head_dim}, got {rot_dims}")
    pos = _positions(positions, seq)
    lead = x.shape[:-3]
    x3 = x.reshape((-1, n_heads, head_dim)) if lead else x
    if lead:  # fold leading dims into seq: positions repeat per batch entry
        reps = prod(lead)
        pos = tensor(__import__("numpy").tile(pos.numpy(), reps))
    if not x3.dtype.is_float:
        x3 = x3.astype(dt.float32)
    ff = _freq_factors(freq_factors, rot_dims)
    out = _custom(RopeKernel(x3.shape[0], n_heads, head_dim, rot_dims, float(base), mode, ff), [x3, pos], x3.shape)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- attention


class AttentionKernel(CustomKernel):
    name = "attention"

    def __init__(self, causal, scale, kv_len_static, out_layout, kv_len_runtime=None, kv_rows=0):
        self.causal, self.scale, self.kv_len_static, self.out_layout = causal, scale, kv_len_static, out_layout
        self.kv_len_runtime = kv_len_runtime   # the valid prefix of a cache: a kernel parameter
        self.kv_rows = kv_rows                 # rows of q per kv_len entry (0: one length for all)

    def emit(self, out, operands, epilogue):
        from .kernels.attention import KVParam, attention as k
        q, kc, vc = operands[:3]
        kv_len = operands[3].buffer if len(operands) > 3 else self.kv_len_static
        if self.kv_len_runtime is not None:
            kv_len = KVParam(self.kv_len_runtime)
        k(out, q, kc, vc, kv_len, causal=self.causal, scale=self.scale, out_layout=self.out_layout,
          kv_rows=self.kv_rows)


def _fold_batch(t: Tensor) -> Tensor:
    """[..., s, d] -> [B, s, d] as a view when strides allow, else a copy."""
    if t.ndim == 3:
        return t
    if t.ndim == 2:
        return t.unsqueeze(0)
    return t.reshape((-1,) + t.shape[-2:])


def _cache_prefix(t: Tensor) -> Optional[Tensor]:
    """The whole realized tensor that `t` is a leading slice of along axis -2 (a KV cache read
    as cache[..., :n, :]), or None."""
    from .view import contiguous_strides
    n, v = t.node, t.view
    stored = n.buffer is not None or n.op in IN_PLACE    # a cache, or one with pending writes
    if not stored or len(n.shape) != t.ndim or t.ndim < 2 or is_symbolic(v.offset) or v.offset != 0:
        return None
    full = n.shape
    if (v.shape[:-2] != full[:-2] or v.shape[-1] != full[-1] or v.strides != contiguous_strides(full)
            or not (0 < v.shape[-2] < full[-2] or (is_symbolic(v.shape[-2]) and v.shape[-2] > 0))):
        return None
    return Tensor(n, View.contiguous(full))


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 scale: Optional[float] = None, kv_len: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T * scale + causal mask) v with q [..., sq, d], k, v [..., sk, d], sk >= sq; the
    mask aligns the last query with the last key (query i sees keys j <= i + sk - sq).

    k and v may be the first rows of a preallocated cache, `cache[:, :pos + T]`: the kernel reads
    the cache with the length as a runtime parameter (a step variable under tg.capture), so one
    compiled kernel serves every decode step. kv_len (int32 tensor, optional) says the same
    from the GPU: only the first kv_len keys are valid. Its shape is (1,) (one length) or the
    batch dims of q before the head axis (q [B, H, sq, d], kv_len [B]: each sequence of a batch
    attends over its own cache length, as flash-attention's `cache_seqlens`); with causal, each
    sequence's last query sees its last valid key.

    Grouped-query attention (torch's enable_gqa=True): k, v may have fewer heads (axis -3)
    than q when their count divides q's; query head h reads KV head h // (Hq / Hkv). The
    kernel indexes the shared head; K/V are not copied."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        t._check_plain("attention")
        if t.ndim < 2:
            raise ValueError(f"attention: {name} must be [..., seq, d], got {t.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must have the same shape")
    gqa = (q.ndim >= 3 and q.ndim == k.ndim and q.shape[:-3] == k.shape[:-3] and k.shape[-3] > 0
           and q.shape[-3] % k.shape[-3] == 0)
    if (q.shape[:-2] != k.shape[:-2] and not gqa) or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} must share batch dims and head size "
                         f"(grouped-query: k's head count, axis -3, may divide q's)")
    sq, d = q.shape[-2:]
    sk = k.shape[-2]
    kv_runtime = None
    if kv_len is None:
        # keys that are the first sk rows of a bigger cache (`cache[:, :pos + T]`): read the whole
        # cache with sk as a runtime parameter, so a growing prefix (or a step variable) never
        # compiles a new kernel
        kf, vf = _cache_prefix(k), _cache_prefix(v)
        if kf is not None and vf is not None and kf.shape == vf.shape and sk >= sq:
            kv_runtime, k, v = sk, kf, vf
    if kv_len is None and sk < sq:
        raise ValueError(f"attention: sk ({sk}) must be >= sq ({sq})")
    scale = float(scale) if scale is not None else 1.0 / d ** 0.5
    batch = q.shape[:-2]
    q3, k3, v3 = _fold_batch(q), _fold_batch(k), _fold_batch(v)
    if not q3.dtype.is_float:
        q3 = q3.astype(dt.float32)
    srcs = [q3, k3, v3]
    kv_rows = 0
    if kv_len is not None:
        per_seq = tuple(q.shape[:-3])
        if kv_len.dtype is not dt.int32 or (kv_len.shape != (1,) and (not per_seq or kv_len.shape != per_seq)):
            raise ValueError(f"attention: kv_len must be an int32 tensor of shape (1,)"
                             + (f" or {per_seq} (one length per sequence of q {q.shape})" if per_seq else "")
                             + f", got {kv_len.shape} {kv_len.dtype}")
        if kv_len.shape != (1,) and kv_len.size > 1:
            kv_rows = q3.shape[0] // kv_len.size
        ok = kv_len.node.buffer is not None and kv_len.view.offset == 0 and kv_len.view.is_contiguous
        srcs.append(kv_len if ok else kv_len.contiguous())
    B = q3.shape[0]
    kern = AttentionKernel(causal, scale, None if kv_len is not None or kv_runtime is not None else static(sk),
                           "bsd", kv_runtime, kv_rows)
    return _custom(kern, srcs, (B, sq, d)).reshape(batch + (sq, d))


# ----------------------------------------------------------------------------- sampling


class SampleKernel(CustomKernel):
    """One token from one row of logits (kernels/sampling.py); with append, the token is also
    written into the prev_tokens history and n_prev is incremented, on the GPU."""
    name = "sample"

    def __init__(self, vocab, temperature, top_k, top_p, penalty, has_u, has_prev, n_prev_static, append):
        self.vocab, self.temperature, self.top_k, self.top_p = vocab, temperature, top_k, top_p
        self.penalty, self.has_u, self.has_prev, self.n_prev_static, self.append = \
            penalty, has_u, has_prev, n_prev_static, append
        if append:
            self.writes = (1 + has_u, 2 + has_u)   # prev_tokens, n_prev (after logits and u)

    def emit(self, out, operands, epilogue):
        from .kernels.sampling import sample as k
        ops = list(operands)
        logits = ops.pop(0)
        u = ops.pop(0).buffer if self.has_u else None
        prev = ops.pop(0).buffer if self.has_prev else None
        n_prev = ops.pop(0).buffer if ops else self.n_prev_static
        k(out, logits.buffer, self.vocab, self.temperature, self.top_k, self.top_p, rand=u,
          repetition_penalty=self.penalty, prev_tokens=prev, n_prev=n_prev, logits_offset=logits.offset,
          append=self.append)


def _written_in_place(t: Tensor) -> Tensor:
    """A tensor a hand-written kernel writes in place: its pending in-place writes run first."""
    if t.node.buffer is None and t.node.op in WRITE_CHAIN:
        t.realize()
    return t


def _whole(t: Tensor, name: str) -> Tensor:
    _written_in_place(t)
    if t.node.buffer is None or not t.view.is_identity(t.node.shape):
        raise ValueError(f"sample: {name} must be a whole realized tensor (it is read and written in place)")
    return t


def sample(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, u=None,
           repetition_penalty: Optional[float] = None, prev_tokens: Optional[Tensor] = None, n_prev=None,
           append: bool = False) -> Tensor:
    """The next token (int32 [1]) from the last row of `logits` ([..., vocab]), chosen on the GPU:
    greedy when temperature is 0, else temperature / top_k (<= 256) / top_p and an inverse-CDF
    draw with the uniform number `u` (a float, or a float32 [1] tensor so one compiled kernel
    serves every step). The repetition penalty applies to prev_tokens[:n_prev] (int32 tensors;
    n_prev an int or an int32 [1] tensor). append=True also writes the token to
    prev_tokens[n_prev] and increments n_prev in place (both whole realized tensors), so a
    decode loop can keep its history on the GPU. Semantics: kernels/sampling.py."""
    import numpy as np
    logits._check_plain("sample")
    if logits.ndim == 0:
        raise ValueError("sample: logits must have a vocabulary axis, got a 0-d tensor")
    vocab = logits.shape[-1]
    row = logits.reshape(-1, vocab)[-1] if logits.ndim > 1 else logits
    if row.dtype is not dt.float32:
        row = row.astype(dt.float32)
    if row.view.strides != (1,) and vocab > 1:  # the kernel reads one contiguous f32 row at an offset
        row = row.contiguous()
    temperature = float(temperature)
    top_k = int(top_k or 0)
    top_p = 1.0 if top_p is None else float(top_p)
    greedy = temperature == 0
    srcs = [row]
    if not greedy:
        if u is None:
            raise ValueError("sample: temperature > 0 needs u, a uniform number in [0, 1) (float or float32 [1] tensor)")
        if not isinstance(u, Tensor):
            if not 0.0 <= float(u) < 1.0:   # also refuses NaN
                raise ValueError(f"sample: u must be a uniform number in [0, 1), got {u!r}")
            u = tensor(np.array([float(u)], np.float32))
        if u.shape != (1,) or u.dtype is not dt.float32:
            raise ValueError(f"sample: u must be a float32 tensor of shape (1,), got {u.shape} {u.dtype}")
        srcs.append(u if u.node.buffer is not None and u.view.is_identity(u.node.shape) else u.contiguous())
    penalty = None if repetition_penalty in (None, 1.0) else float(repetition_penalty)
    has_prev = prev_tokens is not None and (penalty is not None or append)
    if (penalty is not None or append) and prev_tokens is None:
        raise ValueError("sample: repetition_penalty / append need prev_tokens")
    n_static = None
    if has_prev:
        if prev_tokens.ndim != 1 or prev_tokens.dtype is not dt.int32:
            raise ValueError(f"sample: prev_tokens must be int32 [capacity], got {prev_tokens.shape} {prev_tokens.dtype}")
        srcs.append(_whole(prev_tokens, "prev_tokens") if append else
                    (prev_tokens if prev_tokens.node.buffer is not None and prev_tokens.view.is_identity(prev_tokens.node.shape)
                     else prev_tokens.contiguous()))
        if isinstance(n_prev, Tensor):
            if n_prev.shape != (1,) or n_prev.dtype is not dt.int32:
                raise ValueError(f"sample: n_prev must be an int32 tensor of shape (1,), got {n_prev.shape} {n_prev.dtype}")
            srcs.append(_whole(n_prev, "n_prev") if append else
                        (n_prev if n_prev.node.buffer is not None else n_prev.contiguous()))
        elif append:
            raise ValueError("sample: append=True needs n_prev as an int32 [1] tensor (incremented on the GPU)")
        else:
            n_static = prev_tokens.shape[0] if n_prev is None else int(n_prev)
    kern = SampleKernel(vocab, temperature, top_k, top_p, penalty, not greedy, has_prev, n_static, append)
    return _custom(kern, srcs, (1,), dt.int32)


class SampledRows(NamedTuple):
    """What `sample_rows` returns: lazy tensors of one kernel (reading any of them runs it once).

    tokens:       int32 [B], the chosen id of each row (-1 for a row of only NaN logits)
    logprobs:     float32 [B, 1], the log-softmax of the chosen id, of the logits as given
                  (before temperature: what vLLM and the OpenAI API report); NaN where the
                  row's largest logit is not finite
    top_ids:      int32 [B, N], the N = n_logprobs best ids of each row, best first, ties by
                  lower id, NaN logits last (-1 past the vocabulary); None when n_logprobs is 0
    top_logprobs: float32 [B, N], their log-softmax (-inf past the vocabulary); None when n_logprobs is 0
    """
    tokens: Tensor
    logprobs: Tensor
    top_ids: Optional[Tensor]
    top_logprobs: Optional[Tensor]


class SampleRowsKernel(CustomKernel):
    """One token per row of logits, each row with its own parameters (kernels/sampling.py:
    sample_rows). Sources: logits, temperature, top_k, top_p, min_p, u, the float outputs'
    buffer and optionally counts; the last two are written in place (`after_write` nodes
    stand for them)."""
    name = "sample_rows"

    def __init__(self, n_logprobs: int, has_counts: bool):
        self.n_logprobs, self.has_counts = n_logprobs, has_counts
        self.writes = (6, 7) if has_counts else (6,)

    def emit(self, out, operands, epilogue):
        from .kernels.sampling import ROW_PARAMS, sample_rows as k
        logits, floats = operands[0], operands[6]
        params = dict(zip(ROW_PARAMS, operands[1:6]))
        k(out, floats.buffer, logits, params, self.n_logprobs, operands[7] if self.has_counts else None)


def _row_param(t, name: str, B: int, dtype) -> Tensor:
    """A per-row parameter as the kernel reads it: a [B] tensor of `dtype`, any non-negative stride."""
    if not isinstance(t, Tensor):
        raise TypeError(f"sample_rows: {name} must be a tensor of dtype {dtype.name} and shape ({B},) "
                        f"(one value per row), got {type(t).__name__}")
    if t.dtype is not dtype or t.shape != (B,):
        raise ValueError(f"sample_rows: {name} must be a tensor of dtype {dtype.name} and shape ({B},) "
                         f"(one value per row), got {t.dtype.name} {t.shape}")
    return t.contiguous() if t.view.strides[0] < 0 else t


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor,
                n_logprobs: int = 0, counts: Optional[Tensor] = None) -> SampledRows:
    """One token from each row of `logits` (float32 [B, V]), chosen on the GPU, every row with its
    own parameters — what one decode step of a batch of independent sequences needs.

    temperature, top_p, min_p, u: float32 [B]; top_k: int32 [B]. The kernel reads them from their
    buffers, so one compiled kernel serves every mix of values and a `tg.capture`d step replays
    with new ones. Per row: temperature 0 is greedy (argmax, first maximum, NaN never wins);
    top_k 0 is off; top_p 1 is off; min_p 0 is off (else keep tokens with p >= min_p * p_max
    after temperature, as vLLM and llama.cpp do); u in [0, 1) is the row's uniform draw (the
    host draws it from the request's seeded RNG). Exact rules: kernels/sampling.py, "many rows".

    Returns SampledRows(tokens, logprobs, top_ids, top_logprobs); n_logprobs (0..20) sizes the
    top lists (None when 0). Penalties are not applied here: apply them to the logits first
    (plain tensor ops). counts (int32 [B, V], a realized tensor or its leading rows `c[:B]`):
    counts[row, token] += 1 for each chosen token, in place, in the same kernel — a read of
    that memory built after this call sees the new counts."""
    from .kernels.sampling import MAX_LOGPROBS
    from .schedule import after_write
    from .runtime import Buffer, get_device
    from .graph import buffer_node
    if not isinstance(logits, Tensor):
        raise TypeError(f"sample_rows: logits must be a float32 tensor [B, V], got {type(logits).__name__}")
    logits._check_plain("sample_rows")
    if logits.ndim != 2 or 0 in logits.shape:
        raise ValueError(f"sample_rows: logits must be [B, V] with B, V >= 1, got shape {logits.shape}")
    if not logits.dtype.is_float:
        raise TypeError(f"sample_rows: logits must be float32 (or float16), got {logits.dtype.name}")
    if logits.dtype is not dt.float32:
        logits = logits.astype(dt.float32)
    B, V = logits.shape
    if (V > 1 and logits.view.strides[1] != 1) or logits.view.strides[0] < 0:
        logits = logits.contiguous()      # the kernel reads unit-stride rows
    if isinstance(n_logprobs, bool) or not isinstance(n_logprobs, Integral) or not 0 <= n_logprobs <= MAX_LOGPROBS:
        raise ValueError(f"sample_rows: n_logprobs must be an int in [0, {MAX_LOGPROBS}], got {n_logprobs!r}")
    N = int(n_logprobs)
    params = [_row_param(temperature, "temperature", B, dt.float32), _row_param(top_k, "top_k", B, dt.int32),
              _row_param(top_p, "top_p", B, dt.float32), _row_param(min_p, "min_p", B, dt.float32),
              _row_param(u, "u", B, dt.float32)]
    if counts is not None:
        if not isinstance(counts, Tensor):
            raise TypeError(f"sample_rows: counts must be an int32 tensor [{B}, {V}], got {type(counts).__name__}")
        if counts.dtype is not dt.int32 or counts.shape != (B, V):
            raise ValueError(f"sample_rows: counts must be an int32 tensor of shape ({B}, {V}) (rows of logits), "
                             f"got {counts.dtype.name} {counts.shape}")
        _written_in_place(counts)
        cv = counts.view
        if counts.node.buffer is None or is_symbolic(cv.offset) or (V > 1 and cv.strides[1] != 1) \
                or (B > 1 and cv.strides[0] < V):
            raise ValueError(f"sample_rows: counts must be a realized int32 tensor or leading rows of one "
                             f"(c[:{B}] of a [S, {V}] table), written in place; got a view with strides "
                             f"{cv.strides}, offset {cv.offset}{'' if counts.node.buffer is not None else ', unrealized'}")
    # bindings: logits, the parameters' buffers, two outputs, counts — past the device's limit the
    # float parameters travel as rows of one tensor (one binding, one small copy kernel)
    if 3 + (counts is not None) + len({id(p.node) for p in params}) > get_device().max_storage_buffers:
        from .tensor import stack
        packed = stack([params[0], params[2], params[3], params[4]])
        params = [packed[0], params[1], packed[1], packed[2], packed[3]]
    floats = Tensor(buffer_node(Buffer(4 * B * (1 + N)), (B * (1 + N),), dt.float32))
    srcs = [logits] + params + [floats] + ([counts] if counts is not None else [])
    ints = _custom(SampleRowsKernel(N, counts is not None), srcs, (B * (1 + N),), dt.int32)
    floats = Tensor(after_write(floats.node, ints.node))
    if counts is not None:
        counts._adopt(Tensor(after_write(counts.node, ints.node), counts.view))
    return SampledRows(ints[:B], floats[:B].reshape(B, 1), ints[B:].reshape(B, N) if N else None,
                       floats[B:].reshape(B, N) if N else None)


# ----------------------------------------------------------------------------- fused decode attention


class RopeKVWriteKernel(CustomKernel):
    """q_out = rope(qkv[:, 0]) as [H, T, D]; k_cache[h, pos] = rope(k); v_cache[h, pos] = v — one
    kernel for a prompt's attention inputs (rewrites.fuse_rope_cache_write puts it in the graph).

    With n_kv_heads (rewrites.fuse_rope_cache_write_gqa: LLaMA's and Qwen2's own q/k/v
    projections), srcs are (q [T, H, D], positions, k_cache, v_cache, k [T, Hkv, D], v [T, Hkv, D]),
    any rope mode, with optional frequency factors."""
    name = "rope_kv_write"
    writes = (2, 3)

    def __init__(self, seq, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype, mode="neox",
                 n_kv_heads=None, freq_factors=None):
        self.args = (seq, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype)
        self.mode, self.n_kv_heads, self.freq_factors = mode, n_kv_heads, freq_factors

    def emit(self, out, operands, epilogue):
        from .kernels.rope import rope_kv_write as k
        seq, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype = self.args
        if self.n_kv_heads is not None:
            q, pos, kc, vc, kx, vx = operands
            k(out, kc.buffer, vc.buffer, q, pos.buffer, seq, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype,
              self.mode, k=kx, v=vx, n_kv_heads=self.n_kv_heads, freq_factors=self.freq_factors)
            return
        qkv, pos, kc, vc = operands
        k(out, kc.buffer, vc.buffer, qkv, pos.buffer, seq, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype)


class RopeAttentionDecodeKernel(CustomKernel):
    """rope(q, k) + KV-cache write + attention + split combine of one decode token (or of one
    token for each of a batch of sequences): one dispatch."""
    name = "attention_decode"

    def __init__(self, n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype, scale, mode="neox", step=None,
                 n_kv_heads=None, freq_factors=None, batched=False):
        self.args = (n_heads, head_dim, rot_dims, max_ctx, base, cache_dtype, scale)
        self.freq_factors = freq_factors
        self.mode = mode
        # step = (position, key length): ints (step variables under tg.capture) passed as kernel
        # parameters; srcs are then (qkv, k_cache, v_cache). Without it, both are int32 [1] srcs.
        self.step = step
        self.writes = (1, 2) if step is not None else (3, 4)
        # n_kv_heads: separate q [1, H, D], k, v [1, Hkv, D] srcs (grouped-query heads), then the
        # caches: srcs (q, k, v, k_cache, v_cache); needs step
        self.n_kv_heads = n_kv_heads
        if n_kv_heads is not None and not batched:
            assert step is not None
            self.writes = (3, 4)
        # batched: one token per sequence of a batch, row b at int32 position positions[b] in cache
        # slot b (key length positions[b] + 1): srcs (qkv [B, 3, H, D], positions [B], k_cache,
        # v_cache [S, Hkv, max_ctx, D]), or with n_kv_heads (q, k, v, positions, k_cache, v_cache)
        self.batched = batched
        if batched:
            assert step is None
            self.writes = (2, 3) if n_kv_heads is None else (4, 5)

    def emit(self, out, operands, epilogue):
        from .kernels.attention import rope_attention_decode as k
        H, D, rot, max_ctx, base, cache_dtype, scale = self.args
        if self.batched:
            if self.n_kv_heads is not None:
                q, kx, vx, p, kc, vc = operands
                sep = dict(k=kx, v=vx, n_kv_heads=self.n_kv_heads)
            else:
                q, p, kc, vc = operands
                sep = {}
            k(out, kc.buffer, vc.buffer, q, p.buffer, None, H, D, rot, max_ctx, base, cache_dtype, scale,
              mode=self.mode, freq_factors=self.freq_factors, **sep)
            return
        if self.n_kv_heads is not None:
            q, kx, vx, kc, vc = operands
            pos, kvl = self.step
            k(out, kc.buffer, vc.buffer, q, pos, kvl, H, D, rot, max_ctx, base, cache_dtype, scale, mode=self.mode,
              k=kx, v=vx, n_kv_heads=self.n_kv_heads, freq_factors=self.freq_factors)
            return
        if self.step is not None:
            qkv, kc, vc = operands
            pos, kvl = self.step
        else:
            qkv, p, kl, kc, vc = operands
            pos, kvl = p.buffer, kl.buffer
        k(out, kc.buffer, vc.buffer, qkv, pos, kvl, H, D, rot, max_ctx, base, cache_dtype, scale, mode=self.mode)


# ----------------------------------------------------------------------------- decode GEMV


class DecodeLinearKernel(CustomKernel):
    """One activation row times W.T (kernels/gemv.py), optionally normalising the row first."""
    name = "gemv"
    supports_epilogue = True

    def __init__(self, w_dtype, N, K, ln=None, K2=0, w2_dtype=None, rms=False, glu=0):
        self.w_dtype, self.N, self.K, self.ln = w_dtype, N, K, ln   # ln: (has_w, has_b, eps)
        self.K2 = K2        # > 0: a second (x2 [K2], w2 [N, K2]) pair summed into the same rows
        self.w2_dtype = w2_dtype or w_dtype
        self.rms = rms      # ln is LLaMA's RMSNorm (has_b False): x / sqrt(mean(x^2) + eps) * ln_w
        if rms:
            self.name = "gemv_rms"
        self.glu = glu      # > 0: the row is silu(x[k]) * x[k + glu] (kernels/gemv.py's glu)

    def _w(self, w, K):
        from .kernels.common import Operand
        return w.buffer if self.w_dtype.is_quant else Operand(w.buffer, w.dtype, (self.N, K), (K, 1), w.offset)

    def emit(self, out, operands, epilogue):
        from .kernels.common import Operand
        from .kernels.gemv import gemv
        x, w = operands[:2]
        rest = list(operands[2:])
        if self.K2:
            x2, w2 = rest
            pair = (Operand(x2.buffer, x2.dtype, (1, self.K2), (self.K2, 1), x2.offset), self._w(w2, self.K2), self.K2,
                    self.w2_dtype)
            xo = Operand(x.buffer, x.dtype, (1, self.K), (self.K, 1), x.offset)
            gemv(out, xo, self._w(w, self.K), self.w_dtype, self.N, self.K, epilogue, pair=pair)
            return
        ln = None
        if self.ln is not None:
            has_w, has_b, eps = self.ln
            lw = rest.pop(0) if has_w else None
            lb = rest.pop(0) if has_b else None
            ln = (lw, lb, eps)
        xo = Operand(x.buffer, x.dtype, (1, self.K), (self.K, 1), x.offset)
        gemv(out, xo, self._w(w, self.K), self.w_dtype, self.N, self.K, epilogue, ln, rms=self.rms, glu=self.glu)


def _flat_row_ok(v: View, K: int) -> bool:
    return v.is_contiguous and v.offset % 4 == 0 and prod(v.shape) == K


def _decode_weight_ok(x: Tensor, w: Tensor) -> bool:
    """Whether a realized weight (whole buffer, GGUF layout) suits the decode GEMV."""
    if not x.dtype.is_float or w.ndim != 2 or w.node.buffer is None or not w.view.is_identity(w.node.shape):
        return False
    K = w.shape[1]
    wd = w.dtype
    if wd.is_quant:
        from .kernels.quant import SUPPORTED
        return wd in SUPPORTED and wd is not dt.bfloat16 and K % wd.block_size == 0 and K % 4 == 0
    return wd in (dt.float16, dt.float32) and K % (8 if wd is dt.float16 else 4) == 0


def _decode_linear(x: Tensor, w: Tensor):
    """x (one row of K) @ w.T as the decode GEMV (rewrites.py folds a layer norm of x into it,
    stacks siblings, pairs summed ones). None when the decode kernel does not apply."""
    if not _decode_weight_ok(x, w):
        return None
    N, K = w.shape
    if not (_flat_row_ok(x.view, K) and x.dtype in (dt.float32, dt.float16)):
        if x.node.buffer is not None or x.dtype not in (dt.float32, dt.float16):
            return None
        x = x.reshape(1, K)     # a lazy row (a layer norm...): realized whole before the GEMV
        if not _flat_row_ok(x.view, K):
            return None
    return _custom(DecodeLinearKernel(w.dtype, N, K), [x, Tensor(w.node)], (1, N))


class _BiasActEpilogue:
    """Epilogue of a stacked GEMV (`layer_norm_linears`): rows below `split` add bias 0 and apply
    act 0, the rest bias 1 and act 1 (a bias may be absent)."""

    def __init__(self, split, biases: list, acts: tuple):
        from .kernels.common import Operand
        self.splits = [split] if isinstance(split, int) else list(split)   # first row of each later part
        self.split, self.acts = self.splits[0], acts
        self.has = [b is not None for b in biases]
        self.operands = [Operand(b.buffer, b.dtype, (b.buffer.nbytes // 4,), (1,), b.offset) for b in biases if b is not None]

    def wgsl(self, first_binding: int) -> str:
        from .ops import UNARY, WGSL_HELPERS, Op
        s, k, vals = "", first_binding, []
        for j, has in enumerate(self.has):
            if has:
                s += f"@group(0) @binding({k}) var<storage, read> EPB{j}: array<f32>;\n"
                k += 1
        for j, (has, act) in enumerate(zip(self.has, self.acts)):
            op = self.operands[sum(self.has[:j])] if has else None
            i = "i" if j == 0 else f"(i - {self.splits[j - 1]}u)"
            v = f"acc + EPB{j}[{op.offset}u + {i}]" if has else "acc"
            vals.append(UNARY[Op.GELU].wgsl.format(f"({v})") if act == "gelu" else v)
        if "gelu" in self.acts:
            s += WGSL_HELPERS["tg_erf"] + "\n"
        body = "".join(f"  if (i < {sp}u) {{ return {vals[j]}; }}\n" for j, sp in enumerate(self.splits))
        return s + f"fn epilogue(acc: f32, i: u32) -> f32 {{\n{body}  return {vals[-1]};\n}}\n"


class DecodeRmsLinearsKernel(CustomKernel):
    """Two or three projections of one RMS-normed activation row (one norm weight) in one GEMV
    (kernels/gemv.py's rms stack): LLaMA's q, k and v. srcs: x, the weights, the norm weight
    (when present), each part's bias (when present)."""
    name = "gemv_rms_linears"

    def __init__(self, w_dtype, Ns: tuple, K, eps, has_w: bool, has_bias: tuple, acts: tuple):
        self.w_dtype, self.Ns, self.K, self.eps = w_dtype, tuple(Ns), K, eps
        self.has_w, self.has_bias, self.acts = has_w, tuple(has_bias), tuple(acts)

    def emit(self, out, operands, epilogue):
        from .kernels.common import Operand
        from .kernels.gemv import gemv
        n = len(self.Ns)
        x, ws, rest = operands[0], operands[1:1 + n], list(operands[1 + n:])
        lw = rest.pop(0) if self.has_w else None
        biases = [rest.pop(0) if h else None for h in self.has_bias]

        def wop(w, N):
            return w.buffer if self.w_dtype.is_quant else Operand(w.buffer, w.dtype, (N, self.K), (self.K, 1), w.offset)
        splits = [sum(self.Ns[:j + 1]) for j in range(n - 1)]
        xo = Operand(x.buffer, x.dtype, (1, self.K), (self.K, 1), x.offset)
        gemv(out, xo, wop(ws[0], self.Ns[0]), self.w_dtype, self.Ns[0], self.K,
             _BiasActEpilogue(splits, biases, self.acts), ln=(lw, None, self.eps),
             stack=tuple((wop(w, N), N) for w, N in zip(ws[1:], self.Ns[1:])), rms=True)


class DecodeNormLinearsKernel(CustomKernel):
    """Two layer-normed projections of one activation row in one GEMV (kernels/gemv.py's stack)."""
    name = "gemv_norm_linears"

    def __init__(self, w_dtype, N1, N2, K, eps, present: tuple, acts: tuple):
        self.w_dtype, self.N1, self.N2, self.K, self.eps = w_dtype, N1, N2, K, eps
        self.present, self.acts = present, acts   # present: (ln_w, ln_b, b) of each part: given or not

    def emit(self, out, operands, epilogue):
        from .kernels.common import Operand
        from .kernels.gemv import gemv
        x, w1, w2 = operands[:3]
        rest = iter(operands[3:])
        got = [[next(rest) if p else None for p in part] for part in self.present]
        (g1, c1, b1), (g2, c2, b2) = got

        def wop(w, N):
            return w.buffer if self.w_dtype.is_quant else Operand(w.buffer, w.dtype, (N, self.K), (self.K, 1), w.offset)
        xo = Operand(x.buffer, x.dtype, (1, self.K), (self.K, 1), x.offset)
        gemv(out, xo, wop(w1, self.N1), self.w_dtype, self.N1, self.K, _BiasActEpilogue(self.N1, [b1, b2], self.acts),
             ln=(g1, c1, self.eps), stack=(wop(w2, self.N2), self.N2, g2, c2))
