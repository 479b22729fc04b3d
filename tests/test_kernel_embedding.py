"""embedding gather against NumPy indexing (and gguf.quants.dequantize for block tables)."""
import numpy as np
import pytest

from nn_kernel_util import AffineGelu, paths, read_f32  # noqa: F401
from tensorgpu import dtypes, runtime
from tensorgpu.kernels.embedding import embedding

rng = np.random.default_rng(9)


def ref_gather(table, ids):
    ok = (ids >= 0) & (ids < table.shape[0])
    return np.where(ok[:, None], table[np.clip(ids, 0, table.shape[0] - 1)].astype(np.float32), 0.0)


def run(table_bytes, dt, ids, vocab, dim, n=None, **kw):
    n = len(ids) if n is None else n
    out = runtime.Buffer(4 * n * dim)
    embedding(out, runtime.upload(ids.astype(np.int32)), runtime.upload(table_bytes), dt, n, vocab, dim, **kw)
    return read_f32(out, n * dim, (n, dim))


IDS = np.array([3, 0, 49, -1, 50, 7, 7, 2**31 - 1], np.int32)   # -1, 50, 2^31-1 are out of range


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("dim", [64, 7, 1])
def test_float_tables(paths, np_dtype, dim):
    table = rng.standard_normal((50, dim)).astype(np_dtype)
    got = run(table, dtypes.from_numpy(np_dtype), IDS, 50, dim)
    np.testing.assert_array_equal(got, ref_gather(table, IDS))


def test_offsets_and_epilogue(paths):
    table = rng.standard_normal((20, 16)).astype(np.float16)
    pad = np.concatenate([np.zeros(3, np.float16), table.reshape(-1)])     # table starts at element 3
    ids = np.array([99, 99, 4, 19, 0], np.int32)
    got = run(pad, dtypes.float16, ids, 20, 16, n=3, ids_offset=2, table_offset=3)
    np.testing.assert_array_equal(got, ref_gather(table, ids[2:]))
    ep = AffineGelu(rng.standard_normal(16), scale=2.0, gelu=False)
    out = runtime.Buffer(4 * 3 * 16)
    embedding(out, runtime.upload(ids[2:]), runtime.upload(table), dtypes.float16, 3, 20, 16, epilogue=ep)
    np.testing.assert_allclose(read_f32(out, 48, (3, 16)), ep.ref(ref_gather(table, ids[2:])), rtol=1e-6)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q5_1", "bfloat16", "q4_k", "q5_k", "q6_k"])
def test_quant_tables(name):
    gq = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as QT
    qt = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q5_1": QT.Q5_1, "bfloat16": QT.BF16,
          "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K}[name]
    dt = getattr(dtypes, name)
    vocab, dim = 12, (256 if name.endswith("_k") else 96)
    if name.endswith("_k"):   # gguf cannot quantize k-quants: random blocks with small f16 scales
        blocks = rng.integers(0, 256, size=(vocab * dim // dt.block_size, dt.block_bytes), dtype=np.uint8)
        # the f16 super-block scales (d, dmin or d) sit in the first 4 bytes (q4_k/q5_k) or last 2 (q6_k)
        sc = rng.uniform(-0.01, 0.01, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
        if name == "q6_k":
            blocks[:, -2:] = sc[:, :2]
        else:
            blocks[:, :4] = sc
        raw = blocks.reshape(-1)
    else:
        raw = gq.quantize(rng.standard_normal((vocab, dim)).astype(np.float32), qt).view(np.uint8).reshape(-1)
    table = gq.dequantize(raw, qt).reshape(vocab, dim)
    ids = np.array([11, 0, -3, 5, 12, 5], np.int32)
    got = run(raw, dt, ids, vocab, dim)
    np.testing.assert_array_equal(got, ref_gather(table, ids))


def test_errors():
    t = runtime.upload(np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match="table buffer"):
        embedding(runtime.Buffer(64), runtime.upload(np.zeros(2, np.int32)), t, dtypes.float32, 2, 5, 8)
    with pytest.raises(ValueError, match="ids"):
        embedding(runtime.Buffer(64), runtime.upload(np.zeros(1, np.int32)), t, dtypes.float32, 2, 4, 8)
    with pytest.raises(ValueError, match="whole number"):
        embedding(runtime.Buffer(64), runtime.upload(np.zeros(1, np.int32)), runtime.Buffer(1024),
                  dtypes.q8_0, 1, 2, 48)
    with pytest.raises(TypeError, match="not a float"):
        embedding(runtime.Buffer(64), runtime.upload(np.zeros(1, np.int32)), t, dtypes.int32, 1, 4, 8)
