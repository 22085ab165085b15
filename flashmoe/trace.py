"""Routing traces: expert ids per token per layer (docs/trace-format.md).

A trace is what the hook records (``record_trace``) and what it replays to force the routing
(``routing_trace``). File format "FMRT" v1, little-endian:

    char[4]  magic "FMRT"
    u32      version (1)
    u32      n_layers          MoE layers in the trace
    u32      n_used            experts per token
    u32      n_expert          experts per layer
    u32      reserved (0)
    u64      n_tokens
    i32      layers[n_layers]  the model layer index of each column
    i32      ids[n_tokens][n_layers][n_used]

Forced routing: each MoE layer keeps a cursor; each evaluated token takes the next row (wrapping
around at the end). ``Engine.generate`` rewinds the cursors, so every run replays the same rows.
"""
from __future__ import annotations

import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from flashmoe.errors import FlashMoEError

MAGIC = b"FMRT"
VERSION = 1
_HDR = struct.Struct("<4s5IQ")


@dataclass
class Trace:
    layers: List[int]
    n_expert: int
    ids: np.ndarray  # int32 [n_tokens, n_layers, n_used]
    kind: str = "recorded"

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
        f.write(_HDR.pack(MAGIC, VERSION, n_lay, n_used, tr.n_expert, 0, n_tok))
        f.write(np.asarray(tr.layers, dtype="<i4").tobytes())
        f.write(ids.tobytes())


def read_trace(path: str) -> Trace:
    try:
        with open(path, "rb") as f:
            head = f.read(_HDR.size)
            if len(head) < _HDR.size:
                raise FlashMoEError(f"{path} is not a flashmoe routing trace (too short)")
            magic, ver, n_lay, n_used, n_expert, _, n_tok = _HDR.unpack(head)
            if magic != MAGIC or ver != VERSION:
                raise FlashMoEError(f"{path} is not a flashmoe routing trace (FMRT v1)")
            layers = np.frombuffer(f.read(4 * n_lay), dtype="<i4")
            want = n_tok * n_lay * n_used
            ids = np.frombuffer(f.read(4 * want), dtype="<i4")
    except FileNotFoundError:
        raise FlashMoEError(f"no such routing trace: {path}")
    if len(layers) != n_lay or ids.size != want or want == 0:
        raise FlashMoEError(f"routing trace {path} is truncated")
    ids = ids.reshape(n_tok, n_lay, n_used).astype(np.int32)
    if ids.min() < 0 or ids.max() >= n_expert:
        raise FlashMoEError(f"routing trace {path} has expert ids out of range")
    return Trace([int(x) for x in layers], int(n_expert), ids)


def model_moe_layers(model) -> List[int]:
    return sorted({t.layer for t in model.tensors if t.is_expert})


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
    """A routing process with what real MoEs show (shared/notes/peers.md).

    reuse:  probability that each of the previous token's experts is selected again
            (Qwen3-30B-A3B: about 45% of a layer's selections repeat at the next token)
    zipf:   popularity skew: expert of popularity rank r is drawn with weight 1/(r+1)^zipf
            (each layer has its own random popularity order)
    drift:  per token, probability that two experts swap popularity ranks (slow change of the hot set)
    """

    reuse: float = 0.45
    zipf: float = 1.1
    drift: float = 0.02


def gen_realistic(layers: Sequence[int], n_expert: int, n_used: int, n_tokens: int, seed: int = 0,
                  params: Optional[RealisticParams] = None) -> Trace:
    p = params or RealisticParams()
    rng = np.random.default_rng(seed)
    n_lay = len(layers)
    ids = np.zeros((n_tokens, n_lay, n_used), dtype=np.int32)
    w_rank = 1.0 / np.power(np.arange(1, n_expert + 1, dtype=np.float64), p.zipf)
    for li in range(n_lay):
        order = rng.permutation(n_expert)  # order[r] = expert of rank r
        prev: List[int] = []
        for t in range(n_tokens):
            if rng.random() < p.drift * n_expert / 8:
                a, b = rng.integers(0, n_expert, size=2)
                order[a], order[b] = order[b], order[a]
            chosen = [e for e in prev if rng.random() < p.reuse][:n_used]
            weights = np.zeros(n_expert)
            weights[order] = w_rank
            weights[chosen] = 0.0
            need = n_used - len(chosen)
            if need > 0:
                extra = rng.choice(n_expert, size=need, replace=False, p=weights / weights.sum())
                chosen += [int(e) for e in extra]
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
    for li in range(n_lay):
        for t in range(1, n_tok):
            reuse.append(len(set(tr.ids[t, li]) & set(tr.ids[t - 1, li])) / n_used)
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
        "top10pct_share": share,
        "lru_hit_rate": {},
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
