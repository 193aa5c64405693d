"""Command `offload-server`: one ONNX model behind HTTP with dynamic batching."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeloop.cli._app import app, console


@app.command("offload-server")
def offload_server_cmd(
    model: Annotated[Path, typer.Argument(help="The ONNX model to serve")],
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 = any free one")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    max_batch: Annotated[int, typer.Option(
        min=1, help="Samples per onnxruntime call; 1 turns batching off")] = 32,
    max_queue_delay_ms: Annotated[float, typer.Option(
        min=0.0, help="Longest the oldest queued request waits for others")] = 5.0,
    threads: Annotated[int, typer.Option(
        min=0, help="onnxruntime intra-op threads; 0 = its choice")] = 0,
    max_body_mb: Annotated[float, typer.Option(
        min=0.001, help="Largest request body accepted, in MB")] = 8.0,
) -> None:
    """Serve MODEL to devices that offload: POST /v1/predict, GET /v1/health, /v1/stats."""
    from edgeloop.serve.offload import OffloadServer, ServerConfig, listen, serve

    config = ServerConfig(max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms,
                          threads=threads, max_body_bytes=int(max_body_mb * 1e6))
    server = OffloadServer(model, config=config)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    batching = (f"max batch {server.config.max_batch}, max queue delay "
                f"{config.max_queue_delay_ms:g} ms" if server.can_batch and max_batch > 1
                else "no batching")
    console.print(f"serving {model.name} on http://{shown}:{sock.getsockname()[1]} "
                  f"({batching})", highlight=False, soft_wrap=True)
    sys.stdout.flush()
    serve(server, sock)
