"""The file mechanics of writing a repack safely: byte copies, temporary files, locks, signals.

    copier = Copier()                        # copy_file_range in the kernel when it works, else pread/pwrite
    copier.copy(src_fd, dst_fd, src_off, dst_off, n, on_bytes)
    tmp = temp_name(path)                    # .NAME.repack-PID.tmp in the target's folder
    lock(fd)                                 # held until the rename: tells other repacks the file is in use
    remove_stale_temps(paths)                # temporary files of killed repacks (no live lock)
    with TermSignals(): ...                  # SIGTERM / SIGHUP -> KeyboardInterrupt (temporary files removed)
    with open_inputs(files) as in_fds, TempShards(plan) as out:   # out.fds, out.paths
        ...
        out.publish(folder)                  # rename all (Ctrl-C held back); else they are removed on exit
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, Sequence

from gguf_tools.atomic import fsync_dir
from gguf_tools.errors import GGUFError
from gguf_tools.repack_plan import OutTensor, RepackPlan

COPY_CHUNK = 8 << 20


class Copier:
    """Copies byte ranges between files: copy_file_range (in the kernel) when it works, else pread/pwrite."""

    def __init__(self) -> None:
        self.use_cfr = hasattr(os, "copy_file_range")

    def copy(self, src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int,
             on_bytes: Callable[[int], None]) -> None:
        while n > 0:
            chunk = min(n, COPY_CHUNK)
            k = 0
            if self.use_cfr:
                try:
                    k = os.copy_file_range(src_fd, dst_fd, chunk, src_off, dst_off)
                except OSError as e:
                    if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                                   errno.EPERM, errno.EBADF):
                        self.use_cfr = False
                        continue
                    raise
            if k == 0:
                buf = os.pread(src_fd, chunk, src_off)
                if not buf:
                    raise GGUFError("the input ended early while copying (was it changed during the repack?)")
                k = 0
                mv = memoryview(buf)
                while k < len(buf):
                    k += os.pwrite(dst_fd, mv[k:], dst_off + k)
            src_off += k
            dst_off += k
            n -= k
            on_bytes(k)


def write_produced(t: OutTensor, fd: int, pos: int, on_bytes: Callable[[int], None]) -> int:
    """Write the blocks t.produce() yields at pos; record their sha256 in t.sha256; return the end."""
    if t.produce is None:  # pragma: no cover - the writer calls this for produced tensors only
        raise GGUFError(f"internal error: {t.name} has no producer")
    h = hashlib.sha256()
    n = 0
    for block in t.produce():
        mv = memoryview(block).cast("B")
        k = 0
        while k < len(mv):
            k += os.pwrite(fd, mv[k:], pos + k)
        h.update(mv)
        pos += len(mv)
        n += len(mv)
        on_bytes(len(mv))
    if n != t.nbytes:
        raise GGUFError(f"internal error: {t.name}: produced {n} bytes, planned {t.nbytes}")
    t.sha256 = h.hexdigest()
    return pos


def write_zeros(fd: int, off: int, n: int) -> None:
    z = b"\0" * min(n, 1 << 20)
    while n > 0:
        k = os.pwrite(fd, z[: min(n, len(z))], off)
        off += k
        n -= k


def temp_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.repack-{os.getpid()}.tmp")


def lock(fd: int, blocking: bool = False) -> bool:
    """flock the file (a live repack holds its temporary files locked until the rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def remove_stale_temps(paths: Sequence[str]) -> List[str]:
    """Remove .NAME.repack-PID.tmp files that no running repack holds (left by a killed one: SIGKILL,
    power loss). A running repack keeps its temporary files flock'ed, so they are never touched."""
    removed = []
    for p in paths:
        folder, base = os.path.split(os.path.abspath(p))
        pat = re.compile(r"^\." + re.escape(base) + r"\.repack-(\d+)\.tmp$")
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for n in names:
            if not pat.match(n):
                continue
            full = os.path.join(folder, n)
            try:
                fd = os.open(full, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                if lock(fd):
                    os.unlink(full)
                    removed.append(full)
            except OSError:
                pass
            finally:
                os.close(fd)
    return removed


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class TermSignals:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt while writing, so that temporary files are removed."""

    def __init__(self) -> None:
        self.saved: Dict[int, Any] = {}

    def __enter__(self) -> "TermSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if s is None:
                    continue
                try:
                    self.saved[s] = signal.signal(s, self._raise)
                except (ValueError, OSError):
                    pass
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.saved.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass


def block_signals() -> Any:
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    return None


def unblock_signals(old: Any) -> None:
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def open_inputs(files: Sequence[str]) -> Iterator[List[int]]:
    """The input files opened for reading (closed on exit)."""
    fds: List[int] = []
    try:
        for p in files:
            fds.append(os.open(p, os.O_RDONLY))
        yield fds
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class TempShards:
    """The output shards' temporary files (``temp_name``), created and locked on entry. ``publish`` renames
    them all to their target names, with Ctrl-C held back meanwhile; on exit they are closed, and removed
    unless published."""

    def __init__(self, plan: RepackPlan):
        self.plan = plan
        self.paths: List[str] = []
        self.fds: List[int] = []
        self.published = False

    def __enter__(self) -> "TempShards":
        try:
            for sh in self.plan.shards:
                tmp = temp_name(sh.path)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                self.paths.append(tmp)
                self.fds.append(fd)
                lock(fd)  # held until the rename: tells other repacks this file is in use
        except BaseException:
            self.__exit__()
            raise
        return self

    def publish(self, folder: str) -> None:
        old = block_signals()
        try:
            for tmp, sh in zip(self.paths, self.plan.shards):
                os.replace(tmp, sh.path)
            self.published = True
            fsync_dir(folder)
        finally:
            unblock_signals(old)

    def __exit__(self, *exc: Any) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        if not self.published:
            for tmp in self.paths:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
