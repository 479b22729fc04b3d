"""Serving benchmark through HTTP, modelled on `vllm bench serve`: it starts
`python -m models serve` for a GGUF file (or uses --url), then for each concurrency level keeps
that many streams busy with fixed-length random-token prompts, greedy, ignore_eos, and reports
aggregate output tok/s, TTFT, TPOT and inter-token latency (median / p99), plus the engine's
batch size and step time from the server's /metrics.

    python benchmarks/bench_serve.py --model FILE.gguf --concurrency 1,4,16,64 --out results.json
    python benchmarks/bench_serve.py --model FILE.gguf --url http://127.0.0.1:8000 --model-name NAME ...

Definitions (as vllm's): TTFT = first streamed token - request sent; TPOT = (end - first token) /
(output tokens - 1) per request; ITL = the gaps between a request's streamed chunks; output tok/s
= all output tokens of a level / the level's wall time. Each level is preceded by an unmeasured
warm-up round at the same concurrency, so the numbers are steady-state serving (no compiles).
Needs no network beyond 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.serve.process import ServerProcess  # noqa: E402
from models.tokenizer import read_gguf_metadata  # noqa: E402


def vocab_of(path: str) -> tuple:
    """(vocab size, ids of special tokens) from the GGUF's tokenizer metadata."""
    md = read_gguf_metadata(path)
    toks = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [1] * len(toks)
    return len(toks), {i for i, t in enumerate(types) if t != 1}


def random_prompts(n: int, length: int, vocab: int, special: set, seed: int) -> list:
    """vllm's "random" dataset: token ids drawn uniformly (special tokens excluded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = []
        while len(p) < length:
            t = rng.randrange(vocab)
            if t not in special:
                p.append(t)
        out.append(p)
    return out


class Server(ServerProcess):
    """The server under test (models/serve/process.py), its output in `log`."""

    def __init__(self, model: str, max_batch: int, ctx: int, max_waiting: int, log: Path, *extra: str):
        super().__init__(model, "--max-batch", str(max_batch), "--ctx", str(ctx), "--max-waiting", str(max_waiting),
                         *extra, log=open(log, "w"), name="bench", ready_timeout=600, poll_s=0.2)

    def stop(self):
        self.terminate()
        self.log.close()


async def one_request(client, model, prompt, out_tokens) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise RuntimeError(d["error"]["message"])
            if d["choices"] and d["choices"][0]["text"]:
                times.append(time.perf_counter())
            usage = d.get("usage") or usage
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": list(np.diff(times)),
            "tpot": (end - times[0]) / (n - 1) if times and n > 1 else float("nan"), "tokens": n,
            "e2e": end - t0}


async def run_level(url, model, prompts, out_tokens, concurrency) -> tuple:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits) as client:
        queue = list(prompts)

        async def stream_worker():
            res = []
            while queue:
                res.append(await one_request(client, model, queue.pop(), out_tokens))
            return res
        t0 = time.perf_counter()
        per = await asyncio.gather(*[stream_worker() for _ in range(concurrency)])
        return [r for rs in per for r in rs], time.perf_counter() - t0


def scrape(url) -> dict:
    """The engine's step histograms from /metrics: sums and counts."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for key in ("tensorgpu:batch_size_sum", "tensorgpu:batch_size_count", "tensorgpu:step_seconds_sum",
                    "tensorgpu:step_seconds_count"):
            if line.startswith(key + " "):
                out[key] = float(line.split()[1])
    return out


def pct(xs, q):
    xs = [x for x in xs if x == x]
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file: a server is started for it (its vocabulary "
                                                   "makes the prompts)")
    ap.add_argument("--url", help="use this running server (serving --model) instead of starting one")
    ap.add_argument("--model-name", default="bench", help="the `model` field to send with --url")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated stream counts (default 1,4,16,64)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--prompts-per-stream", type=int, default=2,
                    help="requests per stream at each level (default 2: num_prompts = 2 x concurrency)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--log", default=None, help="server log file (default: next to --out, or /tmp)")
    ap.add_argument("--server-args", default="", help="more arguments for the server it starts, e.g. '--gil-switch-ms 0.5'")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        ap.error(f"--concurrency must list positive integers, got {a.concurrency!r}")
    if not os.path.isfile(a.model):
        ap.error(f"--model {a.model}: no such file")
    server = None
    vocab, special = vocab_of(a.model)
    if not a.url:
        log = Path(a.log or (Path(a.out).with_suffix(".server.log") if a.out else "/tmp/bench_serve.server.log"))
        t = time.perf_counter()
        try:
            server = Server(a.model, max(levels), a.prompt_tokens + a.output_tokens + 8, 4 * max(levels), log,
                            *a.server_args.split())
        except RuntimeError as e:      # exited or never ready: its output is in the log
            raise SystemExit(f"{str(e).splitlines()[0]}; see {log}")
        print(f"server ready in {time.perf_counter() - t:.1f} s ({a.model})", file=sys.stderr)
        url, name = server.url, "bench"
    else:
        url, name = a.url.rstrip("/"), a.model_name
    results = []
    try:
        for c in levels:
            n = c * a.prompts_per_stream
            warm = random_prompts(c, a.prompt_tokens, vocab, special, a.seed + 1000 + c)
            asyncio.run(run_level(url, name, warm, min(a.output_tokens, 16), c))
            m0 = scrape(url)
            prompts = random_prompts(n, a.prompt_tokens, vocab, special, a.seed + c)
            reqs, wall = asyncio.run(run_level(url, name, prompts, a.output_tokens, c))
            m1 = scrape(url)
            tokens = sum(r["tokens"] for r in reqs)
            steps = m1.get("tensorgpu:batch_size_count", 0) - m0.get("tensorgpu:batch_size_count", 0)
            itl = [x for r in reqs for x in r["itl"]]
            row = {"concurrency": c, "requests": n, "wall_s": wall, "output_tokens": tokens,
                   "output_tok_s": tokens / wall, "request_s": n / wall,
                   "ttft_ms_mean": float(np.nanmean([r["ttft"] for r in reqs])) * 1000,
                   "ttft_ms_median": pct([r["ttft"] for r in reqs], 50), "ttft_ms_p99": pct([r["ttft"] for r in reqs], 99),
                   "tpot_ms_median": pct([r["tpot"] for r in reqs], 50), "tpot_ms_p99": pct([r["tpot"] for r in reqs], 99),
                   "itl_ms_median": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
                   "engine_batch_mean": ((m1.get("tensorgpu:batch_size_sum", 0) - m0.get("tensorgpu:batch_size_sum", 0))
                                         / steps) if steps else float("nan"),
                   "engine_step_ms_mean": ((m1.get("tensorgpu:step_seconds_sum", 0) -
                                            m0.get("tensorgpu:step_seconds_sum", 0)) /
                                           max(1, m1.get("tensorgpu:step_seconds_count", 0) -
                                               m0.get("tensorgpu:step_seconds_count", 0))) * 1000}
            results.append(row)
            print(f"concurrency {c}: {row['output_tok_s']:.1f} output tok/s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    base = results[0]["output_tok_s"] if results and results[0]["concurrency"] == 1 else None
    hdr = (f"{'streams':>7} {'out tok/s':>10} {'x c=1':>6} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} "
           f"{'ITL med':>8} {'ITL p99':>8} {'batch':>6} {'step ms':>8}")
    print(f"prompt {a.prompt_tokens} tokens, output {a.output_tokens} tokens, greedy, ignore_eos; latencies in ms")
    print(hdr)
    for r in results:
        x = f"{r['output_tok_s'] / base:6.1f}" if base else f"{'':>6}"
        print(f"{r['concurrency']:>7} {r['output_tok_s']:>10.1f} {x} {r['ttft_ms_median']:>9.1f} {r['ttft_ms_p99']:>9.1f} "
              f"{r['tpot_ms_median']:>9.2f} {r['itl_ms_median']:>8.2f} {r['itl_ms_p99']:>8.2f} "
              f"{r['engine_batch_mean']:>6.1f} {r['engine_step_ms_mean']:>8.2f}")
    if a.out:
        doc = {"model": a.model, "url": a.url, "prompt_tokens": a.prompt_tokens, "output_tokens": a.output_tokens,
               "prompts_per_stream": a.prompts_per_stream, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "levels": results}
        Path(a.out).write_text(json.dumps(doc, indent=1))
        print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
