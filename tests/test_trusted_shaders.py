"""Shader modules without naga's runtime checks (runtime.OPTIONS.trusted_shaders, on by default on
wgpu-native; TENSORGPU_TRUSTED_SHADERS=0 keeps the checks): the same kernels give the same bits
either way, each way compiles its own pipelines, and a broken kernel is refused the same way."""
import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime
from core_util import options

rng = np.random.default_rng(7)
A = rng.standard_normal((70, 100)).astype(np.float32)
W = rng.standard_normal((33, 100)).astype(np.float16)
X = rng.standard_normal((2, 20000)).astype(np.float32)


def _results():
    """A tiled matmul with ragged edges, a GEMV, a row softmax, a two-stage argmax and a fused
    map-reduce."""
    ta, tw, tx = tg.tensor(A), tg.tensor(W), tg.tensor(X)
    return [(ta @ tw.T).numpy(), (ta[:1] @ tw.T).numpy(), tx.softmax(-1).numpy(), tx.argmax(-1).numpy(),
            (tx * 2 + 1).sum(-1).numpy()]


def test_checked_and_trusted_modules_agree():
    with options(trusted_shaders=True):
        trusted = _results()
        n1 = runtime.STATS["pipelines_compiled"]
    with options(trusted_shaders=False):
        checked = _results()
        n2 = runtime.STATS["pipelines_compiled"]
    assert n2 - n1 >= 1, "the checked modules must be pipelines of their own, not the trusted ones reused"
    for t, c in zip(trusted, checked):
        np.testing.assert_array_equal(t, c)


@pytest.mark.parametrize("trusted", [True, False])
def test_broken_kernel_is_refused_either_way(trusted):
    with options(trusted_shaders=trusted), pytest.raises(RuntimeError, match="'broken' failed to compile"):
        runtime.pipeline("broken", "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }", [])


def test_device_reports_the_setting():
    """tg.device() says which modules the kernels get (benchmark tables print it)."""
    for trusted in (True, False):
        with options(trusted_shaders=trusted):
            assert tg.device()["trusted_shaders"] is trusted
