"""Tokenizers of the LLaMA-family files: SentencePiece ('llama') and byte-level BPE with the
pre-tokenizer tokenizer.ggml.pre names ('gpt2'), against the ids transformers produced for 32
strings per model (English, code, spaces, tabs, CRLF, digits, accents, CJK, emoji, empty), and
the chat template rendered as HF's apply_chat_template renders it. No GPU needed."""
import json
import warnings
from pathlib import Path

import pytest

from models.chat import TemplateError, render_chat_template
from models.tokenizer import SPMTokenizer, Tokenizer, read_gguf_metadata, tokenizer_from_gguf_metadata

ROOT = Path(__file__).resolve().parent.parent / "models"
MODELS = ["tiny-llama", "tiny-qwen2"]


@pytest.fixture(scope="module")
def mds():
    return {m: read_gguf_metadata(ROOT / m / f"{m}-q8_0.gguf") for m in MODELS}


@pytest.fixture(scope="module")
def toks(mds):
    return {m: tokenizer_from_gguf_metadata(md) for m, md in mds.items()}


def cases(name):
    return json.loads((ROOT / name / "reference.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", MODELS)
def test_ids_match_transformers(toks, name):
    tok, ref = toks[name], cases(name)
    assert isinstance(tok, SPMTokenizer if name == "tiny-llama" else Tokenizer)
    assert len(ref["tokenizer"]) == 32
    for c in ref["tokenizer"]:
        assert tok.encode(c["text"]) == c["ids"], repr(c["text"])
        assert tok.encode(c["text"], add_bos=False) == c["ids_no_special"], repr(c["text"])
    for p in ref["prompts"]:
        assert tok.encode(p["prompt"]) == p["ids"]


@pytest.mark.parametrize("name", MODELS)
def test_decode_round_trip_and_stream(toks, name):
    tok = toks[name]
    for c in cases(name)["tokenizer"]:
        s, ids = c["text"], tok.encode(c["text"])
        assert tok.decode(ids, skip_special=True) == s
        assert tok.decode(tok.encode(s, add_bos=False)) == s
        sd = tok.decode_stream(skip_special=True, at_start=True)
        assert "".join(sd.step(i) for i in ids) + sd.flush() == s, repr(s)
        assert "".join(tok.decode_iter(ids, skip_special=True)) == s


def test_spm_details(toks):
    tok = toks["tiny-llama"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos, tok.add_space_prefix) == (1, 2, True, False, True)
    ids = tok.encode("\U0001F600")                    # no piece covers the emoji: 4 UTF-8 byte tokens
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(ids) == "<s>\U0001F600"          # control tokens spelled unless skip_special
    assert tok.encode("<s>hi</s>", add_bos=False)[0] == 1 and tok.encode("<s>hi</s>", add_bos=False)[-1] == 2
    assert 1 not in tok.encode("<s>hi", add_bos=False, parse_special=False)
    assert tok.encode("") == [1]


def test_stream_continues_a_prompt(toks):
    """Generation streams a continuation: its first piece keeps its space (llama.cpp's
    token_to_piece), unlike decode() of a whole text."""
    tok = toks["tiny-llama"]
    ids = tok.encode("the LORD", add_bos=False)            # "▁the", "▁LORD"
    sd = tok.decode_stream()
    assert "".join(sd.step(i) for i in ids) == " the LORD" and tok.decode(ids) == "the LORD"


def test_spm_without_space_prefix(mds):
    tok = tokenizer_from_gguf_metadata({**mds["tiny-llama"], "tokenizer.ggml.add_space_prefix": False})
    assert tok.id_to_token(tok.encode("Hello", add_bos=False)[0])[0] != "\u2581"
    assert tok.decode(tok.encode(" Hello", add_bos=False)) == " Hello"


def test_pre_tokenizer_follows_tokenizer_ggml_pre(mds):
    md = mds["tiny-qwen2"]

    def split(pre):
        t = tokenizer_from_gguf_metadata({**md, "tokenizer.ggml.pre": pre})
        return [p for p, _ in t.hf.pre_tokenizer.pre_tokenize_str("12345 don't\n\n x")]
    assert split("qwen2")[:5] == ["1", "2", "3", "4", "5"]         # Qwen2: single digits
    assert split("llama-bpe")[:2] == ["123", "45"]                  # Llama 3: up to 3 digits
    assert split("gpt-2")[0] == "12345" and split("default")[0] == "12345"   # GPT-2: one run
    assert split("llama-bpe") != split("gpt-2")


def test_unknown_pre_tokenizer_warns(mds):
    with pytest.warns(UserWarning, match="tokenizer.ggml.pre 'mystery-bpe' is not a known pre-tokenizer"):
        t = tokenizer_from_gguf_metadata({**mds["tiny-qwen2"], "tokenizer.ggml.pre": "mystery-bpe"})
    assert t.decode(t.encode("still works")) == "still works"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer_from_gguf_metadata(mds["tiny-qwen2"])             # a known one does not warn


def test_unsupported_tokenizer_model(mds):
    with pytest.raises(ValueError, match="'bert'.*llama, gpt2"):
        tokenizer_from_gguf_metadata({**mds["tiny-qwen2"], "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores"):
        tokenizer_from_gguf_metadata({k: v for k, v in mds["tiny-llama"].items() if k != "tokenizer.ggml.scores"})


# ----------------------------------------------------------------------------- chat templates

MESSAGES = [{"role": "user", "content": "Who wrote the Psalms?"},
            {"role": "assistant", "content": "David, mostly."},
            {"role": "user", "content": "And Ecclesiastes?"}]


def test_qwen2_chat_template(toks):
    tok = toks["tiny-qwen2"]
    assert tok.chat_template == (ROOT / "tiny-qwen2" / "hf" / "chat_template.jinja").read_text()
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWho wrote the Psalms?<|im_end|>\n"
                    "<|im_start|>assistant\nDavid, mostly.<|im_end|>\n"
                    "<|im_start|>user\nAnd Ecclesiastes?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.apply_chat_template(MESSAGES[:1], tokenize=True)
    assert ids[0] == 4094 and ids.count(4095) == 2     # <|im_start|>, <|im_end|> are single special ids
    system = [{"role": "system", "content": "Be brief."}] + MESSAGES[:1]
    assert tok.apply_chat_template(system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_template_variables_and_raise_exception(toks):
    tmpl = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('roles must be user/assistant') }}{% endif %}"
            "[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
    tok = toks["tiny-llama"]
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    out = tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, template=tmpl)
    assert out == "<s>[user] Who wrote the Psalms?</s>\n[assistant] David, mostly.</s>\n[assistant]"
    with pytest.raises(TemplateError, match="roles must be user/assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], template=tmpl)
    # HF's environment: trim_blocks / lstrip_blocks, loop controls, tojson keeping non-ASCII
    t2 = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m | tojson }}\n{% endfor %}"
    assert render_chat_template(t2, [{"role": "user", "content": "é"}, {"role": "x", "content": "y"}]) == \
        '{"role": "user", "content": "é"}\n'
    with pytest.raises(TemplateError, match="does not compile"):
        render_chat_template("{% for %}", MESSAGES)
