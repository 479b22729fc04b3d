"""The GGUF-driven tokenizer must give the ids transformers gives, and decode byte-exactly."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.tokenizer import Tokenizer, bytes_to_unicode, read_gguf_metadata

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-neox"
GGUF = TINY / "tiny-neox-q8_0.gguf"

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def md():
    return read_gguf_metadata(GGUF)


@pytest.fixture(scope="module")
def tok(md):
    return Tokenizer.from_gguf_metadata(md)


@pytest.fixture(scope="module")
def hf():
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(TINY / "hf" / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference():
    return np.load(TINY / "reference.npz")


# -- against the shipped reference ----------------------------------------------------

def test_metadata_fields(tok):
    assert tok.vocab_size == 4096 == len(tok)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (0, 0, 0, 1)
    assert not tok.add_bos and not tok.add_eos
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.id_to_token(261) == "\u0120the"
    assert tok.token_to_id("\u0120the") == 261
    assert tok.is_special(0) and tok.is_special(1) and not tok.is_special(2)


def test_prompts_match_reference(tok, reference):
    prompts = json.loads((TINY / "reference.json").read_text(encoding="utf-8"))["prompts"]
    assert len(prompts) == 3
    for i, p in enumerate(prompts):
        ids = tok.encode(p["prompt"])
        assert ids == reference[f"p{i}_ids"].tolist()
        assert [tok.id_to_token(j) for j in ids] == p["tokens"]
        assert tok.decode(ids) == p["prompt"]


def test_heldout_ids(tok, reference):
    text = (TINY / "heldout.txt").read_text(encoding="utf-8")
    ids = tok.encode(text)
    want = reference["heldout_ids"].tolist()
    assert len(want) == 8192
    assert ids[:8192] == want
    assert tok.decode(ids) == text


def test_greedy_text_decodes_byte_exact(tok, reference):
    prompts = json.loads((TINY / "reference.json").read_text(encoding="utf-8"))["prompts"]
    for i, p in enumerate(prompts):
        assert tok.decode(reference[f"p{i}_greedy_ids"].tolist()) == p["greedy_text"]


# -- property tests --------------------------------------------------------------------

ODD = ["\t", "\n", "\r", "\r\n", " ", "  ", "\u00a0", "\u2028", "\u3000", "\ufeff", "\u200d", "\x00", "\x0b",
       "e\u0301", "\U0001F999", "\U0001F469\u200d\U0001F4BB", "\U0001F1E9\U0001F1EA", "\u4f60\u597d", "'s", "'ll",
       "33333", "...", "<|endoftext|>", "<|padding|>", "<|endoftext", "|>"]
texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(ODD)), max_size=12).map("".join)


@SETTINGS
@given(s=texts)
def test_decode_encode_round_trip(tok, s):
    assert tok.decode(tok.encode(s)) == s


@SETTINGS
@given(s=texts)
def test_agrees_with_hf_tokenizer_json(tok, hf, s):
    assert tok.encode(s) == hf.encode(s, add_special_tokens=False).ids


@SETTINGS
@given(ids=st.lists(st.integers(0, 4095), max_size=24))
def test_decode_agrees_with_hf(tok, hf, ids):
    # includes invalid UTF-8 (lone continuation bytes, cut sequences) -> U+FFFD placement
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)


@SETTINGS
@given(ids=st.lists(st.integers(0, 4095), max_size=24))
def test_stream_equals_decode_on_any_ids(tok, ids):
    assert "".join(tok.decode_iter(ids)) == tok.decode(ids)


def test_parse_special_off_tokenizes_as_text(tok, hf):
    s = "a<|endoftext|>b"
    assert 0 in tok.encode(s)
    plain = tok.encode(s, parse_special=False)
    assert 0 not in plain and tok.decode(plain) == s


# -- streaming -------------------------------------------------------------------------

def test_stream_waits_for_complete_characters(tok):
    s = "na\u00efve \U0001F999 caf\u00e9 \u4f60\u597d\u4e16\u754c \U0001F469\u200d\U0001F4BB!"
    ids = tok.encode(s)
    # the model's vocabulary splits these characters over several byte tokens
    assert any(tok.decode([i]) == "\ufffd" for i in ids)
    sd = tok.decode_stream()
    pieces = [sd.step(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == s
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # at least one step held back an incomplete character
    assert list(tok.decode_iter(ids)) == [p for p in pieces if p]


def test_stream_flush_reports_truncated_character(tok):
    ids = tok.encode("\U0001F999")
    assert len(ids) > 1
    sd = tok.decode_stream()
    assert [sd.step(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert sd.flush() == "\ufffd"


# -- configuration and errors -------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["  ", "\u0120\u0120"])
def test_user_defined_tokens_match_hf_added_tokens(md, spelling):
    """llama.cpp stores HF's non-special added tokens as USER_DEFINED, usually as raw text."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    t = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + [spelling, "<tab>"],
                                      "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"] + [4, 4]})
    hf = HFTokenizer.from_file(str(TINY / "hf" / "tokenizer.json"))
    hf.add_tokens([AddedToken("  ", normalized=False), AddedToken("<tab>", normalized=False)])
    for s in ["a  b   c<tab>x", "  \n   hello  "]:
        ids = t.encode(s)
        assert ids == hf.encode(s, add_special_tokens=False).ids and 4096 in ids
        assert t.decode(ids) == s


def test_numpy_typed_metadata(md):
    """A loader may hand back numpy arrays and scalars instead of lists and ints."""
    t = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.token_type": np.array(md["tokenizer.ggml.token_type"]),
                                      "tokenizer.ggml.bos_token_id": np.uint32(0),
                                      "tokenizer.ggml.add_bos_token": np.bool_(True)})
    assert t.encode("x")[0] == 0 and t.is_special(1)


def test_add_bos_and_eos_from_metadata(md):
    t = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.add_bos_token": True,
                                      "tokenizer.ggml.add_eos_token": True})
    ids = t.encode("hello")
    assert ids[0] == 0 and ids[-1] == 0 and len(ids) >= 3
    assert t.encode("hello", add_bos=False, add_eos=False) == ids[1:-1]


def test_missing_optional_keys(md):
    keep = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    t = Tokenizer.from_gguf_metadata({k: md[k] for k in keep})
    assert t.bos_id is None and t.eos_id is None and not t.add_bos
    assert t.encode("In the beginning") == Tokenizer.from_gguf_metadata(md).encode("In the beginning")
    with pytest.raises(ValueError, match="bos_token_id"):
        t.encode("x", add_bos=True)


def test_wrong_model_is_named(md):
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.model": "llama"})


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_key_is_named(md, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Tokenizer.from_gguf_metadata({k: v for k, v in md.items() if k != key})


def test_unknown_pre_tokenizer_warns(md):
    """llama.cpp names the pre-tokenizer it does not know; we warn and split as GPT-2 does."""
    with pytest.warns(UserWarning, match="'not-a-pre'"):
        t = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": "not-a-pre"})
    assert t.encode("In the beginning") == Tokenizer.from_gguf_metadata(md).encode("In the beginning")


def test_inconsistent_metadata(md):
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ValueError, match="4096"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.eos_token_id": 4096})
    with pytest.raises(ValueError, match="merges"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.merges": ["abc"]})


@pytest.mark.parametrize("bad", [4096, -1, 10**9])
def test_bad_ids(tok, bad):
    with pytest.raises(ValueError, match=rf"{bad}.*vocab size 4096"):
        tok.decode([5, bad])
    with pytest.raises(ValueError, match=rf"{bad}.*vocab size 4096"):
        tok.id_to_token(bad)
    with pytest.raises(ValueError, match=rf"{bad}.*vocab size 4096"):
        tok.decode_stream().step(bad)


def test_numpy_ids_and_non_ints(tok):
    ids = np.array(tok.encode("numpy ids"), dtype=np.int32)
    assert tok.decode(ids) == "numpy ids"
    with pytest.raises(ValueError, match="not an integer"):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_byte_table_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "\u0120"
