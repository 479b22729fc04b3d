"""An interrupt (KeyboardInterrupt) at any point of a forward or a generation leaves the model
intact and the session usable after reset(): the failure is injected at the N-th kernel launch
(runtime.pipeline, which every dispatch goes through) for N over the whole run."""
import numpy as np
import pytest

from models.gpt_neox import GPTNeoX
from tensorgpu import runtime

PROMPT = [5, 17, 3, 99, 2]


@pytest.fixture(scope="module")
def q8(tiny_neox_dir):
    return GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-q8_0.gguf")


def _run(model, s=None):
    s = s or model.session(max_context=32)
    toks = list(s.generate(PROMPT, max_new_tokens=6, stop_on_eos=False))
    return toks, s.forward([7, 8]).numpy()


class _Interrupt:
    def __init__(self, n):
        self.n, self.calls, self.orig = n, 0, runtime.pipeline

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt(f"injected at kernel launch {self.n}")
        return self.orig(*a, **k)


def test_interrupt_at_every_kernel_launch_leaves_sessions_usable(q8, monkeypatch):
    ref_toks, ref_logits = _run(q8)
    counter = _Interrupt(0)
    monkeypatch.setattr(runtime, "pipeline", counter)
    _run(q8, q8.session(max_context=32))
    total = counter.calls
    monkeypatch.setattr(runtime, "pipeline", counter.orig)
    assert total > 20
    interrupted = 0
    for n in sorted(set(np.linspace(1, total, 12).astype(int))):
        s = q8.session(max_context=32)
        inj = _Interrupt(n)
        monkeypatch.setattr(runtime, "pipeline", inj)
        try:
            done = _run(q8, s)
        except KeyboardInterrupt:
            done = None
        monkeypatch.setattr(runtime, "pipeline", inj.orig)
        if done is not None:      # this run launched fewer kernels (one-time work was cached)
            assert inj.calls < n and done[0] == ref_toks
            continue
        interrupted += 1
        s.reset()
        toks, logits = _run(q8, s)
        assert toks == ref_toks, f"interrupted at launch {n} of {total}: the reset session generates other tokens"
        np.testing.assert_array_equal(logits, ref_logits, err_msg=f"interrupted at launch {n}")
        assert _run(q8)[0] == ref_toks, f"interrupted at launch {n}: a new session of the model is affected"
    assert interrupted >= 8
