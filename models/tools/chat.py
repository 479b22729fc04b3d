"""`tensorgpu generate --chat`: a conversation through the model's chat template.

Each turn renders the whole conversation with tokenizer.apply_chat_template (models/chat.py, as
HF renders it) and feeds the session only what its context does not already hold: the tokens
both share stay in the KV cache (Session.truncate drops the rest), so a turn costs its new
tokens, not the whole history. When a turn no longer fits the context, the oldest messages after
the system message are dropped. A reply ends at an end-of-generation token (EOS, or an
end-of-turn marker of the vocabulary such as <|im_end|> or <|eot_id|>), at -n tokens, at --stop,
or at Ctrl-C (the partial reply is kept and the next prompt follows; Ctrl-C at the prompt exits).
"""
from __future__ import annotations

import sys

from .common import plural
from .generate import generate_kwargs, max_new, timing_line

# control tokens that end a turn in the common chat formats (llama.cpp's end-of-generation set
# holds these when the vocabulary has them)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>")


def end_of_turn_ids(tok) -> set:
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    for text in END_OF_TURN:
        i = tok.token_to_id(text)
        if i is not None and tok.is_special(i):
            ids.add(i)
    return ids


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tok, messages: list) -> list:
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _fit(tok, messages: list, max_context: int):
    """The prompt ids of the conversation, dropping its oldest messages (never the system
    message or the newest user message) until one generated token still fits; None if even
    the newest message alone does not fit."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = _render(tok, messages)
        if len(ids) < max_context:
            return ids
        if len(messages) - first <= 1:
            return None
        del messages[first]
        # a conversation resumes with a user message
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            del messages[first]


def chat(model, sess, a, system: str, seed: int) -> int:
    tok = model.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    ends = end_of_turn_ids(tok)
    kw = generate_kwargs(a, seed)
    kw["stop"] = list(kw["stop"] or []) + sorted(ends)
    kw["stop_on_eos"] = True
    tty = sys.stdin.isatty()
    out = sys.stdout
    totals = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0, "context_shifts": 0}
    turn = 0
    while True:
        if tty:
            out.write("\n> ")
            out.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = _fit(tok, messages, sess.max_context)
        if ids is None:
            messages.pop()
            system = [m for m in messages[:1] if m["role"] == "system"]
            n = len(_render(tok, system + [{"role": "user", "content": text}]))
            print(f"error: the message ({plural(n, 'token')} with the template) does not fit the context of "
                  f"{sess.max_context} tokens", file=sys.stderr)
            continue
        # keep what the session already holds of this prompt; at least one token is fed anew
        shared = min(_common_prefix(sess.context, ids), len(ids) - 1)
        sess.truncate(shared)
        kw["seed"] = seed + turn
        reply, sd = [], tok.decode_stream(skip_special=True)
        keep = 1 if ids[0] == tok.bos_id else 0      # a context shift keeps the BOS, as llama-cli does
        gen = sess.generate(ids[shared:], max_new_tokens=max_new(a), keep=keep, **kw)
        try:
            for t in gen:
                reply.append(t)
                piece = sd.step(t)
                if piece:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:        # Ctrl-C during a reply ends the reply, as llama-cli does
            gen.close()
            out.write(sd.flush() + " [interrupted]")
        out.write(sd.flush() + "\n")
        out.flush()
        st = sess.last_stats
        for k in totals:
            totals[k] += st.get(k, 0)
        if reply and reply[-1] in ends:
            reply = reply[:-1]
        messages.append({"role": "assistant", "content": tok.decode(reply, skip_special=True)})
        turn += 1
    if turn:
        totals["stop"] = None
        print(f"{plural(turn, 'turn')}; " + timing_line(totals, sess.max_context), file=sys.stderr)
    return 0
