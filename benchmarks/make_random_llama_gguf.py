"""Write a LLaMA-architecture GGUF with random weights in a real model's shape (TinyLlama-1.1B
by default), for speed runs against llama.cpp on the same file: our loader and llama-bench
both read it. Not a trained model: the tokens it generates mean nothing.

The layout is what llama.cpp's converter writes for LlamaForCausalLM: `llama` metadata,
token_embd / blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
ffn_up, ffn_down} / output_norm / output, and a SentencePiece-style ("llama") vocabulary of
byte-fallback tokens plus unique dummy pieces. Matrices are random f16 bit patterns of small
magnitude or random GGUF blocks with valid small scales (tensorgpu.testing.random_blocks);
`q4_k_m` uses q4_k, with q6_k for attn_v, ffn_down and output as llama-quantize's Q4_K_M does.

    python benchmarks/make_random_llama_gguf.py --dtype q4_0 -o /tmp/tinyllama-q4_0.gguf
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gguf  # noqa: E402

from tensorgpu.testing import random_blocks  # noqa: E402

# name: (n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab)
PRESETS = {
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "tiny": (256, 2, 4, 2, 768, 512),
}
QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
          "q6_k": gguf.GGMLQuantizationType.Q6_K}
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15}


def _matrix(rng, rows: int, cols: int, kind: str) -> tuple:
    """(data, raw dtype) of a random [rows, cols] weight stored as `kind`."""
    if kind == "f16":
        e = rng.integers(8, 11, size=(rows, cols), dtype=np.uint16)        # 2^-7 .. 2^-5
        m = rng.integers(0, 1024, size=(rows, cols), dtype=np.uint16)
        s = rng.integers(0, 2, size=(rows, cols), dtype=np.uint16)
        return ((s << 15) | (e << 10) | m).view(np.float16), None
    return random_blocks(kind, (rows, cols), 0.02, rng), QTYPES[kind]


def _vocab(n: int) -> tuple:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    i = 0
    while len(tokens) < n:
        tokens.append(f"\u2581t{i}")
        types.append(1)
        i += 1
    return tokens[:n], [0.0] * 3 + [0.0] * 256 + [-float(k) for k in range(n - 259)], types[:n]


def write(path: str, preset: str, dtype: str, seed: int = 0) -> None:
    C, L, H, Hkv, F, V = PRESETS[preset]
    D = C // H
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random-{preset}-{dtype}")
    w.add_context_length(2048)
    w.add_embedding_length(C)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(FILE_TYPES[dtype])
    tokens, scores, types = _vocab(V)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def kind_of(name: str) -> str:
        if dtype != "q4_k_m":
            return dtype
        return "q6_k" if name.endswith(("attn_v.weight", "ffn_down.weight")) or name == "output.weight" else "q4_k"

    def mat(name: str, rows: int, cols: int) -> None:
        data, raw = _matrix(rng, rows, cols, kind_of(name))
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", V, C)
    for i in range(L):
        b = f"blk.{i}"
        vec(f"{b}.attn_norm.weight", C)
        mat(f"{b}.attn_q.weight", C, C)
        mat(f"{b}.attn_k.weight", Hkv * D, C)
        mat(f"{b}.attn_v.weight", Hkv * D, C)
        mat(f"{b}.attn_output.weight", C, C)
        vec(f"{b}.ffn_norm.weight", C)
        mat(f"{b}.ffn_gate.weight", F, C)
        mat(f"{b}.ffn_up.weight", F, C)
        mat(f"{b}.ffn_down.weight", C, F)
    vec("output_norm.weight", C)
    mat("output.weight", V, C)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="f16", choices=sorted(FILE_TYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    t0 = time.time()
    write(a.output, a.preset, a.dtype, a.seed)
    print(f"wrote {a.output}: {a.preset} {a.dtype} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
