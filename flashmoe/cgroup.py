"""Memory budgets for benchmark runs: a memory cgroup around one process (its memory and its page cache).

cgroup v2: a child of this process's own cgroup (a delegated subtree) with ``memory.max``; where the
subtree is not writable, ``systemd-run --scope -p MemoryMax=...`` (user or system manager).
cgroup v1: a child of this process's memory cgroup with ``memory.limit_in_bytes`` (and memsw).
Where none of these is possible, ``unavailable_reason()`` says what to enable. macOS (and every system
but Linux) has no cgroups: ``detect()`` says so in one line, and runs there are unconfined.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from flashmoe import machine
from flashmoe.errors import FlashMoEError

PathLike = machine.PathLike


def _own_path(controller: Optional[str], proc: Optional[PathLike] = None) -> Optional[str]:
    return machine.own_cgroup(controller, proc)


def _writable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.W_OK)


def _can_limit(parent: Path, kind: str) -> bool:
    """Whether a child cgroup of ``parent`` takes a memory limit: a directory that can be made is not
    enough (a v2 parent whose subtree_control lacks the memory controller makes children without
    memory.max). Makes a probe child, writes a no-op limit, removes it."""
    probe = parent / f"flashmoe-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        if kind == "v2":
            (probe / "memory.max").write_text("max")
        else:
            (probe / "memory.limit_in_bytes").write_text(str(1 << 62))
        return True
    except OSError:
        return False
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def _enable_memory_v2(parent: Path) -> None:
    """Best effort: let children of ``parent`` have the memory controller (fails, harmlessly, when the
    parent has processes of its own: cgroup v2's no-internal-processes rule)."""
    sub = parent / "cgroup.subtree_control"
    if "memory" in (machine.read_text(sub) or "").split():
        return
    try:
        sub.write_text("+memory")
    except OSError:
        pass


@dataclass
class Backend:
    kind: str  # "v2", "v1", "systemd"
    parent: Optional[Path] = None


def detect(root: Optional[PathLike] = None, proc: Optional[PathLike] = None, systemd: bool = True) -> Backend:
    """The way to confine a run here; FlashMoEError with what to enable when there is none.
    root/proc: where the cgroup file system and /proc are (tests); systemd=False: do not try
    `systemd-run --scope`."""
    if not machine.is_linux() or machine.cgroup_lines(proc) is None:
        raise FlashMoEError(unavailable_reason(proc))
    root = machine.cgroup_root(root)
    # v2 (unified): our own cgroup must have the memory controller available for children
    own2 = _own_path(None, proc)
    if own2 is not None and (root / "cgroup.controllers").exists():
        parent = root / own2.lstrip("/")
        ctrls = (machine.read_text(parent / "cgroup.controllers") or "").split()
        if "memory" in ctrls and _writable_dir(parent):
            _enable_memory_v2(parent)
            if _can_limit(parent, "v2"):
                return Backend("v2", parent)
    # v1
    own1 = _own_path("memory", proc)
    if own1 is not None:
        parent = root / "memory" / own1.lstrip("/")
        if _writable_dir(parent) and (parent / "memory.limit_in_bytes").exists() and _can_limit(parent, "v1"):
            return Backend("v1", parent)
    if systemd and shutil.which("systemd-run"):
        for user in (["--user"], []):
            try:
                r = subprocess.run(["systemd-run", *user, "--scope", "-q", "-p", "MemoryMax=1G", "true"],
                                   capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                return Backend("systemd")
    raise FlashMoEError(unavailable_reason(proc))


def unavailable_reason(proc: Optional[PathLike] = None) -> str:
    if not machine.is_linux():
        return (f"memory cgroups exist only on Linux, and this is {machine.platform_name()}: runs cannot be "
                "confined to a memory budget here")
    if machine.cgroup_lines(proc) is None:
        return (f"memory limits need Linux cgroups, and there is no {machine.proc_root(proc) / 'self' / 'cgroup'} "
                "here (is /proc mounted?)")
    return ("cannot create a memory cgroup: enable a delegated cgroup v2 subtree with the memory controller "
            "(e.g. run under `systemd-run --user --scope -p Delegate=yes`), or run as root with cgroup v1 memory "
            "mounted, or make `systemd-run --scope -p MemoryMax=...` work")


class Limited:
    """One confined run: create, start the process inside, read peak and OOM, clean up."""

    def __init__(self, limit_bytes: int, backend: Optional[Backend] = None):
        self.limit = int(limit_bytes)
        self.backend = backend or detect()
        self.path: Optional[Path] = None
        self._oom_before = 0
        if self.backend.kind in ("v1", "v2") and self.backend.parent is not None:
            path = self.backend.parent / f"flashmoe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError as e:
                raise FlashMoEError(f"cannot create a memory cgroup in {self.backend.parent}: "
                                    f"{e.strerror or e}") from None
            self.path = path
            try:
                if self.backend.kind == "v2":
                    (path / "memory.max").write_text(str(self.limit))
                    if (path / "memory.swap.max").exists():
                        (path / "memory.swap.max").write_text("0")
                else:
                    (path / "memory.limit_in_bytes").write_text(str(self.limit))
                    sw = path / "memory.memsw.limit_in_bytes"
                    if sw.exists():
                        try:
                            sw.write_text(str(self.limit))
                        except OSError:
                            pass
            except OSError as e:
                self.close()
                raise FlashMoEError(f"cannot set the memory limit of the cgroup {path}: {e.strerror or e}") from None

    def _procs_file(self) -> Path:
        if self.path is None:  # pragma: no cover - only called for the v1/v2 backends, which made it
            raise FlashMoEError("internal error: no memory cgroup")
        return self.path / "cgroup.procs"

    def popen(self, cmd: List[str], **kw: Any) -> subprocess.Popen:
        if self.backend.kind == "systemd":
            user = ["--user"] if os.geteuid() != 0 else []
            cmd = ["systemd-run", *user, "--scope", "-q", "-p", f"MemoryMax={self.limit}", "-p", "MemorySwapMax=0", *cmd]
            return subprocess.Popen(cmd, **kw)
        procs = str(self._procs_file())

        def enter() -> None:  # runs in the child before exec: everything it touches is charged to the cgroup
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        try:
            return subprocess.Popen(cmd, preexec_fn=enter, **kw)
        except subprocess.SubprocessError as e:  # the child could not enter the cgroup
            raise FlashMoEError(f"cannot start a run inside the memory cgroup {self.path} ({e})") from None

    def peak_bytes(self) -> Optional[int]:
        if self.path is None:
            return None
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            f = self.path / name
            if f.exists():
                try:
                    return int(f.read_text().split()[0])
                except (OSError, ValueError):
                    return None
        return None

    def oom_killed(self) -> bool:
        if self.path is None:
            return False
        ev = self.path / "memory.events"  # v2
        if ev.exists():
            return _oom_kills(ev)
        oc = self.path / "memory.oom_control"  # v1
        return oc.exists() and _oom_kills(oc)

    def close(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _oom_kills(events: Path) -> bool:
    """Whether a cgroup's memory.events (v2) or memory.oom_control (v1) counts an OOM kill."""
    for line in (machine.read_text(events) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "oom_kill" and parts[1].isdigit() and int(parts[1]) > 0:
            return True
    return False


@dataclass
class LimitedResult:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: Optional[int]
    oom: bool
    wall_s: float
    timed_out: bool = False


def run_limited(cmd: List[str], limit_bytes: Optional[int], timeout: Optional[float] = None,
                env: Optional[Dict[str, str]] = None) -> LimitedResult:
    """Runs cmd (to completion) in a fresh memory cgroup of limit_bytes (None: unconfined)."""
    t0 = time.perf_counter()
    lim = Limited(limit_bytes) if limit_bytes else None
    try:
        kw: Dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        p = lim.popen(cmd, **kw) if lim else subprocess.Popen(cmd, **kw)
        timed_out = False
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            out, err = p.communicate()
            timed_out = True
        oom = bool(lim and lim.oom_killed()) or (p.returncode == -signal.SIGKILL and not timed_out and lim is not None)
        return LimitedResult(p.returncode, out, err, lim.peak_bytes() if lim else None, oom,
                             time.perf_counter() - t0, timed_out)
    finally:
        if lim:
            lim.close()


def drop_caches(proc: Optional[PathLike] = None) -> Optional[str]:
    """Empties the page cache (Linux, root: /proc/sys/vm/drop_caches). None on success, else why it could
    not (one line). proc: where /proc is (tests)."""
    if not machine.is_linux():
        return (f"dropping the page cache needs Linux (/proc/sys/vm/drop_caches), and this is "
                f"{machine.platform_name()}")
    f = machine.proc_root(proc) / "sys" / "vm" / "drop_caches"
    if not f.exists():
        return f"cannot drop the page cache: there is no {f} here"
    try:
        os.sync()
        with open(f, "w") as fh:
            fh.write("3\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache ({f}: {e.strerror or e}; needs root, outside a read-only container /proc)"
