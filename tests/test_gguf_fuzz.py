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


# ----------------------------------------------------------------------------- model-level fuzz
#
# The file loads as a GGUF, but does it make a usable model? Each mutated copy of tiny-neox must
# be refused at load (ModelError / GGUFError naming the file) or load and then give finite logits:
# never load and then fail, give NaN, crash or hang. All cases run in ONE worker process
# (tests/gguf_model_fuzz_worker.py) with a per-case watchdog; a crash of the worker fails the test.

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-neox" / "tiny-neox-q8_0.gguf"
CASE_LIMIT_S = 60.0
RANDOM_CASES = int(os.environ.get("TENSORGPU_FUZZ_MODEL_RANDOM", "0"))   # .ci/run sets 1000


def _field(data: bytes, name: str) -> int:
    """Offset just after the GGUF string `name` (a metadata key or a tensor name) in the header."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    i = data.find(needle)
    assert i > 0 and data.find(needle, i + 1) < 0, name
    return i + len(needle)


def _set_meta(data: bytes, key: str, value) -> bytes:
    """The file with metadata `key`'s value replaced (same value type: the layout is unchanged)."""
    b = bytearray(data)
    off = _field(data, key)
    vtype = struct.unpack_from("<I", b, off)[0]
    fmt = {4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}[vtype]
    struct.pack_into(fmt, b, off + 4, value)
    return bytes(b)


def _set_type(data: bytes, tensor: str, type_id: int) -> bytes:
    b = bytearray(data)
    off = _field(data, tensor)
    n_dims = struct.unpack_from("<I", b, off)[0]
    struct.pack_into("<I", b, off + 4 + 8 * n_dims, type_id)
    return bytes(b)


def _targeted(data: bytes) -> list:
    """(label, bytes) of header mutations aimed at what the loader must range-check."""
    out = []
    nan, inf = float("nan"), float("inf")
    for v in (-1.0, 0.0, nan, inf, -inf, 2.0, 1e30):
        out.append((f"eps={v}", _set_meta(data, "gptneox.attention.layer_norm_epsilon", v)))
    for key, vals in {"gptneox.block_count": (0, 1, 3, 5, 4096, 0xFFFFFFFF),
                      "gptneox.context_length": (0, 1, 1 << 20, 1 << 24, 0xFFFFFFFF),
                      "gptneox.embedding_length": (0, 1, 255, 512, 0xFFFFFFFF),
                      "gptneox.feed_forward_length": (0, 1023, 0xFFFFFFFF),
                      "gptneox.attention.head_count": (0, 3, 5, 256, 0xFFFFFFFF),
                      "gptneox.rope.dimension_count": (0, 1, 3, 15, 64, 66, 0xFFFFFFFF)}.items():
        for v in vals:
            out.append((f"{key}={v}", _set_meta(data, key, v)))
    out.append(("parallel_residual=7", _set_meta(data, "gptneox.use_parallel_residual", 7)))
    # tensor types per role: GGML ids of f32 0, f16 1, q4_0 2, q4_1 3, q5_0 6, q5_1 7, q8_0 8,
    # q4_k 12, q5_k 13, q6_k 14, i32 26, bf16 30, and unknown ones
    for name in ("blk.0.attn_qkv.bias", "blk.1.attn_norm.weight", "output_norm.bias", "blk.3.ffn_down.bias"):
        for t in (1, 2, 3, 6, 7, 8, 12, 13, 14, 26, 30, 99):
            out.append((f"{name}:type={t}", _set_type(data, name, t)))
    for name in ("blk.0.attn_qkv.weight", "token_embd.weight", "output.weight", "blk.2.ffn_up.weight"):
        for t in (0, 1, 2, 3, 6, 7, 12, 13, 14, 26, 30, 99):
            out.append((f"{name}:type={t}", _set_type(data, name, t)))
    # string lengths: a metadata key's, a tensor name's, the tokenizer model's value
    for key in ("gptneox.block_count", "blk.0.attn_qkv.bias", "tokenizer.ggml.model"):
        at = _field(data, key) - len(key) - 8
        for v in (0, len(key) - 1, len(key) + 1, 1 << 40, (1 << 64) - 1):
            b = bytearray(data)
            struct.pack_into("<Q", b, at, v)
            out.append((f"strlen({key})={v}", bytes(b)))
    return out


def _run_worker(cases: list, tmp_path, timeout_s: float) -> list:
    specs = []
    for i, (label, blob) in enumerate(cases):
        p = tmp_path / f"case{i}.gguf"
        p.write_bytes(blob)
        specs.append({"case": label, "path": str(p)})
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "tests" / "gguf_model_fuzz_worker.py"), str(CASE_LIMIT_S)],
                       input=json.dumps(specs), capture_output=True, text=True, cwd=root, timeout=timeout_s,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    done = {x["case"] for x in results}
    missing = [s["case"] for s in specs if s["case"] not in done]
    assert r.returncode == 0 and not missing, (f"worker exited {r.returncode} (a crash?) before cases "
                                               f"{missing[:3]}:\n{r.stderr[-3000:]}")
    return results


def test_targeted_model_header_mutations(tmp_path):
    data = MODEL.read_bytes()
    cases = _targeted(data)
    results = _run_worker(cases, tmp_path, timeout_s=900)
    bad = [x for x in results if x["outcome"] == "bad"]
    assert not bad, "\n".join(f"{x['case']}: {x['detail']}" for x in bad[:10])
    by = {x["case"]: x["outcome"] for x in results}
    # the mutations that used to load and then give garbage are refused now
    for label in ("eps=-1.0", "eps=nan", "eps=inf", "gptneox.rope.dimension_count=0",
                  "blk.0.attn_qkv.bias:type=8", "blk.0.attn_qkv.bias:type=2", "blk.0.attn_qkv.bias:type=30",
                  "blk.1.attn_norm.weight:type=13", "gptneox.block_count=4294967295",
                  "gptneox.context_length=4294967295", "output_norm.bias:type=1", "token_embd.weight:type=2"):
        assert by[label] == "rejected", (label, by[label])
    assert by["eps=2.0"] == "rejected"
    # a long context is a model property, not corruption: it loads, and a session of the full
    # context that the device cannot hold is refused by name (test_inputs_refused.py)
    assert by["gptneox.context_length=16777216"] == "ok"


@pytest.mark.slow
@pytest.mark.skipif(RANDOM_CASES == 0, reason="TENSORGPU_FUZZ_MODEL_RANDOM=N runs N random cases (.ci/run: 1000)")
def test_random_model_header_mutations(tmp_path):
    data = MODEL.read_bytes()
    header_end = _field(data, "output.weight") + 64      # the tensor infos end near the last name
    header_end = min(max(header_end, data.find(b"output.weight") + 64), len(data))
    rng = np.random.default_rng(20261203)
    cases = [(f"random {i}", _mutate(data, header_end, rng)) for i in range(RANDOM_CASES)]
    results = _run_worker(cases, tmp_path, timeout_s=60 + 10 * RANDOM_CASES)
    bad = [x for x in results if x["outcome"] == "bad"]
    assert not bad, "\n".join(f"{x['case']}: {x['detail']}" for x in bad[:10])
