"""Views (reshape, permute, transpose, .T, expand/broadcast_to, squeeze, unsqueeze, flatten,
__getitem__ with ints/slices/None/...) against NumPy, cat/stack/split/chunk, and the promise
that views never copy: reading one inside an elementwise chain adds no kernel and no buffer.
Values here are moved, not computed, so every comparison is exact.
"""
from math import prod

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from core_util import check, kernels

rng = np.random.default_rng(99)
A = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)


@pytest.fixture
def t():
    return tg.tensor(A)


# ----------------------------------------------------------------------------- getitem


INDICES = [
    1, -1, (1, 2), (-1, -2, -3), slice(None), slice(1, 3), slice(None, None, 2), slice(None, None, -1),
    slice(-2, None), slice(3, 0, -2), slice(10, 20), slice(3, 1), (slice(None), 0), (Ellipsis, 1),
    (Ellipsis, slice(None, None, -2)), (None,), (None, 1), (1, None, Ellipsis, None), (slice(None), None, slice(1, 4)),
    (Ellipsis,), (1, Ellipsis, 2), (None, None, Ellipsis, None), (slice(None, None, -1), slice(1, None), slice(None, None, 3)),
    (np.int64(2), slice(None), np.int32(-1)), (slice(-100, 100),), (0, 0, 0), (Ellipsis, None),
]


@pytest.mark.parametrize("idx", INDICES, ids=repr)
def test_getitem(t, idx):
    v = t[idx]
    check(v, A[idx])
    assert v.node is t.node  # a view: same data


def test_getitem_chained_and_strides(t):
    v = t[::-1, 1:, ::2][1:, None, ..., ::-1][..., 0]
    ref = A[::-1, 1:, ::2][1:, None, ..., ::-1][..., 0]
    check(v, ref)
    assert v.strides == tuple(s // 4 for s in ref.strides)


def test_getitem_of_lazy_result(t):
    check((t * 2)[1:, ::-2, None], (A * 2)[1:, ::-2, None])


# ----------------------------------------------------------------------------- movement ops


def test_reshape(t):
    check(t.reshape(6, 20), A.reshape(6, 20))
    check(t.reshape((2, -1, 3)), A.reshape(2, -1, 3))
    check(t.reshape(-1), A.reshape(-1))
    check(t.reshape(1, 120, 1), A.reshape(1, 120, 1))
    check(t[1].reshape(()) if False else t[1, 1, 1].reshape(1, 1), A[1, 1, 1].reshape(1, 1))
    check(tg.tensor(5.0).reshape(1), np.array([5.0], np.float32))
    check(tg.zeros((0, 4)).reshape(2, 0, -1) if False else tg.zeros((0, 4)).reshape(4, 0), np.zeros((4, 0), np.float32))


def test_reshape_of_views(t):
    check(t.T.reshape(6, -1), A.T.reshape(6, -1))                       # needs a copy
    check(t[:, 1:3].reshape(-1, 6), A[:, 1:3].reshape(-1, 6))           # strides can say it
    check(t[:, :, ::2].reshape(20, 3), A[:, :, ::2].reshape(20, 3))
    check(t[::-1].reshape(2, 2, 30), A[::-1].reshape(2, 2, 30))
    check(t[:, :1].expand(4, 3, 6).reshape(12, 6), np.broadcast_to(A[:, :1], (4, 3, 6)).reshape(12, 6))
    check(t[:, :1].expand(4, 3, 6).reshape(4, 18), np.broadcast_to(A[:, :1], (4, 3, 6)).reshape(4, 18))
    check(t.permute(1, 0, 2).reshape(5, 2, 2, 6), A.transpose(1, 0, 2).reshape(5, 2, 2, 6))


def test_permute_transpose_T(t):
    check(t.permute(2, 0, 1), A.transpose(2, 0, 1))
    check(t.permute((1, 2, 0)), A.transpose(1, 2, 0))
    check(t.permute(-1, 0, 1), A.transpose(2, 0, 1))
    check(t.swapaxes(0, 2), A.swapaxes(0, 2))
    check(t.transpose(), A.transpose())                  # NumPy: all axes reversed (issue 16)
    check(t.transpose(1, 2, 0), A.transpose(1, 2, 0))
    check(t.swapaxes(-2, -1), A.swapaxes(-2, -1))
    check(t.T, A.T)
    check(t[0].T, A[0].T)
    check(tg.tensor([1, 2]).T, np.array([1, 2], np.int32))
    check(tg.swapaxes(t, 0, 1), A.swapaxes(0, 1))
    check(tg.transpose(t, (1, 0, 2)), A.transpose(1, 0, 2))
    check(tg.permute(t, 2, 1, 0), A.transpose(2, 1, 0))


def test_expand_broadcast_to(t):
    c = t[:, :1]
    check(c.expand(4, 7, 6), np.broadcast_to(A[:, :1], (4, 7, 6)))
    check(c.expand(-1, 7, -1), np.broadcast_to(A[:, :1], (4, 7, 6)))
    check(t.expand(2, 4, 5, 6), np.broadcast_to(A, (2, 4, 5, 6)))
    check(t.broadcast_to((3, 4, 5, 6)), np.broadcast_to(A, (3, 4, 5, 6)))
    check(tg.broadcast_to(tg.tensor(2.0), (2, 3)), np.full((2, 3), 2.0, np.float32))
    check(c.expand(4, 0, 6), np.zeros((4, 0, 6), np.float32))
    e = c.expand(4, 7, 6)
    assert e.strides[1] == 0 and e.node is t.node


def test_squeeze_unsqueeze_flatten(t):
    x = t[:, :1, None]
    ref = A[:, :1, None]
    check(x.squeeze(), ref.squeeze())
    check(x.squeeze(1), ref.squeeze(1))
    check(x.squeeze((1, 2)), ref.squeeze((1, 2)))
    check(x.squeeze(-2), ref.squeeze(-2))
    check(t.unsqueeze(0), A[None])
    check(t.unsqueeze(-1), A[..., None])
    check(t.unsqueeze(2), A[:, :, None])
    check(tg.unsqueeze(t, 1).squeeze(1), A)
    check(t.flatten(), A.reshape(-1))
    check(t.flatten(1), A.reshape(4, -1))
    check(t.flatten(0, 1), A.reshape(20, 6))
    check(t.T.flatten(1), A.T.reshape(6, -1))
    check(tg.tensor(3.0).flatten(), np.array([3.0], np.float32))
    check(tg.flatten(t), A.reshape(-1))
    check(tg.squeeze(tg.zeros((1, 3, 1))), np.zeros(3, np.float32))


def test_contiguous_copies_explicitly(t):
    v = t.T
    log = kernels(lambda: v.contiguous().realize())
    assert len(log) == 1
    c = v.contiguous()
    check(c, A.T)
    assert c.strides == (20, 4, 1) and c.node is not t.node
    check(tg.contiguous(v), A.T)


# ----------------------------------------------------------------------------- cat / stack / split / chunk


def test_cat():
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    check(tg.cat([tg.tensor(a), tg.tensor(b)]), np.concatenate([a, b]))
    check(tg.cat([tg.tensor(a), tg.tensor(b).T[:, :2].T.reshape(2, 3)], 0), np.concatenate([a, b.T[:, :2].T.reshape(2, 3)]))
    check(tg.cat([tg.tensor(a), tg.tensor(a) * 2, tg.tensor(a)[:, :0]], 1), np.concatenate([a, a * 2, a[:, :0]], 1))
    check(tg.cat([tg.tensor(a).T, tg.tensor(b).T], -1), np.concatenate([a.T, b.T], -1))
    check(tg.cat([tg.tensor(a)], 0), a)
    check(tg.cat([tg.zeros((0, 3)), tg.zeros((0, 3))]), np.zeros((0, 3), np.float32))
    check(tg.cat([tg.tensor([1, 2]), tg.tensor([0.5])]), np.array([1, 2, 0.5], np.float32))
    check(tg.cat([tg.tensor(np.array([[1]], np.int32)).expand(2, 3), tg.full((1, 3), 7)]), np.array([[1] * 3, [1] * 3, [7] * 3], np.int32))
    h = a.astype(np.float16)
    check(tg.cat([tg.tensor(h), tg.tensor(h)[::-1]], 1), np.concatenate([h, h[::-1]], 1))


def test_stack():
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    for ax in (0, 1, 2, -1, -3):
        check(tg.stack([tg.tensor(a), tg.tensor(b), tg.tensor(a) + 1], ax), np.stack([a, b, a + 1], ax))
    check(tg.stack([tg.tensor(1.0), tg.tensor(2.0)]), np.array([1.0, 2.0], np.float32))


def test_split_chunk():
    x = np.arange(4 * 7, dtype=np.int32).reshape(4, 7)
    t = tg.tensor(x)
    parts = t.split(3, 1)
    assert [p.shape for p in parts] == [(4, 3), (4, 3), (4, 1)]
    for p, r in zip(parts, np.split(x, [3, 6], 1)):
        check(p, r)
        assert p.node is t.node  # views
    parts = t.split([2, 0, 5], axis=1)
    assert [p.shape for p in parts] == [(4, 2), (4, 0), (4, 5)]
    for p, r in zip(parts, np.split(x, [2, 2], 1)):
        check(p, r)
    parts = tg.split(t, 2)
    assert [p.shape for p in parts] == [(2, 7), (2, 7)]
    ch = t.chunk(3, 1)  # PyTorch semantics: ceil(7/3) = 3 per chunk
    assert [c.shape for c in ch] == [(4, 3), (4, 3), (4, 1)]
    check(ch[2], x[:, 6:])
    assert [c.shape for c in tg.chunk(t, 4)] == [(1, 7)] * 4
    assert [c.shape for c in t.chunk(2, -1)] == [(4, 4), (4, 3)]


# ----------------------------------------------------------------------------- views never copy


def test_views_in_a_chain_add_no_kernel_and_no_buffer():
    x = tg.tensor(rng.standard_normal((6, 8)).astype(np.float32))
    y = tg.tensor(rng.standard_normal((8, 6)).astype(np.float32))
    xn, yn = x.numpy(), y.numpy()
    s0 = tg.debug.stats()
    views = [x.T, x.T[::2, 1:], x[None], x[None].expand(3, 6, 8), x.permute(1, 0), x.unsqueeze(0)]
    s1 = tg.debug.stats()
    assert s1["kernels_dispatched"] == s0["kernels_dispatched"]
    assert s1["buffers_allocated"] == s0["buffers_allocated"]
    assert all(v.node is x.node for v in views)
    expr = (x.T[::2, 1:] * 2 + y[::2, 1:] + x[None].expand(3, 6, 8)[1].T[::2, 1:]
            - x.permute(1, 0).unsqueeze(0)[0, ::2, 1:] * x[::-1, ::-1].T[::2, 1:])
    log = kernels(lambda: expr.realize())
    assert len(log) == 1, [k.name for k in log]
    ref = (xn.T[::2, 1:] * 2 + yn[::2, 1:] + xn.T[::2, 1:] - xn.T[::2, 1:] * xn[::-1, ::-1].T[::2, 1:])
    check(expr, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda x: x.T, lambda x: x[::2, 1:], lambda x: x[None], lambda x: x.expand(2, 6, 8),
                                  lambda x: x.permute(1, 0), lambda x: x.unsqueeze(1), lambda x: x[:, :1].expand(6, 8),
                                  lambda x: x[..., ::-1], lambda x: x.reshape(3, 2, 8)[1:], lambda x: x[2:4].flatten(),
                                  lambda x: x[:, 0:1].squeeze(1)],
                         ids=["T", "slice", "None", "expand", "permute", "unsqueeze", "bcast", "neg-step", "reshape",
                              "flatten", "squeeze"])
def test_each_view_read_by_one_kernel(make):
    x = tg.tensor(rng.standard_normal((6, 8)).astype(np.float32))
    v = make(x)
    ref = make(tg.tensor(x.numpy())).numpy()
    out = (v * 3 + 1).exp()
    log = kernels(lambda: out.realize())
    assert len(log) == 1
    check(out, np.exp(ref * 3 + 1), rtol=1e-5)


def test_views_of_lazy_chain_stay_fused():
    x = tg.tensor(rng.standard_normal((5, 4)).astype(np.float32))
    e = ((x + 1).T[::-1] * 2).unsqueeze(0).expand(2, 4, 5)[1, 1:] - 1
    log = kernels(lambda: e.realize())
    assert len(log) == 1
    xn = x.numpy()
    check(e, ((xn + 1).T[::-1] * 2)[1:] - 1, rtol=1e-6)


def test_unexpressible_reshape_copy_is_visible():
    x = tg.tensor(A)
    log = kernels(lambda: x.T.reshape(-1).realize())
    assert len(log) == 1  # the copy itself
    for v in (x[1:3].reshape(-1, 6), x[:, :, ::2].reshape(20, 3), x[:, :1].expand(4, 3, 6).reshape(4, 3, 2, 3),
              x.T.reshape(6, 5, 2, 2)):
        assert v.node is x.node  # strides can express these: still a view


# ----------------------------------------------------------------------------- property test


def _factor_shape(draw, size):
    """A random shape with `size` elements (size-1 dims sprinkled in)."""
    if size == 0:
        n = draw(st.integers(1, 3))
        shape = [draw(st.integers(1, 3)) for _ in range(n)]
        shape[draw(st.integers(0, n - 1))] = 0
        return tuple(shape)
    primes, k, n = [], 2, size
    while n > 1:
        while n % k == 0:
            primes.append(k)
            n //= k
        k += 1
    dims = [1] * draw(st.integers(1, 4))
    for p in primes:
        dims[draw(st.integers(0, len(dims) - 1))] *= p
    return tuple(dims)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_views_property(data):
    """Random chains of views on both NumPy and tensorgpu, read by an elementwise chain and a
    reduction: the values equal NumPy's."""
    draw = data.draw
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 1, 2, 3, 4, 5]), min_size=0, max_size=4)))
    dtype = draw(st.sampled_from([np.float32, np.int32, np.float16]))
    base = (np.arange(prod(shape)) % 97 - 40).astype(dtype).reshape(shape)
    a, t = base, tg.tensor(base)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["permute", "slice", "index", "none", "expand", "reshape", "T", "flatten",
                                   "squeeze", "unsqueeze", "transpose", "ellipsis"]))
        nd = a.ndim
        if op == "permute" and nd:
            p = draw(st.permutations(range(nd)))
            a, t = a.transpose(p), t.permute(*p)
        elif op == "slice" and nd:
            idx = []
            for s in a.shape:
                step = draw(st.sampled_from([1, 1, 2, 3, -1, -2]))
                lo = draw(st.integers(-s - 1, s + 1))
                hi = draw(st.one_of(st.none(), st.integers(-s - 1, s + 1)))
                idx.append(slice(lo, hi, step) if draw(st.booleans()) else slice(None, None, step))
            a, t = a[tuple(idx)], t[tuple(idx)]
        elif op == "index" and nd and all(s > 0 for s in a.shape):
            ax = draw(st.integers(0, nd - 1))
            i = draw(st.integers(-a.shape[ax], a.shape[ax] - 1))
            idx = (slice(None),) * ax + (i,)
            a, t = a[idx], t[idx]
        elif op == "none":
            pos = draw(st.integers(0, nd))
            idx = (slice(None),) * pos + (None,)
            a, t = a[idx], t[idx]
        elif op == "ellipsis" and nd:
            idx = (Ellipsis, slice(None, None, -1)) if draw(st.booleans()) else (None, Ellipsis)
            a, t = a[idx], t[idx]
        elif op == "expand":
            new = tuple(draw(st.sampled_from([2, 3])) if s == 1 and draw(st.booleans()) else s for s in a.shape)
            lead = (draw(st.integers(1, 2)),) if draw(st.booleans()) else ()
            a, t = np.broadcast_to(a, lead + new), t.expand(*(lead + new))
        elif op == "reshape":
            new = _factor_shape(draw, a.size)
            if a.size == 0 and prod(new) != 0:
                continue
            if draw(st.booleans()) and new:
                new = tuple(-1 if i == 0 and a.size else s for i, s in enumerate(new))
            a, t = a.reshape(new), t.reshape(new)
        elif op == "T":
            a, t = a.T, t.T
        elif op == "flatten":
            a, t = a.reshape(-1) if a.ndim else a.reshape(1), t.flatten()
        elif op == "squeeze":
            a, t = a.squeeze(), t.squeeze()
        elif op == "unsqueeze":
            ax = draw(st.integers(-nd - 1, nd))
            a, t = np.expand_dims(a, ax), t.unsqueeze(ax)
        elif op == "transpose" and nd >= 2:
            i, j = draw(st.integers(0, nd - 1)), draw(st.integers(0, nd - 1))
            a, t = a.swapaxes(i, j), t.swapaxes(i, j)
        assert t.shape == a.shape
    assert t.strides is not None
    check(t, a)
    f16 = a.dtype == np.float16
    ref = (a * 2 - 3).astype(np.float32) if not f16 else (a.astype(np.float32) * 2 - 3).astype(np.float16)
    check(t * 2 - 3, ref if a.dtype != np.int32 else (a * 2 - 3), rtol=2e-3 if f16 else 0)
    if a.ndim:
        ax = draw(st.integers(-a.ndim, a.ndim - 1))
        keep = draw(st.booleans())
        ref = (a.astype(np.float64) * 2 + 1).sum(ax, keepdims=keep)
        got = (t * 2 + 1).sum(ax, keepdims=keep)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got.numpy().astype(np.float64), ref, rtol=2e-3 if f16 else 1e-6, atol=1e-3 if f16 else 1e-5)
        if a.size:
            check(t.max(ax), a.max(ax))
