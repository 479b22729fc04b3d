"""`python -m models convert` of Hugging Face Llama / Qwen2 checkpoints. The checkpoints are not
shipped, so each test builds one from a vendored GGUF: config.json, model.safetensors holding the
file's dequantized weights with the Q/K permutation undone (what transformers' GGUF loader
does), and tokenizer.json / tokenizer_config.json of its tokenizer; then converts it back."""
import json
from pathlib import Path

import numpy as np
import pytest

import llama_ref
import tensorgpu as tg
from models import load
from models.cli import main
from models.convert import convert
from models.convert_llama import permute_qk, unpermute_qk
from models.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata

ROOT = Path(__file__).resolve().parent.parent / "models"
_HF_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def build_hf(name: str, out: Path) -> Path:
    """An HF checkpoint folder equivalent to models/<name>/<name>-q8_0.gguf."""
    from safetensors.numpy import save_file
    src = ROOT / name / f"{name}-q8_0.gguf"
    cfg, w = llama_ref.load(str(src))
    md = read_gguf_metadata(src)
    arch, H, Hkv = cfg["arch"], cfg["n_head"], cfg["n_head_kv"]
    sd = {}
    for k, a in w.items():
        a = a.astype(np.float32)
        if k.startswith("blk."):
            _, i, mod, kind = k.split(".")
            if arch == "llama" and mod in ("attn_q", "attn_k"):
                a = unpermute_qk(a, H if mod == "attn_q" else Hkv)
            sd[f"model.layers.{i}.{_HF_NAMES[mod]}.{kind}"] = a
        else:
            sd[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[k]] = a
    out.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(out / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
              "model_type": arch, "hidden_size": md[f"{arch}.embedding_length"], "num_attention_heads": H,
              "num_key_value_heads": Hkv, "num_hidden_layers": cfg["n_layer"],
              "intermediate_size": md[f"{arch}.feed_forward_length"],
              "max_position_embeddings": md[f"{arch}.context_length"], "vocab_size": 4096,
              "rms_norm_eps": float(np.float32(cfg["eps"])), "rope_theta": cfg["rope_base"],
              "tie_word_embeddings": "output.weight" not in w}
    (out / "config.json").write_text(json.dumps(config))
    tok = tokenizer_from_gguf_metadata(md)
    (out / "tokenizer.json").write_text(tok.hf.to_str())
    name_of = lambda i: None if i is None else tok.id_to_token(i)           # noqa: E731
    tc = {"bos_token": name_of(tok.bos_id), "eos_token": name_of(tok.eos_id), "unk_token": name_of(tok.unk_id),
          "pad_token": name_of(tok.pad_id), "add_bos_token": tok.add_bos,
          "add_eos_token": tok.add_eos}
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tc.items() if v is not None}))
    return out


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def hf(request, tmp_path_factory):
    return request.param, build_hf(request.param, tmp_path_factory.mktemp("hf") / request.param)


def test_permutation_is_llama_cpps():
    """permute_qk is convert_hf_to_gguf.py's LlamaModel.permute, unpermute_qk its inverse."""
    w = np.arange(2 * 8 * 3).reshape(16, 3)
    p = permute_qk(w, 2)
    want = w.reshape(2, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)
    np.testing.assert_array_equal(p, want)
    assert list(p[:4, 0]) == [0, 12, 3, 15]           # head 0: rows 0, 4, 1, 5 (x3): pairs (i, i + 4)
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)


def test_f32_round_trip_is_exact(hf, tmp_path):
    """Every tensor comes back bit for bit (the Q/K permutation redone), and the metadata and the
    tokenizer (tokens, scores, types, specials, chat template) equal the original file's."""
    name, d = hf
    out = convert(d, tmp_path / "rt.gguf", "f32", progress=False)
    _, src = llama_ref.load(str(ROOT / name / f"{name}-q8_0.gguf"))
    _, got = llama_ref.load(str(out))
    assert sorted(got) == sorted(src)
    for k in src:
        np.testing.assert_array_equal(got[k], src[k].astype(np.float32), err_msg=k)
    a, b = read_gguf_metadata(ROOT / name / f"{name}-q8_0.gguf"), read_gguf_metadata(out)
    for k, v in a.items():
        if (k.startswith(("tokenizer.", "general.architecture")) and not k.endswith("add_sep_token")) or (
                k.split(".", 1)[1] in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                                       "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                                       "attention.layer_norm_rms_epsilon", "vocab_size") and k in b):
            assert b.get(k) == v, k


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_converted_files_load_and_match_numpy(hf, tmp_path, kind):
    name, d = hf
    out = convert(d, tmp_path / f"{kind}.gguf", kind, progress=False)
    m = load(out)
    assert m.config.arch == ("llama" if name == "tiny-llama" else "qwen2")
    want_type = {"f16": tg.float16, "q8_0": tg.q8_0, "q4_0": tg.q4_0}[kind]
    assert m.blk[0].attn_q.weight.dtype is want_type and m.output_norm.weight.dtype is tg.float32
    ids = np.load(ROOT / name / "reference.npz")["p2_ids"]
    want = llama_ref.forward(str(out), ids)
    got = m.session(cache_dtype=tg.float32).forward(ids).numpy()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # and the converted model is the original one, up to the requantization
    orig = llama_ref.forward(str(ROOT / name / f"{name}-q8_0.gguf"), ids)
    # (q4_0 quantizes every matrix, the LM head included, a second time: looser)
    diff = np.abs(want - orig)
    assert diff.max() <= (0.05 if kind != "q4_0" else 2.0) and diff.mean() <= (0.01 if kind != "q4_0" else 0.2)


def test_cli_convert_and_generate(hf, tmp_path, capsys):
    name, d = hf
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(d), str(out), "--type", "q8_0", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "In the beginning", "-n", "4", "--no-warmup"]) == 0
    text = capsys.readouterr().out
    # the continuation keeps its leading space (a stream continues the prompt)
    assert text.startswith("In the beginning ") and len(text.strip()) > len("In the beginning")


def test_bad_checkpoints(hf, tmp_path):
    name, d = hf
    cfg = json.loads((d / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match="num_key_value_heads 3 does not divide num_attention_heads 4"):
        convert(bad, tmp_path / "x.gguf", "f32", progress=False)
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        convert(bad, tmp_path / "x.gguf", "f32", progress=False)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="does not fit a 1-layer"):
        convert(bad, tmp_path / "x.gguf", "f32", progress=False)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()
