"""Ray Serve: the same FastAPI app (app.build_app) in N replicas, each owning one model on one
adapter; Ray's proxy spreads HTTP requests over them.

    python -m models serve --ray --replicas 2 --model FILE.gguf [--num-gpus 1] [--port 8000]

or from Python / a Serve config:

    from models.serve.ray_serve import application
    serve.run(application("FILE.gguf", replicas=2, num_gpus=1), route_prefix="/")

Why a late-bound ingress (`@serve.ingress()` with `__serve_build_asgi_app__`): the app must
wrap the replica's own Engine, which only exists once the replica has loaded the model, so the
app is built in the replica after its constructor ran; Ray routes to a replica only then. The
replica's ASGI lifespan starts the engine thread, and Ray's replica teardown runs the lifespan's
shutdown (engine.shutdown, cancelling what is in flight).

Besides HTTP, a DeploymentHandle can call `completions(body)` and `chat_completions(body)` with a
request dict and gets the response dict (or an OpenAI error dict): deployments compose without HTTP.

Ray is an optional dependency (`pip install -e ".[serve]"`); nothing else in the project imports it.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Optional

from ray import serve

from .app import build_app
from .cli import engine_factory
from .protocol import ApiError

__all__ = ["TensorGPUDeployment", "application", "run_ray"]


@serve.deployment(name="tensorgpu")
@serve.ingress()
class TensorGPUDeployment:
    """One replica: loads the model, builds its Engine and the OpenAI app over it."""

    def __init__(self, model_path: str, model_name: str, max_batch: int = 64, ctx: Optional[int] = None,
                 max_waiting: int = 256, exact_batching: bool = False):
        engine = engine_factory(model_path, max_batch, ctx, max_waiting, exact_batching)()
        self._app = build_app(engine, model_name, load_in_background=False)
        self._server = self._app.state.server

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Ray's periodic replica health check: a replica whose engine failed is restarted."""
        status, body = self._server.health()
        if status != 200 and not self._server.shutting_down:
            raise RuntimeError(f"tensorgpu replica unhealthy: {body}")

    async def completions(self, body: dict) -> dict:
        """A /v1/completions request dict -> the response dict (non-streaming) or {"error": ...}."""
        return await self._call(self._server.completions, body)

    async def chat_completions(self, body: dict) -> dict:
        """A /v1/chat/completions request dict -> the response dict (non-streaming) or {"error": ...}."""
        return await self._call(self._server.chat_completions, body)

    async def _call(self, fn, body: dict) -> dict:
        if body.get("stream"):
            return ApiError(400, "stream: a DeploymentHandle call returns one response; stream over HTTP",
                            param="stream").body()
        try:
            return await fn(json.dumps(body).encode())
        except ApiError as e:
            return e.body()


def application(model_path: str, model_name: Optional[str] = None, *, replicas: int = 1, num_gpus: float = 0,
                num_cpus: float = 1, max_batch: int = 64, ctx: Optional[int] = None, max_waiting: int = 256,
                exact_batching: bool = False):
    """The bound Serve application: `replicas` copies, each reserving num_gpus GPUs (1 on a GPU
    cluster: one replica per GPU) and num_cpus CPUs."""
    path = os.path.abspath(model_path)
    name = model_name or os.path.basename(path).removesuffix(".gguf")
    d = TensorGPUDeployment.options(num_replicas=replicas,
                                    ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus})
    return d.bind(path, name, max_batch, ctx, max_waiting, exact_batching)


def _repo_root() -> str:
    # the folder above the models package (this file is <root>/models/serve/ray_serve.py; installed,
    # <site-packages>/tensorgpu_models/serve/ray_serve.py)
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_ray(model_path: str, model_name: str, *, replicas: int = 1, num_gpus: float = 0, host: str = "127.0.0.1",
            port: int = 8000, max_batch: int = 64, ctx: Optional[int] = None, max_waiting: int = 256,
            address: Optional[str] = None, exact_batching: bool = False) -> int:
    """`python -m models serve --ray`: deploy, serve until SIGTERM / Ctrl-C, then shut Serve down."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # a new local instance: its workers import this checkout, as the driver does
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": _repo_root()}})
    else:
        ray.init(address=address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(model_path, model_name, replicas=replicas, num_gpus=num_gpus, max_batch=max_batch,
                              ctx=ctx, max_waiting=max_waiting, exact_batching=exact_batching),
                    name="tensorgpu", route_prefix="/")
        print(f"tensorgpu serve (Ray): {model_name} in {replicas} replica(s) on http://{host}:{port}",
              file=sys.stderr, flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
