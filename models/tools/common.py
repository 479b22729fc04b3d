"""What every tool shares: the one-line error (exit status 2), argument types that reject bad
values while parsing, the --model argument, and a cheap look at a GGUF's header so arguments that
depend on the model (context length, chat template) are checked before its weights load."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# the bundled tiny-neox q8_0 (package data once installed, so the command runs out of the box)
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "tiny-neox" / "tiny-neox-q8_0.gguf"


class UsageError(Exception):
    """A problem with what the user gave (an argument, a file): printed as one `error:` line, exit 2."""


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def plural(n: int, word: str) -> str:
    """'1 token', '2 tokens'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ----------------------------------------------------------------------------- argument types
# argparse turns the ValueError text into "argument -t/--temperature: invalid ... value" (exit 2).

def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def int_at_least(lo: int, note: str = ""):
    """An int >= lo (note: what the smallest value means, for the message)."""
    def parse(text: str) -> int:
        v = _number(int, text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}{note}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float = math.inf, lo_open: bool = False, what: str = ""):
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        v = _number(float, text)
        if v < lo or (lo_open and v == lo) or v > hi:
            if hi != math.inf:
                rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            else:
                rng = f"{'>' if lo_open else '>='} {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {rng}{what}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def add_model_argument(p: argparse.ArgumentParser, required: bool = False) -> None:
    from ..registry import supported_architectures
    kw = dict(required=True) if required else dict(default=str(DEFAULT_MODEL))
    p.add_argument("-m", "--model", metavar="FILE", **kw,
                   help=f"GGUF model file ({', '.join(supported_architectures())})"
                        + ("" if required else "; default: the bundled tiny-neox q8_0"))


# ----------------------------------------------------------------------------- the model file

@dataclass(frozen=True)
class ModelHeader:
    """What a GGUF's metadata says, read without loading (or uploading) any weights."""
    path: str
    arch: str
    n_ctx: Optional[int]
    chat_template: Optional[str]
    has_tokenizer: bool


def read_header(path: str) -> ModelHeader:
    """The header of a GGUF model file; UsageError for a missing file, a file that is not a GGUF,
    or an architecture models.load() does not support."""
    from ..registry import MODELS, supported_architectures
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise UsageError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from gguf import GGUFReader
    try:
        fields = GGUFReader(path).fields
    except Exception as e:  # the loader reports the offending offset; here only a one-line summary
        raise UsageError(f"{path}: unreadable GGUF header: {e}") from None

    def get(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in MODELS:
        raise UsageError(f"{path}: general.architecture {arch!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    n_ctx = get(f"{arch}.context_length")
    return ModelHeader(path, arch, int(n_ctx) if isinstance(n_ctx, int) else None,
                       get("tokenizer.chat_template"), "tokenizer.ggml.model" in fields)


def load_model(path: str):
    """models.load(path), timing reported on stderr."""
    from ..registry import load
    t = time.perf_counter()
    model = load(path)
    print(f"loaded {model} in {time.perf_counter() - t:.2f} s", file=sys.stderr)
    return model
