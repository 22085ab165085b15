"""What the chat layer needs to know about a model's vocabulary, computed once per model:

* ``min_tokens``: a lower bound of a text's token count in linear time (a prompt that cannot fit is
  refused before llama.cpp's tokenizer, whose special-token split is quadratic, runs);
* ``closing_bias``: the tokens that close JSON, favoured at the end of a constrained answer's budget;
* ``utf8_guard``: a logits processor that keeps a constrained answer's bytes valid UTF-8;
* ``control_in``: the first special token's text (``<|im_start|>``, ...) that a text spells out: a
  client's message that does so must stay text, never become the model's control token.
"""
from __future__ import annotations

import re
from typing import List, Optional

import numpy as np

from flashmoe import llama as llama_api


class VocabFacts:
    """Facts of one loaded model's vocabulary (a llama_cpp.Llama), each computed on first use."""

    def __init__(self, llama):
        self.llama = llama
        self._bounds = None  # (longest token in bytes, the special tokens the tokenizer splits on first)
        self._control_re = None
        self._bias_ids = None
        self._utf8 = None

    def is_eog(self, tok: int) -> bool:
        return llama_api.is_eog(self.llama, tok)

    def _vocab_bounds(self):
        """(the longest token text in bytes, the special tokens llama.cpp's tokenizer splits on first:
        [(text, lstrip, rstrip)] longest first), read from the vocabulary once."""
        if self._bounds is None:
            lc = llama_api.lowlevel()

            vocab = llama_api.vocab_ptr(self.llama)
            special = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_UNKNOWN
            longest, specials = 1, []
            for i in range(lc.llama_vocab_n_tokens(vocab)):
                text = lc.llama_vocab_get_text(vocab, i) or b""
                longest = max(longest, len(text))
                attr = int(lc.llama_vocab_get_attr(vocab, i))
                if attr & special and text:
                    specials.append((bytes(text), bool(attr & lc.LLAMA_TOKEN_ATTR_LSTRIP),
                                     bool(attr & lc.LLAMA_TOKEN_ATTR_RSTRIP)))
            specials.sort(key=lambda x: -len(x[0]))
            self._bounds = (longest, specials)
        return self._bounds

    def control_in(self, text: str) -> Optional[str]:
        """The first special token's text that ``text`` contains (llama.cpp would parse it as that token), or None."""
        if self._control_re is None:
            texts = [t.decode("utf-8", "ignore") for t, _, _ in self._vocab_bounds()[1]]
            texts = [t for t in texts if t]
            self._control_re = re.compile("|".join(map(re.escape, texts))) if texts else re.compile(r"(?!x)x")
        m = self._control_re.search(text)
        return m.group(0) if m else None

    def min_tokens(self, text: str, limit: int) -> int:
        """A lower bound of ``len(self.tokenize(text))``, in time linear in the text (llama.cpp's own
        special-token split is quadratic in their number): the special tokens it would split off
        (the same longest-first partition), plus the other bytes over 4x the longest token. Stops
        counting once past ``limit``. Used to refuse a prompt that cannot fit before tokenizing it."""
        longest, specials = self._vocab_bounds()
        b = text.encode("utf-8", "replace")
        per = 4 * longest  # a token never covers more bytes than its text has, x4 for normalization
        if len(b) // per > limit:
            return len(b) // per
        ws = b" \t\n\v\f\r"
        segs = [(0, len(b))]
        matched = 0
        for t, lstrip, rstrip in specials:
            if t not in b:
                continue
            out = []
            tl = len(t)
            for a, e in segs:
                pos = a
                while True:
                    m = b.find(t, pos, e)
                    if m < 0:
                        break
                    left = m
                    if lstrip:
                        while left > pos and b[left - 1] in ws:
                            left -= 1
                    if left > pos:
                        out.append((pos, left))
                    matched += 1
                    if matched > limit:
                        return matched
                    pos = m + tl
                    if rstrip:
                        while pos < e and b[pos] in ws:
                            pos += 1
                if pos < e:
                    out.append((pos, e))
            segs = out
        raw = sum(e - a for a, e in segs)
        return matched + (raw + per - 1) // per


    def closing_bias(self):
        """(ids, biases) favouring tokens that close JSON (and the end of turn), computed once."""
        if self._bias_ids is None:
            L = self.llama
            ids, bias = [], []
            for i in range(L.n_vocab()):
                if self.is_eog(i):
                    ids.append(i)
                    bias.append(100.0)
                    continue
                try:
                    piece = L.detokenize([i]).decode("utf-8")
                except (UnicodeDecodeError, Exception):
                    continue
                s = piece.strip()
                if not s or not set(s) <= set('"}],'):
                    continue
                # first close the string being written (inside a string } and ] are just text),
                # then objects and arrays; a comma (next member) only when nothing closes
                if "," in s:
                    b = 20.0
                elif s[0] == '"':
                    b = 80.0 + len(s)
                else:
                    b = 50.0 + len(s)
                ids.append(i)
                bias.append(b)
            self._bias_ids = (np.array(ids, dtype=np.int64), np.array(bias, dtype=np.float32))
        return self._bias_ids

    # UTF-8 validity, byte by byte: the state says what the next byte may be (RFC 3629's table)
    _U8_NEXT = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0xA0, 0xBF, 1), 4: (0x80, 0x9F, 1),
                5: (0x80, 0xBF, 2), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}

    @classmethod
    def _u8_step(cls, state: int, b: int) -> int:
        """The next UTF-8 state after byte ``b`` (0: between characters), or -1 for an invalid byte."""
        if state:
            lo, hi, nxt = cls._U8_NEXT[state]
            return nxt if lo <= b <= hi else -1
        if b < 0x80:
            return 0
        if 0xC2 <= b <= 0xDF:
            return 1
        if b == 0xE0:
            return 3
        if b == 0xED:
            return 4
        if 0xE1 <= b <= 0xEF:
            return 2
        if b == 0xF0:
            return 6
        if 0xF1 <= b <= 0xF3:
            return 5
        if b == 0xF4:
            return 7
        return -1

    def _utf8_tables(self):
        """(tokens invalid between characters, {state: tokens valid in that state}, {token: [next state
        per state]} for the tokens that are not whole UTF-8 text), computed once per model."""
        if self._utf8 is None:
            L = self.llama
            n_states = 8
            bad0, allowed, trans = [], {s: [] for s in range(1, n_states)}, {}
            for i in range(L.n_vocab()):
                b = L.detokenize([i])
                try:
                    b.decode("utf-8")
                    whole = True
                except UnicodeDecodeError:
                    whole = False
                if whole and b:
                    continue  # from between characters to between characters; never inside one
                row = []
                for st in range(n_states):
                    cur = st
                    for byte in b:
                        cur = self._u8_step(cur, byte)
                        if cur < 0:
                            break
                    row.append(cur)
                trans[i] = row
                if row[0] < 0:
                    bad0.append(i)
                for st in range(1, n_states):
                    if row[st] >= 0:
                        allowed[st].append(i)
            self._utf8 = (np.array(bad0, dtype=np.int64),
                          {k: np.array(v, dtype=np.int64) for k, v in allowed.items()}, trans)
        return self._utf8

    def utf8_guard(self, out: List[int]):
        """A logits processor that only lets through tokens keeping the answer's bytes valid UTF-8."""
        bad0, allowed, trans = self._utf8_tables()
        st = [0, 0]  # UTF-8 state, tokens of ``out`` accounted for

        def guard(_input_ids, scores):
            for tok in out[st[1]:]:
                row = trans.get(tok)
                st[0] = (0 if st[0] == 0 else -1) if row is None else row[st[0]]
                if st[0] < 0:
                    st[0] = 0  # cannot happen under the mask; start over rather than block everything
            st[1] = len(out)
            if st[0] == 0:
                if len(bad0):
                    scores[bad0] = -np.inf
            else:
                ok = allowed[st[0]]
                keep = scores[ok].copy()
                scores[:] = -np.inf
                scores[ok] = keep
            return scores

        return guard
