"""`tensorgpu perplexity`: perplexity of a text file over windows of --ctx tokens (llama-perplexity's job).

Prints the running perplexity after each window as llama-perplexity does (`[1]45.12,[2]...`) and
the final `PPL = X +/- Y`, Y being its uncertainty estimate (standard error of the mean NLL,
carried over to the perplexity). --llamacpp scores only the second half of each window, which is
what llama-perplexity scores; without it every token after the first of its window counts.
"""
from __future__ import annotations

import argparse
import sys
import time

from .common import UsageError, add_model_argument, int_at_least, load_model, plural, read_header

DESCRIPTION = """\
Perplexity of a UTF-8 text file over non-overlapping windows of --ctx tokens, each run from
position 0, scoring every token after the first of its window (--llamacpp: only the second half,
as llama-perplexity does). Prints the running value after each window and PPL = X +/- Y."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument("-c", "--ctx", type=int_at_least(2), default=256, metavar="N",
                   help="window length in tokens (default 256; at most the model's context)")
    p.add_argument("--chunks", "--max-windows", type=int, default=-1, metavar="N",
                   help="score at most N windows; -1 (default): all the file holds")
    p.add_argument("--llamacpp", action="store_true",
                   help="score only positions ctx/2+1 .. ctx-1 of each window, as llama-perplexity does")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check(a):
    if a.chunks == 0 or a.chunks < -1:
        raise UsageError(f"--chunks must be a number of windows >= 1, or -1 for all of them; got {a.chunks}")
    if a.llamacpp and a.ctx < 3:
        raise UsageError(f"--llamacpp scores positions ctx/2+1 .. ctx-1 of each window, none when --ctx is "
                         f"{a.ctx}: use --ctx 3 or more")
    header = read_header(a.model)
    if not header.has_tokenizer:
        raise UsageError(f"{a.model} has no tokenizer metadata (tokenizer.ggml.*): it cannot read text")
    if header.n_ctx is not None and a.ctx > header.n_ctx:
        raise UsageError(f"--ctx {a.ctx} exceeds the model's context length {header.n_ctx}")
    try:
        with open(a.file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{a.file} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise UsageError(f"cannot read {a.file}: {e.strerror or e}") from None


def run(a) -> int:
    from ..session import perplexity
    text = check(a)
    model = load_model(a.model)
    ids = model.tokenizer.encode(text)
    if len(ids) < a.ctx:
        raise UsageError(f"{a.file} has {plural(len(ids), 'token')}, fewer than one window of --ctx {a.ctx}")
    first = a.ctx // 2 + 1 if a.llamacpp else 1
    windows = len(ids) // a.ctx if a.chunks == -1 else min(a.chunks, len(ids) // a.ctx)
    print(f"perplexity: {plural(len(ids), 'token')}, {plural(windows, 'window')} of {a.ctx}"
          + (f" (the file holds {len(ids) // a.ctx})" if windows < len(ids) // a.ctx else ""), file=sys.stderr)
    t = time.perf_counter()
    r = perplexity(model, ids, a.ctx, first_scored=first, max_windows=windows, progress=not a.no_progress)
    dt = time.perf_counter() - t
    print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(r.running(first))))
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.uncertainty(first):.5f}")
    print(f"{plural(r.n_scored, 'token')} scored in {plural(r.n_windows, 'window')} of {a.ctx} "
          f"({r.n_windows * a.ctx / dt:.1f} tokens/s)", file=sys.stderr)
    return 0
