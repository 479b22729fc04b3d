"""The batching engine (models/serve/engine.py): what a caller of the Python API sees.

Every sequence in a batch must get exactly what it gets alone: greedy tokens equal
Session.generate's, seeded sampling equal to the same request run alone, penalties and
logprobs equal to a NumPy computation over the single-sequence logits."""
import asyncio
import threading

import numpy as np
import pytest

import tensorgpu as tg
from models.gpt_neox import DEFAULT_MODEL, GPTNeoX
from models.serve.engine import (ContextOverflowError, Engine, EngineStoppedError, ParamError, QueueFullError,
                                 SamplingParams)
from models.serve.stops import StopText

PROMPTS = ["In the beginning God created", "The quick brown fox", "Once upon a time there was",
           "It was a dark and stormy night, and the rain fell in torrents", "And", "He said unto them,"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return GPTNeoX.from_gguf(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def solo(model):
    """Each prompt's greedy continuation from its own Session."""
    out = {}
    for p in PROMPTS:
        out[p] = list(model.session(max_context=128).generate(p, max_new_tokens=10, stop_on_eos=False))
    return out


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_batch=4, max_context=128, prefill_chunk=8)


def test_greedy_batch_equals_each_sequence_alone(engine, solo):
    # 6 requests over 4 slots: sequences join while others run, leave at different lengths,
    # and the 13-token prompt is prefilled in two chunks between decode steps
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (10, 3, 10, 7, 10, 5)]
    reqs = [engine.submit(engine.model.tokenizer.encode(p), sp) for p, sp in zip(PROMPTS, params)]
    chained = engine.stats()["chained_steps"]
    while engine.step():
        pass
    assert engine.stats()["chained_steps"] > chained     # steps fed by the previous step's ids on the GPU
    for r, p, sp in zip(reqs, PROMPTS, params):
        assert r.output_ids == solo[p][:sp.max_tokens], p
        assert r.finish_reason == "length"
        assert r.text == engine.model.tokenizer.decode(r.output_ids)
    assert engine.stats()["running"] == 0


def test_steady_state_serving_compiles_nothing(engine):
    engine.generate(PROMPTS[:4], GREEDY)               # warm: every bucket this load uses
    before = tg.debug.stats()
    engine.generate(PROMPTS[:4], GREEDY)
    after = tg.debug.stats()
    assert after["pipelines_compiled"] == before["pipelines_compiled"]
    assert after["captures_traced"] == before["captures_traced"]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine):
    sp = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], sp)[0].output_ids
    batch = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], sp)
    assert batch[1].output_ids == alone
    other = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.9, seed=99, ignore_eos=True))
    assert other[0].output_ids != alone          # another seed draws another sequence (tiny-neox is not that sure)


def _reference_greedy_with_penalties(model, prompt_ids, n, rep, freq, pres):
    """Greedy decoding with the penalties applied in NumPy to Session logits."""
    sess = model.session(max_context=128)
    logits = sess.forward(prompt_ids, last_only=True).numpy()[-1].astype(np.float64)
    seen, counts, out = set(prompt_ids), {}, []
    for _ in range(n):
        l = logits.copy()
        ids = np.array(sorted(seen))
        l[ids] = np.where(l[ids] < 0, l[ids] * rep, l[ids] / rep)
        for t, c in counts.items():
            l[t] -= freq * c + pres
        t = int(np.argmax(l))
        out.append(t)
        seen.add(t)
        counts[t] = counts.get(t, 0) + 1
        logits = sess.forward([t], last_only=True).numpy()[-1].astype(np.float64)
    return out


def test_penalties_match_a_numpy_reference(engine, model):
    ids = model.tokenizer.encode(PROMPTS[0])
    sp = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                        presence_penalty=0.4, ignore_eos=True)
    r = engine.generate([ids, PROMPTS[1]], sp)[0]
    assert r.output_ids == _reference_greedy_with_penalties(model, ids, 8, 1.3, 0.5, 0.4)


def test_logprobs_are_the_log_softmax_of_the_sequence_logits(engine, model):
    ids = model.tokenizer.encode(PROMPTS[2])
    r = engine.generate([ids], SamplingParams(max_tokens=3, temperature=0.0, logprobs=5, ignore_eos=True))[0]
    outs = [o for o in r.outputs() if o.token_id is not None]
    sess = model.session(max_context=128)
    logits = sess.forward(ids + r.output_ids[:2]).numpy()[len(ids) - 1:].astype(np.float64)   # [3, V]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    for i, o in enumerate(outs):
        want = logits[i] - lse[i]
        assert o.logprob == pytest.approx(want[o.token_id], abs=2e-3)
        assert [t for t, _ in o.top_logprobs] == list(np.argsort(-want, kind="stable")[:5])
        assert o.top_logprobs[0][0] == o.token_id          # greedy picks the best
        assert all(a[1] >= b[1] for a, b in zip(o.top_logprobs, o.top_logprobs[1:]))


def test_stop_strings_end_the_text_before_them(engine, solo, model):
    full = model.tokenizer.decode(solo[PROMPTS[0]])
    stop = full[5:9]                                   # four characters inside the greedy continuation
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, stop=(stop,), ignore_eos=True))[0]
    assert r.finish_reason == "stop"
    assert r.text == full[:full.index(stop)]
    streamed = "".join(o.text for o in r.outputs())
    assert streamed == r.text


def test_stop_token_ids_stop_without_text(engine, solo):
    stop_tok = solo[PROMPTS[0]][3]
    r = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_tok,),
                                                     ignore_eos=True))[0]
    assert r.output_ids == solo[PROMPTS[0]][:solo[PROMPTS[0]].index(stop_tok) + 1]
    assert r.finish_reason == "stop"


def test_the_context_limit_ends_a_sequence_with_length(model):
    e = Engine(model, max_batch=2, max_context=12)
    ids = model.tokenizer.encode(PROMPTS[3])[:9]
    r = e.generate([ids], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(r.output_ids) == 12 - 9 and r.finish_reason == "length"


def test_cancel_frees_the_slot_at_the_next_step(engine):
    r = engine.submit(engine.model.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=0.0,
                                                                              ignore_eos=True))
    for _ in range(3):
        engine.step()
    n = len(r.output_ids)
    r.cancel()
    engine.step()
    assert r.finish_reason == "cancelled" and len(r.output_ids) == n
    assert engine.stats()["running"] == 0
    events = list(r.outputs())
    assert events[-1].finish_reason == "cancelled"


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0), ("top_k", -1),
    ("min_p", 1.5), ("repetition_penalty", 0.0), ("frequency_penalty", 3.0), ("presence_penalty", -2.5),
    ("stop", ("",)), ("stop_token_ids", (-1,)), ("logprobs", 21), ("seed", 1.5), ("ignore_eos", 1)])
def test_bad_parameters_name_the_field(engine, field, value):
    with pytest.raises(ParamError) as e:
        engine.submit([1, 2], SamplingParams(**{field: value}))
    assert e.value.param == field


def test_bad_prompts_and_full_queues(model):
    e = Engine(model, max_batch=1, max_context=16, max_waiting=1)
    with pytest.raises(ParamError, match="outside the vocabulary"):
        e.submit([1, model.config.n_vocab])
    with pytest.raises(ParamError, match="non-empty"):
        e.submit([])
    with pytest.raises(ContextOverflowError, match="16"):
        e.submit(list(range(16)))
    with pytest.raises(ParamError, match="stop_token_ids"):
        e.submit([1], SamplingParams(stop_token_ids=(model.config.n_vocab,)))
    e.submit([1, 2])
    with pytest.raises(QueueFullError, match="max_waiting=1"):
        e.submit([1, 2])
    e.shutdown()
    with pytest.raises(EngineStoppedError):
        e.submit([1, 2])


def test_engine_thread_serves_concurrent_submitters(model, solo):
    e = Engine(model, max_batch=4, max_context=128)
    e.start()
    results = {}

    def client(p):
        results[p] = e.submit(model.tokenizer.encode(p), GREEDY).result(timeout=120).output_ids

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    e.shutdown()
    assert results == {p: solo[p] for p in PROMPTS}


def test_async_consumers_get_every_output(model, solo):
    e = Engine(model, max_batch=2, max_context=128)
    e.start()

    async def run():
        r = e.submit(model.tokenizer.encode(PROMPTS[1]), GREEDY)
        return [o async for o in r.aoutputs()]

    outs = asyncio.run(run())
    e.shutdown()
    assert [o.token_id for o in outs if o.token_id is not None] == solo[PROMPTS[1]]
    assert outs[-1].finish_reason == "length"


def test_a_step_wakes_each_async_consumer_loop_once(model, solo):
    """Four async consumers on one event loop: every one gets all its outputs, and the engine
    thread wakes the loop at most once per step (one call_soon_threadsafe for all of the step's
    tokens), not once per token per consumer."""
    e = Engine(model, max_batch=4, max_context=128)
    e.start()
    calls = []

    async def run():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(cb, *args):
            calls.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return real(cb, *args)
        loop.call_soon_threadsafe = counted

        async def one(p):
            r = e.submit(model.tokenizer.encode(p), GREEDY)
            return [o async for o in r.aoutputs()]
        return await asyncio.gather(*[one(p) for p in PROMPTS[:4]])

    outs = asyncio.run(run())
    steps = e.stats()["steps"]
    e.shutdown()
    for p, o in zip(PROMPTS[:4], outs):
        assert [x.token_id for x in o if x.token_id is not None] == solo[p]
    tokens = sum(len(o) for o in outs)
    assert sum(calls) >= tokens - len(outs) and len(calls) <= steps + 2 * len(PROMPTS[:4]), (len(calls), steps, tokens)
    assert max(calls) > 1                   # some wake-up carried several consumers' events


def test_shutdown_cancels_what_is_in_flight(model):
    e = Engine(model, max_batch=1, max_context=128)
    reqs = [e.submit([1, 2, 3], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)) for _ in range(2)]
    e.step()
    e.shutdown(cancel=True)
    assert [r.finish_reason for r in reqs] == ["cancelled", "cancelled"]


@pytest.mark.parametrize("pieces,stops,shown", [
    (["Hello", " wor", "ld\n", "\nUs", "er: hi"], ["\n\nUser"], "Hello world"),   # spans three pieces
    (["ab", "c"], ["abd"], "abc"),                                               # a false start is released
    (["x", "STOP", "y"], ["STOP", "TO"], "x"),                                   # the earliest match wins
    (["no stop here"], [], "no stop here"),
])
def test_stop_text_never_shows_a_stop_string(pieces, stops, shown):
    st = StopText(stops)
    out = "".join(st.add(p) for p in pieces) + st.finish()
    assert out == shown == st.shown


@pytest.mark.parametrize("B", [4, 1])
@pytest.mark.parametrize("path", ["tiny-neox/tiny-neox-q8_0.gguf", "tiny-llama/tiny-llama-q8_0.gguf",
                                  "tiny-qwen2/tiny-qwen2-q8_0.gguf"])
def test_batched_step_attention_is_one_dispatch_per_layer(path, B, monkeypatch):
    """The engine's decode step (the model's own forward over slotted caches, positions an int32
    [B] tensor): per layer ONE attention kernel (rope, both cache writes, `pos + 1`, attention and
    combine in one dispatch, by the fuse_batched_decode_attention rule) and the other kernels
    those of the same step with that rule off (B = 1 too, where the one-row GEMV rules stack the
    projections first), with the same logits and caches (the first layer's byte for byte: later
    layers' inputs differ by the attention's summation order)."""
    import os

    import models
    from tensorgpu import rewrites
    m = models.load(os.path.join(os.path.dirname(models.__file__), path))
    L = m.config.n_layer
    ids = np.array([5, 17, 3, 9], np.int32)[:B]
    pos = np.array([70, 3, 0, 64], np.int32)[:B]        # a short row, rows across a 64-key split boundary
    runs = []
    for fuse in (True, False):
        if not fuse:
            monkeypatch.setattr(rewrites, "RULES", [r for r in rewrites.RULES
                                                    if r is not rewrites.fuse_batched_decode_attention])
        engine = Engine(m, max_batch=4, max_context=128)
        before = tg.debug.stats().get("rule_fuse_batched_decode_attention", 0)
        with tg.debug.kernel_log() as log:
            logits = m.forward(tg.tensor(ids), tg.tensor(pos), engine.cache).numpy()
        fired = tg.debug.stats().get("rule_fuse_batched_decode_attention", 0) - before
        caches = [c.numpy().astype(np.float32) for kv in engine.cache for c in kv]
        runs.append(([e.name.split("[")[0] for e in log], logits, caches, fired))
    (fused, lf, cf, n_fired), (plain, lp, cp, _) = runs
    pieces = ("rope", "E_scatter", "attention", "attention_combine", "E_add_cast", "E_cast")
    attn = [nm for nm in fused if nm.startswith("attention_decode")]
    assert n_fired == L and len(attn) == L and set(attn) <= {"attention_decode_batch", "attention_decode_gqa_batch"}
    assert not [nm for nm in fused if nm in pieces], fused
    # everything else is the same step: the 7 attention dispatches per layer (8 where the k row is
    # first copied out of the stacked projection) became the one
    assert [nm for nm in fused if nm not in attn] == [nm for nm in plain if nm not in pieces], (fused, plain)
    assert len(plain) - len(fused) >= 6 * L, (fused, plain)
    np.testing.assert_allclose(lf, lp, rtol=1e-4, atol=1e-4 * np.abs(lp).max())
    np.testing.assert_array_equal(cf[0], cp[0])
    np.testing.assert_array_equal(cf[1], cp[1])
    for a, b in zip(cf, cp):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())


def test_exact_batching_keeps_batched_steps_off_the_tensor_cores(model, solo, monkeypatch):
    """Planned as on a GPU with tensor cores (where a 16-row step would round to f16), an
    exact_batching engine decodes 16 sequences on the f32 tiles: no tensor-core kernel in the
    step, the step's matmuls are the 16-row tiled ones the tensor cores would take otherwise, and
    every sequence gets its solo greedy tokens."""
    from tensorgpu.kernels import matmul_coop
    monkeypatch.setattr(tg.runtime.Device, "has_coopmat", property(lambda self: True))
    monkeypatch.setitem(matmul_coop.TUNING, "enabled", True)     # (conftest keeps it off elsewhere)
    eng = Engine(model, max_batch=16, max_context=64, prefill_chunk=8, exact_batching=True)
    prompts = (PROMPTS * 3)[:16]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with tg.debug.kernel_log() as log:
        outs = eng.generate(prompts, sp)
    names = [e.name for e in log]
    assert not [n for n in names if n.startswith("matmul_coop")]
    assert [n for n in names if n.startswith("matmul_") and "_t16x" in n]
    assert [o.output_ids for o in outs] == [solo[p][:4] for p in prompts]
