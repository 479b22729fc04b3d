"""Where the host time of a replayed decode step goes, by layer (issue 15: Python, wgpu-py,
wgpu-native, the driver), from a sampling profiler rather than timers.

Run the decode loop, attach py-spy once it prints WARM (the load and capture under a native
profiler take minutes), then fold the samples by the layer of their innermost frame:

    python benchmarks/host_profile.py --gguf pythia-1.4b-f16.gguf --seconds 12 > log & P=$!
    until grep -q WARM log; do sleep 0.2; done
    py-spy record --native -r 200 -d 5 -f raw -o /tmp/spy.txt -p $P; wait $P
    python benchmarks/host_profile.py --fold /tmp/spy.txt

The loop is decode_profile.py's pipelined one (step N+1 queued before step N's token is read).
Only samples taken inside it count (the model load and capture are left out); a sample whose
innermost frame waits for the GPU (a map/poll wait) is "waiting", not host work."""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOP_FRAME = "decode_loop (host_profile.py"


def decode_loop(step, t, prompt: int, seconds: float) -> int:
    """Pipelined replay of the captured step for `seconds`; returns the tokens decoded."""
    from tensorgpu import runtime
    t0, n, prev, tt = time.perf_counter(), 0, None, t
    while time.perf_counter() - t0 < seconds:
        tt = step(tt, prompt + 1 + n % 64)
        tk = runtime.read_later(tt.node.buffer, 0, 4)
        runtime.flush()
        if prev is not None:
            prev.result()
        prev, n = tk, n + 1
    prev.result()
    return n


def run(gguf: str, seconds: float) -> None:
    import numpy as np

    import tensorgpu as tg
    from models import load
    model = load(gguf)
    prompt = 32
    cache = model.new_cache(prompt + 72)

    @tg.capture
    def step(tok, p):
        return model.forward(tok, p, cache).argmax(-1)

    ids = np.random.default_rng(1).integers(0, model.config.n_vocab, prompt).astype(np.int32)
    t = model.forward(tg.tensor(ids), 0, cache)[prompt - 1:].argmax(-1).realize()
    decode_loop(step, t, prompt, 0.5)                  # warm: clocks up, step captured
    print("WARM", flush=True)                          # attach the profiler now (py-spy record -p PID)
    t0 = time.perf_counter()
    n = decode_loop(step, t, prompt, seconds)
    dt = time.perf_counter() - t0
    print(f"RESULT {os.path.basename(gguf)}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s, "
          f"{1e3 * dt / n:.3f} ms per step", flush=True)


def layer(frame: str) -> str:
    """The layer a py-spy frame ("name (file:line)" or a native "name (library)") belongs to."""
    f = frame.lower()
    if "libwgpu_native" in f or "wgpu_core" in f or "wgpu_hal" in f or "wgpu_native" in f or "naga" in f:
        return "wgpu-native"
    if "libnvidia" in f or "libvulkan" in f or "libgl" in f or "nvidia" in f:
        return "driver"
    if "_cffi" in f or "cffi" in f:
        return "cffi"
    if "/wgpu/" in f or "(wgpu/" in f:
        return "wgpu-py"
    if "tensorgpu" in f:
        return "tensorgpu"
    if "host_profile.py" in f:
        return "loop"
    if ".py:" in f:
        return "python (other)"
    if "libc" in f or "libpthread" in f or "ld-linux" in f or "[kernel" in f or "futex" in f:
        return "libc/kernel"
    if "python" in f or "py" in f.split("(")[0][:3]:
        return "cpython"
    return "other native"


def fold(path: str) -> None:
    """Shares of the samples inside decode_loop: those inside the token read-back (Ticket.result:
    mostly waiting for the GPU, plus the map call's own submit), then the rest (host work) by the
    layer of the innermost frame (self) and by layer anywhere below the loop (inclusive)."""
    self_t, incl = collections.Counter(), collections.Counter()
    total = readback = 0
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if LOOP_FRAME not in stack:
                continue
            n = int(count)
            total += n
            if "Ticket.result" in stack:
                readback += n
                continue
            frames = stack.split(";")
            frames = frames[next(i for i, f in enumerate(frames) if LOOP_FRAME in f):]
            self_t[layer(frames[-1])] += n
            for lay in {layer(f) for f in frames}:
                incl[lay] += n
    if not total:
        raise SystemExit(f"{path}: no samples inside decode_loop")
    host = total - readback
    print(f"{path}: {total} samples in the decode loop; {100 * readback / total:.1f}% in the token read-back "
          f"(waiting for the GPU), {100 * host / total:.1f}% host work:")
    print(f"{'layer':<16} {'self % of loop':>15} {'incl % of loop':>15}")
    for lay, n in sorted(self_t.items(), key=lambda kv: -kv[1]):
        print(f"{lay:<16} {100 * n / total:15.1f} {100 * incl[lay] / total:15.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--fold", help="a py-spy raw (collapsed) file to fold by layer instead of running")
    a = ap.parse_args()
    if a.fold:
        fold(a.fold)
    elif a.gguf:
        run(a.gguf, a.seconds)
    else:
        ap.error("--gguf or --fold")


if __name__ == "__main__":
    main()
