"""Sockets to the workers: this process's connections to them (``/proc/self/fd``), the bytes exchanged
(the kernel's per-connection counters, ``TCP_INFO``), the loopback counter, and helpers for tests and scripts
that start workers (:func:`free_port`, :func:`wait_listening`)."""
from __future__ import annotations

import os
import socket
import struct
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from flashmoe.errors import FlashMoEError


# --------------------------------------------------------------------------------------------- network bytes

_TCP_INFO_LEN = 232
_BYTES_ACKED = 120  # struct tcp_info: tcpi_bytes_acked (u64), then tcpi_bytes_received (u64); Linux >= 4.1


def _worker_sockets(addresses: Iterable[str]) -> List[Tuple[str, int]]:
    """(address, fd) of this process's open IPv4 TCP connections to ``HOST:PORT`` addresses (Linux: /proc/self/fd)."""
    want: Dict[Tuple[str, int], str] = {}
    for a in addresses:
        host, port = a.rsplit(":", 1)
        try:
            for info in socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM):
                want[(str(info[4][0]), int(port))] = a
        except OSError:
            continue
    out: List[Tuple[str, int]] = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd_s in fds:
        fd = int(fd_s)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM:
                key = want.get(tuple(s.getpeername()))  # type: ignore[arg-type]
                if key is not None:
                    out.append((key, fd))
        except OSError:
            pass
        finally:
            s.close()
    return out


_SEGS = 152  # tcpi_data_segs_in (u32), then tcpi_data_segs_out (u32); Linux >= 4.6


def connection_stats(addresses: Iterable[str]) -> Dict[str, Dict[str, int]]:
    """{``HOST:PORT``: {sent, received, segments_in, segments_out}} over this process's open TCP connections to
    those addresses, from the kernel's per-socket counters (``TCP_INFO``: bytes acknowledged by the peer, bytes
    received, data segments each way). Zeros where the kernel or the platform has no such counters."""
    addresses = list(addresses)
    out = {a: {"sent": 0, "received": 0, "segments_in": 0, "segments_out": 0} for a in addresses}
    if not hasattr(socket, "TCP_INFO"):
        return out
    for key, fd in _worker_sockets(addresses):
        s = socket.socket(fileno=os.dup(fd))
        try:
            raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            continue
        finally:
            s.close()
        d = out[key]
        if len(raw) >= _BYTES_ACKED + 16:
            sent, received = struct.unpack_from("<QQ", raw, _BYTES_ACKED)
            d["sent"] += sent
            d["received"] += received
        if len(raw) >= _SEGS + 8:
            seg_in, seg_out = struct.unpack_from("<II", raw, _SEGS)
            d["segments_in"] += seg_in
            d["segments_out"] += seg_out
    return out


def connection_bytes(addresses: Iterable[str]) -> Dict[str, Tuple[int, int]]:
    """{``HOST:PORT``: (bytes sent, bytes received)} over this process's open TCP connections to those addresses
    (:func:`connection_stats`; sent = acknowledged by the peer). Counters of connections closed in between are
    lost: compare readings taken while a model stays loaded."""
    return {a: (d["sent"], d["received"]) for a, d in connection_stats(addresses).items()}


class NetworkCounter:
    """Bytes exchanged with the workers between :meth:`start` and :meth:`stop` (this process's connections)."""

    def __init__(self, addresses: Iterable[str]):
        self.addresses = list(addresses)
        self._t0: Dict[str, Tuple[int, int]] = {}
        self.sent = 0
        self.received = 0
        self.by_worker: Dict[str, Tuple[int, int]] = {}

    def start(self) -> "NetworkCounter":
        self._t0 = connection_bytes(self.addresses)
        return self

    def stop(self) -> "NetworkCounter":
        t1 = connection_bytes(self.addresses)
        self.by_worker = {a: (t1[a][0] - self._t0.get(a, (0, 0))[0], t1[a][1] - self._t0.get(a, (0, 0))[1]) for a in t1}
        self.sent = sum(v[0] for v in self.by_worker.values())
        self.received = sum(v[1] for v in self.by_worker.values())
        return self

    @property
    def total(self) -> int:
        return self.sent + self.received


def loopback_bytes() -> Optional[int]:
    """Bytes through the loopback interface (``lo`` in /proc/net/dev, received side: every loopback byte is
    received once) since boot, machine-wide; None where there is no such file."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for tests and scripts that start workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 30.0, alive: Optional[Callable[[], bool]] = None) -> None:
    """Waits until something accepts connections at host:port (a worker just started). FlashMoEError after
    ``timeout`` s or when ``alive()`` says the process died."""
    import time

    t_end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            pass
        if alive is not None and not alive():
            raise FlashMoEError(f"the worker at {host}:{port} exited before it listened")
        if time.monotonic() > t_end:
            raise FlashMoEError(f"no worker listened at {host}:{port} within {timeout:g} s")
        time.sleep(0.1)
