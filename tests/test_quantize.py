"""models/quantize.py (llama-quantize for tensorgpu) and its two parts.

* quant_blocks: blocks bit-identical to ggml's reference quantizers: against gguf.quants for the types it
  covers (hypothesis over shapes and scales), against models/quant-reference (ggml's own bytes for all
  eight types, on 32 adversarial rows and on real weights), and against the llama.cpp-written vendored
  files (tiny-llama Q4_K_M: q4_k and q6_k; tiny-qwen2 q4_0).
* quant_mix: llama.cpp's per-tensor types: the vendored llama.cpp files' own types, the _M layer rules
  on a 12-layer llama-shaped model, tied embeddings, row-length fallbacks, --pure, expert layers.
* the tool: a llama.cpp-written file reproduced byte for byte (opt-in: its f32 source is not vendored),
  metadata copied with its value types, unchanged tensors copied, alignment, the loader round trip
  with logits per type, requantizing, every bad input, the command line.
"""
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import quant_blocks, quantize as qz
from models.quant_blocks import QUANT_TYPES, quantize_rows
from models.quant_mix import (FILE_TYPES, ModelInfo, QuantizeError, TensorSpec, choose_types, model_info,
                              parse_file_type, visit_order)
from tensorgpu.gguf import GGUFError, load_gguf

ROOT = Path(__file__).resolve().parent.parent / "models"
REF = np.load(ROOT / "quant-reference" / "reference.npz")
GGUF_COVERED = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")   # the types gguf.quants.quantize writes
QT = gguf.GGMLQuantizationType


def _gguf_quantize(x, t):
    return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), QT[t.upper()])


def _tensor_bytes(path, name):
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    return t.tensor_type.name.lower(), np.array(t.data)


def _types_of(path):
    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("t", QUANT_TYPES)
def test_blocks_equal_ggml_on_adversarial_rows(t):
    x, want = REF["adversarial_x"], REF[f"adversarial_{t}"]
    with np.errstate(all="ignore"):
        got = quantize_rows(x, t)
    bad = [str(REF["adversarial_names"][i]) for i in range(len(x)) if not np.array_equal(got[i], want[i])]
    assert not bad, f"{t}: rows differing from ggml's reference quantizer: {bad}"


@pytest.mark.parametrize("t", QUANT_TYPES)
def test_blocks_equal_ggml_on_real_weights(t):
    x, want = REF["real_x"], REF[f"real_{t}"]
    got = quantize_rows(x.reshape(-1, x.shape[-1]), t).reshape(want.shape)
    for i, name in enumerate(REF["real_sources"]):
        assert np.array_equal(got[i], want[i]), f"{t}: {name} differs from ggml's reference quantizer"


@pytest.mark.parametrize("folder,model,name,i", [("tiny-llama", "tiny-llama-q4_k_m", "blk.0.attn_k.weight", 0),
                                                 ("tiny-llama", "tiny-llama-q4_k_m", "blk.1.attn_v.weight", 1),
                                                 ("tiny-qwen2", "tiny-qwen2-q4_0", "blk.0.attn_k.weight", 2)])
def test_blocks_equal_llama_quantize_files(folder, model, name, i):
    """The vendored files llama-quantize wrote, against our blocks of the same f32 rows."""
    t, data = _tensor_bytes(ROOT / folder / f"{model}.gguf", name)
    assert REF["real_sources"][i] == f"{folder}/{name}"
    got = quantize_rows(REF["real_x"][i], t)
    assert np.array_equal(got, data[:32]), f"{model} {name} ({t}): blocks differ from llama-quantize's"


@pytest.mark.parametrize("t", GGUF_COVERED)
def test_blocks_equal_gguf_py_on_edge_cases(t):
    """gguf.quants agrees with ggml except on the sign of zero blocks (see quant-reference/README.md)."""
    names = [str(n) for n in REF["adversarial_names"]]
    keep = [i for i, n in enumerate(names) if "zeros" not in n]
    x = REF["adversarial_x"][keep]
    with np.errstate(all="ignore"):
        assert np.array_equal(quantize_rows(x, t), _gguf_quantize(x, t))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 5), blocks=st.integers(1, 9), log_scale=st.floats(-12, 3),
       t=st.sampled_from(GGUF_COVERED), seed=st.integers(0, 2**16), shift=st.floats(-2, 2))
def test_blocks_equal_gguf_py_over_shapes(rows, blocks, log_scale, t, seed, shift):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((rows, blocks * 32)) + shift) * 10.0 ** log_scale).astype(np.float32)
    assert np.array_equal(quantize_rows(x, t), _gguf_quantize(x, t))


@pytest.mark.parametrize("t", ["q4_k", "q6_k", "q8_0"])
def test_chunking_does_not_change_blocks(t, monkeypatch):
    x = REF["real_x"].reshape(-1, 256)
    whole = quantize_rows(x, t)
    monkeypatch.setattr(quant_blocks, "CHUNK_ELEMENTS", 3 * 256)   # chunks that split rows
    assert np.array_equal(quantize_rows(x, t), whole)


def test_plain_types_and_bad_arguments():
    x = REF["real_x"][0]
    assert np.array_equal(quantize_rows(x, "f16").view("<f2"), x.astype(np.float16))
    assert np.array_equal(quantize_rows(x, "f32").view("<f4"), x)
    with pytest.raises(ValueError, match="unknown type 'q3_k'"):
        quantize_rows(x, "q3_k")
    with pytest.raises(ValueError, match="row length 48 is not a multiple of the q4_0 block size 32"):
        quantize_rows(np.zeros((2, 48), np.float32), "q4_0")
    with pytest.raises(ValueError, match=r"2-D array \[rows, n\], got shape \(256,\)"):
        quantize_rows(np.zeros(256, np.float32), "q8_0")


# ----------------------------------------------------------------------------- per-tensor types


def _llama_specs(n_layer, n_embd=256, n_ff=768, n_kv=128, vocab=4096, tied=False, ty="f32"):
    specs = [TensorSpec("token_embd.weight", (n_embd, vocab), ty), TensorSpec("output_norm.weight", (n_embd,), "f32")]
    if not tied:
        specs.append(TensorSpec("output.weight", (n_embd, vocab), ty))
    shapes = {"attn_q": (n_embd, n_embd), "attn_k": (n_embd, n_kv), "attn_v": (n_embd, n_kv),
              "attn_output": (n_embd, n_embd), "ffn_gate": (n_embd, n_ff), "ffn_up": (n_embd, n_ff),
              "ffn_down": (n_ff, n_embd)}
    for i in range(n_layer):
        specs += [TensorSpec(f"blk.{i}.{k}.weight", (n_embd,), "f32") for k in ("attn_norm", "ffn_norm")]
        specs += [TensorSpec(f"blk.{i}.{k}.weight", ne, ty) for k, ne in shapes.items()]
    return specs


def _pick(types, kind):
    return {int(n.split(".")[1]): ty for n, (ty, _) in types.items() if n.endswith(f".{kind}.weight")}


@pytest.mark.parametrize("model,ftype", [("tiny-llama", "q4_k_m"), ("tiny-qwen2", "q4_0")])
def test_types_of_the_llama_quantize_files(model, ftype):
    """Names and shapes of the vendored llama.cpp files -> exactly the types llama-quantize chose."""
    r = gguf.GGUFReader(ROOT / model / f"{model}-{ftype}.gguf")
    meta = {k: f.contents() for k, f in r.fields.items()}
    specs = [TensorSpec(t.name, tuple(int(d) for d in t.shape), "f32") for t in r.tensors]
    types = choose_types(specs, parse_file_type(ftype), model_info(meta))
    assert {n: ty for n, (ty, _) in types.items()} == {t.name: t.tensor_type.name.lower() for t in r.tensors}
    assert list(types) == [t.name for t in r.tensors] == visit_order([t.name for t in r.tensors])


def test_m_mixes_follow_use_more_bits_by_layer_number():
    """12 layers: q6_k for layers i < 12/8, i >= 7*12/8 and (i - 12/8) % 3 == 2 -> {0, 3, 6, 9, 10, 11},
    counted by layer number (blk.10 comes after blk.9, not after blk.1)."""
    more = {0, 3, 6, 9, 10, 11}
    specs = _llama_specs(12)
    for name, base in (("Q4_K_M", "q4_k"), ("Q5_K_M", "q5_k")):
        types = choose_types(specs, FILE_TYPES[name], ModelInfo("llama", 12, 0, 4, 2))
        for kind in ("attn_v", "ffn_down"):
            assert _pick(types, kind) == {i: "q6_k" if i in more else base for i in range(12)}, (name, kind)
        for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert set(_pick(types, kind).values()) == {base}, (name, kind)
        assert types["output.weight"][0] == "q6_k" and types["token_embd.weight"][0] == base
        assert types["output_norm.weight"][0] == "f32" and types["blk.3.attn_norm.weight"][0] == "f32"
    s = choose_types(specs, FILE_TYPES["Q4_K_S"], ModelInfo("llama", 12))
    assert _pick(s, "attn_v") == {i: "q5_k" if i < 4 else "q4_k" for i in range(12)}
    assert _pick(s, "ffn_down") == {i: "q5_k" if i < 1 else "q4_k" for i in range(12)}


@pytest.mark.parametrize("ftype,out", [("Q4_0", "q6_k"), ("Q5_1", "q6_k"), ("Q8_0", "q8_0"), ("Q6_K", "q6_k"),
                                       ("Q4_K_M", "q6_k"), ("F16", "f16")])
def test_output_and_tied_embedding(ftype, out):
    ft = parse_file_type(ftype)
    untied = choose_types(_llama_specs(2), ft, ModelInfo("llama", 2))
    assert untied["output.weight"][0] == out
    assert untied["token_embd.weight"][0] == (ft.default if ftype != "F16" else "f16")
    tied = choose_types(_llama_specs(2, tied=True), ft, ModelInfo("qwen2", 2))
    assert tied["token_embd.weight"][0] == out
    assert set(_pick(tied, "attn_q").values()) == {ft.default}


def test_row_length_fallbacks():
    """288 = 9 * 32: q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0; the output goes to q8_0 first.
    48: no 32-element type fits: f16 (--pure; the mix's q8_0 output has no fallback). A 32-element type
    with no fallback is an error naming the tensor, as in llama-quantize."""
    specs = _llama_specs(2, n_embd=288, n_ff=288, n_kv=288)
    t = choose_types(specs, FILE_TYPES["Q4_K_M"], ModelInfo("llama", 2))
    assert t["blk.0.attn_q.weight"] == ("q5_0", "row length 288 not a multiple of 256: q5_0 instead of q4_k")
    assert t["blk.1.attn_v.weight"][0] == "q8_0" and t["blk.1.ffn_down.weight"][0] == "q8_0"   # q6_k layers
    assert t["output.weight"] == ("q8_0", "")
    assert choose_types(specs, FILE_TYPES["Q5_K_M"], ModelInfo("llama", 2))["blk.0.attn_q.weight"][0] == "q5_1"
    odd = _llama_specs(1, n_embd=48, n_ff=48, n_kv=48)
    pure = choose_types(odd, FILE_TYPES["Q4_K_M"], ModelInfo("llama", 1), pure=True)
    assert pure["blk.0.attn_q.weight"][0] == pure["output.weight"][0] == "f16"
    with pytest.raises(QuantizeError, match=r"'output.weight' \(ne \[48, 4096\]\): row length 48 is not a multiple "
                                            r"of the q8_0 block size 32, and q8_0 has no fallback"):
        choose_types(odd, FILE_TYPES["Q4_K_M"], ModelInfo("llama", 1))   # the mix sends output.weight to q8_0
    with pytest.raises(QuantizeError, match=r"'blk.0.attn_q.weight' \(ne \[48, 64\]\): row length 48 is not a "
                                            r"multiple of the q4_0 block size 32"):
        choose_types([TensorSpec("blk.0.attn_q.weight", (48, 64), "f32")], FILE_TYPES["Q4_0"], ModelInfo("llama", 1))


def test_pure_70b_experts_and_kept_tensors():
    specs = _llama_specs(3)
    pure = choose_types(specs, FILE_TYPES["Q4_K_M"], ModelInfo("llama", 3), pure=True)
    assert {ty for n, (ty, _) in pure.items() if n.endswith("norm.weight")} == {"f32"}
    assert {ty for n, (ty, _) in pure.items() if not n.endswith("norm.weight")} == {"q4_k"}
    big = choose_types(_llama_specs(80, vocab=64), FILE_TYPES["Q4_K_M"], ModelInfo("llama", 80, 0, 64, 8))
    assert set(_pick(big, "attn_v").values()) == {"q5_k", "q6_k"}   # 70B: q4_k value projections -> q5_k
    moe = [TensorSpec("blk.4.ffn_down_exps.weight", (256, 256, 8), "f32"),   # layers by name, not by count:
           TensorSpec("blk.2.ffn_down_exps.weight", (256, 256, 8), "f32"),   # of 16, 2 has no more bits, 4 has
           TensorSpec("blk.0.attn_v.weight", (256, 256), "f32"), TensorSpec("blk.0.attn_k.weight", (256, 256), "f32"),
           TensorSpec("blk.0.ffn_gate_inp.weight", (256, 8), "f32"), TensorSpec("blk.0.attn_q.bias", (256,), "f32"),
           TensorSpec("blk.0.ffn_up.weight", (256, 1), "f32")]   # ggml_n_dims 1: kept
    m = choose_types(moe, FILE_TYPES["Q4_K_M"], ModelInfo("mixtral", 16, 8))
    assert m["blk.0.attn_v.weight"][0] == m["blk.0.attn_k.weight"][0] == "q8_0"
    assert m["blk.4.ffn_down_exps.weight"][0] == "q6_k" and m["blk.2.ffn_down_exps.weight"][0] == "q4_k"
    assert m["blk.0.ffn_gate_inp.weight"][0] == m["blk.0.attn_q.bias"][0] == m["blk.0.ffn_up.weight"][0] == "f32"
    with pytest.raises(QuantizeError, match=r"'blk.20.ffn_down_exps.weight': layer 20 is outside \[0, 16\)"):
        choose_types([TensorSpec("blk.20.ffn_down_exps.weight", (256, 256, 8), "f32")], FILE_TYPES["Q4_K_M"],
                     ModelInfo("mixtral", 16, 8))


@pytest.mark.parametrize("text,name,ftype", [("q4_k_m", "Q4_K_M", 15), ("Q4_K", "Q4_K_M", 15), ("q5_k", "Q5_K_M", 17),
                                             ("q8_0", "Q8_0", 7), ("Q4_0", "Q4_0", 2), ("q4_1", "Q4_1", 3),
                                             ("Q5_0", "Q5_0", 8), ("q5_1", "Q5_1", 9), ("q6_k", "Q6_K", 18),
                                             ("Q5_K_S", "Q5_K_S", 16), ("f16", "F16", 1), ("15", "Q4_K_M", 15)])
def test_type_names(text, name, ftype):
    ft = parse_file_type(text)
    assert (ft.name, ft.ftype) == (name, ftype)


# ----------------------------------------------------------------------------- the tool


def _write_gguf(path, tensors, arch="llama", meta=None, alignment=None):
    """A small GGUF: tensors name -> np array (f32/f16) or (raw uint8 bytes, GGMLQuantizationType)."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.data_alignment = alignment
        w.add_uint32("general.alignment", alignment)
    for k, v in (meta if meta is not None else {f"{arch}.block_count": 1}).items():
        if isinstance(v, tuple):
            w.add_key_value(k, v[0], v[1], v[2]) if len(v) == 3 else w.add_key_value(k, *v)
        else:
            w.add_uint32(k, v)
    for n, a in tensors.items():
        if isinstance(a, tuple):
            w.add_tensor(n, a[0], raw_dtype=a[1])
        else:
            w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _small_model(path, **kw):
    rng = np.random.default_rng(7)
    t = {"token_embd.weight": rng.standard_normal((64, 256)).astype(np.float32),
         "output_norm.weight": np.ones(256, np.float32),
         "blk.0.attn_q.weight": (rng.standard_normal((32, 256)) * 0.1).astype(np.float32),
         "blk.0.attn_q.bias": rng.standard_normal(32).astype(np.float32),
         "blk.0.ffn_down.weight": rng.standard_normal((32, 256)).astype(np.float16)}
    t.update(kw.pop("tensors", {}))
    return _write_gguf(path, t, **kw)


def test_output_layout_metadata_and_copied_tensors(tmp_path):
    src = _small_model(tmp_path / "in.gguf", meta={
        "llama.block_count": 1, "general.file_type": 0,
        "u32s": ([1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
        "i8": (-3, gguf.GGUFValueType.INT8), "name": ("x", gguf.GGUFValueType.STRING)}, alignment=64)
    rep = qz.quantize(src, tmp_path / "out.gguf", "q8_0", progress=False)
    out = load_gguf(rep.path, progress=False, check_with_gguf_reader=True)
    try:
        assert out.alignment == 64 and out.metadata["general.alignment"] == 64
        assert list(out.metadata)[-2:] == ["general.quantization_version", "general.file_type"]
        assert out.metadata["general.file_type"] == 7 and out.metadata["general.quantization_version"] == 2
        r = gguf.GGUFReader(rep.path)
        assert r.fields["u32s"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
        assert r.fields["i8"].types == [gguf.GGUFValueType.INT8] and out.metadata["i8"] == -3
        assert list(out.tensor_info) == ["output_norm.weight", "token_embd.weight", "blk.0.attn_q.bias",
                                         "blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
        assert all(info[2] % 64 == 0 for info in out.tensor_info.values())
        src_t = {t.name: np.array(t.data) for t in gguf.GGUFReader(src).tensors}
        for name in ("output_norm.weight", "blk.0.attn_q.bias"):   # 1-D: copied as they are
            assert out.raw_bytes(name) == src_t[name].tobytes()
        ffn = src_t["blk.0.ffn_down.weight"].astype(np.float32)
        assert out.raw_bytes("blk.0.ffn_down.weight") == _gguf_quantize(ffn, "q8_0").tobytes()   # from f16
        assert {n: i[1].name for n, i in out.tensor_info.items()}["token_embd.weight"] == "q8_0"
    finally:
        out.close()
    assert rep.types["token_embd.weight"] == ("q8_0", "") and rep.bytes_out < rep.bytes_in
    assert not (tmp_path / "out.gguf.part").exists()


@pytest.mark.parametrize("model,src,ftype,like", [("tiny-llama", "q8_0", "Q4_K_M", "q4_k_m"),
                                                  ("tiny-qwen2", "q8_0", "q4_0", "q4_0")])
def test_requantize_vendored_models(tmp_path, model, src, ftype, like):
    """q8_0 -> Q4_K_M / q4_0: llama-quantize's types (the vendored llama.cpp files'), blocks of the
    dequantized q8_0 values, a requantize warning, and the model loads and generates close to the source."""
    path = ROOT / model / f"{model}-{src}.gguf"
    with pytest.warns(qz.RequantizeWarning, match=r"requantizing \d+ tensor\(s\) already in q8_0"):
        rep = qz.quantize(path, tmp_path / "out.gguf", ftype, progress=False)
    assert _types_of(rep.path) == _types_of(ROOT / model / f"{model}-{like}.gguf")
    ty, q8 = _tensor_bytes(path, "blk.0.attn_q.weight")
    deq = gguf.quants.dequantize(q8, QT.Q8_0)
    want_t, got = _tensor_bytes(rep.path, "blk.0.attn_q.weight")
    assert np.array_equal(got, quantize_rows(deq, want_t))
    from models import load
    ids = np.load(ROOT / model / "reference.npz")["p0_ids"]
    ref = load(str(path)).session().forward(ids).numpy()
    m = load(rep.path)
    got = m.session().forward(ids).numpy()
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    toks = list(m.session().generate(ids.tolist(), max_new_tokens=4, stop_on_eos=False))
    assert len(toks) == 4


# Relative RMS error of a weight per block type: a uniform quantizer's step / sqrt(12) on Gaussian blocks
# (q8_0: amax / 127, amax of 32 ~ 2.0 sigma; q4_0: amax / 8; q4_1: range / 15; q6_k: amax of 16 / 32; k-quants
# with mins: sub-block range / 15 or 31), with about 20 % to spare; f16: 2**-11 / sqrt(3) at most.
WEIGHT_RMS = {"f32": 0.0, "f16": 3e-4, "q8_0": 6.5e-3, "q6_k": 0.022, "q5_0": 0.052, "q5_1": 0.047, "q5_k": 0.045,
              "q4_0": 0.105, "q4_1": 0.095, "q4_k": 0.088}
# max |logit error| / max |logit| against the HF f32 logits, per file type, on the untrained tiny-neox
# (N(0, 0.1) weights, small logits; rows of 128, so k-quants fall back to q5_0 / q5_1 / q8_0): about 1.5x
# what the types give there.
LOGIT_REL = {"F32": 1e-3, "F16": 3e-3, "Q8_0": 0.04, "Q6_K": 0.05, "Q5_1": 0.2, "Q5_0": 0.25, "Q5_K_M": 0.2,
             "Q4_1": 0.6, "Q4_0": 0.5, "Q4_K_M": 0.25, "Q4_K_S": 0.25}


@pytest.mark.filterwarnings("ignore::models.quantize.FallbackWarning")
@pytest.mark.parametrize("ftype", list(LOGIT_REL))
def test_round_trip_through_the_loader(tmp_path, ftype):
    from models import load
    src = ROOT / "tiny-neox" / "tiny-neox-seq-f32.gguf"
    rep = qz.quantize(src, tmp_path / "out.gguf", ftype, progress=False)
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(src).tensors}
    for t in gguf.GGUFReader(rep.path).tensors:
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(want[t.name].shape)
        err = np.sqrt(np.mean((got - want[t.name]) ** 2) / np.mean(want[t.name] ** 2))
        bound = WEIGHT_RMS[t.tensor_type.name.lower()]
        assert err <= bound, f"{ftype}: {t.name} ({t.tensor_type.name}) relative RMS error {err:.3g} > {bound}"
    ref = np.load(ROOT / "tiny-neox" / "reference-seq.npz")
    logits = load(rep.path).session().forward(ref["p1_ids"]).numpy()
    err = np.abs(logits - ref["p1_logits"]).max() / np.abs(ref["p1_logits"]).max()
    assert err <= LOGIT_REL[ftype], f"{ftype}: max |logit error| {err:.3g} of the max |logit| > {LOGIT_REL[ftype]}"


def test_progress_bar_and_warnings_for_fallbacks(tmp_path, capsys):
    src = ROOT / "tiny-neox" / "tiny-neox-seq-f32.gguf"
    with pytest.warns(qz.FallbackWarning, match=r"7 of 28 tensors needed a fallback type: .*blk.0.attn_qkv.weight: "
                                                r"row length 128 not a multiple of 256: q5_0 instead of q4_k"):
        rep = qz.quantize(src, tmp_path / "out.gguf", "q4_k_m", progress=True)
    assert "out.gguf (Q4_K_M)" in capsys.readouterr().err   # the bar's description
    fell = [n for n, (ty, note) in rep.types.items() if note]
    assert fell and all("row length 128" in rep.types[n][1] for n in fell)
    assert len(rep.fallbacks) == len(fell) and rep.types["output.weight"] == ("q8_0", "")


FULL = {"tiny-llama": "TENSORGPU_TINY_LLAMA_FULL", "tiny-qwen2": "TENSORGPU_TINY_QWEN2_FULL"}


@pytest.mark.parametrize("model,ftype", [("tiny-llama", "q4_0"), ("tiny-llama", "q4_k_m"),
                                         ("tiny-qwen2", "q4_0"), ("tiny-qwen2", "q4_k_m")])
def test_llama_quantize_file_reproduced_byte_for_byte(tmp_path, model, ftype):
    """Opt-in ($TENSORGPU_TINY_LLAMA_FULL / _QWEN2_FULL: the folders with the f32 sources): the whole
    file llama-quantize wrote from f32 (header, metadata, order, padding, every block)."""
    folder = os.environ.get(FULL[model])
    if not folder or not (Path(folder) / f"{model}-f32.gguf").is_file():
        pytest.skip(f"{FULL[model]} not set (folder with {model}-f32.gguf)")
    out = qz.quantize(Path(folder) / f"{model}-f32.gguf", tmp_path / "out.gguf", ftype, progress=False).path
    assert Path(out).read_bytes() == (Path(folder) / f"{model}-{ftype}.gguf").read_bytes()


@pytest.mark.parametrize("model", list(FULL))
def test_q8_0_from_f32_equals_the_converter(tmp_path, model):
    """Opt-in: llama.cpp's converter wrote the q8_0 files from the same f32 weights; every q8_0 block agrees."""
    folder = os.environ.get(FULL[model])
    if not folder or not (Path(folder) / f"{model}-f32.gguf").is_file():
        pytest.skip(f"{FULL[model]} not set (folder with {model}-f32.gguf)")
    out = qz.quantize(Path(folder) / f"{model}-f32.gguf", tmp_path / "out.gguf", "q8_0", progress=False).path
    conv = {t.name: (t.tensor_type, np.array(t.data))
            for t in gguf.GGUFReader(Path(folder) / f"{model}-q8_0.gguf").tensors}
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == conv[t.name][0] and np.array_equal(np.array(t.data), conv[t.name][1]), t.name


# ----------------------------------------------------------------------------- bad inputs


def _err(capsys, argv):
    rc = qz.main(argv)
    return rc, capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    good = _small_model(tmp_path / "in.gguf")
    cases = [
        ([good, str(tmp_path / "o.gguf"), "q3_x"], "unknown quantization type 'q3_x'; choose one of Q4_0"),
        ([str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "q8_0"], "missing.gguf: No such file"),
        ([good, str(tmp_path / "nodir" / "o.gguf"), "q8_0"], f"folder {tmp_path / 'nodir'} does not exist"),
        ([good, str(tmp_path), "q8_0"], "it is a folder"),
        ([good, good, "q8_0"], "the output would overwrite the input"),
    ]
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"NOPE" + b"\0" * 60)
    cases.append(([str(notgguf), str(tmp_path / "o.gguf"), "q8_0"], "x.gguf: not a GGUF file: magic bytes"))
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(Path(good).read_bytes()[:-100])
    cases.append(([str(trunc), str(tmp_path / "o.gguf"), "q8_0"], "runs past the end of the file"))
    with pytest.raises(GGUFError, match="not a GGUF file"):   # the API raises; the command prints it
        qz.quantize(notgguf, tmp_path / "o.gguf", "q8_0")
    for argv, msg in cases:
        rc, err = _err(capsys, argv)
        assert rc == 2 and msg in err, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("o.gguf*"))


def test_bad_tensors_name_the_tensor(tmp_path, capsys):
    nan = np.zeros((2, 256), np.float32)
    nan[1, 7] = np.nan
    cases = [
        (dict(tensors={"blk.0.attn_k.weight": nan}), "q8_0",
         "tensor 'blk.0.attn_k.weight' holds nan at row 1, column 7: cannot quantize NaN or infinity"),
        (dict(tensors={"blk.0.attn_k.weight": np.concatenate([np.ones((1, 256)), np.full((1, 256), 1e9)]).astype(
            np.float32)}), "q8_0", "tensor 'blk.0.attn_k.weight': block 8 does not fit q8_0 (values too large"),
        (dict(tensors={"blk.0.attn_k.weight": np.full((2, 256), 1e6, np.float32)}), "f16",
         "tensor 'blk.0.attn_k.weight': element 0 does not fit f16"),
        (dict(meta={}), "q8_0", "metadata llama.block_count is missing"),
        (dict(meta={"llama.block_count": 1, "split.count": (2, gguf.GGUFValueType.UINT16)}), "q8_0", "a split GGUF"),
        (dict(tensors={"blk.0.attn_k.weight": np.zeros((2, 48), np.float32)}), "q4_0",
         "'blk.0.attn_k.weight' (ne [48, 2]): row length 48 is not a multiple of the q4_0 block size 32"),
        (dict(tensors={"blk.0.attn_k.weight": (np.zeros((2, 18), np.uint8), QT.IQ4_NL)}), "q8_0",
         "tensor 'blk.0.attn_k.weight' (info #5 at offset"),
    ]
    for i, (kw, ftype, msg) in enumerate(cases):
        src = _small_model(tmp_path / f"bad{i}.gguf", **kw)
        rc, err = _err(capsys, [src, str(tmp_path / "o.gguf"), ftype, "--no-progress"])
        assert rc == 2 and msg in err and err.startswith("error: ") and err.count("\n") == 1, (msg, err)
        assert not list(tmp_path.glob("o.gguf*")), "a failed run left output behind"
    assert "unsupported ggml type IQ4_NL" in err   # the last case: a type tensorgpu cannot decode


def test_interrupt_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(qz, "quantize_rows", stop)
    rc, _ = _err(capsys, [_small_model(tmp_path / "in.gguf"), str(tmp_path / "o.gguf"), "q8_0", "--no-progress"])
    assert rc == 130 and not list(tmp_path.glob("o.gguf*"))


def test_cli_help_usage_and_success(tmp_path, capsys):
    assert qz.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("IN.gguf", "OUT.gguf", "TYPE", "--pure", "Q4_K_M", "Q5_K_M", "Q4_K and Q5_K mean"):
        assert word in out
    assert qz.main(["only-one-arg"]) == 2
    assert "usage:" in capsys.readouterr().err
    src = _small_model(tmp_path / "in.gguf")
    rc, err = _err(capsys, [src, str(tmp_path / "o.gguf"), "Q4_K", "--pure", "--no-progress"])
    assert rc == 0 and "o.gguf: model size =" in err and "quant size =" in err
    assert _types_of(tmp_path / "o.gguf")["blk.0.ffn_down.weight"] == "q4_k"


def test_module_entry_point(tmp_path, repo_root):
    src = _small_model(tmp_path / "in.gguf")
    p = subprocess.run([sys.executable, "-m", "models.quantize", src, str(tmp_path / "o.gguf"), "q5_1"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    types = _types_of(tmp_path / "o.gguf")
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "q5_1"
    assert types["token_embd.weight"] == "q6_k"   # no output.weight: the embedding is the output matrix
    assert struct.unpack("<I", (tmp_path / "o.gguf").read_bytes()[4:8])[0] == 3
