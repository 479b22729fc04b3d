"""The row kernels behind cumsum, argsort / sort / topk, and the gather / scatter of
indexing, against this adapter's own copy bandwidth in the same run.

  cumsum_rows   [rows, n] f32 -> f32 prefix sums          GB/s = (read + write) / time, % of copy BW
  argsort_rows  [rows, n] f32 -> int32 positions (bitonic, one workgroup per row)   rows/s, us
  topk          [1, vocab] f32 logits, k = 40 (chunked narrowing past one workgroup)  us, dispatches
  scatter       the batched KV-cache write put_along_axis(cache[:B], pos, k, axis=2): one kernel over
                the B x H x D written elements (f16 cache)   us, GB/s of the rows written
  gather        take_along_axis of 4096 rows out of a [vocab, dim] table   GB/s of the rows read

Small sizes by default (lavapipe); large ones with TENSORGPU_BENCH_FULL=1. Every result is
checked against NumPy before it is timed. Timing: GPU timestamps around R repetitions of the
recorded dispatches (probe.gpu_time_per_dispatch), as bench_nn.py.
"""
import os

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu.kernels.probe import recorded
from tensorgpu import dtypes, runtime
from tensorgpu.kernels import probe
from tensorgpu.kernels.common import Operand
from tensorgpu.kernels.scan import cumsum_rows
from tensorgpu.kernels.sort import argsort_rows, max_row

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
SCAN = [(4096, 4096), (1, 1 << 21)] if FULL else [(64, 1024), (1, 1 << 16)]
SORT = [(4096, 2048), (32768, 256)] if FULL else [(256, 1024), (2048, 64)]
VOCAB = 151936 if FULL else 32000
KV = (64, 8, 4096, 128, 32) if FULL else (8, 4, 256, 64, 4)     # (slots S, heads H, L, D, batch B)
COPY_BYTES = (256 << 20) if FULL else (4 << 20)

rng = np.random.default_rng(0)




def measure(benchmark, dispatches, nbytes=None, items=None) -> float:
    t = probe.bench_dispatches(benchmark, dispatches)
    info = {"us": t * 1e6, "dispatches": len(dispatches), "timestamps": probe.has_timestamps(),
            "device": runtime.get_device().name}
    if nbytes is not None:
        copy = probe.copy_bandwidth(COPY_BYTES)
        info.update({"bytes": nbytes, "GB/s": nbytes / t / 1e9, "pct_of_copy": 100 * nbytes / t / copy})
    if items is not None:
        info["items/s"] = items / t
    benchmark.extra_info.update(info)
    print("\n" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    return t


@pytest.mark.parametrize("rows,n", SCAN, ids=str)
def test_cumsum(benchmark, rows, n):
    x = rng.standard_normal((rows, n)).astype(np.float32)
    xb, out = runtime.upload(x), runtime.Buffer(4 * rows * n)
    ds = recorded(lambda: cumsum_rows(out, Operand(xb, dtypes.float32, (rows, n), (n, 1)), rows, n))
    got = np.frombuffer(runtime.read(out, 0, 4 * n), np.float32)
    assert np.allclose(got, np.cumsum(x[0].astype(np.float64)), rtol=1e-4, atol=1e-3)
    measure(benchmark, ds, nbytes=2 * 4 * rows * n)


@pytest.mark.parametrize("rows,n", SORT, ids=str)
def test_argsort(benchmark, rows, n):
    assert n <= max_row()
    x = rng.standard_normal((rows, n)).astype(np.float32)
    xb, out = runtime.upload(x), runtime.Buffer(4 * rows * n)
    ds = recorded(lambda: argsort_rows(out, Operand(xb, dtypes.float32, (rows, n), (n, 1)), rows, n))
    got = np.frombuffer(runtime.read(out, 0, 4 * n), np.int32)
    assert np.array_equal(got, np.argsort(x[0], kind="stable"))
    measure(benchmark, ds, items=rows * n)


def test_topk_vocab(benchmark):
    logits = tg.tensor(rng.standard_normal((1, VOCAB)).astype(np.float32)).realize()
    runtime.flush()
    holder = {}
    ds = recorded(lambda: holder.setdefault("r", [t.realize() for t in logits.topk(40)]))
    v, i = holder["r"]
    want = np.argsort(-logits.numpy()[0], kind="stable")[:40]
    assert np.array_equal(i.numpy()[0], want)
    measure(benchmark, ds, items=VOCAB)


def test_kv_cache_scatter(benchmark):
    S, H, L, D, B = KV
    cache = tg.tensor(np.zeros((S, H, L, D), np.float16))
    k = tg.tensor(rng.standard_normal((B, H, D)).astype(np.float32)).realize()
    pos = tg.tensor(rng.integers(0, L, B).astype(np.int32)).realize()
    runtime.flush()
    ds = recorded(lambda: (tg.put_along_axis(cache[:B], pos[:, None, None, None], k[:, :, None, :], axis=2),
                           cache.realize()))
    assert len(ds) == 1
    row = cache.numpy()[np.arange(B), :, pos.numpy()]
    assert np.array_equal(row, k.numpy().astype(np.float16))
    measure(benchmark, ds, nbytes=B * H * D * (4 + 2 + 4))


def test_gather_rows(benchmark):
    V, dim, n = (VOCAB, 4096 if FULL else 256, 4096 if FULL else 512)
    table = tg.tensor(rng.standard_normal((V, dim)).astype(np.float32)).realize()
    ids = tg.tensor(rng.integers(0, V, n).astype(np.int32)).realize()
    runtime.flush()
    holder = {}
    ds = recorded(lambda: holder.setdefault("r", table[ids].realize()))
    assert np.array_equal(holder["r"].numpy(), table.numpy()[ids.numpy()])
    measure(benchmark, ds, nbytes=2 * 4 * n * dim)
