"""`tensorgpu convert`: a Hugging Face checkpoint -> a GGUF file (convert_hf_to_gguf.py's job).

models/convert.py (GPT-NeoX) and models/convert_llama.py (Llama, Mistral, Qwen2) do the work and
check everything before they write; this module turns what they raise about the input (a missing
folder or file, an unsupported config, a broken safetensors file) into one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import UsageError

DESCRIPTION = """\
Convert a Hugging Face checkpoint folder (GPTNeoXForCausalLM, LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM: config.json, tokenizer.json and *.safetensors) into a GGUF file laid out as
llama.cpp's convert_hf_to_gguf.py writes it. --type sets the 2-D weight matrices' type; norms,
biases and other 1-D tensors stay f32, and a matrix whose rows do not fill whole blocks of the
type falls back to f16, as llama.cpp's converter does. The output is written under a temporary
name and renamed at the end: a failure never leaves half a file."""


def _types() -> list:
    from ..convert import OUT_TYPES
    return list(OUT_TYPES)


def _out_type(text: str) -> str:
    t = text.lower()
    if t not in _types():
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_types())} (any case)")
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="folder of the checkpoint: config.json, tokenizer.json (+ tokenizer_config.json) and "
                        "model*.safetensors (pytorch_model*.bin needs torch)")
    p.add_argument("out", metavar="OUT.gguf", help="GGUF file to write (its folder must exist)")
    p.add_argument("--type", "--outtype", type=_out_type, default="f16", metavar="TYPE",
                   help=f"type of the weight matrices: {' | '.join(_types())} (any case; default f16)")
    p.add_argument("--name", default=None, help="general.name (default: from config.json, else the folder's name)")
    p.add_argument("--pre", default=None,
                   help="tokenizer.ggml.pre (default: mpt for GPT-NeoX, default for a SentencePiece vocabulary, "
                        "llama-bpe / qwen2 for byte-level BPE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check(a) -> None:
    if not os.path.exists(a.hf_dir):
        raise UsageError(f"{a.hf_dir}: no such folder")
    if not os.path.isdir(a.hf_dir):
        raise UsageError(f"{a.hf_dir} is not a folder; give the checkpoint's folder (config.json, tokenizer.json, "
                         "*.safetensors)")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"cannot write {a.out}: the folder {out_dir} does not exist")
    if os.path.isdir(a.out):
        raise UsageError(f"{a.out} is a folder; give the GGUF file to write")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"cannot write {a.out}: the folder {out_dir} is not writable")


def run(a) -> int:
    check(a)
    from ..convert import convert
    try:
        path = convert(a.hf_dir, a.out, a.type, progress=not a.quiet, name=a.name, pre=a.pre)
    except FileNotFoundError as e:
        hint = ("; a GPT-NeoX checkpoint can be written from a GGUF file with `tensorgpu export-hf MODEL.gguf DIR`"
                if str(e).startswith("no weights") else "")
        raise UsageError(_one_line(e) + hint) from None
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise UsageError(_one_line(e)) from None
    print(f"wrote {path} ({path.stat().st_size:,} bytes, {a.type})")
    return 0


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (a KeyError's repr quotes; an OSError names its file)."""
    if isinstance(e, KeyError):
        msg = f"missing key {e.args[0]!r}" if e.args else "missing key"
    elif isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main
    sys.exit(main(["convert", *sys.argv[1:]]))
