"""Output quality of a model variant against a reference: KL divergence, top-1 agreement, perplexity (issue #9).

    from flashmoe.quality import measure_quality

    rep = measure_quality("model.gguf", "model-q2.gguf", n_tokens=2048)          # another file
    rep = measure_quality("model.gguf", vs_policy="fewer-experts.yaml")          # the same file, another policy
    print(rep.format()); rep.to_dict()

Both runs go over the same tokens the way llama.cpp's perplexity tool does (``llama-perplexity
--kl-divergence``): the text is cut into chunks of ``n_ctx`` tokens, each evaluated from an empty
context with the first token replaced by BOS (when the vocabulary adds one), with logits for every
position; only the second half of each chunk is scored (every scored token has at least n_ctx/2 tokens
of context). For each scored position: the reference's and the candidate's log-probabilities of the
next token (-> perplexity of each), KL(reference || candidate) of the two next-token distributions,
and whether both put the same token first (top-1 agreement).

Memory stays bounded: the reference runs first and its log-probabilities of the scored positions go to
a temporary file (float32, n_scored x n_vocab: the size is reported, ``tmp_dir`` chooses where); the
candidate then runs and is compared block by block. Only one model is loaded at a time. Identical
logits give a KL divergence of exactly 0.
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from flashmoe import llama as llama_api
from flashmoe.errors import FlashMoEError, UsageError

if TYPE_CHECKING:
    from flashmoe.engine import Engine

DEFAULT_CTX = 512
# rows x vocab floats handled at once when computing log-softmax / KL (bounds the temporary arrays)
_BLOCK_ELEMS = 8 << 20


# ------------------------------------------------------------------------------------ the text


def default_text_path() -> str:
    """The packaged evaluation text (flashmoe/data/quality.txt)."""
    try:
        from importlib.resources import files

        p = files("flashmoe").joinpath("data/quality.txt")
        return str(p)
    except Exception:  # pragma: no cover - very old importlib
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quality.txt")


def load_text(path: Optional[str] = None) -> Tuple[str, str]:
    """(text, label). The packaged text's header (leading '#' lines: its source) is left out."""
    packaged = path is None
    p = default_text_path() if path is None else os.fspath(path)
    try:
        with open(p, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FlashMoEError(f"no such file: {p}") from None
    except UnicodeDecodeError:
        raise FlashMoEError(f"{p}: not a text (UTF-8) file") from None
    except OSError as e:
        raise FlashMoEError(f"cannot read {p}: {e.strerror or e}") from None
    if packaged:
        lines = text.splitlines(keepends=True)
        i = 0
        while i < len(lines) and lines[i].startswith("#"):
            i += 1
        if i and i < len(lines) and not lines[i].strip():  # the blank line after the header
            i += 1
        text = "".join(lines[i:])
    if not text.strip():
        raise FlashMoEError(f"{p}: the text is empty")
    return text, ("flashmoe/data/quality.txt (packaged)" if packaged else p)


# ------------------------------------------------------------------------------------ one model


class _Runner:
    """An Engine evaluating chunks with logits for chosen positions (the engine's Llama, low level)."""

    def __init__(self, path: str, policy: Optional[str], n_ctx: int, threads: Optional[int],
                 use_extra_bufts: Optional[bool], experts_per_token: Optional[int] = None, verbose: bool = False):
        from flashmoe.engine import Engine

        self.path = path
        self.policy = policy
        self.engine: Optional[Engine] = Engine(path, policy=policy, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                             n_ubatch=min(n_ctx, 512),
                             n_threads=threads, use_extra_bufts=use_extra_bufts, n_expert_used=experts_per_token,
                             verbose=verbose)
        L = self.engine.llama
        self.L = L
        self.n_vocab = int(L.n_vocab())
        self.n_batch = int(L.n_batch)
        self.add_bos = llama_api.adds_bos(L)
        self.bos = int(L.token_bos())
        if int(L.n_ctx()) < n_ctx:
            self.close()
            raise FlashMoEError(f"{os.path.basename(path)}: the context holds {L.n_ctx()} tokens, less than {n_ctx}")

    def _open(self) -> Engine:
        if self.engine is None:
            raise FlashMoEError(f"{os.path.basename(self.path)}: the model was closed")
        return self.engine

    @property
    def mode(self) -> str:
        return self._open().mode_line()

    def tokenize(self, text: str) -> List[int]:
        return list(self.L.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _clear(self) -> None:
        llama_api.clear_memory(self.L)

    def chunk_logits(self, tokens: List[int], first: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Evaluate one chunk from an empty context; yield (position, logits [n, n_vocab] float32) for the
        positions first .. len(tokens)-2 (each predicts the next token), batch by batch."""
        self._clear()
        n = len(tokens)
        last = n - 1  # the last position predicts nothing inside the chunk
        for s in range(0, n, self.n_batch):
            e = min(n, s + self.n_batch)
            try:
                rows = llama_api.decode_rows(self.L, tokens[s:e], s, lambda i: first <= i < last)
            except RuntimeError as err:
                raise self._open().decode_error(err) from None
            if rows is not None:
                yield max(s, first), rows
        self.L.n_tokens = 0

    def close(self) -> None:
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()
        self.engine = None
        self.L = None
        gc.collect()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    mx = x.max(axis=1, keepdims=True)
    z = x - mx
    lse = np.log(np.exp(z).sum(axis=1, dtype=np.float64, keepdims=True)).astype(np.float32)
    return z - lse


# ------------------------------------------------------------------------------------ the report


@dataclass
class QualityReport:
    reference: str
    candidate: str
    reference_policy: Optional[str]
    candidate_policy: Optional[str]
    reference_mode: str
    candidate_mode: str
    text: str
    n_ctx: int
    n_chunks: int
    n_tokens: int  # tokens evaluated by each model
    n_scored: int  # positions compared
    ppl_reference: float
    ppl_reference_err: float
    ppl_candidate: float
    ppl_candidate_err: float
    ln_ppl_ratio: float  # mean(nll_candidate - nll_reference) = ln(PPL(cand)/PPL(ref))
    ln_ppl_ratio_err: float
    kl_mean: float
    kl_mean_err: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # fraction of scored positions where both rank the same token first
    top1_same: int
    reference_seconds: float
    candidate_seconds: float
    tmp_bytes: int  # the reference log-probabilities file
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        def name(path, pol):
            return os.path.basename(path) + (f" (policy {pol})" if pol else "")

        lines = [
            f"reference: {name(self.reference, self.reference_policy)}: {self.reference_mode}",
            f"candidate: {name(self.candidate, self.candidate_policy)}: {self.candidate_mode}",
            f"text: {self.text}; {self.n_chunks} chunks of {self.n_ctx} tokens ({self.n_tokens} tokens), "
            f"{self.n_scored} positions scored (the second half of each chunk)",
            "",
            f"  perplexity, reference     {self.ppl_reference:12.4f} +/- {self.ppl_reference_err:.4f}",
            f"  perplexity, candidate     {self.ppl_candidate:12.4f} +/- {self.ppl_candidate_err:.4f}",
            f"  ln(PPL(cand)/PPL(ref))    {self.ln_ppl_ratio:12.6f} +/- {self.ln_ppl_ratio_err:.6f}",
            f"  KL divergence, mean       {self.kl_mean:12.6f} +/- {self.kl_mean_err:.6f}",
            f"  KL divergence, median     {self.kl_median:12.6f}",
            f"  KL divergence, 90%        {self.kl_p90:12.6f}",
            f"  KL divergence, 99%        {self.kl_p99:12.6f}",
            f"  KL divergence, max        {self.kl_max:12.6f}",
            f"  top-1 agreement           {100 * self.top1_agreement:11.2f}% ({self.top1_same}/{self.n_scored})",
            "",
            f"time: reference {self.reference_seconds:.1f} s, candidate {self.candidate_seconds:.1f} s "
            f"({self.n_tokens / max(self.candidate_seconds, 1e-9):.1f} tokens/s)",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x) / math.sqrt(len(x) - 1)) if len(x) > 1 else 0.0


# ------------------------------------------------------------------------------------ measure


@dataclass
class _Chunks:
    """The text cut into chunks of n_ctx tokens (the first replaced by BOS when the vocabulary adds one),
    and which positions of each are scored."""

    tokens: List[int]  # the whole text's
    chunks: List[List[int]]
    first: int  # the first scored position of a chunk
    per_chunk: int  # scored positions per chunk

    @property
    def n_scored(self) -> int:
        return len(self.chunks) * self.per_chunk


@dataclass
class _Reference:
    """The reference run's scores: log-probabilities (a memory-mapped file), next-token NLL, top token."""

    lp: np.memmap  # [n_scored, n_vocab] float32
    nll: np.ndarray
    top: np.ndarray
    mode: str
    tmp_bytes: int


@dataclass
class _Candidate:
    """The candidate run's scores, against the reference's."""

    nll: np.ndarray
    kl: np.ndarray
    same: np.ndarray  # both rank the same token first
    mode: str


def measure_quality(
    reference: str,
    candidate: Optional[str] = None,
    *,
    policy: Optional[str] = None,
    vs_policy: Optional[str] = None,
    experts_per_token: Optional[int] = None,
    vs_experts_per_token: Optional[int] = None,
    text: Optional[str] = None,
    text_path: Optional[str] = None,
    n_tokens: int = 0,
    n_ctx: int = DEFAULT_CTX,
    threads: Optional[int] = None,
    use_extra_bufts: Optional[bool] = None,
    tmp_dir: Optional[str] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> QualityReport:
    """Run ``reference`` (under ``policy``) and ``candidate`` (default: the reference file, under
    ``vs_policy``; ``experts_per_token`` / ``vs_experts_per_token`` override the policies) over the same
    text and compare their next-token distributions. ``n_tokens``: tokens of the text to use (whole
    chunks; 0 = all of it). See the module docstring."""
    say = log or (lambda s: None)
    reference = os.fspath(reference)
    candidate = os.fspath(candidate) if candidate else reference
    _check_request(reference, candidate, n_ctx, n_tokens)
    text, label = load_text(text_path) if text is None else (text, "(given text)")
    notes: List[str] = []
    if candidate == reference and (vs_policy or None) == (policy or None) and experts_per_token == vs_experts_per_token:
        notes.append("the candidate is the reference itself (same file, same policy): the KL divergence "
                     "should be 0 and the top-1 agreement 100%")
    t0 = time.monotonic()
    ref = _Runner(reference, policy, n_ctx, threads, use_extra_bufts, experts_per_token)
    tmp_folder = None
    try:
        ch = _cut(ref, ref.tokenize(text), n_ctx, n_tokens, notes)
        tmp_folder = tempfile.mkdtemp(prefix="flashmoe-quality-", dir=tmp_dir)
        refs = _run_reference(ref, ch, tmp_folder, progress, say)
        t_ref = time.monotonic() - t0
        t1 = time.monotonic()
        cand = _Runner(candidate, vs_policy, n_ctx, threads, use_extra_bufts, vs_experts_per_token)
        try:
            cands = _run_candidate(cand, ref, text, ch, refs, progress, say)
        finally:
            cand.close()
        t_cand = time.monotonic() - t1
    finally:
        ref.close()
        if tmp_folder:
            shutil.rmtree(tmp_folder, ignore_errors=True)
    return QualityReport(
        reference=reference, candidate=candidate, reference_policy=policy, candidate_policy=vs_policy,
        reference_mode=refs.mode, candidate_mode=cands.mode, text=label, n_ctx=n_ctx, n_chunks=len(ch.chunks),
        n_tokens=len(ch.chunks) * n_ctx, n_scored=ch.n_scored, **_scores(refs, cands),
        reference_seconds=t_ref, candidate_seconds=t_cand, tmp_bytes=refs.tmp_bytes, notes=notes,
    )


def _check_request(reference: str, candidate: str, n_ctx: int, n_tokens: int) -> None:
    for p in (reference, candidate):
        if not os.path.exists(p):
            raise FlashMoEError(f"no such file: {p}")
    if n_ctx < 8:
        raise UsageError(f"--ctx {n_ctx} is too small (at least 8 tokens)")
    if n_tokens < 0:
        raise UsageError("--tokens must be 0 (all of the text) or more")


def _cut(ref: _Runner, tokens: List[int], n_ctx: int, n_tokens: int, notes: List[str]) -> _Chunks:
    """The chunks of the text's first ``n_tokens`` tokens (0: all of them); a FlashMoEError when not one fits."""
    avail = len(tokens)
    want = avail if n_tokens == 0 else min(n_tokens, avail)
    n_chunks = want // n_ctx
    if n_chunks < 1:
        raise FlashMoEError(f"the text has {avail} tokens" + (f" (--tokens {n_tokens})" if n_tokens else "")
                            + f": not one chunk of --ctx {n_ctx}; lower --ctx or give a longer --text")
    if n_tokens > avail:
        notes.append(f"--tokens {n_tokens}: the text has only {avail} tokens")
    first = n_ctx // 2
    chunks = []
    for c in range(n_chunks):
        ch = tokens[c * n_ctx:(c + 1) * n_ctx]
        if ref.add_bos:
            ch = [ref.bos] + ch[1:]
        chunks.append(ch)
    return _Chunks(tokens, chunks, first, n_ctx - 1 - first)


def _run_reference(ref: _Runner, ch: _Chunks, tmp_folder: str, progress: bool,
                   say: Callable[[str], None]) -> _Reference:
    """Runs the reference; its log-probabilities go to a file in tmp_folder. The reference is closed after."""
    from gguf_tools.atomic import check_free_space, human_bytes

    n_scored, V = ch.n_scored, ref.n_vocab
    tmp_bytes = n_scored * V * 4
    check_free_space(os.path.join(tmp_folder, "x"), tmp_bytes, margin=16 << 20)
    if tmp_bytes >= (64 << 20):
        say(f"reference log-probabilities: {human_bytes(tmp_bytes)} in {tmp_folder}")
    lp_file = np.lib.format.open_memmap(os.path.join(tmp_folder, "reference-logprobs.npy"), mode="w+",
                                        dtype=np.float32, shape=(n_scored, V))
    out = _Reference(lp_file, np.empty(n_scored, dtype=np.float64), np.empty(n_scored, dtype=np.int64), ref.mode,
                     tmp_bytes)
    _run(ref, ch.chunks, ch.first, ch.per_chunk, "reference", progress, say,
         lambda k, lp, nxt: _take_ref(k, lp, nxt, out.lp, out.nll, out.top))
    out.lp.flush()
    ref.close()
    return out


def _run_candidate(cand: _Runner, ref: _Runner, text: str, ch: _Chunks, refs: _Reference, progress: bool,
                   say: Callable[[str], None]) -> _Candidate:
    """Runs the candidate over the same chunks (after checking it has the reference's tokenizer) and compares."""
    if cand.n_vocab != ref.n_vocab:
        raise FlashMoEError(f"the candidate's vocabulary has {cand.n_vocab} tokens, the reference's {ref.n_vocab}: "
                            "comparing next-token distributions needs the same tokenizer")
    if cand.tokenize(text) != ch.tokens:
        raise FlashMoEError("the candidate tokenizes the text differently from the reference: comparing "
                            "next-token distributions needs the same tokenizer")
    if cand.add_bos != ref.add_bos or (cand.add_bos and cand.bos != ref.bos):
        raise FlashMoEError("the candidate's BOS token differs from the reference's")
    n = ch.n_scored
    out = _Candidate(np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64), np.empty(n, dtype=bool),
                     cand.mode)
    _run(cand, ch.chunks, ch.first, ch.per_chunk, "candidate", progress, say,
         lambda k, lp, nxt: _take_cand(k, lp, nxt, refs.lp, refs.top, out.nll, out.kl, out.same))
    return out


def _scores(r: _Reference, c: _Candidate) -> Dict[str, Any]:
    """The report's figures: perplexities, their log ratio, the KL divergence's distribution, top-1 agreement."""
    d = c.nll - r.nll
    kl, same = c.kl, c.same
    ppl_r, ppl_c = math.exp(r.nll.mean()), math.exp(c.nll.mean())
    return dict(
        ppl_reference=float(ppl_r), ppl_reference_err=float(ppl_r) * _stderr(r.nll),
        ppl_candidate=float(ppl_c), ppl_candidate_err=float(ppl_c) * _stderr(c.nll),
        ln_ppl_ratio=float(d.mean()), ln_ppl_ratio_err=_stderr(d),
        kl_mean=float(kl.mean()), kl_mean_err=_stderr(kl), kl_median=float(np.median(kl)),
        kl_p90=float(np.percentile(kl, 90)), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
        top1_agreement=float(same.mean()), top1_same=int(same.sum()),
    )


def _run(runner: _Runner, chunks: List[List[int]], first: int, per_chunk: int, label: str, progress: bool,
         say: Callable[[str], None], take: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
    """Evaluate every chunk; call take(k, logprobs [n, V], next tokens [n]) for scored rows k.. k+n-1."""
    V = runner.n_vocab
    sub = max(1, _BLOCK_ELEMS // V)
    t0 = time.monotonic()
    for c, ch in enumerate(chunks):
        nxt_all = np.asarray(ch, dtype=np.int64)
        for pos, rows in runner.chunk_logits(ch, first):
            for r0 in range(0, rows.shape[0], sub):
                blk = rows[r0: r0 + sub]
                p0 = pos + r0
                lp = _log_softmax(blk)
                k = c * per_chunk + (p0 - first)
                take(k, lp, nxt_all[p0 + 1: p0 + 1 + blk.shape[0]])
        if progress:
            el = time.monotonic() - t0
            tps = (c + 1) * len(ch) / max(el, 1e-9)
            msg = f"{label}: chunk {c + 1}/{len(chunks)}, {tps:.1f} tokens/s"
            if sys.stderr.isatty():
                sys.stderr.write("\r" + msg + ("\n" if c + 1 == len(chunks) else "\x1b[K"))
                sys.stderr.flush()
            else:
                say(msg)


def _take_ref(k, lp, nxt, ref_lp, ref_nll, ref_top):
    n = lp.shape[0]
    ref_lp[k: k + n] = lp
    ref_nll[k: k + n] = -lp[np.arange(n), nxt]
    ref_top[k: k + n] = lp.argmax(axis=1)


def _take_cand(k, lp, nxt, ref_lp, ref_top, cand_nll, kl, same):
    n = lp.shape[0]
    r = np.asarray(ref_lp[k: k + n])
    kl[k: k + n] = (np.exp(r) * (r - lp)).sum(axis=1, dtype=np.float64)
    cand_nll[k: k + n] = -lp[np.arange(n), nxt]
    same[k: k + n] = lp.argmax(axis=1) == ref_top[k: k + n]
