"""A throwaway PostgreSQL server on 127.0.0.1, wherever the server binaries are.

:func:`pg_bin` finds the binaries (``pg_config --bindir`` when it holds them, else the
newest of Debian's ``/usr/lib/postgresql/*/bin``), :func:`postgres_server` runs one. The
fixture of ``tests/test_telemetry_collector.py`` and the collector benchmark
(``_fleet.py``) use both; ``.ci/run`` runs this file (standard library only) to decide
whether to install Debian's ``postgresql``: it prints the directory, or exits 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port", "pg_bin", "postgres_server"]

DEBIAN = Path("/usr/lib/postgresql")    # Debian's layout: one folder per major version
SERVER = ("initdb", "pg_ctl")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bin() -> Path | None:
    """The folder holding PostgreSQL's ``initdb`` and ``pg_ctl``, None if none does
    (``pg_config`` may come from a client-only package, or another major version)."""
    found = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found.append(Path(subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                         text=True, check=True, timeout=30).stdout.strip()))
    versions = [d for d in DEBIAN.glob("*/bin") if d.parent.name.replace(".", "").isdigit()]
    found += sorted(versions, key=lambda d: [int(p) for p in d.parent.name.split(".")],
                    reverse=True)
    return next((d for d in found
                 if all(os.access(d / name, os.X_OK) for name in SERVER)), None)


@contextlib.contextmanager
def postgres_server(bindir: Path) -> Iterator[str]:
    """A PostgreSQL server of ``bindir``'s binaries in a temporary folder, run as user
    ``postgres`` when we are root (initdb refuses root); yields its URL."""
    root = Path(tempfile.mkdtemp(prefix="edgeloop-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    try:
        subprocess.run([*as_user, bindir / "initdb", "-D", data, "-A", "trust", "-U",
                        "edgeloop", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-l", root / "log", "-w",
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start"], check=True, capture_output=True, timeout=120)
        yield f"postgresql://edgeloop@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    bindir = pg_bin()
    if bindir is None:
        sys.exit("no PostgreSQL server binaries (initdb, pg_ctl) in `pg_config --bindir` "
                 f"or {DEBIAN}/*/bin")
    print(bindir)
