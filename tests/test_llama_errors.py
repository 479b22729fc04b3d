"""LLaMA-family loading: a small random Llama-3.1-style file (MQA, rope_freqs, freq_base 5e5)
computed against the NumPy reference, and every kind of bad file refused with a ModelError that
names the file and the field, leaving nothing on the GPU."""
import gc

import numpy as np
import pytest

import llama_ref
import tensorgpu as tg
from models import load
from models.base import ModelError
from models.llama import Llama

C, H, HKV, F, V, L = 32, 4, 1, 64, 64, 2
D = C // H


def parts(arch="llama"):
    rng = np.random.default_rng(11)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)       # noqa: E731
    md = {"general.architecture": arch, f"{arch}.block_count": L, f"{arch}.context_length": 64,
          f"{arch}.embedding_length": C, f"{arch}.feed_forward_length": F, f"{arch}.attention.head_count": H,
          f"{arch}.attention.head_count_kv": HKV, f"{arch}.rope.freq_base": 500000.0,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-5}
    t = {"token_embd.weight": r(V, C), "output_norm.weight": 1 + r(C), "output.weight": r(V, C),
         "rope_freqs.weight": np.linspace(1, 8, D // 2).astype(np.float32)}
    for i in range(L):
        t.update({f"blk.{i}.attn_norm.weight": 1 + r(C), f"blk.{i}.attn_q.weight": r(H * D, C),
                  f"blk.{i}.attn_k.weight": r(HKV * D, C), f"blk.{i}.attn_v.weight": r(HKV * D, C),
                  f"blk.{i}.attn_output.weight": r(C, H * D), f"blk.{i}.ffn_norm.weight": 1 + r(C),
                  f"blk.{i}.ffn_gate.weight": r(F, C), f"blk.{i}.ffn_up.weight": r(F, C),
                  f"blk.{i}.ffn_down.weight": r(C, F)})
    return md, t


def write(tmp_path, md, tensors, name="m.gguf"):
    path = tmp_path / name
    tg.save_gguf(path, tensors, md)
    return path


def refused(path, match):
    """load(path) raises ModelError matching `match` and naming the file; no device bytes stay."""
    gc.collect()
    before = tg.debug.stats()["live_bytes"]
    with pytest.raises(ModelError, match=match) as e:
        load(path)
    assert str(path) in str(e.value)
    del e
    gc.collect()
    assert tg.debug.stats()["live_bytes"] <= before + 4096, "a failed load left tensors on the device"


def test_random_llama31_style_model_matches_numpy(tmp_path):
    """Multi-query attention (1 KV head for 4), rope_freqs frequency factors, freq_base 5e5,
    normal rope: against the float64 NumPy forward of the same file, prompt then decode."""
    path = write(tmp_path, *parts())
    m = load(path)
    assert isinstance(m, Llama) and m.freq_factors is not None and m.config.n_head_kv == 1
    ids = np.array([3, 17, 5, 60, 2, 2, 9, 33, 41, 0, 7], np.int32)
    want = llama_ref.forward(str(path), ids)
    s = m.session(cache_dtype=tg.float32)
    got = np.concatenate([s.forward(ids[:8]).numpy()] + [s.forward(ids[i:i + 1]).numpy() for i in range(8, 11)])
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    # without the factors the answer really differs (the test would notice them being ignored)
    md, t = parts()
    del t["rope_freqs.weight"]
    assert np.abs(llama_ref.forward(str(write(tmp_path, md, t, "noff.gguf")), ids) - want).max() > 1e-3


def test_linear_rope_scaling(tmp_path):
    md, t = parts()
    del t["rope_freqs.weight"]
    md.update({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    m = load(write(tmp_path, md, t))
    np.testing.assert_array_equal(m.freq_factors, np.full(D // 2, 4.0, np.float32))


def test_missing_metadata_key(tmp_path):
    md, t = parts()
    del md["llama.attention.layer_norm_rms_epsilon"], md["llama.block_count"]
    refused(write(tmp_path, md, t), "llama.block_count.*llama.attention.layer_norm_rms_epsilon")


def test_missing_tensor(tmp_path):
    md, t = parts()
    del t["blk.1.ffn_gate.weight"]
    refused(write(tmp_path, md, t), "missing required tensor.*blk.1.ffn_gate.weight")


def test_qwen2_needs_its_biases(tmp_path):
    md, t = parts("qwen2")
    refused(write(tmp_path, md, t), "missing required tensor.*blk.0.attn_q.bias")


def test_wrong_shape(tmp_path):
    md, t = parts()
    t["blk.0.attn_k.weight"] = t["blk.0.attn_k.weight"][:4]
    refused(write(tmp_path, md, t), r"blk.0.attn_k.weight is \(4, 32\).*expected \(8, 32\)")


def test_head_count_does_not_divide(tmp_path):
    md, t = parts()
    refused(write(tmp_path, {**md, "llama.attention.head_count": 3, "llama.attention.head_count_kv": 3}, t),
            "llama.embedding_length 32 is not divisible by llama.attention.head_count 3")


def test_head_count_kv_does_not_divide(tmp_path):
    md, t = parts()
    refused(write(tmp_path, {**md, "llama.attention.head_count_kv": 3}, t),
            "llama.attention.head_count_kv 3 does not divide llama.attention.head_count 4")


def test_unknown_rope_type(tmp_path):
    md, t = parts()
    refused(write(tmp_path, {**md, "llama.rope.scaling.type": "yarn"}, t), "llama.rope.scaling.type 'yarn'")


def test_unknown_tokenizer_model(tmp_path):
    md, t = parts()
    md.update({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": [f"t{i}" for i in range(V)]})
    refused(write(tmp_path, md, t), "tokenizer.ggml.model is 'bert'")


def test_vocab_size_mismatch(tmp_path):
    md, t = parts()
    refused(write(tmp_path, {**md, "llama.vocab_size": V + 1}, t, "a.gguf"),
            "llama.vocab_size 65 does not match token_embd.weight's 64 rows")
    md.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [chr(0x100 + i) for i in range(V + 5)] +
               [chr(0x100) + chr(0x101)],
               "tokenizer.ggml.merges": [chr(0x100) + " " + chr(0x101)]})
    refused(write(tmp_path, md, t, "b.gguf"), "tokenizer has 70 tokens.*only 64 rows")
    md["tokenizer.ggml.merges"] = [chr(0x101) + " " + chr(0x102)]
    refused(write(tmp_path, md, t, "c.gguf"), r"tokenizer.ggml.merges\[0\].*merged token is not in")


@pytest.mark.parametrize("key,value", [("block_count", 0xFFFFFFFF), ("attention.head_count", 0),
                                       ("context_length", 1 << 40), ("attention.layer_norm_rms_epsilon", -1.0),
                                       ("rope.freq_base", float("nan")), ("feed_forward_length", "64")])
def test_metadata_numbers_are_range_checked(tmp_path, key, value):
    """A block_count of 0xFFFFFFFF fails before any per-layer structure is built."""
    md, t = parts()
    refused(write(tmp_path, {**md, f"llama.{key}": value}, t), f"llama.{key}")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    md, t = parts()
    md = {k.replace("llama.", "falcon."): v for k, v in md.items()}
    md["general.architecture"] = "falcon"
    refused(write(tmp_path, md, t), r"'falcon' is not supported; supported architectures: gptneox, llama, qwen2")
