"""The OpenAI protocol layer (models/serve/protocol.py) without a server or a GPU: the HTTP
layer accepts exactly the sampling values the engine accepts, errors name the field as the
client spelled it, and chat requests map to what the template and the sampler need."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.serve.params import ParamError, SamplingParams
from models.serve.protocol import (ApiError, CompletionRequest, chat_messages, end_of_turn_ids, logprobs_k,
                                   parse_request, requested_max_tokens, sampling_kwargs, token_str)
from models.tokenizer import read_gguf_metadata, tokenizer_from_gguf_metadata
from serve_util import TINY_NEOX, TINY_QWEN2

VOCAB = 4096
NUMBERS = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.sampled_from([0, 1, -1, 2, -2, 0.5, 1e-9, 100, 100.5, 2**63, 2**64, -2**63 - 1, 21, 20]))
FIELDS = ["temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "frequency_penalty",
          "presence_penalty", "max_tokens", "logprobs"]


def engine_accepts(field, value) -> bool:
    """What SamplingParams.check says of the value the HTTP layer would pass on (an int where
    the engine wants one; top_k -1 is OpenAI-compatible "off", i.e. the engine's 0)."""
    if field == "top_k" and value == -1:
        value = 0
    try:
        SamplingParams(**{field: value}).check(VOCAB)
    except ParamError as e:
        assert e.param == field
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=NUMBERS)
def test_http_layer_accepts_exactly_what_the_engine_accepts(field, value):
    body = json.dumps({"prompt": "x", field: value}).encode()
    try:
        req = parse_request(body, "completions")
    except ApiError as e:
        assert e.status == 400 and e.param == field, (e.param, e.message)
        assert field in e.message
        # what the engine would refuse, or a float where OpenAI wants an integer
        int_field = field in ("top_k", "seed", "max_tokens", "logprobs")
        assert not engine_accepts(field, value) or (int_field and isinstance(value, float)), (field, value)
        return
    kw = sampling_kwargs(req)
    params = SamplingParams(max_tokens=requested_max_tokens(req), seed=req.seed, **kw)
    params.check(VOCAB)                                    # never a 500 later
    if field in ("max_tokens", "seed"):
        assert getattr(params, field) == value
    elif field == "logprobs":
        assert params.logprobs == value
    elif field == "top_k":
        assert params.top_k == (0 if value == -1 else value)
    else:                                                  # a float field: the JSON number as a float
        assert getattr(params, field) == float(value) and math.isfinite(getattr(params, field))


def test_defaults_follow_openai():
    req = parse_request(b'{"prompt": "x"}', "completions")
    p = SamplingParams(max_tokens=requested_max_tokens(req), **sampling_kwargs(req))
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.logprobs) == (16, 1.0, 1.0, 0, 0.0, None)
    chat = parse_request(b'{"messages": [{"role": "user", "content": "x"}]}', "chat")
    assert requested_max_tokens(chat) is None                # until the context is full
    assert logprobs_k(chat) is None
    chat = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true}', "chat")
    assert logprobs_k(chat) == 0
    chat = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, '
                         b'"top_logprobs": 5, "max_completion_tokens": 7}', "chat")
    assert (logprobs_k(chat), requested_max_tokens(chat)) == (5, 7)


def test_stop_forms():
    a = sampling_kwargs(parse_request(b'{"prompt": "x", "stop": "\\n\\n"}', "completions"))
    b = sampling_kwargs(parse_request(b'{"prompt": "x", "stop": ["\\n\\n", "User:"]}', "completions"))
    assert a["stop"] == ("\n\n",) and b["stop"] == ("\n\n", "User:")
    c = sampling_kwargs(parse_request(b'{"prompt": "x", "stop_token_ids": [5, 7]}', "completions"))
    assert c["stop_token_ids"] == (5, 7)


@pytest.mark.parametrize("body,param,code", [
    (b'{"prompt": "x", "model": 5}', "model", "invalid_value"),
    (b'{"prompt": "x", "n": 2.0}', "n", "invalid_value"),
    (b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": 1}}', "stream_options.include_usage",
     "invalid_value"),
    (b'{"prompt": "x", "stream": true, "stream_options": {"usage": true}}', "stream_options.usage",
     "unrecognized_argument"),
    (b'{"prompt": [[1, 2], "a"]}', "prompt", "invalid_value"),
    (b'{"prompt": "x", "stop_token_ids": [-1]}', "stop_token_ids", None),
    (b'{"max_tokens": 3}', "prompt", "missing_required_parameter"),
    (b'{"prompt": "x", "logprobs": true}', "logprobs", "invalid_value"),
])
def test_errors_name_the_field(body, param, code):
    with pytest.raises(ApiError) as e:
        parse_request(body, "completions")
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_chat_messages_as_the_template_reads_them():
    req = parse_request(json.dumps({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "u"},
        {"role": "assistant", "content": None},
    ]}).encode(), "chat")
    assert chat_messages(req) == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "ab", "name": "u"},
                                  {"role": "assistant", "content": ""}]
    with pytest.raises(ApiError) as e:
        chat_messages(parse_request(b'{"messages": [{"role": "user", "content": null}]}', "chat"))
    assert e.value.param == "messages.0.content"


def test_chat_stops_at_the_turn_end_unless_ignore_eos():
    qwen = tokenizer_from_gguf_metadata(read_gguf_metadata(TINY_QWEN2))
    neox = tokenizer_from_gguf_metadata(read_gguf_metadata(TINY_NEOX))
    im_end = qwen.token_to_id("<|im_end|>")
    assert end_of_turn_ids(qwen) == [im_end]          # <|endoftext|> is EOS already
    assert end_of_turn_ids(neox) == []
    req = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [3]}', "chat")
    assert sampling_kwargs(req, [im_end])["stop_token_ids"] == (3, im_end)
    req = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "ignore_eos": true}', "chat")
    assert sampling_kwargs(req, [im_end])["stop_token_ids"] == ()


def test_token_strings_of_partial_characters():
    tok = tokenizer_from_gguf_metadata(read_gguf_metadata(TINY_NEOX))
    ids = tok.encode("naïve ☃ 日本")
    strs = [token_str(tok, i) for i in ids]
    partial = [s for s in strs if s.startswith("bytes:")]
    whole = [s for s in strs if not s.startswith("bytes:")]
    assert "".join(whole).replace(" ", "") != "" and all("\\x" in s for s in partial)
    assert partial, "no token of this text is a piece of a character: pick another text"
    raw = b"".join(bytes.fromhex(s[6:].replace("\\x", "")) if s.startswith("bytes:") else s.encode() for s in strs)
    assert raw.decode() == "naïve ☃ 日本"


def test_request_model_shapes():
    req = parse_request(b'{"prompt": [1, 2, 3], "n": 3, "best_of": 3}', "completions")
    assert isinstance(req, CompletionRequest) and req.prompt == [1, 2, 3] and req.n == 3
