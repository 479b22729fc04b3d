"""tg.einsum against np.einsum: what a transformer writes (attention scores and values, a
matmul, transposes, sums), implicit outputs, integer operands (exact), several operands,
shapes under hypothesis; the attention forms lower to one matmul without copies; and each
unsupported form is a clear error."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgpu as tg
from core_util import check, kernels, no_gpu_work

rng = np.random.default_rng(11)

CASES = [
    ("bhqd,bhkd->bhqk", [(2, 3, 4, 8), (2, 3, 5, 8)]),
    ("bhqk,bhkd->bhqd", [(2, 3, 4, 5), (2, 3, 5, 8)]),
    ("ij,jk->ik", [(4, 6), (6, 3)]),
    ("ij,jk", [(4, 6), (6, 3)]),
    ("bij->bji", [(2, 3, 4)]),
    ("ij->j", [(3, 5)]),
    ("ij->", [(3, 5)]),
    ("i,i->", [(7,), (7,)]),
    ("i,j->ij", [(3,), (4,)]),
    ("bi,bj->bij", [(2, 3), (2, 4)]),
    ("ij,ij->ij", [(3, 4), (3, 4)]),
    ("bqhd,bkhd->bhqk", [(2, 4, 3, 8), (2, 5, 3, 8)]),
    ("ijk,jl->ikl", [(2, 3, 4), (3, 5)]),
    ("ij,jk,kl->il", [(3, 4), (4, 5), (5, 2)]),
    ("ij,kl->", [(2, 3), (4, 5)]),
]


@pytest.mark.parametrize("spec,shapes", CASES, ids=[c[0] for c in CASES])
def test_einsum_matches_numpy(spec, shapes):
    ops = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    check(tg.einsum(spec, *[tg.tensor(o) for o in ops]), np.einsum(spec, *ops).astype(np.float32),
          rtol=1e-5, atol=1e-5)
    iops = [rng.integers(-5, 5, s).astype(np.int32) for s in shapes]
    check(tg.einsum(spec, *iops), np.einsum(spec, *iops).astype(np.int32))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), h=st.integers(1, 4), q=st.integers(1, 9), k=st.integers(1, 9), d=st.integers(1, 17))
def test_attention_forms_any_shape(b, h, q, k, d):
    Q = rng.standard_normal((b, h, q, d)).astype(np.float32)
    K = rng.standard_normal((b, h, k, d)).astype(np.float32)
    V = rng.standard_normal((b, h, k, d)).astype(np.float32)
    S = tg.einsum("bhqd,bhkd->bhqk", Q, K)
    check(S, np.einsum("bhqd,bhkd->bhqk", Q, K), rtol=1e-5, atol=1e-5)
    check(tg.einsum("bhqk,bhkd->bhqd", S, V), np.einsum("bhqk,bhkd->bhqd", np.einsum("bhqd,bhkd->bhqk", Q, K), V),
          rtol=1e-4, atol=1e-4)


def test_scores_are_one_matmul_without_copies():
    q = tg.tensor(rng.standard_normal((2, 3, 16, 8)).astype(np.float32)).realize()
    k = tg.tensor(rng.standard_normal((2, 3, 16, 8)).astype(np.float32)).realize()
    s = tg.einsum("bhqd,bhkd->bhqk", q, k)
    log = kernels(lambda: s.realize())
    assert [e.name.split("[")[0] for e in log] == [log[0].name.split("[")[0]] and len(log) == 1
    check(s, np.einsum("bhqd,bhkd->bhqk", q.numpy(), k.numpy()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,shapes,exc,msg", [
    ("ii->i", [(3, 3)], NotImplementedError, "repeated within one operand"),
    ("ii->", [(3, 3)], NotImplementedError, "diagonal or trace"),
    ("...ij,...jk->...ik", [(2, 3), (3, 4)], NotImplementedError, "ellipsis"),
    ("ij,jk->ik", [(2, 3), (4, 5)], ValueError, "size of letter 'j' differs"),
    ("ij,jk->ik", [(2, 3)], ValueError, "2 operand subscripts for 1 operands"),
    ("ijk->i", [(2, 3)], ValueError, "operand 0 has 2 dimensions"),
    ("ij->iz", [(2, 3)], ValueError, "output letter 'z'"),
    ("ij->ii", [(2, 3)], ValueError, "repeats a letter"),
    ("i1->i", [(2, 3)], ValueError, "invalid subscript character '1'"),
])
def test_einsum_errors(spec, shapes, exc, msg):
    ops = [tg.zeros(s) for s in shapes]
    with no_gpu_work(), pytest.raises(exc, match=msg):
        tg.einsum(spec, *ops)
