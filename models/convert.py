"""Hugging Face GPT-NeoX checkpoints <-> GGUF files laid out as llama.cpp writes them.
(LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: convert() hands them to
models/convert_llama.py.)

``convert`` follows ``GPTNeoXModel`` in llama.cpp's ``convert_hf_to_gguf.py`` (names,
QKV row order, which tensors stay F32, tokenizer keys) so that its output loads in
llama.cpp and in tensorgpu alike, and without needing torch or transformers for
safetensors checkpoints. ``export_hf`` is the inverse, used to test the round trip and
to recreate an HF checkpoint from a shipped GGUF.

Metadata written (see models/tiny-neox/README.md, "GGUF layout"); keys a converter
cannot know from the checkpoint are ``general.name`` (the ``name`` argument, else the
config's ``_name_or_path``, else the folder name) and ``tokenizer.ggml.pre`` (the
``pre`` argument, "mpt" by default: every GPT-NeoX-family tokenizer hashes to
llama.cpp's "mpt"/"olmo" entry, and llama.cpp gives "gpt-2", "mpt" and "olmo" the same
GPT-2 regex, which is what HF's ByteLevel pre-tokenizer does).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .gguf_names import (
    ARCH,
    gguf_tensor_order,
    gguf_to_hf_name,
    hf_to_gguf_name,
    is_skipped_hf_name,
    qkv_gguf_to_hf,
    qkv_hf_to_gguf,
)

__all__ = ["convert", "export_hf", "main_convert", "main_export", "OUT_TYPES"]

LLAMA_DEFAULT_ROPE_BASE = 10000.0

# out_type -> (GGML type of the quantized 2-D weights, general.file_type)
OUT_TYPES = {
    "f32": ("F32", 0),   # LlamaFileType.ALL_F32
    "f16": ("F16", 1),   # MOSTLY_F16
    "bf16": ("BF16", 32),  # MOSTLY_BF16
    "q4_0": ("Q4_0", 2),  # MOSTLY_Q4_0
    "q8_0": ("Q8_0", 7),  # MOSTLY_Q8_0
}


# ---------------------------------------------------------------------------------------
# reading HF checkpoints
# ---------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


@dataclass
class _Source:
    """One checkpoint tensor, read only when its turn to be written comes."""

    name: str
    shape: tuple[int, ...]
    file: Path
    load: Callable[[], np.ndarray]


def _read_safetensors_index(path: Path) -> list[_Source]:
    """Header of a .safetensors file; data is memory-mapped on demand.

    Our own reader because numpy (and so ``safetensors.numpy``) has no bfloat16, and
    many GPT-NeoX-family checkpoints are stored in bf16.
    """
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: implausible safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    size = path.stat().st_size
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + end > size:
            raise ValueError(f"{path}: tensor {name!r} extends past the end of the file (truncated?)")

        def load(start=start, end=end, shape=shape, dt=dt) -> np.ndarray:
            npdt = np.dtype(_ST_DTYPES[dt])
            count = (end - start) // npdt.itemsize
            a = np.memmap(path, dtype=npdt, mode="r", offset=base + start, shape=(count,)) if count else np.zeros(0, npdt)
            a = a.reshape(shape)
            if dt == "BF16":
                return (a.astype(np.uint32) << 16).view(np.float32)
            return np.asarray(a)

        out.append(_Source(name, shape, path, load))
    return out


def _read_torch_index(path: Path) -> list[_Source]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle checkpoint and reading it needs torch "
            "(pip install torch), or convert the checkpoint to safetensors first"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    out = []
    for name, t in sd.items():
        def load(t=t) -> np.ndarray:
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.numpy()
        out.append(_Source(name, tuple(t.shape), path, load))
    return out


def check_source_shapes(sources: dict, expected: dict, hf_dir, what: str) -> None:
    """No tensor beyond `expected` (GGUF name -> shape), and every one of its shape; errors name
    the file and the tensor (`what` says what the checkpoint should be, e.g. "24-layer model")."""
    extra = [sources[n].name for n in sources if n not in expected]
    if extra:
        raise ValueError(f"{hf_dir}: tensor {extra[0]!r} does not fit a {what}")
    for n, shape in expected.items():
        if sources[n].shape != shape:
            raise ValueError(f"{sources[n].file}: tensor {sources[n].name!r} has shape {sources[n].shape}, "
                             f"config.json implies {shape}")


def collect_sources(hf_dir, is_skipped, to_gguf, what: str) -> dict:
    """GGUF name -> _Source of every parameter in the checkpoint's files (buffers that
    `is_skipped` names are left out). A tensor `to_gguf` has no name for, or one seen twice, is
    a ValueError naming the file and the tensor."""
    files, kind = _checkpoint_files(hf_dir)
    sources: dict = {}
    for fpath in files:
        for src in (_read_safetensors_index(fpath) if kind == "st" else _read_torch_index(fpath)):
            if is_skipped(src.name):
                continue
            gname = to_gguf(src.name)
            if gname is None:
                raise ValueError(f"{src.file}: unexpected tensor {src.name!r} (not a {what} parameter)")
            if gname in sources:
                raise ValueError(f"{src.file}: tensor {src.name!r} appears twice (also in {sources[gname].file})")
            sources[gname] = src
    return sources


def _checkpoint_files(hf_dir: Path) -> tuple[list[Path], str]:
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "pt")):
        index = hf_dir / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not (hf_dir / fn).is_file():
                    raise FileNotFoundError(f"{index} lists shard {fn!r}, which is missing from {hf_dir}")
            return [hf_dir / fn for fn in files], kind
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"], "st"
    shards = sorted(hf_dir.glob("model-*-of-*.safetensors"))
    if shards:
        return shards, "st"
    if (hf_dir / "pytorch_model.bin").is_file():
        return [hf_dir / "pytorch_model.bin"], "pt"
    shards = sorted(hf_dir.glob("pytorch_model-*-of-*.bin"))
    if shards:
        return shards, "pt"
    raise FileNotFoundError(
        f"no weights in {hf_dir}: expected model.safetensors, model-0000x-of-0000y.safetensors "
        "(+ model.safetensors.index.json) or pytorch_model.bin"
    )


def _load_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None


@dataclass
class _HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx: int
    rope_dims: int
    rope_base: float
    parallel_residual: bool
    norm_eps: float


def _hparams(config: dict[str, Any], path: Path) -> _HParams:
    archs = config.get("architectures") or []
    if "GPTNeoXForCausalLM" not in archs and not (not archs and config.get("model_type") == "gpt_neox"):
        raise ValueError(
            f"{path}: architectures is {archs!r} (model_type {config.get('model_type')!r}); "
            "only GPTNeoXForCausalLM can be converted"
        )

    def need(key: str) -> Any:
        if key not in config or config[key] is None:
            raise ValueError(f"{path}: missing required key {key!r}")
        return config[key]

    n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
    if n_embd % n_head:
        raise ValueError(f"{path}: hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
    # transformers 5 moved rotary settings into rope_parameters; 4.x and llama.cpp read the legacy keys
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{path}: rope type {rope_type!r} cannot be expressed in a llama.cpp gptneox GGUF")
    pct, base = config.get("rotary_pct"), config.get("rotary_emb_base")
    # transformers 5 uses rope_parameters and ignores the legacy keys; a config that has
    # both (written for 4.x and 5.x alike) must not say two different things
    for key, legacy, value in (("partial_rotary_factor", "rotary_pct", pct), ("rope_theta", "rotary_emb_base", base)):
        if key in rp and value is not None and float(rp[key]) != float(value):
            raise ValueError(f"{path}: {legacy} = {value} contradicts rope_parameters.{key} = {rp[key]}")
    pct = rp.get("partial_rotary_factor", 0.25 if pct is None else pct)
    base = rp.get("rope_theta", LLAMA_DEFAULT_ROPE_BASE if base is None else base)
    head_dim = n_embd // n_head
    return _HParams(
        n_vocab=int(need("vocab_size")),
        n_embd=n_embd,
        n_layer=int(need("num_hidden_layers")),
        n_head=n_head,
        n_ff=int(need("intermediate_size")),
        n_ctx=int(need("max_position_embeddings")),
        rope_dims=int(float(pct) * head_dim),  # as HF and llama.cpp compute it
        rope_base=float(base),
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
    )


def _expected_shapes(hp: _HParams) -> dict[str, tuple[int, ...]]:
    e, ff, v = hp.n_embd, hp.n_ff, hp.n_vocab
    shapes = {"token_embd.weight": (v, e), "output_norm.weight": (e,), "output_norm.bias": (e,),
              "output.weight": (v, e)}
    per = {"attn_norm.weight": (e,), "attn_norm.bias": (e,), "attn_qkv.weight": (3 * e, e),
           "attn_qkv.bias": (3 * e,), "attn_output.weight": (e, e), "attn_output.bias": (e,),
           "ffn_norm.weight": (e,), "ffn_norm.bias": (e,), "ffn_up.weight": (ff, e), "ffn_up.bias": (ff,),
           "ffn_down.weight": (e, ff), "ffn_down.bias": (e,)}
    for i in range(hp.n_layer):
        shapes.update({f"blk.{i}.{k}": s for k, s in per.items()})
    return shapes


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------

def _looks_special(tok: str) -> bool:
    # same heuristic as convert_hf_to_gguf's does_token_look_special
    return (tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def _vocab_from_tokenizer_json(tj: dict[str, Any], n_vocab: int, path: Path) -> tuple[list[str], list[int]]:
    """Token strings and types as ``get_vocab_base`` derives them, without transformers."""
    import gguf

    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise ValueError(f"{path}: tokenizer model is {model.get('type')!r}; only byte-level BPE is supported")
    pre = tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pres):
        warnings.warn(f"{path}: pre-tokenizer is not ByteLevel(use_regex=True); llama.cpp will split text "
                      "with the GPT-2 regex anyway", stacklevel=3)
    if tj.get("normalizer"):
        warnings.warn(f"{path}: the tokenizer has a normalizer ({tj['normalizer'].get('type')}), which GGUF "
                      "cannot express; ids may differ from HF on text it would change", stacklevel=3)
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added: dict[int, dict[str, Any]] = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tok = by_id[i]
        if i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                tok = tok.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(tok)
    return tokens, types


# ---------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------

def _tensor_qtype(name: str, shape: tuple[int, ...], out_type: str):
    """GGML type of one output tensor under llama.cpp's policy (norms, biases, 1-D stay F32)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    qtype = q[OUT_TYPES[out_type][0]]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        warnings.warn(f"{name}: row length {shape[-1]} is not a multiple of {qtype.name}'s block size "
                      f"{block}; falling back to F16 (as llama.cpp's converter does)", stacklevel=3)
        return q.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def convert(
    hf_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    out_type: str = "f16",
    progress: bool = True,
    *,
    name: str | None = None,
    pre: str | None = None,
) -> Path:
    """Write a llama.cpp-compatible GGUF of the GPTNeoXForCausalLM checkpoint in ``hf_dir``
    (or of a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM one: models/convert_llama.py).

    Everything (config, tokenizer, tensor names and shapes) is checked before the output
    is opened, and the file is written under a temporary name and renamed at the end,
    so a failure never leaves a half-written GGUF behind. Returns the output path.
    """
    import gguf

    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type {out_type!r} is not one of {sorted(OUT_TYPES)}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    config = _load_json(hf_dir / "config.json", "model config")
    from .convert_llama import ARCHS, convert_llama
    if any(a in ARCHS for a in config.get("architectures") or []):
        return convert_llama(hf_dir, out_path, out_type, progress, name=name, pre=pre)
    pre = "mpt" if pre is None else pre
    hp = _hparams(config, hf_dir / "config.json")
    tj_path = hf_dir / "tokenizer.json"
    tokens, toktypes = _vocab_from_tokenizer_json(_load_json(tj_path, "tokenizer"), hp.n_vocab, tj_path)

    sources = collect_sources(hf_dir, is_skipped_hf_name, hf_to_gguf_name, "GPT-NeoX")
    expected = _expected_shapes(hp)
    missing = [gguf_to_hf_name(n) for n in expected if n not in sources]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{hf_dir}: checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")
    check_source_shapes(sources, expected, hf_dir, f"{hp.n_layer}-layer model")

    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ValueError(f"{tj_path}: no BPE merges found")

    order = gguf_tensor_order(hp.n_layer)
    qtypes = {n: _tensor_qtype(n, expected[n], out_type) for n in order}

    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        for n in order:
            w.add_tensor_info(n, expected[n], np.dtype(np.float32), _nbytes(expected[n], qtypes[n]),
                              raw_dtype=qtypes[n])
        total, shared, expert, n_expert = w.get_total_parameter_count()
        if name is None:
            name = Path(str(config.get("_name_or_path") or "")).name or hf_dir.resolve().name
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_size_label(gguf.size_label(total, shared, expert, n_expert))
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_rope_dimension_count(hp.rope_dims)
        w.add_head_count(hp.n_head)
        w.add_parallel_residual(hp.parallel_residual)
        w.add_layer_norm_eps(hp.norm_eps)
        if hp.rope_base != LLAMA_DEFAULT_ROPE_BASE:
            w.add_rope_freq_base(hp.rope_base)
        w.add_file_type(OUT_TYPES[out_type][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special.add_to_gguf(w, quiet=True)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(_nbytes(expected[n], qtypes[n]) for n in order), unit="B", unit_scale=True,
                       desc=f"{out_path.name} ({out_type})")
        try:
            for n in order:
                data = np.ascontiguousarray(sources[n].load(), dtype=np.float32)
                if n.endswith("attn_qkv.weight") or n.endswith("attn_qkv.bias"):
                    data = np.ascontiguousarray(qkv_hf_to_gguf(data, hp.n_head))
                data = gguf.quants.quantize(data, qtypes[n])
                w.write_tensor_data(data)
                if bar is not None:
                    bar.update(data.nbytes)
        finally:
            if bar is not None:
                bar.close()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


# ---------------------------------------------------------------------------------------
# export (GGUF -> HF)
# ---------------------------------------------------------------------------------------

def _f32_repr(x: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def export_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokenizer_json: str | os.PathLike[str] | None = None,
) -> Path:
    """Write config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json.

    Quantized tensors are dequantized with the reference ``gguf.quants.dequantize`` and
    the QKV reorder is undone, so ``convert(export_hf(x), f32)`` reproduces an F32 ``x``
    bit for bit. Without ``tokenizer_json`` the tokenizer is rebuilt from the metadata.
    """
    import gguf
    from safetensors.numpy import save_file

    from .tokenizer import Tokenizer, read_gguf_metadata

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    md = read_gguf_metadata(gguf_path)
    arch = md.get("general.architecture")
    if arch != ARCH:
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}, expected {ARCH!r}")

    def need(key: str) -> Any:
        if key not in md:
            raise ValueError(f"{gguf_path}: missing metadata key {key!r}")
        return md[key]

    n_embd, n_head = int(need(f"{ARCH}.embedding_length")), int(need(f"{ARCH}.attention.head_count"))
    n_layer = int(need(f"{ARCH}.block_count"))
    head_dim = n_embd // n_head
    rope_dims = int(md.get(f"{ARCH}.rope.dimension_count", head_dim))
    # a rotary_pct for which int(pct * head_dim) gives back rope_dims exactly
    pct = rope_dims / head_dim
    while int(pct * head_dim) < rope_dims:
        pct = math.nextafter(pct, math.inf)
    base = float(md.get(f"{ARCH}.rope.freq_base", LLAMA_DEFAULT_ROPE_BASE))
    base = int(base) if base.is_integer() else base

    reader = gguf.GGUFReader(gguf_path)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        data = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True)
        if t.name.startswith("blk.") and ".attn_qkv." in t.name:
            data = np.ascontiguousarray(qkv_gguf_to_hf(data, n_head))
        tensors[hf_name] = data
    want = {gguf_to_hf_name(n) for n in gguf_tensor_order(n_layer)}
    if want - tensors.keys():
        raise ValueError(f"{gguf_path}: missing tensor(s) {sorted(want - tensors.keys())[:3]}")
    n_vocab = tensors["gpt_neox.embed_in.weight"].shape[0]

    def opt(key: str) -> Any:
        return md.get(f"tokenizer.ggml.{key}")

    config = {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "_name_or_path": md.get("general.name", gguf_path.stem),
        "vocab_size": n_vocab,
        "hidden_size": n_embd,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "intermediate_size": int(need(f"{ARCH}.feed_forward_length")),
        "max_position_embeddings": int(need(f"{ARCH}.context_length")),
        "rotary_pct": pct,
        "rotary_emb_base": base,
        "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": pct},
        "use_parallel_residual": bool(md.get(f"{ARCH}.use_parallel_residual", True)),
        "layer_norm_eps": _f32_repr(md.get(f"{ARCH}.attention.layer_norm_epsilon", 1e-5)),
        "hidden_act": "gelu",
        "attention_bias": True,
        "tie_word_embeddings": False,
        "bos_token_id": opt("bos_token_id"),
        "eos_token_id": opt("eos_token_id"),
        "pad_token_id": opt("padding_token_id"),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    tok = Tokenizer.from_gguf_metadata(md) if md.get("tokenizer.ggml.model") else None
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    elif tok is not None:
        tok.hf.save(str(out_dir / "tokenizer.json"))
    if tok is not None:
        def content(i: int | None) -> str | None:
            return None if i is None else tok.id_to_token(i)

        tc = {
            "add_bos_token": tok.add_bos,
            "add_eos_token": tok.add_eos,
            "add_prefix_space": False,
            "bos_token": content(tok.bos_id),
            "eos_token": content(tok.eos_id),
            "unk_token": content(tok.unk_id),
            "pad_token": content(tok.pad_id),
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in tc.items() if v is not None}, f, indent=2, ensure_ascii=False)
            f.write("\n")
    return out_dir


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

def main_convert(argv: Sequence[str] | None = None) -> int:
    """``convert HF_DIR OUT.gguf [--type f16] ...``: the `tensorgpu convert` tool (models/tools/convert.py)."""
    from .cli import main
    return main(["convert", *(sys.argv[1:] if argv is None else argv)])


def main_export(argv: Sequence[str] | None = None) -> int:
    """``export-hf MODEL.gguf OUT_DIR [--tokenizer tokenizer.json]``: the `tensorgpu export-hf` tool."""
    from .cli import main
    return main(["export-hf", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "export-hf":
        raise SystemExit(main_export(sys.argv[2:]))
    raise SystemExit(main_convert(sys.argv[1:] if sys.argv[1:2] != ["convert"] else sys.argv[2:]))
