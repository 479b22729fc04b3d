"""Which type llama-quantize gives each tensor of a model: the file types (Q4_0 ... Q5_K_M) and
their per-tensor rules, as `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp decides them
without an importance matrix.

A file type is a default block type plus a mix: the output matrix (and a token embedding that
doubles as it) gets q6_k; Q4_K_M / Q5_K_M spend q6_k on the attention value and MLP down
projections of the layers `use_more_bits` picks (the first and last eighth, and every third in
between); Q4_K_S spends q5_k on the first four value projections and the first eighth of the down
projections. A row length the chosen type's block does not divide falls back to a 32-element type
(q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), and to f16 when 32 does not divide it either. Only
2-D (and 3-D expert) tensors whose name ends in "weight" are quantized; norms, biases, and a few
small named tensors keep their type.

The rules are those of llama.cpp's tensor-category code (the source kept for the GPU machine,
3f545bec, and upstream since): a fused attn_qkv.weight (GPT-NeoX) counts as a value projection, so
the _M mixes give it q6_k or the default type by layer. Older llama.cpp gave it q5_k (Q4_K_M) or
q6_k (Q5_K_M) in every layer; llama / qwen2 models get the same types from both.

The layer counters follow llama.cpp exactly: value projections and down projections are counted
in the order llama.cpp visits tensors (`visit_order`: by layer number, then by name), so the same
model gets the same types as llama-quantize gives it, tensor for tensor.

Pure functions of names, shapes and a few hyperparameters; models/quantize.py does the I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["FILE_TYPES", "FileType", "ModelInfo", "QuantizeError", "TensorSpec", "choose_types",
           "parse_file_type", "visit_order", "BLOCK_SIZE"]


class QuantizeError(ValueError):
    """A quantization that cannot be done: a bad type name, an unusable file or tensor."""


# elements per block of each type a quantized file may hold (plain types: 1)
BLOCK_SIZE = {"f32": 1, "f16": 1, "bf16": 1, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
              "q4_k": 256, "q5_k": 256, "q6_k": 256}
_PLAIN = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class FileType:
    """One of llama-quantize's target file types."""
    name: str        # as llama-quantize spells it: "Q4_K_M"
    ftype: int       # general.file_type (llama_ftype)
    default: str     # block type of the tensors no rule singles out
    about: str       # one line for --help


FILE_TYPES = {ft.name: ft for ft in (
    FileType("Q4_0", 2, "q4_0", "4-bit, one f16 scale per 32"),
    FileType("Q4_1", 3, "q4_1", "4-bit, f16 scale and min per 32"),
    FileType("Q5_0", 8, "q5_0", "5-bit, one f16 scale per 32"),
    FileType("Q5_1", 9, "q5_1", "5-bit, f16 scale and min per 32"),
    FileType("Q8_0", 7, "q8_0", "8-bit, one f16 scale per 32"),
    FileType("Q4_K_S", 14, "q4_k", "q4_k; q5_k for the first value and down projections"),
    FileType("Q4_K_M", 15, "q4_k", "q4_k; q6_k for half the value and down projections"),
    FileType("Q5_K_S", 16, "q5_k", "q5_k"),
    FileType("Q5_K_M", 17, "q5_k", "q5_k; q6_k for half the value and down projections"),
    FileType("Q6_K", 18, "q6_k", "q6_k"),
    FileType("F16", 1, "f16", "16-bit floats"),
    FileType("F32", 0, "f32", "32-bit floats"),
)}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}   # as llama-quantize reads them


def parse_file_type(text: str) -> FileType:
    """A target type by name, case-insensitively ("q4_k_m", "Q8_0"; "Q4_K" / "Q5_K" mean the _M
    mixes, as in llama-quantize), or by its general.file_type number."""
    key = str(text).strip().upper()
    key = ALIASES.get(key, key)
    if key in FILE_TYPES:
        return FILE_TYPES[key]
    if key.isdigit():
        for ft in FILE_TYPES.values():
            if ft.ftype == int(key):
                return ft
    names = ", ".join(list(FILE_TYPES) + list(ALIASES))
    raise QuantizeError(f"unknown quantization type {text!r}; choose one of {names} (any case)")


@dataclass(frozen=True)
class ModelInfo:
    """What the rules read of the model's metadata."""
    arch: str
    n_layer: int
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which gives the value projections q5_k instead of q4_k."""
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv
        return (self.arch, self.n_layer) in (("deci", 80), ("olmo", 80), ("qwen2", 80), ("jais2", 68))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple        # ggml order, fastest dimension first
    type: str        # "f32", "f16", "bf16", "q4_0", ... (BLOCK_SIZE's keys) or another ggml name

    @property
    def n_dims(self) -> int:
        """ggml_n_dims: trailing dimensions of 1 do not count."""
        n = len(self.ne)
        while n > 1 and self.ne[n - 1] == 1:
            n -= 1
        return max(n, 1)


_LAYER = re.compile(r"blk\.([+-]?\d+)")   # sscanf(name, "blk.%d.", &layer)


def _layer_of(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def visit_order(names: Sequence[str]) -> list:
    """The order llama.cpp keeps a model's tensors in (and so writes them and counts layers in):
    tensors outside any block first, then block by block, by name within each."""
    return sorted(names, key=lambda n: (_layer_of(n), n.encode()))


# names llama.cpp never quantizes, beyond norms and 1-D tensors (tensor_allows_quantization)
_KEEP_SUBSTRINGS = ("ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
                    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
                    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
                    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
                    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
                    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
                    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
                    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


def allows_quantization(t: TensorSpec) -> bool:
    """Whether llama-quantize may change this tensor's type at all."""
    if t.n_dims < 2 or not t.name.endswith("weight") or "_norm.weight" in t.name:
        return False
    return t.name not in _KEEP_NAMES and not any(s in t.name for s in _KEEP_SUBSTRINGS)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers a _M mix gives more bits: the first and last eighth and every third in between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


class _Counters:
    """The running state llama-quantize keeps while it visits tensors."""

    def __init__(self, tensors: Sequence[TensorSpec], model: ModelInfo):
        self.n_attention_wv = sum(_category(t.name) == "attn_v" for t in tensors)
        self.tied = not any(t.name == "output.weight" for t in tensors)
        self.n_layer = model.n_layer
        self.i_attention_wv = 0
        self.i_ffn_down = 0


def _layer_index(counter: int, name: str, model: ModelInfo) -> int:
    """llama.cpp's layer_info: the running count, or the block number of an expert model's tensor."""
    if model.n_expert <= 1:
        return counter
    i = _layer_of(name)
    if i == -1 and not _LAYER.match(name):
        raise QuantizeError(f"tensor {name!r}: cannot tell its layer (expected a 'blk.N.' name)")
    if not 0 <= i < model.n_layer:
        raise QuantizeError(f"tensor {name!r}: layer {i} is outside [0, {model.n_layer}) "
                            f"({model.arch}.block_count)")
    return i


def _mix_type(t: TensorSpec, new: str, ft: FileType, model: ModelInfo, st: _Counters) -> str:
    """llama_tensor_get_type_impl for the file types of FILE_TYPES, without an importance matrix."""
    cat = _category(t.name)
    name = ft.name
    falcon = model.arch == "falcon"
    if cat == "output" or (st.tied and cat == "token_embd"):
        if falcon or t.ne[0] % BLOCK_SIZE[new]:
            return "q8_0"
        return new if new == "q8_0" else "q6_k"
    if cat == "attn_v":
        if name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "q6_k"
        elif name == "Q4_K_S" and st.i_attention_wv < 4:
            new = "q5_k"
        if model.is_70b and new == "q4_k":
            new = "q5_k"
        if model.n_expert == 8:
            new = "q8_0"
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if model.n_expert == 8:
            new = "q8_0"
    elif cat == "ffn_down":
        i = _layer_index(st.i_ffn_down, t.name, model)
        n = st.n_layer
        if name == "Q4_K_M":
            if falcon:
                new = "q6_k" if i < n // 16 else "q5_k" if _use_more_bits(i, n) else "q4_k"
            elif _use_more_bits(i, n):
                new = "q6_k"
        elif name == "Q5_K_M" and _use_more_bits(i, n):
            new = "q6_k"
        elif name == "Q4_K_S" and not falcon and i < n // 8:
            new = "q5_k"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon and model.n_expert == 8 and name in ("Q4_K_S", "Q4_K_M"):
            new = "q5_k"
    return new


def _fallback(t: TensorSpec, new: str) -> tuple:
    """(type, note): a type whose block divides the row length (tensor_type_fallback)."""
    ncols = t.ne[0]
    if ncols % BLOCK_SIZE[new] == 0:
        return new, ""
    if new not in _FALLBACK:
        raise QuantizeError(f"tensor {t.name!r} (ne {list(t.ne)}): row length {ncols} is not a multiple of the "
                            f"{new} block size {BLOCK_SIZE[new]}, and {new} has no fallback type "
                            "(llama-quantize stops here too)")
    alt = _FALLBACK[new]
    if ncols % BLOCK_SIZE[alt]:
        return "f16", f"row length {ncols} not a multiple of {BLOCK_SIZE[new]} or {BLOCK_SIZE[alt]}: f16"
    return alt, f"row length {ncols} not a multiple of {BLOCK_SIZE[new]}: {alt} instead of {new}"


def choose_types(tensors: Sequence[TensorSpec], ft: FileType, model: ModelInfo, pure: bool = False) -> dict:
    """name -> (type, note) for every tensor, in visit_order: what llama-quantize (without an
    importance matrix) writes for file type `ft`. A tensor it leaves alone keeps its type; note says
    why a tensor fell back to another type ("" otherwise). pure: every quantizable tensor gets
    ft.default, as llama-quantize's --pure (the row-length fallback still applies)."""
    by_name = {t.name: t for t in tensors}
    order = visit_order(by_name)
    st = _Counters(tensors, model)
    out = {}
    for n in order:
        t = by_name[n]
        if not allows_quantization(t):
            out[n] = (t.type, "")
            continue
        new = ft.default
        if new in _PLAIN:          # F16 / F32: no mix, no fallback
            out[n] = (new, "")
            continue
        if not pure:
            new = _mix_type(t, new, ft, model, st)
        out[n] = _fallback(t, new)
    return out


def model_info(metadata: dict, where: str = "GGUF file") -> ModelInfo:
    """ModelInfo from GGUF metadata (general.architecture, {arch}.block_count, ...)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise QuantizeError(f"{where}: no general.architecture in the metadata")
    n_layer = metadata.get(f"{arch}.block_count")
    if not isinstance(n_layer, int) or isinstance(n_layer, bool) or n_layer < 0:
        raise QuantizeError(f"{where}: metadata {arch}.block_count is missing or not a count ({n_layer!r}); "
                            "the layer rules need it")

    def first_int(key: str) -> int:
        v = metadata.get(key, 0)
        if isinstance(v, list):
            v = v[0] if v else 0
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    return ModelInfo(arch, n_layer, first_int(f"{arch}.expert_count"), first_int(f"{arch}.attention.head_count"),
                     first_int(f"{arch}.attention.head_count_kv"))


def describe(types: dict, ftype: Optional[FileType] = None) -> str:
    """A one-line count of the chosen types ("13 q4_k, 3 q6_k, 5 f32")."""
    counts: dict = {}
    for ty, _ in types.values():
        counts[ty] = counts.get(ty, 0) + 1
    body = ", ".join(f"{c} {ty}" for ty, c in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{ftype.name}: {body}" if ftype else body
