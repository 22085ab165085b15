"""The tokenizer of the synthetic models: a byte-fallback SentencePiece (SPM) vocabulary.

    from gguf_tools.vocab import build_vocab

    tokens, scores, types = build_vocab(512)   # exactly 512 entries; every UTF-8 text round-trips

Written into every model ``gguf_tools.synth`` makes (``tokenizer.ggml.*``), with the ChatML control
tokens and the tool-call tokens the chat template (``gguf_tools.chat_template``) uses.
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

from gguf_tools.errors import UsageError

MIN_VOCAB = 512
MAX_VOCAB = 1 << 20

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
USER_DEFINED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
SPACE = "\u2581"  # SentencePiece's visible space

# a small built-in word list: the merged pieces start with these (and their prefixes)
_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there one all we can has their been if more when will would who so no what up out
about into than them could other some time only then its also new like very first two over after any
how these may our just where most way did use each make many such well much between must before here
through back years where under never same another while last might great since against right came take
three being still good those people long both world own day life work part find number should down
because system group state come even give general know however show end point case house water place
hello model token tokens text word words data file files expert experts layer layers memory disk read
write cache stream fast slow test tests value values function call tool tools name arguments result
def return self import from class none true false print if else elif for while in range len list dict
str int float json yes ok please thanks user assistant system answer question weather city today
""".split()
_ALPHABET = "etaoinshrdlcumwfgypbvkjxqz"


def _pieces() -> Iterable[str]:
    """Candidate normal pieces, in the order they enter the vocabulary (duplicates are skipped there)."""
    yield SPACE
    for c in range(0x21, 0x7F):
        yield chr(c)
    for w in _WORDS:
        sw = SPACE + w
        for k in range(2, len(sw) + 1):
            yield sw[:k]
        for k in range(2, len(w) + 1):
            yield w[:k]
    # letter n-grams (and their spaced forms), shortest first, by letter frequency
    grams = [""]
    for _length in range(1, 6):
        grams = [g + c for g in grams for c in _ALPHABET]
        for g in grams:
            if len(g) >= 2:
                yield g
            yield SPACE + g
    n = 0
    while True:  # practically unreachable (26^5 grams); keeps the vocab exact for huge sizes
        yield f"<|filler_{n}|>"
        n += 1


def build_vocab(n_vocab: int) -> Tuple[List[str], List[float], List[int]]:
    """tokens, scores, token types of a byte-fallback SPM vocab of exactly n_vocab entries.

    Layout: 0 <unk>, 1 <s>, 2 </s>, 3..258 the 256 byte tokens <0x00>..<0xFF>, then the ChatML
    control tokens and the tool/think user-defined tokens, then normal pieces ('▁' is a space):
    '▁', printable ASCII, common words and their prefixes (so that merges reach them), then letter
    n-grams until the vocab is full. Every UTF-8 text round-trips (unknown characters fall back to
    byte tokens).
    """
    if n_vocab < MIN_VOCAB:
        raise UsageError(f"--vocab = {n_vocab} is too small (at least {MIN_VOCAB})")
    tokens: List[str] = ["<unk>", "<s>", "</s>"]
    types: List[int] = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    tokens += CONTROL_TOKENS
    types += [TOKEN_CONTROL] * len(CONTROL_TOKENS)
    tokens += USER_DEFINED_TOKENS
    types += [TOKEN_USER_DEFINED] * len(USER_DEFINED_TOKENS)
    n_fixed = len(tokens)
    seen = set(tokens)

    normal: List[str] = []
    want = n_vocab - n_fixed
    for p in _pieces():
        if len(normal) >= want:
            break
        if p in seen:
            continue
        seen.add(p)
        normal.append(p)
    tokens += normal
    types += [TOKEN_NORMAL] * len(normal)
    scores = [0.0] * n_fixed + [-float(i) for i in range(len(normal))]
    assert len(tokens) == n_vocab
    return tokens, scores, types
