"""Batched on-GPU sampling (kernels/sampling.py: sample_rows): one workgroup per row, every row
with its own parameters, against the one-row kernel dispatched once per row.

Sizes: B = 1, 16, 64 rows of V = 50304 with TENSORGPU_BENCH_FULL=1 (the GPU machine; pythia's
padded vocabulary), V = 4096 otherwise (lavapipe). Modes:
  greedy      every row temperature 0
  mixed       rows cycle through greedy, top-k 40 + top-p 0.9, top-p 0.9, min-p 0.05, full
              vocabulary (what a serving batch looks like)
  mixed_lp5   mixed + the top-5 log-probabilities + the count-table bump
  one row per kernel (B = 16, mixed) the one-row `sample` kernel dispatched B times, parameters
              baked (it has no min_p: those rows draw from the full vocabulary)
Reported: us per step (GPU timestamps around R repetitions, after a 300 ms warm-up:
probe.bench_dispatches) and us per row. Every result is checked against the reference first.
"""
import os

import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels import probe
from tensorgpu.kernels.probe import recorded
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.sampling import sample, sample_reference, sample_row_reference, sample_rows

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
VOCAB = 50304 if FULL else 4096
rng = np.random.default_rng(0)

# (temperature, top_k, top_p, min_p) cycled over the rows of a "mixed" batch
MIXED = [(0.0, 0, 1.0, 0.0), (0.8, 40, 0.9, 0.0), (0.8, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (1.0, 0, 1.0, 0.0)]




def settings(B: int, mode: str) -> np.ndarray:
    rows = [MIXED[0]] * B if mode == "greedy" else [MIXED[r % len(MIXED)] for r in range(B)]
    return np.array(rows, np.float64)


def report(benchmark, ds, B: int, reps: int = 10) -> None:
    t = probe.bench_dispatches(benchmark, ds, reps)
    info = {"us": t * 1e6, "us_per_row": t * 1e6 / B, "rows": B, "vocab": VOCAB, "dispatches": len(ds),
            "timestamps": probe.has_timestamps(), "device": runtime.get_device().name}
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


@pytest.mark.parametrize("mode", ["greedy", "mixed", "mixed_lp5"])
@pytest.mark.parametrize("B", [1, 16, 64])
def test_sample_rows(benchmark, B, mode):
    L = (rng.standard_normal((B, VOCAB)) * 3).astype(np.float32)
    s = settings(B, mode)
    U = rng.random(B).astype(np.float32)
    N = 5 if mode == "mixed_lp5" else 0
    f32 = lambda a: Operand(runtime.upload(np.asarray(a, np.float32)), dtypes.float32, (B,), (1,))  # noqa: E731
    params = dict(temperature=f32(s[:, 0]), top_p=f32(s[:, 2]), min_p=f32(s[:, 3]), u=f32(U),
                  top_k=Operand(runtime.upload(s[:, 1].astype(np.int32)), dtypes.int32, (B,), (1,)))
    counts = Operand(runtime.upload(np.zeros((B, VOCAB), np.int32)), dtypes.int32, (B, VOCAB), (VOCAB, 1)) \
        if N else None
    oi, of = runtime.Buffer(4 * B * (1 + N)), runtime.Buffer(4 * B * (1 + N))
    logits = Operand(runtime.upload(L), dtypes.float32, (B, VOCAB), (VOCAB, 1))
    ds = recorded(lambda: sample_rows(oi, of, logits, params, N, counts))
    got = np.frombuffer(runtime.read(oi), np.int32)[:B]
    want = [sample_row_reference(L[r], s[r, 0], int(s[r, 1]), s[r, 2], s[r, 3], U[r]) for r in range(B)]
    assert list(got) == want
    report(benchmark, ds, B)


def test_one_row_kernel_per_row(benchmark):
    """The baseline sample_rows replaces: B = 16 dispatches of the one-row kernel (parameters baked)."""
    B = 16
    L = (rng.standard_normal((B, VOCAB)) * 3).astype(np.float32)
    s = settings(B, "mixed")
    lb, u = runtime.upload(L), runtime.upload(np.array([0.37], np.float32))
    outs = [runtime.Buffer(4) for _ in range(B)]

    def enqueue():
        for r in range(B):
            sample(outs[r], lb, VOCAB, s[r, 0], int(s[r, 1]), s[r, 2], rand=u, logits_offset=r * VOCAB)

    ds = recorded(enqueue)
    got = [int(np.frombuffer(runtime.read(o), np.int32)[0]) for o in outs]
    assert got == [sample_reference(L[r], s[r, 0], int(s[r, 1]), s[r, 2], 0.37) for r in range(B)]
    report(benchmark, ds, B)
