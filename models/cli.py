"""Command line: `python -m models {generate,perplexity,convert} --help` (also reachable as
`python -m models.gpt_neox ...`). Any architecture models.load() supports (models/registry.py).

generate streams text as it is produced, then prints prefill and decode tokens/s (stderr);
perplexity shows a progress bar over windows; convert is models.convert.main_convert.
Errors in the user's input (a file, a prompt too long) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

PROG = "python -m models"


def _model_arg(p: argparse.ArgumentParser) -> None:
    from .gpt_neox import DEFAULT_MODEL
    from .registry import supported_architectures
    p.add_argument("--model", "-m", default=str(DEFAULT_MODEL),
                   help=f"GGUF file of a model ({', '.join(supported_architectures())}; "
                        "default: the bundled tiny-neox q8_0)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="LLM inference on tensorgpu (WebGPU through wgpu-py): "
                                                        "GPT-NeoX, LLaMA-family and Qwen2 GGUF files.")
    sub = ap.add_subparsers(dest="command", metavar="{generate,perplexity,convert,serve}")
    sub.required = True

    g = sub.add_parser("generate", help="generate text from a prompt, streaming",
                       description="Generate text from a prompt, streaming it as it is produced; prints prefill "
                                   "and decode tokens/s at the end.")
    _model_arg(g)
    g.add_argument("--prompt", "-p", required=True, help="prompt text")
    g.add_argument("--max-tokens", "-n", type=int, default=64, help="new tokens to generate (default 64)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (HF convention)")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler's NumPy Generator")
    g.add_argument("--max-context", type=int, default=None, help="KV cache length (default: the model's context)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-text token")
    g.add_argument("--no-prompt", action="store_true", help="print only the continuation, not the prompt")
    g.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up run that compiles the shaders before the timed one")

    q = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity of a text file over non-overlapping windows of --ctx tokens, each "
                                   "run from position 0, scoring every token after the first of its window.")
    _model_arg(q)
    q.add_argument("--file", "-f", required=True, help="UTF-8 text file")
    q.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    q.add_argument("--max-windows", "--chunks", type=int, default=None, help="score at most this many windows")
    q.add_argument("--llamacpp", action="store_true",
                   help="score only the second half of each window, as llama-perplexity does")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("convert", help="Hugging Face GPT-NeoX / Llama / Qwen2 checkpoint -> GGUF", add_help=False)
    c.add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching", add_help=False)
    return ap


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _load(path: str):
    from .registry import load
    t = time.perf_counter()
    model = load(path)
    print(f"loaded {model} in {time.perf_counter() - t:.2f} s", file=sys.stderr)
    return model


def cmd_generate(a) -> int:
    model = _load(a.model)
    if model.tokenizer is None:
        return _fail(f"{a.model} has no tokenizer metadata (tokenizer.ggml.*)")
    sess = model.session(max_context=a.max_context)
    if not a.no_warmup:  # compile every pipeline the timed run uses (prefill of this length, decode)
        ids = model.tokenizer.encode(a.prompt)
        if ids and a.max_tokens > 1 and len(ids) < sess.max_context:
            for _ in sess.generate(ids, max_new_tokens=2, stop_on_eos=False):
                pass
            sess.reset()
    gen = sess.generate(a.prompt, max_new_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                        top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                        stop_on_eos=not a.ignore_eos)
    out = sys.stdout
    if not a.no_prompt:
        out.write(a.prompt)
        out.flush()
    sd = model.tokenizer.decode_stream()
    n = 0
    for tok in gen:
        n += 1
        piece = sd.step(tok)
        if piece:
            out.write(piece)
            out.flush()
    out.write(sd.flush() + "\n")
    out.flush()
    st = sess.last_stats
    pre = st["prefill_tokens"] / st["prefill_s"] if st["prefill_s"] else float("nan")
    dec = st["decode_tokens"] / st["decode_s"] if st["decode_s"] else float("nan")
    note = " (context full)" if sess.remaining == 0 and n < a.max_tokens else ""
    print(f"prefill: {st['prefill_tokens']} tokens in {st['prefill_s']:.3f} s = {pre:.1f} tokens/s; "
          f"decode: {st['decode_tokens']} tokens in {st['decode_s']:.3f} s = {dec:.1f} tokens/s{note}",
          file=sys.stderr)
    return 0


def cmd_perplexity(a) -> int:
    from .session import perplexity
    try:
        with open(a.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read {a.file}: {e}")
    model = _load(a.model)
    if model.tokenizer is None:
        return _fail(f"{a.model} has no tokenizer metadata (tokenizer.ggml.*)")
    if not 2 <= a.ctx <= model.config.n_ctx:
        return _fail(f"--ctx must be in [2, {model.config.n_ctx}] (the model's context), got {a.ctx}")
    ids = model.tokenizer.encode(text)
    if len(ids) < a.ctx:
        return _fail(f"{a.file} has {len(ids)} tokens, fewer than one window of --ctx {a.ctx}")
    t = time.perf_counter()
    r = perplexity(model, ids, a.ctx, first_scored=a.ctx // 2 + 1 if a.llamacpp else 1,
                   max_windows=a.max_windows, progress=not a.no_progress)
    dt = time.perf_counter() - t
    print(f"perplexity: {r.ppl:.4f} ({r.n_scored} tokens scored in {r.n_windows} windows of {a.ctx}; "
          f"{r.n_windows * a.ctx / dt:.1f} tokens/s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert import main_convert
        return main_convert(argv[1:])
    if argv[:1] == ["serve"]:  # the OpenAI-compatible server (models/serve/cli.py)
        from .serve.cli import main as main_serve
        return main_serve(argv[1:])
    a = _parser().parse_args(argv)
    from tensorgpu.gguf import GGUFError

    from .base import ModelError
    try:
        return {"generate": cmd_generate, "perplexity": cmd_perplexity}[a.command](a)
    except (GGUFError, ModelError, ValueError, IndexError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
