"""A bounded load test of a real server process: 300 requests, 32 clients at a time, prompts of
1-120 tokens, 1-40 new tokens, half streamed, about a fifth cancelled by their client (a stream
closed early, a plain request that times out).

What must hold: every request completes or is cancelled and nothing hangs; the engine ends idle;
the server's resident memory after the run is within MAX_RSS_GROWTH_MB of what it was after a
warm-up; /metrics adds up to what the clients did; a sample of the completed greedy outputs equals
Session.generate alone (no request got another's tokens).

Slow (~1-2 min on lavapipe): `TENSORGPU_SERVE_LOAD=1 pytest tests/test_serve_load.py`, a separate
step of .ci/run."""
import asyncio
import os
import random
import time

import httpx
import pytest

from models.gpt_neox import GPTNeoX
from serve_util import TINY_NEOX, ServerProcess, metric, metric_sum, collect_garbage  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.skipif(os.environ.get("TENSORGPU_SERVE_LOAD", "") in ("", "0"),
                                 reason="TENSORGPU_SERVE_LOAD=1 runs it (.ci/run does)"),
              pytest.mark.usefixtures("collect_garbage")]

N_REQUESTS = 300
CONCURRENCY = 32
MAX_RSS_GROWTH_MB = 64
CTX = 256


def plan(tok, n, seed):
    rng = random.Random(seed)
    ids = tok.encode(open(TINY_NEOX.parent / "heldout.txt").read()[:60000])
    out = []
    for i in range(n):
        start = rng.randrange(0, len(ids) - 200)
        p = ids[start:start + rng.randint(1, 120)]
        cancel = rng.random() < 0.2
        out.append(dict(i=i, prompt=p, max_tokens=rng.randint(1, 40), stream=rng.random() < 0.5, cancel=cancel,
                        cancel_after=rng.randint(1, 4), timeout=rng.uniform(0.05, 0.6)))
    return out


async def run_one(client: httpx.AsyncClient, r: dict) -> dict:
    body = {"model": "tiny", "prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": r["stream"]}
    if r["stream"]:
        body["stream_options"] = {"include_usage": True}
        text, usage, finish, n = "", None, None, 0
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                import json
                d = json.loads(line[6:])
                assert "error" not in d, d
                if d["choices"]:
                    text += d["choices"][0]["text"]
                    finish = d["choices"][0]["finish_reason"] or finish
                    n += 1
                usage = d.get("usage") or usage
                if r["cancel"] and n >= r["cancel_after"] and finish is None:
                    return dict(r, outcome="cancelled")
        return dict(r, outcome="done", text=text, finish=finish, tokens=usage["completion_tokens"])
    try:
        resp = await client.post("/v1/completions", json=body,
                                 timeout=httpx.Timeout(120, read=r["timeout"]) if r["cancel"] else 120)
    except httpx.ReadTimeout:
        return dict(r, outcome="cancelled")
    assert resp.status_code == 200, resp.text
    d = resp.json()
    c = d["choices"][0]
    return dict(r, outcome="done", text=c["text"], finish=c["finish_reason"], tokens=d["usage"]["completion_tokens"])


async def run_all(url, reqs):
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def guarded(r):
            async with sem:
                return await run_one(client, r)
        return await asyncio.wait_for(asyncio.gather(*[guarded(r) for r in reqs]), 900)


def wait_idle(server, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if metric(m, "tensorgpu:num_requests_running") == 0 and metric(m, "tensorgpu:num_requests_waiting") == 0:
            return m
        assert time.monotonic() < deadline, "the engine did not become idle: a request hangs"
        time.sleep(0.2)


def test_load_mixed_lengths_and_cancellations():
    model = GPTNeoX.from_gguf(TINY_NEOX)
    s = ServerProcess(TINY_NEOX, "--max-batch", "16", "--ctx", str(CTX), "--max-waiting", "512", name="tiny")
    try:
        asyncio.run(run_all(s.url, plan(model.tokenizer, 48, seed=1)))        # warm-up: every bucket compiled
        wait_idle(s)
        rss0 = s.rss_mb()
        before = s.metrics()
        reqs = plan(model.tokenizer, N_REQUESTS, seed=2)
        t0 = time.monotonic()
        results = asyncio.run(run_all(s.url, reqs))
        took = time.monotonic() - t0
        after = wait_idle(s)
        rss1 = s.rss_mb()
        done = [r for r in results if r["outcome"] == "done"]
        cancelled = [r for r in results if r["outcome"] == "cancelled"]
        print(f"load: {len(done)} done, {len(cancelled)} cancelled in {took:.1f} s; RSS {rss0:.0f} -> {rss1:.0f} MB")
        assert len(done) + len(cancelled) == N_REQUESTS and len(cancelled) >= N_REQUESTS // 10
        assert all(r["finish"] == "length" and r["tokens"] == r["max_tokens"] for r in done)
        assert rss1 - rss0 < MAX_RSS_GROWTH_MB, f"server RSS grew {rss1 - rss0:.0f} MB ({rss0:.0f} -> {rss1:.0f})"

        def d(name, **labels):
            return metric(after, name, **labels) - metric(before, name, **labels)
        assert d("tensorgpu:http_requests_total", endpoint="/v1/completions", status="200") + \
            d("tensorgpu:http_requests_total", endpoint="/v1/completions", status="499") == N_REQUESTS
        ended = metric_sum(after, "tensorgpu:request_success_total") - metric_sum(before, "tensorgpu:request_success_total")
        assert ended == N_REQUESTS
        n_cancel = d("tensorgpu:request_success_total", finished_reason="cancelled")
        n_length = d("tensorgpu:request_success_total", finished_reason="length")
        assert n_cancel <= len(cancelled) and n_length >= len(done) and n_cancel + n_length == N_REQUESTS
        gen = d("tensorgpu:generation_tokens_total")
        assert sum(r["tokens"] for r in done) <= gen <= sum(r["max_tokens"] for r in results)
        assert d("tensorgpu:batch_size_sum") <= gen
        pre = d("tensorgpu:prompt_tokens_total")
        assert sum(len(r["prompt"]) for r in done) <= pre <= sum(len(r["prompt"]) for r in results)
        assert d("tensorgpu:time_to_first_token_seconds_count") >= len(done)
        # a sample of the completed outputs equals each prompt's greedy continuation alone
        for r in done[::max(1, len(done) // 20)]:
            ids = list(model.session(max_context=CTX).generate(r["prompt"], max_new_tokens=r["max_tokens"],
                                                               stop_on_eos=False))
            assert r["text"] == model.tokenizer.decode(ids), r["i"]
    finally:
        s.close()
