"""Threads: tensors and sessions used from many threads at once give exactly what serial use
gives (runtime.LOCK guards every entry point; ARCHITECTURE.md, "Threads"). Before the lock,
4 threads of small reductions aborted the process ("Buffer ... is still mapped"), 2 threads
gave 3-11% wrong results, and two threads generating on their own sessions of one model both
got output that differed from running alone."""
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import tensorgpu as tg
from models.gpt_neox import GPTNeoX


def _run_threads(fn, n):
    results, errors = [None] * n, []

    def body(i):
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    ts = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors
    return results


def _mixed_ops(seed, rounds=12):
    """Elementwise, reductions (one- and two-stage), matmul, cat, an in-place write, a tiny
    readback: what a user's worker thread might do, all values read back."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        a = rng.standard_normal((48, 40)).astype(np.float32)
        b = rng.standard_normal((40, 24)).astype(np.float32)
        ta, tb = tg.tensor(a), tg.tensor(b)
        big = tg.tensor(rng.standard_normal(40000).astype(np.float32))
        t = tg.zeros((16,), tg.float32).contiguous().realize()
        t[3:7] = ta[0, :4] * 2
        out.append([(ta * 2 + 1).exp().sum(-1).numpy(), (ta @ tb).numpy(), big.max().numpy(),
                    tg.cat([ta[:5], ta[10:12] - 1], 0).argmax(1).numpy(), t.numpy(), float(ta.mean().item())])
    return out


def test_eight_threads_of_mixed_ops_equal_serial():
    serial = [_mixed_ops(s) for s in range(8)]
    parallel = _run_threads(_mixed_ops, 8)
    for s in range(8):
        for r, (x, y) in enumerate(zip(serial[s], parallel[s])):
            for k, (u, v) in enumerate(zip(x, y)):
                assert np.array_equal(u, v), f"thread {s}, round {r}, value {k} differs from the serial run"


@pytest.fixture(scope="module")
def q8(tiny_neox_dir):
    return GPTNeoX.from_gguf(tiny_neox_dir / "tiny-neox-q8_0.gguf")


def test_four_sessions_of_one_model_generate_as_alone(q8):
    prompts = [[5, 17, 3], [100, 200, 300, 400], [42], [7, 7, 7, 7, 7, 7, 7]]
    settings = [dict(), dict(temperature=0.8, top_k=20, seed=1), dict(), dict(temperature=1.0, top_p=0.9, seed=3)]

    def gen(i):
        s = q8.session(max_context=64)
        first = list(s.generate(prompts[i], max_new_tokens=14, stop_on_eos=False, **settings[i]))
        more = list(s.generate(None, max_new_tokens=6, stop_on_eos=False, **settings[i]))
        logits = s.forward([9, 8]).numpy()
        return first, more, logits

    alone = [gen(i) for i in range(4)]
    together = _run_threads(gen, 4)
    for i in range(4):
        assert together[i][0] == alone[i][0], f"session {i}: generated tokens differ from its solo run"
        assert together[i][1] == alone[i][1], f"session {i}: continued tokens differ from its solo run"
        np.testing.assert_array_equal(together[i][2], alone[i][2], err_msg=f"session {i}: logits differ")


def test_first_use_from_two_threads_creates_one_device(repo_root):
    """In a fresh process, two threads whose first ops race to create the device: one device,
    both results right."""
    code = textwrap.dedent("""
        import threading, numpy as np, tensorgpu as tg
        from tensorgpu import runtime
        made = []
        orig = runtime.Device.__init__
        def counting(self):
            made.append(1)
            orig(self)
        runtime.Device.__init__ = counting
        res = [None, None]
        go = threading.Barrier(2)
        def work(i):
            go.wait()
            res[i] = (tg.arange(1000) * (i + 1)).sum().item()
        ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert len(made) == 1, f"{len(made)} devices created"
        assert res == [499500, 999000], res
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_a_finalizer_on_another_thread_never_waits_for_the_lock():
    """A Buffer dropped on a thread while another holds the runtime lock (as the garbage
    collector may do on wgpu's poll thread while a readback waits on it) is queued, not waited
    for; the next locked entry point returns it to the pool."""
    from tensorgpu import runtime
    box = [runtime.Buffer(4096)]
    live = runtime.live_bytes()
    done = threading.Event()

    def drop():
        box.clear()                  # the last reference: Buffer.__del__ runs on this thread
        done.set()

    with runtime.LOCK:
        t = threading.Thread(target=drop)
        t.start()
        assert done.wait(20), "a finalizer waited for the lock another thread held"
    t.join()
    assert runtime.live_bytes() == live               # not given back yet: queued
    tg.tensor(np.ones(4, np.float32)).numpy()         # a locked entry point runs the queue
    assert not runtime._DEFERRED and runtime.live_bytes() < live
