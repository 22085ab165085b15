"""Running the app: a listening socket, a uvicorn server on it, and a server in a background thread."""
from __future__ import annotations

import socket
import threading
import time

from flashmoe.errors import FlashMoEError


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FlashMoEError(f"cannot resolve host {host!r}: {e}")
    err = None
    for family, stype, proto, _name, addr in infos:
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(128)
            s.set_inheritable(True)
            return s
        except OSError as e:
            err = e
            s.close()
    raise FlashMoEError(f"cannot listen on {host}:{port}: {err}")


def make_server(app, sock: socket.socket, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class ServerThread:
    """The server in a background thread (tests, notebooks): ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        h, p = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
        self.port = p
        self.server = make_server(app, self.sock, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive():
                raise FlashMoEError("the server thread stopped while starting")
            if time.time() - t0 > timeout:
                raise FlashMoEError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
