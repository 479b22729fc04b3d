"""tg.capture: trace once, replay with new inputs — same results as running the function
eagerly, no graph building / codegen / new bind groups in the steady state, and the decode
step of the bundled model at exactly one submit per token."""
import gc

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime

rng = np.random.default_rng(7)


def _delta(before, after, keys=("pipelines_compiled", "bind_groups_created", "submits", "buffers_allocated",
                                "captures_traced", "captures_replayed")):
    return {k: after[k] - before[k] for k in keys}


def test_replay_matches_eager_with_new_tensor_and_scalar_inputs():
    w = tg.tensor(rng.standard_normal((16, 32)).astype(np.float32))
    b = tg.tensor(rng.standard_normal(16).astype(np.float32))

    def f(x, scale):
        return (tg.nn.linear(x, w, b).gelu() * scale).sum(-1)

    cf = tg.capture(f)
    for i in range(4):
        x = rng.standard_normal((3, 32)).astype(np.float32)
        got = cf(tg.tensor(x), float(i) + 0.5).numpy()
        want = f(tg.tensor(x), float(i) + 0.5).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(cf.traces) == 1


def test_steady_state_compiles_and_binds_nothing():
    w = tg.tensor(rng.standard_normal((8, 8)).astype(np.float32))
    cf = tg.capture(lambda x, s: (x @ w + s).exp().max(-1))
    x = tg.tensor(rng.standard_normal((4, 8)).astype(np.float32))
    cf(x, 1.0).numpy()
    cf(x, 2.0).numpy()
    s0 = tg.debug.stats()
    out = cf(x, 3.0)
    runtime.flush()
    d = _delta(s0, tg.debug.stats())
    assert d["pipelines_compiled"] == 0 and d["bind_groups_created"] == 0 and d["buffers_allocated"] == 0
    assert d["captures_replayed"] == 1 and d["captures_traced"] == 0
    assert d["submits"] == 1
    np.testing.assert_allclose(out.numpy(), np.exp(x.numpy() @ w.numpy() + 3.0).max(-1), rtol=1e-5)


def test_numpy_array_inputs_are_written_not_copied():
    cf = tg.capture(lambda a: a * 2 + 1)
    for i in range(3):
        a = rng.standard_normal(5).astype(np.float32)
        np.testing.assert_allclose(cf(a).numpy(), a * 2 + 1, rtol=1e-6)


def test_new_shape_or_constant_retraces():
    cf = tg.capture(lambda a, mode: a.sum() if mode == "sum" else a.max())
    a = rng.standard_normal(6).astype(np.float32)
    assert np.isclose(cf(tg.tensor(a), "sum").item(), a.sum(), rtol=1e-5)
    assert np.isclose(cf(tg.tensor(a), "max").item(), a.max())
    b = rng.standard_normal(9).astype(np.float32)
    assert np.isclose(cf(tg.tensor(b), "sum").item(), b.sum(), rtol=1e-5)
    assert len(cf.traces) == 3


def test_readback_inside_a_capture_is_an_error():
    cf = tg.capture(lambda a: a * float(a.sum().item()))
    with pytest.raises(RuntimeError, match="inside a tg.capture"):
        cf(tg.tensor(np.ones(3, np.float32)))
    assert runtime._tracing[0] == 0


def test_outputs_alias_the_capture_buffers():
    cf = tg.capture(lambda a: a + 1)
    r1 = cf(np.zeros(2, np.float32))
    r1.numpy()
    r2 = cf(np.ones(2, np.float32))
    assert r1 is r2
    np.testing.assert_array_equal(r1.numpy(), [2, 2])


def test_read_later_sees_the_value_before_later_replays_overwrite_it():
    """Two replays queued before one flush: each readback gets its own call's output (the
    second replay overwrites the same output buffer)."""
    cf = tg.capture(lambda a: a * 2)
    cf(np.full(3, 1, np.float32)).realize()
    runtime.sync()
    tickets = []
    for v in (5.0, 7.0):
        out = cf(np.full(3, v, np.float32))
        tickets.append(runtime.read_later(out.node.buffer))
    got = [np.frombuffer(t.result(), np.float32).tolist() for t in tickets]
    assert got == [[10.0] * 3, [14.0] * 3]


def test_a_trace_reuses_the_buffers_of_its_dead_intermediates(monkeypatch):
    """20 kernels in a row, each intermediate dying after the next one: the trace allocates a
    handful of buffers, not 20, and replays still compute the right thing. (A buffer is
    reusable once the kernels queued with it are submitted: every 4 dispatches here.)"""
    monkeypatch.setattr(runtime, "SUBMIT_EVERY", 4)
    n = 1 << 16

    def chain(a):
        for i in range(20):
            a = (a * 1.5 + float(i)).realize()   # one kernel and one new buffer per step
            gc.collect()                         # tensor <-> node cycles: free them now
        return a

    cf = tg.capture(chain)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    ref = x.astype(np.float64)
    for i in range(20):
        ref = ref * 1.5 + i
    runtime.sync()
    before = tg.debug.stats()["bytes_allocated"]
    np.testing.assert_allclose(cf(x).numpy(), ref, rtol=1e-5, atol=1e-2)
    assert tg.debug.stats()["bytes_allocated"] - before <= 6 * 4 * n
    x2 = x[::-1].copy()
    ref2 = x2.astype(np.float64)
    for i in range(20):
        ref2 = ref2 * 1.5 + i
    np.testing.assert_allclose(cf(x2).numpy(), ref2, rtol=1e-5, atol=1e-2)


def test_a_constant_uploaded_inside_a_trace_is_not_clobbered_by_replays(monkeypatch):
    """An upload inside the traced function happens once (replays do not repeat it): it must
    not land in a buffer that an earlier, replayed kernel of the trace writes."""
    monkeypatch.setattr(runtime, "SUBMIT_EVERY", 1)
    n = 4096
    const = np.arange(n, dtype=np.float32)

    def fn(a):
        t = (a * 3.0).realize()          # an intermediate ...
        u = (t + 1.0).realize()
        del t
        gc.collect()                     # ... whose buffer is free for reuse now
        c = tg.tensor(const)             # the upload must not take it
        return (u * c).realize()

    cf = tg.capture(fn)
    for v in (1.0, 2.0, 5.0):
        got = cf(np.full(n, v, np.float32)).numpy()
        np.testing.assert_allclose(got, (v * 3 + 1) * const, rtol=1e-6)


def test_a_dropped_capture_returns_its_buffers_to_the_pool():
    n = 1 << 16
    cf = tg.capture(lambda a: ((a * 2).realize() + 1).realize() * 3)
    cf(np.ones(n, np.float32)).numpy()
    del cf
    gc.collect()
    runtime.sync()
    before = tg.debug.stats()["bytes_allocated"]
    cf2 = tg.capture(lambda a: ((a * 2).realize() + 1).realize() * 3)
    np.testing.assert_allclose(cf2(np.ones(n, np.float32)).numpy(), 9.0)
    assert tg.debug.stats()["bytes_allocated"] == before


def test_submit_every_splits_a_long_replay_into_submits():
    @tg.capture(submit_every=3)
    def chain(a):
        for i in range(10):
            a = (a * 1.5 + float(i)).realize()       # 10 kernels
        return a

    x = np.ones(256, np.float32)
    chain(x).numpy()
    s0 = tg.debug.stats()["submits"]
    got = chain(x * 2).numpy()
    ref = x * 2.0
    for i in range(10):
        ref = ref * 1.5 + i
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert tg.debug.stats()["submits"] - s0 == 4 + 1    # ceil(10 / 3) submits + the readback's


def test_read_later_then_a_kernel_that_overwrites_the_buffer():
    a = tg.tensor(np.arange(4, dtype=np.float32)).contiguous().realize()
    t = runtime.read_later(a.node.buffer)
    a[:] = tg.tensor(np.full(4, 9, np.float32))     # an in-place kernel queued after the readback
    a.realize()
    assert np.frombuffer(t.result(), np.float32).tolist() == [0, 1, 2, 3]
    assert a.numpy().tolist() == [9] * 4


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model(tiny_neox_dir):
    from models.gpt_neox import GPTNeoX
    return GPTNeoX.from_gguf(str(tiny_neox_dir / "tiny-neox-q8_0.gguf"), progress=False)


def test_decode_step_is_three_kernels_per_pythia_layer(model):
    """ln1+QKV stacked with ln2+up+gelu as one GEMV, the attention step, and out-projection +
    down-projection + residual as one GEMV: 3 per layer (issue target <= 8), plus embedding,
    input copy, head and argmax (the position and key length are kernel parameters).
    The model is plain code: the engine's rewrite rules find these fusions."""
    cache = model.new_cache(32)
    step = tg.capture(lambda tok, p: model.forward(tok, p, cache).argmax(-1))
    with tg.debug.kernel_log() as log:
        step(tg.tensor(np.array([5], np.int32)), 0).numpy()
    names = [e.name.split("[")[0] for e in log]
    L = model.config.n_layer
    assert names.count("gemv2_q8_0") == L and names.count("attention_decode") == L
    assert names.count("gemv_ln2_q8_0") == L
    assert names.count("gemv_ln_q8_0") == 1                   # the final norm folded into the head
    assert len(names) <= 3 * L + 4, names


def test_decode_step_steady_state(model):
    """Issue 6: steady-state decode compiles 0 pipelines, creates 0 bind groups, 1 submit per token."""
    cache = model.new_cache(64)

    @tg.capture
    def step(tok, p):
        return model.forward(tok, p, cache).argmax(-1)

    t = step(tg.tensor(np.array([5], np.int32)), 0)
    t = step(t, 1)
    t.item()
    s0 = tg.debug.stats()
    n = 8
    for p in range(2, 2 + n):
        t = step(t, p)
        runtime.flush()
    d = _delta(s0, tg.debug.stats())
    assert d["pipelines_compiled"] == 0
    assert d["bind_groups_created"] == 0
    assert d["buffers_allocated"] == 0
    assert d["submits"] == n
    assert d["captures_replayed"] == n


def test_captured_decode_matches_uncaptured_logits(model):
    ids = [int(i) for i in rng.integers(0, model.config.n_vocab, 6)]
    # eager: the whole sequence at once
    ref = model.session(cache_dtype=tg.float32).forward(ids).numpy()
    cache = model.new_cache(16, tg.float32)

    @tg.capture
    def step(tok, p):
        return model.forward(tok, p, cache)

    for p, i in enumerate(ids):
        got = step(np.array([i], np.int32), p).numpy()
        np.testing.assert_allclose(got[0], ref[p], atol=1e-3)


def test_generate_gpu_path_equals_host_sampling_greedy(model):
    """The captured, pipelined generate yields the same greedy tokens as step-by-step forwards."""
    prompt = model.tokenizer.encode("In the beginning God created")
    fast = list(model.session().generate(prompt, max_new_tokens=12))
    s = model.session()
    logits = s.forward(prompt)
    slow = []
    for _ in range(12):
        nxt = int(np.argmax(logits.numpy()[-1]))
        slow.append(nxt)
        logits = s.forward([nxt])
    assert fast == slow


def test_generate_is_reproducible_with_a_seed(model):
    prompt = model.tokenizer.encode("The old man")
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    a = list(model.session().generate(prompt, **kw))
    b = list(model.session().generate(prompt, **kw))
    assert a == b


def test_generate_steady_state_is_one_submit_per_token(model):
    s = model.session()
    gen = s.generate("In the beginning", max_new_tokens=20)
    first = [next(gen) for _ in range(4)]
    s0 = tg.debug.stats()
    rest = [next(gen) for _ in range(8)]
    d = _delta(s0, tg.debug.stats())
    assert len(first + rest) == 12
    assert d["pipelines_compiled"] == 0 and d["bind_groups_created"] == 0
    assert d["submits"] == 8


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_generate_stops_exactly_with_steps_in_flight(model, n):
    """Steps queued ahead of the reads never leak into the output or the context: n tokens
    out, the context is prompt + n with the last one pending, and continuing matches one
    uninterrupted generation."""
    full = list(model.session().generate("The river", max_new_tokens=12, stop_on_eos=False))
    s = model.session()
    first = list(s.generate("The river", max_new_tokens=n, stop_on_eos=False))
    assert first == full[:n]
    prompt = model.tokenizer.encode("The river")
    assert s.context == prompt + first and s._pending == [first[-1]]
    rest = list(s.generate(None, max_new_tokens=12 - n, stop_on_eos=False))
    assert first + rest == full


def test_generate_stop_token_with_steps_in_flight(model):
    full = list(model.session().generate("The river", max_new_tokens=10, stop_on_eos=False))
    s = model.session()
    got = list(s.generate("The river", max_new_tokens=10, stop=[full[3]], stop_on_eos=False))
    assert got == full[:full.index(full[3]) + 1]
    assert s.position == len(model.tokenizer.encode("The river")) + len(got)


def test_a_replay_sees_lazy_writes_issued_before_it():
    """A write into a buffer the capture reads (`cache[i] = v`, not realized yet) runs before the
    replay's kernels: the replay reads the new rows, as an eager call would."""
    cache = tg.zeros((4, 3)).contiguous().realize()
    f = tg.capture(lambda x: (cache * x).sum(-1))
    f(np.float32(1.0)).numpy()                     # traced
    cache[2] = tg.tensor(np.array([1.0, 2.0, 3.0], np.float32))   # lazy: nothing runs yet
    np.testing.assert_allclose(f(np.float32(2.0)).numpy(), [0, 0, 12, 0])
