"""Bad input fails at the call that caused it, before any GPU work (no kernel dispatched or
queued), with an exception type a NumPy user expects and a message naming the shapes/dtypes."""
import re

import numpy as np
import pytest

import tensorgpu as tg
from core_util import no_gpu_work
from tensorgpu import runtime

A = tg.tensor(np.arange(12, dtype=np.float32).reshape(3, 4))
B = tg.tensor(np.arange(5, dtype=np.float32))


def raises(exc, match=None):
    """pytest.raises inside a no-GPU-work guard."""
    class _Both:
        def __enter__(self):
            self.g = no_gpu_work()
            self.g.__enter__()
            self.r = pytest.raises(exc, match=match)
            return self.r.__enter__()

        def __exit__(self, *a):
            out = self.r.__exit__(*a)
            self.g.__exit__(None, None, None)
            return out
    return _Both()


@pytest.mark.parametrize("fn", [lambda: A + B, lambda: B * A, lambda: A - B.reshape(5, 1), lambda: tg.maximum(A, B),
                                lambda: A < B, lambda: tg.where(A > 0, A, B), lambda: tg.where(B > 0, A, 1.0),
                                lambda: A % B, lambda: A ** B])
def test_broadcast_mismatch_names_both_shapes(fn):
    with raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "(3, 4)" in msg and "(5," in msg, msg


def test_lazy_operands_fail_at_the_op_too():
    lazy = A * 2 + 1
    with raises(ValueError, match=re.escape("(3, 4)")):
        lazy + B


def test_reshape_errors():
    with raises(ValueError, match=r"\(3, 4\).*\(5, 2\)"):
        A.reshape(5, 2)
    with raises(ValueError, match="12"):
        A.reshape(-1, 5)
    with raises(ValueError):
        A.reshape(-1, -1)
    with raises(ValueError):
        A.reshape(-2, -6)
    with raises(ValueError):
        A.T.reshape(13)
    with raises(ValueError):
        tg.zeros((0, 3)).reshape(-1, 0)


@pytest.mark.parametrize("fn", [lambda: A.sum(2), lambda: A.sum(-3), lambda: A.max((0, 2)), lambda: A.mean(5),
                                lambda: A.argmax(2), lambda: A.softmax(2), lambda: A.log_softmax(-3),
                                lambda: A.logsumexp(4), lambda: A.var(3), lambda: A.squeeze(2), lambda: A.flatten(0, 3),
                                lambda: A.transpose(0, 2), lambda: A.split(2, axis=2), lambda: A.chunk(2, 5),
                                lambda: tg.cat([A, A], 2), lambda: tg.stack([A, A], 4), lambda: A.unsqueeze(4),
                                lambda: A.permute(0, 2), lambda: tg.tensor(1.0).sum(1)])
def test_bad_axis(fn):
    with raises((ValueError, IndexError)) as e:  # NumPy's AxisError is both
        fn()
    assert re.search(r"\d", str(e.value))


def test_other_shape_errors():
    with raises(ValueError, match="permut"):
        A.permute(0, 0)
    with raises(ValueError, match="permute"):
        A.permute(0)
    with raises(ValueError, match=r"\(3, 4\)"):
        A.expand(3, 5)
    with raises(ValueError):
        A.expand(4)
    with raises(ValueError, match="squeeze"):
        A.squeeze(0)
    with raises(ValueError, match=r"\(3, 4\)|\(3, 5\)"):
        tg.cat([A, tg.zeros((3, 5))], 0)
    with raises(ValueError):
        tg.cat([A, tg.zeros(4)])
    with raises(ValueError):
        tg.cat([])
    with raises(ValueError, match="stack"):
        tg.stack([A, A.T])
    with raises(ValueError, match="add up"):
        A.split([1, 1], 0)
    with raises(ValueError):
        A.split(0)
    with raises(ValueError):
        A.chunk(0)
    with raises(ValueError):
        A.sum((0, 0))
    with raises(TypeError):
        A.argmax((0, 1))
    with raises(ValueError, match="approximate"):
        A.gelu("fast")
    with raises(ValueError, match="negative"):
        tg.zeros((2, -1))
    with raises(ValueError):
        tg.arange(0, 5, 0)


@pytest.mark.parametrize("idx", [3, -4, (0, 4), (0, -5), (slice(None), 9), (1, 2, 3), (Ellipsis, 1, 1, 1),
                                 (None, 3), (0, 0, 0)])
def test_index_out_of_range(idx):
    with raises(IndexError) as e:
        A[idx]
    assert re.search(r"\d", str(e.value))


def test_index_type_errors():
    with raises(TypeError):
        A[1.5]
    with raises(TypeError):      # masks and index arrays are supported (test_api_indexing.py); bool scalars not
        A[True]
    with raises(IndexError):
        A[[0.5, 1]]
    with raises(ValueError):
        A[::0]
    with raises(IndexError):
        A[..., ...]
    with raises(IndexError):
        tg.tensor(1.0)[0]


@pytest.mark.parametrize("data", [np.array([1 + 2j, 3j]), np.array(["a", "b"]), ["a", "b"], np.array([b"x"]),
                                  np.array([object(), object()]), np.array(["2020-01-01"], dtype="datetime64[D]")],
                         ids=["complex", "str-array", "str-list", "bytes", "object", "datetime"])
def test_unsupported_input_dtype(data):
    with raises(TypeError) as e:
        tg.tensor(data)
    assert any(w in str(e.value) for w in ("dtype", "float32", "unsupported")), str(e.value)


@pytest.mark.parametrize("dtype", ["complex64", np.complex128, "U8", "datetime64[s]", "nope", object])
def test_unsupported_dtype_argument(dtype):
    with raises(TypeError):
        tg.tensor([1.0], dtype=dtype)
    with raises(TypeError):
        tg.zeros(3, dtype)
    with raises(TypeError):
        A.astype(dtype)


def test_out_of_range_values():
    with raises(OverflowError):
        tg.tensor([2**40])
    with raises(OverflowError, match="int32"):
        tg.tensor([1, 2]) + 2**31
    with raises(OverflowError):
        tg.tensor(np.array([1], np.uint32)) * 2**32
    with raises(OverflowError):
        tg.full((2,), 2**31, tg.int32)
    with raises(ValueError):
        tg.tensor([2, 3]) ** -1  # NumPy: integers to negative integer powers


def _quant():
    # 2 blocks of q8_0 (34 bytes each), as a GGUF file holds them
    buf = runtime.upload(np.zeros(68, np.uint8))
    return tg.Tensor.from_buffer(buf, (2, 32), tg.q8_0)


@pytest.mark.parametrize("fn", [lambda q: q + 1, lambda q: 1 - q, lambda q: q * q, lambda q: -q, lambda q: q.exp(),
                                lambda q: q.sum(), lambda q: q.max(1), lambda q: q < 1, lambda q: tg.where(q, 1.0, 2.0),
                                lambda q: tg.where(A[:2, :1] > 0, q, 1.0), lambda q: q.astype(tg.int32),
                                lambda q: q.astype(tg.q4_0), lambda q: q.contiguous(), lambda q: q.softmax(-1),
                                lambda q: tg.maximum(q, 0.0), lambda q: q @ tg.zeros((32, 2)),
                                lambda q: tg.cat([q, q])])
def test_quantized_arithmetic_is_a_type_error(fn):
    q = _quant()
    runtime.flush()
    with raises(TypeError) as e:
        fn(q)
    assert "q8_0" in str(e.value), str(e.value)


def test_quantized_creation_is_a_type_error():
    with raises(TypeError):
        tg.tensor(np.zeros(32, np.float32), dtype=tg.q8_0)
    with raises(TypeError):
        tg.full((32,), 1.0, tg.q4_0)
    with raises(TypeError):
        tg.zeros((32,), tg.q4_k)


@pytest.fixture
def tiny_binding_limit(monkeypatch):
    dev = runtime.get_device()
    monkeypatch.setitem(dev.limits, "max-storage-buffer-binding-size", 4096)
    return 4096


@pytest.mark.parametrize("fn", [lambda: tg.tensor(np.zeros(2000, np.float32)),
                                lambda: tg.tensor(np.zeros((50, 50), np.float16)),
                                lambda: tg.empty((1025,)),
                                lambda: tg.tensor(np.zeros((40, 1), np.float32)) + tg.tensor(np.zeros((1, 40), np.float32)),
                                lambda: tg.zeros((2000,)).contiguous(),
                                lambda: tg.tensor(np.zeros((1, 40), np.float32)).expand(40, 40).exp(),
                                lambda: tg.cat([tg.tensor(np.zeros(600, np.float32))] * 2),
                                lambda: tg.tensor(np.ones((20, 1), np.float32)).expand(20, 60) * tg.tensor(np.ones(60, np.float32)),
                                lambda: tg.zeros((1100,), tg.bool) | tg.tensor(np.ones((1, 1), bool))],
                         ids=["upload", "upload-f16", "empty", "broadcast-add", "contiguous", "expand-exp", "cat", "mul", "bool"])
def test_tensor_over_the_binding_limit_is_refused(tiny_binding_limit, fn):
    with raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "max_storage_buffer_binding_size" in msg and "4096" in msg, msg


def test_under_the_binding_limit_still_works(tiny_binding_limit):
    x = tg.tensor(np.ones(1000, np.float32))  # 4000 bytes
    np.testing.assert_array_equal((x * 2).numpy(), np.full(1000, 2, np.float32))
    assert (x[::2] + 1).sum().item() == 1000.0


def test_error_leaves_no_pending_work_and_state_usable():
    with raises(ValueError):
        (A * 2) + B
    np.testing.assert_array_equal((A + 1).numpy(), np.arange(12, dtype=np.float32).reshape(3, 4) + 1)
