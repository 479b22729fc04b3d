"""A `serve` server in a child process on 127.0.0.1: started on a free port, ready once /health
answers 200, stopped with SIGTERM (killed if it does not exit).

Why here: the server tests and benchmarks/bench_serve.py both drive a real server process, and
one launcher keeps their start-up, readiness wait and shutdown the same."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional

# this package is `models` in a checkout and `tensorgpu_models` installed; its parent is on sys.path
_PACKAGE = __name__.split(".")[0]
_ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m <package> serve --model MODEL --port P [--model-name NAME] *args`, output to `log`
    (an open text file); waits up to `ready_timeout` s for /health to answer 200, recording the
    status codes seen meanwhile in `health_seen`. RuntimeError if it exits or times out first."""

    def __init__(self, model, *args: str, log: IO[str], name: Optional[str] = None, ready_timeout: float = 120.0,
                 poll_s: float = 0.1):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", _PACKAGE, "serve", "--model", str(model), "--port", str(self.port), *args]
        if name:
            cmd += ["--model-name", name]
        env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.health_seen: list = []
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                self.health_seen.append(r.status_code)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {ready_timeout} s:\n{self.output()}")
            time.sleep(poll_s)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; kill after `timeout` s. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
