"""Log-probabilities exactly as the model computes them: the log-softmax, in float64, of the engine's
logits (the raw next-token logits of llama.cpp, before temperature, penalties, grammars or any other
sampling step). The server formats them the OpenAI way (``flashmoe/server/logprobs.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

MAX_TOP = 20  # the most alternatives a position may list (OpenAI's limit for top_logprobs)
# rows x vocabulary float64 values converted at once (bounds the temporary arrays: 32 MiB)
_BLOCK_ELEMS = 4 << 20


@dataclass
class TokenLogprob:
    token: int
    logprob: Optional[float]  # None for the first prompt token: nothing before it predicts it
    top: List[Tuple[int, float]] = field(default_factory=list)  # the most likely tokens there, best first


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64, of logits [n, n_vocab] (or [n_vocab])."""
    x = np.asarray(rows, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_of(lp: np.ndarray, n: int) -> List[Tuple[int, float]]:
    """The ``n`` most likely tokens of one row of log-probabilities, best first (ties: the lower id)."""
    n = min(int(n), lp.shape[0])
    if n <= 0:
        return []
    idx = np.argpartition(-lp, n - 1)[:n]
    return sorted(((int(i), float(lp[i])) for i in idx), key=lambda t: (-t[1], t[0]))


def pick(rows: np.ndarray, next_tokens: Sequence[int], top_n: int) -> List[TokenLogprob]:
    """For each row of logits [n, n_vocab]: the log-probability of ``next_tokens[i]`` under it and the
    ``top_n`` most likely tokens. Converted a block of rows at a time, so the float64 copies stay small
    whatever the vocabulary."""
    if len(rows) != len(next_tokens):
        raise ValueError(f"{len(rows)} rows of logits for {len(next_tokens)} tokens")
    out: List[TokenLogprob] = []
    step = max(1, _BLOCK_ELEMS // max(1, rows.shape[-1]))
    for s in range(0, len(rows), step):
        lp = log_softmax(rows[s:s + step])
        for j in range(lp.shape[0]):
            tok = int(next_tokens[s + j])
            out.append(TokenLogprob(tok, float(lp[j, tok]), top_of(lp[j], top_n)))
    return out
