"""Atomic file writes and a byte-count progress bar, shared by the model writers (synth, repack).

Usage::

    from gguf_tools.atomic import atomic_write, ByteProgress, check_free_space

    check_free_space(out_path, n_bytes)           # GGUFError when the disk is too small
    with ByteProgress(total=n_bytes, label="writing") as bar, atomic_write(out_path) as f:
        f.write(chunk); bar.update(len(chunk))

``atomic_write`` writes to a temporary file in the target folder, flushes and fsyncs it, then
renames it over the target (and fsyncs the folder). On any exception (or Ctrl-C) the temporary
file is removed and the target is left untouched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
import time
from typing import IO, Any, Iterator

from gguf_tools.errors import GGUFError
from gguf_tools.units import human_bytes

__all__ = ["atomic_write", "check_free_space", "fsync_dir", "ByteProgress", "human_bytes"]  # human_bytes: re-exported


def fsync_dir(folder: str) -> None:
    """fsync a folder (after a rename in it), where the filesystem supports it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", overwrite: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it to ``path``.

    overwrite=False raises GGUFError if ``path`` already exists (checked before and at rename).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise GGUFError(f"{path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise GGUFError(f"output folder does not exist: {folder}")
    if not overwrite and os.path.exists(path):
        raise GGUFError(f"{path} already exists (use --force to overwrite)")
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise GGUFError(f"cannot write in {folder}: {e.strerror or e}") from None
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (or keep the target's)
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        else:
            um = os.umask(0)
            os.umask(um)
            os.chmod(tmp, 0o666 & ~um)
    except OSError:
        pass
    f = os.fdopen(fd, mode)
    ok = False
    try:
        try:
            yield f
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise GGUFError(f"disk full while writing {path}") from None
            raise
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if not overwrite and os.path.exists(path):
                raise GGUFError(f"{path} already exists (use --force to overwrite)")
            os.replace(tmp, path)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise GGUFError(f"disk full while writing {path}") from None
            raise GGUFError(f"cannot write {path}: {e.strerror or e}") from None
        ok = True
        fsync_dir(folder)
    finally:
        if not ok:
            try:
                f.close()
            except Exception:
                pass
            try:
                os.unlink(tmp)
            except OSError:
                pass


def check_free_space(path: str | os.PathLike, n_bytes: int, margin: int = 64 << 20) -> None:
    """Raise GGUFError if the filesystem holding ``path`` has less than n_bytes + margin free."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < n_bytes + margin:
        raise GGUFError(
            f"not enough disk space in {folder}: need {human_bytes(n_bytes)}, {human_bytes(free)} free"
        )


class ByteProgress:
    """A plain stderr progress bar in bytes with rate and ETA.

    On a terminal it redraws one line (at most ~8 times a second); otherwise (logs) it prints a line
    per 10% for jobs of 256 MiB or more, and the final summary line. ``enabled=False`` makes it silent.
    """

    LOG_STEPS_MIN_BYTES = 256 << 20

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None, width: int = 30):
        self.total = max(int(total), 0)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._step = 0
        try:
            self.tty = bool(self.stream.isatty())
        except Exception:
            self.tty = False

    def __enter__(self) -> "ByteProgress":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(ok=exc_type is None)

    def update(self, n: int) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if now - self._last >= 0.125:
                self._last = now
                self._draw(final=False)
        elif self.total >= self.LOG_STEPS_MIN_BYTES and self.done < self.total:
            # logs (not a terminal): one line per 10% of a big job
            step = self.done * 10 // self.total
            if step > self._step:
                self._step = step
                self._draw(final=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _line(self) -> str:
        el = max(self.elapsed, 1e-9)
        rate = self.done / el
        frac = (self.done / self.total) if self.total else 1.0
        frac = min(max(frac, 0.0), 1.0)
        fill = int(round(frac * self.width))
        bar = "#" * fill + "-" * (self.width - fill)
        eta = ""
        if 0 < self.done < self.total and rate > 0:
            eta = f" eta {int((self.total - self.done) / rate)}s"
        label = f"{self.label} " if self.label else ""
        return (
            f"{label}[{bar}] {frac * 100:5.1f}% {human_bytes(self.done)}/{human_bytes(self.total)} "
            f"{human_bytes(rate)}/s {el:.1f}s{eta}"
        )

    def _draw(self, final: bool) -> None:
        line = self._line()
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        self.enabled = False  # only once
        if ok:
            self._draw(final=True)
        elif self.tty:
            self.stream.write("\n")
            self.stream.flush()
