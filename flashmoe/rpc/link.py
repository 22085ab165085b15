"""The binding to llama.cpp's RPC backend (ggml-rpc): the handshake check (:func:`probe`), registering a
worker (:func:`connect`), what its device supports, the lost-worker abort handler and the workers' timeouts."""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from flashmoe.errors import FlashMoEError
from flashmoe.rpc.net import _worker_sockets
from flashmoe.rpc.url import Endpoint


# ggml-rpc.h of the pinned llama.cpp (0c1e570): the client refuses servers of another major version or a newer minor
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_CMD_HELLO = 14  # RPC_CMD_HELLO, "must be always 14"
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (transport.h)
EXIT_WORKER_LOST = 3  # exit status when a worker is lost mid-run (the process cannot continue)


# --------------------------------------------------------------------------------------------- workers


def probe(name: str, ep: Endpoint, timeout: float = 10.0) -> Tuple[int, int, int]:
    """Checks that an RPC server answers at ``ep`` with a protocol this llama.cpp speaks: connects and makes
    the RPC handshake (HELLO), from Python. Returns its protocol version; FlashMoEError otherwise."""
    who = f"device {name} ({ep.url})"
    hint = f"start one there with `flashmoe rpc-server --host {ep.host} --port {ep.port}`"
    try:
        addrs = socket.getaddrinfo(ep.host, ep.port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FlashMoEError(f"{who}: cannot resolve host {ep.host!r} ({e.strerror})") from None
    try:
        s = socket.create_connection((str(addrs[0][4][0]), ep.port), timeout=timeout)
    except ConnectionRefusedError:
        raise FlashMoEError(f"{who}: no RPC worker listens at {ep.address} (connection refused); {hint}") from None
    except socket.timeout:
        raise FlashMoEError(f"{who}: {ep.address} did not accept a connection within {timeout:g} s") from None
    except OSError as e:
        raise FlashMoEError(f"{who}: cannot connect to {ep.address}: {e.strerror or e}") from None
    try:
        s.settimeout(timeout)
        s.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
        head = _recv_exact(s, 8)
        (size,) = struct.unpack("<Q", head)
        if size != 4 + _CONN_CAPS:
            raise FlashMoEError(f"{who}: {ep.address} does not answer as a llama.cpp RPC server")
        body = _recv_exact(s, size)
    except socket.timeout:
        raise FlashMoEError(
            f"{who}: {ep.address} accepted the connection but did not answer the RPC handshake within {timeout:g} s "
            "(an rpc-server serves one client at a time: is another process using this worker?)") from None
    except (ConnectionError, OSError) as e:
        raise FlashMoEError(f"{who}: {ep.address} closed the connection during the RPC handshake "
                            f"({getattr(e, 'strerror', None) or e}): is it a llama.cpp rpc-server?") from None
    finally:
        s.close()
    major, minor, patch = body[0], body[1], body[2]
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise FlashMoEError(f"{who}: the worker speaks RPC protocol {major}.{minor}.{patch}, this flashmoe's llama.cpp "
                            f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the same flashmoe build on every host")
    return major, minor, patch


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("connection closed")
        buf += chunk
    return buf


class _Ggml:
    """The ggml functions this module calls, from the libggml llama-cpp-python loaded."""

    def __init__(self) -> None:
        from flashmoe import gpu

        g = gpu._ggml()
        g.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
        g.ggml_backend_reg_by_name.restype = ctypes.c_void_p
        g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        g.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        g.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        g.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        g.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        g.ggml_backend_dev_name.restype = ctypes.c_char_p
        g.ggml_set_abort_callback.argtypes = [ctypes.c_void_p]
        g.ggml_set_abort_callback.restype = ctypes.c_void_p
        self.g = g
        reg = g.ggml_backend_reg_by_name(b"RPC")
        if not reg:
            raise FlashMoEError("this llama.cpp build has no RPC backend, so a policy's remote devices cannot be used: "
                                "rebuild with `flashmoe build` (RPC is on unless --no-rpc)")
        self.reg = reg
        fn = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
        if not fn:
            raise FlashMoEError("this llama.cpp's RPC backend has no ggml_backend_rpc_add_server")
        self.add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(fn)


_ggml_lock = threading.Lock()
_ggml_cache: List[_Ggml] = []


def _lib() -> _Ggml:
    with _ggml_lock:
        if not _ggml_cache:
            _ggml_cache.append(_Ggml())
        return _ggml_cache[0]


def available() -> bool:
    """Whether the installed llama.cpp has the RPC backend."""
    try:
        _lib()
    except (FlashMoEError, OSError, AttributeError):
        return False
    return True


@dataclass
class Worker:
    name: str
    endpoint: Endpoint
    dev: int  # ggml_backend_dev_t
    dev_name: str


_workers: Dict[str, Tuple[str, Endpoint]] = {}  # address -> (device name, endpoint): named when one is lost


def connect(name: str, ep: Endpoint, timeout: float = 10.0) -> Worker:
    """Checks the worker (:func:`probe`), registers it with llama.cpp's RPC backend and returns its device.
    Installs the lost-worker handler first."""
    lib = _lib()
    install_abort_handler()
    if not _worker_sockets([ep.address]):  # connected already (another model of this process): llama.cpp reuses it
        probe(name, ep, timeout)
    _workers[ep.address] = (name, ep)
    reg = lib.add_server(ep.address.encode())
    if not reg:
        raise FlashMoEError(f"device {name} ({ep.url}): the worker reports no devices")
    n = int(lib.g.ggml_backend_reg_dev_count(reg))
    if ep.device >= n:
        raise FlashMoEError(f"device {name} ({ep.url}): the worker has {n} device{'s' if n != 1 else ''} "
                            f"(0-{n - 1}), not {ep.device}")
    dev = int(lib.g.ggml_backend_reg_dev_get(reg, ep.device))
    return Worker(name, ep, dev, (lib.g.ggml_backend_dev_name(dev) or b"?").decode())


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_CUSTOM_OP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def custom_ops_stay_local(dev: int) -> bool:
    """Whether llama.cpp's RPC backend refuses custom ops (GGML_OP_CUSTOM) for the device ``dev``, so that the
    scheduler runs them on this host. flashmoe's graph ops (the expert fetch, the wave mask, prefetch, forced
    or recorded routing) are custom ops: their function pointers mean nothing in a worker's process, which
    crashes when it is sent one. Asked of the device itself with a real custom-op tensor (never computed)."""
    g = _lib().g
    g.ggml_init.argtypes = [_InitParams]
    g.ggml_init.restype = ctypes.c_void_p
    g.ggml_free.argtypes = [ctypes.c_void_p]
    g.ggml_free.restype = None
    g.ggml_custom_4d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, _CUSTOM_OP, ctypes.c_int,
                                 ctypes.c_void_p]
    g.ggml_custom_4d.restype = ctypes.c_void_p
    g.ggml_backend_dev_supports_op.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    g.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    ctx = g.ggml_init(_InitParams(1 << 16, None, True))
    if not ctx:
        return False
    try:
        fn = _CUSTOM_OP(lambda *_: None)
        t = g.ggml_custom_4d(ctx, 0, 1, 1, 1, 1, None, 0, fn, 1, None)  # GGML_TYPE_F32
        return bool(t) and not g.ggml_backend_dev_supports_op(dev, t)
    finally:
        g.ggml_free(ctx)


def device_memory(w: Worker) -> Tuple[int, int]:
    """(free, total) bytes of a worker's device, as it reports them."""
    from flashmoe import gpu

    return gpu.dev_memory(w.dev, _lib().g)


# --------------------------------------------------------------------------------------------- a lost worker

_ABORT_CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_state: Dict[str, object] = {}


def lost_worker_message(ggml_message: str, workers: Dict[str, Tuple[str, Endpoint]]) -> str:
    """The one line printed when ggml-rpc aborts: which worker is gone (the ones that refuse a connection now),
    and ggml's own reason."""
    gone = [f"{name} ({ep.url})" for name, ep in workers.values() if _refuses(ep)]
    reason = ggml_message.split(": ", 1)[-1].strip() if ": " in ggml_message else ggml_message.strip()
    if gone:
        who = "lost RPC worker " + ", ".join(gone)
    elif workers:
        names = ", ".join(f"{n} ({ep.url})" for n, ep in workers.values())
        who = (f"an RPC worker stopped answering ({names}: no reply within FLASHMOE_RPC_TIMEOUT="
               f"{_timeout_text()}, or the connection broke)")
    else:
        who = "the RPC backend failed"
    return f"error: {who} during the run: {reason}; the run cannot continue (restart the worker and run again)"


def _refuses(ep: Endpoint, tries: int = 4, pause: float = 0.25) -> bool:
    """Whether a worker refuses connections now. A killed process's sockets are closed one by one as it exits:
    the connection of the run may break before its listening socket goes, so one accepted probe right after the
    break proves nothing; a few probes a moment apart do. Only a refusal counts: a stopped worker's kernel keeps
    accepting until its backlog is full, and then stays silent."""
    for i in range(tries):
        try:
            socket.create_connection((ep.host, ep.port), timeout=1.0).close()
        except ConnectionRefusedError:
            return True
        except OSError:  # no answer at all (a full backlog, a stopped host): not a proof that it is gone
            return False
        if i + 1 < tries:
            time.sleep(pause)
    return False


def _timeout_text() -> str:
    try:
        return f"{worker_timeout():g} s"
    except FlashMoEError:
        return "?"


def install_abort_handler() -> None:
    """Turns ggml-rpc's abort on a lost worker into one ``error:`` line and exit status EXIT_WORKER_LOST (the
    process cannot continue: ggml offers no error path). Other ggml aborts keep their message and abort."""
    if "cb" in _abort_state:
        return

    def on_abort(msg: Optional[bytes]) -> None:
        text = (msg or b"").decode("utf-8", "replace")
        if "RPC" in text or "Failed to connect" in text or "Remote" in text:
            line = lost_worker_message(text, dict(_workers))
            os.write(2, (line + "\n").encode())
            os._exit(EXIT_WORKER_LOST)
        os.write(2, (text + "\n").encode())  # ggml then calls abort(), as without a handler

    cb = _ABORT_CB(on_abort)
    _lib().g.ggml_set_abort_callback(ctypes.cast(cb, ctypes.c_void_p))
    _abort_state["cb"] = cb  # kept alive for the process


DEFAULT_TIMEOUT_S = 300.0


def worker_timeout() -> float:
    """Seconds a worker may take to answer before the run fails (FLASHMOE_RPC_TIMEOUT, default 300; 0 = wait
    forever). A killed worker fails the run at once; this bounds a stopped or unreachable one."""
    raw = os.environ.get("FLASHMOE_RPC_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        raise FlashMoEError(f"FLASHMOE_RPC_TIMEOUT must be a number of seconds, not {raw!r}") from None
    if v < 0:
        raise FlashMoEError(f"FLASHMOE_RPC_TIMEOUT must be 0 (no limit) or more, not {raw!r}")
    return v


def arm_timeouts(addresses: Iterable[str], seconds: float) -> int:
    """Sets receive and send timeouts on this process's connections to the workers (llama.cpp's RPC client
    waits forever otherwise: a stopped worker or a cut link would hang the run). A timed-out call fails like
    a lost worker. Returns the number of connections armed."""
    if seconds <= 0:
        return 0
    tv = struct.pack("ll", int(seconds), int((seconds - int(seconds)) * 1e6))
    n = 0
    for _, fd in _worker_sockets(addresses):
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n
