"""The OpenAI HTTP protocol of /v1/completions and /v1/chat/completions: request validation,
the mapping to the engine's SamplingParams, and the JSON shapes of responses, stream chunks and
errors.

Why one module with no HTTP or engine in it: the FastAPI routes, the Ray Serve handle methods
and the tests all speak this protocol; keeping it pure (dicts in, dicts out) makes every bad
input testable without a server, and keeps the server a thin layer.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the offending field as the client spelled it (`messages.1.content`, `top_logprobs`).
Unknown fields are refused (400) as OpenAI refuses them, so a misspelt parameter is never
silently ignored.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["ApiError", "CompletionRequest", "ChatCompletionRequest", "parse_request", "sampling_kwargs",
           "chat_messages", "end_of_turn_ids", "token_bytes", "MAX_N", "MAX_LOGPROBS"]

MAX_N = 128             # choices per request (each is one engine request)
MAX_LOGPROBS = 20       # alternatives per token (the engine's limit)
MAX_STOP = 16           # stop strings per request (the engine's limit)
# Control tokens that end a chat turn (as llama.cpp's end-of-generation set): a chat reply stops
# at the template's turn end, not only at the end-of-text token the file names as EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "</s>")


class ApiError(Exception):
    """An error the client sees as OpenAI-shaped JSON with this HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 500: "internal_server_error",
             503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: no "0.5" -> 0.5 or true -> 1 coercions; forbid: a misspelt field is an error
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: usage on every chunk


class _Common(_Strict):
    """Fields both endpoints share (sampling, stopping, streaming)."""
    model: Optional[str] = None            # None: the served model
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, List[str], None] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)          # 0 or -1: off (vLLM's convention)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**64)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[List[int]] = None
    user: Optional[str] = None                          # accepted, unused
    logit_bias: Optional[Dict[str, float]] = None       # refused unless empty


class CompletionRequest(_Common):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Optional[str] = None                        # refused
    best_of: Optional[int] = None                       # refused unless == n


class TextPart(_Strict):
    type: str
    text: Optional[str] = None
    model_config = ConfigDict(strict=True, extra="allow")   # image_url etc.: refused by chat_messages


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionRequest(_Common):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True                  # vLLM's extension
    tools: Optional[List[Dict[str, Any]]] = None        # refused unless empty
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    response_format: Optional[Dict[str, Any]] = None    # only {"type": "text"}
    parallel_tool_calls: Optional[bool] = None


def _loc(loc) -> str:
    """A pydantic error location as the client's field path: ('messages', 1, 'content') ->
    'messages.1.content' (union branch names such as 'list[int]' dropped)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
        elif isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool", "none") or "-" in p
                                     or p.startswith(("function-", "tagged-union"))):
            continue
        else:
            parts.append(p)
    return ".".join(parts) or None


def _validation_error(e: ValidationError) -> ApiError:
    """The first (most specific) error of a pydantic ValidationError, as a 400 naming the field."""
    errs = e.errors(include_url=False)
    # a union reports one error per branch; the field path is what the client needs
    first = errs[0]
    param = _loc(first["loc"])
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if first["type"] == "missing":
        return ApiError(400, f"{param}: a required field is missing", param=param, code="missing_required_parameter")
    got = first.get("input")
    try:
        shown = json.dumps(got)[:80]
    except (TypeError, ValueError):
        shown = repr(got)[:80]
    if len(errs) > 1 and len({_loc(x["loc"]) for x in errs}) == 1 and first["type"] not in (
            "greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        msg = {"prompt": "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
               "stop": "must be a string or a list of strings",
               "content": "must be a string or a list of content parts"}.get(param.rsplit(".", 1)[-1] if param else "",
                                                                             first["msg"])
    else:
        msg = first["msg"]
    return ApiError(400, f"{param}: {msg}, got {shown}", param=param, code="invalid_value")


def parse_request(body: bytes, kind: str) -> Union[CompletionRequest, ChatCompletionRequest]:
    """The validated request of `kind` ("completions" or "chat") from a JSON body; ApiError 400."""
    cls = CompletionRequest if kind == "completions" else ChatCompletionRequest
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        # JSON mode: strict types, yet nested objects may be plain JSON objects
        req = cls.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    _check_cross_fields(req)
    return req


def _check_cross_fields(req) -> None:
    """What one field's type cannot say: combinations and features we do not provide."""
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options: only allowed when stream is true", param="stream_options")
    if req.logit_bias:
        raise ApiError(400, "logit_bias: not supported by this server", param="logit_bias", code="unsupported")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
    for i, s in enumerate(stops):
        if not s:
            raise ApiError(400, "stop: a stop string must not be empty", param="stop" if isinstance(req.stop, str)
                           else f"stop.{i}")
    if req.stop_token_ids and any(t < 0 for t in req.stop_token_ids):
        raise ApiError(400, "stop_token_ids: token ids must be >= 0", param="stop_token_ids")
    if isinstance(req, CompletionRequest):
        if req.suffix is not None:
            raise ApiError(400, "suffix: not supported by this server", param="suffix", code="unsupported")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, f"best_of: only best_of == n is supported (got best_of={req.best_of}, n={req.n})",
                           param="best_of", code="unsupported")
        p = req.prompt
        if p == "" or p == [] or (isinstance(p, list) and any(x == "" or x == [] for x in p)):
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo: echo together with logprobs (prompt logprobs) is not supported",
                           param="echo", code="unsupported")
    else:
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: only allowed when logprobs is true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_completion_tokens: differs from max_tokens; give one of them",
                           param="max_completion_tokens")
        if req.tools:
            raise ApiError(400, "tools: tool calls are not supported by this server", param="tools",
                           code="unsupported")
        if req.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice: tool calls are not supported by this server", param="tool_choice",
                           code="unsupported")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise ApiError(400, f"response_format: only {{'type': 'text'}} is supported, got "
                                f"{json.dumps(req.response_format)[:80]}", param="response_format",
                           code="unsupported")


def chat_messages(req: ChatCompletionRequest) -> list:
    """The messages as the chat template reads them: [{"role", "content": str}, ...]; text parts
    joined, `developer` read as `system` (as OpenAI does for older models)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages.{i}.content.{j}: only text content parts are supported, got "
                                        f"type {part.type!r}", param=f"messages.{i}.content.{j}", code="unsupported")
                texts.append(part.text)
            content = "".join(texts)
        if content is None:
            if m.role != "assistant":
                raise ApiError(400, f"messages.{i}.content: a {m.role} message needs content",
                               param=f"messages.{i}.content")
            content = ""
        d = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def requested_max_tokens(req) -> Optional[int]:
    """max_tokens (chat: or max_completion_tokens); None: until the context is full. OpenAI's
    completions default is 16."""
    if isinstance(req, ChatCompletionRequest):
        return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return 16 if req.max_tokens is None else req.max_tokens


def logprobs_k(req) -> Optional[int]:
    """How many alternatives the engine reports per token (None: no logprobs at all)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def sampling_kwargs(req, extra_stop_ids=()) -> dict:
    """SamplingParams fields of the request, before max_tokens and the per-choice seed are set.
    Defaults follow OpenAI: temperature 1, top_p 1; top_k -1 (vLLM's "off") maps to 0."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = list(req.stop_token_ids or [])
    if not req.ignore_eos:
        stop_ids += [t for t in extra_stop_ids if t not in stop_ids]
    kw = dict(temperature=1.0 if req.temperature is None else float(req.temperature),
              top_p=1.0 if req.top_p is None else float(req.top_p),
              top_k=0 if req.top_k in (None, -1) else int(req.top_k),
              min_p=0.0 if req.min_p is None else float(req.min_p),
              repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
              frequency_penalty=0.0 if req.frequency_penalty is None else float(req.frequency_penalty),
              presence_penalty=0.0 if req.presence_penalty is None else float(req.presence_penalty),
              stop=tuple(stops), stop_token_ids=tuple(stop_ids), ignore_eos=bool(req.ignore_eos),
              logprobs=logprobs_k(req))
    return kw


def client_param(req, engine_param: str) -> str:
    """The request field behind a SamplingParams field the engine refused."""
    if isinstance(req, ChatCompletionRequest):
        if engine_param == "logprobs":
            return "top_logprobs"
        if engine_param == "max_tokens" and req.max_completion_tokens is not None:
            return "max_completion_tokens"
    return engine_param


def end_of_turn_ids(tokenizer) -> list:
    """Ids of the control tokens that end a chat turn in this vocabulary (besides EOS)."""
    out = []
    for name in END_OF_TURN_TOKENS:
        i = tokenizer.token_to_id(name)
        if i is not None and tokenizer.is_special(i) and i != tokenizer.eos_id:
            out.append(i)
    return out


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes token `token_id` stands for inside a text (SentencePiece's leading space kept)."""
    return tokenizer._bytes_of(token_id, False, False)


def token_str(tokenizer, token_id: int) -> str:
    """A token as OpenAI's logprobs show it: its text, or `bytes:\\xNN...` for a piece of a
    UTF-8 character."""
    b = token_bytes(tokenizer, token_id)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


# -- responses -------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprob_entry(tokenizer, token_id: int, logprob: float, top: Optional[list]) -> dict:
    """One token of a chat choice's `logprobs.content`."""
    def one(t, lp):
        return {"token": token_str(tokenizer, t), "logprob": float(lp), "bytes": list(token_bytes(tokenizer, t))}
    d = one(token_id, logprob)
    d["top_logprobs"] = [one(t, lp) for t, lp in (top or [])]
    return d


class CompletionLogprobs:
    """The legacy completions `logprobs` object, built token by token: tokens, token_logprobs,
    top_logprobs (a {token: logprob} dict per token) and text_offset."""

    def __init__(self, tokenizer, start_offset: int = 0):
        self.tok = tokenizer
        self.offset = start_offset
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    def add(self, token_id: int, logprob: float, top: Optional[list]) -> None:
        s = token_str(self.tok, token_id)
        self.tokens.append(s)
        self.token_logprobs.append(float(logprob))
        self.top_logprobs.append({token_str(self.tok, t): float(lp) for t, lp in (top or [])})
        self.text_offset.append(self.offset)
        self.offset += len(token_bytes(self.tok, token_id).decode("utf-8", errors="replace"))

    def take(self) -> dict:
        """What was added since the last take (a stream chunk's share), then reset."""
        d = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
             "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return d


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
