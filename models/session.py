"""Session: one conversation over a resident GPTNeoX — a preallocated KV cache and a position.

Why a separate object: the weights are large and read-only, the cache is per conversation.
Sessions of one model share its weight tensors; each holds n_layer (k, v) pairs of
[n_head, max_context, head_dim] tensors (f16 by default) and nothing else on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

import tensorgpu as tg

from .sampling import Sampler


# Decode steps the GPU may run ahead of the host reading their tokens (2: the host never waits
# on a readback that could not be ready yet; measured on the H100, benchmarks/RESULTS.md).
STEPS_IN_FLIGHT = 2
# Forward shapes (bucket length, last_only) a session keeps captured (see _forward_captured).
CAPTURED_FORWARDS = 2
# Prompt lengths are padded up to the next of these (then to multiples of 2048): ~1.5x steps,
# so padding costs at most half again, ~20% on average, of a prefill's compute.
_BUCKETS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def bucket_length(T: int) -> int:
    """The padded length a Session runs a T-token forward at (1-4 tokens: exactly T)."""
    if T <= 4:
        return T
    for b in _BUCKETS:
        if b >= T:
            return b
    return -(-T // 2048) * 2048


class ContextOverflowError(ValueError):
    """The tokens do not fit in what is left of the session's context (the session is unchanged)."""


def _new_stats() -> dict:
    return {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0, "stop": None,
            "context_shifts": 0}


class _StopText:
    """Finds stop strings in the decoded continuation, also across token boundaries and context
    shifts, holding only the last max(len(stop)) - 1 characters (bounded on long runs)."""

    def __init__(self, tokenizer, strings: list):
        self.stream, self.strings = tokenizer.decode_stream(), strings
        self.keep, self.tail = max(len(s) for s in strings) - 1, ""

    def hit(self, token: int) -> bool:
        text = self.tail + self.stream.step(token)
        if any(s in text for s in self.strings):
            return True
        self.tail = text[len(text) - self.keep:] if self.keep else ""
        return False


class Session:
    captured_forwards = CAPTURED_FORWARDS   # prompt shapes kept captured (a server's scratch session keeps more)

    def __init__(self, model, max_context: Optional[int] = None, cache_dtype=tg.float16):
        c = model.config
        explicit = max_context is not None
        if max_context is None:
            max_context = c.n_ctx
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context <= 0:
            raise ValueError(f"max_context must be a positive int, got {max_context!r}")
        if max_context > c.n_ctx:
            raise ValueError(f"max_context {max_context} exceeds the model's context_length {c.n_ctx}")
        cache_dtype = tg.dtypes.as_dtype(cache_dtype)
        if cache_dtype not in (tg.float16, tg.float32):
            raise TypeError(f"cache_dtype must be float16 or float32, got {cache_dtype}")
        from .base import check_cache_fits
        kv_heads = getattr(c, "n_head_kv", None) or c.n_head
        check_cache_fits(getattr(c, "n_layer"), kv_heads, max_context, c.head_dim, cache_dtype.itemsize,
                         "max_context" if explicit else f"max_context (the model's context_length)")
        self.model = model
        self.max_context = max_context
        self.cache_dtype = cache_dtype
        self.cache = model.new_cache(max_context, cache_dtype)
        self.tokens: list = []          # every token id the cache holds, in order
        self._pending: list = []        # the last token generate() yielded, not yet run through the model

    @property
    def position(self) -> int:
        """How many tokens the context holds (the position of the next token)."""
        return len(self.tokens) + len(self._pending)

    @property
    def remaining(self) -> int:
        """How many more tokens fit in the context."""
        return self.max_context - self.position

    # -- forward ----------------------------------------------------------------------

    def _check_ids(self, token_ids) -> np.ndarray:
        if isinstance(token_ids, tg.Tensor):
            token_ids = token_ids.numpy()
        if isinstance(token_ids, str):
            raise TypeError("forward() takes token ids; encode text with model.tokenizer.encode(text) "
                            "(generate() accepts text)")
        arr = np.asarray(token_ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise ValueError(f"token ids must be a 1-D sequence, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError("empty token sequence: give at least one token id")
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                i = int(np.argmax(~np.isfinite(arr)))
                raise ValueError(f"token id {arr[i]} at index {i} is not a finite number")
            if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        V = self.model.config.n_vocab
        bad = (arr < 0) | (arr >= V)
        if bad.any():
            i = int(np.argmax(bad))
            raise IndexError(f"token id {int(arr[i])} at index {i} is outside the vocabulary [0, {V})")
        if arr.size > self.remaining:
            raise ContextOverflowError(
                f"{arr.size} tokens do not fit: the session holds {self.position} of max_context "
                f"{self.max_context} ({self.remaining} left); nothing was added")
        return arr.astype(np.int32)

    def forward(self, token_ids, last_only: bool = False) -> tg.Tensor:
        """Append `token_ids` to the context and return their logits, float32 [len, vocab]
        (last_only: [1, vocab], the last token's). Validation happens before any GPU work:
        on an error the session is unchanged."""
        ids = self._check_ids(token_ids)
        return self._feed(ids.tolist(), last_only)

    def _feed(self, ids: list, last_only: bool) -> tg.Tensor:
        """Run the (validated) ids, after any token generate() yielded but did not run yet."""
        pending, self._pending = self._pending, []
        run = pending + list(ids)
        p = len(self.tokens)
        try:
            logits = self._forward_captured(run, p, last_only)
            logits.realize()  # the cache rows are written now: tokens and cache stay consistent
        except BaseException:
            self._pending = pending
            raise
        self.tokens.extend(run)
        return logits[len(pending):] if pending and not last_only else logits

    def _forward_captured(self, run: list, p: int, last_only: bool) -> tg.Tensor:
        """model.forward of `run` at positions p.., through a capture kept per (bucket length,
        last_only). A prompt is padded up to its bucket (`bucket_length`): kernels are generated
        and compiled per shape, so without buckets every new prompt length would compile a new
        set of pipelines (~0.5-1 s); with them, lengths of one bucket share the compiled kernels
        and the captured forward (no graph building or scheduling either). Padding rows come
        after the real tokens, so causal attention keeps them out of every real row; their K/V
        rows land beyond the context, where nothing reads them before they are rewritten. A
        prompt that fills its bucket, or whose bucket would pass the context, runs unpadded. The
        CAPTURED_FORWARDS most recent shapes are kept; each holds about one forward's peak
        intermediate memory (kernels reuse the buffers of dead intermediates)."""
        T = len(run)
        B = bucket_length(T)
        # run at exactly T when the prompt fills its bucket (that keeps the last layer's one-row
        # shortcut, which a padded run cannot use) or the bucket would pass the context
        padded = T < B and p + B <= self.max_context
        if not padded:
            B = T
        caps = self.__dict__.setdefault("_forwards", {})
        key = (B, last_only, padded)
        fn = caps.pop(key, None)
        if fn is None:
            model, cache = self.model, self.cache
            if last_only:
                # `last` (the last real row) is a step variable: one trace serves the bucket
                def fwd(ids, pos, last):
                    # a copy of the row read: the engine then runs the head for it alone
                    return model.forward(ids, pos, cache)[last:last + 1].contiguous()  # [1, V]
            else:
                def fwd(ids, pos):
                    return model.forward(ids, pos, cache)                              # [B, V]
            fn = tg.capture(fwd, submit_every=64 if B > 1 else None)
        caps[key] = fn                                # most recent last
        while len(caps) > self.captured_forwards:
            del caps[next(iter(caps))]
        ids = np.zeros(B, np.int32)
        ids[:T] = run
        if last_only:
            return fn(ids, p, T - 1).contiguous()      # [1, V] (the capture's buffer is rewritten by its next replay)
        out = fn(ids, p)                               # [B, V]
        # the capture's output buffer is rewritten by its next replay: hand out a copy
        return (out if B == T else out[:T]).contiguous()

    @property
    def context(self) -> list:
        """Every token of the conversation so far (including one generate() yielded last)."""
        return self.tokens + self._pending

    def reset(self) -> None:
        """Forget the context (the cache memory is kept and overwritten)."""
        self.tokens, self._pending = [], []

    def truncate(self, n: int) -> None:
        """Keep only the first `n` tokens of the context (their cache rows stay valid, the rest
        are forgotten): a chat turn whose prompt shares a prefix with the context runs only
        the tokens after it."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"truncate() takes an int >= 0, got {n!r}")
        if n < self.position:
            self.tokens, self._pending = self.context[:n], []

    def fork(self) -> "Session":
        """A new session with a copy of this one's cache and context (e.g. to reuse a prefilled prompt)."""
        new = Session.__new__(Session)
        new.model, new.max_context, new.cache_dtype = self.model, self.max_context, self.cache_dtype
        new.captured_forwards = self.captured_forwards
        new.cache = [(k.contiguous().realize(), v.contiguous().realize()) for k, v in self.cache]
        new.tokens, new._pending = list(self.tokens), list(self._pending)
        return new

    # -- generation ---------------------------------------------------------------------

    def generate(self, prompt: Union[str, Sequence[int], None], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                 stop: Optional[Iterable[Union[str, int]]] = None, stop_on_eos: bool = True,
                 context_shift: bool = False, keep: int = 0) -> Iterator[int]:
        """Yield new token ids one at a time (streaming).

        `prompt` (text or ids) is appended to the context first; None or "" continues the current
        context. Greedy when temperature is 0; otherwise top_k / top_p / repetition_penalty
        sampling from a NumPy Generator seeded with `seed`. Generation ends after max_new_tokens,
        at EOS (stop_on_eos), after a token in `stop` (ids) or once the decoded continuation
        contains a `stop` string (the stopping token is yielded), or when the context is full.
        With `context_shift`, a full context does not end it: as llama-cli does, the first `keep`
        tokens stay, half of the rest (the oldest) are dropped, and what is left is run again as a
        prompt (the cache holds positions, so the kept tokens are recomputed at their new ones);
        the tokens that follow are those of a fresh session given the shifted context.
        The last yielded token joins the context when the session runs next.
        Afterwards `self.last_stats` holds prefill/decode token counts and seconds, why it
        stopped (`stop`: "eos", "stop", "length" or "context") and `context_shifts`; a shift's
        re-run counts as decode time, since it is part of producing the tokens after it."""
        if isinstance(stop, (str, int)):
            stop = [stop]
        stop_strs = [s for s in (stop or ()) if isinstance(s, str) and s]
        stop_ids = {int(s) for s in (stop or ()) if not isinstance(s, str)}
        sampler = Sampler(temperature, top_k, top_p, repetition_penalty, seed)  # validates its arguments
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if context_shift and (isinstance(keep, bool) or not isinstance(keep, int)
                              or not 0 <= keep <= self.max_context - 2):
            # a shift must drop at least one token: keep leaves two or more of a full context
            raise ValueError(f"keep must be an int in [0, max_context - 2 = {self.max_context - 2}] "
                             f"for a context shift, got {keep!r}")
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if tok is None:
                raise ValueError("this model has no tokenizer in its GGUF metadata: pass token ids")
            ids = tok.encode(prompt) if prompt else []
        else:
            empty = prompt is None or (isinstance(prompt, (list, tuple)) and len(prompt) == 0)
            # the same checks as forward(): no silent truncation of 1.7, no flattening of [[1, 2]]
            ids = [] if empty else self._check_ids(prompt).tolist()
        if not ids and not self.position:
            raise ValueError("empty prompt and empty context: nothing to continue from")
        if ids:
            self._check_ids(ids)  # every input error is raised here, before the generator starts
        if max_new_tokens > 0 and self.remaining - len(ids) < 1:
            # a generated token needs a row of its own in the cache
            raise ContextOverflowError(
                f"no room to generate: the session holds {self.position} of max_context {self.max_context}"
                + (f" and the prompt adds {len(ids)}" if ids else "")
                + "; reset() the session or fork() a shorter one")
        stops = _StopText(tok, stop_strs) if stop_strs else None
        return self._generate(ids, max_new_tokens, sampler, stop_ids, stops,
                              tok.eos_id if (stop_on_eos and tok is not None) else None,
                              keep if context_shift else None)

    def _generate(self, ids, max_new_tokens, sampler, stop_ids, stops, eos, keep):
        """Runs of the decode loop; between two, a context shift (keep is None: no shifts)."""
        stats = self.last_stats = _new_stats()
        if max_new_tokens == 0:
            stats["stop"] = "length"
            return
        run = self._run_gpu if sampler.on_gpu else self._run_host
        produced, reprefill = 0, False
        while True:
            reason, n = yield from run(ids, max_new_tokens - produced, sampler, stop_ids, stops, eos, stats, reprefill)
            produced += n
            stats["stop"] = reason
            if reason != "context" or keep is None:
                return
            ids = self._shifted_context(keep)
            self.reset()
            reprefill = True
            stats["context_shifts"] += 1

    def _shifted_context(self, keep: int) -> list:
        """The context after llama-cli's shift: the first `keep` tokens, then the newer half of the
        rest (n_discard = (position - keep) // 2 dropped after the kept ones)."""
        ctx = self.context
        n_discard = (len(ctx) - keep) // 2
        return ctx[:keep] + ctx[keep + n_discard:]

    def _prefill_logits(self, ids):
        """The logits the first token of a run is chosen from: run the prompt (after any pending
        token), or re-run the last token into its own cache row when only continuing."""
        if ids or self._pending:
            return self._feed(ids, last_only=True)
        last = self.tokens.pop()
        return self._feed([last], last_only=True)

    @staticmethod
    def _count_first(stats, reprefill: bool, seconds: float, n_prompt: int) -> None:
        """Account a run's first token: after the prompt it closes the prefill; after a context
        shift's re-run it is one more decode token, the re-run its time."""
        if reprefill:
            stats["decode_tokens"] += 1
            stats["decode_s"] += seconds
        else:
            stats["prefill_tokens"] = n_prompt
            stats["prefill_s"] = seconds

    def _run_host(self, ids, max_new_tokens, sampler, stop_ids, stops, eos, stats, reprefill):
        """One run of the decode loop with sampling on the host (top_k above the GPU kernel's cap).
        Returns (why it stopped, tokens yielded)."""
        import time
        t0 = time.perf_counter()
        n_prompt = len(ids) + len(self._pending)
        logits = self._prefill_logits(ids)
        nxt = sampler.pick(logits, self.tokens)
        self._count_first(stats, reprefill, time.perf_counter() - t0, n_prompt)
        for n in range(max_new_tokens):
            reason = ("eos" if nxt == eos else "stop" if nxt in stop_ids or (stops is not None and stops.hit(nxt))
                      else "length" if n + 1 == max_new_tokens
                      else "context" if self.remaining <= 1 else None)   # nxt takes the last free row
            self._pending = [nxt]
            yield nxt
            if reason:
                return reason, n + 1
            t = time.perf_counter()
            logits = self._feed([], last_only=True)
            nxt = sampler.pick(logits, self.tokens)
            stats["decode_s"] += time.perf_counter() - t
            stats["decode_tokens"] += 1
        return "length", max_new_tokens

    # -- the fast decode loop -------------------------------------------------------------

    def _decode_step(self, sampler):
        """The captured decode step for these sampling settings: forward of one token from the
        GPU (the previous step's sample) + sampling on the GPU, with the token history kept on
        the GPU for the repetition penalty. Traced once, replayed every token."""
        key = (sampler.temperature, sampler.top_k, sampler.top_p, sampler.penalty)
        caps = self.__dict__.setdefault("_steps", {})
        step = caps.get(key)
        if step is None:
            model, cache = self.model, self.cache
            hist, n_prev = self._gpu_history()
            greedy = sampler.greedy
            T, K, P, R = sampler.temperature, sampler.top_k or 0, sampler.top_p or 1.0, sampler.penalty

            # u: the uniform draw of a sampling step; greedy steps do not pass it (one host write less)
            @tg.capture
            def step(tok, pos, u=None):
                logits = model.forward(tok, pos, cache)                                  # [1, V]
                return tg.nn.sample(logits, 0.0 if greedy else T, 0 if greedy else K, 1.0 if greedy else P,
                                    u=None if greedy else u, repetition_penalty=R,
                                    prev_tokens=hist, n_prev=n_prev, append=True)      # int32 [1]
            caps[key] = step
        return step

    def _gpu_history(self):
        """int32 [max_context] token history + int32 [1] count, on the GPU (sampling appends)."""
        h = self.__dict__.get("_hist")
        if h is None:
            h = self._hist = (tg.zeros((self.max_context + 1,), tg.int32).contiguous().realize(),
                              tg.zeros((1,), tg.int32).contiguous().realize())
        return h

    def _run_gpu(self, ids, max_new_tokens, sampler, stop_ids, stops, eos, stats, reprefill):
        """One run of the decode loop with every token chosen on the GPU, STEPS_IN_FLIGHT steps
        ahead of the host. Returns (why it stopped, tokens yielded).

        Step s feeds token s-1 (from the GPU, where step s-1 sampled it) into the cache and
        samples token s; the host only reads 4 bytes per token. Steps are queued before the
        tokens they depend on are read back, so the GPU never waits for Python (encoding,
        stop checks, the caller's work between tokens). When generation ends, the steps queued
        past the end have written K/V rows beyond the context and appended to the GPU history:
        both are rewritten before they are read (rows past `position` are never attended; the
        history is reset per call), so stopping early costs at most STEPS_IN_FLIGHT discarded steps.

        Timing: a readback waits for everything submitted before it (wgpu's device poll), so
        token 0 is read before any step is queued (its arrival ends the prefill), each step is
        submitted with its own readback, and decode time runs from the first step's request to
        the latest token's arrival, prorated over the steps run by then: steps queued ahead and
        never used (after an early stop) are not counted as decode time."""
        import time
        from collections import deque

        t0 = time.perf_counter()
        n_prompt = len(ids) + len(self._pending)
        logits = self._prefill_logits(ids)
        # the whole context is the repetition-penalty history; sampling appends to it on the GPU
        hist, n_prev = self._gpu_history()
        ctx = list(self.tokens)
        if sampler.penalty is not None:
            hist[:len(ctx)] = tg.tensor(np.asarray(ctx, np.int32))
        n_prev[0] = len(ctx)
        greedy = sampler.greedy
        tok = tg.nn.sample(logits, 0.0 if greedy else sampler.temperature, 0 if greedy else (sampler.top_k or 0),
                           1.0 if greedy else (sampler.top_p or 1.0), u=None if greedy else sampler.rng.random(),
                           repetition_penalty=sampler.penalty, prev_tokens=hist, n_prev=n_prev, append=True).realize()
        tickets = deque([tok.read_async()])
        tg.flush()
        step = self._decode_step(sampler)
        base = len(ctx)                   # the row token 0 goes to
        queued = 0                        # steps queued so far (step s produces token s)

        def queue_steps():
            nonlocal tok, queued
            # step s writes row base+s-1 and needs row base+s free for token s
            while (len(tickets) <= STEPS_IN_FLIGHT and queued + 1 < max_new_tokens
                   and base + queued + 1 < self.max_context):
                p = base + queued
                tok = step(tok, p) if greedy else step(tok, p, float(sampler.rng.random()))
                tickets.append(tok.read_async())
                tg.flush()                # its own submit: a token's readback never waits on a later step
                queued += 1

        toks, prev = list(ctx), None     # the context grows by one token per yield (no copies)
        t_dec, dec0 = None, stats["decode_s"]
        for n in range(max_new_tokens):
            nxt = int(tickets.popleft().numpy()[0])
            t = time.perf_counter()
            if nxt < 0:
                raise FloatingPointError(f"the model's logits are all NaN at position "
                                         f"{len(toks) + (prev is not None)}: no token can be chosen "
                                         "(check the weights and the input)")
            if n == 0:
                self._count_first(stats, reprefill, t - t0, n_prompt)
                dec0 = stats["decode_s"]
            else:
                stats["decode_tokens"] += 1
                stats["decode_s"] = dec0 + (t - t_dec) * n / queued
            stopped = nxt in stop_ids or (stops is not None and stops.hit(nxt))
            reason = "eos" if nxt == eos else "stop" if stopped else None
            if reason is None:
                if n == 0:
                    t_dec = time.perf_counter()
                queue_steps()            # before the caller gets control: the GPU keeps going
                if not tickets:
                    reason = "length" if n + 1 == max_new_tokens else "context"
            # the yielded token is pending: it joins the cache when the session runs next
            if prev is not None:
                toks.append(prev)
            self.tokens, self._pending, prev = toks, [nxt], nxt
            yield nxt
            if reason:
                return reason, n + 1
        return "length", max_new_tokens

    # -- scoring ------------------------------------------------------------------------

    def nll(self, token_ids) -> np.ndarray:
        """Append `token_ids` and return the negative log-likelihood (nats, float64) of each token
        after the first given the ones before it: [len - 1]. Reduced on the GPU (one float per
        token is read back, not the logits)."""
        ids = self._check_ids(token_ids)
        logits = self.forward(ids)[:-1]                                    # [T-1, V]
        V = self.model.config.n_vocab
        target = tg.tensor(ids[1:].astype(np.int32))                       # [T-1]
        hit = tg.arange(V)[None, :] == target[:, None]                      # [T-1, V] one-hot, fused
        picked = tg.where(hit, logits, 0.0).sum(-1)                        # logit of the target
        return (logits.logsumexp(-1) - picked).numpy().astype(np.float64)

    def __repr__(self):
        return f"Session(position={self.position}/{self.max_context}, cache {self.cache_dtype.name})"


@dataclass
class Perplexity:
    ppl: float
    nll_sum: float
    n_scored: int
    n_windows: int
    nll: np.ndarray     # [n_windows, ctx - 1]: NLL of every token after the first of its window

    def ppl_from(self, first_scored: int) -> float:
        """The perplexity scoring only positions first_scored..ctx-1 of each window
        (ctx // 2 + 1 is what llama-perplexity scores)."""
        return float(np.exp(self.nll[:, first_scored - 1:].mean()))

    def uncertainty(self, first_scored: int = 1) -> float:
        """llama-perplexity's "+/-": the standard error of the mean NLL over the scored tokens,
        carried over to the perplexity (ppl * sqrt(var / (n - 1))); nan for fewer than 2 tokens."""
        x = self.nll[:, first_scored - 1:].ravel()
        if x.size < 2:
            return float("nan")
        mean = x.mean()
        var = max(float((x * x).mean() - mean * mean), 0.0)
        return float(np.exp(mean) * np.sqrt(var / (x.size - 1)))

    def running(self, first_scored: int = 1) -> np.ndarray:
        """The perplexity over the first 1, 2, ... windows (llama-perplexity's `[1]p1,[2]p2,...`)."""
        s = self.nll[:, first_scored - 1:]
        return np.exp(np.cumsum(s.sum(1)) / (s.shape[1] * np.arange(1, s.shape[0] + 1)))


def perplexity(model, ids: Sequence[int], ctx: int = 256, first_scored: int = 1, max_windows: Optional[int] = None,
               progress: bool = False, cache_dtype=tg.float16) -> Perplexity:
    """Perplexity over non-overlapping windows of `ctx` tokens, each run from position 0.
    Within a window the tokens at positions first_scored..ctx-1 are scored (1: every token that
    has a predecessor, the definition of tiny-neox's reference.json; ctx // 2 + 1 matches
    llama-perplexity). A trailing partial window is dropped."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ctx < 2 or not 1 <= first_scored < ctx:
        raise ValueError(f"need ctx >= 2 and 1 <= first_scored < ctx, got ctx={ctx}, first_scored={first_scored}")
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {ctx}")
    sess = model.session(max_context=ctx, cache_dtype=cache_dtype)
    nll = np.zeros((n, ctx - 1))
    windows = range(n)
    if progress:
        from tqdm import tqdm
        windows = tqdm(windows, desc="perplexity", unit="window")
    for w in windows:
        sess.reset()
        nll[w] = sess.nll(ids[w * ctx:(w + 1) * ctx])
        if progress:
            windows.set_postfix(ppl=f"{np.exp(nll[:w + 1, first_scored - 1:].mean()):.4f}")
    scored = nll[:, first_scored - 1:]
    return Perplexity(float(np.exp(scored.mean())), float(scored.sum()), scored.size, n, nll)
