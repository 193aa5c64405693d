"""Flower's Deployment Engine with TLS and SuperNode authentication: a SuperLink, the
SuperNodes (one per device), their registration, and a run of edgeloop's body/head app.

Each server runs as Flower's own console script (``flower-superlink``,
``flower-supernode``, ``flwr``) in a child process of its own session, with its own
``FLWR_HOME`` and a log file; :meth:`FlowerProcess.stop` sends SIGINT to the whole
session (the server stops the ``flower-superexec`` and app processes it started, which
Flower puts in sessions of their own), then SIGKILL to whatever is left of the session
and of those processes after a grace period (:mod:`._procs`). On Linux a server also
gets SIGINT when the thread that started it ends, however it ends. Flower starts
``flower-superexec`` by name, so the ``PATH`` of every child begins with this
interpreter's ``bin`` folder.

A run (:func:`run`) writes an app folder (:func:`write_app`) whose components are
:mod:`edgeloop.federated.deployed`, points a ``flwr`` connection at the SuperLink, and
calls ``flwr run APP edgeloop --stream`` with a timeout. The SuperLink's ServerApp
writes the rounds and the final body into ``results``; a device's head stays in the
``state-dir`` its SuperNode was started with.

Security: the SuperLink serves TLS with a certificate from the credentials' CA
(:mod:`.credentials`), and accepts only SuperNodes whose public key was registered
(``flwr supernode register``); an unregistered one is refused with Flower's code 2004.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO

import numpy as np

from edgeloop._io import output_folder, write_text_atomic
from edgeloop.errors import TransportError, UsageError
from edgeloop.federated import _procs
from edgeloop.federated._flower import INSTALL
from edgeloop.federated.config import PrivateConfig, ServerConfig, SimulationConfig, _at_least
from edgeloop.federated.credentials import Credentials, make_credentials
from edgeloop.federated.server import RoundReport

__all__ = ["DeploymentConfig", "DeploymentResult", "FlowerProcess", "LocalFleet", "SuperLink",
           "SuperNode", "free_port", "local_fleet", "parse_address", "register", "run",
           "wait_reachable", "write_app"]

ROUNDS_FILE, BODY_FILE, RESULTS_KEY = "rounds.json", "body.npz", "results-dir"
CONNECTION = "edgeloop"          # the name of the flwr connection edgeloop writes
APP_PACKAGE = "edgeloop_app"     # the generated app's package
_CODE = re.compile(r"\[code: (\d+)\] ?(.*)")                # Flower's reason for an exit
_STARTED = re.compile(r"Successfully started run (\d+)")      # `flwr run`'s run id
_OURS = re.compile(r"edgeloop\.errors\.\w+: (.*)")           # an edgeloop error's traceback


@dataclass
class DeploymentConfig(ServerConfig):
    """A run on the Deployment Engine: the server's settings plus the devices' data and
    model (as :class:`~edgeloop.federated.config.SimulationConfig`, same defaults).
    ``clients`` is the number of SuperNodes; the server waits up to ``timeout`` for all
    of them before round 1."""

    alpha: float = SimulationConfig.alpha      # Dirichlet concentration of the label split
    seed: int = SimulationConfig.seed          # data split, shifts, initial weights
    arch: str = SimulationConfig.arch          # a zoo model for MNIST-1D
    head: str | None = None                    # the private head's prefix (split_model's)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("alpha", self.alpha, 0, strict=True)
        if self.private != PrivateConfig():
            raise UsageError("SecAgg+ and differential privacy run on the simulation engine "
                             "only so far (`edgeloop federated simulate`); a deployment "
                             "takes the default `private` settings")

    def to_run_config(self) -> dict[str, int | float | str]:
        """The app's ``[tool.flwr.app.config]``: each field but ``private``, ``_`` spelled
        ``-`` (TOML has no null: no ``head`` is "")."""
        return {f.name.replace("_", "-"): "" if getattr(self, f.name) is None
                else getattr(self, f.name) for f in fields(self) if f.name != "private"}

    @classmethod
    def from_run_config(cls, run_config: dict[str, object]) -> DeploymentConfig:
        """The inverse of :meth:`to_run_config`; other keys are ignored."""
        values = {f.name: run_config[f.name.replace("_", "-")] for f in fields(cls)
                  if f.name.replace("_", "-") in run_config}
        if values.get("head") == "":
            values["head"] = None
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class DeploymentResult:
    """What a run on the Deployment Engine gave."""

    rounds: list[RoundReport]       # as the ServerApp timed them (train + evaluate)
    body: dict[str, np.ndarray]     # the final global body
    seconds: float                  # ``flwr run`` from start to end, wall clock
    log: Path                       # ``flwr run``'s output (the run's log, streamed)


# --- addresses and ports ----------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_port(port: int) -> int:
    if not 0 < port < 65536:
        raise UsageError(f"`port` must be 1..65535; got {port}")
    return port


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or the one-line :class:`UsageError`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"a SuperLink address is HOST:PORT (e.g. 127.0.0.1:9092); "
                         f"got {address!r}")
    return host, _check_port(int(port))


def wait_reachable(address: str, *, timeout: float) -> None:
    """Wait up to ``timeout`` s until ``address`` accepts TCP connections; else raise
    :class:`TransportError` "SuperLink at ADDRESS unreachable ..."."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TransportError(f"SuperLink at {address} unreachable within "
                                     f"{timeout:g} s ({e.strerror or e}); is it running?"
                                     ) from None
            time.sleep(0.2)


# --- Flower's processes -----------------------------------------------------------------

def _flower_command(name: str) -> str:
    """A Flower console script: beside this interpreter (a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise UsageError(f"`{name}` is not installed; install Flower with {INSTALL}")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process: ours, ``FLWR_HOME=home``, and a ``PATH`` that
    starts with this interpreter's ``bin`` (Flower starts ``flower-superexec`` by name)."""
    home.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return os.environ | {"FLWR_HOME": str(home), "PATH": path, "COLUMNS": "200",
                         "PYTHONUNBUFFERED": "1"}


class FlowerProcess:
    """One Flower command in a session of its own, its output in ``log``; ``what`` names
    it in errors."""

    def __init__(self, argv: list[str], *, home: Path, log: Path,
                 what: str = "a Flower process", env: dict[str, str] | None = None) -> None:
        self.argv, self.home, self.log, self.what = argv, home, log, what
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._tree: set[_procs.ProcessKey] = set()

    def start(self) -> FlowerProcess:
        """Start the command (see the module docstring)."""
        command = _flower_command(self.argv[0])
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "ab")  # noqa: SIM115  (closed by stop)
        self.proc = subprocess.Popen([command, *self.argv[1:]],
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT,
                                     env=flower_env(self.home) | self.env,
                                     start_new_session=True,
                                     preexec_fn=functools.partial(_procs.die_with_parent,
                                                                  os.getpid()))
        return self

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def output(self) -> str:
        """Everything the process has logged so far."""
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def reason(self) -> str:
        """Why it failed, from its log: the message of an edgeloop error the app raised,
        else Flower's last ``[code: N]`` line, else the last line."""
        lines = [ln.strip() for ln in self.output().splitlines() if ln.strip()]
        ours = [m.group(1) for ln in lines if (m := _OURS.match(ln))]
        codes = [m for ln in lines if (m := _CODE.search(ln))]
        return (ours[-1] if ours else f"code {codes[-1].group(1)}: {codes[-1].group(2)}"
                if codes else lines[-1] if lines else "no output")

    def failure(self) -> TransportError:
        """The error for its exit: exit code, :meth:`reason` and the log's path."""
        return TransportError(f"{self.what} exited with code {self.poll()} "
                              f"({self.reason()}); log: {self.log}")

    def interrupt(self) -> None:
        """SIGINT to the process's session, without waiting (to stop several at once:
        interrupt each, then :meth:`stop` each). The processes it started in sessions of
        their own are noted first, for :meth:`stop`."""
        if self.proc is not None and self.proc.poll() is None:
            self._tree |= _procs.tree(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)   # the leader of its own session

    def leftovers(self) -> set[_procs.ProcessKey]:
        """What still runs of it and of what it started (empty once :meth:`stop` ends)."""
        if self.proc is None:
            return set()
        group = set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 0)
            group = {(self.proc.pid, -1)}   # someone of its session (a zombie, maybe)
        return group | _procs.alive(self._tree)

    def stop(self, grace: float = 15.0) -> None:
        """SIGINT to it (:meth:`interrupt`); SIGKILL to all of it and of what it started
        once it has exited and they had a few seconds more, or after ``grace`` s; then
        wait (5 s at most) until none of it is left."""
        if self.proc is not None:
            self.interrupt()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
            # children can outlive it (an app busy in a long step), zombies too, until
            # init reaps them once their parent has gone: hence SIGKILL, then wait
            self._wait_gone(3.0 if self.proc.returncode is not None else 0.0)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            _procs.kill(self._tree, signal.SIGKILL)
            self.proc.wait()
            self._wait_gone(5.0)
        if self._out is not None:
            self._out.close()
            self._out = None

    def _wait_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SuperLink(FlowerProcess):
    """``flower-superlink`` on ``host:port`` with TLS from ``creds`` and SuperNode
    authentication; its state in ``database`` (a SQLite file; default: in memory, so
    registrations last as long as the process)."""

    def __init__(self, creds: Credentials, *, home: Path, port: int = 0,
                 host: str = "127.0.0.1", database: Path | None = None,
                 log: Path | None = None, start_timeout: float = 60.0) -> None:
        creds.check(server=True)
        self.host, self.port = host, _check_port(port) if port else free_port()
        self.start_timeout = start_timeout
        argv = ["flower-superlink", "--ssl-ca-certfile", str(creds.ca_cert),
                "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile",
                str(creds.server_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", host, "--port", str(self.port)]
        if database is not None:
            argv += ["--database", str(database)]
        super().__init__(argv, home=home, log=log or home / "superlink.log",
                         what="the SuperLink")

    @property
    def address(self) -> str:
        """``host:port``, what SuperNodes and ``flwr`` connect to."""
        return f"{self.host}:{self.port}"

    def start(self) -> SuperLink:
        """Start it and wait until it accepts connections; if it does not, stop what it
        started and raise :class:`TransportError`."""
        super().start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.poll() is not None:
                error = self.failure()
            elif time.monotonic() > deadline:
                error = TransportError(f"the SuperLink did not listen on {self.address} "
                                       f"within {self.start_timeout:g} s; log: {self.log}")
            else:
                with contextlib.suppress(OSError), socket.create_connection(
                        (self.host, self.port), timeout=1.0):
                    return self
                time.sleep(0.2)
                continue
            self.stop()
            raise error


def _node_config(partition_id: int, num_partitions: int, state_dir: Path) -> str:
    if not 0 <= partition_id < num_partitions:
        raise UsageError(f"`partition-id` must be 0..{num_partitions - 1}; "
                         f"got {partition_id}")
    if "'" in str(state_dir) or "\n" in str(state_dir):
        raise UsageError(f"a state folder's path cannot hold a quote or a newline (Flower's "
                         f"node config): {str(state_dir)!r}")
    return (f"partition-id={partition_id} num-partitions={num_partitions} "
            f"state-dir='{state_dir.resolve()}'")


class SuperNode(FlowerProcess):
    """``flower-supernode``: one device, authenticated by its private ``key``, trusting
    ``creds``' CA; ``port`` is its local runtime API (one per SuperNode on a host).
    It gives up after ``max_retries`` failed connections or ``max_wait`` s. ``threads``:
    torch's threads in its ClientApp processes (0: every core); SuperNodes sharing a
    host share its cores (two on 2 cores at two threads each: a local epoch of the zoo
    CNN took 14 s instead of 2.5 s, x86-avx2).
    """

    def __init__(self, creds: Credentials, key: Path, *, superlink: str, partition_id: int,
                 num_partitions: int, state_dir: Path, home: Path | None = None,
                 port: int = 0, log: Path | None = None, max_retries: int = 3,
                 max_wait: float = 30.0, reach_timeout: float = 10.0,
                 threads: int = 0) -> None:
        creds.check()
        _at_least("threads", threads, 0)
        if not key.is_file():
            raise UsageError(f"no SuperNode private key at {str(key)!r}")
        parse_address(superlink)
        self.superlink, self.reach_timeout = superlink, reach_timeout
        self.state_dir = state_dir
        home = home or state_dir / "flwr"
        argv = ["flower-supernode", "--root-certificates", str(creds.ca_cert),
                "--superlink", superlink, "--auth-supernode-private-key", str(key),
                "--port", str(_check_port(port) if port else free_port()),
                "--max-retries", str(max_retries), "--max-wait-time", str(max_wait),
                "--node-config", _node_config(partition_id, num_partitions, state_dir)]
        super().__init__(argv, home=home, log=log or state_dir / "supernode.log",
                         what="the SuperNode",
                         env={"OMP_NUM_THREADS": str(threads)} if threads else None)

    def start(self) -> SuperNode:
        """Check that the SuperLink is reachable (within ``reach_timeout`` s), then start."""
        wait_reachable(self.superlink, timeout=self.reach_timeout)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        super().start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until it exits (Ctrl-C stops it), ``timeout`` s at most; raise
        :class:`TransportError` with Flower's reason when it failed (e.g. code 2004: the
        SuperLink does not know its key)."""
        assert self.proc is not None, "start() first"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        if self.poll():
            raise self.failure()


# --- the flwr control CLI ---------------------------------------------------------------

@contextlib.contextmanager
def _connection(superlink: str, creds: Credentials, home: Path | None) -> Iterator[Path]:
    """A ``FLWR_HOME`` whose default connection is ``superlink`` over TLS (``home``, or a
    temporary folder removed afterwards)."""
    parse_address(superlink)
    creds.check()
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flwr-")))
        write_text_atomic(home / "config.toml", (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(superlink)}\n"
            f"root-certificates = {json.dumps(str(creds.ca_cert.resolve()))}\n"))
        yield home


def _flwr(args: list[str], home: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([_flower_command("flwr"), *args], capture_output=True,
                              text=True, env=flower_env(home), timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TransportError(f"`flwr {args[0]} {args[1]}` did not answer within "
                             f"{timeout:g} s") from None


def _json_reply(proc: subprocess.CompletedProcess[str], doing: str) -> dict[str, object]:
    try:
        reply = json.loads(proc.stdout)
    except json.JSONDecodeError:
        reply = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}
    if proc.returncode or not reply.get("success", False):
        message = str(reply.get("error-message") or "no reason given").strip().splitlines()
        raise TransportError(f"{doing} failed: {message[-1] if message else 'no output'}")
    return reply


def register(public_key: Path, *, superlink: str, creds: Credentials,
             home: Path | None = None, timeout: float = 60.0) -> int:
    """Register a SuperNode's public key with the SuperLink; returns its node id."""
    if not public_key.is_file():
        raise UsageError(f"no public key at {str(public_key)!r}")
    wait_reachable(superlink, timeout=min(timeout, 10.0))
    with _connection(superlink, creds, home) as flwr_home:
        proc = _flwr(["supernode", "register", str(public_key.resolve()), CONNECTION,
                      "--format", "json"], flwr_home, timeout=timeout)
    reply = _json_reply(proc, f"registering {public_key.name}")
    return int(reply["node-id"])  # type: ignore[call-overload]


# --- the app and a run ------------------------------------------------------------------

def _toml_value(value: int | float | str) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def write_app(folder: Path, config: DeploymentConfig, *, results: Path) -> Path:
    """Write the app folder ``flwr run`` takes: a ``pyproject.toml`` whose components are
    :mod:`edgeloop.federated.deployed`'s apps (through two one-line modules), ``config``
    and ``results`` as its run config, and no dependencies (the SuperLink and SuperNodes
    run it with their own Python, which has edgeloop)."""
    run_config = config.to_run_config() | {RESULTS_KEY: str(results.resolve())}
    lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in run_config.items())
    write_text_atomic(folder / "pyproject.toml", f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgeloop-federated"
version = "1.0.0"
description = "edgeloop's federated body with private heads"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["{APP_PACKAGE}"]

[tool.flwr.app]
publisher = "edgeloop"

[tool.flwr.app.components]
serverapp = "{APP_PACKAGE}.server:app"
clientapp = "{APP_PACKAGE}.client:app"

[tool.flwr.app.config]
{lines}
""")
    package = folder / APP_PACKAGE
    write_text_atomic(package / "__init__.py", '"""edgeloop\'s federated app."""\n')
    for side in ("server", "client"):
        write_text_atomic(package / f"{side}.py",
                          f'"""The {side} app."""\n\nfrom edgeloop.federated.deployed '
                          f"import {side}app as app\n\n__all__ = [\"app\"]\n")
    return folder


def _rounds(results: Path) -> list[RoundReport]:
    path = results / ROUNDS_FILE   # written atomically: whole or absent
    return [RoundReport(**r) for r in json.loads(path.read_text())] if path.is_file() else []


def _report_new(results: Path, seen: int,
                on_round: Callable[[RoundReport], None] | None) -> int:
    """Hand the rounds after the first ``seen`` to ``on_round``; returns how many there are."""
    rounds = _rounds(results)
    for report in rounds[seen:] if on_round is not None else []:
        on_round(report)
    return len(rounds)


def _stop_run(proc: FlowerProcess, flwr_home: Path) -> None:
    """Ask the SuperLink to stop the run ``flwr run`` started (its id is in the log), so
    that a run given up on does not keep the SuperNodes busy."""
    if started := _STARTED.search(proc.output()):
        with contextlib.suppress(TransportError):   # the error that ended the run matters
            _flwr(["stop", started.group(1), CONNECTION], flwr_home, timeout=60.0)


def run(config: DeploymentConfig, *, superlink: str, creds: Credentials, results: Path,
        home: Path | None = None, timeout: float = 900.0,
        on_round: Callable[[RoundReport], None] | None = None) -> DeploymentResult:
    """Run ``config`` on the SuperLink at ``superlink`` (its SuperNodes started and
    registered) and wait for the end, ``timeout`` s at most. ``results`` gets the app
    folder, ``flwr run``'s log, ``rounds.json`` and ``body.npz`` (on loopback; the
    ServerApp writes the latter two where it runs). ``home``: the ``FLWR_HOME`` to use
    (default: a temporary one). ``on_round`` gets each round's report as it ends."""
    _at_least("timeout", timeout, 0, strict=True)
    output_folder(results, "results")
    wait_reachable(superlink, timeout=min(timeout, 10.0))
    for stale in (ROUNDS_FILE, BODY_FILE):
        (results / stale).unlink(missing_ok=True)
    app = write_app(results / "app", config, results=results)
    log = results / "flwr-run.log"
    with _connection(superlink, creds, home) as flwr_home:
        proc = FlowerProcess(["flwr", "run", str(app), CONNECTION, "--stream"],
                             home=flwr_home, log=log, what="`flwr run`")
        started = time.perf_counter()
        seen, ended = 0, False
        try:
            proc.start()
            while proc.poll() is None:
                if time.perf_counter() - started > timeout:
                    raise TransportError(f"the run did not end within {timeout:g} s; "
                                         f"log: {log}")
                time.sleep(0.5)
                seen = _report_new(results, seen, on_round)
            seconds, ended = time.perf_counter() - started, True
            _report_new(results, seen, on_round)
            if proc.poll() or not (results / BODY_FILE).is_file():
                raise TransportError(f"the run failed: {proc.reason()}; log: {log}")
        finally:
            proc.stop()
            if not ended:   # timed out or interrupted: the run goes on without `flwr run`
                _stop_run(proc, flwr_home)
    with np.load(results / BODY_FILE) as npz:
        body = {k: npz[k] for k in npz.files}
    return DeploymentResult(_rounds(results), body, seconds, log)


# --- a fleet on one machine -------------------------------------------------------------

@dataclass
class LocalFleet:
    """A SuperLink and its registered SuperNodes on 127.0.0.1 (:func:`local_fleet`)."""

    creds: Credentials
    superlink: SuperLink
    nodes: list[SuperNode]

    def run(self, config: DeploymentConfig, *, results: Path, timeout: float = 900.0,
            on_round: Callable[[RoundReport], None] | None = None) -> DeploymentResult:
        """:func:`run` on this fleet."""
        return run(config, superlink=self.superlink.address, creds=self.creds,
                   results=results, timeout=timeout, on_round=on_round)


@contextlib.contextmanager
def local_fleet(root: Path, *, nodes: int) -> Iterator[LocalFleet]:
    """A SuperLink with TLS and SuperNode authentication on a free port of 127.0.0.1 and
    ``nodes`` registered SuperNodes (devices ``root/device-<i>``, sharing this machine's
    cores), from new credentials in ``root/creds``; everything started is stopped on
    exit."""
    creds = make_credentials(root / "creds", nodes=nodes)
    link = SuperLink(creds, home=root / "superlink", database=root / "superlink" / "state.db")
    started: list[FlowerProcess] = [link]
    try:
        link.start()
        for i in range(nodes):
            register(Path(f"{creds.node_key(i)}.pub"), superlink=link.address, creds=creds)
        devices = [SuperNode(creds, creds.node_key(i), superlink=link.address,
                             partition_id=i, num_partitions=nodes,
                             state_dir=root / f"device-{i}",
                             threads=max(1, _procs.usable_cores() // nodes))
                   for i in range(nodes)]
        for node in devices:
            started.append(node)
            node.start()
        yield LocalFleet(creds, link, devices)
    finally:
        for proc in started:   # all at once: each takes seconds to wind down
            proc.interrupt()
        for proc in reversed(started):
            proc.stop()
