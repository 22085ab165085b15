"""The disk test of bench and tune: random reads of one expert slice on the model's own file.

At each queue depth, that many threads do back-to-back preadv of one expert slice's size into
page-aligned buffers, at random expert slices of the model (one sampler: :class:`ExpertSlices`).

- ``disk_test(path)`` reads around the page cache where the system and the file system allow it
  (O_DIRECT on Linux, F_NOCACHE on macOS), as the hook's direct reads do; elsewhere it reads
  buffered after evicting the file from the page cache, and its ``method`` says so (or that the
  file could not be evicted either).
- ``disk_test(path, direct=False)`` reads through the page cache as the hook's buffered
  descriptors do (POSIX_FADV_RANDOM: no readahead), the file evicted before each queue depth.

``measure_disk`` is the same test returning the JSON form (``DiskMeasurement.to_dict()``).
"""
from __future__ import annotations

import mmap
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flashmoe.machine import open_uncached, pread_into
from gguf_tools.reader import TensorInfo, open_model

PAGE = mmap.PAGESIZE
DISK_DEPTHS = (1, 4, 8)
DISK_READS = 256  # reads per queue depth (at least 16 per thread)
BUFFERED_METHOD = "buffered (POSIX_FADV_RANDOM, file evicted first)"


@dataclass
class DiskDepth:
    """The reads at one queue depth."""

    qd: int
    reads: int = 0
    bytes: int = 0
    s: float = 0.0
    bytes_per_s: float = 0.0
    latency_ms: float = 0.0
    evicted: Optional[bool] = None  # buffered test: the file was evicted from the page cache first

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if self.evicted is None:
            del d["evicted"]
        return d


@dataclass
class DiskMeasurement:
    """One disk test; ``ok`` False with ``reason`` when it could not be made."""

    ok: bool
    method: Optional[str] = None
    direct: Optional[bool] = None  # the reads went around the page cache
    slice_bytes: Optional[int] = None
    read_bytes: Optional[int] = None  # bytes per read (the slice rounded up to a page for direct reads)
    depths: List[DiskDepth] = field(default_factory=list)
    note: Optional[str] = None  # why the page cache could not be dropped first (when asked to)
    reason: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        if not self.ok:
            d: Dict[str, Any] = {"ok": False, "reason": self.reason}
            if self.method is not None:
                d["method"] = self.method
            return d
        return {"ok": True, "method": self.method, "direct": self.direct, "slice_bytes": self.slice_bytes,
                "read_bytes": self.read_bytes, "depths": [d.to_dict() for d in self.depths], "note": self.note}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiskMeasurement":
        """From the JSON form; a document written before ``direct`` existed says it in ``method``."""
        direct = d.get("direct")
        if direct is None and d.get("ok"):
            direct = "O_DIRECT" in str(d.get("method", ""))
        return cls(ok=bool(d.get("ok")), method=d.get("method"), direct=direct, slice_bytes=d.get("slice_bytes"),
                   read_bytes=d.get("read_bytes"), depths=[DiskDepth(**x) for x in d.get("depths") or []],
                   note=d.get("note"), reason=d.get("reason"))

    def bandwidth(self, readers: int) -> Tuple[Optional[float], Optional[int]]:
        """(bytes/s, queue depth) at the deepest measured queue depth not above ``readers``."""
        if not self.ok or not self.depths:
            return None, None
        ds = sorted(self.depths, key=lambda d: d.qd)
        pick = [d for d in ds if d.qd <= max(1, readers)] or ds[:1]
        return pick[-1].bytes_per_s, pick[-1].qd


def disk_bw_for(disk: Optional[DiskMeasurement], readers: int) -> Tuple[Optional[float], Optional[int]]:
    """Measured bandwidth at the deepest measured queue depth not above ``readers`` (None: not measured)."""
    return disk.bandwidth(readers) if disk is not None else (None, None)


@dataclass
class ExpertSlices:
    """Where a model's routed expert slices lie: what the disk test samples."""

    files: List[str]
    sizes: List[int]
    tensors: List[TensorInfo]  # routed expert tensors
    slice_bytes: int  # the most common slice size (of equals, the largest)

    @classmethod
    def of_model(cls, path: str) -> Optional["ExpertSlices"]:
        """None when the model has no routed experts."""
        with open_model(path) as m:
            experts = [t for t in m.tensors if t.is_expert and t.expert_stride > 0]
            if not experts:
                return None
            strides: Dict[int, int] = {}
            for t in experts:
                strides[t.expert_stride] = strides.get(t.expert_stride, 0) + 1
            return cls(list(m.files), list(m.file_sizes), experts, max(strides, key=lambda s: (strides[s], s)))

    def sample(self, rng: random.Random, n: int, align: int = 1,
               read_len: Optional[int] = None) -> List[Tuple[int, int]]:
        """n random (file index, offset) pairs, one expert slice of one expert tensor each; offsets
        rounded down to ``align``, and kept so that ``read_len`` bytes stay inside the file."""
        read_len = read_len or self.slice_bytes
        out = []
        for _ in range(n):
            t = rng.choice(self.tensors)
            e = rng.randrange(max(1, t.nbytes // t.expert_stride))
            off = (t.data_offset + e * t.expert_stride) // align * align
            off = min(off, max(0, (self.sizes[t.file_index] - read_len) // align * align))
            out.append((t.file_index, off))
        return out


def evict_file(paths: Sequence[str]) -> Optional[str]:
    """Drops the clean page-cache pages of these files (posix_fadvise DONTNEED; needs no privilege).
    None on success, else why not."""
    if not hasattr(os, "posix_fadvise"):
        return "posix_fadvise is not available here"
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            return f"cannot open {p}: {e.strerror}"
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            return f"posix_fadvise failed on {p}: {e.strerror}"
        finally:
            os.close(fd)
    return None


def _alloc_aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # anonymous mappings are page-aligned: fine for O_DIRECT


def timed_reads(fds: List[int], offs: List[Tuple[int, int]], qd: int, read_len: int) -> Tuple[int, float, List[str]]:
    """`qd` threads doing back-to-back preadv of `read_len` bytes (page-aligned buffers) at the
    (file index, offset) pairs: (bytes read, seconds, errors)."""
    it = iter(offs)
    lock = threading.Lock()
    done = [0]
    errors: List[str] = []

    def worker() -> None:
        b = _alloc_aligned(read_len)
        try:
            while True:
                with lock:
                    nxt = next(it, None)
                if nxt is None:
                    return
                fi, off = nxt
                try:
                    got = pread_into(fds[fi], b, off)
                except OSError as e:
                    errors.append(e.strerror or str(e))
                    return
                with lock:
                    done[0] += got
        finally:
            b.close()

    threads = [threading.Thread(target=worker) for _ in range(qd)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done[0], time.perf_counter() - t0, errors


def _open_direct(files: List[str], read_len: int) -> Tuple[List[int], str, bool]:
    """Descriptors that read around the page cache and the method's name; where the system or the
    file system refuses, buffered ones (the file evicted from the page cache), the method saying why."""
    fds: List[int] = []
    method = "O_DIRECT"
    try:
        for f in files:
            fd, method = open_uncached(f)
            fds.append(fd)
        buf = _alloc_aligned(read_len)
        try:
            pread_into(fds[0], buf, 0)  # some file systems accept the flag but fail the read
        finally:
            buf.close()
        return fds, method, True
    except OSError as e:
        for fd in fds:
            os.close(fd)
        why_not = e.strerror or str(e)
    fds = [os.open(f, os.O_RDONLY) for f in files]
    evict_why = evict_file(files)
    method = (f"buffered (direct I/O not available: {why_not}; file evicted from the page cache first)"
              if evict_why is None else
              f"buffered (direct I/O not available: {why_not}; the file could not be evicted from the "
              f"page cache either: {evict_why}, so reads may be served from memory)")
    return fds, method, False


def _open_buffered(files: List[str]) -> List[int]:
    """Buffered descriptors without readahead (POSIX_FADV_RANDOM), as the hook's buffered reads."""
    fds = [os.open(f, os.O_RDONLY) for f in files]
    for fd in fds:
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (OSError, AttributeError):
            pass
    return fds


def disk_test(model_path: str, *, direct: bool = True, depths: Sequence[int] = DISK_DEPTHS,
              reads: int = DISK_READS, seed: int = 0,
              drop: Optional[Callable[[], Optional[str]]] = None) -> DiskMeasurement:
    """Random reads of one expert slice's size on the model's own file at each queue depth (see the
    module docstring). ``drop`` empties the page cache first (its answer: None, or why it could not)."""
    slices = ExpertSlices.of_model(model_path)
    if slices is None:
        return DiskMeasurement(False, reason="the model has no routed experts")
    note = (drop() or None) if drop is not None else None
    if direct:
        read_len, align = -(-slices.slice_bytes // PAGE) * PAGE, PAGE
        fds, method, around = _open_direct(slices.files, read_len)
    else:
        read_len, align = slices.slice_bytes, 1
        fds, method, around = _open_buffered(slices.files), BUFFERED_METHOD, False
    rng = random.Random(seed)
    results: List[DiskDepth] = []
    evict_why: Optional[str] = None
    try:
        for qd in depths:
            n = max(reads, 16 * qd)
            offs = slices.sample(rng, n, align, read_len)
            evicted = None
            if not around:
                why = evict_file(slices.files)
                if not direct:
                    evicted, evict_why = why is None, evict_why or why
            got, dt, errors = timed_reads(fds, offs, qd, read_len)
            if errors:
                return DiskMeasurement(False, method=method, reason=f"reads failed: {errors[0]}")
            results.append(DiskDepth(qd, n, got, dt, got / dt if dt > 0 else 0.0, 1000 * dt * qd / n, evicted))
    finally:
        for fd in fds:
            os.close(fd)
        if not direct:
            evict_file(slices.files)  # leave none of the model's pages to the runs that follow
    if evict_why is not None:
        method = (f"buffered (the file could not be evicted from the page cache first: {evict_why}; "
                  "reads may hit it)")
    return DiskMeasurement(True, method=method, direct=around, slice_bytes=slices.slice_bytes, read_bytes=read_len,
                           depths=results, note=note)


def measure_disk(model_path: str, depths: Sequence[int] = DISK_DEPTHS, reads: int = DISK_READS, seed: int = 0,
                 drop: Optional[Callable[[], Optional[str]]] = None) -> Dict[str, Any]:
    """The direct disk test in its JSON form (what ``flashmoe bench --json`` writes under ``disk``)."""
    return disk_test(model_path, depths=depths, reads=reads, seed=seed, drop=drop).to_dict()
