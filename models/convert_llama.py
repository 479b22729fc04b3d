"""Hugging Face LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM checkpoints -> GGUF, laid
out as llama.cpp's convert_hf_to_gguf.py writes them (LlamaModel, Qwen2Model), without torch.

What has to match llama.cpp for the file to load there and here alike:
* names: model.layers.N.self_attn.q_proj -> blk.N.attn_q, ... (``_BLOCK_MAP``);
* the Q/K row permutation of arch `llama` (LlamaModel.permute): HF's rotate-half halves of each
  head become adjacent pairs, which is why a `llama` GGUF needs "normal" rope; `qwen2` is
  written unpermuted (NEOX rope) and keeps its q/k/v biases;
* a tied LM head (tie_word_embeddings) writes no output.weight;
* Llama 3.1's rope_scaling {"rope_type": "llama3"} becomes rope_freqs.weight (generate_extra_tensors);
* the tokenizer: a SentencePiece-style BPE (byte_fallback, ``▁``) becomes tokenizer.ggml.model
  "llama" with scores -k for the k-th normal piece in id order (SentencePiece numbers BPE pieces
  by score, which is what llama.cpp's SPM merge order needs), bytes and specials as the
  converter types them; a byte-level BPE becomes "gpt2" with its merges and `pre`.

models/convert.py's convert() dispatches here by config.json's architectures.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARCHS", "convert_llama", "permute_qk", "unpermute_qk"]

# HF architectures -> GGUF general.architecture
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

_BLOCK_MAP = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBAL_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIP_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_BLOCK_ORDER = ["attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias", "attn_v.weight",
                "attn_v.bias", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                "ffn_down.weight"]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows (per head: first half, second half) -> llama.cpp's adjacent pairs (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_qk (what transformers' GGUF loader does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str):
    m = _BLOCK_RE.match(name)
    if m:
        layer, mod, kind = m.groups()
        return f"blk.{layer}.{_BLOCK_MAP[mod]}.{kind}" if mod in _BLOCK_MAP else None
    base, _, kind = name.rpartition(".")
    return f"{_GLOBAL_MAP[base]}.{kind}" if base in _GLOBAL_MAP and kind == "weight" else None


def _hparams(config: dict, path: Path) -> dict:
    hf_arch = next((a for a in config.get("architectures") or [] if a in ARCHS), None)
    if hf_arch is None:
        raise ValueError(f"{path}: architectures is {config.get('architectures')!r}; convertible: "
                         f"GPTNeoXForCausalLM, {', '.join(ARCHS)}")

    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ValueError(f"{path}: missing required key {key!r}")
        return config[key]

    C, H = int(need("hidden_size")), int(need("num_attention_heads"))
    Hkv = int(config.get("num_key_value_heads") or H)
    head_dim = int(config.get("head_dim") or C // H)
    if H % Hkv:
        raise ValueError(f"{path}: num_key_value_heads {Hkv} does not divide num_attention_heads {H}")
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    return dict(hf_arch=hf_arch, arch=ARCHS[hf_arch], n_vocab=int(need("vocab_size")), n_embd=C,
                n_layer=int(need("num_hidden_layers")), n_head=H, n_head_kv=Hkv, head_dim=head_dim,
                n_ff=int(need("intermediate_size")), n_ctx=int(need("max_position_embeddings")),
                rope_base=float(rp.get("rope_theta", config.get("rope_theta", 10000.0))),
                norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope=dict(rp, rope_type=rope_type),
                tied=bool(config.get("tie_word_embeddings", False)))


def _expected_shapes(hp: dict, biases: bool) -> dict:
    C, F, V, D = hp["n_embd"], hp["n_ff"], hp["n_vocab"], hp["head_dim"]
    Dq, Dkv = hp["n_head"] * D, hp["n_head_kv"] * D
    per = {"attn_norm.weight": (C,), "attn_q.weight": (Dq, C), "attn_k.weight": (Dkv, C), "attn_v.weight": (Dkv, C),
           "attn_output.weight": (C, Dq), "ffn_norm.weight": (C,), "ffn_gate.weight": (F, C),
           "ffn_up.weight": (F, C), "ffn_down.weight": (C, F)}
    if biases:
        per.update({"attn_q.bias": (Dq,), "attn_k.bias": (Dkv,), "attn_v.bias": (Dkv,)})
    shapes = {"token_embd.weight": (V, C)}
    for i in range(hp["n_layer"]):
        shapes.update({f"blk.{i}.{k}": per[k] for k in _BLOCK_ORDER if k in per})
    shapes["output_norm.weight"] = (C,)
    if not hp["tied"]:
        shapes["output.weight"] = (V, C)
    return shapes


def _llama3_rope_factors(hp: dict) -> np.ndarray:
    """rope_freqs.weight of Llama 3.1 (llama.cpp LlamaModel.generate_extra_tensors)."""
    rp, base, dim = hp["rope"], hp["rope_base"], hp["head_dim"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _vocab(tj: dict, hp: dict, path: Path) -> tuple:
    """(tokenizer model, tokens, types, scores or None) from a tokenizer.json."""
    import gguf

    from .convert import _looks_special
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise ValueError(f"{path}: tokenizer model is {model.get('type')!r}; only BPE tokenizers are supported")
    spm = bool(model.get("byte_fallback"))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    n = hp["n_vocab"]
    if by_id and max(by_id) >= n:
        raise ValueError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {n}")
    T = gguf.TokenType
    tokens, types, scores, k = [], [], [], 0
    for i in range(n):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]"), types.append(int(T.UNUSED)), scores.append(-1000.0)
            continue
        if i in added and (added[i].get("special") or _looks_special(tok)):
            ty, sc = T.CONTROL, -1000.0
        elif i in added:
            ty, sc = T.USER_DEFINED, -1000.0
        elif spm and re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            ty, sc = T.BYTE, 0.0
        else:
            ty, sc, k = T.NORMAL, float(-k), k + 1
        tokens.append(tok), types.append(int(ty)), scores.append(sc)
    return ("llama" if spm else "gpt2"), tokens, types, (scores if spm else None)


def convert_llama(hf_dir, out_path, out_type: str = "f16", progress: bool = True, *, name=None, pre=None) -> Path:
    """Write a llama.cpp-compatible GGUF of a LLaMA-family checkpoint (see the module docstring).
    Everything is checked before the output is opened; the file is written under a temporary
    name and renamed at the end."""
    import gguf

    from .convert import OUT_TYPES, _load_json, _nbytes, _tensor_qtype, check_source_shapes, collect_sources
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = _load_json(hf_dir / "config.json", "model config")
    hp = _hparams(config, hf_dir / "config.json")
    arch = hp["arch"]
    sources = collect_sources(hf_dir, lambda name: _SKIP_RE.search(name) is not None, hf_to_gguf_name, hp["hf_arch"])
    if hp["tied"]:
        sources.pop("output.weight", None)
    expected = _expected_shapes(hp, biases=arch == "qwen2" or "blk.0.attn_q.bias" in sources)
    missing = [n for n in expected if n not in sources]
    if missing:
        raise ValueError(f"{hf_dir}: checkpoint is missing tensor(s) for {', '.join(missing[:3])}"
                         f"{' and more' if len(missing) > 3 else ''}")
    check_source_shapes(sources, expected, hf_dir, f"{hp['n_layer']}-layer {hp['hf_arch']}")
    tj_path = hf_dir / "tokenizer.json"
    tok_model, tokens, types, scores = _vocab(_load_json(tj_path, "tokenizer"), hp, tj_path)
    special = gguf.SpecialVocab(hf_dir, load_merges=tok_model == "gpt2", n_vocab=len(tokens))
    if tok_model == "gpt2" and not special.merges:
        raise ValueError(f"{tj_path}: no BPE merges found")

    order = list(expected)
    extra_t = {}
    if hp["rope"]["rope_type"] == "llama3":
        extra_t["rope_freqs.weight"] = _llama3_rope_factors(hp)
    qtypes = {n: _tensor_qtype(n, expected[n], out_type) for n in order}
    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        for n, a in extra_t.items():
            w.add_tensor_info(n, a.shape, a.dtype, a.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
        for n in order:
            w.add_tensor_info(n, expected[n], np.dtype(np.float32), _nbytes(expected[n], qtypes[n]), raw_dtype=qtypes[n])
        total, shared, expert, n_expert = w.get_total_parameter_count()
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or Path(str(config.get("_name_or_path") or "")).name or hf_dir.resolve().name)
        w.add_size_label(gguf.size_label(total, shared, expert, n_expert))
        w.add_block_count(hp["n_layer"])
        w.add_context_length(hp["n_ctx"])
        w.add_embedding_length(hp["n_embd"])
        w.add_feed_forward_length(hp["n_ff"])
        w.add_head_count(hp["n_head"])
        w.add_head_count_kv(hp["n_head_kv"])
        w.add_rope_freq_base(hp["rope_base"])
        w.add_layer_norm_rms_eps(hp["norm_eps"])
        if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        if arch == "llama":
            w.add_vocab_size(hp["n_vocab"])
            w.add_rope_dimension_count(hp["head_dim"])
        if hp["rope"]["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(hp["rope"]["factor"]))
        w.add_file_type(OUT_TYPES[out_type][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(tok_model)
        w.add_tokenizer_pre(pre or ("default" if tok_model == "llama" else "qwen2" if arch == "qwen2" else "llama-bpe"))
        w.add_token_list(tokens)
        if scores is not None:
            w.add_token_scores(scores)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for a in extra_t.values():
            w.write_tensor_data(a)
        for n in order:
            data = np.ascontiguousarray(sources[n].load(), dtype=np.float32)
            if arch == "llama" and n.endswith(("attn_q.weight", "attn_q.bias")):
                data = permute_qk(data, hp["n_head"])
            elif arch == "llama" and n.endswith(("attn_k.weight", "attn_k.bias")):
                data = permute_qk(data, hp["n_head_kv"])
            w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data), qtypes[n]))
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        print(f"{out_path.name}: {len(order) + len(extra_t)} tensors ({out_type})")
    return out_path
