"""What the server tests share: a real `python -m models serve` process on 127.0.0.1
(models/serve/process.py's launcher with a temporary log), /metrics helpers, the reference models,
an OpenAI client for a server, and the garbage-collection fixture."""
from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Optional

import httpx
import pytest

from models.serve.process import ServerProcess as _Launched, free_port  # noqa: F401 (free_port: for tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_NEOX = REPO_ROOT / "models" / "tiny-neox" / "tiny-neox-q8_0.gguf"
TINY_QWEN2 = REPO_ROOT / "models" / "tiny-qwen2" / "tiny-qwen2-q8_0.gguf"


class ServerProcess(_Launched):
    """The package's server launcher (models/serve/process.py) with a temporary log, plus what
    the tests read: memory, /metrics, and close() (stop, remove the log)."""

    def __init__(self, model: Path, *args: str, name: Optional[str] = None, ready_timeout: float = 120.0):
        log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        super().__init__(model, *args, log=log, name=name, ready_timeout=ready_timeout)

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

    def close(self) -> None:
        self.terminate()
        self.log.close()
        os.unlink(self.log.name)


def openai_client(server, timeout: float = 300):
    """The official client for `server`, without retries (a failure shows as it happens)."""
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


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
