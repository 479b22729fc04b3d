"""The Ray Serve deployment (models/serve/ray_serve.py).

* In the normal suite: `serve.run(app, _local_testing_mode=True)`: the replica class loads the
  model, builds the app over its engine and runs its lifespan in this process; a
  DeploymentHandle calls the OpenAI methods.
* With TENSORGPU_RAY=1 (the long step of .ci/run): a real local Ray instance
  (`ray.init(num_cpus=2, include_dashboard=False)`), 2 replicas, streaming over HTTP on
  127.0.0.1 through Ray's proxy with the openai client, bounded in time.
"""
import asyncio
import os
import time

import openai
import pytest

from models.gpt_neox import GPTNeoX
from serve_util import REPO_ROOT, TINY_NEOX, free_port

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
serve = pytest.importorskip("ray.serve")

from models.serve.ray_serve import application  # noqa: E402

PROMPTS = ["In the beginning God created", "The quick brown fox", "Once upon a time there was", "And",
           "He said unto them,", "The colorsys module defines", "A dictionary is", "Blessed are the"]


@pytest.fixture(scope="module")
def greedy():
    m = GPTNeoX.from_gguf(TINY_NEOX)
    return {p: m.tokenizer.decode(list(m.session(max_context=128).generate(p, max_new_tokens=8, stop_on_eos=False)))
            for p in PROMPTS}


def test_local_testing_mode(greedy):
    handle = serve.run(application(str(TINY_NEOX), "tiny", max_batch=4, ctx=128), _local_testing_mode=True)
    assert handle.check_health.remote().result() is None
    resps = [handle.completions.remote({"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0,
                                        "ignore_eos": True}) for p in PROMPTS[:4]]
    for p, r in zip(PROMPTS, resps):
        out = r.result(timeout_s=300)
        assert out["choices"][0]["text"] == greedy[p] and out["usage"]["completion_tokens"] == 8
    err = handle.completions.remote({"model": "gpt-5", "prompt": "x"}).result()
    assert err["error"]["code"] == "model_not_found"
    err = handle.completions.remote({"model": "tiny", "prompt": "x", "top_p": 2}).result()
    assert err["error"]["param"] == "top_p"
    err = handle.chat_completions.remote({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}).result()
    assert err["error"]["code"] == "no_chat_template"
    err = handle.completions.remote({"model": "tiny", "prompt": "x", "stream": True}).result()
    assert err["error"]["param"] == "stream"


@pytest.mark.skipif(os.environ.get("TENSORGPU_RAY", "") in ("", "0"),
                    reason="TENSORGPU_RAY=1 runs it (the long step of .ci/run)")
def test_real_ray_two_replicas_stream_over_http(greedy):
    import ray
    port = free_port()
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(TINY_NEOX), "tiny", replicas=2, num_cpus=1, max_batch=4, ctx=128),
                  name="tensorgpu", route_prefix="/")
        st = serve.status().applications["tensorgpu"]
        assert st.status == "RUNNING"
        assert st.deployments["tensorgpu"].replica_states == {"RUNNING": 2}
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

        async def one(p):
            text = ""
            async for ch in await client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0,
                                                            stream=True, extra_body={"ignore_eos": True}):
                text += ch.choices[0].text if ch.choices else ""
            return text

        async def run_all():
            try:
                return await asyncio.wait_for(asyncio.gather(*[one(p) for p in PROMPTS]), 240)
            finally:
                await client.close()
        got = asyncio.run(run_all())
        assert got == [greedy[p] for p in PROMPTS]
        import httpx
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        assert time.monotonic() - t0 < 400
    finally:
        serve.shutdown()
        ray.shutdown()
