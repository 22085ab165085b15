"""Facts about this machine, read where the platform has them and ``None`` (or a reason) where it does not.

One home for everything platform-specific that the rest of flashmoe asks about: total and available
RAM, the memory limit of this process's cgroup (v1 and v2), CPU counts, CAP_IPC_LOCK and
RLIMIT_MEMLOCK, and whether reads can go around the page cache (O_DIRECT on Linux, F_NOCACHE on
macOS). Linux answers from /proc and /sys/fs/cgroup; macOS has neither (sysctl, getrusage and
sysconf answer what they can there); nothing here raises because a file or a feature is missing.

The fixed paths can be pointed elsewhere: every reader takes ``proc=`` (default ``/proc``) and the
cgroup readers ``root=`` (default ``/sys/fs/cgroup``, or ``$FLASHMOE_CGROUP_ROOT``), so tests build
cgroup v1 and v2 layouts in a temporary folder. The platform is read from ``sys.platform`` at each
call.

Public API::

    is_linux() / is_macos() / platform_name()
    needs_linux(feature, why, instead) -> str          # the one-line error of a Linux-only feature
    physical_ram(proc=None) -> int | None              # bytes
    mem_available(proc=None) -> int | None             # bytes (Linux MemAvailable; None elsewhere)
    own_cgroup(controller=None, proc=None) -> str | None
    cgroup_memory_limit(proc=None, root=None) -> int | None
    cpu_count() -> int | None / usable_cpus() -> int | None
    has_cap_ipc_lock(proc=None) -> bool
    memlock_limit() -> int | None                      # soft RLIMIT_MEMLOCK; None = unlimited or absent
    memlock_hint() -> str                              # how to raise it on this platform
    open_uncached(path) -> (fd, method)                # O_DIRECT / F_NOCACHE; OSError if not here
    direct_io_support(path) -> (bool, str)             # method, or why not
    pread_into(fd, buf, offset) -> int                 # preadv, or pread + copy where preadv is missing
    maxrss_bytes(ru_maxrss) -> int                     # getrusage's ru_maxrss in bytes (KiB on Linux, bytes on macOS)
"""
from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]

PROC = Path("/proc")
CGROUP_ROOT = "/sys/fs/cgroup"
_UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a page-rounded 2^63-1


def is_linux() -> bool:
    return sys.platform.startswith("linux")


def is_macos() -> bool:
    return sys.platform == "darwin"


def platform_name() -> str:
    if is_macos():
        return "macOS"
    if is_linux():
        return "Linux"
    if sys.platform in ("win32", "cygwin"):
        return "Windows"
    return sys.platform


def needs_linux(feature: str, why: str, instead: str) -> str:
    """The one-line error of a Linux-only feature asked for on another system, e.g.
    "--ram-limit needs Linux (runs are confined with memory cgroups), and this is macOS; run without ..."."""
    return f"{feature} needs Linux ({why}), and this is {platform_name()}; {instead}"


def proc_root(proc: Optional[PathLike] = None) -> Path:
    return PROC if proc is None else Path(proc)


def cgroup_root(root: Optional[PathLike] = None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("FLASHMOE_CGROUP_ROOT") or CGROUP_ROOT)


def read_text(path: PathLike) -> Optional[str]:
    """The file's text, or None where it is missing or unreadable."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def read_int_file(path: PathLike) -> Optional[int]:
    """An integer file of /proc or a cgroup; None for missing, empty, "max" or garbage."""
    s = read_text(path)
    if s is None:
        return None
    s = s.strip()
    if s == "max" or not s:
        return None
    try:
        return int(s.split()[0])
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- memory


def read_meminfo(key: str, proc: Optional[PathLike] = None) -> Optional[int]:
    """A field of /proc/meminfo in bytes ("MemTotal", "MemAvailable"), or None."""
    text = read_text(proc_root(proc) / "meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            try:
                n = int(parts[1])
            except (IndexError, ValueError):
                return None
            return n * 1024 if len(parts) > 2 and parts[2].lower() == "kb" else n
    return None


def _sysctl_int(name: str) -> Optional[int]:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return int(r.stdout.strip()) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def physical_ram(proc: Optional[PathLike] = None) -> Optional[int]:
    """Total RAM of the machine in bytes: Linux /proc/meminfo, macOS sysctl hw.memsize, else sysconf."""
    v = read_meminfo("MemTotal", proc)
    if v:
        return v
    if is_macos():
        v = _sysctl_int("hw.memsize")
        if v:
            return v
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def mem_available(proc: Optional[PathLike] = None) -> Optional[int]:
    """Memory available to new programs without swapping (Linux MemAvailable), or None where the system
    does not say (macOS: there is no such single figure)."""
    return read_meminfo("MemAvailable", proc)


# ------------------------------------------------------------------------------------------- cgroups


def cgroup_lines(proc: Optional[PathLike] = None) -> Optional[list]:
    """The (hierarchy id, controllers, path) entries of /proc/self/cgroup; None without cgroups."""
    text = read_text(proc_root(proc) / "self" / "cgroup")
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


def own_cgroup(controller: Optional[str] = None, proc: Optional[PathLike] = None) -> Optional[str]:
    """This process's cgroup path: the v2 (unified) one for controller None, else the v1 hierarchy
    that has `controller`. None where there is none (or no /proc)."""
    for hid, ctrls, path in cgroup_lines(proc) or []:
        if controller is None and hid == "0" and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    return None


def cgroup_memory_limit(proc: Optional[PathLike] = None, root: Optional[PathLike] = None) -> Optional[int]:
    """The tightest memory limit of this process's cgroup and its ancestors (v2 memory.max, v1
    memory.limit_in_bytes), or None (no limit, no cgroups, not Linux)."""
    lines = cgroup_lines(proc)
    if not lines:
        return None
    root = cgroup_root(root)
    limits = []
    for _hid, controllers, rel in lines:
        if controllers == "":  # v2
            base, fname = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, fname = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        d = base / rel.lstrip("/")
        while True:
            v = read_int_file(d / fname)
            if v is not None and v < _UNLIMITED:
                limits.append(v)
            if d == base or base not in d.parents:
                break
            d = d.parent
        v = read_int_file(base / fname)  # a namespaced root (containers)
        if v is not None and v < _UNLIMITED:
            limits.append(v)
    return min(limits) if limits else None


# ---------------------------------------------------------------------------------------------- CPU


def cpu_count() -> Optional[int]:
    return os.cpu_count()


def usable_cpus() -> Optional[int]:
    """CPUs this process may run on (its affinity mask on Linux; all of them elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


# -------------------------------------------------------------------------------------- memory lock


def has_cap_ipc_lock(proc: Optional[PathLike] = None) -> bool:
    """Whether this process may lock any amount of memory (Linux CAP_IPC_LOCK). False where there is
    no /proc/self/status (macOS has no capabilities)."""
    text = read_text(proc_root(proc) / "self" / "status")
    for line in (text or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) & (1 << 14))
            except (IndexError, ValueError):
                return False
    return False


def memlock_limit() -> Optional[int]:
    """The soft RLIMIT_MEMLOCK in bytes; None when unlimited (or when the system has no such limit)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    lim = getattr(resource, "RLIMIT_MEMLOCK", None)
    if lim is None:
        return None
    try:
        soft, _hard = resource.getrlimit(lim)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def memlock_hint() -> str:
    if is_linux():
        return "ulimit -l unlimited, or memlock in /etc/security/limits.conf"
    return "ulimit -l unlimited"


# -------------------------------------------------------------------------------- reads around the cache


def open_uncached(path: PathLike) -> Tuple[int, str]:
    """A read-only descriptor whose reads go around the page cache, and how: "O_DIRECT" (Linux and other
    systems that have it) or "F_NOCACHE" (macOS). OSError where this system has neither (its
    message says so) or the file system refuses."""
    path = os.fspath(path)
    if is_macos():
        import fcntl

        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        except OSError:
            os.close(fd)
            raise
        return fd, "F_NOCACHE"
    if hasattr(os, "O_DIRECT"):
        return os.open(path, os.O_RDONLY | os.O_DIRECT), "O_DIRECT"
    raise OSError(errno.ENOTSUP, f"no direct I/O (O_DIRECT or F_NOCACHE) on {platform_name()}")


def direct_io_support(path: PathLike) -> Tuple[bool, str]:
    """Whether reads of `path` can go around the page cache: (True, method) or (False, why not).
    Some file systems (tmpfs, some network and FUSE ones) accept the flag and fail the read, so one
    aligned page is read to make sure."""
    try:
        fd, method = open_uncached(path)
    except OSError as e:
        return False, f"direct I/O not supported here ({e.strerror or e})"
    buf = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, as O_DIRECT wants
    try:
        pread_into(fd, buf, 0)
    except OSError as e:
        return False, f"{method} is refused by the file system of {path} ({getattr(e, 'strerror', None) or e})"
    finally:
        buf.close()
        os.close(fd)
    return True, method


def pread_into(fd: int, buf, offset: int) -> int:
    """Reads into `buf` (a page-aligned mmap for O_DIRECT) at `offset`: preadv where the system has it
    (macOS only from 11), else pread and a copy (fine for F_NOCACHE, which needs no alignment)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


# ------------------------------------------------------------------------------------------ getrusage


def maxrss_bytes(ru_maxrss: int, platform: Optional[str] = None) -> int:
    """getrusage's ru_maxrss in bytes: macOS gives bytes, Linux and the BSDs KiB."""
    platform = sys.platform if platform is None else platform
    return int(ru_maxrss) if platform == "darwin" else int(ru_maxrss) * 1024


def child_env() -> dict:
    """This environment, with the folder holding the flashmoe package first on PYTHONPATH: for a child Python
    process that imports this flashmoe (a bench worker, a device query)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
