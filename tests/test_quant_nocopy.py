"""Quantized weights stay quantized: x @ w.T and tg.nn.linear with a GGUF-quantized w decode the
blocks inside the kernel for one row (decode) and for many rows (prefill) — no float copy of
the weight is ever allocated (checked with tg.debug.stats())."""
import numpy as np
import pytest

import tensorgpu as tg


@pytest.fixture(scope="module")
def weights(tiny_neox_dir):
    f = tg.load_gguf(str(tiny_neox_dir / "tiny-neox-q4_0.gguf"), progress=False)
    return f.tensors["blk.0.ffn_up.weight"], f.tensors["blk.0.ffn_up.bias"]   # q4_0 [1024, 256], f32 [1024]


@pytest.mark.parametrize("rows", [1, 3, 300])
def test_no_float_copy_of_the_weight(weights, rows):
    w, b = weights
    N, K = w.shape
    assert w.dtype is tg.q4_0
    x = tg.randn((rows, K), seed=rows).realize()
    ref = x.numpy() @ w.numpy().T + b.numpy()
    tg.sync()
    s0 = tg.debug.stats()
    y = tg.nn.linear(x, w, b).realize()
    tg.sync()
    grown = tg.debug.stats()["bytes_allocated"] - s0["bytes_allocated"]
    out_bytes = rows * N * 4 * 9 // 8 + 4096          # the result (pool size classes round up <= 12.5%)
    assert grown - out_bytes < N * K * 2, f"{grown} bytes allocated: a float copy of the {N}x{K} weight?"
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
