"""What a tune is asked (``TuneOptions``), its time limit and the clock that keeps it."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

from flashmoe.errors import UsageError


def parse_duration(text: str) -> float:
    """'10m', '90s', '1h', '1h30m' -> seconds; a plain number is seconds."""
    s = str(text).strip().lower()
    if not s:
        raise UsageError("--time-limit: empty duration")
    if s[0].isdigit() or s[0] == ".":
        try:
            v = float(s)
        except ValueError:
            v = None
        if v is not None:
            if not math.isfinite(v) or v <= 0:
                raise UsageError(f"--time-limit must be more than 0, got {text!r}")
            return v
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    for ch in s:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        elif ch == " ":
            continue
        else:
            raise UsageError(f"--time-limit: cannot parse {text!r} (examples: 90s, 10m, 1h30m)")
    if num:
        raise UsageError(f"--time-limit: {text!r} ends without a unit (s, m or h)")
    if total <= 0:
        raise UsageError(f"--time-limit must be more than 0, got {text!r}")
    return total


@dataclass
class TuneOptions:
    model: str
    ram: int  # the memory budget in bytes (process memory and its page cache)
    out: str  # the policy YAML to write
    report: Optional[str] = None  # the markdown report (and a PNG next to it when matplotlib is there)
    json_out: Optional[str] = None  # the tune's document as JSON (what the report is written from)
    gpu_mem: Optional[int] = None
    prompt_file: Optional[str] = None
    trace: Optional[str] = None
    time_limit: float = 600.0
    base: str = "stream"  # the policy whose rules (placements) and runtime the tuned one keeps
    prompt_tokens: int = 64  # the validation workload (with --prompt: the prompt's own length)
    gen_tokens: int = 128
    threads: Optional[int] = None
    n_ctx: Optional[int] = None  # None: the base policy's
    validate: int = 3  # candidates validated
    repeat: int = 3  # at most this many runs per validated candidate
    readers: Sequence[int] = (4, 8)
    plot: bool = True
    argv: List[str] = field(default_factory=list)


def mmss(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}:{s % 60:02d}"


class Clock:
    """The time limit: elapsed, left, and progress lines stamped ``[tune elapsed/limit]``."""

    def __init__(self, limit: float, log: Callable[[str], None]):
        self.t0 = time.monotonic()
        self.limit = limit
        self._log = log

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.limit - self.elapsed

    def log(self, msg: str) -> None:
        self._log(f"[tune {mmss(self.elapsed)}/{mmss(self.limit)}] {msg}")
