"""A newcomer's GPT-NeoX (tests/plain_neox.py: plain ops, none of models/'s code) against
models/gpt_neox.py, decoding greedily token by token: uncaptured (graph building, scheduling
and the readback every token) and under tg.capture (replayed). The engine's promise is that
the plain file is as fast: >= 0.8x uncaptured and >= 0.95x captured.

Default: the bundled tiny-neox q8_0. TENSORGPU_PLAIN_GGUF=path runs another gptneox GGUF
(benchmarks/gpu.sh plain uses a random-weight pythia-1.4b).

extra_info: tok_s, and ratio_vs_model (plain / model, same mode, same process).
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tensorgpu as tg
from tensorgpu import runtime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from plain_neox import PlainNeoX  # noqa: E402

GGUF = os.environ.get("TENSORGPU_PLAIN_GGUF", str(ROOT / "models" / "tiny-neox" / "tiny-neox-q8_0.gguf"))
STEPS = int(os.environ.get("TENSORGPU_PLAIN_STEPS", "32"))
_results: dict = {}


def _models():
    from models.gpt_neox import GPTNeoX
    if "models" not in _results:
        _results["models"] = (PlainNeoX(GGUF), GPTNeoX.from_gguf(GGUF, progress=False))
    return _results["models"]


def decode_tok_s(forward, new_cache, captured: bool, steps: int = STEPS) -> float:
    """Greedy tokens per second, token by token, after a 3-step warm-up (compiles, traces)."""
    cache = new_cache()
    fwd = tg.capture(lambda tok, pos: forward(tok, pos, cache).argmax(-1)) if captured else \
        (lambda tok, pos: forward(tok, pos, cache).argmax(-1))
    tok = tg.tensor(np.array([7], np.int32))
    for pos in range(3):
        tok = tg.tensor(fwd(tok, pos).numpy().astype(np.int32))
    best = 0.0
    for _ in range(2):
        t_w = time.perf_counter()            # keep the GPU clocked up right before timing
        while time.perf_counter() - t_w < 0.3:
            for pos in range(3, 3 + min(steps, 8)):
                fwd(tok, pos).numpy()
        t0 = time.perf_counter()
        for pos in range(3, 3 + steps):
            tok = tg.tensor(fwd(tok, pos).numpy().astype(np.int32))
        best = max(best, steps / (time.perf_counter() - t0))
    return best


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_plain_model_decode(benchmark, captured):
    plain, model = _models()
    runs = {}

    def both():     # interleaved, best of two each: neither gets the colder GPU
        for _ in range(2):
            runs["plain"] = max(runs.get("plain", 0.0),
                                decode_tok_s(plain.forward, lambda: plain.new_cache(STEPS + 8, tg.float16), captured))
            runs["model"] = max(runs.get("model", 0.0),
                                decode_tok_s(model.forward, lambda: model.new_cache(STEPS + 8), captured))
    benchmark.pedantic(both, rounds=1, iterations=1)
    ratio = runs["plain"] / runs["model"]
    benchmark.extra_info.update({"plain_tok_s": runs["plain"], "model_tok_s": runs["model"],
                                 "ratio_vs_model": ratio, "gguf": os.path.basename(GGUF),
                                 "device": runtime.get_device().name})
    print(f"\n{'captured' if captured else 'eager'}: plain {runs['plain']:.1f} tok/s, model {runs['model']:.1f} "
          f"tok/s, ratio {ratio:.3f}")
