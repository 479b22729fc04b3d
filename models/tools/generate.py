"""`tensorgpu generate`: text from a prompt, streamed as it is made (llama-cli's job).

Every argument is checked before the model loads: value ranges while parsing, then the prompt
file and, from the GGUF header alone, the context length and (for --chat) the chat template.
Generation runs through Session.generate: sampling on the GPU, stop strings, and llama-cli's
context shift when the context fills (the Session does it; this module only asks for it).
"""
from __future__ import annotations

import argparse
import sys

from .common import (UsageError, add_model_argument, float_in, int_at_least, load_model, plural,
                     read_header)

DESCRIPTION = """\
Generate text from a prompt, streaming it as it is produced; prefill and decode speed go to stderr.
The prompt comes from -p TEXT, -f FILE or -f - (standard input). When the context fills, the first
--keep tokens stay, the older half of the rest is dropped and generation goes on (as llama-cli
does; --no-context-shift stops instead). -i / --chat talks with the model through its chat
template (tokenizer.chat_template): one line of input per turn; -p is then the system message."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text (with --chat: the system message)")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE (UTF-8); '-': standard input")
    p.add_argument("-n", "--max-tokens", "--n-predict", type=int_at_least(-1, " (-1: no limit)"), default=64,
                   metavar="N", help="new tokens to generate; -1: until end of text (default 64)")
    p.add_argument("-t", "--temperature", "--temp", type=float_in(0.0), default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-k", type=int_at_least(0, " (0: off)"), default=None, metavar="K",
                   help="sample from the K most likely tokens (0 or unset: off)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P, in (0, 1]")
    p.add_argument("--repetition-penalty", "--repeat-penalty", type=float_in(0.0, lo_open=True), default=None,
                   metavar="R", help="> 1 discourages repeating tokens of the context (HF's convention)")
    p.add_argument("-s", "--seed", type=int_at_least(-1, " (-1: random)"), default=-1, metavar="N",
                   help="seed of the sampler; -1 (default): a random one, printed so the run can be repeated")
    p.add_argument("-c", "--max-context", "--ctx-size", type=int_at_least(1), default=None, metavar="N",
                   help="context length: KV cache rows (default: the model's context length)")
    p.add_argument("--keep", type=int_at_least(-1, " (-1: the whole prompt)"), default=0, metavar="N",
                   help="tokens of the prompt kept by a context shift, after BOS; -1: all of the prompt (default 0)")
    p.add_argument("--no-context-shift", action="store_true",
                   help="stop when the context is full instead of shifting it")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop once the output contains STR (repeatable; the text up to it is printed)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-text token")
    p.add_argument("--no-prompt", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the untimed warm-up that compiles the shaders before the timed run")
    p.add_argument("-i", "--chat", "--interactive", action="store_true",
                   help="chat: read a line, answer it with the model's chat template, repeat (Ctrl-D ends)")


def _read_prompt(a) -> str:
    if a.file is None:
        return a.prompt
    try:
        if a.file == "-":
            return sys.stdin.read()
        with open(a.file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{'standard input' if a.file == '-' else a.file} is not UTF-8 text: {e.reason} "
                         f"at byte {e.start}") from None
    except OSError as e:
        raise UsageError(f"cannot read {a.file}: {e.strerror or e}") from None


def check(a):
    """Everything that can be checked before the weights load; returns (prompt, header)."""
    if not a.chat and a.prompt is None and a.file is None:
        raise UsageError("give a prompt: -p TEXT, -f FILE or -f - (standard input), or --chat")
    if a.chat and a.file == "-":
        raise UsageError("--chat reads the conversation from standard input: give the system message with -p "
                         "or -f FILE, not -f -")
    header = read_header(a.model)
    if not header.has_tokenizer:
        raise UsageError(f"{a.model} has no tokenizer metadata (tokenizer.ggml.*): it cannot turn text into tokens")
    if a.chat and not header.chat_template:
        raise UsageError(f"{a.model} has no chat template (tokenizer.chat_template); --chat needs one "
                         "(models/tiny-qwen2/tiny-qwen2-q8_0.gguf has one)")
    n_ctx = header.n_ctx
    if a.max_context is not None and n_ctx is not None and a.max_context > n_ctx:
        raise UsageError(f"--max-context {a.max_context} exceeds the model's context length {n_ctx}")
    ctx = a.max_context or n_ctx
    if not a.no_context_shift and ctx is not None and a.keep > ctx - 2:
        raise UsageError(f"--keep {a.keep} leaves nothing for a context shift to drop in a context of {ctx} "
                         "(at most context - 2)")
    prompt = _read_prompt(a)
    if not a.chat and not prompt:
        raise UsageError("the prompt is empty")
    return prompt, header


def sampling_seed(a) -> int:
    """--seed, or a fresh random one for -1 (printed when it matters, so the run can be repeated)."""
    if a.seed != -1:
        return a.seed
    import secrets
    seed = secrets.randbits(32)
    if a.temperature > 0 and a.top_k != 1:
        print(f"seed: {seed}", file=sys.stderr)
    return seed


def generate_kwargs(a, seed: int) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                seed=seed, stop=a.stop or None, stop_on_eos=not a.ignore_eos,
                context_shift=not a.no_context_shift)


def max_new(a) -> int:
    return sys.maxsize if a.max_tokens == -1 else a.max_tokens


def keep_tokens(a, tokenizer, prompt_ids: list, max_context: int) -> int:
    """--keep as llama-cli reads it: N tokens after the BOS (which always stays), -1 the whole prompt."""
    bos = 1 if prompt_ids and tokenizer.bos_id is not None and prompt_ids[0] == tokenizer.bos_id else 0
    keep = len(prompt_ids) if a.keep == -1 else min(a.keep + bos, len(prompt_ids))
    if not a.no_context_shift and keep > max_context - 2:
        raise UsageError(f"--keep {a.keep}: the {len(prompt_ids)}-token prompt leaves nothing for a context shift "
                         f"to drop in a context of {max_context}; use a smaller --keep or --no-context-shift")
    return keep


def timing_line(stats: dict, max_context: int) -> str:
    """'prefill: ...; decode: ...' with singular/plural counts, no rate where nothing was timed,
    and why generation stopped when the context, not -n or the text, ended it."""
    def part(n, s):
        text = plural(n, "token")
        if n and s > 0:
            text += f" in {s:.3f} s = {n / s:.1f} tokens/s"
        return text
    if not stats["prefill_tokens"] and not stats["decode_tokens"]:
        return "no tokens generated (-n 0)"
    line = f"prefill: {part(stats['prefill_tokens'], stats['prefill_s'])}; " \
           f"decode: {part(stats['decode_tokens'], stats['decode_s'])}"
    shifts = stats.get("context_shifts", 0)
    if shifts:
        line += f"; {plural(shifts, 'context shift')}"
    if stats.get("stop") == "context":
        line += f" (stopped: the context of {max_context} tokens is full)"
    return line


def run(a) -> int:
    prompt, header = check(a)
    seed = sampling_seed(a)
    model = load_model(a.model)
    sess = model.session(max_context=a.max_context)
    if a.chat:
        from .chat import chat
        return chat(model, sess, a, prompt, seed)
    tok = model.tokenizer
    ids = tok.encode(prompt)
    keep = keep_tokens(a, tok, ids, sess.max_context)
    if not a.no_warmup and ids and max_new(a) > 1 and len(ids) < sess.max_context:
        # compile every pipeline the timed run uses (a prefill of this length, the decode step)
        for _ in sess.generate(ids, max_new_tokens=2, stop_on_eos=False):
            pass
        sess.reset()
    gen = sess.generate(ids, max_new_tokens=max_new(a), keep=keep, **generate_kwargs(a, seed))
    out = sys.stdout
    if not a.no_prompt:
        out.write(prompt)
        out.flush()
    sd = tok.decode_stream()
    for t in gen:
        piece = sd.step(t)
        if piece:
            out.write(piece)
            out.flush()
    out.write(sd.flush() + "\n")
    out.flush()
    print(timing_line(sess.last_stats, sess.max_context), file=sys.stderr)
    return 0
