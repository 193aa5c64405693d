"""The ``edgeloop`` command line: parse, call the library, render. No logic lives here.

Every :class:`~edgeloop.errors.EdgeloopError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from edgeloop._progress import quiet_libraries
from edgeloop.cli import bench as _bench  # noqa: F401  (registers its commands)
from edgeloop.cli import bundle as _bundle  # noqa: F401  (registers its commands)
from edgeloop.cli import compress as _compress  # noqa: F401  (registers its commands)
from edgeloop.cli import optimize as _optimize  # noqa: F401  (registers its commands)
from edgeloop.cli import train as _train  # noqa: F401  (registers its commands)
from edgeloop.cli._app import app, err_console
from edgeloop.errors import EdgeloopError

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``edgeloop`` console script."""
    quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except EdgeloopError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
