"""Layers on other hosts through llama.cpp's RPC backend (ggml-rpc), from a policy's ``devices``.

A policy names remote devices (``devices: {w1: rpc://192.168.1.20:50052}``) and places tensors on them
(``{match: "blk.{12..23}.*", place: w1}``). This module turns that into llama.cpp's own mechanisms:

- **the layout** (:func:`plan_layout`, pure Python): llama.cpp gives every layer one device. The local
  layers come first, then each remote device's layers as one contiguous range (llama.cpp's layer split:
  ``n_gpu_layers`` and ``tensor_split`` over the model's device list). A layer's remote device holds its
  weights, its KV cache and runs its graph; only activations (and the graph) cross the network.
- **the devices** (:func:`connect`): a worker is checked with the RPC handshake from Python first (an
  unreachable, busy or incompatible worker is a one-line error: ggml's client aborts the process on any
  connection failure), then registered with ``ggml_backend_rpc_add_server``; its devices go into
  ``llama_model_params.devices`` and per-tensor buffer overrides (``tensor_buft_overrides``) place the
  tensors a policy keeps elsewhere than their layer's device (host memory, or another device).
- **a lost worker**: ggml-rpc aborts the process when a worker goes away mid-run (``GGML_ABORT``, no
  error path). :func:`install_abort_handler` turns that abort into one ``error:`` line naming the worker
  and exit status :data:`EXIT_WORKER_LOST`, instead of a core dump.
- **network bytes** (:func:`connection_bytes`): bytes this process sent to / received from each worker,
  from the kernel's per-socket counters (``TCP_INFO``), for the bench's bytes per token.

Workers are ``flashmoe rpc-server`` (llama.cpp's rpc-server built with the same patched library:
``flashmoe build``). The RPC protocol has no authentication and no encryption: see docs/rpc.md.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from flashmoe.errors import FlashMoEError

SCHEME = "rpc://"
DEFAULT_PORT = 50052
# ggml-rpc.h of the pinned llama.cpp (0c1e570): the client refuses servers of another major version or a newer minor
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
_CMD_HELLO = 14  # RPC_CMD_HELLO, "must be always 14"
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (transport.h)
EXIT_WORKER_LOST = 3  # exit status when a worker is lost mid-run (the process cannot continue)
SECURITY_NOTE = ("the RPC protocol has no authentication and no encryption: anyone who can reach the port can "
                 "read and write the worker's memory and run computations on it; bind to a private network only")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """A worker's address: ``rpc://HOST:PORT`` (device 0 of the worker) or ``rpc://HOST:PORT/N``."""

    host: str
    port: int
    device: int = 0

    @property
    def address(self) -> str:
        """``HOST:PORT``, as llama.cpp's RPC client takes it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.address}" + (f"/{self.device}" if self.device else "")

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_url(text: object) -> Endpoint:
    """``rpc://HOST:PORT[/DEVICE]`` -> Endpoint. ValueError with a readable message otherwise."""
    example = "expected rpc://HOST:PORT, e.g. rpc://192.168.1.20:50052"
    if not isinstance(text, str):
        raise ValueError(f"must be a URL ({example}), got {type(text).__name__}")
    t = text.strip()
    if not t.lower().startswith(SCHEME):
        scheme = t.split("://", 1)[0] + "://" if "://" in t else ""
        what = f"unsupported scheme {scheme!r}" if scheme else "no rpc:// scheme"
        raise ValueError(f"bad URL {text!r}: {what}; {example}")
    rest = t[len(SCHEME):]
    device = 0
    if "/" in rest:
        rest, dev = rest.split("/", 1)
        if dev != "":
            if not dev.isdigit():
                raise ValueError(f"bad URL {text!r}: the part after the port must be a device number, got {dev!r}")
            device = int(dev)
    if rest.startswith("["):
        raise ValueError(f"bad URL {text!r}: llama.cpp's RPC client connects over IPv4 only; give a host name or "
                         "an IPv4 address")
    if ":" not in rest:
        raise ValueError(f"bad URL {text!r}: no port; {example}")
    host, port_s = rest.rsplit(":", 1)
    if not host:
        raise ValueError(f"bad URL {text!r}: no host; {example}")
    if ":" in host or any(c.isspace() for c in host) or "@" in host:
        raise ValueError(f"bad URL {text!r}: {host!r} is not a host name or IPv4 address")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad URL {text!r}: the port must be a number from 1 to 65535, got {port_s!r}")
    return Endpoint(host, int(port_s), device)


def check_device_name(name: object) -> str:
    """A device name usable in ``place:`` (ValueError otherwise)."""
    from flashmoe.settings import PLACEMENTS

    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"device name {name!r} must be a word (letters, digits, _ and -, not starting with a digit)")
    if name in PLACEMENTS or name in ("default", "local"):
        raise ValueError(f"device name {name!r} is a placement of its own; choose another name")
    return name


# --------------------------------------------------------------------------------------------- the layout


class LayoutError(ValueError):
    """A placement llama.cpp cannot run; ``tensor`` names a tensor of the problem (for the rule's line)."""

    def __init__(self, message: str, tensor: Optional[str] = None):
        super().__init__(message)
        self.tensor = tensor


@dataclass
class Layout:
    """Which device runs each layer. ``order``: the remote devices with layers, in layer order (llama.cpp's
    device order); ``first_remote``: the first remote layer (layers before it are local, every loaded layer
    from it on is remote); ``ranges``: per device its first and last layer."""

    n_layer: int
    layer_device: Dict[int, str] = field(default_factory=dict)  # remote layers only (not-loaded layers included)
    order: List[str] = field(default_factory=list)
    ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    first_remote: Optional[int] = None
    extra: List[str] = field(default_factory=list)  # devices that hold tensors but no layer

    @property
    def output_device(self) -> Optional[str]:
        """Where llama.cpp puts the output layer by default: the device of the last layer (None: local)."""
        return self.order[-1] if self.order else None

    def device_of_layer(self, il: int) -> Optional[str]:
        return self.layer_device.get(il)

    def describe(self, name: str) -> str:
        if name not in self.ranges:
            return "no layer"
        a, b = self.ranges[name]
        return f"layer {a}" if a == b else f"layers {a}-{b}"


def _ranges(layers: Iterable[int]) -> str:
    """``0-3, 7, 9-11`` for a set of layers."""
    runs: List[List[int]] = []
    for il in sorted(set(layers)):
        if runs and runs[-1][1] + 1 == il:
            runs[-1][1] = il
        else:
            runs.append([il, il])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def plan_layout(tensor_devices: Dict[str, str], tensor_layers: Dict[str, Optional[int]], n_layer: int,
                not_loaded: Iterable[int] = ()) -> Layout:
    """The layer layout of a placement. ``tensor_devices``: tensor -> remote device (remote tensors only);
    ``tensor_layers``: tensor -> block index (None outside the blocks); ``n_layer``: the model's block count;
    ``not_loaded``: layers llama.cpp skips (next-token prediction), which follow their neighbours.

    A layer with a tensor on a remote device runs on that device (its other tensors may stay local: they
    are read from host memory there). Raises LayoutError when llama.cpp cannot run the placement: one layer
    on two remote devices, a local layer after a remote one, or a device with two separate ranges."""
    skip = set(not_loaded)
    lay = Layout(n_layer=n_layer)
    by_layer: Dict[int, Dict[str, str]] = {}
    for name, dev in tensor_devices.items():
        il = tensor_layers.get(name)
        if il is None:
            if dev not in lay.extra:
                lay.extra.append(dev)
            continue
        by_layer.setdefault(il, {}).setdefault(dev, name)
    for il, devs in sorted(by_layer.items()):
        if len(devs) > 1 and il not in skip:
            (d1, t1), (d2, t2) = list(devs.items())[:2]
            raise LayoutError(f"layer {il} has tensors on two remote devices ({t1!r} on {d1}, {t2!r} on {d2}): "
                              "a layer runs on one device", t2)
        lay.layer_device[il] = next(iter(devs))
    loaded_remote = sorted(il for il in lay.layer_device if il not in skip)
    if not loaded_remote:
        lay.layer_device = {}
        for dev in sorted(set(tensor_devices.values())):
            if dev not in lay.extra:
                lay.extra.append(dev)
        return lay
    first = loaded_remote[0]
    local_after = [il for il in range(first, n_layer) if il not in skip and il not in lay.layer_device]
    if local_after:
        remote_names = [n for n, d in tensor_devices.items() if tensor_layers.get(n) == first]
        raise LayoutError(
            f"layer {local_after[0]} is local but layer {first} before it is on {lay.layer_device[first]}: llama.cpp "
            f"runs the local layers first, then each remote device's layers as one range (local layers "
            f"{_ranges([il for il in range(n_layer) if il not in lay.layer_device and il not in skip])}, remote "
            f"{_ranges(loaded_remote)}); place layers {first}-{n_layer - 1} remotely, or only layers after the "
            "local ones", remote_names[0] if remote_names else None)
    # not-loaded layers inside the remote range follow the layer before them
    prev = lay.layer_device[first]
    for il in range(first, n_layer):
        if il in skip:
            lay.layer_device[il] = prev
        prev = lay.layer_device[il]
    for il in [x for x in lay.layer_device if x < first]:  # not-loaded layers before the remote range
        del lay.layer_device[il]
    lay.first_remote = first
    for il in range(first, n_layer):
        dev = lay.layer_device[il]
        if dev in lay.ranges and lay.ranges[dev][1] != il - 1:
            a, b = lay.ranges[dev]
            other = lay.layer_device[il - 1]
            culprit = next((n for n, d in tensor_devices.items() if d == dev and tensor_layers.get(n) == il), None)
            raise LayoutError(f"{dev} holds layers {a}-{b} and layer {il} with {other}'s layers between them: llama.cpp "
                              "gives each device one range of consecutive layers", culprit)
        if dev not in lay.ranges:
            lay.order.append(dev)
            lay.ranges[dev] = (il, il)
        else:
            lay.ranges[dev] = (lay.ranges[dev][0], il)
    lay.extra = [d for d in lay.extra if d not in lay.ranges]
    return lay


def layer_split(lay: Layout, local_device: bool) -> Tuple[int, List[float]]:
    """(n_gpu_layers, tensor_split) that make llama.cpp assign the layers as ``lay`` says. The device list is
    ``[local GPU] + lay.order + lay.extra`` with ``local_device`` (a local GPU runs the local layers), else
    ``lay.order + lay.extra`` (the local layers run on the CPU). llama.cpp always gives the output layer the
    last offloaded layer's device; tensors that belong elsewhere get buffer overrides."""
    n = lay.n_layer
    counts = [lay.ranges[d][1] - lay.ranges[d][0] + 1 for d in lay.order] + [0] * len(lay.extra)
    if local_device:
        local = lay.first_remote if lay.first_remote is not None else n
        split = [float(local)] + [float(c) for c in counts]
        split[len(lay.order) if lay.order else 0] += 1  # the output layer: with the last layer's device
        return n + 1, split
    if lay.first_remote is None:
        return 0, [0.0] * len(counts) if counts else []
    remote = n - lay.first_remote
    counts[len(lay.order) - 1] += 1  # the output layer
    return remote + 1, [float(c) for c in counts]


def assigned_devices(n_layer: int, n_gpu_layers: int, split: Sequence[float], names: Sequence[str]) -> List[Optional[str]]:
    """llama.cpp's assignment (llama_model::load_tensors, get_layer_buft_list) of layers 0..n_layer (the last is
    the output layer) to ``names`` (None: the CPU), for checking :func:`layer_split`."""
    import numpy as np

    if not names or n_gpu_layers <= 0:
        return [None] * (n_layer + 1)
    s = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    s = (s / np.float32(s[-1])).astype(np.float32)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    out: List[Optional[str]] = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(None)
            continue
        f = np.float32(il - start) / np.float32(act)
        out.append(names[int(np.searchsorted(s, f, side="right"))])
    return out


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
        g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                              ctypes.POINTER(ctypes.c_size_t)]
        g.ggml_backend_dev_memory.restype = None
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
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _lib().g.ggml_backend_dev_memory(w.dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


# --------------------------------------------------------------------------------------------- a lost worker

_ABORT_CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_state: Dict[str, object] = {}


def lost_worker_message(ggml_message: str, workers: Dict[str, Tuple[str, Endpoint]]) -> str:
    """The one line printed when ggml-rpc aborts: which worker is gone (the ones that refuse a connection now),
    and ggml's own reason."""
    gone = []
    for address, (name, ep) in workers.items():
        try:
            socket.create_connection((ep.host, ep.port), timeout=1.0).close()
        except OSError:
            gone.append(f"{name} ({ep.url})")
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


def workers_of(devices: Dict[str, str]) -> Dict[str, Endpoint]:
    """{name: Endpoint} of an EngineSettings.devices map (name -> URL). FlashMoEError for a bad URL."""
    out = {}
    for name, url in devices.items():
        try:
            out[name] = parse_url(url)
        except ValueError as e:
            raise FlashMoEError(f"device {name}: {e}") from None
    return out


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


# --------------------------------------------------------------------------------------------- the engine's load

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass
class EnginePlan:
    """What the Engine passes to llama.cpp for a placement with remote devices: the device list
    (``llama_model_params.devices``), the layer split (``n_gpu_layers``, ``tensor_split``) and the buffer
    overrides, kept alive for the load; plus the workers and the layout for the report."""

    n_gpu_layers: int
    tensor_split: List[float]
    device_names: List[str]  # llama.cpp's device order: "gpu" (a local GPU) and remote device names
    devices: ctypes.Array  # NULL-terminated ggml_backend_dev_t array
    overrides: Optional[ctypes.Array]
    patterns: List[bytes]
    workers: Dict[str, Worker]
    layout: Layout
    n_overrides: int = 0

    @property
    def addresses(self) -> List[str]:
        return [w.endpoint.address for w in self.workers.values()]

    def after_load(self) -> None:
        """Once the model is loaded (the connections are open): bound how long a worker may take to answer."""
        arm_timeouts(self.addresses, worker_timeout())

    def describe(self) -> str:
        parts = []
        for name in self.layout.order + self.layout.extra:
            w = self.workers[name]
            parts.append(f"{name} {self.layout.describe(name)} ({w.endpoint.url})")
        return "remote devices: " + ", ".join(parts)


CUSTOM_OPS_HELP = ("this llama.cpp's RPC backend would send flashmoe's graph ops (expert streaming, routing "
                   "traces) to the workers, which crash on them: the build needs the patch's ggml-rpc change that "
                   "keeps custom ops on this host (docs/rpc.md); until then use remote devices without streaming, "
                   "--routing-trace or --record-trace")


def engine_plan(model_path: str, placements: Dict[str, str], tensor_devices: Dict[str, str],
                devices: Dict[str, str], timeout: float = 10.0, custom_ops: bool = False) -> EnginePlan:
    """Connects the workers a placement uses and computes what llama.cpp needs to run it (EnginePlan).
    ``custom_ops``: the graph will have flashmoe's custom ops (streaming, forced or recorded routing), which the
    RPC backend must leave on this host (:func:`custom_ops_stay_local`). FlashMoEError for a bad URL, an
    unreachable or incompatible worker, a layout llama.cpp cannot run, or custom ops it would send away."""
    from flashmoe import gpu
    from flashmoe.policy.model import unloaded_layers
    from gguf_tools.reader import open_model

    with open_model(model_path) as m:
        layers = {t.name: t.layer for t in m.tensors}
        n_layer = int(m.n_layer)
        skip = unloaded_layers(m)
    try:
        lay = plan_layout(tensor_devices, layers, n_layer, skip)
    except LayoutError as e:
        raise FlashMoEError(str(e)) from None
    missing = sorted(set(tensor_devices.values()) - set(devices))
    if missing:
        raise FlashMoEError(f"tensors are placed on device {missing[0]}, which is not among the devices "
                            f"({', '.join(devices) or 'none'})")
    eps = workers_of(devices)
    workers = {name: connect(name, eps[name], timeout) for name in lay.order + lay.extra}
    if custom_ops and not all(custom_ops_stay_local(w.dev) for w in workers.values()):
        raise FlashMoEError(CUSTOM_OPS_HELP)
    local_gpu = gpu.local_gpu_device() if any(p == "gpu" for p in placements.values()) else None
    names = (["gpu"] if local_gpu else []) + lay.order + lay.extra
    devs = ([local_gpu] if local_gpu else []) + [workers[n].dev for n in lay.order + lay.extra]
    ngl, split = layer_split(lay, bool(local_gpu))
    assigned = assigned_devices(n_layer, ngl, split, names)
    bufts: Dict[str, int] = {}
    cpu = None
    for name, place in placements.items():
        if place == "stream":
            continue  # lazy: on the file mapping wherever its layer runs; the hook puts the layer's cache slots there
        want: Optional[str] = tensor_devices.get(name) or ("gpu" if place == "gpu" and local_gpu else None)
        il = layers.get(name)
        if il is None:
            il = _block_of(name)
        default = assigned[il] if il is not None and il < len(assigned) else (
            assigned[n_layer] if name.startswith("output") else None)
        if want == default:
            continue
        if want is None:
            cpu = cpu if cpu is not None else gpu.cpu_buffer_type()
            bufts[name] = cpu
        elif want == "gpu":
            assert local_gpu is not None
            bufts[name] = gpu.device_buffer_type(local_gpu)
        else:
            bufts[name] = gpu.device_buffer_type(workers[want].dev)
    arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    overrides, pats = gpu.buft_overrides(bufts)
    return EnginePlan(n_gpu_layers=ngl, tensor_split=split, device_names=names, devices=arr, overrides=overrides,
                      patterns=pats, workers=workers, layout=lay, n_overrides=len(bufts))


def _block_of(name: str) -> Optional[int]:
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------- measuring a run


def measure(engine, prompt: Sequence[int], n_tokens: int) -> dict:
    """One greedy generation on a loaded Engine (from an empty context, the routing trace rewound), timed per
    phase, with the bytes exchanged with its workers: prefill (the prompt, up to the first token) and decode
    (the next ``n_tokens - 1`` tokens, each evaluated by llama.cpp's own loop), per token, from the kernel's
    per-connection counters of this process (:func:`connection_stats`), and the data segments received from
    the workers per token (about the replies waited for: each costs a network round trip). Also the machine-wide loopback
    counter over the decode (an upper bound when other programs use loopback) and the expert cache figures.
    """
    import time

    from flashmoe import llama as llama_api

    if n_tokens < 2:
        raise FlashMoEError("measure needs at least 2 tokens (the first one ends the prefill)")
    addrs = engine.remote.addresses if getattr(engine, "remote", None) else []
    if engine.routing_trace:
        engine.rewind_trace()
    engine.reset_stats()
    engine.clear_error()

    def net() -> Tuple[int, int, int]:
        c = connection_stats(addrs)
        return (sum(v["sent"] for v in c.values()), sum(v["received"] for v in c.values()),
                sum(v["segments_in"] for v in c.values()))

    n0 = net()
    t0 = time.perf_counter()
    steps = llama_api.tokens(engine.llama, list(prompt), llama_api.Sampling(temperature=0.0))
    toks: List[int] = []
    try:
        toks.append(next(steps).token)  # evaluates the prompt
        t1, n1, lo1 = time.perf_counter(), net(), loopback_bytes()
        read1 = engine.stats().get("total", {}).get("bytes_read", 0)
        for _ in range(n_tokens - 1):
            toks.append(next(steps).token)  # evaluates the previous token
        t2, n2, lo2 = time.perf_counter(), net(), loopback_bytes()
    except RuntimeError as e:
        raise engine.decode_error(e) from None
    finally:
        steps.close()
    n_dec = n_tokens - 1
    stats = engine.stats().get("total", {})
    return {
        "prompt_tokens": len(prompt),
        "generated_tokens": len(toks),
        "tokens": toks,
        "prefill_s": t1 - t0,
        "prefill_tok_s": len(prompt) / (t1 - t0) if t1 > t0 else 0.0,
        "decode_s": t2 - t1,
        "decode_tok_s": n_dec / (t2 - t1) if t2 > t1 else 0.0,
        "prefill_net_sent": n1[0] - n0[0],
        "prefill_net_received": n1[1] - n0[1],
        "decode_net_sent_per_token": (n2[0] - n1[0]) / n_dec,
        "decode_net_received_per_token": (n2[1] - n1[1]) / n_dec,
        # data segments from the workers: about the replies this host waited for (one per reply on a LAN/loopback)
        "decode_segments_in_per_token": (n2[2] - n1[2]) / n_dec,
        "decode_loopback_per_token": ((lo2 - lo1) / n_dec) if lo1 is not None and lo2 is not None else None,
        "hit_rate": stats.get("hit_rate"),
        "decode_expert_read_per_token": (stats.get("bytes_read", 0) - read1) / n_dec,
        "workers": {w.endpoint.address: w.name for w in engine.remote.workers.values()} if addrs else {},
    }
