"""Worker for tests/test_gguf_fuzz.py's model-level cases: loads many mutated GGUF files in one
process (a process start plus pipeline compiles cost seconds; a case costs milliseconds) and
prints one JSON line per case. Each case runs under a SIGALRM watchdog.

Outcomes: "rejected" (ModelError / GGUFError / ContextOverflowError at load or session start:
what a corrupt file must give), "ok" (loaded, a forward gave finite logits and generate ran),
"bad" (anything else: another exception, NaN/inf logits, a hang past the watchdog).

    python tests/gguf_model_fuzz_worker.py CASE_LIMIT_S < cases.json
"""
import json
import signal
import sys
import traceback

import numpy as np


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_case(path: str):
    from models.gpt_neox import GPTNeoX, ModelError
    from models.session import ContextOverflowError
    from tensorgpu.gguf import GGUFError
    try:
        model = GPTNeoX.from_gguf(path, progress=False)
        sess = model.session(max_context=min(model.config.n_ctx, 64))
    except (ModelError, GGUFError, ContextOverflowError) as e:
        if path not in str(e) and "max_context" not in str(e):
            return "bad", f"error message lacks the path: {e}"
        return "rejected", str(e)[:300]
    n = min(3, sess.max_context - 1) or 1
    logits = sess.forward([1, 2, 3][:n]).numpy()
    if not np.all(np.isfinite(logits)):
        return "bad", f"loaded, then the forward gave {int((~np.isfinite(logits)).sum())} non-finite logits"
    if sess.remaining < 1:
        return "ok", "context full after the forward"
    toks = list(sess.generate(None, max_new_tokens=min(2, sess.remaining), stop_on_eos=False))
    if len(toks) != min(2, sess.remaining + len(toks)) or not all(0 <= t < model.config.n_vocab for t in toks):
        return "bad", f"loaded, then generate gave {toks}"
    return "ok", ""


def main():
    limit = float(sys.argv[1])
    cases = json.load(sys.stdin)
    signal.signal(signal.SIGALRM, _alarm)
    for c in cases:
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            outcome, detail = run_case(c["path"])
        except _Hang:
            outcome, detail = "bad", f"hang: over {limit} s"
        except BaseException as e:  # noqa: BLE001 - the outcome being tested
            outcome, detail = "bad", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"case": c["case"], "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    main()
