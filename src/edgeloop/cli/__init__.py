"""The ``edgeloop`` command line: parse, call the library, render. No logic lives here.

Every :class:`~edgeloop.errors.EdgeloopError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from rich.markup import escape

from edgeloop._progress import quiet_libraries
from edgeloop.cli import bench as _bench  # noqa: F401  (registers its commands)
from edgeloop.cli import bundle as _bundle  # noqa: F401  (registers its commands)
from edgeloop.cli import compress as _compress  # noqa: F401  (registers its commands)
from edgeloop.cli import optimize as _optimize  # noqa: F401  (registers its commands)
from edgeloop.cli import train as _train  # noqa: F401  (registers its commands)
from edgeloop.cli._app import app, err_console
from edgeloop.errors import EdgeloopError

__all__ = ["OPTIONAL", "app", "main"]

# Libraries only some commands use, and the extra that installs each. A device install
# (plain `pip install edgeloop`) has none of them and still runs device, bench, quantize,
# evaluate and optimize on ONNX models.
OPTIONAL = {"torch": "train", "onnxscript": "train", "transformers": "transformers",
            "litert_torch": "tflite", "ai_edge_litert": "tflite", "coremltools": "coreml"}


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False,
                      soft_wrap=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``edgeloop`` console script."""
    quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except EdgeloopError as e:
        _fail(str(e))
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in OPTIONAL:
            raise
        _fail(f"this command needs `{top}`, which is not installed; install it with "
              f"pip install 'edgeloop[{OPTIONAL[top]}]'")
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
