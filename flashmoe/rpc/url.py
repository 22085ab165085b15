"""Worker addresses: ``rpc://HOST:PORT[/DEVICE]`` URLs (:class:`Endpoint`) and the device names of a policy's
``devices``."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Dict

from flashmoe.errors import FlashMoEError


SCHEME = "rpc://"
DEFAULT_PORT = 50052


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


def workers_of(devices: Dict[str, str]) -> Dict[str, Endpoint]:
    """{name: Endpoint} of an EngineSettings.devices map (name -> URL). FlashMoEError for a bad URL."""
    out = {}
    for name, url in devices.items():
        try:
            out[name] = parse_url(url)
        except ValueError as e:
            raise FlashMoEError(f"device {name}: {e}") from None
    return out
