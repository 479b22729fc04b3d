"""What a user sees printing a tensor or converting one to a Python number: NumPy's text for
the values (summarised past the threshold, reading back only the edges), the lazy description
in tg.debug.describe, float/int/bool/index/format on one-element tensors and clear errors for
more elements."""
import operator

import numpy as np
import pytest

import tensorgpu as tg
from core_util import kernels, no_gpu_work


def _numpy_text(a: np.ndarray, name: str) -> str:
    """NumPy's repr of `a` with `array(` -> `tensor(`, its dtype always shown (as tensorgpu does)."""
    body = np.array2string(a, separator=", ", prefix="tensor(")
    extra = f"dtype={name}"
    if a.size == 0 and a.shape != (0,):
        extra = f"shape={a.shape}, {extra}"
    last = len(body) - body.rfind("\n") - 1 if "\n" in body else len("tensor(") + len(body)
    spacer = "\n" + " " * len("tensor(") if last + len(extra) + 3 > np.get_printoptions()["linewidth"] else " "
    return f"tensor({body},{spacer}{extra})"


@pytest.mark.parametrize("a", [
    np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    np.array(3.5, np.float32),
    np.arange(7, dtype=np.int32) - 3,
    np.array([True, False]),
    np.array([0.1, np.nan, -np.inf], np.float32),
    np.array([1.5, 2.25], np.float16),
    np.array([2**32 - 1, 0], np.uint32),
    np.zeros((0, 3), np.float32),
    np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32),
], ids=["2d", "0d", "int", "bool", "special", "f16", "uint", "empty", "3d"])
def test_repr_is_numpys_text(a):
    name = {np.float32: "float32", np.int32: "int32", np.bool_: "bool", np.float16: "float16",
            np.uint32: "uint32"}[a.dtype.type]
    t = tg.tensor(a)
    assert repr(t) == _numpy_text(a, name)
    assert str(t) == repr(t)
    assert f"{t}" == repr(t)


def test_issue_example():
    assert repr(tg.tensor([[1.0, 2.0], [3.0, 4.0]])) == "tensor([[1., 2.],\n        [3., 4.]], dtype=float32)"


def test_lazy_tensor_prints_its_values():
    x = tg.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    y = (x * 2 + 1).T
    assert repr(y) == _numpy_text((np.arange(6, dtype=np.float32).reshape(2, 3) * 2 + 1).T, "float32")


def test_large_tensor_prints_its_edges_only():
    """Past NumPy's threshold the text is NumPy's summary, and only the edges are read back."""
    a = np.arange(300 * 400, dtype=np.float32).reshape(300, 400) / 7
    t = tg.tensor(a)
    before = tg.debug.stats()["bytes_allocated"]
    log = kernels(lambda: repr(t))
    text = repr(t)
    want = np.array2string(a, separator=", ", prefix="tensor(")
    assert text == "tensor(" + want + ", shape=(300, 400), dtype=float32)"      # NumPy 2's summary
    assert "..." in text
    assert len(log) == 1                                  # one gather of the edges
    assert tg.debug.stats()["bytes_allocated"] - before < 4096   # never a copy of the whole tensor


def test_print_options_apply():
    t = tg.tensor([1.0 / 3.0, 2.0 / 3.0])
    with np.printoptions(precision=2):
        assert repr(t) == "tensor([0.33, 0.67], dtype=float32)"


def test_describe_is_lazy():
    x = tg.tensor(np.zeros((4, 4), np.float32))
    y = x[::2] * 2
    with no_gpu_work():
        d = tg.debug.describe(y)
        assert "shape=(2, 4)" in d and "lazy mul" in d
        assert "realized" in tg.debug.describe(x)
        assert "view strides=(8, 1)" in tg.debug.describe(x[::2])
    x[0] = 1.0
    assert "pending write" in tg.debug.describe(x)


def test_repr_inside_capture_does_not_read_back():
    seen = []

    @tg.capture
    def f(x):
        y = x * 2
        seen.append(repr(y))
        return y

    f(tg.tensor([1.0, 2.0]))
    assert seen and seen[0].startswith("Tensor(shape=(2,)")


def test_repr_of_a_tensor_that_cannot_be_computed_says_why(monkeypatch):
    """A debugger calls repr on anything: a failing computation (here a lost device) is
    described, not raised."""
    t = tg.tensor([1, 2, 3]) * 2

    def lost(*a, **k):
        raise RuntimeError("device lost")
    monkeypatch.setattr(tg.Tensor, "numpy", lost)
    r = repr(t)
    assert r.startswith("Tensor(shape=(3,), dtype=int32, lazy mul") and "RuntimeError: device lost" in r


# ----------------------------------------------------------------------------- Python numbers


def test_python_scalar_conversions():
    t = tg.tensor([2.75])
    assert float(t) == 2.75 and isinstance(float(t), float)
    assert int(t) == 2 and int(tg.tensor(-2.75)) == -2
    assert bool(tg.tensor([0.5])) and not bool(tg.tensor(0))
    assert format(t, ".3f") == "2.750" and f"{tg.tensor(7):04d}" == "0007"
    assert f"{tg.tensor([[1.0]]):.1e}" == "1.0e+00"
    assert operator.index(tg.tensor(3)) == 3
    assert [10, 20, 30][tg.tensor(1)] == 20
    assert list(range(10))[tg.tensor(2):tg.tensor(5)] == [2, 3, 4]
    assert round(tg.tensor([2.5, 3.5])).tolist() == [2.0, 4.0]


@pytest.mark.parametrize("fn,exc,msg", [
    (float, TypeError, r"float\(\) needs a tensor with exactly one element, got shape \(2, 2\)"),
    (int, TypeError, r"int\(\) needs a tensor with exactly one element, got shape \(2, 2\)"),
    (bool, ValueError, r"ambiguous"),
    (lambda t: format(t, ".2f"), TypeError, r"format spec '.2f' needs a tensor with exactly one element, got shape \(2, 2\)"),
    (operator.index, TypeError, r"only 0-d integer tensors"),
])
def test_many_elements_are_refused(fn, exc, msg):
    t = tg.tensor(np.ones((2, 2), np.float32))
    with no_gpu_work(), pytest.raises(exc, match=msg):
        fn(t)


def test_index_needs_a_0d_integer():
    with pytest.raises(TypeError, match="float32"):
        operator.index(tg.tensor(1.0))
    with pytest.raises(TypeError, match=r"shape \(1,\)"):
        operator.index(tg.tensor([1]))
