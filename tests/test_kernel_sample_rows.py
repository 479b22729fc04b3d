"""tg.nn.sample_rows (kernels/sampling.py, "many rows") against sample_rows_reference (float64
NumPy): one token per row, every row with its own temperature / top_k / top_p / min_p / u, the
log-softmax of the choice and of the top-N, and the in-place count bump."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from tensorgpu import runtime
from tensorgpu.kernels.sampling import KCAP, MAX_LOGPROBS, sample_row_reference, sample_rows_reference

from core_util import options

rng = np.random.default_rng(14)
F32 = np.float32


def params(T, K, P, M, U):
    return (tg.tensor(np.asarray(T, F32)), tg.tensor(np.asarray(K, np.int32)), tg.tensor(np.asarray(P, F32)),
            tg.tensor(np.asarray(M, F32)), tg.tensor(np.asarray(U, F32)))


def gpu(L, T, K, P, M, U, n=0, counts=None):
    out = tg.nn.sample_rows(tg.tensor(np.asarray(L, F32)), *params(T, K, P, M, U), n_logprobs=n, counts=counts)
    tg.realize(*[t for t in out if t is not None])
    return tuple(None if t is None else t.numpy() for t in out)


def near_choices(l, T, k, p, m, u) -> set:
    """The reference's tokens for u, top_p and min_p moved by float32 rounding: a GPU pick in this
    set agrees (a float32 sum can land on the other side of a boundary the float64 one just missed)."""
    out = set()
    for du in (-3e-6, 0.0, 3e-6):
        for fp in (1 - 1e-5, 1.0, 1 + 1e-5):
            for fm in (1 - 1e-5, 1.0, 1 + 1e-5):
                uu = u if np.isnan(u) else min(max(float(u) + du, 0.0), 0.9999999)
                out.add(sample_row_reference(l, T, k, F32(p * fp), F32(m * fm), uu))
    if not np.isnan(u) and u > 0.9999:
        # near u = 1 a float32 sum over the vocabulary cannot place the threshold: any token in the
        # tail of tiny weights after the float64 pick may be where the GPU's sum crosses it
        out |= sample_row_reference(l, T, k, p, m, u, band=2e-5)
    return out


def check(L, T, K, P, M, U, n=0):
    """GPU tokens, logprobs and top lists against the reference; returns the GPU tokens."""
    L = np.asarray(L, F32)
    T, K, P, M, U = (np.asarray(x, d) for x, d in ((T, F32), (K, np.int32), (P, F32), (M, F32), (U, F32)))
    tok, lp, ids, tlp = gpu(L, T, K, P, M, U, n)
    rtok, rlp, rids, rtlp = sample_rows_reference(L, T, K, P, M, U, n)
    for r in range(L.shape[0]):
        if tok[r] != rtok[r]:
            assert tok[r] in near_choices(L[r], T[r], K[r], P[r], M[r], U[r]), \
                f"row {r}: gpu {tok[r]} vs reference {rtok[r]} (T={T[r]}, k={K[r]}, p={P[r]}, min_p={M[r]}, u={U[r]})"
    # the log-softmax of the token the GPU chose (the same as the reference's unless a rounding flip)
    want_lp = np.array([[_lp(L[r], tok[r])] for r in range(L.shape[0])])
    assert lp.shape == want_lp.shape == rlp.shape
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=2e-5, equal_nan=True)
    if n:
        assert ids.shape == (L.shape[0], n) and tlp.shape == (L.shape[0], n)
        np.testing.assert_array_equal(ids, rids)
        np.testing.assert_allclose(tlp, rtlp, rtol=1e-5, atol=2e-5, equal_nan=True)
    else:
        assert ids is None and tlp is None
    return tok


def _lp(l, t):
    from tensorgpu.kernels.sampling import _row_logprobs
    return _row_logprobs(np.asarray(l, np.float64), [t])[0]


# ----------------------------------------------------------------------------- properties


@st.composite
def rows_case(draw):
    B = draw(st.sampled_from([1, 3, 8]))
    V = draw(st.sampled_from([1, 2, 37, 300, 1000]))
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    L = (r.standard_normal((B, V)) * draw(st.sampled_from([0.1, 2.0, 30.0]))).astype(F32)
    for b in range(B):
        kind = draw(st.sampled_from(["plain", "plain", "ties", "nan", "allnan", "ninf", "pinf", "const"]))
        if kind == "ties":
            L[b] = np.round(L[b])
        elif kind == "nan":
            L[b, r.random(V) < 0.3] = np.nan
        elif kind == "allnan":
            L[b] = np.nan
        elif kind == "ninf":
            L[b, r.random(V) < 0.5] = -np.inf
        elif kind == "pinf":
            L[b, r.integers(0, V)] = np.inf
        elif kind == "const":
            L[b] = 1.5
    T = [draw(st.sampled_from([0.0, 1.0, 0.7, 1e-30, 1e-40, 1e30, np.inf, -1.0, np.nan]) | st.floats(0.05, 4.0))
         for _ in range(B)]
    K = [draw(st.sampled_from([0, 0, 1, 2, V, V + 5, KCAP, KCAP + 1, 700, -3]) | st.integers(1, 64)) for _ in range(B)]
    P = [draw(st.sampled_from([1.0, 1.0, 0.0, 1e-8, 1.5, np.nan]) | st.floats(0.01, 0.999)) for _ in range(B)]
    M = [draw(st.sampled_from([0.0, 0.0, 1e-40, 1.0, 1.5, np.nan]) | st.floats(0.001, 0.9)) for _ in range(B)]
    U = [draw(st.sampled_from([0.0, 0.9999999, 1.0, np.nan]) | st.floats(0.0, 0.9999)) for _ in range(B)]
    n = draw(st.sampled_from([0, 1, 5, MAX_LOGPROBS]))
    return L, T, K, P, M, U, n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rows_case())
def test_matches_reference_over_random_rows_and_parameters(case):
    check(*case)


@pytest.mark.parametrize("sub", [True, False], ids=["subgroups", "no-subgroups"])
@pytest.mark.parametrize("V", [37, 50277])
def test_64_rows_every_row_different(V, sub):
    """B = 64, each row its own settings (greedy, top-k, top-p, min-p, all of them, k > KCAP,
    k > V, tiny and huge temperatures), on both reduction paths."""
    B = 64
    L = (rng.standard_normal((B, V)) * 2.5).astype(F32)
    L[5] = np.round(L[5])
    L[6, ::7] = np.nan
    T = rng.uniform(0.2, 2.0, B).astype(F32)
    T[::5] = 0.0
    T[1], T[2] = 1e-30, 1e30
    K = np.where(rng.random(B) < 0.4, 0, rng.integers(1, 100, B)).astype(np.int32)
    K[3], K[4], K[7] = V + 10, KCAP + 44, 1
    P = np.where(rng.random(B) < 0.5, 1.0, rng.uniform(0.3, 0.99, B)).astype(F32)
    M = np.where(rng.random(B) < 0.6, 0.0, rng.uniform(0.01, 0.5, B)).astype(F32)
    U = rng.random(B).astype(F32)
    with options(use_subgroups=sub):
        check(L, T, K, P, M, U, n=4)


def test_all_paths_fixture_covers_the_reduction_paths(all_paths):
    """The f16 / subgroup switches the other kernel tests flip (logits may arrive as float16)."""
    B, V = 5, 1000
    L = (rng.standard_normal((B, V)) * 2).astype(np.float16)
    T, K, P, M = [0, 0.8, 1.1, 0.9, 1.0], [0, 30, 0, 0, 400], [1, 0.9, 0.7, 1, 1], [0, 0, 0.05, 0.2, 0]
    U = rng.random(B)
    tok, lp, ids, tlp = (t.numpy() if t is not None else None for t in
                         tg.nn.sample_rows(tg.tensor(L), *params(T, K, P, M, U), n_logprobs=3))
    rtok, rlp, rids, rtlp = sample_rows_reference(L.astype(F32), np.array(T, F32), np.array(K, np.int32),
                                                  np.array(P, F32), np.array(M, F32), np.array(U, F32), 3)
    np.testing.assert_array_equal(tok, rtok)
    np.testing.assert_allclose(lp, rlp, rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(tlp, rtlp, rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- exact rules


def test_greedy_first_max_wins_and_nan_never_wins():
    V = 37
    L = np.tile(np.arange(V, dtype=F32), (4, 1))
    L[0, [3, 20]] = 100.0                 # a tie: the first wins
    L[1, 36] = np.nan                     # NaN never wins
    L[2] = np.nan                         # all NaN: -1
    L[3] = -np.inf                        # all -inf: the first id
    tok, lp, _, _ = gpu(L, [0] * 4, [0] * 4, [1] * 4, [0] * 4, [0.5] * 4)
    assert list(tok) == [3, 35, -1, 0]
    assert np.isnan(lp[2, 0]) and np.isnan(lp[3, 0])
    np.testing.assert_allclose(lp[:2, 0], [_lp(L[0], 3), _lp(L[1], 35)], rtol=1e-6)


def test_logprobs_are_before_temperature():
    """The reported log-probability is the model's (log-softmax of the logits as given), not the
    temperature-scaled distribution the token was drawn from."""
    l = np.log(np.array([0.5, 0.3, 0.2], F32))
    tok, lp, ids, tlp = gpu(l[None], [3.0], [0], [1.0], [0.0], [0.0], n=3)
    assert tok[0] == 0
    np.testing.assert_allclose(lp[0, 0], np.log(0.5), rtol=1e-6)
    assert list(ids[0]) == [0, 1, 2]
    np.testing.assert_allclose(tlp[0], np.log([0.5, 0.3, 0.2]), rtol=1e-6)


def test_top_n_past_the_vocabulary_is_padded():
    tok, lp, ids, tlp = gpu(np.array([[1.0, 3.0, 2.0]], F32), [0], [0], [1], [0], [0], n=5)
    assert list(ids[0]) == [1, 2, 0, -1, -1]
    assert np.all(np.isneginf(tlp[0, 3:])) and np.all(np.isfinite(tlp[0, :3]))


def test_distribution_follows_the_filtered_probabilities():
    """A sweep of u reproduces top-k / top-p / min-p renormalised distributions exactly."""
    p = np.array([0.35, 0.25, 0.15, 0.1, 0.08, 0.07], F32)
    l = np.log(p)
    us = ((np.arange(100) + 0.5) / 100).astype(F32)
    B = us.size
    cases = {"top_k=3": (3, 1.0, 0.0, {0: 0.35 / 0.75, 1: 0.25 / 0.75, 2: 0.15 / 0.75}),
             "top_p=0.55": (0, 0.55, 0.0, {0: 0.35 / 0.6, 1: 0.25 / 0.6}),
             "min_p=0.4": (0, 1.0, 0.4, {0: 0.35 / 0.75, 1: 0.25 / 0.75, 2: 0.15 / 0.75}),
             "k=300>V": (300, 1.0, 0.0, dict(enumerate(p)))}
    for name, (k, tp, mp, want) in cases.items():
        tok, *_ = gpu(np.tile(l, (B, 1)), [1.0] * B, [k] * B, [tp] * B, [mp] * B, us)
        freq = {t: np.mean(tok == t) for t in set(tok.tolist())}
        assert set(freq) == set(want), name
        for t, f in want.items():
            assert abs(freq[t] - f) <= 0.011, (name, t, freq[t], f)


def test_top_k_above_kcap_draws_from_exactly_the_k_best():
    """top_k > 256 with top_p = 1 and no min_p draws over exactly the k best (a masked inverse-CDF
    walk), ties at the k-th value by lower id."""
    V, k = 2000, 600
    l = np.zeros(V, F32)
    l[rng.choice(V, 550, replace=False)] = 1.0       # 550 ones, then ties at 0 fill the last 50
    B = 64
    us = rng.random(B).astype(F32)
    tok, *_ = gpu(np.tile(l, (B, 1)), [1.0] * B, [k] * B, [1.0] * B, [0.0] * B, us)
    allowed = set(np.nonzero(l == 1.0)[0]) | set(np.nonzero(l == 0.0)[0][:50])
    assert set(tok.tolist()) <= allowed
    assert list(tok) == [sample_row_reference(l, 1.0, k, 1.0, 0.0, u) for u in us]


def test_temperature_extremes():
    V = 300
    l = (rng.standard_normal(V) * 2).astype(F32)
    l[[17, 230]] = l.max() + 1                       # two tied maxima
    us = np.linspace(0, 0.999, 16).astype(F32)
    B = us.size
    tiny, *_ = gpu(np.tile(l, (B, 1)), [1e-30] * B, [0] * B, [1.0] * B, [0.0] * B, us)
    assert set(tiny.tolist()) == {17, 230}           # only the maxima; u splits them
    sub, *_ = gpu(np.tile(l, (B, 1)), [1e-40] * B, [0] * B, [1.0] * B, [0.0] * B, us)
    assert set(sub.tolist()) == {17}                 # a subnormal temperature is greedy
    huge, *_ = gpu(np.tile(l, (B, 1)), [1e30] * B, [0] * B, [1.0] * B, [0.0] * B, us)
    assert list(huge) == [int(u * V) for u in us]    # uniform: u picks id floor(u * V)


def test_min_p_edges():
    l = np.array([2.0, 2.0, 1.0, 0.0, -1.0], F32)
    us = np.linspace(0, 0.999, 20).astype(F32)
    B = us.size
    one, *_ = gpu(np.tile(l, (B, 1)), [1.0] * B, [0] * B, [1.0] * B, [1.0] * B, us)
    assert set(one.tolist()) == {0, 1}               # min_p = 1: the tied maxima only
    over, *_ = gpu(np.tile(l, (B, 1)), [1.0] * B, [0] * B, [1.0] * B, [7.0] * B, us)
    assert set(over.tolist()) == {0}                 # min_p > 1: the first is always kept
    off = check(np.tile(l, (B, 1)), [1.0] * B, [0] * B, [1.0] * B, [0.0] * B, us)
    assert set(off.tolist()) == {0, 1, 2, 3, 4}


def test_u_zero_picks_the_first_id_with_a_weight_above_flt_min():
    """The row hypothesis found (V = 300 > KCAP, T = 0.0625, k = 0, p = 1, no min_p, u = 0): the
    draw is the first id with a nonzero weight. Ids 0 and 1 have weights 3.7e-51 and 4.7e-54
    (nonzero in float64, 0 in float32), id 2 has 2.7e-38. Weights below 2^-126 count as 0 in the
    kernel and the reference alike, so both pick id 2 (the reference used to pick 0)."""
    d = np.load(Path(__file__).parent / "data" / "sample_rows_u0_underflow.npz")
    l, T = d["logits"], float(d["temperature"][0])
    w = np.exp((l.astype(np.float64) - l.max()) / T)
    assert l.shape == (300,) and 0 < w[0] < 2.0**-149 and 0 < w[1] < 2.0**-149 and 2.0**-126 <= w[2] < 1e-37
    assert sample_row_reference(l, T, 0, 1.0, 0.0, 0.0) == 2
    B = 3                                   # u = 0, the smallest subnormal u, and one past the first weight
    U = np.array([0.0, 1e-45, 3e-38], F32)      # u * sum(w) = 3.4e-38 passes w[2]
    tok = check(np.tile(l, (B, 1)), [T] * B, [0] * B, [1.0] * B, [0.0] * B, U)
    assert list(tok) == [2, 2, 3]
    # a subnormal float32 weight (exp(-92) = 1.1e-40) counts as 0 whether or not the GPU flushes
    # subnormals, on the id-order walk (V > KCAP) and on the sorted candidates (top_k = 300)
    l2 = np.full(300, -200.0, F32)
    l2[0], l2[5], l2[7] = -92.0, 0.0, -1.0
    for k in (0, 300):
        assert sample_row_reference(l2, 1.0, k, 1.0, 0.0, 0.0) == 5
        tok, *_ = gpu(l2[None], [1.0], [k], [1.0], [0.0], [0.0])
        assert tok[0] == 5, k


def test_top_k_one_is_argmax_whatever_u():
    l = (rng.standard_normal((6, 50277))).astype(F32)
    tok, *_ = gpu(l, [1.5] * 6, [1] * 6, [0.9] * 6, [0.1] * 6, rng.random(6))
    assert list(tok) == list(np.argmax(l, axis=1))


def test_broadcast_parameters():
    """A parameter may be one value for every row (a stride-0 view), e.g. tg.full."""
    B, V = 4, 100
    L = (rng.standard_normal((B, V)) * 2).astype(F32)
    U = rng.random(B).astype(F32)
    out = tg.nn.sample_rows(tg.tensor(L), tg.full((B,), 0.8, tg.float32), tg.full((B,), 10, tg.int32),
                            tg.full((B,), 1.0, tg.float32), tg.full((B,), 0.0, tg.float32), tg.tensor(U))
    np.testing.assert_array_equal(out.tokens.numpy(), sample_rows_reference(L, [0.8] * B, [10] * B, [1.0] * B,
                                                                            [0.0] * B, U)[0])


def test_under_a_low_storage_buffer_limit():
    """With counts the kernel binds 9 buffers; at a limit of 8 the float parameters travel as rows
    of one tensor and the result is the same."""
    B, V = 3, 500
    L = (rng.standard_normal((B, V)) * 2).astype(F32)
    T, K, P, M, U = [0.9, 1.0, 0.0], [20, 0, 0], [0.9, 1.0, 1.0], [0.0, 0.1, 0.0], rng.random(B)
    want = sample_rows_reference(L, np.array(T, F32), K, np.array(P, F32), np.array(M, F32), np.array(U, F32))[0]
    with options(max_storage_buffers=8):
        c = tg.zeros((B, V), tg.int32).contiguous().realize()
        with tg.debug.kernel_log() as log:
            out = tg.nn.sample_rows(tg.tensor(L), *params(T, K, P, M, U), counts=c)
            tok = out.tokens.numpy()
        assert max(e.buffers for e in log) <= 8
        assert any(e.name.startswith("sample_rows") for e in log)
    np.testing.assert_array_equal(tok, want)
    assert c.numpy()[np.arange(B), tok].tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------- counts


def test_counts_bump_in_place_after_earlier_reads():
    """counts[row, token] += 1 in the same kernel; a read of the table built before the call sees
    the old counts, one built after sees the new ones; rows past B and NaN rows are untouched."""
    S, B, V = 6, 4, 50
    start = rng.integers(0, 3, (S, V)).astype(np.int32)
    table = tg.tensor(start).contiguous().realize()
    before = table.sum()                              # built before: the old contents
    L = (rng.standard_normal((B, V)) * 2).astype(F32)
    L[2] = np.nan
    with tg.debug.kernel_log() as log:
        out = tg.nn.sample_rows(tg.tensor(L), *params([0.0, 1.0, 1.0, 0.7], [0, 0, 5, 3], [1] * 4, [0] * 4,
                                                     rng.random(B)), n_logprobs=2, counts=table[:B])
        after = table.sum()                           # built after: the new contents
        tok = out.tokens.numpy()
        got_after, got_before = int(after.numpy()), int(before.numpy())
    assert tok[2] == -1
    assert got_before == int(start.sum()) and got_after == int(start.sum()) + 3
    want = start.copy()
    for r in range(B):
        if tok[r] >= 0:
            want[r, tok[r]] += 1
    np.testing.assert_array_equal(table.numpy(), want)
    assert sum(e.name.startswith("sample_rows") for e in log) == 1     # tokens, logprobs, top-N, counts: one kernel


def test_counts_feed_a_frequency_penalty_step_after_step():
    """The lead's pattern: penalties are plain ops on the logits using the counts, the sampling
    bumps the counts; greedy decoding of a fixed row then walks down the logits one by one."""
    B, V = 2, 40
    base = np.stack([np.linspace(3, 0, V), np.linspace(0, 3, V)]).astype(F32)
    counts = tg.zeros((8, V), tg.int32).contiguous().realize()
    logits = tg.tensor(base)
    z = tg.zeros((B,), tg.float32)
    seen = []
    for step in range(5):
        pen = logits - counts[:B].astype(tg.float32) * 10.0          # frequency penalty 10
        out = tg.nn.sample_rows(pen, z, tg.zeros((B,), tg.int32), z + 1.0, z, z, counts=counts[:B])
        seen.append(out.tokens.numpy().tolist())
    assert seen == [[s, V - 1 - s] for s in range(5)]
    c = counts.numpy()
    assert c[:B].sum() == 10 and c[B:].sum() == 0


def test_counts_errors():
    L = tg.tensor(np.zeros((2, 10), F32))
    p = params([0, 0], [0, 0], [1, 1], [0, 0], [0, 0])
    with pytest.raises(ValueError, match=r"counts must be an int32 tensor of shape \(2, 10\)"):
        tg.nn.sample_rows(L, *p, counts=tg.zeros((2, 11), tg.int32).contiguous().realize())
    with pytest.raises(ValueError, match="counts must be an int32"):
        tg.nn.sample_rows(L, *p, counts=tg.zeros((2, 10), tg.float32).contiguous().realize())
    with pytest.raises(ValueError, match="realized"):
        tg.nn.sample_rows(L, *p, counts=tg.zeros((2, 10), tg.int32) + 1)
    with pytest.raises(ValueError, match="strides"):
        tg.nn.sample_rows(L, *p, counts=tg.zeros((10, 2), tg.int32).contiguous().realize().T)
    with pytest.raises(TypeError, match="counts"):
        tg.nn.sample_rows(L, *p, counts=np.zeros((2, 10), np.int32))


# ----------------------------------------------------------------------------- capture


def test_capture_replays_with_new_per_row_parameters():
    """A captured decode-like step (penalty from the counts + sample_rows bumping them) replays
    with new logits and parameters: results follow the reference, nothing compiles."""
    B, V = 4, 300
    counts = tg.zeros((B, V), tg.int32).contiguous().realize()

    @tg.capture
    def step(logits, T, K, P, M, U):
        pen = logits - counts.astype(tg.float32) * 0.5
        return tg.nn.sample_rows(pen, T, K, P, M, U, n_logprobs=2, counts=counts)

    host_counts = np.zeros((B, V), np.int32)
    for i in range(4):
        L = (rng.standard_normal((B, V)) * 2).astype(F32)
        T = rng.uniform(0.5, 1.5, B).astype(F32)
        T[i % B] = 0.0
        K = rng.integers(0, 50, B).astype(np.int32)
        P = np.where(rng.random(B) < 0.5, 1.0, 0.9).astype(F32)
        M = np.where(rng.random(B) < 0.5, 0.0, 0.05).astype(F32)
        U = rng.random(B).astype(F32)
        if i == 1:
            before = tg.debug.stats()
        out = step(tg.tensor(L), tg.tensor(T), tg.tensor(K), tg.tensor(P), tg.tensor(M), tg.tensor(U))
        pen = L - host_counts.astype(F32) * 0.5
        tok = out.tokens.numpy()
        rtok, rlp, rids, _ = sample_rows_reference(pen, T, K, P, M, U, 2)
        for r in range(B):
            assert tok[r] == rtok[r] or tok[r] in near_choices(pen[r], T[r], K[r], P[r], M[r], U[r])
        np.testing.assert_array_equal(out.top_ids.numpy(), rids)
        host_counts[np.arange(B), tok] += 1
        np.testing.assert_array_equal(counts.numpy(), host_counts)
    after = tg.debug.stats()
    assert after["captures_traced"] - before["captures_traced"] == 0
    assert after["captures_replayed"] - before["captures_replayed"] == 3
    assert after["pipelines_compiled"] == before["pipelines_compiled"]


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_what_is_wrong():
    B, V = 3, 10
    L = tg.tensor(np.zeros((B, V), F32))
    good = dict(temperature=tg.zeros((B,)), top_k=tg.zeros((B,), tg.int32), top_p=tg.ones((B,)),
                min_p=tg.zeros((B,)), u=tg.zeros((B,)))

    def call(logits=L, n_logprobs=0, **over):
        kw = dict(good, **over)
        return tg.nn.sample_rows(logits, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"], kw["u"],
                                 n_logprobs=n_logprobs)

    with pytest.raises(ValueError, match=r"logits must be \[B, V\].*\(10,\)"):
        call(logits=tg.tensor(np.zeros(V, F32)))
    with pytest.raises(ValueError, match=r"logits must be \[B, V\]"):
        call(logits=tg.tensor(np.zeros((0, V), F32)))
    with pytest.raises(TypeError, match="logits must be float32.*int32"):
        call(logits=tg.zeros((B, V), tg.int32))
    with pytest.raises(TypeError, match="logits must be a float32 tensor"):
        call(logits=np.zeros((B, V), F32))
    with pytest.raises(ValueError, match=r"temperature must be a tensor of dtype float32 and shape \(3,\).*\(4,\)"):
        call(temperature=tg.zeros((B + 1,)))
    with pytest.raises(ValueError, match=r"top_k must be a tensor of dtype int32 and shape \(3,\).*got float32"):
        call(top_k=tg.zeros((B,)))
    with pytest.raises(ValueError, match=r"top_p must be a tensor of dtype float32.*got int32"):
        call(top_p=tg.zeros((B,), tg.int32))
    with pytest.raises(ValueError, match=r"min_p must be .*float32 \(3, 1\)"):
        call(min_p=tg.zeros((B, 1)))
    with pytest.raises(TypeError, match="u must be a tensor of dtype float32"):
        call(u=0.5)
    with pytest.raises(ValueError, match=r"n_logprobs must be an int in \[0, 20\], got 21"):
        call(n_logprobs=21)
    with pytest.raises(ValueError, match="n_logprobs"):
        call(n_logprobs=True)
    with pytest.raises(ValueError, match="n_logprobs"):
        call(n_logprobs=-1)


def test_kernel_level_errors():
    from tensorgpu import dtypes
    from tensorgpu.kernels.common import Operand
    from tensorgpu.kernels.sampling import sample_rows
    B, V = 2, 8
    lb = runtime.upload(np.zeros(B * V, F32))
    logits = Operand(lb, dtypes.float32, (B, V), (V, 1))
    f = lambda: Operand(runtime.upload(np.zeros(B, F32)), dtypes.float32, (B,), (1,))   # noqa: E731
    ps = dict(temperature=f(), top_k=Operand(runtime.upload(np.zeros(B, np.int32)), dtypes.int32, (B,), (1,)),
              top_p=f(), min_p=f(), u=f())
    oi, of = runtime.Buffer(4 * B), runtime.Buffer(4 * B)
    with pytest.raises(ValueError, match="out_ints holds 4 bytes, needs 8"):
        sample_rows(runtime.Buffer(4), of, logits, ps)
    with pytest.raises(ValueError, match=r"min_p must be a float32 \[2\] Operand"):
        sample_rows(oi, of, logits, dict(ps, min_p=Operand(lb, dtypes.float32, (3,), (1,))))
    with pytest.raises(ValueError, match="params must be exactly"):
        sample_rows(oi, of, logits, {k: v for k, v in ps.items() if k != "u"})
    with pytest.raises(ValueError, match="unit stride along V"):
        sample_rows(oi, of, Operand(lb, dtypes.float32, (B, V), (1, B)), ps)
    with pytest.raises(ValueError, match="reaches element"):
        sample_rows(oi, of, Operand(lb, dtypes.float32, (B, V), (V, 1), 3), ps)
    with pytest.raises(ValueError, match="counts rows must be unit-stride and not overlap"):
        sample_rows(oi, of, logits, ps, counts=Operand(runtime.Buffer(4 * B * V), dtypes.int32, (B, V), (1, 1)))
    with pytest.raises(ValueError, match="out_ints and out_floats are the same Buffer"):
        sample_rows(oi, oi, logits, ps)


def test_one_prompt_many_draws_through_a_broadcast_row():
    """OpenAI's `n`: one row of logits read by B rows (a stride-0 view), each with its own u."""
    V, B = 500, 8
    l = (rng.standard_normal(V) * 2).astype(F32)
    U = np.linspace(0.05, 0.95, B).astype(F32)
    rows = tg.tensor(l)[None].expand(B, V)
    assert rows.view.strides[0] == 0
    out = tg.nn.sample_rows(rows, *params([0.9] * B, [50] * B, [0.95] * B, [0.0] * B, U), n_logprobs=2)
    want = sample_rows_reference(np.tile(l, (B, 1)), [0.9] * B, [50] * B, [0.95] * B, [0.0] * B, U, 2)
    np.testing.assert_array_equal(out.tokens.numpy(), want[0])
    np.testing.assert_array_equal(out.top_ids.numpy(), want[2])
    assert len(set(out.tokens.numpy().tolist())) > 1
