"""Running ``edgeloop bench`` on a device over SSH.

This drives the system's OpenSSH client (``ssh`` and ``scp``) through ``subprocess``
rather than a Python SSH library: a device that a user can reach with ``ssh user@host``
is then reachable here with the same ``~/.ssh/config`` (ports, jump hosts, identities),
agent and ``known_hosts``, and edgeloop needs no extra dependency. ``BatchMode`` makes
ssh fail instead of prompting for a password, so a refusing host ends in an error rather
than a hang.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeloop.errors import DataError, TransportError, UsageError

if TYPE_CHECKING:  # the CLI reads RemoteConfig's defaults without loading onnxruntime
    from edgeloop.bench import BenchConfig, BenchReport

__all__ = ["RemoteConfig", "remote_bench"]


@dataclass(frozen=True)
class RemoteConfig:
    """How to reach the device and which edgeloop to run there."""

    command: str = "edgeloop"          # the device's edgeloop, a shell command prefix
    port: int | None = None            # SSH port; None = ssh's default / ~/.ssh/config
    identity: str | None = None        # private key file; None = ssh's default / agent
    options: tuple[str, ...] = ()      # extra ``-o Key=Value`` settings for ssh and scp
    connect_timeout: int = 10          # seconds to establish the connection
    margin: float = 120.0              # seconds allowed beyond the benchmark's own length


def _common_args(remote: RemoteConfig) -> list[str]:
    args = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={remote.connect_timeout}"]
    if remote.identity:
        args += ["-i", remote.identity, "-o", "IdentitiesOnly=yes"]
    for opt in remote.options:
        args += ["-o", opt]
    return args


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


def _run(argv: Sequence[str], *, host: str, what: str, timeout: float
         ) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise TransportError(f"{argv[0]!r} is not installed; --remote needs the OpenSSH "
                             "client") from None
    except subprocess.TimeoutExpired:
        raise TransportError(f"{what} on {host} did not finish within {timeout:.0f} s") from None
    if proc.returncode == 255 or (proc.returncode != 0 and argv[0] == "scp"):
        raise TransportError(f"cannot {what} on {host}: {_last_line(proc.stderr)}")
    return proc


def bench_argv(model: str, config: BenchConfig, *, data: str | None) -> list[str]:
    """The ``edgeloop bench`` arguments that reproduce ``config`` on the device."""
    argv = ["bench", model, "--json", "--no-plot",
            "--batch", ",".join(str(b) for b in config.batches),
            "--threads", str(config.threads), "--duration", repr(config.duration),
            "--warmup", repr(config.warmup), "--target", config.target]
    if data is not None:
        argv += ["--data", data]
    return argv


def remote_bench(destination: str, model_path: str | os.PathLike[str], *,
                 config: BenchConfig | None = None, remote: RemoteConfig | None = None,
                 data_path: str | os.PathLike[str] | None = None) -> BenchReport:
    """Copy the model (and ``data_path``) to ``destination`` (``[user@]host``) over SSH, run
    the device's own ``edgeloop bench`` there, and return the report it prints."""
    from edgeloop.bench import BenchConfig, BenchReport

    config = config or BenchConfig()
    remote = remote or RemoteConfig()
    if not destination or destination.startswith("-") or any(c.isspace() for c in destination):
        raise UsageError(f"`remote` must look like user@host; got {destination!r}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UsageError(f"model file {str(model_path)!r} does not exist")
    if data_path is not None and not Path(data_path).is_file():
        raise DataError(f"data file {str(data_path)!r} does not exist")
    common = _common_args(remote)
    ssh = ["ssh", *common, *(["-p", str(remote.port)] if remote.port else []), destination]
    scp = ["scp", "-q", *common, *(["-P", str(remote.port)] if remote.port else [])]
    quick = remote.connect_timeout + 60.0

    made = _run([*ssh, "mktemp -d"], host=destination, what="create a working folder",
                timeout=quick)
    workdir = made.stdout.strip()
    if made.returncode != 0 or not workdir.startswith("/"):
        raise TransportError(f"cannot create a working folder on {destination}: "
                             f"{_last_line(made.stderr)}")
    try:
        files = [str(model_path)] + ([str(data_path)] if data_path is not None else [])
        _run([*scp, *files, f"{destination}:{workdir}/"], host=destination,
             what="copy the model", timeout=quick + 10 * len(files))
        remote_model = f"{workdir}/{model_path.name}"
        remote_data = None if data_path is None else f"{workdir}/{Path(data_path).name}"
        line = " ".join([remote.command, *map(shlex.quote, bench_argv(
            remote_model, config, data=remote_data))])
        budget = (config.duration + config.warmup + 5.0) * len(config.batches) + remote.margin
        proc = _run([*ssh, line], host=destination, what="run edgeloop bench", timeout=budget)
    finally:
        subprocess.run([*ssh, f"rm -rf {shlex.quote(workdir)}"], capture_output=True,
                       timeout=quick, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode == 127:
        raise TransportError(f"{remote.command!r} was not found on {destination}; install "
                             "edgeloop there or set the remote command")
    if proc.returncode != 0:
        raise TransportError(f"edgeloop bench failed on {destination} (exit "
                             f"{proc.returncode}): {_last_line(proc.stderr)}")
    try:
        return BenchReport.from_dict(json.loads(proc.stdout))
    except (json.JSONDecodeError, DataError):
        raise TransportError(f"edgeloop on {destination} did not print a bench report: "
                             f"{_last_line(proc.stdout)}") from None
