"""GPT-NeoX prefill and decode through the plain Session API (no capture: graph building,
scheduling and a readback every token are included — the eager baseline that issue 6's
captured loop in run_models.py is measured against).

Default (lavapipe-sized): the bundled tiny-neox q8_0 / q4_0 and the seq-f32 variant, prefill of
64 tokens, 16 greedy decode steps after an 8-token prompt. With TENSORGPU_BENCH_FULL=1: random
weights in Pythia shapes (160m / 410m / 1.4b) at f16 / q8_0 / q4_0, prefill 512, decode 64
after 32 (weights built in memory, no GGUF file needed).

extra_info: tokens_per_s (prefill or decode), ms_per_token.
"""
import os
from pathlib import Path

import numpy as np
import pytest

import tensorgpu as tg
from models.gpt_neox import GPTNeoX, GPTNeoXConfig
from tensorgpu import runtime

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")
TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-neox"

PYTHIA = {  # n_embd, n_layer, n_head, n_ff
    "pythia-160m": (768, 12, 12, 3072),
    "pythia-410m": (1024, 24, 16, 4096),
    "pythia-1.4b": (2048, 24, 16, 8192),
}
if FULL:
    MODELS = [f"{m}:{d}" for m in PYTHIA for d in ("f16", "q8_0", "q4_0")]
    PREFILL, PROMPT, DECODE = 512, 32, 64
else:
    MODELS = ["tiny-neox-q8_0", "tiny-neox-q4_0", "tiny-neox-seq-f32"]
    PREFILL, PROMPT, DECODE = 64, 8, 16

_cache: dict = {}


def _quant_blocks(rng, n_rows: int, k: int, dtype) -> tg.Tensor:
    """Random GGML blocks with sane scales: q8_0 = f16 d + 32 int8, q4_0 = f16 d + 16 nibble bytes."""
    nb = n_rows * k // 32
    raw = rng.integers(0, 256, size=(nb, dtype.block_bytes), dtype=np.uint8)
    d = np.full(nb, 0.02 / (127 if dtype is tg.q8_0 else 8), np.float16)
    raw[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return tg.Tensor.from_buffer(runtime.upload(raw.reshape(-1)), (n_rows, k), dtype)


def _random_model(name: str) -> GPTNeoX:
    arch, wdt = name.split(":")
    C, L, H, F = PYTHIA[arch]
    V = 50304
    cfg = GPTNeoXConfig(n_vocab=V, n_ctx=2048, n_embd=C, n_layer=L, n_head=H, n_ff=F, rot_dims=C // H // 4,
                        rope_base=10000.0, norm_eps=1e-5, parallel_residual=True)
    rng = np.random.default_rng(0)

    def mat(rows, cols):
        if wdt == "f16":
            return tg.tensor((rng.standard_normal((rows, cols), np.float32) * 0.02).astype(np.float16))
        return _quant_blocks(rng, rows, cols, tg.q8_0 if wdt == "q8_0" else tg.q4_0)

    def vec(n, val=None):
        return tg.tensor(np.full(n, val, np.float32) if val is not None else rng.standard_normal(n, np.float32) * 0.02)

    t = {"token_embd.weight": mat(V, C), "output_norm.weight": vec(C, 1.0), "output_norm.bias": vec(C),
         "output.weight": mat(V, C)}
    for i in range(L):
        b = f"blk.{i}"
        t.update({f"{b}.attn_norm.weight": vec(C, 1.0), f"{b}.attn_norm.bias": vec(C),
                  f"{b}.attn_qkv.weight": mat(3 * C, C), f"{b}.attn_qkv.bias": vec(3 * C),
                  f"{b}.attn_output.weight": mat(C, C), f"{b}.attn_output.bias": vec(C),
                  f"{b}.ffn_norm.weight": vec(C, 1.0), f"{b}.ffn_norm.bias": vec(C),
                  f"{b}.ffn_up.weight": mat(F, C), f"{b}.ffn_up.bias": vec(F),
                  f"{b}.ffn_down.weight": mat(C, F), f"{b}.ffn_down.bias": vec(C)})
    return GPTNeoX(cfg, t, None, name)


def _model(name: str) -> GPTNeoX:
    if name not in _cache:
        _cache.clear()  # one large model on the device at a time
        _cache[name] = _random_model(name) if ":" in name else GPTNeoX.from_gguf(TINY / f"{name}.gguf")
    return _cache[name]


def _ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(2, model.config.n_vocab, n).astype(np.int32)


def _info(benchmark, tokens: int):
    stats = getattr(benchmark, "stats", None)
    if stats:  # None under --benchmark-disable
        t = stats.stats.mean
        benchmark.extra_info["tokens_per_s"] = tokens / t
        benchmark.extra_info["ms_per_token"] = t / tokens * 1e3
        benchmark.extra_info["device"] = tg.device().get("name", "?") if isinstance(tg.device(), dict) else "?"


@pytest.mark.parametrize("name", MODELS)
def test_prefill(benchmark, name):
    model = _model(name)
    sess = model.session(max_context=PREFILL)
    ids = _ids(model, PREFILL)

    def run():
        sess.reset()
        return sess.generate(ids, max_new_tokens=1, stop_on_eos=False)  # prefill + one GPU sample

    list(run())  # compile
    benchmark.pedantic(lambda: list(run()), rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, PREFILL)


@pytest.mark.parametrize("name", MODELS)
def test_decode(benchmark, name):
    model = _model(name)
    sess = model.session(max_context=PROMPT + DECODE + 1)
    prompt = _ids(model, PROMPT, 1)
    gen = {}

    def setup():
        sess.reset()
        g = sess.generate(prompt, max_new_tokens=DECODE + 1, stop_on_eos=False)
        next(g)  # prefill outside the timing
        gen["g"] = g

    def decode():
        for _ in gen["g"]:
            pass

    setup()
    decode()  # compile
    benchmark.pedantic(decode, setup=setup, rounds=3, iterations=1)
    _info(benchmark, DECODE)
    if getattr(benchmark, "stats", None):
        benchmark.extra_info["decode_tokens_per_s_session"] = sess.last_stats["decode_tokens"] / sess.last_stats["decode_s"]
