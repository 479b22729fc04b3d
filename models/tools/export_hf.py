"""`tensorgpu export-hf`: a GPT-NeoX GGUF -> a Hugging Face checkpoint (config.json,
model.safetensors in float32, tokenizer.json, tokenizer_config.json); the inverse of convert.

The bundled models ship GGUF files only; this recreates the HF folder that `tensorgpu convert`
reads (quantized weights are dequantized, so an f32 GGUF round-trips bit for bit)."""
from __future__ import annotations

import argparse

from .common import UsageError
from .convert import _one_line

DESCRIPTION = __doc__.split("\n\n", 1)[0].replace("`tensorgpu export-hf`: ", "").strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", metavar="MODEL.gguf", help="a GGUF file of general.architecture gptneox")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    p.add_argument("--tokenizer", default=None, metavar="tokenizer.json",
                   help="copy this tokenizer.json instead of rebuilding it from the GGUF's metadata")


def run(a) -> int:
    from .common import read_header
    if read_header(a.gguf).arch != "gptneox":
        raise UsageError(f"{a.gguf}: export-hf writes GPT-NeoX checkpoints (general.architecture gptneox) only")
    from ..convert import export_hf
    try:
        out = export_hf(a.gguf, a.out_dir, a.tokenizer)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(_one_line(e)) from None
    print(f"wrote {out}")
    return 0
