"""GPT-NeoX tensor names and layout shared by the converter, the exporter and the model.

llama.cpp's ``convert_hf_to_gguf.py`` renames every Hugging Face tensor and
permutes the rows of the fused QKV projection; both directions have to agree
bit-for-bit, so the mapping lives in one place.
"""

from __future__ import annotations

import re

import numpy as np

ARCH = "gptneox"

# HF suffix inside ``gpt_neox.layers.N.`` -> GGUF suffix inside ``blk.N.``
_BLOCK_MAP = {
    "input_layernorm": "attn_norm",
    "attention.query_key_value": "attn_qkv",
    "attention.dense": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
_GLOBAL_MAP = {
    "gpt_neox.embed_in": "token_embd",
    "gpt_neox.final_layer_norm": "output_norm",
    "embed_out": "output",
}
# transformers 5 names the LM head ``lm_head`` in memory and some checkpoints save it so.
_GLOBAL_ALIASES = {"lm_head": "embed_out"}

# Buffers that older transformers versions saved next to the weights; they are
# recomputed from the config, so they are dropped rather than mapped.
_SKIP_RE = re.compile(
    r"(^|\.)(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias|"
    r"attention\.rotary_emb\..*)$"
)

_BLOCK_RE = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")

# Per-block GGUF tensors in the order llama.cpp's converter writes them.
BLOCK_ORDER = [
    "attn_norm.weight", "attn_norm.bias",
    "attn_qkv.weight", "attn_qkv.bias",
    "attn_output.weight", "attn_output.bias",
    "ffn_norm.weight", "ffn_norm.bias",
    "ffn_up.weight", "ffn_up.bias",
    "ffn_down.weight", "ffn_down.bias",
]


def gguf_tensor_order(n_layer: int) -> list[str]:
    """Every GGUF tensor name of an ``n_layer`` GPT-NeoX model, in file order."""
    names = ["token_embd.weight"]
    for i in range(n_layer):
        names += [f"blk.{i}.{s}" for s in BLOCK_ORDER]
    names += ["output_norm.weight", "output_norm.bias", "output.weight"]
    return names


def is_skipped_hf_name(name: str) -> bool:
    """True for non-parameter buffers that some checkpoints carry (rotary inv_freq, masks)."""
    return bool(_SKIP_RE.search(name))


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF name for an HF GPTNeoXForCausalLM tensor name, or None if it is not a known parameter."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, mod, kind = m.groups()
        if mod in _BLOCK_MAP:
            return f"blk.{layer}.{_BLOCK_MAP[mod]}.{kind}"
        return None
    base, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    base = _GLOBAL_ALIASES.get(base, base)
    if base in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[base]}.{kind}"
    return None


_INV_BLOCK = {v: k for k, v in _BLOCK_MAP.items()}
_INV_GLOBAL = {v: k for k, v in _GLOBAL_MAP.items()}


def gguf_to_hf_name(name: str) -> str:
    """HF GPTNeoXForCausalLM name (transformers 4.x on-disk spelling) for a GGUF tensor name."""
    m = _GGUF_BLOCK_RE.match(name)
    if m:
        layer, mod, kind = m.groups()
        if mod in _INV_BLOCK:
            return f"gpt_neox.layers.{layer}.{_INV_BLOCK[mod]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _INV_GLOBAL and kind in ("weight", "bias"):
            return f"{_INV_GLOBAL[base]}.{kind}"
    raise ValueError(f"{name!r} is not a GPT-NeoX GGUF tensor name")


def qkv_hf_to_gguf(x: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder fused QKV rows from HF's per-head interleave to llama.cpp's Q|K|V blocks.

    HF stores rows as [n_head, 3, head_dim]; GGUF as [3, n_head, head_dim]. Works for
    the weight (rows, n_embd) and the bias (rows,).
    """
    rows = x.shape[0]
    if rows % (3 * n_head):
        raise ValueError(f"fused QKV has {rows} rows, not a multiple of 3*n_head = {3 * n_head}")
    head_dim = rows // (3 * n_head)
    return x.reshape(n_head, 3, head_dim, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def qkv_gguf_to_hf(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`qkv_hf_to_gguf`."""
    rows = x.shape[0]
    if rows % (3 * n_head):
        raise ValueError(f"fused QKV has {rows} rows, not a multiple of 3*n_head = {3 * n_head}")
    head_dim = rows // (3 * n_head)
    return x.reshape(3, n_head, head_dim, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
