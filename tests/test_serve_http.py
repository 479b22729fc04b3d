"""The OpenAI-compatible server as a client sees it: a real `python -m models serve` process on
127.0.0.1 (tiny-neox), the official `openai` client and raw HTTP.

References are independent of the server: greedy text from `Session.generate` on the same GGUF
in this process, and sampled / penalized / logprob results from an in-process Engine with the
same SamplingParams (so every HTTP parameter must reach the sampler as the engine defines it)."""
import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest

from models.gpt_neox import GPTNeoX
from models.serve.engine import Engine, SamplingParams
from serve_util import TINY_NEOX, ServerProcess, metric, metric_sum, openai_client, collect_garbage  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("collect_garbage")

NAME = "tiny-neox"
CTX = 256
PROMPTS = ["In the beginning God created", "The quick brown fox", "Once upon a time there was",
           "It was a dark and stormy night, and the rain fell", "And", "He said unto them,",
           "The colorsys module defines", "Convert the color from RGB", "A dictionary is", "Blessed are the",
           "def main():", "The Lord is my shepherd", "Python is a programming language", "In the year",
           "Now the serpent was more subtle", "The function returns"]


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def server(request):
    """Every test below runs against both server forms: the engine in its own process (the
    default) and on a thread of the server process (--engine thread)."""
    extra = ("--engine", "thread") if request.param == "engine-thread" else ()
    s = ServerProcess(TINY_NEOX, "--max-batch", "16", "--ctx", str(CTX), *extra, name=NAME)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model():
    return GPTNeoX.from_gguf(TINY_NEOX)


@pytest.fixture(scope="module")
def greedy(model):
    """greedy(prompt, n) -> the first n greedy tokens of Session.generate (EOS not special)."""
    cache = {}

    def run(prompt, n):
        if cache.get(prompt, []).__len__() < n:
            cache[prompt] = list(model.session(max_context=CTX).generate(prompt, max_new_tokens=max(n, 24),
                                                                         stop_on_eos=False))
        return cache[prompt][:n]
    return run


@pytest.fixture(scope="module")
def ref_engine(model):
    """An Engine in this process: the reference for sampled, penalized and logprob results."""
    e = Engine(model, max_batch=1, max_context=CTX)

    def run(prompt, **params):
        r = e.generate([prompt], SamplingParams(**params))[0]
        return r, list(r.outputs())
    yield run
    e.shutdown()


def text_of(model, ids):
    return model.tokenizer.decode(ids)


# -- health, models --------------------------------------------------------------------------

def test_health_and_models(server, client):
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    raw = httpx.get(server.url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == CTX and raw["data"][0]["owned_by"]


# -- completions -----------------------------------------------------------------------------

def test_greedy_completion_equals_session_generate(client, model, greedy):
    p = PROMPTS[0]
    r = client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == NAME
    assert abs(r.created - time.time()) < 120
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert c.text == text_of(model, greedy(p, 12))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (len(model.tokenizer.encode(p)), 12, len(model.tokenizer.encode(p)) + 12)


def test_streamed_completion_equals_the_whole_one(client, model, greedy):
    p = PROMPTS[1]
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == len(model.tokenizer.encode(p))
    assert all(ch.usage is None for ch in body)
    assert "".join(ch.choices[0].text for ch in body) == text_of(model, greedy(p, 10))
    assert [ch.choices[0].finish_reason for ch in body][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in body[:-1])
    assert len({ch.id for ch in chunks}) == 1
    # without include_usage: no usage anywhere
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=3, temperature=0, stream=True))
    assert all(ch.usage is None for ch in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_sse_wire_format_ends_with_done(server):
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_prompt_as_strings_token_ids_and_lists(client, model, greedy):
    a, b = PROMPTS[3], PROMPTS[4]
    ids_a, ids_b = model.tokenizer.encode(a), model.tokenizer.encode(b)
    want = [text_of(model, greedy(a, 6)), text_of(model, greedy(b, 6))]
    for prompt in ([a, b], [ids_a, ids_b]):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.text for c in r.choices] == want
        assert r.usage.prompt_tokens == len(ids_a) + len(ids_b) and r.usage.completion_tokens == 12
    r = client.completions.create(model=NAME, prompt=ids_a, max_tokens=6, temperature=0)
    assert r.choices[0].text == want[0]


def test_echo_prepends_the_prompt(client, model, greedy):
    p = PROMPTS[5]
    r = client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == p + text_of(model, greedy(p, 5))
    s = list(client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_stop_strings_cut_the_text_streamed_or_not(client, model, greedy):
    p = PROMPTS[0]
    full = text_of(model, greedy(p, 16))
    stop = full[len(full) // 2: len(full) // 2 + 4]       # a piece from the middle, likely across tokens
    assert stop and stop in full
    want = full[:full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, stop=[stop, "zzzq"],
                                      stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (want, "stop")
    r = client.completions.create(model=NAME, prompt=p, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].text == want


def test_max_tokens_is_cut_at_the_context_end(client, model):
    ids = model.tokenizer.encode(open(TINY_NEOX.parent / "heldout.txt").read()[:4000])[:CTX - 6]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=100, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6


def test_restrictive_samplers_equal_greedy(client, model, greedy):
    """top_k=1, a tiny top_p and min_p=1 each leave only the most likely token: sampling at
    temperature 1 must then return the greedy text (so each parameter reaches the sampler)."""
    p = PROMPTS[6]
    want = text_of(model, greedy(p, 10))
    plain = client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=1.0, seed=3).choices[0].text
    assert plain != want, "temperature 1 with this seed happens to be greedy: pick another seed"
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}):
        kw = {"top_p": extra.pop("top_p")} if "top_p" in extra else {}
        r = client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=1.0, seed=3,
                                      extra_body=extra, **kw)
        assert r.choices[0].text == want, (extra, kw)


def test_seeded_sampling_and_n_choices(client, ref_engine, model):
    """seed reproduces; choice i of n uses seed + i; each equals the engine's own result."""
    p = PROMPTS[7]
    ids = model.tokenizer.encode(p)
    r = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0.9, seed=11, n=3)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1
    for i, t in enumerate(texts):
        ref, _ = ref_engine(ids, max_tokens=8, temperature=0.9, seed=11 + i)
        assert t == ref.text, i
        again = client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0.9, seed=11 + i)
        assert again.choices[0].text == t
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("param,value", [("repetition_penalty", 2.0), ("frequency_penalty", 2.0),
                                         ("presence_penalty", 2.0), ("frequency_penalty", -1.0)])
def test_penalties_equal_the_engine(client, ref_engine, model, greedy, param, value):
    p = PROMPTS[8]
    ids = model.tokenizer.encode(p)
    ref, _ = ref_engine(ids, max_tokens=24, temperature=0.0, ignore_eos=True, **{param: value})
    assert ref.output_ids != greedy(p, 24), f"{param}={value} does not change this output: a useless check"
    kw = {param: value} if param != "repetition_penalty" else {}
    r = client.completions.create(model=NAME, prompt=p, max_tokens=24, temperature=0, **kw,
                                  extra_body={"ignore_eos": True, **({} if kw else {param: value})})
    assert r.choices[0].text == ref.text


def test_completion_logprobs(client, ref_engine, model):
    p = PROMPTS[9]
    ids = model.tokenizer.encode(p)
    ref, outs = ref_engine(ids, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    r = client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    want = [o for o in outs if o.token_id is not None]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text == ref.text
    np.testing.assert_allclose(lp.token_logprobs, [o.logprob for o in want], atol=1e-4)
    for top, o in zip(lp.top_logprobs, want):
        assert 1 <= len(top) <= 3
        best = max(top.values())
        assert abs(best - o.logprob) < 1e-4                    # greedy: the chosen token is the best
        np.testing.assert_allclose(sorted(top.values(), reverse=True),
                                   [v for _, v in o.top_logprobs][:len(top)], atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # streamed: the same tokens, split over chunks
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0, logprobs=3,
                                            stream=True, extra_body={"ignore_eos": True}))
    toks = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert toks == lp.tokens


def test_streaming_n_choices_interleave(client, model):
    p = PROMPTS[10]
    whole = client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=1.0, seed=5, n=2)
    chunks = list(client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=1.0, seed=5, n=2,
                                            stream=True))
    for i in (0, 1):
        got = "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
        assert got == [c.text for c in whole.choices if c.index == i][0]
    assert sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason) == [0, 1]


# -- errors ------------------------------------------------------------------------------------

BAD = [
    ({"temperature": -1}, "temperature"), ({"temperature": "0.5"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"seed": "x"}, "seed"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"n": 0}, "n"), ({"n": 129}, "n"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"stop": ["a"] * 17}, "stop"),
    ({"stop": [""]}, "stop.0"), ({"stop": 5}, "stop"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tempreature": 1}, "tempreature"), ({"logit_bias": {"1": 5}}, "logit_bias"), ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 1}, "echo"), ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [0, 99999]}, "prompt"),
    ({"prompt": None}, "prompt"), ({"stream": "yes"}, "stream"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"seed": 2**64 - 1, "n": 2}, "seed"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[json.dumps(c)[:40] for c, _ in BAD])
def test_bad_parameter_is_a_400_naming_it(server, change, param):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2, **change}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split(".")[0] in err["message"]


def test_bad_bodies(server):
    for data in (b"{", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server.url + "/v1/completions", content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", data
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_errors(client, model):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=-0.5)
    assert e.value.body["param"] == "temperature"
    too_long = model.tokenizer.encode(open(TINY_NEOX.parent / "heldout.txt").read()[:4000])[:CTX]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=too_long, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert f"{CTX}" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "no_chat_template" and "chat template" in e.value.body["message"]


# -- concurrency, cancellation, metrics --------------------------------------------------------

def test_16_concurrent_clients_each_get_their_solo_output(server, model, greedy):
    lengths = [8 + (i * 5) % 17 for i in range(16)]
    want = [text_of(model, greedy(p, n)) for p, n in zip(PROMPTS, lengths)]
    before = server.metrics()
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i):
        kw = dict(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            text, usage = "", None
            async for ch in await aclient.completions.create(stream=True, stream_options={"include_usage": True},
                                                               **kw):
                if ch.choices:
                    text += ch.choices[0].text
                usage = ch.usage or usage
            return text, usage
        r = await aclient.completions.create(**kw)
        return r.choices[0].text, r.usage

    async def all16():
        try:
            return await asyncio.gather(*[one(i) for i in range(16)])
        finally:
            await aclient.close()

    got = asyncio.run(all16())
    assert [t for t, _ in got] == want
    assert [u.completion_tokens for _, u in got] == lengths
    after = server.metrics()
    # the engine's counters add up to what the clients received
    gen = metric(after, "tensorgpu:generation_tokens_total") - metric(before, "tensorgpu:generation_tokens_total")
    pre = metric(after, "tensorgpu:prompt_tokens_total") - metric(before, "tensorgpu:prompt_tokens_total")
    assert gen == sum(lengths) and pre == sum(u.prompt_tokens for _, u in got)
    # some step decoded more than 8 sequences together
    big = (metric(after, "tensorgpu:batch_size_count") - metric(after, "tensorgpu:batch_size_bucket", le="8.0")) - \
        (metric(before, "tensorgpu:batch_size_count") - metric(before, "tensorgpu:batch_size_bucket", le="8.0"))
    assert big > 0
    ok = metric(after, "tensorgpu:http_requests_total", endpoint="/v1/completions", status="200") - \
        metric(before, "tensorgpu:http_requests_total", endpoint="/v1/completions", status="200")
    assert ok == 16
    for name in ("time_to_first_token_seconds_count", "e2e_request_latency_seconds_count"):
        assert metric(after, "tensorgpu:" + name) - metric(before, "tensorgpu:" + name) == 16
    itl = metric(after, "tensorgpu:inter_token_latency_seconds_count") - \
        metric(before, "tensorgpu:inter_token_latency_seconds_count")
    assert itl == sum(lengths) - 16


def _wait_idle(server, cancelled_before, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if metric(m, "tensorgpu:request_success_total", finished_reason="cancelled") > cancelled_before and \
                metric(m, "tensorgpu:num_requests_running") == 0 and metric(m, "tensorgpu:num_requests_waiting") == 0:
            return m
        assert time.monotonic() < deadline, f"the request was not cancelled within {timeout} s: {m}"
        time.sleep(0.1)


def test_disconnected_stream_frees_its_sequence(server):
    c0 = metric(server.metrics(), "tensorgpu:request_success_total", finished_reason="cancelled")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
    assert any(line.startswith("data: ") for line in got)
    m = _wait_idle(server, c0)
    assert metric(m, "tensorgpu:generation_tokens_total") > 0


def test_disconnected_plain_request_frees_its_sequence(server):
    c0 = metric(server.metrics(), "tensorgpu:request_success_total", finished_reason="cancelled")
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _wait_idle(server, c0)


def test_http_request_counts(server):
    before = server.metrics()
    httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "A", "max_tokens": 1})
    httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "A", "max_tokens": 0})
    httpx.get(server.url + "/v1/models")
    after = server.metrics()

    def d(endpoint, status):
        k = dict(endpoint=endpoint, status=status)
        return metric(after, "tensorgpu:http_requests_total", **k) - metric(before, "tensorgpu:http_requests_total", **k)
    assert (d("/v1/completions", "200"), d("/v1/completions", "400"), d("/v1/models", "200")) == (1, 1, 1)
    assert metric_sum(after, "tensorgpu:http_requests_total") - metric_sum(before, "tensorgpu:http_requests_total") \
        == 4     # and the /metrics scrape of `before`
