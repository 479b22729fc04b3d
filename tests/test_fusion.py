"""What the fuser promises, observed through tg.debug: laziness, one kernel per elementwise
chain (broadcasts and views included), a reduction fused with its producer and its consumer,
no pipeline recompiled for new data, no buffer for fused intermediates, buffer reuse, the
storage-buffer limit respected by splitting, one submit per readback, 2-D grids for large
launches, and the fallback code paths (no shader-f16, no subgroups) actually generated.
"""
import gc

import numpy as np
import pytest

import tensorgpu as tg
from core_util import check, kernels, options
from tensorgpu import runtime

rng = np.random.default_rng(17)
S = tg.debug.stats


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((8, 16)).astype(np.float32), r.standard_normal((16,)).astype(np.float32),
            r.standard_normal((8, 1)).astype(np.float32), r.standard_normal((1, 16)).astype(np.float32))


def test_building_is_lazy_and_numpy_dispatches():
    a, b, c, d = (tg.tensor(v) for v in _inputs())
    runtime.flush()
    s0 = S()
    e = ((a * b + c).exp() * 2 - d).sum(1).sqrt().T
    f = e.reshape(2, 4)[:, ::-1] + 1
    s1 = S()
    assert s1["kernels_dispatched"] == s0["kernels_dispatched"]
    assert s1["pipelines_compiled"] == s0["pipelines_compiled"]
    assert s1["buffers_allocated"] == s0["buffers_allocated"]
    assert runtime.pending_count() == 0
    assert "lazy" in tg.debug.describe(f)     # repr(f) would compute it (it prints values)
    f.numpy()
    assert S()["kernels_dispatched"] > s1["kernels_dispatched"]


def test_broadcast_chain_is_exactly_one_kernel():
    an, bn, cn, dn = _inputs()
    a, b, c, d = (tg.tensor(v) for v in (an, bn, cn, dn))
    expr = (a * b + c).exp() * 2 - d
    log = kernels(lambda: expr.numpy())
    assert len(log) == 1, [k.name for k in log]
    k = log[0]
    assert k.name and "fn main" in k.wgsl and k.workgroups[0] >= 1 and k.buffers == 5  # 4 inputs + output
    check(expr, np.exp(an * bn + cn) * 2 - dn, rtol=1e-5)


def test_same_structure_on_new_data_compiles_nothing():
    def run(seed):
        a, b, c, d = (tg.tensor(v) for v in _inputs(seed))
        return ((a * b + c).exp() * 2 - d).numpy()

    run(0)
    p0 = S()["pipelines_compiled"]
    for seed in (1, 2, 3):
        an, bn, cn, dn = _inputs(seed)
        np.testing.assert_allclose(run(seed), np.exp(an * bn + cn) * 2 - dn, rtol=1e-5, atol=1e-6)
    assert S()["pipelines_compiled"] == p0


def test_bind_groups_are_cached_for_the_same_buffers():
    a = tg.tensor(rng.standard_normal(100).astype(np.float32))
    out = tg.empty((100,))
    out[...] = a * 2  # warm up: compiles and creates the bind group (writes are lazy: realize it)
    out.realize()
    runtime.flush()
    bg0, p0 = S()["bind_groups_created"], S()["pipelines_compiled"]
    for _ in range(3):
        out[...] = a * 2
    out.numpy()
    assert S()["bind_groups_created"] == bg0 and S()["pipelines_compiled"] == p0


def test_diamond_and_repeated_operands_stay_one_kernel():
    x = tg.tensor(rng.standard_normal((5, 7)).astype(np.float32))
    y = x * 2 + 1
    z = y * y - y.exp() + y[:, ::-1] / (y.T.T + 10)
    log = kernels(lambda: z.realize())
    assert len(log) == 1
    xn = x.numpy()
    yn = xn * 2 + 1
    check(z, yn * yn - np.exp(yn) + yn[:, ::-1] / (yn + 10), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keepdims", [True, False])
def test_reduction_fuses_producer_and_consumer(keepdims):
    xn = rng.standard_normal((6, 50)).astype(np.float32)
    x = tg.tensor(xn)
    r = ((x * 2).exp().sum(1, keepdims=keepdims) + 1).log()
    log = kernels(lambda: r.realize())
    assert len(log) == 1, [k.name for k in log]
    check(r, np.log(np.exp(xn * 2).sum(1, keepdims=keepdims) + 1), rtol=1e-5)
    m = (x.abs().max(0) * 3 - 1)
    log = kernels(lambda: m.realize())
    assert len(log) == 1
    check(m, np.abs(xn).max(0) * 3 - 1)


def test_reduction_consumer_with_other_operands():
    xn, bn = rng.standard_normal((6, 50)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    x, b = tg.tensor(xn), tg.tensor(bn)
    r = x.sum(1) * b + b.exp()
    log = kernels(lambda: r.realize())
    assert len(log) == 1
    check(r, xn.sum(1) * bn + np.exp(bn), rtol=1e-5, atol=1e-5)


def test_normalization_pattern_kernel_count():
    """x - max(x) reads the max broadcast over its row: one row kernel (a workgroup per row
    reduces it, then maps the row), not a reduction kernel and an elementwise one."""
    xn = rng.standard_normal((4, 30)).astype(np.float32)
    x = tg.tensor(xn)
    e = (x - x.max(1, keepdims=True)).exp()
    log = kernels(lambda: e.realize())
    assert [k.name for k in log] == ["RE_rmax_sub_exp"]
    check(e, np.exp(xn - xn.max(1, keepdims=True)), rtol=1e-6)


def test_fused_intermediates_allocate_no_buffers(monkeypatch):
    x = tg.tensor(rng.standard_normal((3, 1000)).astype(np.float32))
    y = tg.tensor(rng.standard_normal((1000,)).astype(np.float32))
    runtime.flush()
    class NoReuse(dict):
        def get(self, key, default=None):
            return None

    monkeypatch.setattr(runtime.POOL, "free", NoReuse())  # every Buffer below counts as an allocation
    b0 = S()["buffers_allocated"]
    z = ((x * 2 + y).exp() - 3).sqrt() * y + x.T.T
    z.realize()
    assert S()["buffers_allocated"] - b0 == 1  # the output only
    r = ((x * y).sum(1) + 1).exp()
    b1 = S()["buffers_allocated"]
    r.realize()
    assert S()["buffers_allocated"] - b1 == 1


def test_freed_buffers_are_reused():
    n = 12345
    a = tg.tensor(rng.standard_normal(n).astype(np.float32))
    (a * 2).numpy()  # the size class exists and has been freed once (pending dispatches hold theirs)
    gc.collect()
    b0, bytes0 = S()["buffers_allocated"], S()["bytes_allocated"]
    for i in range(5):
        t = (a * float(i)).realize()
        t.numpy()
        del t
        gc.collect()
    assert S()["buffers_allocated"] == b0 and S()["bytes_allocated"] == bytes0
    live0 = tg.debug.stats()["live_bytes"]
    t = tg.zeros((n,)) + a
    t.realize()
    assert tg.debug.stats()["live_bytes"] > live0
    runtime.flush()  # pending dispatches keep their buffers until submitted
    del t
    gc.collect()
    assert tg.debug.stats()["live_bytes"] == live0


def test_one_submit_per_readback():
    xn = rng.standard_normal((8, 40)).astype(np.float32)
    x = tg.tensor(xn)
    y = (x - x.mean(1, keepdims=True)) / (x.std(0, keepdims=True) + 1)  # several kernels (std over columns)
    runtime.flush()
    s0 = S()["submits"]
    log = kernels(lambda: y.numpy())
    assert len(log) >= 2
    assert S()["submits"] - s0 == 1
    x64 = xn.astype(np.float64)
    check(y, (x64 - x64.mean(1, keepdims=True)) / (x64.std(0, keepdims=True) + 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("limit", [8, 5])
def test_storage_buffer_limit_splits_kernels(limit):
    with options(max_storage_buffers=limit):
        ins = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(12)]
        ts = [tg.tensor(v) for v in ins]
        expr, ref = ts[0], ins[0]
        for t, v in zip(ts[1:], ins[1:]):
            expr, ref = expr * 0.5 + t.exp(), ref * 0.5 + np.exp(v)
        log = kernels(lambda: expr.realize())
        assert len(log) >= 2
        assert all(k.buffers <= limit for k in log), [(k.name, k.buffers) for k in log]
        assert len(log) <= 11 // (limit - 2) + 1  # splits into few kernels, not one per op
        check(expr, ref, rtol=1e-5, atol=1e-5)
        # the same with broadcasting operands, a reduction and a cat of many parts
        e2 = sum((t[:, :1] * t.T[:1].T[:, :1]).sum(1) for t in ts)
        log = kernels(lambda: e2.realize())
        assert all(k.buffers <= limit for k in log)
        check(e2, sum((v[:, :1] * v[:, :1]).sum(1) for v in ins), rtol=1e-5, atol=1e-5)
        c = tg.cat([t * 2 for t in ts], 1)
        log = kernels(lambda: c.realize())
        assert all(k.buffers <= limit for k in log), [(k.name, k.buffers) for k in log]
        check(c, np.concatenate([v * 2 for v in ins], 1))
    assert runtime.get_device().max_storage_buffers >= 8


def test_large_launch_uses_a_2d_grid():
    n = 65535 * 256 + 1000  # more workgroups than one grid dimension holds
    x = tg.arange(n, dtype=tg.float32)
    y = x * 2 + 1
    log = kernels(lambda: y.realize())
    assert len(log) == 1
    gx, gy, _ = log[0].workgroups
    assert gy >= 2 and gx <= 65535 and gx * gy * 256 >= n
    got = y.numpy()
    assert got[0] == 1 and got[-1] == (n - 1) * 2 + 1
    np.testing.assert_array_equal(got[::9973], np.arange(n, dtype=np.float32)[::9973] * 2 + 1)
    s = x[:65535 * 256].reshape(65535 * 2, 128).sum(1)  # a reduction with > 65535 outputs
    got = s.numpy()
    i = np.arange(65535 * 2, dtype=np.float64)
    np.testing.assert_allclose(got[[0, 1, 70000, -1]], (i * 128 * 128 + 127 * 128 / 2)[[0, 1, 70000, -1]], rtol=1e-6)


# ----------------------------------------------------------------------------- code paths


def test_f16_fallback_generates_packed_loads_and_stores():
    h = tg.tensor(rng.standard_normal(9).astype(np.float16))
    with options(use_f16=False):
        log = kernels(lambda: (h * 2 + 1).astype(tg.float16).realize())
    src = log[0].wgsl
    assert "enable f16" not in src and "unpack2x16float" in src and "pack2x16float" in src and "array<f16>" not in src
    if "shader-f16" in runtime.get_device().features:
        with options(use_f16=True):
            log = kernels(lambda: (h * 3 + 1).astype(tg.float16).realize())
        assert "enable f16" in log[0].wgsl and "array<f16>" in log[0].wgsl


def test_subgroup_switch_changes_reduction_code():
    x = tg.tensor(rng.standard_normal((4, 512)).astype(np.float32))
    with options(use_subgroups=False):
        log = kernels(lambda: x.sum(1).realize())
    assert "subgroup" not in log[0].wgsl
    if "subgroup" in runtime.get_device().features:
        with options(use_subgroups=True):
            log = kernels(lambda: (x * 1.5).sum(1).realize())
        assert "subgroupAdd" in log[0].wgsl


# ----------------------------------------------------------------------------- random graphs

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _bshape(a, b):
    try:
        return np.broadcast_shapes(a, b)
    except ValueError:
        return None


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_expression_graphs_property(data):
    """Random DAGs of elementwise ops, views, reductions (with and without keepdims), where,
    cat, float16 round trips and explicit realizes, under a random storage-buffer limit: the
    value equals NumPy's (float64 reference, 1e-4 relative to the magnitude)."""
    draw = data.draw
    r = np.random.default_rng(draw(st.integers(0, 2**16)))
    dims = [draw(st.sampled_from([1, 2, 3, 5])) for _ in range(3)]
    pool = []
    for _ in range(draw(st.integers(2, 4))):
        shape = tuple(d if draw(st.booleans()) else 1 for d in dims)[draw(st.integers(0, 2)):]
        v = r.uniform(-2, 2, shape).astype(np.float32)
        pool.append((tg.tensor(v), v.astype(np.float64)))
    limit = draw(st.sampled_from([None, 4, 6]))
    scale, tol = 1.0, 1e-4
    with options(max_storage_buffers=limit):
        for _ in range(draw(st.integers(1, 10))):
            op = draw(st.sampled_from(["un", "bin", "bin", "view", "red", "where", "cat", "f16", "realize"]))
            i = draw(st.integers(0, len(pool) - 1))
            t, a = pool[i]
            if op == "un":
                k = draw(st.sampled_from(["exp", "neg", "abs", "relu", "sin", "sqrt", "tanh", "sigmoid"]))
                t, a = {"exp": (t.clip(-4, 4).exp(), np.exp(np.clip(a, -4, 4))), "neg": (-t, -a),
                        "abs": (t.abs(), np.abs(a)), "relu": (t.relu(), np.maximum(a, 0)), "sin": (t.sin(), np.sin(a)),
                        "sqrt": ((t.abs() + 0.1).sqrt(), np.sqrt(np.abs(a) + 0.1)), "tanh": (t.tanh(), np.tanh(a)),
                        "sigmoid": (t.sigmoid(), 1 / (1 + np.exp(-a)))}[k]
            elif op == "bin":
                t2, a2 = pool[draw(st.integers(0, len(pool) - 1))]
                if _bshape(a.shape, a2.shape) is None:
                    continue
                k = draw(st.sampled_from(["add", "sub", "mul", "max", "div"]))
                t, a = {"add": (t + t2, a + a2), "sub": (t - t2, a - a2), "mul": (t * t2, a * a2),
                        "max": (tg.maximum(t, t2), np.maximum(a, a2)),
                        "div": (t / (t2.abs() + 1), a / (np.abs(a2) + 1))}[k]
            elif op == "view" and a.ndim:
                k = draw(st.sampled_from(["T", "flip", "none", "slice"]))
                if k == "T":
                    t, a = t.T, a.T
                elif k == "flip":
                    t, a = t[..., ::-1], a[..., ::-1]
                elif k == "none":
                    t, a = t[None], a[None]
                elif a.shape[0] > 1:
                    t, a = t[1:], a[1:]
            elif op == "red" and a.ndim and a.size:
                ax = draw(st.integers(0, a.ndim - 1))
                keep = draw(st.booleans())
                k = draw(st.sampled_from(["sum", "max", "min", "mean"]))
                t, a = getattr(t, k)(ax, keepdims=keep), getattr(a, k)(ax, keepdims=keep)
                if draw(st.booleans()):  # an elementwise consumer of the reduced shape
                    t, a = t * 0.5 + 1, a * 0.5 + 1
            elif op == "where":
                t2, a2 = pool[draw(st.integers(0, len(pool) - 1))]
                if _bshape(a.shape, a2.shape) is None:
                    continue
                t, a = tg.where(t > 0, t, t2), np.where(a > 0, a, a2)
            elif op == "cat" and a.ndim:
                ax = draw(st.integers(0, a.ndim - 1))
                t, a = tg.cat([t, t * 2, t], ax), np.concatenate([a, a * 2, a], ax)
            elif op == "f16":  # float16 rounding of an f32 vs an f64 value may differ by an f16 ULP
                t, a = t.astype(tg.float16).astype(tg.float32) * 1, a.astype(np.float16).astype(np.float64)
                tol = 2e-3
            elif op == "realize":
                t.realize()
            pool.append((t, a))
            scale = max(scale, float(np.abs(a).max(initial=0)))
        t, a = pool[-1]
        got = t.numpy()
    assert got.shape == a.shape
    np.testing.assert_allclose(got, a, rtol=tol, atol=tol * scale)  # errors scale with the largest intermediate


# ----------------------------------------------------------------------------- pathological graphs


def test_repeated_reuse_in_a_loop_plans_in_linear_time():
    """A Newton iteration reads y three times per step: 3^60 paths, planned as a DAG."""
    xn = rng.uniform(1, 2, 50).astype(np.float32)
    x = tg.tensor(xn)
    y = tg.ones((50,))
    for _ in range(60):
        y = y * (1.5 - 0.5 * x * y * y)
    log = kernels(lambda: y.realize())
    assert 1 <= len(log) <= 4
    check(y, 1 / np.sqrt(xn), rtol=1e-5)


def test_shifted_reads_in_a_loop_stay_bounded():
    """x = x[1:] + x[:-1] doubles the distinct index mappings each step: past a budget the
    fuser gives the most-read node a buffer instead of emitting an exponential kernel."""
    an = rng.standard_normal(300).astype(np.float32)
    y, b = tg.tensor(an), an.astype(np.float64)
    for _ in range(20):
        y, b = y[1:] + y[:-1], b[1:] + b[:-1]
    log = kernels(lambda: y.realize())
    assert all(len(k.wgsl) < 400_000 for k in log)
    check(y, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())  # f32 sums of 2^20 terms


def test_very_deep_lazy_chain_does_not_overflow_the_stack():
    y = tg.tensor(np.ones(10, np.float32))
    for _ in range(3000):
        y = y * 0.999 + 0.001
    check(y, np.ones(10, np.float32), rtol=1e-5)
