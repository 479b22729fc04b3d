"""A real `python -m models serve` process on 127.0.0.1 for the server tests: started on a free
port, ready when /health answers 200, stopped with SIGTERM (killed if it does not exit)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import gc

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_NEOX = REPO_ROOT / "models" / "tiny-neox" / "tiny-neox-q8_0.gguf"
TINY_QWEN2 = REPO_ROOT / "models" / "tiny-qwen2" / "tiny-qwen2-q8_0.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, *args: str, name: Optional[str] = None, ready_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "models", "serve", "--model", str(model), "--port", str(self.port), *args]
        if name:
            cmd += ["--model-name", name]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.health_seen = []       # /health status codes while waiting
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
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def rss_mb(self) -> float:
        """Resident memory of the server process, MB (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")

    def metrics(self) -> dict:
        """/metrics as {(name, labels as a sorted tuple): value}."""
        from prometheus_client.parser import text_string_to_metric_families
        r = httpx.get(self.url + "/metrics", timeout=10)
        r.raise_for_status()
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

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

    def close(self) -> None:
        self.terminate()
        self.log.close()
        os.unlink(self.log.name)


def metric(m: dict, name: str, **labels) -> float:
    """One sample of a metrics() dict (0 when absent)."""
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def metric_sum(m: dict, name: str) -> float:
    """All samples of `name` summed over their labels."""
    return sum(v for (n, _), v in m.items() if n == name)


@pytest.fixture(scope="module")
def collect_garbage():
    """Collect this module's cyclic garbage (models, engines, captures) on the main thread when it
    ends. Why: runtime.Buffer.__del__ takes runtime.LOCK, and a collection that runs on wgpu's poll
    thread while another thread holds the lock and waits in map_sync for that thread deadlocks
    (seen in tests/test_threads.py after these modules); garbage left behind makes that likelier."""
    yield
    gc.collect()
