"""`python -m models serve`: the OpenAI-compatible server for one GGUF model.

    python -m models serve --model FILE.gguf [--host 127.0.0.1 --port 8000 --max-batch 64 --ctx N
                                              --max-waiting N --model-name NAME]
    python -m models serve --ray --replicas 2 [--num-gpus 1] ...   (Ray Serve, models/serve/ray_serve.py)

The port is bound at once; the model loads in the background (GET /health answers 503 until
it is ready, then 200). SIGTERM or Ctrl-C: new connections are refused, in-flight responses get
--shutdown-timeout seconds to finish, then the rest are cancelled and the engine stops.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

PROG = "python -m models serve"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..gpt_neox import DEFAULT_MODEL
    p.add_argument("--model", "-m", default=str(DEFAULT_MODEL),
                   help="GGUF file of any supported model (default: the bundled tiny-neox q8_0)")
    p.add_argument("--model-name", default=None,
                   help="the name clients pass as `model` (default: the file name without .gguf)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together in one step (default 64)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length of every sequence, prompt + completion (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a batch slot; beyond it requests get 503 (default 256)")
    p.add_argument("--exact-batching", action="store_true",
                   help="keep batched decode steps off the tensor cores (f32 WGSL matmuls): greedy tokens are "
                        "then the same at every batch size, bit for bit, at the cost of batch throughput; "
                        "without it they agree to f16 rounding on GPUs with tensor cores")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight responses get to finish after SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="where the engine (model, GPU, batching) runs: 'process' (default) a child process, so "
                        "HTTP work and decode steps never wait for one GIL (models/serve/engine_process.py); "
                        "'thread' a thread of the server process. With --ray each replica runs its own, on a thread")
    p.add_argument("--gil-switch-ms", type=float, default=None,
                   help="Python's thread switch interval (sys.setswitchinterval) in ms; default Python's 5. With "
                        "--engine thread the engine thread re-takes the GIL after every wgpu call, and while the "
                        "HTTP thread runs Python it waits up to this long each time")
    r = p.add_argument_group("Ray Serve (pip install -e '.[serve]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas instead of one process")
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each loading the model (default 1)")
    r.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs Ray reserves per replica (1 on a GPU cluster; default 0)")
    r.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray instance)")


def parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible HTTP server (/v1/completions, "
                                "/v1/chat/completions, /v1/models, /health, /metrics) with continuous batching.")
    add_arguments(p)
    return p


def check_args(a) -> Optional[str]:
    """The first bad argument, as a message (None: all fine)."""
    if not os.path.isfile(a.model):
        return f"--model {a.model}: no such file"
    if not 0 <= a.port <= 65535:
        return f"--port must be in [0, 65535], got {a.port}"
    if not 1 <= a.max_batch <= 1024:
        return f"--max-batch must be in [1, 1024], got {a.max_batch}"
    if a.ctx is not None and a.ctx < 2:
        return f"--ctx must be >= 2, got {a.ctx}"
    if a.max_waiting < 0:
        return f"--max-waiting must be >= 0, got {a.max_waiting}"
    if a.shutdown_timeout < 0:
        return f"--shutdown-timeout must be >= 0, got {a.shutdown_timeout}"
    if a.replicas < 1:
        return f"--replicas must be >= 1, got {a.replicas}"
    if a.num_gpus < 0:
        return f"--num-gpus must be >= 0, got {a.num_gpus}"
    if a.gil_switch_ms is not None and not 0.01 <= a.gil_switch_ms <= 100:
        return f"--gil-switch-ms must be in [0.01, 100], got {a.gil_switch_ms}"
    if a.engine == "process" and a.ray:
        return "--engine process and --ray do not combine (each Ray replica runs its engine on a thread)"
    return None


def model_name_of(a) -> str:
    if a.model_name:
        return a.model_name
    base = os.path.basename(a.model)
    return base[:-5] if base.lower().endswith(".gguf") else base


def engine_factory(path: str, max_batch: int, ctx: Optional[int], max_waiting: int, exact_batching: bool = False):
    """A function that loads the model and builds its Engine (called where the model will live:
    the server's loader thread, or a Ray replica)."""
    def make():
        from ..registry import load
        from .engine import Engine
        model = load(path, progress=False)
        return Engine(model, max_batch=max_batch, max_context=ctx, max_waiting=max_waiting,
                      exact_batching=exact_batching)
    return make


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """`tensorgpu serve` (prog names the command in usage lines); returns the exit status."""
    a = parser(prog).parse_args(argv)
    err = check_args(a)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = model_name_of(a)
    if a.gil_switch_ms is not None:
        sys.setswitchinterval(a.gil_switch_ms / 1000)
    if a.ray:
        from .ray_serve import run_ray
        return run_ray(a.model, name, replicas=a.replicas, num_gpus=a.num_gpus, host=a.host, port=a.port,
                       max_batch=a.max_batch, ctx=a.ctx, max_waiting=a.max_waiting, address=a.ray_address,
                       exact_batching=a.exact_batching)
    from .app import build_app
    if (a.engine or "process") == "process":
        def factory():
            from .engine_process import EngineProcess
            return EngineProcess(a.model, a.max_batch, a.ctx, a.max_waiting, a.exact_batching)
    else:
        factory = engine_factory(a.model, a.max_batch, a.ctx, a.max_waiting, a.exact_batching)
    app = build_app(factory, name)
    print(f"tensorgpu serve: {name} ({a.model}) on http://{a.host}:{a.port} (loading; GET /health is 200 when "
          f"ready)", file=sys.stderr, flush=True)
    serve_uvicorn(app, a.host, a.port, a.shutdown_timeout, log_level=a.log_level, access_log=a.access_log)
    return 0


def serve_uvicorn(app, host: str, port: int, shutdown_timeout: float, **config) -> None:
    """Run `app` (build_app's) under uvicorn until SIGTERM / SIGINT, then shut down gracefully:
    the listener closes, in-flight requests get `shutdown_timeout` s to finish, the rest are
    cancelled through the engine (their responses end cleanly), the engine stops, and the
    process exits 0."""
    import asyncio
    import contextlib
    import signal
    import threading

    import uvicorn

    serving = app.state.server

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            drain = asyncio.ensure_future(serving.drain(shutdown_timeout))
            try:
                await super().shutdown(sockets)
            finally:
                if not drain.done():
                    drain.cancel()

        @contextlib.contextmanager
        def capture_signals(self):
            # as uvicorn's, but without re-raising the signal at the end: a drained server exits 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    # uvicorn's own cancellation of still-running tasks is only a backstop behind the drain
    cfg = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout + 10, **config)
    GracefulServer(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
