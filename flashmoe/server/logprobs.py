"""Log-probabilities in OpenAI's two formats.

* ``/v1/completions`` (the legacy format): ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``, one entry per token: with ``echo``, the prompt's tokens first (the first one has no
  log-probability: null, and null alternatives), then the generated ones, then the end-of-generation
  token when one ended the answer (its text is not part of ``text``; lm-evaluation-harness counts on
  that entry being there after the prompt's). ``top_logprobs[i]`` maps the text of each of the N most
  likely tokens to its log-probability, plus the chosen token's (up to N+1 entries, as OpenAI's).
  ``text_offset[i]``: where token i starts in ``text`` (in characters).
* ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}] x N}]}`` for the answer's tokens.

A token's text is its bytes decoded as UTF-8, or ``bytes:\\xNN...`` when they are not whole UTF-8
characters (a piece of a byte-level token), as OpenAI writes them.
"""
from __future__ import annotations

import codecs
from typing import Dict, List, Optional, Sequence

from flashmoe.chat import ChatModel, GenResult, TokenLogprob


class TokenText:
    """Token id -> (text, bytes), detokenized once per id (special tokens spelled out)."""

    def __init__(self, model: ChatModel):
        self.llama = model.llama
        self._cache: Dict[int, bytes] = {}

    def raw(self, tok: int) -> bytes:
        b = self._cache.get(tok)
        if b is None:
            b = self._cache[tok] = bytes(self.llama.detokenize([tok], special=True))
        return b

    def text(self, tok: int) -> str:
        b = self.raw(tok)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _offsets(pieces: Sequence[bytes], start: int) -> List[int]:
    """Where each piece starts in the text they decode to (characters), from ``start``."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, pos = [], start
    for b in pieces:
        out.append(pos)
        pos += len(dec.decode(b))
    return out


def completion_logprobs(model: ChatModel, g: GenResult, *, echo: bool, echo_text: str, skip_bos: bool) -> dict:
    """The legacy ``logprobs`` object of a completion (``g`` generated with logprobs, and with
    prompt_logprobs when ``echo``). ``skip_bos``: the prompt's first token is a BOS the server added
    (it has no text in ``echo_text``)."""
    tt = TokenText(model)
    prompt: List[TokenLogprob] = list(g.prompt_logprobs or []) if echo else []
    gen = list(g.logprobs or [])
    entries = prompt + gen + ([g.end_logprob] if g.end_logprob is not None else [])
    L = model.llama
    p_pieces = [b"" if (i == 0 and skip_bos) else tt.raw(e.token) for i, e in enumerate(prompt)]
    g_pieces = [bytes(L.detokenize([e.token])) for e in gen]  # as the text was written (specials: no text)
    base = len(echo_text) if echo else 0
    offsets = _offsets(p_pieces, 0) + _offsets(g_pieces, base)
    if g.end_logprob is not None:
        offsets.append(base + len(g.text))
    return {
        "tokens": [tt.text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_top_dict(tt, e) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(tt: TokenText, e: TokenLogprob) -> Optional[Dict[str, float]]:
    if e.logprob is None:
        return None
    d = {tt.text(t): lp for t, lp in e.top}
    if all(t != e.token for t, _ in e.top):  # the chosen token is always listed (OpenAI: up to N+1)
        d.setdefault(tt.text(e.token), e.logprob)
    return d


def chat_logprobs(model: ChatModel, g: GenResult) -> dict:
    """The chat ``logprobs`` object: ``{"content": [...], "refusal": None}``."""
    tt = TokenText(model)

    def one(tok: int, lp: float) -> dict:
        return {"token": tt.text(tok), "logprob": lp, "bytes": list(tt.raw(tok))}

    content = [{**one(e.token, e.logprob if e.logprob is not None else 0.0),
                "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in (g.logprobs or [])]
    return {"content": content, "refusal": None}
