"""`tensorgpu bench`: prompt-processing and generation speed of a GGUF model, as llama-bench
reports them: one row per test, t/s as mean ± standard deviation over -r repetitions.

Both tests run through Session, the code every user's generate and forward go through:
- ppN: a random N-token prompt from an empty context, `Session.forward(ids, last_only=True)`
  up to its logits being on the host (a prompt length's first run compiles; an untimed warm-up
  run takes that);
- tgN: N tokens generated one at a time from a one-token prompt, `Session.generate` (greedy,
  sampling on the GPU, EOS ignored): N forward passes of one token each, as llama-bench's tg
  test evaluates N single tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from .common import UsageError, add_model_argument, int_at_least, read_header

DESCRIPTION = """\
Measure prompt processing (ppN: an N-token prompt) and text generation (tgN: N tokens, one at a
time) through the Session code that generate uses; print llama-bench's table: model, size,
params, backend, test, t/s (mean ± sd over -r repetitions, after an untimed warm-up).
-p and -n take comma-separated lists (-p 128,512); 0 skips that test."""


def _int_list(text: str) -> list:
    parse = int_at_least(0)
    try:
        values = [parse(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more comma-separated integers")
    return values


def _output(text: str) -> str:
    if text.lower() not in ("md", "json"):
        raise argparse.ArgumentTypeError(f"{text!r} is not md or json")
    return text.lower()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, required=True)
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], metavar="N[,N...]",
                   help="prompt lengths to time (ppN tests; default 512; 0: none)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], metavar="N[,N...]",
                   help="numbers of tokens to generate (tgN tests; default 128; 0: none)")
    p.add_argument("-r", "--repetitions", type=int_at_least(1), default=5, metavar="N",
                   help="timed repetitions of each test (default 5)")
    p.add_argument("-o", "--output", type=_output, default="md", metavar="md|json",
                   help="md (default): a Markdown table; json: one object per test, with every sample")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random prompt tokens (default 1234)")


@dataclass
class Result:
    model_filename: str
    model_type: str
    model_size: int          # bytes of the tensors' data
    model_n_params: int
    backend: str
    gpu_info: str
    test: str                # pp512 / tg128
    n_prompt: int
    n_gen: int
    samples_ns: list = field(default_factory=list)

    @property
    def samples_ts(self) -> list:
        n = self.n_prompt or self.n_gen
        return [n / (ns * 1e-9) for ns in self.samples_ns]

    def to_json(self) -> dict:
        ts = self.samples_ts
        d = asdict(self)
        d.update(avg_ns=int(statistics.fmean(self.samples_ns)), stddev_ns=int(_sd(self.samples_ns)),
                 avg_ts=statistics.fmean(ts), stddev_ts=_sd(ts), samples_ts=ts)
        return d


def _sd(x: list) -> float:
    return statistics.stdev(x) if len(x) > 1 else 0.0


# llama.cpp's llama_model_ftype_name, for the general.file_type values it names
_FTYPES = {0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K - Medium",
           11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large", 14: "Q4_K - Small", 15: "Q4_K - Medium",
           16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K", 32: "BF16"}


def describe(path: str) -> tuple:
    """(llama-bench's model column: 'arch size-label type', tensor bytes, parameter count), from
    the header alone."""
    from collections import Counter

    from gguf import GGUFReader
    r = GGUFReader(path)

    def get(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    size = sum(int(t.n_bytes) for t in r.tensors)
    params = sum(int(t.n_elements) for t in r.tensors)
    ftype = get("general.file_type")
    if ftype in _FTYPES:
        tname = _FTYPES[ftype]
    else:  # no (known) file type: the type most of the weight matrices have
        mats = Counter(t.tensor_type.name for t in r.tensors if len(t.shape) > 1)
        tname = mats.most_common(1)[0][0] if mats else "?"
    label = get("general.size_label") or _params_label(params)
    return f"{get('general.architecture')} {label} {tname}", size, params


def _params_label(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def check(a):
    header = read_header(a.model)
    pp = [n for n in a.n_prompt if n]
    tg_ = [n for n in a.n_gen if n]
    if not pp and not tg_:
        raise UsageError("nothing to measure: -p and -n are both 0")
    if header.n_ctx is not None:
        for n in pp:
            if n > header.n_ctx:
                raise UsageError(f"-p {n} exceeds the model's context length {header.n_ctx}")
        for n in tg_:
            if n + 1 > header.n_ctx:
                raise UsageError(f"-n {n} does not fit the model's context length {header.n_ctx} "
                                 "(one prompt token and n generated ones)")
    return pp, tg_


def _time_pp(model, n: int, reps: int, rng) -> list:
    sess = model.session(max_context=n)
    ids = rng.integers(0, model.config.n_vocab, n).tolist()

    def once():
        sess.reset()
        sess.forward(ids, last_only=True).numpy()   # the logits on the host: the GPU work is done

    once()                                           # warm-up: compiles this length's kernels
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        once()
        out.append(time.perf_counter_ns() - t)
    return out


def _time_tg(model, n: int, reps: int, rng) -> list:
    sess = model.session(max_context=n + 1)
    first = [int(rng.integers(0, model.config.n_vocab))]

    def once(k):
        sess.reset()
        for _ in sess.generate(first, max_new_tokens=k, stop_on_eos=False):
            pass

    once(min(n, 4))                                  # warm-up: the decode step is traced and compiled
    out = []
    for _ in range(reps):
        t = time.perf_counter_ns()
        once(n)
        out.append(time.perf_counter_ns() - t)
    return out


def table(results: list) -> str:
    """llama-bench's Markdown table."""
    cols = [("model", "<"), ("size", ">"), ("params", ">"), ("backend", "<"), ("test", ">"), ("t/s", ">")]
    rows = []
    for r in results:
        ts = r.samples_ts
        rows.append([r.model_type, _size(r.model_size), _params(r.model_n_params), r.backend, r.test,
                     f"{statistics.fmean(ts):.2f} ± {_sd(ts):.2f}"])
    # llama-bench's fixed widths (wider where a cell needs it), so rows printed one by one line up
    widths = [max(w, *(len(row[i]) for row in rows)) for i, w in enumerate((30, 10, 10, 10, 13, 20))]
    line = lambda cells: "| " + " | ".join(f"{c:{al}{w}}" for c, (_, al), w in zip(cells, cols, widths)) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if al == ">" else "-" * w for (_, al), w in zip(cols, widths)) + " |"
    return "\n".join([line([c for c, _ in cols]), sep] + [line(r) for r in rows])


def run(a) -> int:
    pp, tg_ = check(a)
    import numpy as np

    import tensorgpu

    from ..registry import load
    model_type, size, params = describe(a.model)
    dev = tensorgpu.device()
    model = load(a.model, progress=False)
    rng = np.random.default_rng(a.seed)
    results = []
    md = a.output == "md"
    base = dict(model_filename=os.path.abspath(a.model), model_type=model_type, model_size=size,
                model_n_params=params, backend=dev["backend"], gpu_info=dev["name"])
    for kind, ns, timer in (("pp", pp, _time_pp), ("tg", tg_, _time_tg)):
        for n in ns:
            r = Result(**base, test=f"{kind}{n}", n_prompt=n if kind == "pp" else 0, n_gen=n if kind == "tg" else 0)
            r.samples_ns = timer(model, n, a.repetitions, rng)
            results.append(r)
            if md:   # each row as soon as it is measured: the table grows while it runs
                text = table(results).splitlines()
                print("\n".join(text if len(results) == 1 else text[-1:]), flush=True)
    if md:
        from ..cli import version
        cores = ("; matmuls on the tensor cores" if dev.get("coopmat") else "") + \
            ("" if dev.get("trusted_shaders") else "; shader runtime checks on")
        print(f"\ndevice: {dev['name']} ({dev['backend']}){cores}; tensorgpu {version()}")
    else:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    return 0
