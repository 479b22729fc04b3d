"""Prefill-shaped kernels: the matmuls of a 512-token prompt (M = 512 rows against each GPT-NeoX
weight), quantized prefill matmuls and causal prefill attention, at the exact model shapes.

Why a separate suite: the square 2048^3 benchmark in bench_matmul.py hides what limits prefill --
with M = 512 rows a 128x128 tile grid has few workgroups (N = 2048 gives 64 for 132 SMs), so the
figure that matters is TFLOP/s at these shapes, per tile / split-K choice.

    pytest benchmarks/bench_prefill.py --benchmark-only        (lavapipe: small shapes)
    TENSORGPU_BENCH_FULL=1 pytest benchmarks/bench_prefill.py  (H100: the pythia-1.4b shapes)
    python benchmarks/bench_prefill.py sweep [--quick]         (tile x split-K table per shape)
    python benchmarks/bench_prefill.py attention [--baseline M] (prefill attention cases x knobs, us)
    python benchmarks/bench_prefill.py models --dir D --specs "pythia-1.4b:f16 pythia-1.4b:q4_0"
        (model prefill tok/s, first policy vs current in one process, host vs GPU time, profile)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorgpu import debug, dtypes, runtime  # noqa: E402
from tensorgpu.kernels import attention as attn  # noqa: E402
from tensorgpu.kernels import matmul as mm  # noqa: E402
from tensorgpu.kernels import probe, quant  # noqa: E402
from tensorgpu.kernels.common import Operand  # noqa: E402
from tensorgpu.testing import random_blocks  # noqa: E402

FULL = os.environ.get("TENSORGPU_BENCH_FULL", "") not in ("", "0")

# (N, K) of each linear layer: qkv, attention out, mlp up, mlp down
MODEL_SHAPES = {
    "pythia-160m": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
    "pythia-1.4b": [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)],
    "redpajama-3b": [(7680, 2560), (2560, 2560), (10240, 2560), (2560, 10240)],
}
# (heads, head_dim) for prefill attention
ATTN_SHAPES = {"pythia-160m": (12, 64), "pythia-1.4b": (16, 128), "redpajama-3b": (32, 80)}
PREFILL = 512

BENCH_SHAPES = [(PREFILL, n, k) for n, k in MODEL_SHAPES["pythia-1.4b"]] if FULL else [(64, 96, 128), (40, 64, 256)]


# ----------------------------------------------------------------------------- helpers


def _linear_operands(M, N, K, w_dt=dtypes.float16):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(w_dt.np_dtype)
    A = Operand(runtime.upload(x), dtypes.float32, (M, K), (K, 1), 0)
    B = Operand(runtime.upload(w), w_dt, (K, N), (1, K), 0)
    return A, B, x, w


def _time(passes, check=None, warm=0.1) -> float:
    """GPU seconds of one run of `passes` ([(name, wgsl, bindings, grid)]), timestamps around
    repeated replays; `check()` is called after a first run."""
    ds = [runtime.dispatch(*p) for p in passes]
    if check is not None:
        check()
    return probe.gpu_time_per_dispatch(ds, warmup_s=warm, target_s=0.03, rounds=3)


def _mm_passes(out, A, B, tuning=None):
    with debug.tuning(mm.TUNING, **(tuning or {})):
        la = mm.plan(out, A, B)
    return la, la.passes


def _mm_check(out, x, w, M, N):
    def check():
        got = np.frombuffer(runtime.read(out, 0, M * N * 4), np.float32).reshape(M, N)
        ref = x[:64].astype(np.float64) @ w.astype(np.float64).T
        assert np.allclose(got[:64], ref, rtol=2e-2, atol=2e-2), "wrong matmul result"
    return check


def matmul_us(M, N, K, w_dt=dtypes.float16, tuning=None, check=True):
    A, B, x, w = _linear_operands(M, N, K, w_dt)
    out = runtime.Buffer(M * N * 4)
    la, passes = _mm_passes(out, A, B, tuning)
    t = _time(passes, _mm_check(out, x, w, M, N) if check else None)
    return la, t


def quant_us(M, N, K, qdt, tuning):
    rng = np.random.default_rng(1)
    wbuf = runtime.upload(random_blocks(qdt, (N, K), 0.02, rng))
    x = rng.standard_normal((M, K)).astype(np.float32)
    X = Operand(runtime.upload(x), dtypes.float32, (M, K), (K, 1), 0)
    out = runtime.Buffer(M * N * 4)
    with debug.tuning(quant.TUNING, **tuning):
        la = quant.plan_matmul(out, X, wbuf, qdt, N, K)
    return la, _time(la.passes)


def _attention_inputs(H, D, S, cap, seed):
    """Random f32 q [H, S, D] and f16 K/V caches [H, cap, D] as Operands."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((H, S, D)).astype(np.float32)
    kc, vc = (rng.standard_normal((H, cap, D)).astype(np.float16) for _ in range(2))
    return (Operand(runtime.upload(q), dtypes.float32, (H, S, D), (S * D, D, 1), 0),
            *(Operand(runtime.upload(c), dtypes.float16, (H, cap, D), (cap * D, D, 1), 0) for c in (kc, vc)))


def attention_us(H, D, S=PREFILL, kernel="auto", target=None):
    Q, Kc, Vc = _attention_inputs(H, D, S, S, 2)
    out = runtime.Buffer(4 * H * S * D)
    old = attn.PREFILL_KERNEL, attn.TILED_TARGET_WORKGROUPS
    attn.PREFILL_KERNEL = kernel
    if target:
        attn.TILED_TARGET_WORKGROUPS = target
    try:
        with debug.kernel_log() as log:
            attn.attention(out, Q, Kc, Vc, S, out_layout="sbd")
        ds = list(runtime._pending[-len(log):])
    finally:
        attn.PREFILL_KERNEL, attn.TILED_TARGET_WORKGROUPS = old
    t = probe.gpu_time_per_dispatch(ds, warmup_s=0.1, target_s=0.03, rounds=3)
    return [e.name for e in log], t


# (name, heads, head_dim, prompt, cache rows, keys before the prompt): the prefill attention cases
# the register-blocked kernel must not regress on; kv_len (= before + prompt) is read from a buffer
# as in the model, so the split plan only knows the prompt length
ATTN_CASES = [("pythia-1.4b", 16, 128, 512, 520, 0), ("redpajama-3b", 32, 80, 512, 520, 0),
              ("1.4b cache2048", 16, 128, 512, 2048, 0), ("1.4b chunk", 16, 128, 256, 1024, 512)]
ATTN_VARIANTS = [dict(bk=32, unroll_s=1, unroll_pv=0), dict(bk=32, unroll_s=4, unroll_pv=8),
                 dict(bk=32, unroll_s=8, unroll_pv=8), dict(bk=32, unroll_s=16, unroll_pv=8),
                 dict(bk=32, unroll_s=8, unroll_pv=16), dict(bk=32, unroll_s=16, unroll_pv=16),
                 dict(bk=32, unroll_s=8, unroll_pv=32), dict(bk=32, unroll_s=16, unroll_pv=32)]


def attention_case_us(mod, H, D, S, cap, before, **knobs):
    """(kernel names, GPU seconds, output) of module `mod`'s attention() on one ATTN_CASES case with
    the module-level knobs set for the call (f32 q, f16 caches [H, cap, D], kv_len in a buffer)."""
    Q, Kc, Vc = _attention_inputs(H, D, S, cap, 3)
    n = runtime.upload(np.array([before + S], np.int32))
    out = runtime.Buffer(4 * H * S * D)
    saved = {k: getattr(mod, k) for k in knobs if hasattr(mod, k)}
    old_tuning = dict(getattr(mod, "TILED_TUNING", {}))
    try:
        for k, v in knobs.items():
            if k == "tuning":
                mod.TILED_TUNING.update(v)
            else:
                setattr(mod, k, v)
        with debug.kernel_log() as log:
            mod.attention(out, Q, Kc, Vc, n, out_layout="sbd")
        ds = list(runtime._pending[-len(log):])
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
        if old_tuning:
            mod.TILED_TUNING.clear()
            mod.TILED_TUNING.update(old_tuning)
    got = np.frombuffer(runtime.read(out), np.float32)[:H * S * D].copy()
    t = probe.gpu_time_per_dispatch(ds, warmup_s=0.05, target_s=0.02, rounds=3)
    return [e.name for e in log], t, got


def attention_sweep(baseline: str = "") -> None:
    """us per ATTN_CASES case: the committed kernel (`baseline` = a module path holding a copy
    of the previous attention.py, timed in the same process) and every ATTN_VARIANTS knob set."""
    import importlib
    print(f"device: {runtime.get_device().name}; clocks {probe.gpu_clocks()}", flush=True)
    _busy(0.3)
    base = importlib.import_module(baseline) if baseline else None
    for name, H, D, S, cap, before in ATTN_CASES:
        fl = 4 * H * D * S * (before + (S + 1) / 2)
        row = []
        ref = None
        if base is not None:
            names, t, ref = attention_case_us(base, H, D, S, cap, before)
            row.append(f"baseline {t * 1e6:.0f} ({fl / t / 1e12:.1f}, {len(names)} disp)")
        for knobs in ATTN_VARIANTS:
            names, t, got = attention_case_us(attn, H, D, S, cap, before, tuning=knobs)
            err = "" if ref is None or np.allclose(got, ref, rtol=1e-4, atol=1e-5) else " MISMATCH"
            tag = f"bk{knobs['bk']} s{knobs['unroll_s']} pv{knobs['unroll_pv']}"
            row.append(f"{tag} {t * 1e6:.0f}{err}")
        for target in (512, 2048):
            names, t, got = attention_case_us(attn, H, D, S, cap, before, TILED_TARGET_WORKGROUPS=target)
            row.append(f"default t{target} {t * 1e6:.0f}")
        print(f"{name} H={H} D={D} S={S} cap={cap} before={before}: " + " | ".join(row), flush=True)
    print(f"clocks {probe.gpu_clocks()}", flush=True)


def _tf(M, N, K, t):
    return 2 * M * N * K / t / 1e12


# ----------------------------------------------------------------------------- pytest-benchmark


def _bench(benchmark, passes_fn):
    def step():
        passes_fn()
        runtime.sync()
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("M,N,K", BENCH_SHAPES, ids=str)
def test_prefill_matmul(benchmark, M, N, K):
    la, t = matmul_us(M, N, K)
    benchmark.extra_info.update({"kernel": la.name, "us": t * 1e6, "TFLOP/s": _tf(M, N, K, t),
                                 "split": la.info["split"], "tile": la.info["tile"], "clocks": probe.gpu_clocks()})
    print(f"\n{la.name} M={M} N={N} K={K}: {t * 1e6:.1f} us, {_tf(M, N, K, t):.2f} TFLOP/s")
    _bench(benchmark, lambda: None)


@pytest.mark.parametrize("path", ["tiled", "dequant"])
@pytest.mark.parametrize("M,N,K", BENCH_SHAPES[:2], ids=str)
def test_prefill_quant_matmul(benchmark, M, N, K, path):
    la, t = quant_us(M, N, K, dtypes.q4_0, {"dequant_min_rows": 1} if path == "dequant" else {})
    benchmark.extra_info.update({"kind": la.kind, "us": t * 1e6, "TFLOP/s": _tf(M, N, K, t)})
    print(f"\nq4_0 {la.kind} M={M} N={N} K={K}: {t * 1e6:.1f} us, {_tf(M, N, K, t):.2f} TFLOP/s")
    _bench(benchmark, lambda: None)


def test_prefill_attention(benchmark):
    H, D = ATTN_SHAPES["pythia-1.4b"] if FULL else (2, 64)
    S = PREFILL if FULL else 64
    names, t = attention_us(H, D, S)
    fl = 4 * H * D * S * S / 2       # causal: QK^T and PV over half the square
    benchmark.extra_info.update({"kernels": names, "us": t * 1e6, "TFLOP/s": fl / t / 1e12})
    print(f"\nattention {names} H={H} S={S} D={D}: {t * 1e6:.1f} us, {fl / t / 1e12:.2f} TFLOP/s (causal FLOPs)")
    _bench(benchmark, lambda: None)


# ----------------------------------------------------------------------------- sweeps (GPU machine)


def sweep(quick: bool) -> None:
    print(f"device: {runtime.get_device().name}; clocks {probe.gpu_clocks()}", flush=True)
    probe.warm_up(lambda: None, 0.0)
    M = PREFILL
    big = "pythia-1.4b"
    print("\n== f32 x f16 weights (x @ w.T), M=512: us (TFLOP/s) per tile x split; 'auto' = the planner", flush=True)
    for model, shapes in MODEL_SHAPES.items():
        for N, K in shapes:
            la, t = matmul_us(M, N, K, tuning={"tile_policy": "square"})
            row = [f"square {la.info['tile'][0]}: {t * 1e6:.0f} ({_tf(M, N, K, t):.1f})"]
            la, t = matmul_us(M, N, K)
            row.append(f"auto {la.info['tile'][0]}x{la.info['tile'][1]} s{la.info['split']}: {t * 1e6:.0f} ({_tf(M, N, K, t):.1f})")
            print(f"{model} N={N} K={K}: " + " | ".join(row), flush=True)
            if model != big or quick:
                continue
            res = []
            for tm, tn in ((128, 128), (128, 64), (64, 128), (64, 64)):
                for s in (1, 2, 3, 4, 6, 8):
                    if K // 16 // s < 8:
                        continue
                    la, t = matmul_us(M, N, K, tuning={"tile_mn": (tm, tn), "split_k": s}, check=False)
                    res.append((t, f"{tm}x{tn} s{s}"))
            for bk, s in ((32, 1), (32, 2), (32, 4), (8, 2)):
                la, t = matmul_us(M, N, K, tuning={"tile_mn": (128, 128), "split_k": s, "bk": bk}, check=False)
                res.append((t, f"128x128 s{s} bk{bk}"))
            res.sort()
            print("   " + ", ".join(f"{n}: {t * 1e6:.0f} ({_tf(M, N, K, t):.1f})" for t, n in res), flush=True)
    print("\n== f32 weights (the dequant path's float matmul), pythia-1.4b shapes", flush=True)
    for N, K in MODEL_SHAPES[big]:
        la, t = matmul_us(M, N, K, dtypes.float32)
        print(f"N={N} K={K}: auto {la.info['tile']} s{la.info['split']}: {t * 1e6:.0f} us ({_tf(M, N, K, t):.1f})", flush=True)
    print("\n== quantized prefill matmul, pythia-1.4b shapes: in-kernel decode (the float planner's tiles) "
          "vs the opt-in dequant + float", flush=True)
    for qdt in (dtypes.q4_0, dtypes.q8_0):
        for N, K in MODEL_SHAPES[big]:
            la0, t0 = quant_us(M, N, K, qdt, {})
            la1, t1 = quant_us(M, N, K, qdt, {"dequant_min_rows": 1})
            print(f"{qdt.name} N={N} K={K}: {la0.kind} {t0 * 1e6:.0f} us ({_tf(M, N, K, t0):.1f}) | "
                  f"{la1.kind} {t1 * 1e6:.0f} us ({_tf(M, N, K, t1):.1f})", flush=True)
    print("\n== causal prefill attention, 512 tokens (f32 q, f16 K/V cache)", flush=True)
    for model, (H, D) in ATTN_SHAPES.items():
        fl = 4 * H * D * PREFILL * PREFILL / 2
        row = []
        for kernel, target in (("generic", None), ("auto", 1), ("auto", 512), ("auto", 1024), ("auto", 2048)):
            names, t = attention_us(H, D, kernel=kernel, target=target)
            row.append(f"{'+'.join(n.split('[')[0] for n in names)}{f' t{target}' if target else ''} "
                       f"{t * 1e6:.0f} us ({fl / t / 1e12:.2f})")
        print(f"{model} H={H} D={D}: " + " | ".join(row), flush=True)
    print(f"clocks {probe.gpu_clocks()}", flush=True)


# ----------------------------------------------------------------------------- model prefill


def _policy(first: bool) -> None:
    mm.TUNING["tile_policy"] = "square" if first else "auto"   # quantized prefill follows it too
    attn.PREFILL_KERNEL = "generic" if first else "auto"


def _busy(seconds: float) -> None:
    """Back-to-back GPU work (a prefill-sized matmul) for `seconds`: lifts the SM clock."""
    A, B, _, _ = _linear_operands(PREFILL, 6144, 2048)
    out = runtime.Buffer(PREFILL * 6144 * 4)
    _, passes = _mm_passes(out, A, B)
    ds = [runtime.dispatch(*p) for p in passes]
    runtime.sync()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            runtime.replay(ds)
        runtime.sync()


def best_attention_target(H: int, D: int, n: int) -> tuple:
    """(PREFILL_KERNEL, TILED_TARGET_WORKGROUPS) fastest for this model's prefill attention."""
    res = sorted((attention_us(H, D, n, kernel=k, target=t)[1], k, t)
                 for k, t in (("generic", 1024), ("auto", 1), ("auto", 512), ("auto", 1024), ("auto", 2048)))
    print("attention: " + ", ".join(f"{k} {t}: {x * 1e6:.0f} us" for x, k, t in res), flush=True)
    return res[0][1], res[0][2]


def models(directory: str, specs: str, n: int, profile: bool, tune_attention: bool = False,
           current_only: bool = False) -> None:
    import tensorgpu as tg
    from models.gpt_neox import GPTNeoX
    print(f"device: {runtime.get_device().name}", flush=True)
    for spec in specs.split():
        model = GPTNeoX.from_gguf(os.path.join(directory, spec.replace(":", "-") + ".gguf"), progress=False)
        cache = model.new_cache(n + 8)
        ids = tg.tensor(np.random.default_rng(0).integers(0, model.config.n_vocab, n).astype(np.int32))
        tuned = None
        if tune_attention:
            tuned = best_attention_target(model.config.n_head, model.config.head_dim, n)
            print(f"attention: PREFILL_KERNEL, TILED_TARGET_WORKGROUPS = {tuned}", flush=True)

        def run():
            t0 = time.perf_counter()
            y = model.forward(ids, 0, cache)[n - 1:].contiguous()
            t1 = time.perf_counter()
            y.realize()
            t2 = time.perf_counter()
            runtime.sync()
            return t1 - t0, t2 - t1, time.perf_counter() - t2

        for first in ((False,) if current_only else (True, False)):
            _policy(first)
            if tuned and not first:
                attn.PREFILL_KERNEL, attn.TILED_TARGET_WORKGROUPS = tuned
            run()
            _busy(2.0)   # the host-bound prefill loop alone leaves the SM clock below its maximum
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.4:
                run()
            times = [run() for _ in range(4)]
            clocks = probe.gpu_clocks()
            best = min(times, key=sum)
            gpu = None
            if profile and "timestamp-query-inside-passes" in runtime.get_device().features:
                with tg.debug.profile() as prof:
                    run()
                gpu = sum(ns for _, ns in prof) / 1e9
            tag = "first policy" if first else "current"
            print(f"RESULT {spec} {tag}: prefill {n} tok/s {n / sum(best):.0f}  wall {sum(best) * 1e3:.1f} ms = "
                  f"build {best[0] * 1e3:.1f} + realize {best[1] * 1e3:.1f} + submit/GPU wait {best[2] * 1e3:.1f}"
                  + (f"; profiled GPU sum {gpu * 1e3:.1f} ms" if gpu else "") + f"; clocks {clocks}", flush=True)
            if profile and gpu:
                print(prof.table(14), flush=True)
        _policy(False)
        del model, cache


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sweep", "models", "attention"])
    ap.add_argument("--baseline", default="", help="attention: module path of the previous attention.py copy")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default="/tmp/ggufs")
    ap.add_argument("--specs", default="pythia-1.4b:f16 pythia-1.4b:q4_0")
    ap.add_argument("--n", type=int, default=PREFILL)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tune-attention", action="store_true", help="pick TILED_TARGET_WORKGROUPS per model first")
    ap.add_argument("--current-only", action="store_true", help="skip the first-policy run")
    a = ap.parse_args()
    if a.what == "sweep":
        sweep(a.quick)
    elif a.what == "attention":
        attention_sweep(a.baseline)
    else:
        models(a.dir, a.specs, a.n, a.profile, a.tune_attention, a.current_only)
