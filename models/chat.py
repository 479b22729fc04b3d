"""Chat templates: `tokenizer.chat_template` (Jinja) rendered the way transformers'
`apply_chat_template` renders it, so a prompt built here is the prompt the model was tuned on.

What HF does and this copies: a sandboxed Jinja environment with trim_blocks and lstrip_blocks,
the loop-controls extension, a `tojson` filter that keeps non-ASCII text, the globals
`raise_exception(msg)` (a template's own input check) and `strftime_now(fmt)`, and the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token` plus any extra keyword.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

__all__ = ["render_chat_template", "TemplateError"]


class TemplateError(ValueError):
    """A chat template that does not compile, or that rejected its input (raise_exception)."""


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is an install requirement
        raise ImportError("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise TemplateError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


def render_chat_template(template: str, messages: list, add_generation_prompt: bool = False,
                         bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """The template rendered for `messages` (a list of {"role": ..., "content": ...} dicts)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts with 'role' and 'content'")
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                      bos_token=bos_token, eos_token=eos_token, **kwargs)
