"""/v1/chat/completions on a real server process with tiny-qwen2, whose GGUF carries a ChatML
template: the prompt is the template rendered as HF renders it, the reply stops at the turn's
end (<|im_end|>) or EOS, and chat-only parameters (logprobs/top_logprobs,
max_completion_tokens, content parts, roles) behave as OpenAI's do."""
import httpx
import openai
import pytest

from models import load
from serve_util import TINY_QWEN2, ServerProcess, openai_client, collect_garbage  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("collect_garbage")

NAME = "tiny-qwen2"
CTX = 256
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "In the beginning"}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(TINY_QWEN2, "--max-batch", "4", "--ctx", str(CTX), name=NAME)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model():
    return load(TINY_QWEN2)


def reference(model, messages, n):
    """(prompt ids, reply ids up to the turn end, finish_reason) of greedy decoding alone."""
    tok = model.tokenizer
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = list(model.session(max_context=CTX).generate(ids, max_new_tokens=n, stop_on_eos=False))
    ends = {tok.eos_id, tok.token_to_id("<|im_end|>")}
    for i, t in enumerate(out):
        if t in ends:
            return ids, out[:i + 1], "stop"
    return ids, out, "length"


def test_chat_greedy_equals_the_rendered_template_alone(client, model):
    ids, out, finish = reference(model, MESSAGES, 24)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == NAME
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason == finish
    want = model.tokenizer.decode([t for t in out if not model.tokenizer.is_special(t)])
    assert c.message.content == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))


def test_chat_stream_equals_the_whole_reply(client):
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_completion_tokens_and_content_parts(client):
    r = client.chat.completions.create(model=NAME, max_completion_tokens=3, temperature=0, extra_body={
        "ignore_eos": True}, messages=[{"role": "user", "content": [{"type": "text", "text": "In the "},
                                                                    {"type": "text", "text": "beginning"}]}])
    plain = client.chat.completions.create(model=NAME, max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "In the beginning"}])
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    # developer is read as system
    d = client.chat.completions.create(model=NAME, max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                                       messages=[{"role": "developer", "content": "You are terse."},
                                                 {"role": "user", "content": "In the beginning"}])
    s = client.chat.completions.create(model=NAME, max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
                                       messages=MESSAGES)
    assert d.choices[0].message.content == s.choices[0].message.content


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 and e.top_logprobs[1].logprob <= e.logprob <= 0
        assert bytes(e.bytes).decode("utf-8", errors="replace") == e.token or e.token.startswith("bytes:")
    r0 = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in r0.choices[0].logprobs.content)
    s = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e.token for ch in s if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == [e.token for e in content]


def test_chat_n_with_seed(client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):
        one = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=7 + i)
        assert one.choices[0].message.content == c.message.content


BAD = [
    ({"messages": []}, "messages"), ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 2}, "logprobs"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x" * 2000}]}, "messages"),
]


@pytest.mark.parametrize("change,param", BAD, ids=[str(c)[:40] for c, _ in BAD])
def test_bad_chat_parameter_is_a_400_naming_it(server, change, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
