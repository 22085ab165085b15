#!/usr/bin/env python3
"""Makes two small lm-evaluation-harness tasks from flashmoe's packaged text (flashmoe/data/quality.txt:
Austen's *Pride and Prejudice*, chapters 1-3, and the opening of Melville's *Moby-Dick*; both books are
in the training corpus of the small real model, flashmoe/data/real-moe-22m-q8_0.gguf, so it does much
better than chance on them). Nothing is downloaded; the output is deterministic (seeded).

* ``flashmoe_cloze`` (multiple choice, scored by log-likelihood): a sentence, with the sentences before
  it in its paragraph as context (at most ``--context-words`` words in all), and its last word to pick
  among four: the real one and three other words of the text (seeded draw). Metrics: acc, acc_norm.
* ``flashmoe_next_word`` (generate_until, greedy): the same kind of context cut inside a sentence; the
  model writes on (at most 6 tokens, until a newline) and the first word it writes must be the text's
  next word (exact match, case ignored).
* ``flashmoe_paragraphs`` (loglikelihood_rolling): each paragraph of the text, scored whole; lm-eval's
  word and byte perplexity and bits per byte (the measures of its wikitext task).

    python scripts/lm_eval/make_tasks.py            # writes scripts/lm_eval/tasks/*.jsonl

The YAML files beside them (hand-written) point lm-eval at the jsonl files with ``dataset_path: json``
and ``data_files`` relative to the repository root: run lm_eval from there (docs/QUALITY.md).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SENT = re.compile(r'(?<=[.!?])["\u201d\']?\s+(?=["\u201c\']?[A-Z])')
_WORD = re.compile(r"^[A-Za-z]+$")


def paragraphs() -> list:
    sys.path.insert(0, ROOT)
    from flashmoe.quality import load_text

    text, _label = load_text()  # the packaged text, without its '#' header
    return [p.strip() for p in text.split("\n") if p.strip()]


def _bare(word: str) -> str:
    return word.strip('.,;:!?"\'()\u201c\u201d\u2018\u2019-_')


def _context(before: list, words: list, limit: int) -> str:
    """The paragraph's earlier sentences and ``words``, cut from the left to at most ``limit`` words."""
    ctx = " ".join(before + words).split()
    return " ".join(ctx[-limit:])


def cloze_docs(paras: list, rng: random.Random, limit: int) -> list:
    pool = sorted({_bare(w).lower() for p in paras for w in p.split() if len(_bare(w)) >= 3 and _WORD.match(_bare(w))})
    docs = []
    for p in paras:
        sents = _SENT.split(p)
        for i, s in enumerate(sents):
            words = s.split()
            last = _bare(words[-1]) if words else ""
            if len(words) < 6 or len(last) < 3 or not _WORD.match(last):
                continue
            wrong = rng.sample([w for w in pool if w != last.lower()], 3)
            choices = wrong + [last]
            rng.shuffle(choices)
            docs.append({"context": _context(sents[:i], words[:-1], limit), "choices": choices,
                         "label": choices.index(last)})
    return docs


def next_word_docs(paras: list, rng: random.Random, limit: int) -> list:
    docs = []
    for p in paras:
        sents = _SENT.split(p)
        for i, s in enumerate(sents):
            words = s.split()
            if len(words) < 8:
                continue
            k = rng.randrange(4, len(words) - 1)
            target = _bare(words[k])
            if not _WORD.match(target) or words[k] != target:  # a plain word, no punctuation around it
                continue
            docs.append({"context": _context(sents[:i], words[:k], limit), "target": target})
    return docs


def paragraph_docs(paras: list, rng: random.Random, limit: int) -> list:
    return [{"text": p} for p in paras]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "scripts", "lm_eval", "tasks"))
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--context-words", type=int, default=64)
    a = ap.parse_args()
    paras = paragraphs()
    for name, make in (("cloze", cloze_docs), ("next_word", next_word_docs), ("paragraphs", paragraph_docs)):
        docs = make(paras, random.Random(f"{a.seed}-{name}"), a.context_words)
        path = os.path.join(a.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        print(f"{path}: {len(docs)} documents")


if __name__ == "__main__":
    main()
