"""The Ray Serve deployment (models/serve/ray_serve.py).

* In the normal suite: `serve.run(app, _local_testing_mode=True)` (in a worker process, whose
  replica threads cannot outlive it): the replica class loads the model, builds the app over its
  engine and runs its lifespan; a DeploymentHandle calls the OpenAI methods.
* With TENSORGPU_RAY=1 (the long step of .ci/run): a real local Ray instance
  (`ray.init(num_cpus=2, include_dashboard=False)`), 2 replicas, streaming over HTTP on
  127.0.0.1 through Ray's proxy with the openai client, bounded in time.
"""
import asyncio
import json
import os
import subprocess
import sys
import time

import openai
import pytest

from models.gpt_neox import GPTNeoX
from serve_util import REPO_ROOT, TINY_NEOX, free_port, collect_garbage  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("collect_garbage")

pytest.importorskip("ray.serve")

PROMPTS = ["In the beginning God created", "The quick brown fox", "Once upon a time there was", "And",
           "He said unto them,", "The colorsys module defines", "A dictionary is", "Blessed are the"]


@pytest.fixture(scope="module")
def greedy():
    m = GPTNeoX.from_gguf(TINY_NEOX)
    return {p: m.tokenizer.decode(list(m.session(max_context=128).generate(p, max_new_tokens=8, stop_on_eos=False)))
            for p in PROMPTS}


def test_local_testing_mode(greedy):
    """serve.run(app, _local_testing_mode=True), in a worker process (tests/ray_local_worker.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "ray_local_worker.py"), str(TINY_NEOX),
                        *PROMPTS[:4]], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["health"] is None
    for p, c in zip(PROMPTS, out["completions"]):
        assert c["choices"][0]["text"] == greedy[p] and c["usage"]["completion_tokens"] == 8
    assert out["unknown_model"]["error"]["code"] == "model_not_found"
    assert out["bad_top_p"]["error"]["param"] == "top_p"
    assert out["chat"]["error"]["code"] == "no_chat_template"
    assert out["stream"]["error"]["param"] == "stream"


@pytest.mark.skipif(os.environ.get("TENSORGPU_RAY", "") in ("", "0"),
                    reason="TENSORGPU_RAY=1 runs it (the long step of .ci/run)")
def test_real_ray_two_replicas_stream_over_http(greedy, monkeypatch):
    import ray
    from ray import serve

    from models.serve.ray_serve import application
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
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
