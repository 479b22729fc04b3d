"""Continuous batching in-process (no HTTP): what one decode step of B sequences costs.

    python benchmarks/batch_decode.py --gguf FILE [--batches 1,4,16,64] [--ctx 512] [--max-batch N] [--json OUT]

For each B it prints (and writes as JSON):
  step_ms       one captured batched decode step with B running sequences (engine.step(), greedy,
                the ids read back), median over --steps steps after warm-up
  step_ratio    step_ms / step_ms at B = 1 (issue 14's target: <= 3 at B = 64)
  tok_s         B / step_ms: aggregate decode tokens per second
  e2e_tok_s     B requests of --prompt tokens and --gen new tokens, submit to last token
beside the batch-1 Session decode (Session.generate, pipelined on the GPU) of the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import tensorgpu as tg  # noqa: E402
from models import load  # noqa: E402
from models.serve.engine import Engine, SamplingParams  # noqa: E402
import tuning  # noqa: E402  (benchmarks/tuning.py)


def session_decode(model, prompt_len: int, gen: int) -> float:
    """Best of two Session.generate runs after >= 0.4 s of warm-up (GPU clocks ramp up)."""
    ids = list(np.random.default_rng(0).integers(1, model.config.n_vocab - 1, prompt_len))
    s = model.session(max_context=prompt_len + gen + 8)
    t = time.perf_counter()
    while time.perf_counter() - t < 0.4:
        s.reset()
        list(s.generate(ids, max_new_tokens=16, stop_on_eos=False))
    best = 0.0
    for _ in range(2):
        s.reset()
        list(s.generate(ids, max_new_tokens=gen, stop_on_eos=False))
        st = s.last_stats
        best = max(best, st["decode_tokens"] / st["decode_s"])
    return best


def batch_steps(engine: Engine, B: int, prompt_len: int, steps: int) -> tuple:
    """(median step seconds, host ms per step by part): where a step's wall time goes, so a slow
    step shows whether the host (encode/finish/submit) or the wait for the GPU (map) sets it."""
    rng = np.random.default_rng(B)
    sp = SamplingParams(max_tokens=10 ** 6, temperature=0.0, ignore_eos=True)
    reqs = [engine.submit(list(rng.integers(1, engine.vocab_size - 1, prompt_len)), sp) for _ in range(B)]
    while engine.stats()["running"] < B or any(not r.output_ids for r in reqs):
        engine.step()
    for _ in range(5):                                                   # warm: every kernel of this bucket
        engine.step()
    times = []
    h0, chained0 = dict(tg.runtime.HOST_TIME), engine.stats()["chained_steps"]
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    host = {k[:-2] + "_ms": round((v - h0[k]) / steps * 1e3, 3) for k, v in tg.runtime.HOST_TIME.items()}
    host["chained"] = (engine.stats()["chained_steps"] - chained0) / steps
    for r in reqs:
        r.cancel()
    engine.step()
    return statistics.median(times), host


def profile_step(engine: Engine, B: int, prompt_len: int) -> None:
    """GPU time per kernel name, summed over one batched step of B sequences."""
    rng = np.random.default_rng(7)
    sp = SamplingParams(max_tokens=10 ** 6, temperature=0.0, ignore_eos=True)
    reqs = [engine.submit(list(rng.integers(1, engine.vocab_size - 1, prompt_len)), sp) for _ in range(B)]
    while engine.stats()["running"] < B or any(not r.output_ids for r in reqs):
        engine.step()
    engine.step()
    with tg.debug.profile() as p:
        engine.step()
    agg: dict = {}
    for name, ns in p:
        k = name.split("[")[0]
        n, t = agg.get(k, (0, 0))
        agg[k] = (n + 1, t + ns)
    total = sum(t for _, t in agg.values())
    print(f"  profile B={B}: {total / 1e6:.2f} ms GPU in {sum(n for n, _ in agg.values())} dispatches; " +
          ", ".join(f"{k} x{n} {t / 1e6:.2f}" for k, (n, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:8]),
          flush=True)
    for r in reqs:
        r.cancel()
    engine.step()


def end_to_end(engine: Engine, B: int, prompt_len: int, gen: int) -> float:
    rng = np.random.default_rng(100 + B)
    sp = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    reqs = [engine.submit(list(rng.integers(1, engine.vocab_size - 1, prompt_len)), sp) for _ in range(B)]
    while engine.step():
        pass
    dt = time.perf_counter() - t
    return sum(len(r.output_ids) for r in reqs) / dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=None,
                    help="slots of the engine (default: the largest of --batches); a B = 1 step in an engine "
                         "of 64 slots waited ~4.8 ms per step on the H200, in one of 1 slot ~0.5 (RESULTS.md)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--tune", default="", help="kernel TUNING knobs, e.g. quant.gemv_max_m=16,quant.gemv_m_chunk=8")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of one step per batch size")
    ap.add_argument("--rules-off", default="", help="graph rules left out for an A/B run, e.g. "
                    "fuse_batched_decode_attention (names in tensorgpu/rewrites.py)")
    a = ap.parse_args(argv)
    tuned = tuning.apply(a.tune)
    off = tuning.rules_off(a.rules_off)
    batches = [int(b) for b in a.batches.split(",")]
    model = load(a.gguf)
    d = tg.device()
    print(f"device: {d['name']} ({d['backend']}); model {os.path.basename(a.gguf)}", flush=True)
    res = {"model": os.path.basename(a.gguf), "device": d["name"], "tuning": tuned, "rules_off": off,
           "session_decode_tok_s": session_decode(model, 32, a.gen)}
    print(f"batch-1 Session decode: {res['session_decode_tok_s']:.1f} tok/s", flush=True)
    engine = Engine(model, max_batch=a.max_batch or max(batches), max_context=a.ctx)
    rows = []
    for B in batches:
        step, host = batch_steps(engine, B, a.prompt, a.steps)
        e2e = end_to_end(engine, B, a.prompt, a.gen)
        if a.profile:
            profile_step(engine, B, a.prompt)
        rows.append({"B": B, "step_ms": step * 1e3, "tok_s": B / step, "e2e_tok_s": e2e, "host": host})
    base = rows[0]["step_ms"]
    for r in rows:
        r["step_ratio"] = r["step_ms"] / base
        print(f"B={r['B']:3d}  step {r['step_ms']:7.2f} ms  x{r['step_ratio']:.2f} of B={batches[0]}  "
              f"{r['tok_s']:8.1f} tok/s  end-to-end {r['e2e_tok_s']:8.1f} tok/s  host/step {r['host']}", flush=True)
    res["batches"] = rows
    res["stats"] = tg.debug.stats()
    print("RESULT " + json.dumps(res), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
