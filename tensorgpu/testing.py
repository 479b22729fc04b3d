"""Random GGUF data for tests and benchmarks, for the block types the gguf package cannot
quantize (the k-quants).

A llama.cpp "Q4_K_M" file mixes q4_k, q5_k and q6_k tensors. The gguf package only writes the
legacy formats. So mixed files are made here from random codes and scale bytes, with the f16
super-block scales set so that the values come out near a given standard deviation. Compare a
model on such a file with the float32 model of its dequantized values
(`gguf.quants.dequantize`), or time it.
"""
from __future__ import annotations

import numpy as np

from . import dtypes

# (numerator, denominator) of each f16 scale field as a fraction of std: d * scale * code ~ std
_SCALE_FIELDS = {
    "q4_k": ((0, 32 * 8), (2, 32)),        # d * 6-bit scale * q4 - dmin * 6-bit min
    "q5_k": ((0, 32 * 16), (2, 32)),       # d * 6-bit scale * q5 - dmin * 6-bit min
    "q6_k": ((208, 64 * 16),),             # d * int8 scale * (q6 - 32)
    "q4_0": ((0, 8),), "q8_0": ((0, 128),), "q5_0": ((0, 16),),
    "q4_1": ((0, 16), (2, 1)), "q5_1": ((0, 32), (2, 1)),
}

# llama.cpp's Q4_K_M recipe in outline: q6_k for the output and the MLP down projections, q4_k
# for the rest. On GPT-NeoX names, the first layer's attn_qkv is q5_k, so all three k-quants
# appear. The second layer's ffn_down is q4_k, so one layer's attention-output + down pair
# shares a type.
_Q4_K_M_LIKE = {"token_embd.weight": "q4_k", "output.weight": "q6_k", "blk.0.attn_qkv.weight": "q5_k",
                "blk.1.ffn_down.weight": "q4_k"}
_Q4_K_M_BY_KIND = {"attn_qkv": "q4_k", "attn_output": "q4_k", "ffn_up": "q4_k", "ffn_down": "q6_k"}


def q4_k_m_like_type(name: str) -> str | None:
    """The block type a Q4_K_M-like file gives the GGUF tensor `name` (None: left as it is)."""
    if name in _Q4_K_M_LIKE:
        return _Q4_K_M_LIKE[name]
    return next((v for k, v in _Q4_K_M_BY_KIND.items() if f".{k}.weight" in name), None)


def random_blocks(dtype, shape, std: float, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """uint8 [rows, bytes per row]: random GGUF blocks of `dtype` for a weight of `shape`
    (last dimension a multiple of the block size) whose values are of order `std`; spread > 1
    scales each block by its own log-uniform factor in [1/spread, spread] (and a random sign)."""
    dt = dtypes.as_dtype(dtype)
    if dt.name not in _SCALE_FIELDS:
        raise ValueError(f"random_blocks: no scale layout for {dt.name} (have {', '.join(sorted(_SCALE_FIELDS))})")
    shape = tuple(int(s) for s in shape)
    if not shape or shape[-1] % dt.block_size:
        raise ValueError(f"random_blocks: shape {shape}: last dimension is not a multiple of {dt.name}'s "
                         f"block size {dt.block_size}")
    nb = int(np.prod(shape)) // dt.block_size
    b = rng.integers(0, 256, size=(nb, dt.block_bytes), dtype=np.uint8)
    for off, div in _SCALE_FIELDS[dt.name]:
        f = np.exp(rng.uniform(-np.log(spread), np.log(spread), nb)) if spread > 1 else 1.0
        v = std / div * f * rng.choice([-1.0, 1.0], nb)
        b[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(nb, 2)
    return b.reshape(int(np.prod(shape[:-1])), -1)
