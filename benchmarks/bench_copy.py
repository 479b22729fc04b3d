"""The adapter's practical limits, which every other benchmark is compared to:
copy bandwidth of a trivial vec4 WGSL kernel (GB/s, read + write bytes) and f32 FMA peak
(GFLOP/s). Small sizes by default (lavapipe); the H100 sizes with TENSORGPU_BENCH_FULL=1.

Timing: 300 ms warm-up of back-to-back dispatches, then per-dispatch GPU time from
[wall(2R dispatches) - wall(R dispatches)] / R, so the submit/readback overhead cancels
(tensorgpu.kernels.probe.time_per_dispatch).
"""
import functools
import os

import numpy as np
import pytest

from tensorgpu import runtime
from tensorgpu.kernels import probe

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")

COPY_SIZES = [64 << 20, 256 << 20] if FULL else [4 << 20]
FMA_SHAPES = [(2048, 2048)] if FULL else [(8, 64)]   # (workgroups of 256 threads, iterations)


def _record(benchmark, enqueue, reps):
    """Let pytest-benchmark time `reps` dispatches + one sync (its table includes the overhead);
    the headline figures go to extra_info."""
    def step():
        for _ in range(reps):
            enqueue()
        runtime.sync()
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("nbytes", COPY_SIZES, ids=lambda n: f"{n >> 20}MiB")
def test_copy_bandwidth(benchmark, nbytes):
    src = runtime.upload(np.arange(nbytes // 4, dtype=np.float32))
    dst = runtime.Buffer(nbytes)
    enqueue = functools.partial(probe.copy, dst, src, nbytes)
    probe.warm_up(enqueue)
    t = probe.time_per_dispatch(enqueue)
    head = np.frombuffer(runtime.read(dst, 0, 64), np.float32)
    assert np.array_equal(head, np.arange(16, dtype=np.float32))
    _record(benchmark, enqueue, 10)
    benchmark.extra_info.update({
        "bytes_moved": 2 * nbytes, "us_per_dispatch": t * 1e6, "GB/s": 2 * nbytes / t / 1e9,
        "device": runtime.get_device().name, "clocks": probe.gpu_clocks()})
    print(f"\ncopy {nbytes >> 20} MiB: {2 * nbytes / t / 1e9:.1f} GB/s ({t * 1e6:.1f} us)")


@pytest.mark.parametrize("workgroups,iters", FMA_SHAPES, ids=lambda x: str(x))
def test_fma_peak(benchmark, workgroups, iters):
    buf = runtime.upload(np.array([0.9999, 1e-4, 0.0, 0.0], np.float32))
    flops = probe.fma_peak(buf, workgroups, iters)
    enqueue = functools.partial(probe.fma_peak, buf, workgroups, iters)
    probe.warm_up(enqueue)
    t = probe.time_per_dispatch(enqueue)
    _record(benchmark, enqueue, 4)
    benchmark.extra_info.update({
        "flop": flops, "us_per_dispatch": t * 1e6, "GFLOP/s": flops / t / 1e9,
        "device": runtime.get_device().name, "clocks": probe.gpu_clocks()})
    print(f"\nfma peak {workgroups}x256 threads x {iters}: {flops / t / 1e9:.1f} GFLOP/s ({t * 1e6:.1f} us)")
