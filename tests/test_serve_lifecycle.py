"""The server's lifecycle and limits: /health while loading and after a failed load, the queue
limit (503), EOS handling (ignore_eos), and SIGTERM with requests in flight."""
import json
import os
import shutil
import struct
import threading
import time

import httpx
import pytest
import uvicorn

from models.gpt_neox import GPTNeoX
from models.serve.app import build_app
from serve_util import TINY_NEOX, ServerProcess, free_port, metric, openai_client, collect_garbage  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("collect_garbage")

PROMPT = "In the beginning God created"


def with_eos(src, dst, eos_id: int) -> None:
    """A copy of a GGUF file whose tokenizer.ggml.eos_token_id (a u32) is `eos_id`."""
    shutil.copyfile(src, dst)
    key = b"tokenizer.ggml.eos_token_id"
    with open(dst, "r+b") as f:
        head = f.read(1 << 20)
        at = head.index(key) + len(key)
        vtype, = struct.unpack_from("<I", head, at)
        assert vtype == 4, f"eos_token_id has GGUF type {vtype}, expected 4 (uint32)"
        f.seek(at + 4)
        f.write(struct.pack("<I", eos_id))


@pytest.fixture(scope="module")
def greedy_ids():
    m = GPTNeoX.from_gguf(TINY_NEOX)
    ids = list(m.session(max_context=128).generate(PROMPT, max_new_tokens=8, stop_on_eos=False))
    yield ids, m.tokenizer
    del m


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, greedy_ids):
    """tiny-neox whose EOS is the 4th greedy token of PROMPT; one batch slot, one waiting request."""
    ids, _ = greedy_ids
    assert ids[3] not in ids[:3]
    path = tmp_path_factory.mktemp("eos") / "tiny-neox-eos.gguf"
    with_eos(TINY_NEOX, path, ids[3])
    s = ServerProcess(path, "--max-batch", "1", "--max-waiting", "1", "--ctx", "128", name="tiny")
    yield s
    s.close()


def test_eos_stops_unless_ignore_eos(small_server, greedy_ids):
    ids, tok = greedy_ids
    client = openai_client(small_server, timeout=120)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
    assert r.choices[0].text == tok.decode(ids[:3])          # EOS ends the text, it is not part of it
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == tok.decode(ids)


def test_full_queue_is_a_503(small_server):
    url = small_server.url
    long = {"model": "tiny", "prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    done = []
    with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=120) as running:
        lines = running.iter_lines()
        next(lines)                                                  # the one slot is taken
        waiter = threading.Thread(target=lambda: done.append(httpx.post(url + "/v1/completions", json=long,
                                                                        timeout=300)))
        waiter.start()
        deadline = time.monotonic() + 30
        while metric(small_server.metrics(), "tensorgpu:num_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        r = httpx.post(url + "/v1/completions", json=long, timeout=60)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "service_unavailable_error"
        assert "max_waiting=1" in err["message"]
    waiter.join(300)
    assert done and done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 120


def test_health_is_503_while_loading_and_after_a_failed_load():
    release = threading.Event()

    def factory():
        release.wait(60)
        raise RuntimeError("the GPU caught fire")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(factory, "m"), host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(url + "/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        release.set()
        while httpx.get(url + "/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and "the GPU caught fire" in r.json()["error"]
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
    finally:
        release.set()
        server.should_exit = True
        t.join(30)


@pytest.mark.parametrize("engine", [("--engine", "thread"), ()], ids=["engine-thread", "engine-process"])
def test_sigterm_with_requests_in_flight(engine):
    """SIGTERM: the listener closes at once, in-flight responses get --shutdown-timeout to finish,
    then are cancelled; the process exits 0 without a traceback (with the engine in its own
    process, the default, that process too)."""
    s = ServerProcess(TINY_NEOX, "--max-batch", "2", "--ctx", "512", "--shutdown-timeout", "2", *engine)
    try:
        body = {"prompt": "Hello", "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
        seen, ended = [], threading.Event()

        def stream():
            try:
                with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        seen.append(line)
            except httpx.TransportError as e:
                seen.append(f"transport error: {type(e).__name__}")
            finally:
                ended.set()

        th = threading.Thread(target=stream)
        th.start()
        deadline = time.monotonic() + 60
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == s.proc.pid]
        assert bool(kids) == (not engine), kids     # the engine process (and multiprocessing's resource tracker)
        t0 = time.monotonic()
        s.proc.send_signal(15)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
        rc = s.proc.wait(60)
        took = time.monotonic() - t0
        assert ended.wait(30), "the client's stream never ended"
        th.join(30)
        assert rc == 0, s.output()
        assert took < 20, f"shutdown took {took:.1f} s with --shutdown-timeout 2"
        deadline = time.monotonic() + 10                    # no engine process outlives the server
        while any(os.path.exists(f"/proc/{k}") for k in kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [k for k in kids if os.path.exists(f"/proc/{k}")], f"left behind by the server: {kids}"
        assert "Traceback" not in s.output(), s.output()
        # finished, or cancelled at the timeout with an OpenAI error event; either way it ends with [DONE]
        events = [line for line in seen if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2][6:])
        if "error" in last:
            assert last["error"]["code"] == "cancelled" and took >= 2 - 0.5
        else:
            assert last["choices"][0]["finish_reason"] == "length"
    finally:
        s.close()


def _parent_of(pid: int) -> int:
    """The parent pid of a live process (Linux /proc), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
