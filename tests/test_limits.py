"""Generated code stays inside limits that give silently wrong numbers (lavapipe stops a loop
after 65,535 iterations and miscomputes if/else chains deeper than ~78: LAVAPIPE-FACTS.md), and
sizes the kernels cannot index are refused before anything is built. Each case below returned a
wrong value with no error before the bounds (schedule.MAX_THREAD_TRIPS, MAX_SELECT_CHAIN)."""
import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime, schedule


def test_sum_of_2_to_the_24_ones():
    assert tg.ones((1 << 24,)).sum().item() == float(1 << 24)        # was 1,048,560


def test_mean_of_4096_squared_ones():
    assert tg.ones((4096, 4096)).mean().item() == 1.0                # was 0.0625


def test_strided_reductions_over_16m_elements():
    a = np.arange(1 << 24, dtype=np.float32).reshape(4096, 4096)
    t = tg.tensor(a)
    assert t.T.max().item() == a.max()                                # a transposed (strided) view
    np.testing.assert_array_equal(t[:, ::2].max(1).numpy(), a[:, ::2].max(1))
    small = tg.tensor(a % 5)                                          # sums exact in float32
    np.testing.assert_array_equal(small.T.sum(1).numpy(), (a % 5).T.sum(1))
    assert small.T.sum().item() == float((a % 5).sum())
    assert t.T.argmax().item() == int(np.argmax(a.T))


def test_no_generated_loop_passes_the_bound():
    """Every reduction kernel's loops, read from its WGSL, run at most MAX_THREAD_TRIPS times."""
    import re
    with tg.debug.kernel_log() as log:
        tg.ones((1 << 24,)).sum().item()
        tg.ones((4096, 4096)).T.sum(0).numpy()
        tg.ones((300000, 256)).sum(0).numpy()
    checked = 0
    for k in log:
        for m in re.finditer(r"for \(var r = ([^;]*); r < ([^;]*); r = r \+ (\d+)u\)", k.wgsl):
            n = re.findall(r"(\d+)u", m.group(2))
            if not n:
                continue
            span = int(n[-1]) if "min(" not in m.group(2) else int(re.findall(r"\((?:c \+ 1u\)) \* (\d+)u", m.group(2))[0])
            assert span / int(m.group(3)) <= schedule.MAX_THREAD_TRIPS, (k.name, m.group(0))
            checked += 1
    assert checked >= 3, [k.wgsl for k in log]


def test_cat_of_200_pieces_of_one_buffer():
    x = tg.tensor(np.arange(200, dtype=np.float32))
    got = tg.cat([x[i:i + 1] + 0 for i in range(200)]).numpy()       # one binding, 200-deep chain
    np.testing.assert_array_equal(got, np.arange(200))                # was 122 wrong values


def test_cat_of_100_constants_and_a_nested_chain():
    np.testing.assert_array_equal(tg.cat([tg.full((1,), float(i)) for i in range(100)]).numpy(), np.arange(100))
    x = tg.tensor(np.arange(100, dtype=np.float32))
    y = x[0:1]
    for i in range(1, 100):
        y = tg.cat([y, x[i:i + 1]])                                   # cat inlined into cat, 99 deep
    np.testing.assert_array_equal(y.numpy(), np.arange(100))          # was 22 wrong values


def test_reduction_over_more_than_2_to_the_31_elements_is_refused_at_the_call():
    with pytest.raises(ValueError, match=r"sum over a tensor of shape \(8589934592,\) reads 8589934592 elements"):
        tg.ones((1 << 33,)).sum()
    with pytest.raises(ValueError, match="at most 2147483647"):
        tg.ones((1 << 16, 1 << 16)).max()


def test_huge_creations_are_refused_before_building_the_host_array():
    lim = runtime.get_device().max_binding_size
    with pytest.raises(ValueError, match=rf"arange\(0, 2147483648, 1\).*8589934592 bytes.*{lim}"):
        tg.arange(1 << 31)                                            # was OOM-killed
    with pytest.raises(ValueError, match="needs"):
        tg.rand(1 << 20, 1 << 12)
    with pytest.raises(TypeError, match=r"dimensions must be ints, got 2.5"):
        tg.zeros((2.5,))


# ----------------------------------------------------------------------------- memory bounds


def test_pipeline_cache_is_bounded_lru():
    old = runtime.OPTIONS.max_pipelines
    runtime.OPTIONS.max_pipelines = 16
    try:
        x = tg.tensor(np.ones(64, np.float32))
        for n in range(1, 41):
            (x[:n] * 3 + 1).numpy()                                   # a new kernel source per n
        assert len(runtime._pipelines) <= 16
        assert runtime.STATS["pipelines_evicted"] > 0
        before = runtime.STATS["pipelines_compiled"]
        (x[:40] * 3 + 1).numpy()                                      # the most recent one is kept
        assert runtime.STATS["pipelines_compiled"] == before
    finally:
        runtime.OPTIONS.max_pipelines = old


def test_pool_releases_memory_on_trim_and_past_the_high_water_mark():
    tg.debug.trim()
    for n in (1 << 16, 1 << 18, 1 << 20):
        (tg.tensor(np.ones(n, np.float32)) * 2).numpy()
    assert tg.debug.memory()["free"] > 0
    released = tg.debug.trim()
    assert released > 4 << 20 and tg.debug.memory()["free"] == 0
    old = runtime.OPTIONS.pool_high_water
    runtime.OPTIONS.pool_high_water = 1 << 20
    try:
        for n in range(20):
            (tg.tensor(np.ones(100_000 + 20_000 * n, np.float32)) + 1).numpy()   # 20 size classes
            assert tg.debug.memory()["free"] <= 1 << 20
    finally:
        runtime.OPTIONS.pool_high_water = old
