"""Row kernels (schedule.RowCores): RMSNorm and softmax in plain ops as one kernel with a
workgroup per row, against the same math as a reduction kernel plus an elementwise kernel (the
row sums realized in between, what the fuser did before).

Shapes: a prefill's RMSNorm, [512, 2048] float32 (TinyLlama's width; [128, 2048] on lavapipe),
and a softmax over [512, 2048]. Bytes: the fused kernel reads x twice (the second read mostly
from cache) and writes y: 12 B/element counted; the split form also writes and reads the
[rows, 1] sums (negligible) but reads x in two kernels.

extra_info: GPU ms per call (timestamps, or wall clock without them), GB/s at 12 B/element,
and the fused/split ratio.
"""
import os

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime
from tensorgpu.kernels.probe import bench_dispatches, recorded

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
ROWS, C = (512 if FULL else 128), 2048




def rms_fused(x, w):
    return tg.nn.rms_norm(x, w, 1e-5).realize()


def rms_split(x, w):
    s = ((x * x).mean(-1, keepdims=True) + 1e-5).realize()      # the reduction in its own kernel
    return (x * s.rsqrt() * w).realize()


def softmax_fused(x):
    e = (x - x.max(-1, keepdims=True)).exp()
    return (e / e.sum(-1, keepdims=True)).realize()


def softmax_split(x):
    m = x.max(-1, keepdims=True).realize()
    e = (x - m).exp()
    s = e.sum(-1, keepdims=True).realize()
    return (e / s).realize()


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(0)
    xn = r.standard_normal((ROWS, C), dtype=np.float32)
    wn = r.standard_normal(C, dtype=np.float32)
    return xn, wn, tg.tensor(xn), tg.tensor(wn)


_GPU = {}


@pytest.mark.parametrize("form", ["fused", "split"])
@pytest.mark.parametrize("what", ["rms_norm", "softmax"])
def test_row_kernel(benchmark, data, what, form):
    xn, wn, x, w = data
    fn = {("rms_norm", "fused"): lambda: rms_fused(x, w), ("rms_norm", "split"): lambda: rms_split(x, w),
          ("softmax", "fused"): lambda: softmax_fused(x), ("softmax", "split"): lambda: softmax_split(x)}[(what, form)]
    with tg.debug.kernel_log() as log:
        got = fn().numpy()
    want = (xn / np.sqrt((xn.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * wn if what == "rms_norm"
            else np.exp(xn - xn.max(-1, keepdims=True)) / np.exp(xn - xn.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (len(log) == 1) == (form == "fused"), [e.name for e in log]
    gpu = bench_dispatches(benchmark, recorded(fn))
    _GPU[(what, form)] = gpu
    benchmark.extra_info.update({"rows": ROWS, "cols": C, "kernels": len(log), "gpu_ms": gpu * 1e3,
                                 "GB/s": 12 * ROWS * C / gpu / 1e9, "device": runtime.get_device().name})
    other = _GPU.get((what, "fused" if form == "split" else "split"))
    if other is not None:
        fused, split = (gpu, other) if form == "fused" else (other, gpu)
        benchmark.extra_info["split_over_fused"] = split / fused
        print(f"\n{what} [{ROWS}, {C}]: fused {fused * 1e3:.3f} ms, split {split * 1e3:.3f} ms GPU "
              f"({split / fused:.2f}x)")
