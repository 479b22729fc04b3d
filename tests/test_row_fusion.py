"""Row kernels (schedule.RowCores, codegen.row_kernel): a reduction over the trailing axes of a
row, read broadcast back over that row by an elementwise map — RMSNorm, layer norm, softmax
written in plain ops — is ONE kernel with a workgroup per row. What fuses is observed through
the kernel log; every value is checked against float64 NumPy, and what must stay separate
kernels stays so, with the same values."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from core_util import check, f16_path, kernels, options, subgroup_path  # noqa: F401 (fixtures)

rng = np.random.default_rng(23)


def names(log):
    return [e.name.split("[")[0] for e in log]


def _rms(x, w=None, eps=1e-5):
    x = x.astype(np.float64)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def _softmax(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _plain_softmax(t):
    e = (t - t.max(-1, keepdims=True)).exp()
    return e / e.sum(-1, keepdims=True)


def _plain_layer_norm(t, eps=1e-5):
    d = t - t.mean(-1, keepdims=True)
    return d * ((d * d).mean(-1, keepdims=True) + eps).rsqrt()


@pytest.mark.parametrize("T,C", [(1, 2048), (7, 300), (33, 64)])
def test_rms_norm_is_one_kernel(T, C, f16_path, subgroup_path):
    """tg.nn.rms_norm (plain ops): one row kernel, with and without shader-f16 and subgroups."""
    x = (rng.standard_normal((T, C)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    y = tg.nn.rms_norm(tg.tensor(x), tg.tensor(w), 1e-5)
    log = kernels(lambda: y.realize())
    assert [n.split("_")[0] for n in names(log)] == ["RE"], names(log)
    check(y, _rms(x, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_of_float16_rows():
    x = (rng.standard_normal((5, 256)) * 2).astype(np.float16)
    y = tg.nn.rms_norm(tg.tensor(x))
    assert len(kernels(lambda: y.realize())) == 1
    check(y, _rms(x.astype(np.float32), eps=1e-6), rtol=2e-3, atol=2e-3, dtype=tg.float16)


def test_softmax_and_layer_norm_in_plain_ops_are_one_kernel():
    """Two reductions in a row (the second's input reads the first's row value): still one kernel."""
    x = (rng.standard_normal((6, 500)) * 4).astype(np.float32)
    t = tg.tensor(x)
    for y, want in ((_plain_softmax(t), _softmax(x)),
                    (_plain_layer_norm(t), (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5))):
        log = kernels(lambda: y.realize())
        assert len(log) == 1 and names(log)[0].startswith("RE_"), names(log)
        check(y, want, rtol=1e-5, atol=1e-6)


def test_row_values_follow_numpy_for_nan_and_inf():
    """max propagates NaN (NumPy's rule) through the workgroup's combine; -inf rows give NaN."""
    x = rng.standard_normal((4, 100)).astype(np.float32)
    x[1, 17] = np.nan
    x[2, :] = -np.inf
    x[3, 5] = np.inf
    t = tg.tensor(x)
    y = t - t.max(-1, keepdims=True)
    assert len(kernels(lambda: y.realize())) == 1
    with np.errstate(invalid="ignore"):
        check(y, x - x.max(-1, keepdims=True))


def test_rows_over_two_trailing_axes_and_int_and_bool_maps():
    """A norm over the last two axes ([B, H, D] over H and D), an int32 row sum, a bool map."""
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    t = tg.tensor(x)
    y = t / (t * t).sum((1, 2), keepdims=True).sqrt()
    assert len(kernels(lambda: y.realize())) == 1
    check(y, x / np.sqrt((x.astype(np.float64) ** 2).sum((1, 2), keepdims=True)), rtol=1e-5, atol=1e-6)
    xi = rng.integers(-50, 50, (5, 33)).astype(np.int32)
    ti = tg.tensor(xi)
    yi = ti * 3 - ti.sum(-1, keepdims=True)
    assert len(kernels(lambda: yi.realize())) == 1
    check(yi, xi * 3 - xi.sum(-1, keepdims=True))
    b = t == t.max(-1, keepdims=True)
    assert len(kernels(lambda: b.realize())) == 1
    check(b, x == x.max(-1, keepdims=True))


def test_what_stays_separate_kernels():
    """Short rows (one thread per row reduces them), a column reduction read over rows, another
    row's value (s[::-1]), a map much longer than its reduction, a packed float16 result:
    the reduction keeps its own kernel, the values are NumPy's."""
    x = rng.standard_normal((6, 5000)).astype(np.float32)
    t = tg.tensor(x)
    short = tg.tensor(x[:, :12])
    s = t.sum(-1, keepdims=True)
    cases = [(short / short.sum(-1, keepdims=True), x[:, :12] / x[:, :12].sum(-1, keepdims=True)),
             (t - t.mean(0, keepdims=True), x - x.mean(0, keepdims=True)),
             (t / s[::-1], x / x.sum(-1, keepdims=True)[::-1]),
             (t / (t[:, :20] * t[:, :20]).sum(-1, keepdims=True), x / (x[:, :20] ** 2).sum(-1, keepdims=True))]
    for y, want in cases:
        log = kernels(lambda: y.realize())
        assert len(log) == 2 and not any(n.startswith("RE_") for n in names(log)), names(log)
        check(y, want, rtol=1e-4, atol=1e-5)
    with options(use_f16=False):
        y = tg.nn.rms_norm(t[:, :300]).astype(tg.float16)
        log = kernels(lambda: y.realize())
        assert not any(n.startswith("RE_") for n in names(log)), names(log)
    check(y, _rms(x[:, :300], eps=1e-6), rtol=2e-3, atol=2e-3, dtype=tg.float16)


def test_reduction_read_elsewhere_too():
    """The row sums are also a result of the realize: computed once in their own kernel, and
    the map reads them (no second copy of the reduction)."""
    x = rng.standard_normal((4, 300)).astype(np.float32)
    t = tg.tensor(x)
    s = t.sum(-1, keepdims=True)
    y = t / s
    log = kernels(lambda: tg.realize(y, s))
    assert len(log) == 2, names(log)
    check(y, x / x.astype(np.float64).sum(-1, keepdims=True), rtol=1e-4, atol=1e-5)
    check(s, x.astype(np.float64).sum(-1, keepdims=True), rtol=1e-5, atol=1e-4)


def test_row_kernel_under_capture_reads_a_slice_at_a_step_variable():
    """rms_norm(x[p:p+T]) with p a step variable: the slice start is a kernel parameter of the
    row kernel, so one trace serves every p."""
    x = rng.standard_normal((20, 256)).astype(np.float32)
    w = rng.standard_normal(256).astype(np.float32)
    X, W = tg.tensor(x), tg.tensor(w)
    f = tg.capture(lambda p: tg.nn.rms_norm(X[p:p + 4], W, 1e-5) * 2.0)
    for p in (0, 3, 16, 7):
        np.testing.assert_allclose(f(p).numpy(), 2 * _rms(x[p:p + 4], w), rtol=1e-5, atol=1e-5)
    assert sum(len(e[1]) for e in f.traces.values()) == 1


def test_storage_buffer_limit():
    """A map reading many inputs under a low storage-buffer limit: inputs are materialized
    until the kernel fits; the values stay NumPy's."""
    xs = [rng.standard_normal((3, 64)).astype(np.float32) for _ in range(6)]
    ts = [tg.tensor(v) for v in xs]
    with options(max_storage_buffers=4):
        y = ts[0] / (ts[0] * ts[1]).sum(-1, keepdims=True)
        for t in ts[2:]:
            y = y + t
        y.realize()
    want = xs[0] / (xs[0].astype(np.float64) * xs[1]).sum(-1, keepdims=True) + sum(xs[2:])
    check(y, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_row_patterns_property(data):
    """Random leading shapes, row lengths, input layouts (contiguous, transposed leading axes,
    a column slice) and patterns: the value equals float64 NumPy's; a contiguous row of more
    than 16 elements is one kernel."""
    draw = data.draw
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    C = draw(st.integers(1, 700))
    layout = draw(st.sampled_from(["plain", "lead_T", "col_slice"]))
    pattern = draw(st.sampled_from(["rms", "softmax", "layer_norm", "sub_max", "div_sum", "min_scale"]))
    x = (np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(lead + (C + 3,)) * 2).astype(np.float32)
    t = tg.tensor(x)
    if layout == "lead_T" and len(lead) >= 2:
        t, x = t.swapaxes(0, 1), x.swapaxes(0, 1)
    if layout == "col_slice":
        t, x = t[..., 2:2 + C], x[..., 2:2 + C]
    else:
        t, x = t[..., :C], x[..., :C]
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        y, want = {
            "rms": (tg.nn.rms_norm(t, eps=1e-5), _rms(x, eps=1e-5)),
            "softmax": (_plain_softmax(t), _softmax(x)),
            "layer_norm": (_plain_layer_norm(t), (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)),
            "sub_max": (t - t.max(-1, keepdims=True), x64 - x64.max(-1, keepdims=True)),
            "div_sum": (t / (t.abs().sum(-1, keepdims=True) + 1), x64 / (np.abs(x64).sum(-1, keepdims=True) + 1)),
            "min_scale": ((t - t.min(-1, keepdims=True)) * 0.5, (x64 - x64.min(-1, keepdims=True)) * 0.5),
        }[pattern]
    log = kernels(lambda: y.realize())
    if C > 16:
        assert len(log) == 1 and names(log)[0].startswith("RE_"), (pattern, layout, names(log))
    check(y, want, rtol=1e-4, atol=1e-5)


def test_norm_of_a_matmul_with_residual():
    """rms_norm(r + x @ w.T): the matmul keeps the residual add in its store (one kernel), the
    norm reads its result (one row kernel); `r + x @ w.T` * 2 read elsewhere stays right."""
    x = rng.standard_normal((40, 64)).astype(np.float32)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    r = rng.standard_normal((40, 96)).astype(np.float32)
    h = tg.tensor(r) + tg.tensor(x) @ tg.tensor(w).T
    y = tg.nn.rms_norm(h, eps=1e-5)
    log = kernels(lambda: y.realize())
    assert len(log) == 2 and names(log)[1].startswith("RE_"), names(log)
    hh = r + x.astype(np.float64) @ w.T
    check(y, _rms(hh), rtol=1e-4, atol=1e-5)
    check(h * 2, 2 * hh, rtol=1e-4, atol=1e-4)
