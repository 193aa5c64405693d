"""Progress bars for long loops (training, calibration, timing), drawn on stderr by rich.

Library code calls :func:`progress`; bars disappear when stderr is not a terminal or when
``EDGELOOP_QUIET=1``, so tests and pipes stay clean.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_console = Console(stderr=True)


def enabled() -> bool:
    """Whether progress bars are drawn."""
    return sys.stderr.isatty() and os.environ.get("EDGELOOP_QUIET") != "1"


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a transient progress bar labelled ``description``."""
    if not enabled():
        yield from items
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=_console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def status(message: str) -> None:
    """A one-line note on stderr (silent under the same rules as the bars)."""
    if enabled():
        _console.print(f"[dim]{message}[/dim]")


def quiet_libraries() -> None:
    """Keep the libraries' INFO chatter (onnxruntime's quantizer configures the root logger
    at INFO) off the terminal; warnings from everything else still show."""
    logging.basicConfig(level=logging.WARNING)
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    if _not_onnxruntime_advice not in root.filters:
        root.addFilter(_not_onnxruntime_advice)
    for noisy in ("onnxruntime", "onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _not_onnxruntime_advice(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizer warns through the root logger (e.g. "consider
    pre-processing"), about choices edgeloop makes and measures itself; its errors pass."""
    return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname
