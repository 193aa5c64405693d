"""The device's local HTTP API: apps on the device ask the runtime over JSON.

::

    POST /v1/predict[?privacy_class=public]   {"inputs": {name: nested list}}  (or .npz)
                    -> {"output": nested list, "dtype", "stage", "latency_ms", "confidence",
                        "offloaded", "offload_reason", "energy_mj", "energy_source"}
    GET  /v1/health -> what serves (name, version or cascade), its stages and inputs,
                       probation (remaining inferences, errors) or null, offload mode
    GET  /v1/stats  -> answers per stage, offloaded, kept local (by reason), skipped
                       stream windows (by reason), mean latency, energy (joules, mJ per
                       inference, source "rapl" or "estimate"), model errors, rejected
                       requests, micro-batching counts

Request bodies are decoded and checked exactly as the offload server does
(:mod:`edgeloop._request`, shared by both): a request that does not fit the model is
answered 4xx with one line, never reaches onnxruntime, and so never counts against a
model on probation. The runtime runs off the event loop, so concurrent requests can share
a micro-batch (``max_batch`` in the policy). Needs the ``[serve]`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edgeloop._http import listen, read_body, running_app, serve_app
from edgeloop._request import BadRequest, decode
from edgeloop.device.runtime import Runtime
from edgeloop.errors import DataError, EdgeloopError

__all__ = ["create_app", "listen", "running", "serve"]

MAX_BODY_BYTES = 8 << 20


def create_app(runtime: Runtime, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``runtime``."""
    # Every caller of a full micro-batch waits in a thread of its own, and the next batch
    # forms while one runs. asyncio's default pool has cores + 4 threads: on a 2-core
    # device a batch of 8 could never fill and would always wait out max_delay_ms.
    pool = ThreadPoolExecutor(max_workers=2 * runtime.policy.max_batch + 4,
                              thread_name_prefix="edgeloop-predict")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edgeloop device", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    rejected = [0]

    def refuse(status: int, message: str) -> JSONResponse:
        rejected[0] += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        privacy = request.query_params.get("privacy_class")
        try:
            with runtime.arriving():     # micro-batching waits for requests being read
                body = await read_body(request, max_body_bytes)
                feed = decode(body, request.headers.get("content-type"), runtime.inputs,
                              max_bytes=max_body_bytes)
                a = await asyncio.get_running_loop().run_in_executor(
                    pool, functools.partial(runtime.predict, feed.arrays,
                                            privacy_class=privacy))
        except BadRequest as e:
            return refuse(e.status, str(e))
        except DataError as e:           # the caller's input; never the model's fault
            return refuse(422, str(e))
        except EdgeloopError as e:       # the model failed (counted by the runtime)
            return JSONResponse({"error": str(e)}, status_code=500)
        payload = {"output": a.output.tolist(), "dtype": str(a.output.dtype),
                   "stage": a.stage, "latency_ms": a.latency_ms, "confidence": a.confidence,
                   "offloaded": a.offloaded, "offload_reason": a.offload_reason,
                   "energy_mj": a.energy_mj, "energy_source": a.energy_source}
        return Response(json.dumps(payload), media_type="application/json")

    @app.get("/v1/health")
    async def health() -> dict[str, object]:
        return await asyncio.to_thread(runtime.health)

    @app.get("/v1/stats")
    async def stats() -> dict[str, object]:
        return {**runtime.stats.to_dict(), "rejected": rejected[0],
                "batching": runtime.batch_stats()}

    return app


def serve(runtime: Runtime, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    serve_app(create_app(runtime), sock)


@contextlib.contextmanager
def running(runtime: Runtime, *, host: str = "127.0.0.1", port: int = 0,
            max_body_bytes: int = MAX_BODY_BYTES) -> Iterator[str]:
    """Serve ``runtime`` from a thread of this process; yields the base URL (for tests)."""
    app = create_app(runtime, max_body_bytes=max_body_bytes)
    with running_app(app, host=host, port=port) as url:
        yield url
