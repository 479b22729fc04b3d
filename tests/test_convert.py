"""HF <-> GGUF conversion: lossless round trips, llama.cpp's layout, clear errors."""

import filecmp
import json
import shutil
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from models.convert import convert, export_hf
from models.gguf_names import gguf_tensor_order, gguf_to_hf_name, hf_to_gguf_name, qkv_gguf_to_hf, qkv_hf_to_gguf
from models.tokenizer import read_gguf_metadata

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-neox"
SEQ = TINY / "tiny-neox-seq-f32.gguf"


def _tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def seq_hf(tmp_path_factory):
    """tiny-neox-seq-f32.gguf exported to an HF folder named like its general.name."""
    return export_hf(SEQ, tmp_path_factory.mktemp("export") / "tiny-neox-seq")


# -- round trips ---------------------------------------------------------------------------

def test_export_writes_an_hf_checkpoint(seq_hf):
    from safetensors.numpy import load_file

    cfg = json.loads((seq_hf / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (128, 2, 4)
    assert cfg["rotary_pct"] == 1.0 and cfg["use_parallel_residual"] is False and cfg["layer_norm_eps"] == 1e-5
    sd = load_file(seq_hf / "model.safetensors")
    src = _tensors(SEQ)
    assert len(sd) == len(src) == 28
    qkv = sd["gpt_neox.layers.0.attention.query_key_value.weight"]
    assert qkv.dtype == np.float32 and qkv.shape == (384, 128)
    # HF rows are per head [q, k, v]; the GGUF's are [all q, all k, all v]
    head_dim = 32
    np.testing.assert_array_equal(qkv[head_dim:2 * head_dim], src["blk.0.attn_qkv.weight"].data[128:128 + head_dim])


def test_round_trip_f32_is_bit_identical(seq_hf, tmp_path, capsys):
    out = convert(seq_hf, tmp_path / "rt.gguf", "f32")  # with the progress bar
    assert "rt.gguf" in capsys.readouterr().err
    a, b = gguf.GGUFReader(SEQ), gguf.GGUFReader(out)
    # general.name comes from the folder name / config _name_or_path, which export_hf sets
    assert list(a.fields) == list(b.fields)
    for k, f in a.fields.items():
        assert f.types == b.fields[k].types, k
        assert f.contents() == b.fields[k].contents(), k
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type == Q.F32 and list(ta.shape) == list(tb.shape)
        assert ta.data.tobytes() == tb.data.tobytes(), ta.name
    assert filecmp.cmp(SEQ, out, shallow=False)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_round_trip_is_byte_identical(tmp_path, kind):
    """Dequantize -> requantize reproduces every Q8_0/Q4_0 block, so the whole file matches."""
    src = TINY / f"tiny-neox-{kind}.gguf"
    hf_dir = export_hf(src, tmp_path / "tiny-neox", tokenizer_json=TINY / "hf" / "tokenizer.json")
    out = convert(hf_dir, tmp_path / f"{kind}.gguf", kind, progress=False)
    assert filecmp.cmp(src, out, shallow=False)


@pytest.mark.parametrize("kind,qtype,ftype", [("q8_0", Q.Q8_0, 7), ("q4_0", Q.Q4_0, 2), ("f16", Q.F16, 1)])
def test_quantization_policy_and_blocks(seq_hf, tmp_path, kind, qtype, ftype):
    out = convert(seq_hf, tmp_path / f"{kind}.gguf", kind, progress=False)
    assert read_gguf_metadata(out)["general.file_type"] == ftype
    ref, got = _tensors(SEQ), _tensors(out)
    assert list(ref) == list(got) == gguf_tensor_order(2)
    for name, t in got.items():
        f32 = np.asarray(ref[name].data)
        if f32.ndim == 2:  # token_embd and output included
            assert t.tensor_type == qtype, name
            np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                                          gguf.quants.quantize(f32, qtype).view(np.uint8).reshape(-1))
        else:  # norms and biases stay F32
            assert t.tensor_type == Q.F32, name
            assert t.data.tobytes() == f32.tobytes()


def test_full_reference_files_byte_identical(full_reference_dir, tmp_path):
    """Opt-in ($TENSORGPU_TINY_NEOX_FULL): the shipped GGUFs are exactly what convert writes."""
    hf_dir = full_reference_dir / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        pytest.skip(f"{hf_dir}/model.safetensors not present")
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        want = full_reference_dir / f"tiny-neox-{kind}.gguf"
        if want.is_file():
            out = convert(hf_dir, tmp_path / f"{kind}.gguf", kind, progress=False, name="tiny-neox")
            assert filecmp.cmp(want, out, shallow=False), kind


# -- names and layout helpers --------------------------------------------------------------

def test_names_match_gguf_tensor_map():
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, 4)
    for name in gguf_tensor_order(4):
        hf = gguf_to_hf_name(name)
        assert hf_to_gguf_name(hf) == name
        assert tmap.get_name(hf, try_suffixes=(".weight", ".bias")) == name
    assert hf_to_gguf_name("lm_head.weight") == "output.weight"
    assert hf_to_gguf_name("gpt_neox.layers.0.attention.rotary_emb.inv_freq") is None


def test_qkv_reorder_is_an_inverse_pair():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    g = qkv_hf_to_gguf(w, n_head=2)
    # HF row block of head h, part p (q/k/v) lands at GGUF block p, head h
    np.testing.assert_array_equal(g.reshape(3, 2, 4, 5)[1, 0], w.reshape(2, 3, 4, 5)[0, 1])
    np.testing.assert_array_equal(qkv_gguf_to_hf(g, 2), w)
    np.testing.assert_array_equal(qkv_gguf_to_hf(qkv_hf_to_gguf(w[:, 0], 2), 2), w[:, 0])
    with pytest.raises(ValueError, match="multiple of 3"):
        qkv_hf_to_gguf(w[:23], 2)


# -- transformers-made checkpoints --------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch not installed (optional)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed (optional)")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
        max_position_embeddings=128, rotary_pct=0.5, rotary_emb_base=20000, use_parallel_residual=True,
        layer_norm_eps=1e-5, tie_word_embeddings=False,
    )
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms/biases so every layout error shows
            p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("hf") / "random-neox"
    model.save_pretrained(d)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / "hf" / fn, d / fn)
    sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    return d, sd, torch


def _check_layout(out, sd, n_head):
    got = _tensors(out)
    assert list(got) == gguf_tensor_order(2)
    for name, t in got.items():
        data = np.asarray(t.data)
        if ".attn_qkv." in name:
            data = qkv_gguf_to_hf(data, n_head)
        hf_name = gguf_to_hf_name(name)
        ref = sd.get(hf_name, sd.get(hf_name.replace("embed_out", "lm_head")))
        np.testing.assert_array_equal(data, ref, err_msg=name)


def test_transformers_checkpoint_layout(hf_model, tmp_path):
    d, sd, _ = hf_model
    out = convert(d, tmp_path / "m.gguf", "f32", progress=False)
    md = read_gguf_metadata(out)
    assert md["gptneox.rope.dimension_count"] == 8  # int(0.5 * 16)
    assert md["gptneox.rope.freq_base"] == 20000.0  # not llama.cpp's default, so written
    assert md["gptneox.feed_forward_length"] == 160 and md["gptneox.context_length"] == 128
    _check_layout(out, sd, n_head=4)


def test_pytorch_bin_and_bf16_checkpoints(hf_model, tmp_path):
    d, sd, torch = hf_model
    from safetensors.torch import save_file

    pt = tmp_path / "pt"
    pt.mkdir()
    for fn in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / fn, pt / fn)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt / "pytorch_model.bin")
    _check_layout(convert(pt, tmp_path / "pt.gguf", "f32", progress=False), sd, 4)

    bf = tmp_path / "bf16"
    bf.mkdir()
    for fn in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(d / fn, bf / fn)
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fn, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, bf / fn, metadata={"format": "pt"})
    (bf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fn for fn, keys in shards.items() for k in keys}}))
    sd_bf = {k: v.float().numpy() for k, v in tensors.items()}
    _check_layout(convert(bf, tmp_path / "bf.gguf", "f32", progress=False), sd_bf, 4)


def test_rows_not_divisible_by_block_fall_back_to_f16(tmp_path):
    """As in llama.cpp's converter: a weight whose rows don't split into 32-blocks becomes F16."""
    from safetensors.numpy import save_file

    d = tmp_path / "odd-ff"
    d.mkdir()
    e, ff, v = 64, 48, 4096
    rng = np.random.default_rng(0)
    shapes = {"gpt_neox.embed_in.weight": (v, e), "embed_out.weight": (v, e),
              "gpt_neox.final_layer_norm.weight": (e,), "gpt_neox.final_layer_norm.bias": (e,)}
    for suffix, shape in {"input_layernorm.weight": (e,), "input_layernorm.bias": (e,),
                          "post_attention_layernorm.weight": (e,), "post_attention_layernorm.bias": (e,),
                          "attention.query_key_value.weight": (3 * e, e), "attention.query_key_value.bias": (3 * e,),
                          "attention.dense.weight": (e, e), "attention.dense.bias": (e,),
                          "mlp.dense_h_to_4h.weight": (ff, e), "mlp.dense_h_to_4h.bias": (ff,),
                          "mlp.dense_4h_to_h.weight": (e, ff), "mlp.dense_4h_to_h.bias": (e,)}.items():
        shapes[f"gpt_neox.layers.0.{suffix}"] = shape
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, d / "model.safetensors")
    cfg = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": v, "hidden_size": e, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": ff, "max_position_embeddings": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TINY / "hf" / "tokenizer.json", d / "tokenizer.json")
    with pytest.warns(UserWarning, match="ffn_down.*F16"):
        out = convert(d, tmp_path / "odd.gguf", "q4_0", progress=False)
    types = {n: t.tensor_type for n, t in _tensors(out).items()}
    assert types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == Q.Q4_0
    md = read_gguf_metadata(out)
    assert md["general.name"] == "odd-ff" and md["gptneox.rope.dimension_count"] == 8  # default rotary_pct 0.25
    assert "tokenizer.ggml.padding_token_id" not in md  # no tokenizer_config.json


# -- bad input -----------------------------------------------------------------------------

def _copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _drop_tensor(path: Path, name: str):
    """Rewrite a safetensors file without one tensor (header-only surgery, no torch)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    del header[name]
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_missing_config(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)


def test_wrong_architecture(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)


def test_transformers5_rope_parameters(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "tiny-neox-seq")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rotary_pct"], cfg["rotary_emb_base"]  # transformers 5 writes only rope_parameters
    (d / "config.json").write_text(json.dumps(cfg))
    assert filecmp.cmp(convert(d, tmp_path / "a.gguf", "f32", progress=False), SEQ, shallow=False)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}
    (d / "config.json").write_text(json.dumps(cfg))
    md = read_gguf_metadata(convert(d, tmp_path / "b.gguf", "f32", progress=False))
    assert md["gptneox.rope.dimension_count"] == 16 and md["gptneox.rope.freq_base"] == 500000.0
    cfg["rotary_pct"] = 0.25
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rotary_pct.*partial_rotary_factor"):
        convert(d, tmp_path / "c.gguf", "f32", progress=False)
    cfg["rope_parameters"]["rope_type"] = "linear"
    del cfg["rotary_pct"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="linear"):
        convert(d, tmp_path / "c.gguf", "f32", progress=False)


def test_missing_config_key(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["intermediate_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="intermediate_size"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)


def test_missing_tensor_leaves_no_output(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "m")
    _drop_tensor(d / "model.safetensors", "gpt_neox.layers.1.mlp.dense_4h_to_h.bias")
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=r"gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        convert(d, out, "q8_0", progress=False)
    assert list(tmp_path.glob("x.gguf*")) == []


def test_unexpected_tensor_and_shape_mismatch(seq_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy_hf(seq_hf, tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "gpt_neox.layers.0.mlp.gate.weight": np.zeros((2, 2), np.float32)}, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"gpt_neox\.layers\.0\.mlp\.gate\.weight"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)
    sd["gpt_neox.final_layer_norm.weight"] = np.zeros(64, np.float32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"final_layer_norm\.weight.*\(64,\).*\(128,\)"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)


def test_missing_files(seq_hf, tmp_path):
    d = _copy_hf(seq_hf, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)
    d = _copy_hf(seq_hf, tmp_path / "n")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)
    with pytest.raises(ValueError, match="q5_k"):
        convert(seq_hf, tmp_path / "x.gguf", "q5_k", progress=False)


def test_pytorch_bin_needs_torch(seq_hf, tmp_path, monkeypatch):
    d = _copy_hf(seq_hf, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # never opened: the import fails first
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch"):
        convert(d, tmp_path / "x.gguf", "f32", progress=False)


def test_export_rejects_other_architectures(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'llama'"):
        export_hf(p, tmp_path / "out")
