"""Next-token choice from a row of logits: greedy, temperature, top-k, top-p, repetition penalty.

On the GPU (tg.nn.sample, one kernel, a 4-byte readback) whenever the logits are a Tensor and
top_k <= 256; the uniform number of each draw comes from a NumPy Generator seeded with `seed`,
so a seed reproduces its tokens. `sample_row` is the host fallback (NumPy arrays, top_k > 256).
Both follow Hugging Face's conventions; they may pick different tokens for the same seed
because they walk the candidates in different orders.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

import tensorgpu as tg

GPU_MAX_TOP_K = 256   # tensorgpu.kernels.sampling.KCAP


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, seed: Optional[int] = None):
        if temperature is None or not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (0 or None: off), got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if repetition_penalty is not None and not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
        self.temperature = float(temperature)
        self.top_k = int(top_k) if top_k else None
        self.top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
        self.penalty = float(repetition_penalty) if repetition_penalty not in (None, 1.0) else None
        self.rng = np.random.default_rng(seed)

    @property
    def on_gpu(self) -> bool:
        """Sampling runs inside the captured GPU decode step (top_k within the kernel's cap)."""
        return (self.top_k or 0) <= GPU_MAX_TOP_K

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def pick(self, logits: tg.Tensor, history: Sequence[int] = ()) -> int:
        """The next token from the last row of `logits` ([T, vocab] tensor or array)."""
        if isinstance(logits, tg.Tensor) and (self.top_k or 0) <= GPU_MAX_TOP_K:
            prev = None
            if self.penalty is not None and len(history):
                prev = tg.tensor(np.asarray(history, dtype=np.int32))
            if self.greedy:
                return int(tg.nn.sample(logits, repetition_penalty=self.penalty if prev is not None else None,
                                        prev_tokens=prev).item())
            return int(tg.nn.sample(logits, self.temperature, self.top_k or 0, self.top_p or 1.0, u=self.rng.random(),
                                    repetition_penalty=self.penalty if prev is not None else None,
                                    prev_tokens=prev).item())
        row = (logits[-1].numpy() if isinstance(logits, tg.Tensor) else np.asarray(logits)[-1]).astype(np.float64)
        return sample_row(row, history, self.temperature, self.top_k, self.top_p, self.penalty, self.rng)


def sample_row(row: np.ndarray, history: Sequence[int], temperature: float, top_k: Optional[int],
               top_p: Optional[float], penalty: Optional[float], rng: np.random.Generator) -> int:
    """Host sampling over one float64 row of logits (modified in place)."""
    if penalty is not None and len(history):
        seen = np.unique(np.asarray(history, dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < row.size)]
        v = row[seen]
        row[seen] = np.where(v > 0, v / penalty, v * penalty)  # CTRL / HF convention
    if temperature == 0.0 or top_k == 1:
        return int(np.argmax(row))
    row = row / temperature
    if top_k is not None and top_k < row.size:
        kth = np.partition(row, -top_k)[-top_k]
        row = np.where(row >= kth, row, -np.inf)
    row = row - row.max()
    p = np.exp(row)
    p /= p.sum()
    if top_p is not None:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = int(np.searchsorted(csum, top_p)) + 1   # the smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[:keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), row.size - 1))
