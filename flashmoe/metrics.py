"""Process counters for run reports: bytes read from storage, page faults, peak memory.

Linux: /proc/self/io (read_bytes: bytes fetched from the storage layer, page-cache hits excluded)
and getrusage. macOS: getrusage only (ru_inblock counts block reads; bytes are estimated at 4 KiB per
block, said so in the report).
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass


@dataclass
class ProcessCounters:
    read_bytes: int = 0
    major_faults: int = 0
    minor_faults: int = 0
    exact_bytes: bool = True

    @staticmethod
    def now() -> "ProcessCounters":
        ru = resource.getrusage(resource.RUSAGE_SELF)
        rb = None
        try:
            with open("/proc/self/io") as f:
                for line in f:
                    if line.startswith("read_bytes:"):
                        rb = int(line.split()[1])
        except OSError:
            pass
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
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()
