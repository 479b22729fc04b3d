"""What one request asks of the sampler and the stop logic, checked before it is queued.

Why a frozen dataclass with its own `check`: the engine, the HTTP layer and Python callers all
build these; one place validates every field and names the field in the error (the server
turns a ParamError into an OpenAI 400 with `param` set)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

MAX_LOGPROBS = 20


class ParamError(ValueError):
    """A sampling parameter out of range; `.param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16              # >= 1
    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0: off
    min_p: float = 0.0                # [0, 1]: keep tokens with p >= min_p * p_max (after temperature)
    seed: Optional[int] = None        # the request's own RNG: same seed + prompt -> same tokens
    repetition_penalty: float = 1.0   # HF-style, over prompt + output tokens
    frequency_penalty: float = 0.0    # OpenAI-style, over output tokens: l -= f * count
    presence_penalty: float = 0.0     # l -= p * (count > 0)
    stop: tuple = ()                  # strings, matched on the decoded text; not returned
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None    # None, or k in [0, 20]: chosen token's logprob + top-k alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check(self, vocab_size: Optional[int] = None) -> "SamplingParams":
        """Raise ParamError naming the first bad field; returns self."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise ParamError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ParamError("top_k", f"must be an integer >= 0 (0: off), got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ParamError("seed", f"must be an integer, got {self.seed!r}")
        if not _is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 100:
            raise ParamError("repetition_penalty", f"must be in (0, 100], got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise ParamError(name, f"must be in [-2, 2], got {v!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"must be a tuple of non-empty strings, got {self.stop!r}")
        if len(self.stop) > 16:
            raise ParamError("stop", f"at most 16 stop strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"must be a tuple of token ids >= 0, got {self.stop_token_ids!r}")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if t >= vocab_size]
            if bad:
                raise ParamError("stop_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ParamError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        return self
