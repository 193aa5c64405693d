"""The fleet's telemetry collector: devices POST signed private reports, it stores them.

::

    POST /v1/reports   body: a report (canonical JSON, see edgeloop.monitor.telemetry.report)
                       headers: X-Edgeloop-Device: ID, X-Edgeloop-Signature: HMAC hex
                    -> 200 {"stored": SEQ}
                       401 unknown device, missing or wrong signature
                       409 that device's SEQ is stored already: these very bytes (a
                           replay, or a resend), or another report ({"conflict": true}:
                           the device's numbering went back; nothing stored)
                       400 / 413 / 422 not a report, too large, invalid content
    GET  /v1/health -> {"status": "ok", "reports": N}

Checks run in this order, and a refused report touches nothing: the signature over the
exact body bytes under the device's enrolled key (before the body is even parsed), the
report itself (schema, mechanism parameters, every output in its mechanism's output
space), that it names the device that signed it, then the store's unique (device, seq),
which refuses a replay atomically. 200 is sent only after the report has been committed.
Devices are enrolled beforehand (``edgeloop telemetry enroll``); their keys are cached.

Stateless apart from the database: several collectors can share one PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from edgeloop._http import read_body, running_app, serve_app
from edgeloop._request import BadRequest
from edgeloop.errors import TransportError
from edgeloop.monitor.telemetry.client import DEVICE_HEADER, REPORTS_PATH, SIGNATURE_HEADER
from edgeloop.monitor.telemetry.report import MAX_BODY, BadReport, parse_report, signature_ok
from edgeloop.serve.telemetry_store import TelemetryStore

__all__ = ["create_app", "running", "serve"]


def create_app(store: TelemetryStore) -> FastAPI:
    """The collector's FastAPI app over ``store``."""
    app = FastAPI(title="edgeloop telemetry collector", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(TransportError)
    async def database_down(_request: Request, e: TransportError) -> JSONResponse:
        return refuse(503, str(e))   # the device keeps the report and sends it later

    @app.post(REPORTS_PATH)
    async def receive(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, MAX_BODY)
        except BadRequest as e:
            return refuse(e.status, str(e))
        device = request.headers.get(DEVICE_HEADER, "")
        signature = request.headers.get(SIGNATURE_HEADER, "")
        if not device or not signature:
            return refuse(401, f"a report needs the {DEVICE_HEADER} and {SIGNATURE_HEADER} "
                               "headers")
        key = await asyncio.to_thread(store.key, device[:64])
        if key is None:
            return refuse(401, f"device {device[:64]!r} is not enrolled "
                               "(`edgeloop telemetry enroll`)")
        if not signature_ok(body, signature, key):
            return refuse(401, "the signature does not match the device's key")
        try:
            report = parse_report(body)
        except BadReport as e:
            return refuse(e.status, str(e))
        if report.device != device:
            return refuse(401, "the report names another device than the one that signed it")
        outcome = await asyncio.to_thread(store.add, report, body)
        if outcome == "duplicate":
            return refuse(409, f"report {report.seq} of device {device} is stored already "
                               "(replay refused)")
        if outcome == "conflict":
            return JSONResponse({"error": f"device {device} already sent another report "
                                          f"numbered {report.seq}: its ledger went back "
                                          "(restored or repaired); nothing stored",
                                 "conflict": True}, status_code=409)
        return JSONResponse({"stored": report.seq})

    @app.get("/v1/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "reports": await asyncio.to_thread(store.count)}

    return app


def serve(store: TelemetryStore, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    serve_app(create_app(store), sock)


@contextlib.contextmanager
def running(store: TelemetryStore, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``store`` from a thread of this process; yields the base URL and stops on
    exit (for tests and benchmarks)."""
    with running_app(create_app(store), host=host, port=port) as url:
        yield url
