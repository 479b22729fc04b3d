"""Per-kernel GPU profile of the captured decode step, taken right after a warm decode loop
(the SM clock drops within ~1 s of idle, which skews a profile taken after load/compile), then
the pipelined decode tok/s. A quick tuning tool; run_models.py gives the reported figures.

    python benchmarks/decode_profile.py --dir /tmp/ggufs --specs "pythia-1.4b:f16 tinyllama-1.1b:f16" \
        [--tune "gemv.rows=4;gemv.glu_rows=8"]

--tune: settings separated by ";", each measured in turn on the same loaded model after the
defaults (a same-run A/B; every setting traces its own decode step). A setting is comma-separated
knobs (benchmarks/tuning.py) and graph rules to leave out, written "off:rule": "off:fold_glu_into_gemv".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorgpu as tg  # noqa: E402
from tensorgpu import runtime  # noqa: E402
from models import load  # noqa: E402
import tuning  # noqa: E402  (benchmarks/tuning.py)


def run(model, prompt=32, new=128, profile=True):
    c = model.config
    cache = model.new_cache(prompt + new + 8)

    @tg.capture
    def step(tok, p):
        return model.forward(tok, p, cache).argmax(-1)

    ids = np.random.default_rng(1).integers(0, c.n_vocab, prompt).astype(np.int32)
    tok = model.forward(tg.tensor(ids), 0, cache)[prompt - 1:].argmax(-1).realize()
    with tg.debug.kernel_log() as log:
        t = step(tok, prompt)
    t.item()
    n_k = len(log)

    def loop(n):
        t0 = time.perf_counter()
        tt, prev = t, None
        for i in range(n):
            p = prompt + 1 + i
            tt = step(tt, p)
            tk = runtime.read_later(tt.node.buffer, 0, 4)
            runtime.flush()
            if prev is not None:
                prev.result()
            prev = tk
        prev.result()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        loop(16)
    if profile:
        with tg.debug.profile() as prof:
            loop(8)
        print(prof.table(14), flush=True)
    best = 1e9
    for _ in range(3):
        loop(16)
        best = min(best, loop(new - 1))
    return (new - 1) / best, n_k / c.n_layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--specs", required=True)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--tune", default="", help='knob settings to A/B, ";"-separated, e.g. "gemv.rows=4;gemv.rows=8"')
    a = ap.parse_args()
    settings = [""] + [t for t in a.tune.split(";") if t]
    for spec in a.specs.split():
        model = load(os.path.join(a.dir, spec.replace(":", "-") + ".gguf"), progress=False)
        for setting in settings:
            print(f"=== {spec} [{setting or 'defaults'}]", flush=True)
            items = [x for x in setting.split(",") if x]
            with tuning.restored():
                tuning.apply(",".join(x for x in items if not x.startswith("off:")))
                tuning.rules_off(",".join(x[4:] for x in items if x.startswith("off:")))
                tps, dpl = run(model, profile=not a.no_profile)
            print(f"RESULT {spec} [{setting or 'defaults'}]: decode {tps:.1f} tok/s, {dpl:.2f} dispatches/layer", flush=True)
        del model


if __name__ == "__main__":
    main()
