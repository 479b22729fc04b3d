"""On-GPU sampling against sample_reference (float64 NumPy) for the same uniform number."""
from pathlib import Path

import numpy as np
import pytest

from tensorgpu import runtime
from tensorgpu.kernels.sampling import KCAP, sample, sample_reference

rng = np.random.default_rng(21)


def gpu_pick(logits, **kw):
    out = runtime.Buffer(4)
    sample(out, runtime.upload(np.asarray(logits, np.float32)), len(logits), **kw)
    return int(np.frombuffer(runtime.read(out, 0, 4), np.int32)[0])


def agree(logits, T, k, p, u, ref_prev=None, **kw):
    """GPU == reference, or the reference itself flips within float32 rounding of u."""
    g = gpu_pick(logits, temperature=T, top_k=k, top_p=p, rand=u, **kw)
    rkw = dict(repetition_penalty=kw.get("repetition_penalty"), prev_tokens=ref_prev)
    r = sample_reference(logits, T, k, p, u, **rkw)
    if g != r:
        near = {sample_reference(logits, T, k, p, min(max(u + d, 0.0), 0.9999999), **rkw) for d in (-3e-6, 3e-6)}
        assert g in near, f"gpu {g} vs reference {r} (T={T}, k={k}, p={p}, u={u})"
    return g


@pytest.mark.parametrize("V", [1, 2, 37, 1000, 50257])
def test_greedy_first_max_wins(V):
    l = (rng.standard_normal(V) * 3).astype(np.float32)
    if V > 5:
        l[[3, V - 1]] = l.max() + 1.0     # a tie: the first index wins, like numpy.argmax
    assert gpu_pick(l) == int(np.argmax(l)) == sample_reference(l)
    l2 = np.full(V, -np.inf, np.float32)
    l2[V // 2] = -1e30
    assert gpu_pick(l2) == V // 2


SETTINGS = [(1.0, 0, 1.0), (0.7, 40, 1.0), (0.8, 50, 0.9), (1.3, 0, 0.8), (1.0, 1, 1.0), (1.0, 64, 0.5),
            (2.0, KCAP, 0.95)]


@pytest.mark.parametrize("V", [7, 1000, 50257])
@pytest.mark.parametrize("T,k,p", SETTINGS, ids=[f"T{t}-k{k}-p{p}" for t, k, p in SETTINGS])
def test_matches_reference(V, T, k, p):
    l = (rng.standard_normal(V) * 2.5).astype(np.float32)
    for u in (0.0, 0.5, float(rng.random()), 0.9999):
        agree(l, T, k, p, u)


def test_distribution_follows_probabilities():
    """Over a sweep of u the picks reproduce the top-k/top-p renormalised distribution."""
    l = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    us = (np.arange(200) + 0.5) / 200
    picks = [gpu_pick(l, temperature=1.0, top_k=4, top_p=0.8, rand=float(u)) for u in us[::10]]
    refs = [sample_reference(l, 1.0, 4, 0.8, float(u)) for u in us[::10]]
    assert picks == refs
    assert set(picks) == {0, 1, 2}           # top-p 0.8 keeps 0.4 + 0.3 + 0.15


def test_ties_at_kth_value_break_by_lower_id():
    l = np.zeros(100, np.float32)
    l[[10, 20, 30]] = 5.0
    picks = {gpu_pick(l, temperature=1.0, top_k=5, rand=u) for u in np.linspace(0, 0.999, 25)}
    # candidates: 10, 20, 30 and then the two lowest ids among the zeros: 0 and 1
    assert picks <= {10, 20, 30, 0, 1} and {10, 20, 30} <= picks
    assert picks == {sample_reference(l, 1.0, 5, 1.0, u) for u in np.linspace(0, 0.999, 25)}


def test_repetition_penalty_changes_the_winner():
    l = np.array([1.0, 5.0, 4.5, -2.0, 0.0], np.float32)
    prev = runtime.upload(np.array([1, 1, 3, 99, -4], np.int32))   # out-of-range ids are ignored
    out = runtime.Buffer(4)
    sample(out, runtime.upload(l), 5, repetition_penalty=1.2, prev_tokens=prev, n_prev=5)
    assert int(np.frombuffer(runtime.read(out), np.int32)[0]) == 2 == \
        sample_reference(l, repetition_penalty=1.2, prev_tokens=[1, 1, 3, 99, -4])
    # only the first n_prev ids count: with n_prev=0 nothing is penalised
    sample(out, runtime.upload(l), 5, repetition_penalty=1.2, prev_tokens=prev, n_prev=0)
    assert int(np.frombuffer(runtime.read(out), np.int32)[0]) == 1
    V = 3000
    big = (rng.standard_normal(V) * 2).astype(np.float32)
    hist = rng.integers(0, V, 64).astype(np.int32)
    for u in (0.1, 0.6):
        agree(big, 0.9, 20, 0.9, u, repetition_penalty=1.3, prev_tokens=runtime.upload(hist), n_prev=64, ref_prev=hist)


def test_buffers_drive_a_pipelined_loop():
    """rand and n_prev in buffers: the same pipeline and bind group serve every step, and
    append=True keeps the token history on the GPU."""
    V = 500
    logits = runtime.upload((rng.standard_normal(V) * 2).astype(np.float32))
    u = runtime.upload(np.array([0.25], np.float32))
    hist = runtime.upload(np.zeros(8, np.int32))
    n = runtime.upload(np.array([0], np.int32))
    out = runtime.Buffer(4)
    kw = dict(temperature=0.9, top_k=30, rand=u, repetition_penalty=1.1, prev_tokens=hist, n_prev=n, append=True)
    sample(out, logits, V, **kw)
    runtime.sync()
    before = dict(runtime.STATS)
    host = np.frombuffer(runtime.read(logits), np.float32)
    want, prev = [], [int(np.frombuffer(runtime.read(out), np.int32)[0])]
    for step in range(9):
        uu = float(rng.random())
        runtime.write(u, np.array([uu], np.float32))
        sample(out, logits, V, **kw)
        want.append(sample_reference(host, 0.9, 30, 1.0, uu, repetition_penalty=1.1, prev_tokens=prev[:8]))
        got = int(np.frombuffer(runtime.read(out), np.int32)[0])
        assert got == want[-1]
        prev.append(got)
    assert runtime.STATS["pipelines_compiled"] == before["pipelines_compiled"]
    assert runtime.STATS["bind_groups_created"] == before["bind_groups_created"]
    assert list(np.frombuffer(runtime.read(hist), np.int32)) == prev[:8]
    assert int(np.frombuffer(runtime.read(n), np.int32)[0]) == 8      # capped at the capacity


def test_seed_reproduces():
    l = (rng.standard_normal(300)).astype(np.float32)
    a = gpu_pick(l, temperature=1.0, rand=1234)
    b = gpu_pick(l, temperature=1.0, rand=1234)
    assert a == b == sample_reference(l, 1.0, 0, 1.0, float(np.random.default_rng(1234).random()))


def test_errors():
    lb = runtime.upload(np.zeros(10, np.float32))
    out = runtime.Buffer(4)
    with pytest.raises(ValueError, match="rand"):
        sample(out, lb, 10, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(out, lb, 10, temperature=1.0, top_k=KCAP + 1, rand=0.5)
    with pytest.raises(ValueError, match="top_p"):
        sample(out, lb, 10, temperature=1.0, top_p=0.0, rand=0.5)
    with pytest.raises(ValueError, match="prev_tokens"):
        sample(out, lb, 10, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="logits"):
        sample(out, lb, 11)
    with pytest.raises(TypeError, match="append"):
        sample(out, lb, 10, prev_tokens=runtime.Buffer(16), n_prev=2, append=True)


def test_greedy_on_all_nan_logits_is_minus_one():
    """A row of NaN logits has no argmax: the kernel says -1 instead of a silent token 0 (the
    Session turns it into an error); a NaN among numbers never wins."""
    import tensorgpu as tg
    nan = np.float32("nan")
    assert int(tg.nn.sample(tg.tensor(np.full(300, nan, np.float32))).numpy()[0]) == -1
    row = np.arange(300, dtype=np.float32)
    row[7] = nan
    assert int(tg.nn.sample(tg.tensor(row)).numpy()[0]) == 299


def test_u_zero_ignores_weights_below_flt_min():
    """u = 0 draws the first id with a nonzero weight; weights below 2^-126 count as 0 (in float32
    they are subnormal or underflow, and GPUs differ on subnormals). The row is the one
    test_kernel_sample_rows found: ids 0 and 1 weigh < 2^-149, id 2 weighs 2.7e-38."""
    d = np.load(Path(__file__).parent / "data" / "sample_rows_u0_underflow.npz")
    l, T = d["logits"], float(d["temperature"][0])
    assert gpu_pick(l, temperature=T, rand=0.0) == sample_reference(l, T, 0, 1.0, 0.0) == 2
    l2 = np.array([-92.0, 0.0, -1.0], np.float32)      # exp(-92) = 1.1e-40: a subnormal weight
    assert gpu_pick(l2, temperature=1.0, rand=0.0) == sample_reference(l2, 1.0, 0, 1.0, 0.0) == 1
    assert gpu_pick(l2, temperature=1.0, top_p=0.9999, rand=0.9999999) == sample_reference(l2, 1.0, 0, 0.9999, 0.9999999) == 2
