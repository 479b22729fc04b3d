"""A prompt's q, k and v projections (TinyLlama-1.1B: x [M, 2048] times q [2048, 2048], k and v
[256, 2048]) as three matmuls against one stacked matmul (kernels/matmul.py's b_parts,
rewrites.stack_sibling_matmuls), f16 and q8_0 weights.

Why it can be faster: k and v have 256 columns, too few output tiles for a GPU, so the cost
model splits K 8 ways (a partial-sum pass and a reduce dispatch each); stacked, the 2560
columns fill it with the big tiles and one split. The FLOPs are the same, so the figure is
GFLOP/s of each form and stacked/separate. M = 512 with TENSORGPU_BENCH_FULL=1 (the GPU
machine), else 32 (lavapipe).

Also pythia's attention output and MLP down projections, two matmuls against one over the
concatenated K (k_parts; test_output_and_down_projections).
"""
import os

import numpy as np
import pytest

from tensorgpu import dtypes, runtime
from tensorgpu.kernels import matmul as mm, quant
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels import probe
from tensorgpu.kernels.probe import bench_dispatches, recorded
from tensorgpu.testing import random_blocks

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
M, K, NS = (512 if FULL else 32), 2048, (2048, 256, 256)




def _run(L) -> None:
    """Queue a matmul Launch: its pass and any split-K reduce after it."""
    for p in L.passes:
        runtime.dispatch(*p)


def _forms(kind):
    rng = np.random.default_rng(0)
    x = runtime.upload(rng.standard_normal((M, K)).astype(np.float32))
    xo = Operand(x, dtypes.float32, (M, K), (K, 1), 0)
    outs = [runtime.Buffer(4 * M * n) for n in NS]
    stacked = runtime.Buffer(4 * M * sum(NS))
    if kind == "f16":
        ws = [runtime.upload((rng.standard_normal((n, K)) * 0.05).astype(np.float16)) for n in NS]
        bs = [Operand(w, dtypes.float16, (K, n), (1, K), 0) for w, n in zip(ws, NS)]

        def separate():
            for o, b in zip(outs, bs):
                mm.matmul(o, xo, b)

        def stack():
            _run(mm.plan(stacked, xo, bs[0], b_parts=[(b, None) for b in bs[1:]]))
    else:
        dt = dtypes.as_dtype(kind)
        ws = [runtime.upload(random_blocks(kind, (n, K), 0.05, rng)) for n in NS]

        def separate():
            for o, w, n in zip(outs, ws, NS):
                quant.quant_matmul(o, xo, w, dt, n, K)

        def stack():
            for p in quant.plan_stacked_matmul(stacked, xo, ws, dt, NS, K).passes:
                runtime.dispatch(*p)
    return {"separate": separate, "stacked": stack}


def _interleaved(ds_a, ds_b, rounds: int = 6) -> tuple:
    """GPU seconds per call of two dispatch lists, timed alternately (min of `rounds`), so a
    shared machine's load falls on both alike."""
    one = max(probe.gpu_time(ds_a, 1), 1e-6) if probe.has_timestamps() else None
    if one is None:      # no timestamps: wall clock of each, alternately
        a = b = float("inf")
        for _ in range(rounds):
            a = min(a, probe.time_per_dispatch(lambda: runtime.replay(ds_a), rounds=1))
            b = min(b, probe.time_per_dispatch(lambda: runtime.replay(ds_b), rounds=1))
        return a, b
    reps = max(1, min(50, int(0.05 / one)))
    a = b = float("inf")
    for _ in range(rounds):
        a = min(a, probe.gpu_time(ds_a, reps) / reps)
        b = min(b, probe.gpu_time(ds_b, reps) / reps)
    return a, b


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_qkv_projections(benchmark, kind):
    forms = _forms(kind)
    sep_ds, stk_ds = recorded(forms["separate"]), recorded(forms["stacked"])
    runtime.sync()
    sep, stk = _interleaved(sep_ds, stk_ds)
    bench_dispatches(benchmark, stk_ds, reps=2)      # the table: wall clock of stacked replays
    flops = 2 * M * K * sum(NS)
    benchmark.extra_info.update({"M": M, "K": K, "N": list(NS), "dispatches": [len(sep_ds), len(stk_ds)],
                                 "separate_ms": sep * 1e3, "stacked_ms": stk * 1e3,
                                 "separate_GFLOP/s": flops / sep / 1e9, "stacked_GFLOP/s": flops / stk / 1e9,
                                 "stacked_speedup": sep / stk, "device": runtime.get_device().name})
    print(f"\nq/k/v {kind} M={M}: separate ({len(sep_ds)} dispatches) {sep * 1e3:.2f} ms "
          f"({flops / sep / 1e9:.1f} GFLOP/s), stacked ({len(stk_ds)}) {stk * 1e3:.2f} ms "
          f"({flops / stk / 1e9:.1f} GFLOP/s): {sep / stk:.2f}x")


# GPT-NeoX's attention output and MLP down projections, summed into the residual (pythia-1.4b:
# a [M, 2048] @ Wo.T [2048, 2048] + u [M, 8192] @ Wd.T [8192, 2048]): two matmuls (each with its
# split-K reduce when it splits) against one over the concatenated K (matmul's k_parts,
# rewrites.pair_matmuls_in_sum). M = 64 (a batched decode step) and 512 on the GPU machine.
PAIR_KS, PAIR_N = (2048, 8192), 2048
PAIR_M = [64, 512] if FULL else [32]


def _pair_forms(kind, Mp):
    rng = np.random.default_rng(1)
    xs = [runtime.upload(rng.standard_normal((Mp, k)).astype(np.float32)) for k in PAIR_KS]
    xo = [Operand(x, dtypes.float32, (Mp, k), (k, 1), 0) for x, k in zip(xs, PAIR_KS)]
    outs = [runtime.Buffer(4 * Mp * PAIR_N) for _ in PAIR_KS]
    paired = runtime.Buffer(4 * Mp * PAIR_N)
    if kind == "f16":
        ws = [runtime.upload((rng.standard_normal((PAIR_N, k)) * 0.02).astype(np.float16)) for k in PAIR_KS]
        bs = [Operand(w, dtypes.float16, (k, PAIR_N), (1, k), 0) for w, k in zip(ws, PAIR_KS)]

        def separate():
            for o, x, b in zip(outs, xo, bs):
                mm.matmul(o, x, b)

        def pair():
            _run(mm.plan(paired, xo[0], bs[0], k_parts=[(xo[1], bs[1], None)]))
    else:
        dt = dtypes.as_dtype(kind)
        ws = [runtime.upload(random_blocks(kind, (PAIR_N, k), 0.02, rng)) for k in PAIR_KS]

        def separate():
            for o, x, w, k in zip(outs, xo, ws, PAIR_KS):
                quant.quant_matmul(o, x, w, dt, PAIR_N, k)

        def pair():
            for p in quant.plan_paired_matmul(paired, xo, ws, dt, PAIR_N, PAIR_KS).passes:
                runtime.dispatch(*p)
    return separate, pair


@pytest.mark.parametrize("Mp", PAIR_M)
@pytest.mark.parametrize("kind", ["f16", "q4_0"])
def test_output_and_down_projections(benchmark, kind, Mp):
    separate, pair = _pair_forms(kind, Mp)
    sep_ds, pair_ds = recorded(separate), recorded(pair)
    runtime.sync()
    sep, prd = _interleaved(sep_ds, pair_ds)
    bench_dispatches(benchmark, pair_ds, reps=2)
    flops = 2 * Mp * PAIR_N * sum(PAIR_KS)
    benchmark.extra_info.update({"M": Mp, "K": list(PAIR_KS), "N": PAIR_N, "dispatches": [len(sep_ds), len(pair_ds)],
                                 "separate_ms": sep * 1e3, "paired_ms": prd * 1e3, "paired_speedup": sep / prd,
                                 "device": runtime.get_device().name})
    print(f"\no + down {kind} M={Mp}: separate ({len(sep_ds)} dispatches) {sep * 1e3:.3f} ms "
          f"({flops / sep / 1e9:.1f} GFLOP/s), paired ({len(pair_ds)}) {prd * 1e3:.3f} ms "
          f"({flops / prd / 1e9:.1f} GFLOP/s): {sep / prd:.2f}x")
