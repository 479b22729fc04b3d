"""The OpenAI-compatible HTTP server: a FastAPI app over one batching Engine.

    app = build_app(lambda: Engine(load("m.gguf")), "m")      # loads in the background
    uvicorn.run(app, host="127.0.0.1", port=8000)

Why so thin: batching, sampling, stop strings and detokenization are the engine's; this layer
parses and checks requests (protocol.py), tokenizes prompts or renders the chat template,
submits one engine request per choice, and turns the engine's Outputs into OpenAI JSON or SSE
chunks. All GPU work stays on the engine's thread; the event loop only waits on
`Request.aoutputs()`.

Lifecycle:
- /health is 503 while the model loads (and after a failed load, and while shutting down), 200
  when ready; /v1/* answer 503 until then.
- A client that disconnects cancels its requests (the streaming response's end, or a watcher
  polling `request.is_disconnected()` for non-streaming ones), so the engine frees the sequences
  at its next step.
- Shutdown (uvicorn's lifespan, after in-flight responses finished or were cancelled at the
  graceful-shutdown timeout): `engine.shutdown(cancel=True)`.

`OpenAIServing` holds the logic with plain bytes in and dicts / SSE strings out, so the Ray
Serve deployment calls it without HTTP too.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .metrics import CONTENT_TYPE_LATEST, HTTPMetricsMiddleware, RequestTimer, ServerMetrics
from .protocol import ApiError

__all__ = ["build_app", "OpenAIServing"]

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its requests were cancelled (the
    reply, status 499 as nginx names it, reaches nobody)."""


class _Choice:
    """One engine request's share of a response: text, token count, logprobs, finish reason."""

    def __init__(self, index: int, req, timer: RequestTimer, prompt_text: str = ""):
        self.index, self.req, self.timer = index, req, timer
        self.prefix = prompt_text      # echo
        self.parts: list = []
        self.tokens = 0
        self.finish: Optional[str] = None
        self.error: Optional[str] = None
        self.lp = None                 # logprobs of a finished non-streaming choice


class OpenAIServing:
    """The served model and the OpenAI endpoints' logic, independent of the web framework."""

    def __init__(self, engine_or_factory, model_name: str, metrics: Optional[ServerMetrics] = None):
        if hasattr(engine_or_factory, "submit"):
            self.engine, self._factory = engine_or_factory, None
        elif callable(engine_or_factory):
            self.engine, self._factory = None, engine_or_factory
        else:
            raise TypeError(f"build_app takes an Engine or a function returning one, got "
                            f"{type(engine_or_factory).__name__}")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        self.model_name = model_name
        self.metrics = metrics
        self.created = int(time.time())
        self.load_error: Optional[str] = None
        self.shutting_down = False
        self._started = False
        self._lock = threading.Lock()
        self._eot_ids: list = []

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Load the model (when given a factory) and start the engine's thread; on the caller's
        thread. A failed load leaves /health at 503 with the error."""
        try:
            if self.engine is None:
                t = time.perf_counter()
                engine = self._factory()
                print(f"tensorgpu serve: loaded {self.model_name} in {time.perf_counter() - t:.1f} s",
                      file=sys.stderr, flush=True)
                with self._lock:
                    self.engine = engine
            tok = self.engine.tokenizer
            self._eot_ids = P.end_of_turn_ids(tok) if tok is not None else []
            if self.metrics is not None:
                self.metrics.attach(self.engine)
            with self._lock:
                if self.shutting_down:
                    return
                self.engine.start()
                self._started = True
        except BaseException as e:  # noqa: BLE001 - reported through /health and the log
            self.load_error = f"{type(e).__name__}: {e}"
            traceback.print_exc()

    def start_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.start, name="tensorgpu-serve-load", daemon=True)
        t.start()
        return t

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel what is still running and stop the engine's thread."""
        with self._lock:
            self.shutting_down = True
            engine, started = self.engine, self._started
        if engine is not None and started:
            engine.shutdown(cancel=True, timeout=timeout)
        if engine is not None and self.metrics is not None:
            self.metrics.detach(engine)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown's first half: refuse new requests (503), give the in-flight ones
        `timeout` seconds to finish, then cancel the rest and stop the engine; their responses end
        cleanly (a stream with an error event and [DONE], a plain request with a 503)."""
        self.shutting_down = True
        if self.engine is None or not self._started:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            st = self.engine.stats()
            if st["running"] == 0 and st["waiting"] == 0:
                return
            await asyncio.sleep(0.05)
        await loop.run_in_executor(None, self.shutdown)

    def health(self) -> tuple:
        if self.shutting_down:
            return 503, {"status": "shutting down"}
        if self.load_error:
            return 503, {"status": "error", "error": self.load_error}
        if not self._started:
            return 503, {"status": "loading"}
        return 200, {"status": "ok"}

    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "tensorgpu"}
        if self.engine is not None:
            card["max_model_len"] = self.engine.max_context
        return {"object": "list", "data": [card]}

    def _engine(self):
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.load_error:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if not self._started:
            raise ApiError(503, "the model is still loading; retry when /health answers 200", code="model_loading")
        return self.engine

    # -- requests ------------------------------------------------------------------------

    async def completions(self, body: bytes, is_disconnected: Optional[Callable[[], Awaitable[bool]]] = None):
        """/v1/completions: a response dict, or an async iterator of SSE strings when streaming."""
        req = P.parse_request(body, "completions")
        engine = self._check_model(req)
        tok = engine.tokenizer
        prompts = []            # (token ids, the prompt's text for echo)
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        elif p and isinstance(p[0], int):
            p = [p]
        for i, one in enumerate(p):
            where = "prompt" if len(p) == 1 else f"prompt.{i}"
            if isinstance(one, str):
                if tok is None:
                    raise ApiError(400, f"{where}: this model has no tokenizer; send token ids", param=where)
                prompts.append((tok.encode(one), one))
            else:
                bad = [t for t in one if not 0 <= t < engine.model.config.n_vocab]
                if bad:
                    raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary "
                                        f"[0, {engine.model.config.n_vocab})", param=where)
                prompts.append((list(one), tok.decode(one) if (req.echo and tok is not None) else ""))
        return await self._run("completions", req, engine, prompts, is_disconnected)

    async def chat_completions(self, body: bytes, is_disconnected: Optional[Callable[[], Awaitable[bool]]] = None):
        """/v1/chat/completions: the GGUF's chat template renders the messages."""
        req = P.parse_request(body, "chat")
        engine = self._check_model(req)
        tok = engine.tokenizer
        if tok is None or tok.chat_template is None:
            raise ApiError(400, f"model {self.model_name!r} has no chat template (no tokenizer.chat_template in "
                                "its GGUF file), so /v1/chat/completions cannot build a prompt; use "
                                "/v1/completions with your own prompt text", param="messages",
                           code="no_chat_template")
        messages = P.chat_messages(req)
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template's own check (raise_exception) or a render error
            raise ApiError(400, f"messages: the chat template rejected them: {e}", param="messages",
                           code="chat_template_error") from None
        return await self._run("chat", req, engine, [(ids, "")], is_disconnected)

    def _check_model(self, req):
        engine = self._engine()
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves "
                                f"`{self.model_name}` (GET /v1/models)", param="model", code="model_not_found")
        return engine

    def _submit_all(self, kind, req, engine, prompts) -> list:
        """One engine request per (prompt, choice); all or none are submitted."""
        from .engine import ContextOverflowError, EngineStoppedError, ParamError, QueueFullError, SamplingParams

        ctx = engine.max_context
        wanted = P.requested_max_tokens(req)
        base = P.sampling_kwargs(req, self._eot_ids if kind == "chat" else ())
        prompt_param = "messages" if kind == "chat" else "prompt"
        plans = []
        for i, (ids, text) in enumerate(prompts):
            where = prompt_param if len(prompts) == 1 else f"{prompt_param}.{i}"
            if not ids:
                raise ApiError(400, f"{where}: the prompt is empty after tokenization", param=where)
            room = ctx - len(ids)
            if room < 1:
                raise ApiError(400, f"{where}: the prompt has {len(ids)} tokens, but the context holds {ctx} "
                                    f"and a completion needs at least one more; shorten it",
                               param=where, code="context_length_exceeded")
            # more than fits is cut at the context's end (finish_reason "length"), as llama-server does
            max_tokens = room if wanted is None else min(wanted, room)
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                # the engine checks every field at submit (ParamError names it)
                params = SamplingParams(max_tokens=max_tokens, seed=seed, **base)
                plans.append((i, j, ids, text, params))
        submitted = []
        try:
            for i, j, ids, text, params in plans:
                try:
                    r = engine.submit(ids, params)
                except QueueFullError as e:
                    raise ApiError(503, f"the server is busy: {e} (retry later)", code="queue_full") from None
                except EngineStoppedError:
                    raise ApiError(503, "the server is shutting down", code="shutting_down") from None
                except ContextOverflowError as e:
                    raise ApiError(400, f"{prompt_param}: {e}", param=prompt_param,
                                   code="context_length_exceeded") from None
                except ParamError as e:
                    name = P.client_param(req, e.param)
                    raise ApiError(400, f"{name}: {str(e).split(': ', 1)[-1]}", param=name) from None
                timer = RequestTimer(self.metrics) if self.metrics is not None else None
                submitted.append(_Choice(i * req.n + j, r, timer, text if getattr(req, "echo", False) else ""))
        except BaseException:
            for c in submitted:
                c.req.cancel()
            raise
        return submitted

    async def _run(self, kind, req, engine, prompts, is_disconnected):
        choices = self._submit_all(kind, req, engine, prompts)
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        if req.stream:
            return _Stream(self, kind, req, choices, prompt_tokens)
        try:
            await _collect(choices, is_disconnected, self._logprob_builders(kind, req, choices), engine.tokenizer)
        finally:
            _abandon(choices)
        return self._response(kind, req, choices, prompt_tokens)

    def _logprob_builders(self, kind, req, choices) -> Optional[dict]:
        if P.logprobs_k(req) is None:
            return None
        tok = self.engine.tokenizer
        if kind == "chat":
            return {c.index: [] for c in choices}
        return {c.index: P.CompletionLogprobs(tok, len(c.prefix)) for c in choices}

    def _response(self, kind, req, choices, prompt_tokens) -> dict:
        for c in choices:
            _raise_for_finish(c)
        out = []
        for c in choices:
            text = c.prefix + "".join(c.parts)
            if kind == "chat":
                d = {"index": c.index, "message": {"role": "assistant", "content": text},
                     "logprobs": {"content": c.lp} if c.lp is not None else None, "finish_reason": c.finish}
            else:
                d = {"index": c.index, "text": text, "logprobs": c.lp.take() if c.lp is not None else None,
                     "finish_reason": c.finish}
            out.append(d)
        return {"id": P.new_id("chatcmpl" if kind == "chat" else "cmpl"),
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": P.now(), "model": self.model_name, "choices": out,
                "usage": P.usage(prompt_tokens, sum(c.tokens for c in choices))}


def _raise_for_finish(c: _Choice) -> None:
    if c.finish == "error":
        raise ApiError(500, f"generation failed: {c.error or 'engine error'}", code="engine_error")
    if c.finish == "cancelled" or c.finish is None:
        raise ApiError(503, "the request was cancelled (the server is shutting down)", code="cancelled")


def _abandon(choices) -> None:
    """Cancel the choices nobody will read to the end (client gone, shutdown, an error); the
    engine frees their sequences at its next step."""
    for c in choices:
        if c.finish is None:
            c.req.cancel()
            c.finish = c.req.finish_reason or "cancelled"
            if c.timer is not None:
                c.timer.finish(c.finish)


def _take_output(c: _Choice, out, lps, tok) -> Optional[str]:
    """Account one engine Output to its choice; returns its text delta."""
    if out.token_id is not None:
        c.tokens += 1
        if c.timer is not None:
            c.timer.token()
        if lps is not None and out.logprob is not None:
            lp = lps[c.index]
            if isinstance(lp, list):
                lp.append(P.chat_logprob_entry(tok, out.token_id, out.logprob, out.top_logprobs))
            else:
                lp.add(out.token_id, out.logprob, out.top_logprobs)
    if out.text:
        c.parts.append(out.text)
    if out.finish_reason is not None:
        c.finish, c.error = out.finish_reason, out.error
        if c.timer is not None:
            c.timer.finish(out.finish_reason)
    return out.text


async def _event_batches(choices) -> AsyncIterator[tuple]:
    """(choice, [Output, ...]) as the engine produces them, over all choices of a response: the
    outputs of one choice that arrived together come as one list."""
    if len(choices) == 1:
        c = choices[0]
        async for batch in c.req.aoutput_batches():
            yield c, batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c):
        try:
            async for batch in c.req.aoutput_batches():
                queue.put_nowait((c, batch))
        finally:
            queue.put_nowait((c, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        live = len(tasks)
        while live:
            c, batch = await queue.get()
            if batch is None:
                live -= 1
            else:
                yield c, batch
    finally:
        for t in tasks:
            t.cancel()


async def _collect(choices, is_disconnected, lps, tok) -> None:
    """Run all choices to their final Output; cancel them if the client goes away."""
    async def consume():
        async for c, batch in _event_batches(choices):
            for out in batch:
                _take_output(c, out, lps, tok)

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S if is_disconnected else None)
            if done:
                task.result()
                break
            if await is_disconnected():
                for c in choices:
                    c.req.cancel()
                await task
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
    for c in choices:
        c.lp = lps[c.index] if lps is not None else None


class _Stream:
    """The SSE body of a streaming response: chunks as tokens arrive, an optional usage chunk,
    then `data: [DONE]`. `close()` cancels whatever is unfinished (client gone, shutdown)."""

    def __init__(self, server: OpenAIServing, kind, req, choices, prompt_tokens):
        self.server, self.kind, self.req, self.choices = server, kind, req, choices
        self.prompt_tokens = prompt_tokens
        self.id = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = P.now()
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.continuous_usage_stats)

    def close(self) -> None:
        _abandon(self.choices)

    def _chunk(self, choice_dicts, usage=None) -> str:
        d = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
             "created": self.created, "model": self.server.model_name, "choices": choice_dicts}
        if self.include_usage or self.continuous_usage:
            d["usage"] = usage
        return P.sse(d)

    def _usage(self) -> dict:
        return P.usage(self.prompt_tokens, sum(c.tokens for c in self.choices))

    async def events(self):
        """The SSE strings of the response, in order."""
        tok = self.server.engine.tokenizer
        lps = self.server._logprob_builders(self.kind, self.req, self.choices)
        chat = self.kind == "chat"
        try:
            for c in self.choices:
                if chat:
                    yield self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
                elif c.prefix:
                    yield self._chunk([{"index": c.index, "text": c.prefix, "logprobs": None, "finish_reason": None}])
            # the outputs a choice got since its last chunk go out as one chunk: under load (many
            # streams, the event loop behind the engine) a stream costs one message per wakeup
            async for c, batch in _event_batches(self.choices):
                text = "".join(_take_output(c, out, lps, tok) or "" for out in batch)
                n_tok = sum(out.token_id is not None for out in batch)
                if c.finish in ("cancelled", "error"):
                    err = ApiError(500, f"generation failed: {c.error or 'engine error'}", code="engine_error") \
                        if c.finish == "error" else ApiError(503, "the request was cancelled (the server is "
                                                                  "shutting down)", code="cancelled")
                    yield P.sse(err.body())
                    yield P.sse("[DONE]")
                    return
                lp = None
                if lps is not None and n_tok:
                    if chat:
                        lp = {"content": lps[c.index][-n_tok:]}
                    else:
                        lp = lps[c.index].take()
                if not text and lp is None and c.finish is None:
                    continue
                usage = self._usage() if self.continuous_usage else None
                if chat:
                    delta = {"content": text} if text else {}
                    if c.finish is not None and not text:
                        delta = {}
                    yield self._chunk([{"index": c.index, "delta": delta, "logprobs": lp,
                                        "finish_reason": c.finish}], usage)
                else:
                    yield self._chunk([{"index": c.index, "text": text, "logprobs": lp,
                                        "finish_reason": c.finish}], usage)
            if self.include_usage:
                d = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": self.created, "model": self.server.model_name, "choices": [],
                     "usage": self._usage()}
                yield P.sse(d)
            yield P.sse("[DONE]")
        finally:
            self.close()


class _EngineStreamingResponse(StreamingResponse):
    """A StreamingResponse that cancels the stream's engine requests however it ends: finished,
    client disconnected (Starlette cancels the body task), or server shutdown."""

    def __init__(self, stream: _Stream):
        super().__init__(stream.events(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def build_app(engine_or_factory, model_name: str, *, load_in_background: bool = True,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app serving one model.

    engine_or_factory: an Engine (the app starts it at startup and shuts it down at shutdown),
    or a function returning one, called at startup (on a background thread when
    load_in_background, so /health answers 503 meanwhile)."""
    metrics = ServerMetrics()
    server = OpenAIServing(engine_or_factory, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            server.start_in_background()
        else:
            await asyncio.get_running_loop().run_in_executor(None, server.start)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.shutdown, shutdown_timeout)

    app = FastAPI(title="tensorgpu OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ClientGone)
    async def _client_gone(_request, _e):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=str(e.status_code)).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_request, e: Exception):
        traceback.print_exception(e)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def _respond(result):
        if isinstance(result, _Stream):
            return _EngineStreamingResponse(result)
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await _respond(await server.completions(await request.body(), request.is_disconnected))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await _respond(await server.chat_completions(await request.body(), request.is_disconnected))

    return app
