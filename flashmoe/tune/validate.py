"""Validation: the best few candidates run for real, in fresh processes confined to the budget,
in alternation, as many rounds as the time limit allows; then the winner and why."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flashmoe import cgroup
from flashmoe.bench.disk import evict_file
from flashmoe.bench.results import RunMetrics, run_metrics
from flashmoe.bench.runner import OfRecord, RunRecord, run_worker
from flashmoe.errors import FlashMoEError
from flashmoe.policy import Policy
from flashmoe.settings import EngineSettings
from flashmoe.sizes import format_size
from flashmoe.tune.candidates import Candidate, policy_text, resolve_text
from flashmoe.tune.measure import ComputeModel
from flashmoe.tune.model import ModelFacts
from flashmoe.tune.options import Clock, TuneOptions
from flashmoe.worker import WorkerSpec

TIE_FRACTION = 0.02  # measured decode tok/s within 2%: prefill decides
COMPETITIVE = 0.75  # an I/O mode whose best prediction is at least this share of the best one is competitive
RESERVE_S = 3.0  # kept to write the outputs


def fmt(x: Optional[float], f: str = "{:.2f}") -> str:
    return "-" if x is None else f.format(x)


@dataclass
class ValidationRun(OfRecord):
    """One validation run (the worker's record, its result dropped) and its figures."""

    record: RunRecord
    round: int = 1
    confined: bool = True
    model_evicted: bool = True
    metrics: Optional[RunMetrics] = None
    decode_hits: Optional[int] = None
    decode_misses: Optional[int] = None
    decode_hit_rate: Optional[float] = None

    @property
    def detail(self) -> Optional[str]:
        return self.record.detail

    @property
    def wall_s(self) -> float:
        return self.record.wall_s

    @classmethod
    def of(cls, rec: RunRecord, rnd: int, confined: bool, model_evicted: bool, readers: int) -> "ValidationRun":
        v = cls(rec, rnd, confined, model_evicted)
        if rec.ok:
            v.metrics = run_metrics(rec, True, readers, None)
            dc = rec.ok_result.decode.cache
            acc = dc.hits + dc.misses
            v.decode_hits, v.decode_misses = dc.hits, dc.misses
            v.decode_hit_rate = dc.hits / acc if acc else None
        rec.result = None  # the tokens and full report are not kept
        return v

    def to_dict(self) -> Dict[str, Any]:
        d = self.record.to_dict()
        d.update(round=self.round, confined=self.confined, model_evicted=self.model_evicted)
        if self.metrics is not None:
            d.update(metrics=self.metrics.to_dict(), decode_hits=self.decode_hits, decode_misses=self.decode_misses,
                     decode_hit_rate=self.decode_hit_rate)
        return d


def competitive_io_modes(cands: Sequence[Candidate], share: float = COMPETITIVE) -> List[bool]:
    """The I/O modes (True: direct, False: buffered) whose best explicit-cache candidate is predicted to decode
    at least ``share`` of the best prediction's speed (any mode), best first: those the validation cannot
    leave out on the strength of the predictions (they are rarely closer than 25% to the measurement)."""
    best = (cands[0].prediction.get("decode_tok_s") or 0.0) if cands else 0.0
    out: List[bool] = []
    for c in cands:
        d = c.prediction.get("decode_tok_s") or 0.0
        if c.mode == "cache" and c.direct_io not in out and (best <= 0 or d >= share * best):
            out.append(c.direct_io)
    return out


def _ahead_in(direct: bool) -> Callable[[Candidate], bool]:
    return lambda x: x.mode == "cache" and x.prefetch and x.direct_io == direct


def pick_for_validation(cands: List[Candidate], n: int) -> List[Candidate]:
    """The best prediction, then the best that differs from it in what matters most: the other
    mode (explicit cache or page cache), then, among explicit caches, the other I/O mode (direct or
    buffered), reads ahead on or off (when the trace lets the tuner weigh them: the best predicted of the other
    setting), then reads ahead in every competitive I/O mode (``competitive_io_modes``) that has none yet, the
    other eviction, another size; then the next best. At most n, best first."""
    if n <= 0 or not cands:
        return []
    out: List[Candidate] = [cands[0]]

    def add(pred: Callable[[Candidate], bool]) -> None:
        c = next((x for x in cands if x not in out and pred(x)), None)
        if c is not None and len(out) < n:
            out.append(c)

    best = cands[0]
    add(lambda x: x.mode != best.mode)
    bc = next((x for x in cands if x.mode == "cache"), None)
    if bc is not None:
        add(lambda x: x.mode == "cache" and x.direct_io != bc.direct_io)
        add(lambda x: x.mode == "cache" and x.prefetch != bc.prefetch)
        if any(x.prefetch for x in cands):
            for d in competitive_io_modes(cands):
                if not any(x.mode == "cache" and x.prefetch and x.direct_io == d for x in out):
                    add(_ahead_in(d))
        add(lambda x: x.mode == "cache" and x.eviction != bc.eviction)
        add(lambda x: x.mode == "cache" and x.slots != bc.slots)
    for c in cands:
        if len(out) >= n:
            break
        if c not in out:
            out.append(c)
    return sorted(out, key=lambda c: cands.index(c))


def _medians(c: Candidate) -> Optional[Dict[str, Any]]:
    runs = [r for r in c.runs if r.status == "ok"]
    ok = [r.metrics for r in runs if r.metrics is not None]  # every completed run has its figures
    if not ok:
        return None
    dec = [m.decode_tok_s for m in ok]

    def median(xs: List[Optional[float]]) -> Optional[float]:
        v = [x for x in xs if x is not None]
        return statistics.median(v) if v else None

    return {
        "runs": len(ok),
        "decode_tok_s": statistics.median(dec),
        "decode_min": min(dec), "decode_max": max(dec),
        "prefill_tok_s": statistics.median([m.prefill_tok_s for m in ok]),
        "decode_hit_rate": statistics.median([r.decode_hit_rate or 0 for r in runs]),
        "stall_ms_per_token": statistics.median([m.stall_ms_per_token or 0 for m in ok]),
        "peak_mib": max((m.peak_mib or 0) for m in ok),
        "load_s": statistics.median([m.load_s for m in ok]),
        # the engine's own reads in the decode phase: bytes over the reader pool's busy time, bytes per token,
        # busy time per token (None in a run that read nothing, or without the hook's read timing)
        "read_mb_s": median([m.read_mb_s for m in ok]),
        "expert_mib_per_token": median([m.expert_mib_per_token for m in ok]),
        "read_ms_per_token": median([1000.0 / m.io_bound_tok_s if m.io_bound_tok_s and
                                     m.io_bound_source == "engine reads" else None for m in ok]),
    }


class Validation:
    """Runs the chosen candidates under the budget, in alternation, as many rounds as time allows.
    A candidate killed by the memory limit brings in the best untried one with a smaller cache."""

    def __init__(self, base: Policy, view, mf: ModelFacts, opts: TuneOptions, trace_path: str, P: int, G: int,
                 n_ctx: int, cm: ComputeModel, clock: Clock):
        self.base, self.view, self.mf, self.opts = base, view, mf, opts
        self.trace_path, self.P, self.G, self.n_ctx = trace_path, P, G, n_ctx
        self.cm, self.clock = cm, clock
        self.chosen: List[Candidate] = []
        self.confined = True

    def settings_of(self, c: Candidate) -> EngineSettings:
        text = policy_text(self.base, c, budget=self.opts.ram, n_ctx=self.n_ctx, threads=self.opts.threads)
        return resolve_text(text, self.view, None, source=f"<candidate {c.name}>").engine_settings()

    def estimate(self, c: Candidate) -> float:
        """Seconds a run of c needs: its own completed runs, else the prediction (capped by twice the
        longest completed run of any candidate: predictions are least sure on a busy machine)."""
        done = [r.wall_s for r in c.runs if r.wall_s and r.status == "ok"]
        if done:
            return max(done) * 1.2 + 1.0
        p = c.prediction
        t = self.cm.startup_s or 5.0
        d, pf = p.get("decode_tok_s"), p.get("prefill_tok_s")
        t += (self.G - 1) / d if d else 60.0
        t += self.P / pf if pf else 10.0
        t = t * 1.3 + 3.0
        other = [r.wall_s for x in self.chosen for r in x.runs if r.wall_s and r.status == "ok"]
        return min(t, 2.0 * max(other)) if other else t

    def run(self, chosen: List[Candidate], all_cands: Sequence[Candidate] = ()) -> List[Candidate]:
        """The chosen candidates (and those brought in), each with its runs and medians."""
        self.chosen = list(chosen)
        if not self.chosen:
            return []
        try:
            cgroup.detect()
        except FlashMoEError as e:
            self.clock.log(f"validation: no memory cgroup here ({e}); runs are not confined to the budget")
            self.confined = False
        for rnd in range(1, max(1, self.opts.repeat) + 1):
            ran = False
            i = 0
            while i < len(self.chosen):  # the list grows when a candidate is killed by the limit
                c = self.chosen[i]
                i += 1
                if rnd > 1 and (not c.runs or c.runs[-1].status != "ok"):
                    continue  # a candidate that failed (or never ran) is not retried
                ran |= self.run_one(c, rnd, all_cands)
            if not ran:
                break
        for c in self.chosen:
            c.measured = _medians(c)
        return self.chosen

    def run_one(self, c: Candidate, rnd: int, all_cands: Sequence[Candidate]) -> bool:
        """One run of c, when the time left allows; False when it was skipped."""
        need = self.estimate(c)
        left = self.clock.left - RESERVE_S
        first_ever = not any(x.runs for x in self.chosen)
        if left < 5 or (left < need and not (first_ever and left > 10)):
            if rnd == 1:
                self.clock.log(f"validation: skipping {c.name}: about {need:.0f} s needed, {max(0, left):.0f} s left")
            return False
        why = evict_file(self.mf.model.files)
        spec = WorkerSpec(self.mf.path, self.settings_of(c), prompt_tokens=self.P, gen_tokens=self.G,
                          threads=self.opts.threads, n_ctx=self.n_ctx, routing_trace=self.trace_path)
        self.clock.log(f"validation round {rnd}: {c.name} ({c.describe()}) under {format_size(self.opts.ram)} ...")
        rec = run_worker(spec, self.opts.ram if self.confined else None, min(left, max(10.0, need * 3)),
                         measure=self.confined)
        run = ValidationRun.of(rec, rnd, self.confined, why is None, c.readers)
        if run.metrics is not None:
            mm = run.metrics
            self.clock.log(f"  decode {mm.decode_tok_s:.2f} tok/s (predicted {fmt(c.prediction.get('decode_tok_s'))}),"
                           f" prefill {mm.prefill_tok_s:.1f} tok/s, decode hit "
                           f"{100 * (run.decode_hit_rate or 0):.1f}%, peak {mm.peak_mib or 0:.0f} MiB"
                           + (f", reads {mm.read_mb_s:.0f} MB/s (predicted "
                              f"{fmt(c.prediction.get('decode', {}).get('read_mb_s'), '{:.0f}')})"
                              if mm.read_mb_s else ""))
        else:
            self.clock.log(f"  {run.status}: {run.detail or ''}")
            if run.status == "OOM" and c.mode == "cache":
                smaller = next((x for x in all_cands if x.mode == "cache" and x.slots < c.slots
                                and x not in self.chosen and x.supported), None)
                if smaller is not None:
                    self.clock.log(f"  trying {smaller.name} ({smaller.slots} slots) instead")
                    self.chosen.append(smaller)
        c.runs.append(run)
        return True


def _no_winner_measured(validated: List[Candidate], cands: List[Candidate]) -> Tuple[Candidate, str]:
    """Nothing completed: the best prediction not killed by the limit, said so."""
    failed = [c for c in validated if c.failed]
    hard = [c for c in failed if any(r.status in ("OOM", "FAILED") for r in c.runs)]
    fails = "; ".join(f"{c.name}: {c.runs[0].status} ({c.runs[0].detail or ''})" for c in failed)
    left = [c for c in cands if c not in hard]
    if not left:
        raise FlashMoEError(f"every validated configuration failed under the budget: {fails}")
    w = left[0]
    why = ("no validation run completed" + (f" ({fails})" if fails else " within the time limit") +
           f": the winner is the best prediction{' not killed by the limit' if hard else ''} "
           f"({fmt(w.prediction.get('decode_tok_s'))} decode tok/s predicted), not measured; "
           "raise --time-limit to measure it")
    return w, why


def _measured(c: Candidate) -> Dict[str, Any]:
    """The medians of a candidate that completed validation runs (a ValueError for one that did not)."""
    if c.measured is None:
        raise ValueError(f"{c.name} has no completed validation run")
    return c.measured


def _against(w: Candidate, o: Candidate) -> str:
    """Why w beat o, in a few words."""
    wm, om = _measured(w), _measured(o)
    d = wm["decode_tok_s"] / om["decode_tok_s"] - 1 if om["decode_tok_s"] else 0
    hw, ho = wm["decode_hit_rate"], om["decode_hit_rate"]
    reason = []
    if w.mode == "cache" and o.mode == "cache" and w.eviction != o.eviction:
        reason.append(f"{w.eviction.upper()} hit {100 * hw:.1f}% of decode expert accesses, "
                      f"{o.eviction.upper()} {100 * ho:.1f}%")
    elif o.mode == "pagecache":
        reason.append(f"the page cache hit {100 * ho:.1f}% of decode accesses with buffered reads, "
                      f"against {100 * hw:.1f}% here")
    elif w.slots != o.slots:
        reason.append(f"{w.slots} slots against {o.slots}: hit {100 * hw:.1f}% vs {100 * ho:.1f}%")
    elif w.n_ubatch != o.n_ubatch:
        reason.append(f"n_ubatch {w.n_ubatch} against {o.n_ubatch}: prefill {wm['prefill_tok_s']:.1f} vs "
                      f"{om['prefill_tok_s']:.1f} tok/s")
    elif w.readers != o.readers:
        reason.append(f"{w.readers} readers against {o.readers}")
    elif w.direct_io != o.direct_io:
        reason.append("direct I/O against buffered" if w.direct_io else "buffered I/O against direct")
    spread = max(wm["decode_max"] - wm["decode_min"], om["decode_max"] - om["decode_min"])
    if wm["decode_tok_s"] - om["decode_tok_s"] < spread:
        reason.append("within the run-to-run spread")
    return f"{'+' if d >= 0 else ''}{100 * d:.0f}% over {o.name}" + (f" ({'; '.join(reason)})" if reason else "")


def choose_winner(validated: List[Candidate], cands: List[Candidate]) -> Tuple[Candidate, str]:
    """The best measured median decode tok/s (within 2%: the better prefill), and why."""
    ok = [c for c in validated if c.measured]
    if not ok:
        return _no_winner_measured(validated, cands)
    ok.sort(key=lambda c: _measured(c)["decode_tok_s"], reverse=True)
    best = ok[0]
    bm = _measured(best)
    tied = [c for c in ok if _measured(c)["decode_tok_s"] >= bm["decode_tok_s"] * (1 - TIE_FRACTION)]
    w = max(tied, key=lambda c: _measured(c)["prefill_tok_s"])
    wm = _measured(w)
    parts = [f"{w.name} had the best measured decode speed: {wm['decode_tok_s']:.2f} tok/s "
             f"(median of {wm['runs']})"]
    if w is not best:
        parts[0] = (f"{w.name} and {best.name} decoded within {100 * TIE_FRACTION:.0f}% of each other "
                    f"({wm['decode_tok_s']:.2f} and {bm['decode_tok_s']:.2f} tok/s); {w.name} "
                    f"prefilled faster ({wm['prefill_tok_s']:.1f} vs {bm['prefill_tok_s']:.1f} tok/s)")
    parts += [_against(w, o) for o in ok if o is not w]
    for c in [c for c in validated if c.failed]:
        parts.append(f"{c.name} did not complete ({c.runs[0].status}: {c.runs[0].detail or ''})")
    return w, "; ".join(parts) + "."
