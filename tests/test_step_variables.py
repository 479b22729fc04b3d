"""Integers that change from step to step (positions, slice bounds, arange starts) and Python
float scalars are runtime values: new values compile no new kernel, eagerly or under
tg.capture (where ints are step variables re-evaluated on every replay)."""
import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu.symbolic import SymInt, Var

rng = np.random.default_rng(3)


def compiles(fn):
    before = tg.debug.stats()["pipelines_compiled"]
    fn()
    return tg.debug.stats()["pipelines_compiled"] - before


def test_symint_is_an_affine_int():
    p = Var("pos").bind(5)
    assert int(p) == 5 and p != 5 and p == p + 0 and isinstance(p + 3, SymInt) and (p + 3) - p == 3 and type((p + 3) - p) is int
    assert (2 * p + 1).evaluate({list(p.terms)[0][0]: 7}) == 15
    assert f"{p + 1}" == "6" and np.arange(p, p + 2).tolist() == [5, 6]


def test_eager_slice_starts_and_scalars_compile_once():
    x = tg.tensor(rng.standard_normal(64).astype(np.float32))
    xs = x.numpy()
    (x[1:9] * 2.0 + 1.0).numpy()                          # warm-up: the kernel structure compiles
    for i in range(2, 20):
        s = 0.1 * i

        def run():
            np.testing.assert_allclose((x[i:i + 8] * s + 1.0).numpy(), xs[i:i + 8] * np.float32(s) + 1, rtol=1e-6)
        assert compiles(run) == 0, f"start {i}, scalar {s}"


def test_eager_cache_write_and_prefix_attention_compile_nothing_after_warm_up():
    H, D, cap = 2, 16, 24
    k = tg.zeros((H, cap, D)).contiguous().realize()
    v = tg.zeros((H, cap, D)).contiguous().realize()
    K = np.zeros((H, cap, D), np.float32)
    V = np.zeros((H, cap, D), np.float32)
    for pos in range(10):
        kn, vn, qn = (rng.standard_normal((H, 1, D)).astype(np.float32) for _ in range(3))

        def step():
            k[:, pos:pos + 1] = tg.tensor(kn)
            v[:, pos:pos + 1] = tg.tensor(vn)
            return tg.nn.scaled_dot_product_attention(tg.tensor(qn), k[:, :pos + 1], v[:, :pos + 1]).numpy()
        got = [None]
        n = compiles(lambda: got.__setitem__(0, step()))
        K[:, pos], V[:, pos] = kn[:, 0], vn[:, 0]
        s = np.einsum("hqd,hkd->hqk", qn, K[:, :pos + 1]) / np.sqrt(D)
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(got[0], np.einsum("hqk,hkd->hqd", p / p.sum(-1, keepdims=True), V[:, :pos + 1]),
                                   rtol=1e-4, atol=1e-5)
        if pos >= 2:
            assert n == 0, f"position {pos} compiled {n} pipelines"


def test_captured_int_arguments_are_step_variables():
    buf = tg.zeros((16,)).contiguous().realize()

    @tg.capture
    def f(x, i, scale):
        buf[i:i + 2] = x * scale
        return (buf * 1.0).sum() + tg.arange(i, i + 3).astype(tg.float32).sum()

    want = np.zeros(16, np.float32)
    for i in (0, 3, 7, 11):
        x = rng.standard_normal(2).astype(np.float32)
        got = float(f(tg.tensor(x), i, 0.5).numpy())
        want[i:i + 2] = x * 0.5
        np.testing.assert_allclose(got, want.sum() + 3 * i + 3, rtol=1e-5)
    assert len(f.traces) == 1 and sum(len(e[1]) for e in f.traces.values()) == 1   # traced once
    np.testing.assert_allclose(buf.numpy(), want, rtol=1e-6)


def test_replay_checks_the_bounds_a_step_variable_was_sliced_with():
    buf = tg.zeros((8,)).contiguous().realize()

    @tg.capture
    def f(i):
        return buf[i:i + 4] + 1.0

    f(2).numpy()
    with pytest.raises(IndexError, match="outside"):
        f(6)                                                  # 6 + 4 > 8
    np.testing.assert_allclose(f(4).numpy(), np.ones(4))


def test_an_extent_from_a_step_variable_specializes_the_trace():
    """A generated kernel over buf[:i] bakes its length in (only attention over a cache prefix
    takes the length as a parameter): each length gets its own trace, never a wrong replay."""
    buf = tg.tensor(np.arange(16, dtype=np.float32))

    @tg.capture
    def f(i):
        return buf[:i].sum()

    for i in (3, 5, 3, 9):
        assert float(f(i).numpy()) == sum(range(i))
    assert sum(len(e[1]) for e in f.traces.values()) == 3


def test_a_non_affine_use_specializes_the_trace():
    """i * i cannot be a kernel parameter of the affine kind: each value gets its own trace,
    with the right result (never a replay of the wrong one)."""
    x = tg.tensor(np.arange(32, dtype=np.float32))

    @tg.capture
    def f(i):
        return x[i * i:i * i + 2] * 1.0

    for i in (1, 2, 3, 2):
        np.testing.assert_allclose(f(i).numpy(), [i * i, i * i + 1])
    assert sum(len(e[1]) for e in f.traces.values()) == 3


def test_rand_and_zeros_take_dims_as_varargs():
    assert tg.randn(32, 16).shape == (32, 16) and tg.rand(3, 4, 5).shape == (3, 4, 5)
    assert tg.randn((32, 16), seed=1).shape == (32, 16)
    np.testing.assert_array_equal(tg.randn(4, 2, seed=7).numpy(), tg.randn((4, 2), seed=7).numpy())
    assert tg.zeros(2, 3).shape == (2, 3) and tg.ones(4).shape == (4,)
    assert tg.zeros((2, 3), tg.float16).dtype is tg.float16 and tg.empty(2, 2, dtype=tg.int32).dtype is tg.int32
    with pytest.raises(TypeError, match="keyword"):
        tg.randn(32, 16.0)
    with pytest.raises(TypeError, match="ints"):
        tg.zeros((2.5,))
