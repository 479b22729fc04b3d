"""Helpers shared by the core test files (test_tensor_ops, test_views, test_reductions,
test_fusion, test_errors, test_assign, test_dtypes): NumPy comparison with the dtype mapping
tensorgpu documents, fixtures that force the fallback code paths, and a guard asserting that
no GPU work happened.

Dtype mapping: tensorgpu holds float32/float16/int32/uint32/bool, so where NumPy's result is
float64 / int64 / uint64 the expected tensorgpu dtype is float32 / int32 / uint32.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime

TG_TO_NP = {tg.float32: np.float32, tg.float16: np.float16, tg.int32: np.int32, tg.uint32: np.uint32,
            tg.bool: np.bool_}
NP_TO_TG = {np.dtype(v): k for k, v in TG_TO_NP.items()}
PLAIN = [tg.float32, tg.float16, tg.int32, tg.uint32, tg.bool]


def tg_dtype_of(np_dtype) -> "tg.DType":
    """The tensorgpu dtype holding a NumPy result of `np_dtype` (float64 -> float32, int64 -> int32)."""
    d = np.dtype(np_dtype)
    if d == np.float64:
        return tg.float32
    if d.kind == "i":
        return tg.int32
    if d.kind == "u":
        return tg.uint32
    return NP_TO_TG[d]


def check(t, expected, rtol: float = 0.0, atol: float = 0.0, dtype=None):
    """t (a Tensor) equals `expected` (NumPy): same shape, the mapped dtype (or `dtype`), values
    within rtol/atol (NaN equals NaN, exact when both are 0)."""
    expected = np.asarray(expected)
    want_dtype = dtype if dtype is not None else tg_dtype_of(expected.dtype)
    assert t.dtype == want_dtype, f"dtype {t.dtype} != {want_dtype}"
    assert t.shape == expected.shape, f"shape {t.shape} != {expected.shape}"
    got = t.numpy()
    assert got.shape == expected.shape
    assert got.dtype == TG_TO_NP[want_dtype]
    if got.dtype.kind in "biu" and rtol == 0 and atol == 0:
        np.testing.assert_array_equal(got, expected.astype(got.dtype))
    else:
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                   equal_nan=True)
    return got


@contextlib.contextmanager
def options(**kw):
    """Temporarily set runtime.OPTIONS fields (use_f16, use_subgroups, max_storage_buffers)."""
    old = {k: getattr(runtime.OPTIONS, k) for k in kw}
    for k, v in kw.items():
        setattr(runtime.OPTIONS, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(runtime.OPTIONS, k, v)


@pytest.fixture(params=[True, False], ids=["f16-native", "f16-packed"])
def f16_path(request):
    """Run the test with shader-f16 (array<f16>) and without it (packed u32 + unpack2x16float)."""
    with options(use_f16=request.param):
        yield request.param


@pytest.fixture(params=[True, False], ids=["subgroups", "no-subgroups"])
def subgroup_path(request):
    with options(use_subgroups=request.param):
        yield request.param


@contextlib.contextmanager
def no_gpu_work():
    """Assert the block dispatches no kernel and queues nothing (errors must come first)."""
    runtime.flush()
    before = tg.debug.stats()["kernels_dispatched"]
    try:
        yield
    finally:
        assert tg.debug.stats()["kernels_dispatched"] == before, "GPU work happened"
        assert runtime.pending_count() == 0, "dispatches were queued"


def kernels(fn):
    """Run fn() and return the kernel log entries it dispatched."""
    runtime.flush()
    with tg.debug.kernel_log() as log:
        fn()
    return list(log)
