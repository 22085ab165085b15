"""Process counters for run reports: bytes read from storage, page faults, peak memory.

Linux: /proc/self/io (read_bytes: bytes fetched from the storage layer, page-cache hits excluded)
and getrusage. macOS (and wherever /proc/self/io is missing): getrusage only (ru_inblock counts block
reads; bytes are estimated at 4 KiB per block, and ``exact_bytes`` is False so reports can say so).
Peak RSS is getrusage's ru_maxrss, which macOS gives in bytes and Linux in KiB.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Optional

from flashmoe import machine


@dataclass
class ProcessCounters:
    read_bytes: int = 0
    major_faults: int = 0
    minor_faults: int = 0
    exact_bytes: bool = True

    @staticmethod
    def now(proc: Optional[machine.PathLike] = None) -> "ProcessCounters":
        """This process's counters now; proc: where /proc is (tests)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        rb = None
        for line in (machine.read_text(machine.proc_root(proc) / "self" / "io") or "").splitlines():
            if line.startswith("read_bytes:"):
                try:
                    rb = int(line.split()[1])
                except (IndexError, ValueError):
                    rb = None
        exact = rb is not None
        if rb is None:
            rb = int(ru.ru_inblock) * 4096
        return ProcessCounters(rb, int(ru.ru_majflt), int(ru.ru_minflt), exact)

    def minus(self, other: "ProcessCounters") -> "ProcessCounters":
        return ProcessCounters(
            self.read_bytes - other.read_bytes,
            self.major_faults - other.major_faults,
            self.minor_faults - other.minor_faults,
            self.exact_bytes and other.exact_bytes,
        )


def peak_rss_bytes() -> int:
    """The peak resident set of this process in bytes (getrusage; macOS says bytes, Linux KiB)."""
    return machine.maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_bytes(proc: Optional[machine.PathLike] = None) -> int:
    """The resident set now (Linux /proc/self/statm); the peak where there is no /proc (macOS)."""
    text = machine.read_text(machine.proc_root(proc) / "self" / "statm")
    if text is None:
        return peak_rss_bytes()
    try:
        return int(text.split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, IndexError, ValueError, OSError):
        return peak_rss_bytes()
