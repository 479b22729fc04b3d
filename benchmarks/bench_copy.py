"""The adapter's practical limits, which every other benchmark is compared to:
copy bandwidth of a trivial vec4 WGSL kernel (GB/s, read + write bytes) and f32 FMA peak
(GFLOP/s). Small sizes by default (lavapipe); the H100 sizes with TENSORGPU_BENCH_FULL=1.

Timing (tensorgpu.kernels.probe): 300 ms of back-to-back GPU work first (the H100 drops its
clocks on bursty work), then GPU timestamps around one compute pass of R copies of the dispatch.
pytest-benchmark's own table times R queued dispatches + one sync (wall clock, CPU included);
the headline figures are in extra_info (and printed with -s).
"""
import os

import numpy as np
import pytest

from tensorgpu import runtime
from tensorgpu.kernels import probe

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")

COPY_SIZES = [64 << 20, 256 << 20] if FULL else [4 << 20]
FMA_SHAPES = [(2048, 2048)] if FULL else [(8, 64)]   # (workgroups of 256 threads, iterations)


def _wall_min(benchmark) -> float:
    stats = getattr(benchmark, "stats", None)   # None under --benchmark-disable
    return stats.stats.min if stats else float("nan")


def record(benchmark, dispatches, reps: int = 10) -> float:
    """GPU seconds per repetition of `dispatches`; also lets pytest-benchmark time `reps` replays
    plus a sync (wall clock) for its table, and stores both in extra_info."""
    t = probe.bench_dispatches(benchmark, dispatches, reps)
    benchmark.extra_info.update({"us_per_dispatch": t * 1e6,
                                 "wall_us_per_dispatch": _wall_min(benchmark) / reps * 1e6,
                                 "timestamps": probe.has_timestamps(),
                                 "device": runtime.get_device().name, "clocks": probe.gpu_clocks()})
    return t


@pytest.mark.parametrize("nbytes", COPY_SIZES, ids=lambda n: f"{n >> 20}MiB")
def test_copy_bandwidth(benchmark, nbytes):
    src = runtime.upload(np.arange(nbytes // 4, dtype=np.float32))
    dst = runtime.Buffer(nbytes)
    d = probe.copy(dst, src, nbytes)
    head = np.frombuffer(runtime.read(dst, 0, 64), np.float32)
    assert np.array_equal(head, np.arange(16, dtype=np.float32))
    t = record(benchmark, [d])
    benchmark.extra_info.update({"bytes_moved": 2 * nbytes, "GB/s": 2 * nbytes / t / 1e9})
    print(f"\ncopy {nbytes >> 20} MiB: {2 * nbytes / t / 1e9:.1f} GB/s ({t * 1e6:.1f} us)")


@pytest.mark.parametrize("workgroups,iters", FMA_SHAPES, ids=lambda x: str(x))
def test_fma_peak(benchmark, workgroups, iters):
    buf = runtime.upload(np.array([0.9999, 1e-4, 0.0, 0.0], np.float32))
    flops, d = probe.fma_peak(buf, workgroups, iters)
    t = record(benchmark, [d], reps=4)
    benchmark.extra_info.update({"flop": flops, "GFLOP/s": flops / t / 1e9})
    print(f"\nfma peak {workgroups}x256 threads x {iters}: {flops / t / 1e9:.1f} GFLOP/s ({t * 1e6:.1f} us)")
