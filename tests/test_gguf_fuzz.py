"""Random corruption of a small valid GGUF file: every outcome must be a clean load (whose device
bytes equal the file's, and which gguf.GGUFReader reads the same way) or a GGUFError, never another exception, a crash or a hang, and a failed
load leaves no device memory behind. Seeded, so a failure is reproducible by its case number."""
import gc
import signal
import struct

import numpy as np
import pytest

import tensorgpu.gguf as G
from tensorgpu import runtime
from tensorgpu.gguf import GGUFError, GGUFFile, load_gguf, save_gguf

N_CASES = 1000
TIME_LIMIT_S = 5.0


class _Stub:
    def __init__(self, buf, shape, dtype):
        self.buf, self.shape, self.dtype = buf, tuple(shape), dtype


@pytest.fixture(autouse=True)
def tensor_wrap(monkeypatch):
    try:
        from tensorgpu.tensor import Tensor
        ok = hasattr(Tensor, "from_buffer")
    except Exception:
        ok = False
    if not ok:
        monkeypatch.setattr(G, "_wrap", lambda buf, shape, dtype: _Stub(buf, shape, dtype))


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("fuzz") / "seed.gguf"
    tensors = {"a.weight": rng.standard_normal((4, 64)).astype(np.float32),
               "a.bias": rng.standard_normal(64).astype(np.float32),
               "b.weight": rng.standard_normal((2, 32)).astype(np.float32),
               "h": rng.standard_normal((3, 3)).astype(np.float16),
               "i": np.arange(5, dtype=np.int32)}
    meta = {"general.name": "fuzz", "n": 3, "eps": 1e-5, "flag": True, "neg": -1,
            "words": ["x", "yy", "zzz", "Ġthe"], "ids": [3, 3, 1, 1], "fl": [0.5, 0.25]}
    save_gguf(path, tensors, meta, quantize={"a.weight": "q8_0", "b.weight": "q4_0"}, architecture="fuzz")
    data = path.read_bytes()
    assert 1000 < len(data) < 8192
    header_end = load_gguf(path, progress=False).tensor_info["a.weight"][2]  # start of the data section
    return data, header_end


def _mutate(data: bytes, header_end: int, rng: np.random.Generator) -> bytes:
    """One of: byte flips (mostly in the header/metadata/tensor infos), a huge or random u64/u32
    written over a field, truncation, insertion, deletion, duplication of a region."""
    b = bytearray(data)
    kind = rng.integers(0, 7)
    pos = lambda lim: int(rng.integers(0, lim))  # noqa: E731
    if kind == 0:
        for _ in range(int(rng.integers(1, 5))):
            p = pos(header_end) if rng.random() < 0.8 else pos(len(b))
            b[p] ^= int(rng.integers(1, 256))
    elif kind == 1:
        p = pos(header_end - 8)
        choices = [1 << 60, (1 << 64) - 1, 1 << 32, 1 << 31, int(rng.integers(0, 1 << 20))]
        val = choices[int(rng.integers(0, len(choices)))]
        struct.pack_into("<Q", b, p, val)
    elif kind == 2:
        p = pos(header_end - 4)
        struct.pack_into("<I", b, p, int(rng.integers(0, 1 << 32)))
    elif kind == 3:
        del b[pos(len(b)):]
    elif kind == 4:
        p = pos(len(b))
        b[p:p] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
    elif kind == 5:
        p = pos(len(b))
        del b[p:p + int(rng.integers(1, 33))]
    else:
        p = pos(header_end)
        n = int(rng.integers(1, 64))
        b[p:p] = b[p:p + n]
    return bytes(b)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def test_fuzz_gguf(seed_file, tmp_path):
    data, header_end = seed_file
    rng = np.random.default_rng(20240601)
    path = tmp_path / "case.gguf"
    outcomes = {"loaded": 0, "error": 0}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    gc.collect()
    gc.freeze()  # every case calls gc.collect(); keep it from rescanning the whole test session
    baseline = runtime.live_bytes()
    try:
        for case in range(N_CASES):
            blob = _mutate(data, header_end, rng)
            path.write_bytes(blob)
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
            try:
                result = load_gguf(path, progress=False)
            except GGUFError as e:
                assert str(path) in str(e), f"case {case}: message lacks the path: {e}"
                outcomes["error"] += 1
                result = None
            except _Timeout:
                pytest.fail(f"case {case}: load_gguf took over {TIME_LIMIT_S} s")
            except Exception as e:  # noqa: BLE001 - the point of the test
                pytest.fail(f"case {case}: {type(e).__name__} instead of GGUFError: {e}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if result is not None:
                assert isinstance(result, GGUFFile)
                outcomes["loaded"] += 1
                # gguf.GGUFReader must read every file we accept the same way
                try:
                    load_gguf(path, progress=False, check_with_gguf_reader=True).close()
                except GGUFError as e:
                    pytest.fail(f"case {case}: accepted, but gguf.GGUFReader disagrees: {e}")
                for name, (_, _, off, n) in result.tensor_info.items():
                    assert result.raw_bytes(name) == blob[off:off + n], f"case {case}: {name}"
                result.close()
                del result
            gc.collect()
            assert runtime.live_bytes() == baseline, f"case {case}: device memory left behind"
    finally:
        signal.signal(signal.SIGALRM, old)
        gc.unfreeze()
    # the mutations must exercise both outcomes
    assert outcomes["error"] > N_CASES // 3 and outcomes["loaded"] > 10, outcomes
