"""Write a Q4_K_M-like GGUF (q4_k / q5_k / q6_k per tensor, as tensorgpu.testing.q4_k_m_like_type
picks) with the shapes, metadata and 1-D tensors of another GGUF, from random blocks at each
weight's scale. The gguf package cannot quantize k-quants and the GPU machine has no llama.cpp,
so this is how the benchmarks time a k-quant model (the values are random, the bytes and kernels
are those of a real Q4_K_M file).

    python benchmarks/make_kmix_gguf.py /tmp/ggufs/pythia-1.4b-f16.gguf /tmp/ggufs/pythia-1.4b-q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorgpu as tg  # noqa: E402
from tensorgpu import dtypes, runtime  # noqa: E402
from tensorgpu.testing import q4_k_m_like_type, random_blocks  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a GGUF whose shapes and metadata to copy")
    ap.add_argument("out", help="the Q4_K_M-like GGUF to write")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    src = tg.load_gguf(a.src)
    rng = np.random.default_rng(a.seed)
    tensors, kinds = {}, {}
    for name, t in src.tensors.items():
        kind = q4_k_m_like_type(name)
        if kind is None or t.ndim != 2:
            tensors[name] = t.numpy()
            continue
        std = float(np.std(t[:64].numpy()))
        raw = random_blocks(kind, t.shape, std, rng)
        tensors[name] = tg.Tensor.from_buffer(runtime.upload(raw), t.shape, dtypes.as_dtype(kind))
        kinds[kind] = kinds.get(kind, 0) + 1
    meta = {k: v for k, v in src.metadata.items() if k != "general.file_type"}
    meta["general.file_type"] = 15      # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
    tg.save_gguf(a.out, tensors, meta, progress=True)
    print(f"wrote {a.out}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))


if __name__ == "__main__":
    main()
