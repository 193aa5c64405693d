"""The ``edgeloop`` command line: parse, call the library, render. No logic lives here.

Every :class:`~edgeloop.errors.EdgeloopError` and every usage error (unknown command or
option, missing argument, bad option value) becomes one line on stderr and exit code 2;
Ctrl-C exits with 130.

The app runs in typer's non-standalone mode so that edgeloop prints errors itself. typer
0.27 and later raise their own exceptions (its vendored click's, under the public base
:class:`typer.TyperException`), not ``click``'s, and report ``--help`` and Ctrl-C as a
returned exit code; pyproject.toml declares the typer versions this is tested with.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.markup import escape

from edgeloop._progress import quiet_libraries
from edgeloop.cli import bench as _bench  # noqa: F401  (registers its commands)
from edgeloop.cli import bundle as _bundle  # noqa: F401  (registers its commands)
from edgeloop.cli import compress as _compress  # noqa: F401  (registers its commands)
from edgeloop.cli import device as _device  # noqa: F401  (registers its commands)
from edgeloop.cli import federated as _federated  # noqa: F401  (registers its commands)
from edgeloop.cli import federated_deploy as _federated_deploy  # noqa: F401  (registers its commands)
from edgeloop.cli import optimize as _optimize  # noqa: F401  (registers its commands)
from edgeloop.cli import personal as _personal  # noqa: F401  (registers its commands)
from edgeloop.cli import serve as _serve  # noqa: F401  (registers its commands)
from edgeloop.cli import telemetry as _telemetry  # noqa: F401  (registers its commands)
from edgeloop.cli import train as _train  # noqa: F401  (registers its commands)
from edgeloop.cli._app import app, err_console
from edgeloop.errors import EdgeloopError
from edgeloop.federated._flower import INSTALL as FLOWER_INSTALL

__all__ = ["OPTIONAL", "app", "main"]

# Libraries only some commands use, and the extra that installs each. A device install
# (plain `pip install edgeloop`) has none of them and still runs device, bench, quantize,
# evaluate and optimize on ONNX models.
OPTIONAL = {"torch": "train", "onnxscript": "train", "sklearn": "train",
            "transformers": "transformers",
            "litert_torch": "tflite", "ai_edge_litert": "tflite", "coremltools": "coreml",
            "fastapi": "serve", "uvicorn": "serve", "starlette": "serve",
            "sqlalchemy": "telemetry", "psycopg": "telemetry",
            "flwr": "federated", "ray": "federated", "dp_accounting": "federated"}


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False,
                      soft_wrap=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``edgeloop`` console script."""
    quiet_libraries()
    try:
        code = app(args=argv, prog_name="edgeloop", standalone_mode=False)
    except EdgeloopError as e:
        _fail(str(e))
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in OPTIONAL:
            raise
        extra = OPTIONAL[top]
        _fail(f"this command needs `{top}`, which is not installed; install it with "
              + (FLOWER_INSTALL if extra == "federated" else f"pip install 'edgeloop[{extra}]'"))
    except typer.TyperException as e:   # usage errors, raised by typer's own click
        _usage_error(e)
    except (typer.Abort, KeyboardInterrupt):
        code = _INTERRUPTED
    except typer.Exit as e:   # a command's own typer.Exit(code)
        code = e.exit_code
    if code == _INTERRUPTED:   # typer turns Ctrl-C into this exit code
        err_console.print("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)


_INTERRUPTED = 130   # the shell's code for a process ended by SIGINT


def _usage_error(e: typer.TyperException) -> NoReturn:
    """One line naming the mistake and where help is; with no arguments at all (typer's
    ``no_args_is_help``), the help itself."""
    message = e.format_message().strip()
    if not message or "\n" in message:   # a group called without a command: its help
        if message:                         # (typer has drawn it already when rich is used)
            err_console.print(message, markup=False, highlight=False)
        sys.exit(2)
    ctx = getattr(e, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    _fail(f"{message}{hint}")
