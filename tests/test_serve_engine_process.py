"""The engine in its own process (models/serve/engine_process.py), through its Python interface:
the same tokens and request fields as an Engine in this process, the Engine's submit errors
raised in the caller, cancellation, and what a caller sees when the engine process fails to
load or dies. (tests/test_serve_http.py runs the whole HTTP suite against both `--engine process`,
the default, and `--engine thread`.)"""
from __future__ import annotations

import os
import shutil
import signal

import pytest

from models.gpt_neox import GPTNeoX
from models.serve.engine import ContextOverflowError, Engine, EngineStoppedError, ParamError, QueueFullError, \
    SamplingParams
from models.serve.engine_process import EngineProcess, EngineProcessError
from serve_util import TINY_NEOX

CTX = 128
PROMPTS = ["In the beginning God created", "The quick brown fox", "Once upon a time there was"]


@pytest.fixture(scope="module")
def remote():
    ep = EngineProcess(TINY_NEOX, max_batch=4, ctx=CTX)
    yield ep
    ep.shutdown()


def test_it_reports_the_model_and_owns_no_gpu_state(remote):
    assert remote.max_context == CTX and remote.max_batch == 4
    assert remote.model.config.n_vocab == GPTNeoX.from_gguf(TINY_NEOX).config.n_vocab
    assert remote.tokenizer.decode(remote.tokenizer.encode("The quick brown fox")) == "The quick brown fox"
    assert remote.pid != os.getpid()


def test_greedy_tokens_and_fields_equal_an_engine_in_this_process(remote):
    local = Engine(GPTNeoX.from_gguf(TINY_NEOX), max_batch=4, max_context=CTX)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        want = local.generate(PROMPTS, params)
        got = [remote.submit(remote.tokenizer.encode(p), params) for p in PROMPTS]
        for w, g in zip(want, got):
            g.result(120)
            assert g.output_ids == w.output_ids and g.text == w.text and g.finish_reason == w.finish_reason == "length"
            outs = list(g.outputs())
            assert [o.token_id for o in outs[:-1]] == w.output_ids and outs[-1].finish_reason == "length"
            assert "".join(o.text for o in outs) == w.text
    finally:
        local.shutdown()


def test_seeded_sampling_with_logprobs_crosses_the_pipe(remote):
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=7, logprobs=3, ignore_eos=True)
    ids = remote.tokenizer.encode(PROMPTS[0])
    a, b = remote.submit(ids, params).result(120), remote.submit(ids, params).result(120)
    assert a.output_ids == b.output_ids and len(a.output_ids) == 6
    outs = [o for o in a.outputs() if o.token_id is not None]
    assert all(o.logprob <= 0 and len(o.top_logprobs) == 3 for o in outs)


def test_submit_errors_are_raised_in_the_caller(remote):
    ids = remote.tokenizer.encode(PROMPTS[1])
    with pytest.raises(ParamError) as e:
        remote.submit(ids, SamplingParams(max_tokens=0))
    assert e.value.param == "max_tokens"
    with pytest.raises(ParamError, match="outside the vocabulary"):
        remote.submit([remote.model.config.n_vocab], SamplingParams(max_tokens=1))
    with pytest.raises(ContextOverflowError, match=f"context of {CTX} tokens"):
        remote.submit(list(range(CTX)), SamplingParams(max_tokens=1))


def test_cancel_reaches_the_engine_and_stats_count_it(remote):
    before = remote.stats()["cancelled"]
    r = remote.submit(remote.tokenizer.encode(PROMPTS[2]), SamplingParams(max_tokens=CTX - 16, temperature=0.0,
                                                                           ignore_eos=True))
    next(iter(r.outputs(60)))                    # running
    r.cancel()
    r.result(60)
    assert r.finish_reason == "cancelled" and len(r.output_ids) < CTX - 16
    st = remote.stats()
    assert st["cancelled"] == before + 1 and st["running"] == 0


def test_full_queue_is_refused():
    ep = EngineProcess(TINY_NEOX, max_batch=1, ctx=CTX, max_waiting=0)
    try:
        with pytest.raises(QueueFullError, match="max_waiting=0"):
            ep.submit([1, 2, 3], SamplingParams(max_tokens=1))
    finally:
        ep.shutdown()
    with pytest.raises(EngineStoppedError):
        ep.submit([1, 2, 3], SamplingParams(max_tokens=1))


def test_an_unreadable_file_names_itself(tmp_path):
    bad = tmp_path / "truncated.gguf"
    shutil.copyfile(TINY_NEOX, bad)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(TINY_NEOX) // 2)
    with pytest.raises(EngineProcessError, match="truncated.gguf: cannot read the GGUF metadata"):
        EngineProcess(bad, max_batch=1, ctx=CTX)


def test_a_load_failure_in_the_engine_process_carries_its_message(tmp_path):
    import gguf
    import numpy as np
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EngineProcessError, match="'bert'"):
        EngineProcess(path, max_batch=1, ctx=CTX)


def test_a_dead_engine_process_ends_every_request_with_an_error():
    ep = EngineProcess(TINY_NEOX, max_batch=2, ctx=CTX)
    try:
        r = ep.submit(ep.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=CTX - 16, temperature=0.0,
                                                                      ignore_eos=True))
        next(iter(r.outputs(60)))
        os.kill(ep.pid, signal.SIGKILL)
        r.result(60)
        assert r.finish_reason == "error" and "engine process exited" in list(r.outputs())[-1].error
        with pytest.raises(EngineStoppedError, match="engine process exited"):
            ep.submit([1, 2], SamplingParams(max_tokens=1))
    finally:
        ep.shutdown(timeout=5)
