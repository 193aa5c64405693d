"""The offload server: one ONNX model behind HTTP, with dynamic batching.

Devices send a model input they chose not to run themselves (see
:mod:`edgeloop.device.offload`); the server answers with the model's outputs::

    POST /v1/predict   {"inputs": {name: nested list}}  (or an .npz body, application/x-npz)
                    -> {"outputs": [nested list per model output], "names": [...],
                        "dtypes": [...], "batch_size": samples in the batch it ran in}
    GET  /v1/health -> {"status": "ok", "model": ..., "inputs": [...], "max_batch": ...}
    GET  /v1/stats  -> requests, batches, mean batch size, queue delay p50/p99, errors

Dynamic batching (:mod:`edgeloop._batching`, shared with the device runtime) works like
Triton's ``max_queue_delay_microseconds``: requests wait in
a queue; one worker takes the oldest and, until ``max_batch`` samples of the same sample
shape are waiting or the oldest has waited ``max_queue_delay_ms``, lets more arrive; then
it runs one onnxruntime call on the stacked inputs, in a thread so the event loop keeps
accepting requests, and hands each caller its own rows. ``max_batch=1`` turns batching
off. A request of more samples than ``max_batch`` runs as a batch of its own; a model
whose inputs have no free first axis is never batched.

A request that does not fit the model is answered 4xx with one line (see
:mod:`edgeloop._request`) and touches nothing else; if a batch fails in
onnxruntime, its requests are rerun one by one so only the request that causes the
failure is refused. The server holds no state about its callers: it is stateless behind
any load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from edgeloop._batching import Batcher, BatchStats
from edgeloop._http import listen, read_body, running_app, serve_app
from edgeloop._onnx import input_specs, load_model, session
from edgeloop._request import BadRequest, batchable, decode
from edgeloop.errors import UsageError

__all__ = ["OffloadServer", "ServerConfig", "ServerStats", "create_app", "listen", "running",
           "serve"]

_DECODE_IN_THREAD = 1 << 16   # bodies larger than this are decoded off the event loop


@dataclass(frozen=True)
class ServerConfig:
    """How the offload server batches and what it accepts."""

    max_batch: int = 32              # samples per onnxruntime call; 1 = no batching
    max_queue_delay_ms: float = 5.0  # longest the oldest queued request waits for company
    threads: int = 0                 # onnxruntime intra-op threads; 0 = its choice
    max_body_bytes: int = 8 << 20    # request body (and what an .npz unpacks to)
    max_queue: int = 4096            # queued requests before the server answers 503

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1; got {getattr(self, name)}")
        if self.max_queue_delay_ms < 0:
            raise UsageError(f"`max_queue_delay_ms` must be >= 0; got {self.max_queue_delay_ms}")
        if self.threads < 0:
            raise UsageError(f"`threads` must be >= 0; got {self.threads}")


@dataclass
class ServerStats(BatchStats):
    """Counters behind ``GET /v1/stats`` (the batcher's, plus requests answered)."""

    requests: int = 0        # answered 200
    rejected: int = 0        # answered 4xx (bad input) or 503 (queue full)

    def to_dict(self) -> dict[str, object]:
        """The JSON ``/v1/stats`` answers with (times in milliseconds)."""
        return {"requests": self.requests, "rejected": self.rejected, "errors": self.errors,
                **self.batch_dict()}


class OffloadServer:
    """A loaded model, its batcher and the FastAPI app that serves them."""

    def __init__(self, model: str | os.PathLike[str], *,
                 config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.model = Path(model)
        # spinning off: the pool otherwise spins between the server's many small runs on
        # cores the event loop needs (1.3 ms of CPU per request on mnist1d-cnn at 500/s)
        self.sess = session(load_model(self.model), threads=self.config.threads, spin=False)
        self.specs = input_specs(self.sess)
        self.can_batch = batchable(self.specs)
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.stats = ServerStats()
        self.app = create_app(self)


def create_app(server: OffloadServer) -> FastAPI:
    """The FastAPI app of ``server`` (its batcher starts and stops with the app)."""
    config = server.config
    holder: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(lambda feed: server.sess.run(None, feed),
                          max_batch=config.max_batch if server.can_batch else 1,
                          max_delay_ms=config.max_queue_delay_ms, max_queue=config.max_queue,
                          stats=server.stats)
        holder["batcher"] = batcher
        worker = asyncio.create_task(batcher.run_forever())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    app = FastAPI(title="edgeloop offload server", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)

    def refuse(e: BadRequest) -> JSONResponse:
        server.stats.rejected += 1
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        try:
            body = await read_body(request, config.max_body_bytes)
            ctype = request.headers.get("content-type")
            if len(body) > _DECODE_IN_THREAD:
                feed = await asyncio.to_thread(decode, body, ctype, server.specs,
                                               max_bytes=config.max_body_bytes)
            else:
                feed = decode(body, ctype, server.specs, max_bytes=config.max_body_bytes)
            outs, batch_size = await holder["batcher"].submit(feed)
        except BadRequest as e:
            return refuse(e)
        except Exception as e:   # onnxruntime failed on this request alone (in `errors`)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            return refuse(BadRequest(422, f"inference failed: {first}"))
        server.stats.requests += 1
        payload = {"outputs": [o.tolist() for o in outs], "names": server.output_names,
                   "dtypes": [str(o.dtype) for o in outs], "batch_size": batch_size}
        return Response(json.dumps(payload), media_type="application/json")

    @app.get("/v1/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": server.model.name,
                "inputs": [{"name": s.name, "dtype": str(s.dtype),
                            "shape": [d if d is not None else "N" for d in s.shape]}
                           for s in server.specs],
                "outputs": server.output_names,
                "max_batch": config.max_batch if server.can_batch else 1,
                "max_queue_delay_ms": config.max_queue_delay_ms}

    @app.get("/v1/stats")
    async def stats() -> dict[str, object]:
        return server.stats.to_dict()

    return app


def serve(server: OffloadServer, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    serve_app(server.app, sock)


@contextlib.contextmanager
def running(server: OffloadServer, *, host: str = "127.0.0.1",
            port: int = 0) -> Iterator[str]:
    """Serve ``server`` from a thread of this process; yields its base URL and stops it
    on exit (for tests and benchmarks)."""
    with running_app(server.app, host=host, port=port) as url:
        yield url
