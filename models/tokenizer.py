"""Tokenizers rebuilt from GGUF metadata: byte-level BPE ("gpt2") and SentencePiece ("llama").

A GGUF file carries the vocabulary, scores and merges (``tokenizer.ggml.*``) but not a
tokenizer.json, so we rebuild the Hugging Face tokenizer from those lists. Using the
HF ``tokenizers`` engine for encoding (instead of our own BPE) keeps ids identical to
what transformers produces; decoding is done here from a byte table because it must be
byte-exact and incremental for streaming.

``tokenizer_from_gguf_metadata(md)`` picks the class by ``tokenizer.ggml.model``:

* ``gpt2`` -> :class:`Tokenizer`: byte-level BPE; the pre-tokenizer regex follows
  ``tokenizer.ggml.pre`` as llama.cpp does (GPT-2's, Llama 3's ``llama-bpe``, Qwen2's).
* ``llama`` -> :class:`SPMTokenizer`: SentencePiece BPE as HF's LlamaTokenizerFast builds it
  (merges ranked by the merged piece's score, byte fallback to ``<0xNN>`` tokens, spaces as
  ``▁`` with a prefix space).

Both expose ``chat_template`` and ``apply_chat_template`` (models/chat.py).
"""

from __future__ import annotations

import codecs
import operator
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["Tokenizer", "SPMTokenizer", "StreamDecoder", "bytes_to_unicode", "read_gguf_metadata",
           "tokenizer_from_gguf_metadata", "TOKENIZER_MODELS"]

# token_type values (llama.cpp / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Values of tokenizer.ggml.pre whose llama.cpp pre-tokenizer is the single GPT-2 regex,
# which is what HF's ByteLevel(use_regex=True) implements. A missing key or "default"
# is accepted too: files without it come from converters that predate the key, and for
# GPT-NeoX models the source tokenizer was a GPT-2-regex one.
_GPT2_REGEX_PRES = {None, "default", "gpt2", "gpt-2", "mpt", "olmo", "phi-2", "roberta-bpe"}
# Llama 3's split (llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3, HF's Llama 3 tokenizer.json): digits in
# groups of up to 3, and whole words found in the vocabulary are used as they are (ignore_merges).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2): Llama 3's with single digits.
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> (split regex or None for GPT-2's, ignore_merges)
_PRE_TOKENIZERS = {**{p: (None, False) for p in _GPT2_REGEX_PRES if p},
                   **{p: (_LLAMA3_REGEX, True) for p in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx")},
                   **{p: (_QWEN2_REGEX, False) for p in ("qwen2", "deepseek-r1-qwen")}}
TOKENIZER_MODELS = ("llama", "gpt2")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str) -> bytes:
    """Bytes a token stands for, as HF's ByteLevel decoder computes them.

    A token made only of byte-table characters is byte-level spelled; any other token
    (e.g. an added token containing a real space) contributes its own UTF-8 bytes.
    """
    table = _unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """GGUF key/value metadata as plain Python values (strings decoded, arrays as lists).

    Same shape as ``tensorgpu.load_gguf(path).metadata``; this one only needs the
    ``gguf`` package, so tools and tests can get a tokenizer without touching a GPU.
    """
    from gguf import GGUFReader

    reader = GGUFReader(os.fspath(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _as_int(value: Any, key: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"GGUF metadata {key!r} must be an integer, got {value!r}") from None


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting a UTF-8 character.

    A multi-byte character can be spread over several byte-level tokens; the pieces
    returned here only ever contain complete characters, and their concatenation
    (including :meth:`flush`) equals ``Tokenizer.decode`` of all ids when ``at_start``
    (the ids begin the text: SentencePiece drops the prefix space of the first piece);
    by default the ids continue a text (generation), and every space is kept.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False, at_start: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = at_start

    def step(self, token_id: int) -> str:
        """Feed one id; return the text that became complete (possibly '')."""
        b = self._tok._bytes_of(token_id, self._skip, self._at_start)
        self._at_start = self._at_start and self._tok._check_id(token_id) in self._tok._special
        return self._dec.decode(b, final=False)

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character become U+FFFD."""
        return self._dec.decode(b"", final=True)


class Tokenizer:
    """GPT-2 style byte-level BPE tokenizer of a GGUF model (``tokenizer.ggml.model == "gpt2"``)."""

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        pre: str | None = None,
    ):
        n = len(tokens)
        if n == 0:
            raise ValueError("tokenizer vocabulary is empty")
        if token_types is None:
            token_types = [NORMAL] * n
        token_types = [int(t) for t in token_types]
        if len(token_types) != n:
            raise ValueError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries but there are {n} tokens"
            )
        self._tokens = [str(t) for t in tokens]
        self._types = token_types
        for name, v in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"tokenizer.ggml.{name}_token_id = {v} is out of range for vocab size {n}")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.pre = pre
        self.chat_template: str | None = None   # tokenizer.chat_template (Jinja), when the file has one

        self._token_bytes = [self._piece_bytes(i) for i in range(n)]
        self._special = frozenset(i for i, t in enumerate(token_types) if t == CONTROL)
        self._hf = self._build_hf(merges)
        self._hf_nospecial: _HFTokenizer | None = None

    def _piece_bytes(self, i: int) -> bytes:
        return _token_bytes(self._tokens[i])

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        """Build from a GGUF metadata dict (``load_gguf(path).metadata``)."""
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no 'tokenizer.ggml.model' key: the file carries no tokenizer")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model is {model!r}; this class is the 'gpt2' one (byte-level BPE); "
                f"tokenizer_from_gguf_metadata() picks the class for any of {TOKENIZER_MODELS}"
            )
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in md:
                raise ValueError(f"GGUF metadata is missing {key!r}, required for a 'gpt2' tokenizer")
        pre = md.get("tokenizer.ggml.pre")
        if pre not in _PRE_TOKENIZERS and pre is not None:
            # llama.cpp refuses such a file; we warn and use GPT-2's split, which only changes
            # where words break (ids stay valid, but may differ from the model's own tokenizer)
            warnings.warn(f"tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer "
                          f"(known: {sorted(_PRE_TOKENIZERS)}); using GPT-2's split: the token ids may "
                          f"differ from the model's own tokenizer", stacklevel=2)
        return cls._from_md(md, list(md["tokenizer.ggml.merges"]), pre=pre)

    @classmethod
    def _from_md(cls, md: Mapping[str, Any], merges: list, **kw) -> "Tokenizer":
        def opt_id(key: str) -> int | None:
            v = md.get(key)
            return None if v is None else _as_int(v, key)

        tok = cls(
            list(md["tokenizer.ggml.tokens"]),
            merges,
            md.get("tokenizer.ggml.token_type"),
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_id=opt_id("tokenizer.ggml.eos_token_id"),
            unk_id=opt_id("tokenizer.ggml.unknown_token_id"),
            pad_id=opt_id("tokenizer.ggml.padding_token_id"),
            # llama.cpp's default for BPE vocabularies is not to add BOS/EOS
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
            **kw,
        )
        tmpl = md.get("tokenizer.chat_template")
        tok.chat_template = tmpl if isinstance(tmpl, str) else None
        return tok

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Build from a GGUF file's metadata without loading its tensors."""
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    def _build_hf(self, merges: list[str]) -> _HFTokenizer:
        vocab: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            # UNUSED entries are llama.cpp's [PADn] fillers up to the embedding size: BPE can
            # never produce them, and leaving them out makes a saved tokenizer.json convert
            # back to the same GGUF vocabulary. Duplicate strings (rare) keep their first id.
            if self._types[i] != UNUSED:
                vocab.setdefault(t, i)
        pairs = []
        for k, m in enumerate(merges):
            # llama.cpp splits at the first space after position 0: a merge side is never empty
            j = m.find(" ", 1)
            if j < 0:
                raise ValueError(f"tokenizer.ggml.merges[{k}] = {m!r} is not of the form 'left right'")
            pairs.append((m[:j], m[j + 1 :]))
        # the Rust BPE panics (not a Python error) on a merge whose parts or result it lacks
        for k, (a, b) in enumerate(pairs):
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"tokenizer.ggml.merges[{k}] = {a + ' ' + b!r}: "
                                 f"{'the merged token' if a in vocab and b in vocab else 'a side'} "
                                 f"is not in tokenizer.ggml.tokens")
        added = []
        for i, t in enumerate(self._types):
            if t == CONTROL:
                added.append((i, AddedToken(self._tokens[i], special=True, normalized=False)))
            elif t == USER_DEFINED:
                # llama.cpp stores user-defined tokens pre-normalized (raw text); a
                # byte-level spelled one is turned back into its text first.
                b = self._token_bytes[i]
                try:
                    text = b.decode("utf-8")
                except UnicodeDecodeError:
                    text = self._tokens[i]
                # tokenizers takes an added token's id from the model vocabulary by content
                vocab.setdefault(text, i)
                added.append((i, AddedToken(text, special=False, normalized=False)))
        regex, ignore_merges = _PRE_TOKENIZERS.get(self.pre, (None, False))
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        tok = _HFTokenizer(bpe)
        if regex is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        self._add_tokens(tok, vocab, added)
        return tok

    @staticmethod
    def _add_tokens(tok: _HFTokenizer, vocab: dict, added: list) -> None:
        if added:
            tok.add_special_tokens([a for _, a in added if a.special])
            tok.add_tokens([a for _, a in added if not a.special])
            for i, a in added:
                if tok.token_to_id(a.content) != i:
                    # HF cannot give one string two ids; its text encodes to the earlier id
                    warnings.warn(f"token {i} ({a.content!r}) duplicates token {tok.token_to_id(a.content)}; "
                                  "its text encodes to the latter", stacklevel=4)

    # -- properties -----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def hf(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. to save a tokenizer.json)."""
        return self._hf

    def _check_id(self, i: Any) -> int:
        try:
            j = operator.index(i)
        except TypeError:
            raise ValueError(f"token id {i!r} is not an integer") from None
        if not 0 <= j < len(self._tokens):
            raise ValueError(f"token id {j} is out of range for vocab size {len(self._tokens)}")
        return j

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of id ``i`` (byte-level spelling, e.g. 'Ġthe')."""
        return self._tokens[self._check_id(i)]

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def token_type(self, i: int) -> int:
        return self._types[self._check_id(i)]

    def is_special(self, i: int) -> bool:
        return self._check_id(i) in self._special

    # -- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None,
               parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        BOS/EOS are added as the GGUF file says (``add_bos_token``/``add_eos_token``)
        unless overridden. With ``parse_special`` (HF's default) a control token's text,
        e.g. '<|endoftext|>', becomes its id; otherwise it is tokenized as plain text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        hf = self._hf
        if not parse_special:
            if self._hf_nospecial is None:
                self._hf_nospecial = _HFTokenizer.from_str(self._hf.to_str())
                self._hf_nospecial.encode_special_tokens = True
            hf = self._hf_nospecial
        ids = hf.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos requested but the GGUF metadata has no tokenizer.ggml.bos_token_id")
            ids.insert(0, self.bos_id)
        if self.add_eos if add_eos is None else add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos requested but the GGUF metadata has no tokenizer.ggml.eos_token_id")
            ids.append(self.eos_id)
        return ids

    def _bytes_of(self, i: Any, skip_special: bool, at_start: bool = False) -> bytes:
        """Bytes of token i; at_start: no non-control token was decoded before it (SentencePiece
        drops the prefix space there)."""
        j = self._check_id(i)
        if skip_special and j in self._special:
            return b""
        return self._token_bytes[j]

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        """The exact bytes the ids stand for (no UTF-8 validation)."""
        out, at_start = [], True
        for i in ids:
            out.append(self._bytes_of(i, skip_special, at_start))
            at_start = at_start and self._check_id(i) in self._special
        return b"".join(out)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False, tokenize: bool = False,
                            template: str | None = None, **kwargs):
        """The file's chat template (or `template`) rendered as HF's apply_chat_template renders
        it (models/chat.py); tokenize=True returns the ids (the template writes BOS itself, so no
        BOS is added)."""
        from .chat import render_chat_template
        tmpl = template if template is not None else self.chat_template
        if tmpl is None:
            raise ValueError("this tokenizer has no chat template (tokenizer.chat_template) and none was given")
        bos = self._tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self._tokens[self.eos_id] if self.eos_id is not None else ""
        text = render_chat_template(tmpl, messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                                    eos_token=eos, **kwargs)
        return self.encode(text, add_bos=False, add_eos=False) if tokenize else text

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``: byte-exact, no space clean-up, invalid UTF-8 -> U+FFFD.

        Control tokens are spelled out (e.g. '<|endoftext|>') unless ``skip_special``.
        """
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def decode_stream(self, *, skip_special: bool = False, at_start: bool = False) -> StreamDecoder:
        """An incremental decoder for generation: ``piece = sd.step(id)``, then ``sd.flush()``.
        at_start: the ids begin the text (as decode() assumes) rather than continue a prompt."""
        return StreamDecoder(self, skip_special, at_start)

    def decode_iter(self, ids: Iterable[int], *, skip_special: bool = False) -> Iterator[str]:
        """Yield non-empty text pieces as soon as complete characters are available."""
        sd = self.decode_stream(skip_special=skip_special, at_start=True)
        for i in ids:
            piece = sd.step(i)
            if piece:
                yield piece
        tail = sd.flush()
        if tail:
            yield tail

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"add_bos={self.add_bos}, pre={self.pre!r})")


class SPMTokenizer(Tokenizer):
    """SentencePiece BPE tokenizer of a GGUF model (``tokenizer.ggml.model == "llama"``: Llama 2,
    TinyLlama, Mistral), built as HF's LlamaTokenizerFast (legacy) is built from the .model file:

    * merges from the scores: every split of a piece into two vocabulary pieces is a merge,
      ranked by the merged piece's score (highest first), as transformers'
      SentencePieceExtractor orders them (ties: by id, then by the ids of the two halves);
    * normalizer: spaces become ``▁`` and, with ``tokenizer.ggml.add_space_prefix`` (llama.cpp's
      default for SPM: true), a ``▁`` is prepended; no pre-tokenizer;
    * byte fallback: text no piece covers becomes its UTF-8 bytes as ``<0xNN>`` tokens.

    Decoding maps ``▁`` back to a space, BYTE tokens to their byte, and drops the prefix space of
    the first non-control token, so ``decode(encode(s), skip_special=True) == s``."""

    def __init__(self, tokens, scores, token_types=None, *, add_space_prefix: bool = True, **kw):
        self._scores = [float(x) for x in scores]
        if len(self._scores) != len(tokens):
            raise ValueError(f"tokenizer.ggml.scores has {len(self._scores)} entries but there are {len(tokens)} tokens")
        self.add_space_prefix = bool(add_space_prefix)
        super().__init__(tokens, [], token_types, **kw)

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any]) -> "SPMTokenizer":
        model = md.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; SPMTokenizer reads 'llama' (SentencePiece) vocabularies")
        if "tokenizer.ggml.tokens" not in md:
            raise ValueError("GGUF metadata is missing 'tokenizer.ggml.tokens', required for a 'llama' tokenizer")
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("GGUF metadata is missing 'tokenizer.ggml.scores', required for a 'llama' tokenizer")
        return cls._from_md(md, [], scores=list(scores),
                            add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
                            pre=md.get("tokenizer.ggml.pre"))

    @classmethod
    def _from_md(cls, md, merges, **kw):
        scores = kw.pop("scores")

        def opt_id(key: str) -> int | None:
            v = md.get(key)
            return None if v is None else _as_int(v, key)

        tok = cls(list(md["tokenizer.ggml.tokens"]), scores, md.get("tokenizer.ggml.token_type"),
                  bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
                  unk_id=opt_id("tokenizer.ggml.unknown_token_id"), pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                  # llama.cpp's defaults for SPM vocabularies: BOS yes, EOS no
                  add_bos=bool(md.get("tokenizer.ggml.add_bos_token", True)),
                  add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)), **kw)
        tmpl = md.get("tokenizer.chat_template")
        tok.chat_template = tmpl if isinstance(tmpl, str) else None
        return tok

    def _piece_bytes(self, i: int) -> bytes:
        t, ty = self._tokens[i], self._types[i]
        if ty == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            return bytes([int(t[3:5], 16)])
        if ty in (CONTROL, UNKNOWN):
            return t.encode("utf-8")
        return t.replace("\u2581", " ").encode("utf-8")

    def _bytes_of(self, i: Any, skip_special: bool, at_start: bool = False) -> bytes:
        b = super()._bytes_of(i, skip_special, at_start)
        if at_start and self.add_space_prefix and b[:1] == b" " and self._types[self._check_id(i)] != CONTROL:
            return b[1:]
        return b

    def _build_hf(self, merges: list) -> _HFTokenizer:
        vocab: dict[str, int] = {}
        for i, t in enumerate(self._tokens):
            vocab.setdefault(t, i)
        # transformers' SentencePieceExtractor.extract, with the GGUF scores
        ranked = []
        for piece, pid in vocab.items():
            local = []
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    local.append((left, right))
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            ranked.extend((self._scores[pid], lr) for lr in local)
        ranked.sort(key=lambda x: x[0], reverse=True)          # stable: ties keep id order
        unk = self._tokens[self.unk_id] if self.unk_id is not None else None
        bpe = models.BPE(vocab=vocab, merges=[lr for _, lr in ranked], unk_token=unk, fuse_unk=True,
                         byte_fallback=True)
        tok = _HFTokenizer(bpe)
        rep = normalizers.Replace(" ", "\u2581")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), rep]) if self.add_space_prefix else rep
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        added = []
        for i, t in enumerate(self._types):
            if t == CONTROL:
                added.append((i, AddedToken(self._tokens[i], special=True, normalized=False)))
            elif t == USER_DEFINED:
                added.append((i, AddedToken(self._tokens[i].replace("\u2581", " "), special=False, normalized=False)))
        self._add_tokens(tok, vocab, added)
        return tok

    def __repr__(self) -> str:
        return (f"SPMTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"add_bos={self.add_bos}, add_space_prefix={self.add_space_prefix})")


def tokenizer_from_gguf_metadata(md: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer of a GGUF file, by its tokenizer.ggml.model ('gpt2' or 'llama')."""
    model = md.get("tokenizer.ggml.model")
    if model == "gpt2":
        return Tokenizer.from_gguf_metadata(md)
    if model == "llama":
        return SPMTokenizer.from_gguf_metadata(md)
    if model is None:
        raise ValueError("GGUF metadata has no 'tokenizer.ggml.model' key: the file carries no tokenizer")
    raise ValueError(f"tokenizer.ggml.model is {model!r}; supported tokenizer models: {', '.join(TOKENIZER_MODELS)}")
