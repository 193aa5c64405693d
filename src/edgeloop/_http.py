"""What edgeloop's two FastAPI servers share around the app: reading a body within a
limit, a listening socket with a one-line error, and uvicorn in the foreground or in a
thread. Used by the offload server (:mod:`edgeloop.serve.offload`) and the device's local
API (:mod:`edgeloop.device.http`), which are peers and never import each other. Needs the
``[serve]`` extra (FastAPI, uvicorn)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request

from edgeloop._request import BadRequest
from edgeloop.errors import TransportError

__all__ = ["listen", "read_body", "running_app", "serve_app"]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # TCP_NODELAY, which accepted connections inherit (Linux): uvicorn writes a response's
    # head and body separately, and with Nagle the body waited for the client's delayed
    # ACK: 40 ms per request on loopback
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _uvicorn(app: FastAPI) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                         timeout_keep_alive=30, lifespan="on",
                                         timeout_graceful_shutdown=5))


def serve_app(app: FastAPI, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    _uvicorn(app).run(sockets=[sock])


@contextlib.contextmanager
def running_app(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread of this process; yields its base URL and stops it on
    exit (for tests and benchmarks)."""
    sock = listen(host, port)
    uv = _uvicorn(app)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not uv.started:
            if not thread.is_alive():
                raise TransportError("the server stopped while starting")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()
