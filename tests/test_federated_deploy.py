"""Flower's Deployment Engine as real processes on 127.0.0.1: a SuperLink with TLS and
SuperNode authentication, two registered SuperNodes training the body with private
heads, an unregistered SuperNode and one trusting another CA being refused, and the
command line's bad input. Every process the tests start is stopped by them: each runs in
its own session, and the fixture checks that no session is left."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (extra `federated`)")

from test_cli_imports import run as cli_without_heavy_libraries

from edgeloop.cli import main
from edgeloop.errors import TransportError, UsageError
from edgeloop.federated import _procs
from edgeloop.federated.config import PrivateConfig
from edgeloop.federated.credentials import Credentials, make_credentials, make_node_key
from edgeloop.federated.deploy import (
    DeploymentConfig,
    LocalFleet,
    SuperNode,
    free_port,
    local_fleet,
)
from edgeloop.federated.local import HEAD_FILE
from edgeloop.federated.split import split_model
from edgeloop.zoo import build

NODES = 2   # each SuperNode starts a Python process (torch, Flower) per message: two
            # are a federation, with heads to tell apart, at two thirds of three's cost


@dataclass
class Fleet:
    root: Path
    fleet: LocalFleet

    @property
    def creds(self) -> Credentials:
        return self.fleet.creds

    @property
    def address(self) -> str:
        return self.fleet.superlink.address

    @property
    def nodes(self) -> list[SuperNode]:
        return self.fleet.nodes


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("deploy")
    with local_fleet(root, nodes=NODES) as running:
        yield Fleet(root, running)
    left = [p.leftovers() for p in (running.superlink, *running.nodes)]
    assert not any(left), f"Flower processes are left: {left}"


def test_credentials_are_private_and_supernode_keys_are_ec_openssh(tmp_path: Path) -> None:
    creds = make_credentials(tmp_path / "c", nodes=1)
    for private in (creds.server_key, creds.folder / "ca.key", creds.node_key(0)):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert creds.node_key(0).read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert Path(f"{creds.node_key(0)}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert creds.node_keys() == [creds.node_key(0)]


def test_an_unregistered_supernode_is_refused_with_code_2004(
        fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    rogue = fleet.root / "rogue" / "key"
    make_node_key(rogue)
    with pytest.raises(SystemExit) as e:
        main(["federated", "supernode", "--creds", str(fleet.creds.folder), "--key",
              str(rogue), "--superlink", fleet.address, "--partition-id", "0",
              "--num-partitions", str(NODES), "--state-dir", str(fleet.root / "rogue")])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # after the "connecting" line
    assert last.startswith("error: the SuperNode exited") and "code 2004" in last, last
    assert "[code: 2004]" in (fleet.root / "rogue" / "supernode.log").read_text()
    assert all(node.poll() is None for node in fleet.nodes)   # the others keep working


def test_the_register_command_names_the_new_node(fleet: Fleet,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    public = make_node_key(fleet.root / "spare" / "key")
    main(["federated", "register", str(public), "--creds", str(fleet.creds.folder),
          "--superlink", fleet.address])
    assert re.fullmatch(r"registered key\.pub: SuperNode \d+\n", capsys.readouterr().out)


def test_a_supernode_trusting_another_ca_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    other = make_credentials(tmp_path / "other", nodes=1)
    node = SuperNode(other, other.node_key(0), superlink=fleet.address, partition_id=0,
                     num_partitions=NODES, state_dir=tmp_path / "device", max_retries=1,
                     max_wait=10.0)
    try:
        node.start()
        with pytest.raises(TransportError, match="the SuperNode exited with code"):
            node.wait(timeout=60)
    finally:
        node.stop()
    assert "CERTIFICATE_VERIFY_FAILED" in node.output()
    assert all(n.poll() is None for n in fleet.nodes)


def test_registered_supernodes_train_the_body_and_keep_their_heads(fleet: Fleet) -> None:
    share = f"OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // NODES)}".encode()
    for node in fleet.nodes:   # the SuperNodes share this machine's cores
        assert node.proc is not None
        assert share in Path(f"/proc/{node.proc.pid}/environ").read_bytes().split(b"\0")
    config = DeploymentConfig(clients=NODES, rounds=1, head_epochs=1, timeout=300.0)
    seen = []
    result = fleet.fleet.run(config, results=fleet.root / "results", timeout=600.0,
                             on_round=seen.append)
    assert [r.round for r in result.rounds] == [1] and seen == result.rounds
    assert result.rounds[0].replies == NODES and result.rounds[0].failures == 0
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 100_003)
        model = build(config.arch)
    split = split_model(model)
    assert set(result.body) == set(split.shared_keys)   # body and global head
    moved = sum(float(np.linalg.norm(result.body[k] - v.numpy()))
                for k, v in split.shared(model).items())
    assert moved > 0 and result.rounds[0].update_norm > 0
    heads = []
    for node in fleet.nodes:
        head = torch.load(node.state_dir / HEAD_FILE, weights_only=True)
        assert set(head) == set(split.head_keys)
        heads.append(torch.cat([t.flatten() for t in head.values()]))
    assert all(not torch.equal(a, b) for i, a in enumerate(heads) for b in heads[i + 1:])
    assert not list((fleet.root / "results").rglob(HEAD_FILE))


_PARENT = """
import sys, time
from pathlib import Path
from edgeloop.federated.credentials import make_credentials
from edgeloop.federated.deploy import SuperLink
root = Path(sys.argv[1])
link = SuperLink(make_credentials(root / "creds", nodes=0), home=root / "link").start()
print(link.proc.pid, flush=True)
time.sleep(600)
"""


def test_a_superlink_whose_parent_is_killed_stops_with_what_it_started(
        tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert parent.stdout is not None
    started: set[_procs.ProcessKey] = set()
    try:
        link = int(parent.stdout.readline())
        started = _procs.tree(parent.pid)   # the SuperLink and its flower-superexec
        assert link in {pid for pid, _ in started}
        os.killpg(parent.pid, signal.SIGKILL)   # no finally, no atexit: only the kernel
        parent.wait()
        deadline = time.monotonic() + 30
        while _procs.alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _procs.alive(started), _procs.alive(started)
    finally:
        parent.stdout.close()
        _procs.kill(started, signal.SIGKILL)
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


def test_a_run_waiting_for_a_missing_device_fails_with_the_servers_reason(
        fleet: Fleet) -> None:
    config = DeploymentConfig(clients=NODES + 1, rounds=1, timeout=2.0)
    with pytest.raises(TransportError, match=rf"only {NODES} of {NODES + 1} devices "
                                             r"connected within 2 s; log: "):
        fleet.fleet.run(config, results=fleet.root / "missing", timeout=300.0)


@pytest.mark.parametrize("args,message", [
    (["superlink", "--creds", "{tmp}/none"], "is not a credentials folder: no ca.crt"),
    (["superlink", "--creds", "{creds}", "--port", "70000"], "`port` must be 1..65535"),
    (["supernode", "--creds", "{creds}", "--key", "{creds}/nodes/node-0", "--partition-id",
      "0", "--num-partitions", "2", "--state-dir", "{tmp}/d", "--superlink",
      "127.0.0.1:{free}", "--wait", "1"], "SuperLink at 127.0.0.1:{free} unreachable"),
    (["supernode", "--creds", "{creds}", "--key", "{tmp}/nokey", "--partition-id", "0",
      "--num-partitions", "2", "--state-dir", "{tmp}/d"], "no SuperNode private key"),
    (["supernode", "--creds", "{creds}", "--key", "{creds}/nodes/node-0", "--partition-id",
      "2", "--num-partitions", "2", "--state-dir", "{tmp}/d"], "`partition-id` must be 0..1"),
    (["register", "{creds}/nodes/node-0.pub", "--creds", "{creds}", "--superlink", "nohost"],
     "a SuperLink address is HOST:PORT"),
    (["run", "--creds", "{creds}", "--results", "{tmp}/r", "--clients", "1"],
     "`clients` must be at least 2; got 1"),
    (["run", "--creds", "{creds}", "--results", "{creds}/nodes/node-0.pub"],
     "`results` '{creds}/nodes/node-0.pub' cannot be used as a folder"),
    (["credentials", "--out", "{creds}"], "already exists"),
])
def test_bad_deployment_input_is_one_line_and_exit_2(
        args: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    creds = make_credentials(tmp_path / "creds", nodes=1)
    names = {"tmp": tmp_path, "creds": creds.folder, "free": free_port()}
    with pytest.raises(SystemExit) as e:
        main(["federated", *(a.format(**names) for a in args)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err
    assert message.format(**names) in err, err


@pytest.mark.parametrize("command", ["credentials", "superlink", "supernode", "register", "run"])
def test_help_needs_neither_flower_nor_torch(command: str) -> None:
    code, out, err, imports = cli_without_heavy_libraries("federated", command, "--help")
    assert code == 0, err
    assert "Usage:" in out and imports["refused"] == []


def test_a_deployment_refuses_secagg_and_dp_settings_and_keeps_them_out_of_the_app() -> None:
    """SecAgg+ and DP run in simulation only: a deployment with them is refused, and the
    app's run config (TOML) never holds the `private` settings object."""
    with pytest.raises(UsageError, match="simulation engine only"):
        DeploymentConfig(private=PrivateConfig(secagg=True))
    run_config = DeploymentConfig().to_run_config()
    assert "private" not in run_config
    assert all(isinstance(v, int | float | str) for v in run_config.values())
    assert DeploymentConfig.from_run_config(run_config) == DeploymentConfig()
