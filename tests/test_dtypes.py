"""dtypes: astype between every pair of plain dtypes against NumPy (float->int truncates toward
zero, int<->uint wraps, anything->bool is `!= 0` with NaN true, float32->float16 rounds to
nearest even and overflows to inf), float16 storage on both code paths (shader-f16 and packed
u32 words read with unpack2x16float) at odd sizes and odd offsets, and promotion rules.
Conversions are exact: every comparison here is bit-for-bit (NaN equals NaN).
"""
import numpy as np
import pytest

import tensorgpu as tg
from core_util import PLAIN, TG_TO_NP, check, f16_path, kernels, options  # noqa: F401  (fixture)

VALUES = {
    tg.float32: np.array([-2.7, -1.5, -0.5, -0.0, 0.0, 0.4, 0.5, 1.5, 2.7, 100.9, 65504.0, 1e-3, 3.0, -7.0], np.float32),
    tg.float16: np.array([-2.7, -1.5, -0.5, -0.0, 0.0, 0.4, 0.5, 1.5, 2.7, 100.9, 65504.0, 1e-3, 3.0, -7.0], np.float16),
    tg.int32: np.array([-2**31, -70000, -3, -1, 0, 1, 2, 3, 65504, 70000, 2**31 - 1, 2049, 2051, 16777217], np.int32),
    tg.uint32: np.array([0, 1, 2, 3, 255, 65504, 70000, 2**31, 2**32 - 1, 2049, 2051, 16777217, 7, 8], np.uint32),
    tg.bool: np.array([True, False, True, True, False, False, True, False, True, True, False, True, False, True]),
}


def _valid(src, dst, v):
    """Values whose conversion NumPy defines (float -> int out of range is undefined behaviour in C)."""
    if src in (tg.float32, tg.float16) and dst in (tg.int32, tg.uint32):
        lo = 0 if dst is tg.uint32 else -2**31
        ok = (v.astype(np.float64) > lo - 1) & (v.astype(np.float64) < 2**31 - 128)
        return v[ok]
    return v


@pytest.mark.parametrize("src", PLAIN, ids=lambda d: d.name)
@pytest.mark.parametrize("dst", PLAIN, ids=lambda d: d.name)
def test_astype_all_pairs(src, dst, f16_path):
    v = _valid(src, dst, VALUES[src])
    with np.errstate(all="ignore"):
        ref = v.astype(TG_TO_NP[dst])
    t = tg.tensor(v, src)
    check(t.astype(dst), ref)                 # a realized input
    check((t[::-1] + (0 if src is not tg.bool else False)).astype(dst)[::-1], ref)  # inside a chain, through a view
    check(tg.astype(t, dst), ref)


def test_astype_same_dtype_is_the_same_tensor():
    t = tg.tensor([1.0, 2.0])
    assert t.astype(tg.float32) is t
    assert t.astype("float32") is t and t.astype(np.float32) is t


def test_dtype_names_and_numpy_dtypes():
    for d in PLAIN:
        t = tg.zeros((2,), d)
        assert t.dtype is d and t.numpy().dtype == TG_TO_NP[d]
        assert tg.tensor([1], dtype=d.name).dtype is d
    assert tg.tensor([1.0], dtype=float).dtype is tg.float32
    assert tg.tensor([1], dtype=int).dtype is tg.int32
    assert tg.tensor([1], dtype=bool).dtype is tg.bool
    assert tg.tensor(np.zeros(2, np.float64)).dtype is tg.float32  # float64 is stored as float32
    assert repr(tg.float16) == "tg.float16"


def test_float_to_int_truncates_toward_zero():
    x = np.array([-2.9, -2.5, -2.1, -0.9, -0.1, 0.1, 0.9, 2.1, 2.5, 2.9, 1e6 + 0.5], np.float32)
    check(tg.tensor(x).astype(tg.int32), x.astype(np.int32))
    check((tg.tensor(x) * 1).astype(tg.int32), np.trunc(x).astype(np.int32))
    check(tg.tensor(x[5:]).astype(tg.uint32), x[5:].astype(np.uint32))


def test_to_bool_treats_nan_as_true():
    x = np.array([np.nan, 0.0, -0.0, np.inf, 1e-30, -1.0], np.float32)
    check(tg.tensor(x).astype(tg.bool), x.astype(bool))
    check((tg.tensor(x) + 0).astype(tg.bool), x.astype(bool))
    check(tg.tensor(x.astype(np.float16)).astype(tg.bool), x.astype(np.float16).astype(bool))


def test_float32_to_float16_rounding_and_overflow(f16_path):
    """Round to nearest even like NumPy; beyond float16's range: +-inf (NumPy's result; WGSL
    leaves out-of-range conversions indeterminate, Vulkan drivers give inf)."""
    x = np.array([2049.0, 2051.0, 0.1, 1 / 3, 65504.0, 65519.0, 65520.0, 70000.0, -70000.0, np.inf, -np.inf,
                  np.nan, 1e-8, 3e-5, -0.0, 6e-8], np.float32)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16)
    check(tg.tensor(x).astype(tg.float16), ref)
    check((tg.tensor(x) * 1).astype(tg.float16), ref)


def test_float16_special_values_round_trip(f16_path):
    h = np.array([np.inf, -np.inf, np.nan, 6e-8, -6e-8, 65504, 1e-5, -0.0, 0.5, 1000.5], np.float16)
    t = tg.tensor(h)
    check(t, h)
    check(t.astype(tg.float32), h.astype(np.float32))
    check(t * 1, h)
    check(t[1::2].astype(tg.float32), h[1::2].astype(np.float32))   # odd offset: the high half of a word
    check(t[::-3], h[::-3])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 257, 1023])
def test_float16_chains_odd_sizes(n, f16_path):
    r = np.random.default_rng(n)
    a = r.standard_normal(n).astype(np.float16)
    b = r.standard_normal(n).astype(np.float16)
    ta, tb = tg.tensor(a), tg.tensor(b)
    out = (ta * tb + 1).exp() - tb
    assert out.dtype is tg.float16
    ref = (np.exp(a.astype(np.float32) * b + 1) - b).astype(np.float16)
    np.testing.assert_allclose(out.numpy().astype(np.float32), ref.astype(np.float32), rtol=2e-3, atol=1e-3)
    check(ta[1:] + tb[:-1], (a[1:].astype(np.float32) + b[:-1]).astype(np.float16))  # odd offsets on both reads
    check(ta.astype(tg.float32) * 2, a.astype(np.float32) * 2)
    check((ta.astype(tg.float32) * 0.5).astype(tg.float16), (a.astype(np.float32) * 0.5).astype(np.float16))
    m = (ta.reshape(1, n).expand(3, n) * tg.tensor(np.array([[1], [2], [3]], np.float16)))[:, ::-1]
    check(m, (a[None] * np.array([[1], [2], [3]], np.float16))[:, ::-1])


def test_float16_2d_views(f16_path):
    x = np.arange(35, dtype=np.float16).reshape(5, 7) / 8
    t = tg.tensor(x)
    check(t.T * 2, x.T * 2)
    check(t[1:, 1::2] - t[:-1, :-1:2], x[1:, 1::2] - x[:-1, :-1:2])
    check(t[None, :, 3].expand(2, 5), np.broadcast_to(x[None, :, 3], (2, 5)))
    check(tg.cat([t[:, :3], t[:, 4:]], 1), np.concatenate([x[:, :3], x[:, 4:]], 1))


def test_packed_float16_code_path_is_used():
    h = tg.tensor(np.arange(5, dtype=np.float16))
    with options(use_f16=False):
        log = kernels(lambda: (h * 2).realize())
    assert "unpack2x16float" in log[0].wgsl and "enable f16" not in log[0].wgsl


# ----------------------------------------------------------------------------- promotion


PROMOTION = [
    (tg.bool, tg.bool, tg.bool), (tg.bool, tg.int32, tg.int32), (tg.bool, tg.uint32, tg.uint32),
    (tg.bool, tg.float16, tg.float16), (tg.bool, tg.float32, tg.float32), (tg.uint32, tg.uint32, tg.uint32),
    (tg.uint32, tg.int32, tg.int32),     # NumPy: int64, stored as int32
    (tg.int32, tg.float32, tg.float32),  # NumPy: float64, stored as float32
    (tg.float16, tg.float32, tg.float32), (tg.float16, tg.float16, tg.float16),
    (tg.int32, tg.float16, tg.float16),  # NumPy: float64 (documented deviation, as PyTorch)
]


@pytest.mark.parametrize("a,b,want", PROMOTION, ids=lambda d: d.name)
def test_binary_promotion(a, b, want):
    x, y = tg.ones((2,), a), tg.ones((2,), b)
    assert (x + y).dtype is want and (y + x).dtype is want
    assert (x * y).dtype is want
    assert tg.where(tg.ones((2,), tg.bool), x, y).dtype is want
    assert tg.cat([x, y]).dtype is want
    assert (x < y).dtype is tg.bool
    assert (x / y).dtype is (want if want in (tg.float16, tg.float32) else tg.float32)


def test_float16_cast_inside_a_chain_rounds(f16_path):
    """astype(float16) in the middle of a fused expression rounds, as NumPy does."""
    x = np.array([0.1, 1 / 3, 2049, 2051, 1e-6, -7.3], np.float32)
    t = tg.tensor(x)
    check(t.astype(tg.float16).astype(tg.float32) - t, x.astype(np.float16).astype(np.float32) - x)
    i = np.array([2049, 4097, -2051], np.int32)
    check(tg.tensor(i).astype(tg.float16).astype(tg.float32), i.astype(np.float16).astype(np.float32))
    check((t * 3).astype(tg.float16) * 1.0, ((x * 3).astype(np.float16).astype(np.float32) * 1.0).astype(np.float16))
