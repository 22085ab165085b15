"""Routing traces: expert ids per token per layer (docs/trace-format.md).

A trace is what the hook records (``record_trace``) and what it replays to force the routing
(``routing_trace``). File format "FMRT" v1/v2, little-endian:

    char[4]  magic "FMRT"
    u32      version (1, or 2 with flags)
    u32      n_layers          MoE layers in the trace
    u32      n_used            experts per token
    u32      n_expert          experts per layer
    u32      flags (v2; bit 0: predicted ids follow) / reserved 0 (v1)
    u64      n_tokens
    i32      layers[n_layers]  the model layer index of each column
    i32      ids[n_tokens][n_layers][n_used]
    i32      pred[n_tokens][n_layers][n_used]   (v2, flag bit 0) the predicted experts, -1: none

Forced routing: each MoE layer keeps a cursor; each evaluated token takes the next row (wrapping
around at the end). ``Engine.generate`` rewinds the cursors, so every run replays the same rows.
"""
from __future__ import annotations

import os
import stat
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from flashmoe.errors import FlashMoEError

MAGIC = b"FMRT"
VERSION = 1
VERSION_PRED = 2  # with predicted sets (flags bit 0)
_HDR = struct.Struct("<4s5IQ")


@dataclass
class Trace:
    layers: List[int]
    n_expert: int
    ids: np.ndarray  # int32 [n_tokens, n_layers, n_used]
    kind: str = "recorded"
    # optional: the experts predicted for each token and layer before its routing ran (-1: none), what
    # the hook reads ahead with prefetch on (docs/trace-format.md)
    pred: Optional[np.ndarray] = None
    predict_accuracy: Optional[float] = None  # the accuracy `trace gen --predict-accuracy` drew them with

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_used(self) -> int:
        return int(self.ids.shape[2])


def write_trace(path: str, tr: Trace) -> None:
    from gguf_tools.atomic import atomic_write

    ids = np.ascontiguousarray(tr.ids, dtype="<i4")
    n_tok, n_lay, n_used = ids.shape
    with atomic_write(path) as f:
        if tr.pred is None:
            f.write(_HDR.pack(MAGIC, VERSION, n_lay, n_used, tr.n_expert, 0, n_tok))
        else:
            if tr.pred.shape != ids.shape:
                raise FlashMoEError(f"predicted sets {tr.pred.shape} do not match the routing {ids.shape}")
            f.write(_HDR.pack(MAGIC, VERSION_PRED, n_lay, n_used, tr.n_expert, 1, n_tok))
        f.write(np.asarray(tr.layers, dtype="<i4").tobytes())
        f.write(ids.tobytes())
        if tr.pred is not None:
            f.write(np.ascontiguousarray(tr.pred, dtype="<i4").tobytes())


# a trace larger than this is refused before it is read (2**31 ids: 8 GiB)
MAX_TRACE_IDS = 1 << 31
MAX_EXPERTS = 1 << 16  # experts per layer (llama.cpp: 1024)
MAX_LAYERS = 4096  # MoE layers (llama.cpp: 512)


def read_trace(path: str) -> Trace:
    """Read and check a trace file. FlashMoEError (one line) for anything that is not a complete,
    consistent FMRT v1 trace: the sizes in the header are checked against the file's size before
    anything is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FlashMoEError(f"no such routing trace: {path}") from None
    except OSError as e:
        raise FlashMoEError(f"cannot open routing trace {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FlashMoEError(f"routing trace {path} is not a regular file")
    size = st.st_size
    try:
        with open(path, "rb") as f:
            head = f.read(_HDR.size)
            if len(head) < _HDR.size:
                raise FlashMoEError(f"{path} is not a flashmoe routing trace (too short: {size} bytes)")
            magic, ver, n_lay, n_used, n_expert, flags, n_tok = _HDR.unpack(head)
            if magic != MAGIC:
                raise FlashMoEError(f"{path} is not a flashmoe routing trace (bad magic)")
            if ver not in (VERSION, VERSION_PRED):
                raise FlashMoEError(f"{path}: unsupported routing trace version {ver} (expected {VERSION} or {VERSION_PRED})")
            if flags != 0 and not (ver == VERSION_PRED and flags == 1):
                raise FlashMoEError(f"routing trace {path} is corrupt: flags {flags:#x} (version {ver})")
            has_pred = flags == 1
            if n_lay == 0 or n_used == 0 or n_expert == 0 or n_tok == 0:
                raise FlashMoEError(f"routing trace {path} is empty or corrupt: {n_tok} tokens x {n_lay} layers x "
                                    f"{n_used} of {n_expert} experts")
            if n_expert > MAX_EXPERTS or n_lay > MAX_LAYERS:
                raise FlashMoEError(f"routing trace {path} is corrupt: {n_lay} layers of {n_expert} experts "
                                    f"(at most {MAX_LAYERS} layers of {MAX_EXPERTS})")
            if n_used > n_expert:
                raise FlashMoEError(f"routing trace {path} is corrupt: {n_used} experts per token of {n_expert}")
            want = n_tok * n_lay * n_used
            expect = _HDR.size + 4 * n_lay + 4 * want * (2 if has_pred else 1)
            if expect != size:
                what = "truncated" if expect > size else "corrupt (it has extra bytes)"
                raise FlashMoEError(f"routing trace {path} is {what}: its header says {n_tok} tokens x {n_lay} "
                                    f"layers x {n_used} experts ({expect} bytes), the file has {size} bytes")
            if want > MAX_TRACE_IDS:
                raise FlashMoEError(f"routing trace {path} is too large ({want} expert ids)")
            layers = np.frombuffer(f.read(4 * n_lay), dtype="<i4")
            ids = np.frombuffer(f.read(4 * want), dtype="<i4")
            pred = np.frombuffer(f.read(4 * want), dtype="<i4") if has_pred else None
    except OSError as e:
        raise FlashMoEError(f"cannot read routing trace {path}: {e.strerror or e}") from None
    if len(layers) != n_lay or ids.size != want or (pred is not None and pred.size != want):
        raise FlashMoEError(f"routing trace {path} is truncated")  # the file shrank while it was read
    if layers.min() < 0 or len(set(layers.tolist())) != n_lay:
        raise FlashMoEError(f"routing trace {path} is corrupt: its layer indexes must be distinct and non-negative")
    ids = ids.reshape(n_tok, n_lay, n_used).astype(np.int32)
    if ids.min() < 0 or ids.max() >= n_expert:
        raise FlashMoEError(f"routing trace {path} has expert ids out of range (0..{n_expert - 1})")
    pr = None
    if pred is not None:
        pr = pred.reshape(n_tok, n_lay, n_used).astype(np.int32)
        if pr.min() < -1 or pr.max() >= n_expert:
            raise FlashMoEError(f"routing trace {path} has predicted expert ids out of range (-1..{n_expert - 1})")
    return Trace([int(x) for x in layers], int(n_expert), ids, pred=pr)


def draw_predictions(tr: Trace, accuracy: float, seed: int = 0) -> Trace:
    """Predicted sets for a trace drawn at a given accuracy: each of a token's experts in a layer is
    predicted with probability ``accuracy``, else replaced by an expert the layer does not use for
    that token (a wrong prediction, which costs a read). The first layer has no layer before it to
    predict from: -1 (no prediction)."""
    if not 0.0 <= accuracy <= 1.0:
        raise FlashMoEError(f"--predict-accuracy must be between 0 and 1, got {accuracy}", exit_code=2)
    rng = np.random.default_rng(seed + 7919)
    n_tok, n_lay, n_used = tr.ids.shape
    if n_used >= tr.n_expert and accuracy < 1.0:
        raise FlashMoEError("every expert is used by every token: a prediction cannot be wrong", exit_code=2)
    pred = tr.ids.copy()
    wrong = rng.random(pred.shape) >= accuracy
    for t, li, k in zip(*np.nonzero(wrong)):
        used = set(int(x) for x in tr.ids[t, li])
        taken = used | set(int(x) for x in pred[t, li])
        while True:
            e = int(rng.integers(tr.n_expert))
            if e not in taken:
                break
        pred[t, li, k] = e
    order = np.argsort(tr.layers)
    pred[:, order[0], :] = -1
    return Trace(tr.layers, tr.n_expert, tr.ids, tr.kind, pred=pred, predict_accuracy=accuracy)


def prediction_accuracy(tr: Trace) -> Optional[float]:
    """The share of the experts the trace's predicted sets name that the layer then used (None
    without predicted sets)."""
    if tr.pred is None:
        return None
    right = total = 0
    for t in range(tr.n_tokens):
        for li in range(len(tr.layers)):
            p = [int(x) for x in tr.pred[t, li] if x >= 0]
            if p:
                total += len(set(p))
                right += len(set(p) & set(int(x) for x in tr.ids[t, li]))
    return right / total if total else None


def model_moe_layers(model) -> List[int]:
    """The layers whose routing a trace holds (and the hook streams): per the arch registry
    (gguf_tools.archs), the layers with routed experts that llama.cpp's graph runs, e.g. not glm4moe's
    next-token-prediction layers."""
    from gguf_tools import archs

    return archs.routed_layers(model)


def model_last_layer(model) -> Optional[int]:
    """The last-layer rule (arch registry): the layer that computes only a ubatch's output rows
    (a trace's rows for it follow the outputs), or None when every layer computes every row."""
    from gguf_tools import archs

    return archs.last_layer(model)


def check_trace_fits(tr: Trace, model, n_used: Optional[int] = None) -> None:
    """A clear error when a trace was made for another model."""
    layers = model_moe_layers(model)
    n_used = n_used or model.n_expert_used
    missing = [l for l in layers if l not in tr.layers]
    if missing or tr.n_expert != model.n_expert or tr.n_used != n_used:
        raise FlashMoEError(
            f"routing trace does not fit the model: trace has {tr.n_expert} experts, {tr.n_used} used, "
            f"layers {tr.layers[:3]}...; model has {model.n_expert} experts, {n_used} used, layers {layers[:3]}..."
        )


def gen_uniform(layers: Sequence[int], n_expert: int, n_used: int, n_tokens: int, seed: int = 0) -> Trace:
    """Each token's experts drawn uniformly at random (distinct per token): the worst case for a cache."""
    rng = np.random.default_rng(seed)
    n_lay = len(layers)
    # argsort of random keys gives a uniform random permutation; take the first n_used
    keys = rng.random((n_tokens, n_lay, n_expert))
    ids = np.argsort(keys, axis=2)[:, :, :n_used].astype(np.int32)
    return Trace(list(layers), n_expert, ids, kind="uniform")


@dataclass
class RealisticParams:
    """A routing process with the locality real MoEs show (shared/notes/peers.md).

    Each MoE layer has a *working set* of experts (the topic's experts) that drifts slowly; each
    token keeps some of the previous token's experts and fills the rest mostly from the working set,
    sometimes from the whole layer by popularity. Per layer and token:

    1. drift: each working-set member is replaced, with probability ``drift``, by an expert drawn
       from the layer's popularity (rank r drawn with weight 1/(r+1)^zipf, a random order per layer);
    2. reuse: each of the previous token's experts is kept with probability ``reuse``;
    3. the free places are filled: with probability ``outside`` an expert drawn by popularity from
       all the layer's experts, else one drawn uniformly from the working set (no repeats).

    working_set: the working set's size as a fraction of the layer's experts.

    Defaults are calibrated on B1's shape (128 experts, 8 used, 512 tokens) to Qwen3-30B-A3B's
    measured locality: about 45% of a layer's selections repeat at the next token (``reuse`` is
    lower than that because working-set picks also repeat), about 80% within 8 tokens, and an LRU
    holding 40% of a layer's experts hits 90-95%. ``flashmoe trace stats`` on
    ``flashmoe trace gen --kind realistic --tokens 512`` of B1 (seed 0): next-token reuse 45.6%,
    78.5% within 8 tokens, top 10% of experts 29% of selections, LRU hit at 10/20/40% of a layer's
    experts 51/73/93.5% (the uniform trace: 6.2% reuse, LRU 7/18/38%). See docs/BENCHMARKS.md.
    """

    reuse: float = 0.36
    zipf: float = 1.0
    drift: float = 0.04
    working_set: float = 0.28
    outside: float = 0.08


def gen_realistic(layers: Sequence[int], n_expert: int, n_used: int, n_tokens: int, seed: int = 0,
                  params: Optional[RealisticParams] = None) -> Trace:
    """A synthetic trace with popularity skew, a drifting working set and next-token reuse
    (RealisticParams says how)."""
    p = params or RealisticParams()
    if n_used > n_expert:
        raise FlashMoEError(f"{n_used} experts per token is more than the {n_expert} experts per layer")
    rng = np.random.default_rng(seed)
    n_lay = len(layers)
    ids = np.zeros((n_tokens, n_lay, n_used), dtype=np.int32)
    m = min(n_expert, max(n_used + 1, int(round(p.working_set * n_expert))))
    w_rank = 1.0 / np.power(np.arange(1, n_expert + 1, dtype=np.float64), p.zipf)
    for li in range(n_lay):
        pop = np.zeros(n_expert)
        pop[rng.permutation(n_expert)] = w_rank  # this layer's popularity order
        cdf = np.cumsum(pop / pop.sum())

        def popular(k: int) -> np.ndarray:
            return np.minimum(np.searchsorted(cdf, rng.random(k), side="right"), n_expert - 1)

        ws = list(rng.choice(n_expert, size=m, replace=False, p=pop / pop.sum()))
        in_ws = np.zeros(n_expert, dtype=bool)
        in_ws[ws] = True
        prev: List[int] = []
        for t in range(n_tokens):
            n_rep = rng.binomial(m, p.drift) if p.drift > 0 else 0
            for i, cand in zip(rng.integers(0, m, size=n_rep), popular(n_rep)):
                if not in_ws[cand]:
                    in_ws[ws[i]] = False
                    ws[i] = int(cand)
                    in_ws[cand] = True
            keep = rng.random(len(prev)) < p.reuse
            chosen = [e for e, k in zip(prev, keep) if k][:n_used]
            taken = set(chosen)
            while len(chosen) < n_used:
                if rng.random() < p.outside or len(taken) >= m:
                    e = int(popular(1)[0])
                else:
                    e = int(ws[rng.integers(m)])
                if e not in taken:
                    chosen.append(e)
                    taken.add(e)
            ids[t, li] = chosen
            prev = chosen
    return Trace(list(layers), n_expert, ids, kind="realistic")


def lru_hit_rate(tr: Trace, capacity: int) -> float:
    """Hit rate of a per-layer LRU of `capacity` experts, one access per selected expert per token."""
    hits = total = 0
    for li in range(len(tr.layers)):
        cache: "OrderedDict[int, None]" = OrderedDict()
        for t in range(tr.n_tokens):
            for e in sorted(set(int(x) for x in tr.ids[t, li])):
                total += 1
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                else:
                    if len(cache) >= capacity:
                        cache.popitem(last=False)
                    cache[e] = None
    return hits / total if total else 0.0


def trace_stats(tr: Trace) -> Dict:
    n_tok, n_lay, n_used = tr.ids.shape
    reuse = []
    hit8 = tot8 = 0
    for li in range(n_lay):
        rows = [set(int(x) for x in tr.ids[t, li]) for t in range(n_tok)]
        for t in range(1, n_tok):
            reuse.append(len(rows[t] & rows[t - 1]) / n_used)
            recent = set().union(*rows[max(0, t - 8):t])
            hit8 += len(rows[t] & recent)
            tot8 += len(rows[t])
    counts = np.zeros((n_lay, tr.n_expert))
    for li in range(n_lay):
        np.add.at(counts[li], tr.ids[:, li].ravel(), 1)
    top = max(1, tr.n_expert // 10)
    share = float(np.mean(np.sort(counts, axis=1)[:, ::-1][:, :top].sum(axis=1) / counts.sum(axis=1)))
    out = {
        "kind": tr.kind,
        "tokens": n_tok,
        "layers": n_lay,
        "experts": tr.n_expert,
        "experts_used": n_used,
        "next_token_reuse": float(np.mean(reuse)) if reuse else 0.0,
        "reuse_within_8": hit8 / tot8 if tot8 else 0.0,  # selections used in one of the 8 tokens before
        "top10pct_share": share,
        "lru_hit_rate": {},
        "prediction_accuracy": prediction_accuracy(tr),
    }
    for frac in (0.1, 0.2, 0.4):
        cap = max(n_used, int(round(frac * tr.n_expert)))
        out["lru_hit_rate"][f"{int(frac * 100)}%"] = lru_hit_rate(tr, cap)
    return out


def trace_for_model(model_path: str, kind: str, n_tokens: int, seed: int = 0, n_used: Optional[int] = None,
                    params: Optional[RealisticParams] = None) -> Trace:
    from gguf_tools.reader import open_model, require_moe

    with open_model(model_path) as m:
        require_moe(m)
        layers = model_moe_layers(m)
        n_expert = m.n_expert
        k = n_used or m.n_expert_used
    if kind == "uniform":
        return gen_uniform(layers, n_expert, k, n_tokens, seed)
    if kind == "realistic":
        return gen_realistic(layers, n_expert, k, n_tokens, seed, params)
    raise FlashMoEError(f"unknown trace kind {kind!r} (uniform or realistic)", exit_code=2)


def ensure_parent(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FlashMoEError(f"output folder does not exist: {d}")


def ensure_writable_target(path: str, what: str = "output") -> None:
    """Before any work: a FlashMoEError unless ``path`` can be written (its folder exists and takes a
    file; ``path`` itself is not a folder). Creates and removes a probe file in the folder."""
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FlashMoEError(f"the folder of {what} {path} does not exist: {d}")
    if os.path.isdir(path):
        raise FlashMoEError(f"{what} {path} is a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".flashmoe-probe-"):
            pass
    except OSError as e:
        raise FlashMoEError(f"cannot write to the folder of {what} {path}: {e.strerror or e}") from None
