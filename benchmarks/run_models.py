"""Model-level prefill and decode throughput on real-size GGUFs (the GPU-machine figures).

For each GGUF: load time, first-token latency (pipelines compiled on first use), prefill of
512 tokens, and batch-1 greedy decode of 128 tokens after a 32-token prompt with the decode
step captured once and replayed (`tg.capture`): the token stays on the GPU (argmax feeds the
next step's embedding), one submit per token, and each token is read back one step late
(`runtime.read_later`) so the CPU queues step N+1 before it waits for token N. Also the same
loop with a blocking readback every token, and the steady-state counters that must be zero.

    python benchmarks/run_models.py --dir /tmp/ggufs --specs "pythia-1.4b:f16 pythia-1.4b:q4_0"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorgpu as tg  # noqa: E402
from tensorgpu import runtime  # noqa: E402
from models import load  # noqa: E402   (any registered architecture)


PROFILE = False


def warm(seconds: float, fn) -> None:
    """Keep the GPU busy >= `seconds` (the SM clock drops under bursty Vulkan work)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        runtime.sync()


def timed(fn, reps: int) -> list:
    """Wall seconds of `reps` calls of fn, each up to its GPU work finishing."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runtime.sync()
        times.append(time.perf_counter() - t0)
    return times


def bench_prefill(model, n: int, reps: int = 3) -> dict:
    cache = model.new_cache(n + 8)
    ids = tg.tensor(np.random.default_rng(0).integers(0, model.config.n_vocab, n).astype(np.int32))

    def run():
        model.forward(ids, 0, cache)[n - 1:].contiguous().realize()      # the last token's logits

    t0 = time.perf_counter()
    run()
    runtime.sync()
    first = time.perf_counter() - t0
    warm(0.3, run)
    best = min(timed(run, reps))

    # the user-facing path: Session.forward keeps the prompt's forward captured, so a prompt
    # length it has seen replays the recorded kernels (no graph building or scheduling)
    sess = model.session(max_context=n + 8)
    host_ids = np.random.default_rng(0).integers(0, model.config.n_vocab, n).astype(np.int32)

    def run_session():
        sess.reset()
        sess.forward(host_ids, last_only=True)

    run_session()
    runtime.sync()
    warm(0.3, run_session)
    ctimes = timed(run_session, reps)
    # a new prompt length inside a bucket already run (padded to it): first a length that makes
    # the bucket's padded capture, then other lengths of that bucket, timed (no compile, replay)
    bucket_s = []
    for m in (n - 7, n - 13, n - 29):
        sess.reset()
        t0 = time.perf_counter()
        sess.forward(host_ids[:m], last_only=True)
        runtime.sync()
        bucket_s.append(time.perf_counter() - t0)
    del sess
    if PROFILE and "timestamp-query-inside-passes" in tg.device()["features"]:
        with tg.debug.profile() as prof:
            run()
        print(f"--- prefill {n} profile (GPU time per kernel)\n" + prof.table(), flush=True)
    return {"prefill_tokens": n, "prefill_first_s": first, "prefill_s": best, "prefill_tok_s": n / best,
            "prefill_session_tok_s": n / min(ctimes),
            "prefill_new_length_first_s": bucket_s[0], "prefill_new_length_same_bucket_s": min(bucket_s[1:])}


def bench_decode(model, prompt: int = 32, new: int = 128) -> dict:
    c = model.config
    cache = model.new_cache(prompt + new + 8)

    @tg.capture
    def step(tok, p):
        return model.forward(tok, p, cache).argmax(-1)                  # int32 [1]

    rng = np.random.default_rng(1)
    ids = rng.integers(0, c.n_vocab, prompt).astype(np.int32)
    t0 = time.perf_counter()
    logits = model.forward(tg.tensor(ids), 0, cache)[prompt - 1:].contiguous()
    tok = logits.argmax(-1).realize()
    tok0 = int(tok.item())
    prefill_s = time.perf_counter() - t0
    # first decode step: trace (graph + fusion + codegen + pipeline compiles)
    t0 = time.perf_counter()
    with tg.debug.kernel_log() as log:
        out = step(tok, prompt)
    first_ids = [int(out.item())]
    first_step_s = time.perf_counter() - t0
    n_kernels = len(log)

    start_tok = tg.tensor(np.array(first_ids, np.int32))
    host = [0.0]  # CPU seconds spent queueing + encoding/submitting steps
    replay = [0.0]  # of which in step() itself (input slots + replay of the kernel list)

    def decode_loop(n_steps: int, start: int, blocking: bool, lag: int = 1) -> tuple:
        """lag: how many steps late each token is read back (1: the step just submitted waits
        for the previous one; 2: it waits for the one before, so the map never stalls)."""
        ids_out, tickets = [], []
        t = start_tok
        t0 = time.perf_counter()
        for i in range(n_steps):
            p = start + i
            h0 = time.perf_counter()
            t = step(t, p)
            dt = time.perf_counter() - h0
            host[0] += dt
            replay[0] += dt
            if blocking:
                ids_out.append(int(np.frombuffer(runtime.read(t.node.buffer, 0, 4), np.int32)[0]))
            else:
                tickets.append(runtime.read_later(t.node.buffer, 0, 4))
                h0 = time.perf_counter()
                runtime.flush()
                host[0] += time.perf_counter() - h0
                if len(tickets) > lag:
                    ids_out.append(int(np.frombuffer(tickets.pop(0).result(), np.int32)[0]))
        for tk in tickets:
            ids_out.append(int(np.frombuffer(tk.result(), np.int32)[0]))
        return time.perf_counter() - t0, ids_out

    def warm_decode():  # real decode steps right before timing: the SM clock drops within ~1 s
        t_w = time.perf_counter()
        while time.perf_counter() - t_w < 0.4:
            decode_loop(16, prompt + 1, False)

    if PROFILE and "timestamp-query-inside-passes" in tg.device()["features"]:
        warm_decode()       # else the table is of a GPU still at its idle clock
        with tg.debug.profile() as prof:
            decode_loop(8, prompt + 1, False)
        print("--- decode profile, 8 steps (GPU time per kernel)\n" + prof.table(), flush=True)

    best_pipe, best_block, best_lag2 = 1e9, 1e9, 1e9
    for _ in range(2):
        warm_decode()
        s0 = dict(tg.debug.stats())
        host[0] = replay[0] = 0.0
        h0 = dict(runtime.HOST_TIME)
        t_pipe, ids_pipe = decode_loop(new - 1, prompt + 1, False)
        host_ms = host[0] / (new - 1) * 1e3
        split = {"step_call": replay[0] / (new - 1) * 1e3,
                 **{k[:-2]: (v - h0[k]) / (new - 1) * 1e3 for k, v in runtime.HOST_TIME.items()}}
        s1 = dict(tg.debug.stats())
        best_pipe = min(best_pipe, t_pipe)
        warm_decode()
        t_block, ids_block = decode_loop(new - 1, prompt + 1, True)
        best_block = min(best_block, t_block)
        warm_decode()
        t_lag2, ids_lag2 = decode_loop(new - 1, prompt + 1, False, lag=2)
        best_lag2 = min(best_lag2, t_lag2)
    t_pipe, t_block = best_pipe, best_block

    # the user-facing path: Session.generate (greedy on the GPU, steps run ahead of the reads)
    sess = model.session(max_context=prompt + new + 8)
    for _ in range(2):                      # the first traces and compiles; then warm + timed
        t_w = time.perf_counter()
        while time.perf_counter() - t_w < 0.4:
            sess.reset()
            list(sess.generate(ids.tolist(), max_new_tokens=16, stop_on_eos=False))
    best_sess = 0.0
    for _ in range(2):
        sess.reset()
        got = list(sess.generate(ids.tolist(), max_new_tokens=new, stop_on_eos=False))
        st = sess.last_stats
        best_sess = max(best_sess, st["decode_tokens"] / st["decode_s"])
    del sess
    steady = {k: s1[k] - s0[k] for k in ("pipelines_compiled", "bind_groups_created", "submits", "buffers_allocated")}
    return {
        "decode_prompt": prompt, "decode_new": new,
        "decode_first_step_s": first_step_s, "prompt_prefill_s": prefill_s,
        "decode_tok_s": (new - 1) / t_pipe, "decode_blocking_tok_s": (new - 1) / t_block,
        "decode_lag2_tok_s": (new - 1) / best_lag2,
        "decode_session_tok_s": best_sess, "session_tokens_match": got == [tok0] + first_ids + ids_pipe[:new - 2],
        "host_ms_per_step": host_ms,
        "host_ms_split": {k: round(v, 3) for k, v in split.items()},   # step_call + encode + finish + submit; map = waits
        "dispatches_per_step": n_kernels, "dispatches_per_layer": round(n_kernels / c.n_layer, 2),
        "steady_state_per_token": {k: v / (new - 1) for k, v in steady.items()},
        "same_tokens_pipelined_vs_blocking": ids_pipe == ids_block == ids_lag2,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--specs", required=True, help="space-separated model:dtype, files DIR/model-dtype.gguf")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="print per-kernel GPU time tables")
    args = ap.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    dev = tg.device()
    results = {"device": dev["name"], "backend": dev["backend"], "date": time.strftime("%Y-%m-%d"), "models": {}}
    print(f"device: {dev['name']} ({dev['backend']})", flush=True)
    for spec in args.specs.split():
        path = os.path.join(args.dir, spec.replace(":", "-") + ".gguf")
        r: dict = {}
        model = None
        try:
            t0 = time.perf_counter()
            model = load(path, progress=False)
            runtime.sync()
            r["load_s"] = time.perf_counter() - t0
            r.update(bench_decode(model, 32, args.new))
            r.update(bench_prefill(model, args.prefill))
        except Exception as e:  # report and go on to the next model
            import traceback
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"
        results["models"][spec] = r
        print("RESULT", spec, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
